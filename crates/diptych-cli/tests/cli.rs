//! The `diptych` binary as a user runs it: its output and its error messages.

use std::path::Path;
use std::process::{Command, Output};

use diptych::sqlite::SqliteStore;
use diptych::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
use serde_json::{Value, json};

fn diptych(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diptych"))
        .args(args)
        .output()
        .expect("the diptych binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn seed_store(data: &Path) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = SqliteStore::open(data.join("events.db")).unwrap();
        let events = vec![
            NewEvent::new("OrderPlaced", json!({"total_cents": 500})),
            NewEvent::new("OrderConfirmed", json!(null)),
        ];
        let stream = StreamId::new("order-1").unwrap();
        store
            .append(AppendRequest::new(
                stream,
                ExpectedVersion::NoStream,
                events,
            ))
            .await
            .unwrap();
    });
}

#[test]
fn streams_show_prints_a_streams_events_as_json_lines() {
    let data = tempfile::tempdir().unwrap();
    seed_store(data.path());
    let data_arg = data.path().to_str().unwrap();

    let output = diptych(&["streams", "show", "order-1", "--data", data_arg]);

    assert!(output.status.success(), "{}", stderr(&output));
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["event_type"], "OrderPlaced");
    assert_eq!(lines[0]["payload"]["total_cents"], 500);
    assert_eq!(lines[1]["stream_version"], 2);

    let head = diptych(&["streams", "head", "--data", data_arg]);
    assert_eq!(String::from_utf8(head.stdout).unwrap().trim(), "2");

    let log = diptych(&["streams", "log", "--after", "1", "--data", data_arg]);
    assert_eq!(String::from_utf8(log.stdout).unwrap().lines().count(), 1);
}

