//! Copies of another service's streams in the local log.
//!
//! A service that needs another's data (ordering needs the catalog's names and
//! prices) can keep a copy of the streams it needs in its own event store: a
//! broker consumer feeds [`StreamCopies`] (through an
//! [`crate::InboundProjection`], so redeliveries are recorded and skipped), and
//! each received event is appended to the stream of the same name at the same
//! version, with the same id. Local projections and aggregates then read the copy
//! like any stream, in one log with the service's own events, so a view that
//! joins both (order history with product names that follow renames) has one
//! checkpoint and one order.
//!
//! Exactly once: an append expects the version before the event's, so an event
//! copied before a crash (appended, not yet recorded as received) conflicts and
//! is recognised by its id. A copy carries [`COPIED_FROM`] in its metadata, which
//! the relay reads to publish only the service's own events.

use std::sync::Arc;

use async_trait::async_trait;

use crate::envelope::{NewEvent, RecordedEvent};
use crate::error::{AppendError, HandlerError};
use crate::projection::{Interest, Projection, ViewTx};
use crate::store::{AppendRequest, EventStore, ExpectedVersion, StreamRead};
use crate::view::CollectionSpec;

/// The metadata key a copy carries: `<service>@<position in its log>`.
pub const COPIED_FROM: &str = "copied_from";

/// Whether an event is a copy of another service's.
pub fn is_copy(event: &RecordedEvent) -> bool {
    event.metadata.extra.contains_key(COPIED_FROM)
}

/// Appends another service's events, as received, to the local log.
pub struct StreamCopies {
    store: Arc<dyn EventStore>,
    source: String,
    name: String,
    interest: Interest,
}

impl StreamCopies {
    /// Copies the streams of these categories from `source` into `store`.
    pub fn new<I, S>(store: Arc<dyn EventStore>, source: &str, categories: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            store,
            source: source.to_owned(),
            name: Self::name_for(source),
            interest: Interest::categories(categories),
        }
    }

    /// The name of the projection that copies `source`'s streams: its checkpoint
    /// is the position in `source`'s log up to which everything is copied.
    pub fn name_for(source: &str) -> String {
        format!("copies-{source}")
    }

    /// Whether the copy of `event`'s stream already holds `event` at its version.
    async fn holds(&self, event: &RecordedEvent) -> Result<bool, HandlerError> {
        let read = StreamRead::forward(event.stream_id.clone(), event.stream_version, 1);
        let found = self
            .store
            .read_stream(read)
            .await
            .map_err(|error| HandlerError::with_source("reading a copied stream", error))?;
        match found.first() {
            Some(copy) if copy.event_id == event.event_id => Ok(true),
            Some(copy) => Err(HandlerError::msg(format!(
                "the copy of `{}` holds event {} at version {}, not {} as `{}` has: \
                 the stream was written locally; only `{}` may write it",
                event.stream_id,
                copy.event_id,
                event.stream_version,
                event.event_id,
                self.source,
                self.source
            ))),
            None => Ok(false),
        }
    }
}

#[async_trait]
impl Projection for StreamCopies {
    fn name(&self) -> &str {
        &self.name
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        Vec::new()
    }

    fn interest(&self) -> Interest {
        self.interest.clone()
    }

    async fn apply(&self, event: &RecordedEvent, _views: &mut ViewTx) -> Result<(), HandlerError> {
        let mut metadata = event.metadata.clone();
        metadata.extra.insert(
            COPIED_FROM.to_owned(),
            format!("{}@{}", self.source, event.position),
        );
        let copy = NewEvent {
            event_id: event.event_id,
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            payload: event.payload.clone(),
            metadata,
        };
        let request = AppendRequest {
            stream: event.stream_id.clone(),
            expected: ExpectedVersion::Exact(event.stream_version.saturating_sub(1)),
            events: vec![copy],
            idempotency_key: None,
        };
        match self.store.append(request).await {
            Ok(_) => Ok(()),
            Err(AppendError::Conflict { actual, .. }) if actual >= event.stream_version => {
                if self.holds(event).await? {
                    Ok(())
                } else {
                    Err(HandlerError::msg(format!(
                        "the copy of `{}` lost version {}",
                        event.stream_id, event.stream_version
                    )))
                }
            }
            Err(AppendError::Conflict { actual, .. }) => Err(HandlerError::msg(format!(
                "the copy of `{}` is at version {actual}, but `{}` sent version {} next: \
                 an earlier event has not arrived (it will be retried)",
                event.stream_id, self.source, event.stream_version
            ))),
            Err(error) => Err(HandlerError::with_source(
                format!("copying `{}`", event.stream_id),
                error,
            )),
        }
    }
}
