//! The event envelope: what every stored event carries besides its payload.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{InvalidEvent, InvalidStreamId};

/// The longest stream id accepted, in bytes.
pub const MAX_STREAM_ID_BYTES: usize = 256;

/// The name of one stream: `<kind>-<id>`, for example `order-42`.
///
/// A stream id is never empty and never longer than [`MAX_STREAM_ID_BYTES`]; the
/// constructor checks both so that no backend has to.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct StreamId(String);

impl StreamId {
    /// Checks and wraps a stream id.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidStreamId> {
        let id = id.into();
        if id.is_empty() {
            return Err(InvalidStreamId::Empty);
        }
        if id.len() > MAX_STREAM_ID_BYTES {
            return Err(InvalidStreamId::TooLong {
                length: id.len(),
                max: MAX_STREAM_ID_BYTES,
            });
        }
        Ok(Self(id))
    }

    /// The stream of an aggregate: `<kind>-<id>`.
    pub fn for_aggregate(kind: &str, id: &str) -> Result<Self, InvalidStreamId> {
        Self::new(format!("{kind}-{id}"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The category of the stream: the part before the first `-` (`order` for
    /// `order-42`), or the whole id when it has no `-`.
    pub fn category(&self) -> &str {
        self.0.split_once('-').map_or(&self.0, |(kind, _)| kind)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::new(text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl TryFrom<&str> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<String> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

/// A position in the global log. Position 0 is "before the first event". Positions
/// increase along the log but need not be dense: SQLite's count 1, 2, 3…, while
/// PostgreSQL's carry the appending transaction's id, so compare them, never
/// subtract them (`EventStore::events_after` counts).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    /// Before the first event: subscribe after it to see the whole log.
    pub const START: Position = Position(0);
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A moment, in microseconds since the Unix epoch (UTC).
///
/// Microseconds are what SQLite and PostgreSQL both store losslessly, so a time read
/// back from any backend equals the time written.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self(i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX))
    }

    /// A time from microseconds since the Unix epoch.
    pub const fn from_unix_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_unix_micros(self) -> i64 {
        self.0
    }

    /// Parses an RFC 3339 time such as `2026-11-22T10:00:00Z`.
    pub fn parse_rfc3339(text: &str) -> Result<Self, time::error::Parse> {
        let parsed =
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)?;
        let micros = parsed.unix_timestamp_nanos() / 1_000;
        Ok(Self(i64::try_from(micros).unwrap_or(i64::MAX)))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let formatted = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            });
        match formatted {
            Some(text) => f.write_str(&text),
            None => write!(f, "{}us", self.0),
        }
    }
}

/// Who caused an event and why: the ids that tie a command to the events it produced
/// and to the events those in turn caused, plus free key/values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The command that produced the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<Uuid>,
    /// The id shared by everything that one original request set off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The message (command or event) that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Anything else the application wants to keep with the event.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

/// An event about to be appended: everything but what the store assigns (stream,
/// version, position and time).
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// The event's own id (UUID v7 unless the caller derives one deterministically).
    pub event_id: Uuid,
    /// The event type name, for example `OrderPlaced`.
    pub event_type: String,
    /// The schema version of the payload; upcasters bring older ones up to date.
    pub schema_version: u32,
    /// The payload, a JSON value.
    pub payload: serde_json::Value,
    /// Ids and free key/values.
    pub metadata: Metadata,
}

impl NewEvent {
    /// An event with a fresh v7 id, schema version 1 and empty metadata.
    pub fn new(event_type: impl Into<String>, payload: serde_json::Value) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            payload,
            metadata: Metadata::default(),
        }
    }

    /// An event whose payload arrives as JSON text (from a wire or a file). Text that
    /// is not JSON is refused here, before anything reaches a store.
    pub fn from_json_text(
        event_type: impl Into<String>,
        payload: &str,
    ) -> Result<Self, InvalidEvent> {
        let event_type = event_type.into();
        let payload =
            serde_json::from_str(payload).map_err(|source| InvalidEvent::PayloadNotJson {
                event_type: event_type.clone(),
                reason: source.to_string(),
            })?;
        Ok(Self::new(event_type, payload))
    }

    /// Sets the schema version.
    pub fn with_schema_version(mut self, schema_version: u32) -> Self {
        self.schema_version = schema_version;
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Sets the event id.
    pub fn with_event_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }
}

/// A stored event: the envelope the store hands to readers and subscribers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// The event's own id.
    pub event_id: Uuid,
    /// The stream it belongs to.
    pub stream_id: StreamId,
    /// Its version in that stream: 1, 2, 3… with no gap.
    pub stream_version: u64,
    /// Its place in the global log.
    pub position: Position,
    /// When the store accepted it.
    pub recorded_at: Timestamp,
    /// The event type name.
    pub event_type: String,
    /// The schema version the payload was written with.
    pub schema_version: u32,
    /// The payload as written (upcasting happens on decode, never in storage).
    pub payload: serde_json::Value,
    /// Ids and free key/values.
    pub metadata: Metadata,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_stream_id_is_refused() {
        assert_eq!(StreamId::new(""), Err(InvalidStreamId::Empty));
    }

    #[test]
    fn a_stream_id_over_256_bytes_is_refused_with_its_length() {
        // 129 two-byte characters: 258 bytes although only 129 characters.
        let id = "é".repeat(129);
        assert_eq!(
            StreamId::new(id),
            Err(InvalidStreamId::TooLong {
                length: 258,
                max: MAX_STREAM_ID_BYTES
            })
        );
        assert!(StreamId::new("x".repeat(MAX_STREAM_ID_BYTES)).is_ok());
    }

    #[test]
    fn an_invalid_stream_id_is_refused_when_deserialized_too() {
        let error = serde_json::from_str::<StreamId>("\"\"").unwrap_err();
        assert!(error.to_string().contains("stream id is empty"), "{error}");
    }

    #[test]
    fn an_aggregate_stream_id_is_kind_dash_id_and_its_category_is_the_kind() {
        let stream = StreamId::for_aggregate("order", "42-a").unwrap();
        assert_eq!(stream.as_str(), "order-42-a");
        assert_eq!(stream.category(), "order");
    }

    #[test]
    fn payload_text_that_is_not_json_is_refused_naming_the_event_type() {
        let error = NewEvent::from_json_text("OrderPlaced", "{\"total\": ").unwrap_err();
        assert!(
            matches!(&error, InvalidEvent::PayloadNotJson { event_type, .. } if event_type == "OrderPlaced"),
            "{error:?}"
        );
        assert!(error.to_string().contains("not valid JSON"));
    }

    #[test]
    fn timestamps_format_and_parse_as_rfc3339() {
        let at = Timestamp::parse_rfc3339("2026-11-22T10:00:00.000250Z").unwrap();
        assert_eq!(at.as_unix_micros(), 1_795_341_600_000_250);
        assert_eq!(at.to_string(), "2026-11-22T10:00:00.00025Z");
        assert!(Timestamp::parse_rfc3339("yesterday").is_err());
    }
}