#[test]
fn a_missing_store_is_an_error_that_says_which_flag_to_pass() {
    let data = tempfile::tempdir().unwrap();
    let output = diptych(&["streams", "head", "--data", data.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("pass --data"),
        "{}",
        stderr(&output)
    );
    assert!(
        !data.path().join("events.db").exists(),
        "nothing may be created"
    );
}

#[test]
fn a_file_that_is_not_a_store_is_refused_with_the_reason() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(
        data.path().join("events.db"),
        b"these are not the events you are looking for",
    )
    .unwrap();
    let output = diptych(&["streams", "head", "--data", data.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("is not a diptych database"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn an_empty_stream_id_is_refused() {
    let data = tempfile::tempdir().unwrap();
    seed_store(data.path());
    let output = diptych(&[
        "streams",
        "show",
        "",
        "--data",
        data.path().to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("stream id is empty"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn showing_a_stream_that_does_not_exist_says_so() {
    let data = tempfile::tempdir().unwrap();
    seed_store(data.path());
    let output = diptych(&[
        "streams",
        "show",
        "order-2",
        "--data",
        data.path().to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("stream `order-2` does not exist"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bench_refuses_a_zero_duration_and_zero_writers() {
    let output = diptych(&["bench", "append", "--seconds", "0"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("--seconds must be a positive number"));

    let output = diptych(&["bench", "append", "--writers", "0"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("positive counts"));
}

#[test]
fn bench_http_refuses_zero_clients_for_commands_or_reads() {
    for args in [
        ["--clients", "0"],
        ["--read-clients", "16,0"],
        ["--seconds", "0"],
    ] {
        let output = diptych(&[&["bench", "http"][..], &args[..]].concat());
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&output).contains("--seconds, --clients and --read-clients must be positive"),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn bench_project_on_postgres_reports_the_catch_up_against_its_floor() {
    let url = diptych::postgres::testing::test_url();
    let output = diptych(&[
        "bench", "project", "--json", "--store", &url, "--events", "3000", "--batch", "200",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["bench"], "project-postgres");
    assert_eq!(
        (result["events"].as_u64(), result["batch"].as_u64()),
        (Some(3000), Some(200))
    );
    let events = result["events_per_sec"].as_f64().unwrap();
    let floor = result["floor_events_per_sec"].as_f64().unwrap();
    assert!(events > 0.0 && floor > 0.0, "{result}");
    let ratio = result["ratio"].as_f64().unwrap();
    assert!(
        (ratio - events / floor).abs() < 1e-6 * ratio.max(1.0),
        "{result}"
    );
}

#[test]
fn bench_append_on_postgres_reports_each_writer_count_against_its_floor() {
    let url = diptych::postgres::testing::test_url();
    let output = diptych(&[
        "bench",
        "append",
        "--json",
        "--store",
        &url,
        "--writers",
        "1,2",
        "--events",
        "1",
        "--seconds",
        "0.5",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let writers: Vec<u64> = lines.iter().filter_map(|l| l["writers"].as_u64()).collect();
    assert_eq!(writers, [1, 2]);
    for line in &lines {
        assert_eq!(line["bench"], "append-postgres");
        let (events, floor) = (
            line["events_per_sec"].as_f64().unwrap(),
            line["floor_events_per_sec"].as_f64().unwrap(),
        );
        assert!(events > 0.0 && floor > 0.0, "{line}");
        assert!(
            (line["ratio"].as_f64().unwrap() - events / floor).abs() < 1e-6,
            "{line}"
        );
    }
}

#[test]
fn bench_relay_reports_throughput_against_its_floor_and_end_to_end_latency() {
    let nats = std::env::var("DIPTYCH_TEST_NATS").expect("DIPTYCH_TEST_NATS names a NATS server");
    let output = diptych(&[
        "bench",
        "relay",
        "--json",
        "--broker",
        &nats,
        "--events",
        "400",
        "--page",
        "50",
        "--samples",
        "5",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["bench"], "relay-nats");
    assert_eq!(
        (result["events"].as_u64(), result["page"].as_u64()),
        (Some(400), Some(50))
    );
    assert_eq!(result["e2e_samples"], 5);
    let (events, floor) = (
        result["events_per_sec"].as_f64().unwrap(),
        result["floor_events_per_sec"].as_f64().unwrap(),
    );
    assert!(events > 0.0 && floor > 0.0, "{result}");
    assert!(
        (result["ratio"].as_f64().unwrap() - events / floor).abs() < 1e-6,
        "{result}"
    );
    assert!(
        result["e2e_p50_us"].as_u64().unwrap() <= result["e2e_p99_us"].as_u64().unwrap(),
        "{result}"
    );
}

#[test]
fn bench_relay_runs_over_rabbitmq_too_and_refuses_other_urls() {
    let amqp = std::env::var("DIPTYCH_TEST_AMQP").expect("DIPTYCH_TEST_AMQP names RabbitMQ");
    let output = diptych(&[
        "bench",
        "relay",
        "--json",
        "--broker",
        &amqp,
        "--events",
        "200",
        "--page",
        "50",
        "--samples",
        "3",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["bench"], "relay-amqp");
    assert_eq!(result["e2e_samples"], 3);
    let output = diptych(&["bench", "relay", "--broker", "kafka://somewhere"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("nats:// or amqp://"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bench_project_takes_either_a_directory_or_a_store() {
    let output = diptych(&[
        "bench",
        "project",
        "--store",
        "postgres://x@y/z",
        "--dir",
        "/tmp",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("cannot be used with"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bench_append_json_reports_store_floor_and_ratio_per_scenario() {
    let output = diptych(&[
        "bench",
        "append",
        "--json",
        "--seconds",
        "0.3",
        "--writers",
        "2",
        "--events",
        "1",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let results: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let streams: Vec<&str> = results
        .iter()
        .map(|r| r["streams"].as_str().unwrap())
        .collect();
    assert_eq!(streams, ["own", "hot"]);
    for result in &results {
        assert_eq!(result["bench"], "append");
        assert_eq!(result["writers"], 2);
        let events = result["events_per_sec"].as_f64().unwrap();
        let floor = result["floor_events_per_sec"].as_f64().unwrap();
        assert!(events > 0.0 && floor > 0.0, "{result}");
        let ratio = result["ratio"].as_f64().unwrap();
        assert!(
            (ratio - events / floor).abs() < 1e-6 * ratio.max(1.0),
            "{result}"
        );
        assert!(result["p99_us"].as_u64().unwrap() >= result["p50_us"].as_u64().unwrap());
    }
}

#[test]
fn bench_feed_reports_the_fan_out_against_its_floor_and_refuses_zero_followers() {
    let output = diptych(&[
        "bench",
        "feed",
        "--json",
        "--followers",
        "40",
        "--rounds",
        "2",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(line["bench"], "feed");
    assert_eq!(line["followers"], 40);
    for key in ["fanout_p50_ms", "fanout_max_ms", "floor_p50_ms", "ratio"] {
        assert!(
            line[key].as_f64().is_some_and(|value| value > 0.0),
            "{key}: {line}"
        );
    }

    let output = diptych(&["bench", "feed", "--followers", "0"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("--followers and --rounds must be positive"));
}
