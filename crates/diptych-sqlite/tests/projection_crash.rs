//! Crash safety of the query side: `kill -9` never makes a view apply an event
//! twice or lose one (invariant 5), and never makes a process manager issue a
//! command twice.
//!
//! Like `crash.rs`, this binary is both the parent and, started again with an
//! environment variable, the child it kills.
//!
//! * **Projection cycles.** The child appends under load while the `tallies`
//!   projection follows in small batches; the parent SIGKILLs it at a random
//!   moment, then opens the files itself, lets the projection catch up from its
//!   checkpoint and compares the whole collection with a clean build of the same
//!   log (counts would show any event applied twice or lost).
//! * **Process manager cycles.** The log holds triggers; the child runs a process
//!   manager that appends one effect per trigger and SIGKILLs *itself* right
//!   after an effect is stored, before the checkpoint of its batch commits. After
//!   the last cycle every trigger must have exactly one effect, caused by it.
//!
//! Under `CI=true`: 30 projection cycles and 10 process manager cycles;
//! otherwise 6 and 4. `DIPTYCH_CRASH_CYCLES` overrides the projection cycles.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use diptych_core::testkit::{
    Tallies, added, append_one, clean_tallies, dump_collection, run_tallies, wait_until_caught_up,
};
use diptych_core::{
    AppendRequest, CommandContext, EventStore, ExpectedVersion, HandlerError, Interest, NewEvent,
    ProcessManager, RecordedEvent, RunnerConfig, StreamId, StreamRead, ViewStore,
    spawn_process_manager,
};
use diptych_sqlite::{SqliteStore, SqliteViews};
use serde_json::json;

const CHILD_MODE: &str = "DIPTYCH_PROJECTION_CRASH_CHILD";
const CHILD_DIR: &str = "DIPTYCH_PROJECTION_CRASH_DIR";
const KILL_AT: &str = "DIPTYCH_PROJECTION_CRASH_KILL_AT";
const TRIGGERS: u64 = 60;

fn main() {
    if let Ok(mode) = std::env::var(CHILD_MODE) {
        let dir = PathBuf::from(std::env::var(CHILD_DIR).expect("the child's directory"));
        let runtime = runtime();
        match mode.as_str() {
            "project" => runtime.block_on(project_under_load(&dir)),
            _ => {
                let kill_at = std::env::var(KILL_AT).ok().and_then(|n| n.parse().ok());
                runtime.block_on(run_effects(&dir, kill_at));
            }
        }
        return;
    }
    let ci = std::env::var("CI").is_ok_and(|ci| ci == "true");
    let projection_cycles = std::env::var("DIPTYCH_CRASH_CYCLES")
        .ok()
        .and_then(|cycles| cycles.parse().ok())
        .unwrap_or(if ci { 30 } else { 6 });
    projection_survives_kill_9(projection_cycles);
    process_manager_survives_kill_9(if ci { 10 } else { 4 });
    println!("2 passed, 0 failed");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

fn open(dir: &Path) -> (Arc<dyn EventStore>, Arc<dyn ViewStore>) {
    let store = SqliteStore::open(dir.join("events.db")).expect("the event store opens");
    let views = SqliteViews::open(dir.join("views.db")).expect("the view store opens");
    (Arc::new(store), Arc::new(views))
}

fn start_child(mode: &str, dir: &Path, kill_at: Option<u64>) -> std::process::Child {
    let mut command = Command::new(std::env::current_exe().expect("own executable"));
    command
        .env(CHILD_MODE, mode)
        .env(CHILD_DIR, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(kill_at) = kill_at {
        command.env(KILL_AT, kill_at.to_string());
    }
    command.spawn().expect("start the child")
}

fn projection_survives_kill_9(cycles: u32) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let runtime = runtime();
    let mut grew = 0;
    let mut projected = 0;
    let mut killed_behind = 0;
    let mut last_head = 0;
    for cycle in 0..cycles {
        let mut child = start_child("project", dir.path(), None);
        std::thread::sleep(Duration::from_millis(fastrand::u64(50..400)));
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        runtime.block_on(async {
            let (store, views) = open(dir.path());
            let head = store.head().await.expect("the head").0;
            if head > last_head {
                grew += 1;
            }
            // Where the killed child's projection had got to: past the last head
            // means it committed batches in this cycle; short of the head means it
            // was killed with work outstanding.
            let checkpoint = views
                .projection("tallies")
                .await
                .map_or(0, |record| record.position.0);
            if checkpoint > last_head {
                projected += 1;
            }
            if checkpoint < head {
                killed_behind += 1;
            }
            last_head = head;
            let runner =
                run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
            wait_until_caught_up(&*store, &*views, Tallies::COLLECTION).await;
            runner.stop().await;
            let restarted = dump_collection(&*views, Tallies::COLLECTION).await;
            let clean = clean_tallies(store.clone()).await;
            assert_eq!(
                restarted, clean,
                "cycle {cycle}: after kill -9 and a restart the view differs from a clean build \
                 of the same {head} events"
            );
        });
    }
    assert!(
        grew > cycles / 2,
        "the child rarely appended before being killed"
    );
    assert!(
        projected > cycles / 2,
        "the child's projection rarely committed before being killed ({projected} of {cycles})"
    );
    println!(
        "projection crash test: {cycles} SIGKILL cycles under load ({projected} after the \
         projection committed, {killed_behind} with events still to apply), {last_head} events; \
         the view equalled a clean build after every restart"
    );
}

/// The child's work in projection cycles: writers append while the projection
/// follows, until killed.
async fn project_under_load(dir: &Path) {
    let (store, views) = open(dir);
    let _runner = diptych_core::spawn_projection(
        store.clone(),
        views,
        Arc::new(Tallies::default()),
        diptych_core::HandlerKind::Projection,
        RunnerConfig {
            batch_size: 20,
            ..RunnerConfig::default()
        },
    )
    .await
    .expect("the projection starts");
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0u64.. {
                    let item = format!("item-{}", fastrand::u64(0..12));
                    let stream = format!("stock-{writer}");
                    let event = if n % 17 == 16 {
                        NewEvent::new("Removed", json!({ "item": item }))
                    } else {
                        added(&item, fastrand::u64(1..100))
                    };
                    append_one(&*store, &stream, event).await;
                }
            })
        })
        .collect();
    for writer in writers {
        let _ = writer.await;
    }
}

