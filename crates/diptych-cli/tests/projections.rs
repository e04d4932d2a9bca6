//! `diptych projections …` against a data directory whose projection runs in this
//! test process, as it would in an application's process.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use diptych::sqlite::{SqliteStore, SqliteViews};
use diptych::testkit::{Tallies, added, append_one, run_tallies, wait_until_caught_up};
use diptych::{EventStore, NewEvent, ViewStore};
use serde_json::{Value, json};

fn diptych(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diptych"))
        .args(args)
        .output()
        .expect("the diptych binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn open(data: &Path) -> (Arc<dyn EventStore>, Arc<dyn ViewStore>) {
    (
        Arc::new(SqliteStore::open(data.join("events.db")).unwrap()),
        Arc::new(SqliteViews::open(data.join("views.db")).unwrap()),
    )
}

fn status(data: &str) -> Vec<Value> {
    let output = diptych(&["projections", "status", "--json", "--data", data]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_status_handles_parked_events_pauses_and_rebuilds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let (store, views) = open(dir.path());
    let tallies = Arc::new(Tallies::default());
    tallies.broken.store(true, Ordering::SeqCst);
    let runner = run_tallies(store.clone(), views.clone(), tallies.clone()).await;
    for n in 0..50 {
        append_one(&*store, "stock-1", added(&format!("item-{}", n % 4), 1)).await;
    }
    let poison = append_one(
        &*store,
        "stock-1",
        NewEvent::new("Poison", json!({ "item": "p" })),
    )
    .await;
    wait_until_caught_up(&*store, &*views, "tallies").await;

    let statuses = status(&data);
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0]["name"], "tallies");
    assert_eq!(statuses[0]["position"], poison.0);
    assert_eq!(statuses[0]["head"], poison.0);
    assert_eq!(statuses[0]["lag_events"], 0);
    assert_eq!(statuses[0]["parked"], 1);
    assert_eq!(statuses[0]["state"], "live");
    let table = diptych(&["projections", "status", "--data", &data]);
    assert!(
        text(&table.stdout).contains("tallies"),
        "{}",
        text(&table.stdout)
    );

    let parked = diptych(&["projections", "parked", "tallies", "--data", &data]);
    assert!(parked.status.success(), "{}", text(&parked.stderr));
    let listing = text(&parked.stdout);
    assert!(
        listing.contains(&poison.to_string()) && listing.contains("cannot handle p"),
        "{listing}"
    );

    // Fixed: retry the parked event through the CLI; the running projection applies it.
    tallies.broken.store(false, Ordering::SeqCst);
    let position = poison.to_string();
    let retry = diptych(&[
        "projections",
        "retry",
        "tallies",
        &position,
        "--data",
        &data,
    ]);
    assert!(retry.status.success(), "{}", text(&retry.stderr));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while views.projection("tallies").await.unwrap().parked > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the retry was never applied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(views.get("tallies", "handled-p").await.unwrap().is_some());

    let pause = diptych(&["projections", "pause", "tallies", "--data", &data]);
    assert!(pause.status.success(), "{}", text(&pause.stderr));
    assert_eq!(status(&data)[0]["state"], "paused");
    let resume = diptych(&["projections", "resume", "tallies", "--data", &data]);
    assert!(resume.status.success(), "{}", text(&resume.stderr));
    assert_eq!(status(&data)[0]["state"], "live");

    let data_for_rebuild = data.clone();
    let rebuild = tokio::task::spawn_blocking(move || {
        diptych(&[
            "projections",
            "rebuild",
            "tallies",
            "--data",
            &data_for_rebuild,
        ])
    })
    .await
    .unwrap();
    assert!(rebuild.status.success(), "{}", text(&rebuild.stderr));
    assert!(
        text(&rebuild.stdout).contains("now serves generation 2"),
        "{}",
        text(&rebuild.stdout)
    );
    assert_eq!(views.projection("tallies").await.unwrap().generation, 2);
    let line = views.get("tallies", "item-0").await.unwrap().unwrap();
    assert_eq!(line["count"], 13);
    runner.stop().await;
}

#[test]
fn requests_about_unknown_projections_or_events_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (store, views) = open(dir.path());
        let runner = run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
        runner.stop().await;
    });
    let unknown = diptych(&["projections", "pause", "nope", "--data", data]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("no projection named `nope`"),
        "{}",
        text(&unknown.stderr)
    );
    let not_parked = diptych(&["projections", "skip", "tallies", "999", "--data", data]);
    assert!(!not_parked.status.success());
    assert!(
        text(&not_parked.stderr).contains("no event is parked at position 999"),
        "{}",
        text(&not_parked.stderr)
    );
    let bad_position = diptych(&[
        "projections",
        "retry",
        "tallies",
        "minus-one",
        "--data",
        data,
    ]);
    assert!(!bad_position.status.success());
    let empty = tempfile::tempdir().unwrap();
    let missing = diptych(&[
        "projections",
        "status",
        "--data",
        empty.path().to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("--data"),
        "{}",
        text(&missing.stderr)
    );
}
