//! `/metrics` in Prometheus text: HTTP status counts and latency, command rate and
//! latency, append latency (through [`metered`]), and projection lag and parked
//! events, read at scrape time.
//!
//! One recorder is installed for the process on first use, so every router in a
//! process (tests build many) reports into the same registry.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use diptych_core::{
    AppendError, AppendOutcome, AppendRequest, EventStore, Position, ReadError, RecordedEvent,
    Snapshot, SnapshotError, StreamId, StreamRead, projection_status,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::AppState;

fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    let handle = HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .as_ref();
    static UPKEEP: OnceLock<()> = OnceLock::new();
    if let Some(handle) = handle {
        UPKEEP.get_or_init(|| start_upkeep(handle));
    }
    handle
}

/// How often recorded histogram samples are folded into their summaries.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The recorder keeps every histogram sample until something drains them,
/// which otherwise happens only when `/metrics` is scraped: a service nobody
/// scrapes would hold every command's latency forever. A plain thread, since
/// routers may be built outside a runtime.
fn start_upkeep(handle: &'static PrometheusHandle) {
    let started = std::thread::Builder::new()
        .name("diptych-metrics".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(error) = started {
        tracing::warn!(%error, "metrics upkeep did not start; histograms drain only when scraped");
    }
}

/// Installs the process's recorder, so metrics recorded from now on are kept.
pub(crate) fn install() {
    let _ = handle();
}

/// Records one command's outcome and latency.
pub(crate) fn record_command(name: &str, outcome: &'static str, started: Instant) {
    metrics::counter!("diptych_commands_total", "command" => name.to_owned(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!("diptych_command_seconds", "command" => name.to_owned())
        .record(started.elapsed().as_secs_f64());
}

/// `GET /metrics`.
pub(crate) async fn render(State(state): State<AppState>) -> Response {
    if let Ok(statuses) = projection_status(&*state.store, &*state.views).await {
        for status in statuses {
            let name = status.name.clone();
            metrics::gauge!("diptych_projection_lag_events", "projection" => name.clone())
                .set(status.lag_events as f64);
            metrics::gauge!("diptych_projection_lag_ms", "projection" => name.clone())
                .set(status.lag_ms as f64);
            metrics::gauge!("diptych_projection_parked", "projection" => name.clone())
                .set(status.parked as f64);
            metrics::gauge!("diptych_projection_position", "projection" => name.clone())
                .set(status.position.0 as f64);
            // An inbound consumer's messages, counted by core where it runs.
            if let Some(received) = status.received {
                metrics::counter!("diptych_inbound_received_total", "projection" => name.clone())
                    .absolute(received.received);
                metrics::counter!("diptych_inbound_redeliveries_total", "projection" => name)
                    .absolute(received.redelivered);
            }
        }
    }
    let text = handle().map(PrometheusHandle::render).unwrap_or_default();
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// Wraps an event store so each append's latency lands in
/// `diptych_append_seconds` (and each failure in `diptych_append_failures_total`).
pub fn metered(store: Arc<dyn EventStore>) -> Arc<dyn EventStore> {
    install();
    Arc::new(Metered(store))
}

struct Metered(Arc<dyn EventStore>);

#[async_trait]
impl EventStore for Metered {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
        let started = Instant::now();
        let result = self.0.append(request).await;
        metrics::histogram!("diptych_append_seconds").record(started.elapsed().as_secs_f64());
        if result.is_err() {
            metrics::counter!("diptych_append_failures_total").increment(1);
        }
        result
    }

    async fn find_idempotent_append(&self, key: &str) -> Result<Option<AppendOutcome>, ReadError> {
        self.0.find_idempotent_append(key).await
    }

    async fn read_stream(&self, read: StreamRead) -> Result<Vec<RecordedEvent>, ReadError> {
        self.0.read_stream(read).await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError> {
        self.0.stream_version(stream).await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.0.read_all(after, limit).await
    }

    async fn head(&self) -> Result<Position, ReadError> {
        self.0.head().await
    }

    fn head_watch(&self) -> watch::Receiver<Position> {
        self.0.head_watch()
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        self.0.load_snapshot(stream).await
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), SnapshotError> {
        self.0.save_snapshot(snapshot).await
    }
}