/// Appends one `Effect` per `Trigger`, and kills its own process right after
/// storing the effect of trigger `kill_at`, before its checkpoint commits.
struct Effects {
    store: Arc<dyn EventStore>,
    kill_at: Option<u64>,
}

#[async_trait]
impl ProcessManager for Effects {
    type State = ();
    type Command = u64;

    fn name(&self) -> &str {
        "effects"
    }

    fn interest(&self) -> Interest {
        Interest::event_types(["Trigger"])
    }

    fn react(&self, _: &mut (), event: &RecordedEvent) -> Result<Vec<u64>, HandlerError> {
        Ok(vec![event.payload["n"].as_u64().unwrap_or(u64::MAX)])
    }

    async fn dispatch(&self, n: u64, context: CommandContext) -> Result<(), HandlerError> {
        let mut effect = NewEvent::new("Effect", json!({ "n": n }));
        effect.metadata.causation_id = context.causation_id;
        effect.metadata.command_id = Some(context.command_id);
        let stream = StreamId::new(format!("effect-{n}")).expect("a stream id");
        let request = AppendRequest::new(stream, ExpectedVersion::Any, vec![effect])
            .with_idempotency_key(context.command_id.to_string());
        self.store
            .append(request)
            .await
            .map_err(|error| HandlerError::with_source("appending an effect", error))?;
        if self.kill_at == Some(n) {
            // The effect is stored; the checkpoint is not: die the hard way.
            let _ = Command::new("kill")
                .args(["-KILL", &std::process::id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(60));
        }
        Ok(())
    }
}

async fn run_effects(dir: &Path, kill_at: Option<u64>) {
    let (store, views) = open(dir);
    let effects = Arc::new(Effects {
        store: store.clone(),
        kill_at,
    });
    let config = RunnerConfig {
        batch_size: 7,
        ..RunnerConfig::default()
    };
    let runner = spawn_process_manager(store.clone(), views.clone(), effects, config)
        .await
        .expect("the process manager starts");
    // Without a kill, run until every trigger has been handled.
    wait_until_caught_up(&*store, &*views, "effects").await;
    runner.stop().await;
}

fn process_manager_survives_kill_9(cycles: u64) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let runtime = runtime();
    let triggers: Vec<RecordedEvent> = runtime.block_on(async {
        let (store, _) = open(dir.path());
        let mut triggers = Vec::new();
        for n in 0..TRIGGERS {
            let stream = StreamId::new(format!("trigger-{n}")).expect("a stream id");
            let request = AppendRequest::new(
                stream,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Trigger", json!({ "n": n }))],
            );
            triggers.extend(store.append(request).await.expect("a trigger").events);
        }
        triggers
    });
    // Each cycle dies a little further on, so every batch is interrupted at least
    // once somewhere between its first effect and its checkpoint.
    let step = TRIGGERS / (cycles + 1);
    for cycle in 0..cycles {
        let kill_at = step * (cycle + 1) + fastrand::u64(0..step.max(1));
        let mut child = start_child("effects", dir.path(), Some(kill_at));
        let status = child.wait().expect("reap the child");
        assert!(
            !status.success(),
            "cycle {cycle}: the child should have killed itself"
        );
    }
    let mut finish = start_child("effects", dir.path(), None);
    assert!(
        finish.wait().expect("reap the child").success(),
        "the last run finishes"
    );
    runtime.block_on(async {
        let (store, _) = open(dir.path());
        for trigger in &triggers {
            let n = trigger.payload["n"].as_u64().expect("n");
            let stream = StreamId::new(format!("effect-{n}")).expect("a stream id");
            let effects = store
                .read_stream(StreamRead::forward(stream, 1, 10))
                .await
                .unwrap_or_else(|error| panic!("trigger {n} has no effect: {error}"));
            assert_eq!(
                effects.len(),
                1,
                "trigger {n} had {} effects",
                effects.len()
            );
            assert_eq!(effects[0].metadata.causation_id, Some(trigger.event_id));
        }
    });
    println!(
        "process manager crash test: {cycles} self-inflicted SIGKILLs between an effect and its \
         checkpoint; {TRIGGERS} triggers, exactly one effect each"
    );
}
