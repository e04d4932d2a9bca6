//! The queries both sides run: the reader connections and the writer (which
//! checks versions, finds repeated idempotency keys and reads the head too).

use diptych_core::{BackendError, Metadata, Position, RecordedEvent, StreamId, Timestamp};
use rusqlite::{Connection, OptionalExtension, Row, params};
use uuid::Uuid;

use crate::error::backend;

/// The columns every event query selects, in the order [`event_from_row`] reads.
pub const EVENT_COLUMNS: &str = "position, stream_id, version, event_id, event_type, \
                                 schema_version, payload, metadata, recorded_at";

/// A row whose text columns are not yet parsed: parsing happens outside
/// rusqlite's row callback so a corrupt row becomes a [`BackendError`] naming it.
struct RawEvent {
    position: i64,
    stream_id: String,
    version: i64,
    event_id: Vec<u8>,
    event_type: String,
    schema_version: i64,
    payload: String,
    metadata: String,
    recorded_at: i64,
}

fn raw_from_row(row: &Row<'_>) -> rusqlite::Result<RawEvent> {
    Ok(RawEvent {
        position: row.get(0)?,
        stream_id: row.get(1)?,
        version: row.get(2)?,
        event_id: row.get(3)?,
        event_type: row.get(4)?,
        schema_version: row.get(5)?,
        payload: row.get(6)?,
        metadata: row.get(7)?,
        recorded_at: row.get(8)?,
    })
}

fn parse(raw: RawEvent) -> Result<RecordedEvent, BackendError> {
    let corrupt = |what: &str, detail: String| {
        BackendError::msg(format!(
            "the event at position {} is corrupt: {what} ({detail})",
            raw.position
        ))
    };
    let event_id = Uuid::from_slice(&raw.event_id)
        .map_err(|error| corrupt("its event id is not a UUID", error.to_string()))?;
    let stream_id = StreamId::new(raw.stream_id.clone())
        .map_err(|error| corrupt("its stream id is invalid", error.to_string()))?;
    let payload = serde_json::from_str(&raw.payload)
        .map_err(|error| corrupt("its payload is not JSON", error.to_string()))?;
    let metadata: Metadata = serde_json::from_str(&raw.metadata)
        .map_err(|error| corrupt("its metadata is not valid", error.to_string()))?;
    Ok(RecordedEvent {
        event_id,
        stream_id,
        stream_version: raw.version as u64,
        position: Position(raw.position as u64),
        recorded_at: Timestamp::from_unix_micros(raw.recorded_at),
        event_type: raw.event_type,
        schema_version: raw.schema_version as u32,
        payload,
        metadata,
    })
}

/// Runs an event query and parses its rows.
pub fn query_events(
    connection: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<RecordedEvent>, BackendError> {
    let mut statement = connection
        .prepare_cached(sql)
        .map_err(|error| backend("preparing an event query", error))?;
    let raws = statement
        .query_map(params, raw_from_row)
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<RawEvent>>>())
        .map_err(|error| backend("reading events", error))?;
    raws.into_iter().map(parse).collect()
}

/// The events at positions `first..=last`.
pub fn events_between(
    connection: &Connection,
    first: i64,
    last: i64,
) -> Result<Vec<RecordedEvent>, BackendError> {
    query_events(
        connection,
        &format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE position BETWEEN ?1 AND ?2 ORDER BY position"
        ),
        params![first, last],
    )
}

/// Converts a count or version to SQLite's integer, saturating (SQLite has no
/// unsigned 64-bit integers; nothing real gets near the limit).
pub fn to_sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The position of the last event (0 for an empty log).
pub fn head_position(connection: &Connection) -> Result<Position, BackendError> {
    connection
        .prepare_cached("SELECT COALESCE(MAX(position), 0) FROM events")
        .and_then(|mut statement| statement.query_row([], |row| row.get::<_, i64>(0)))
        .map(|head| Position(head as u64))
        .map_err(|error| backend("reading the head position", error))
}

/// The version of a stream (0 when it has no events).
pub fn stream_version(connection: &Connection, stream: &StreamId) -> Result<u64, BackendError> {
    connection
        .prepare_cached("SELECT COALESCE(MAX(version), 0) FROM events WHERE stream_id = ?1")
        .and_then(|mut statement| {
            statement.query_row(params![stream.as_str()], |row| row.get::<_, i64>(0))
        })
        .map(|version| version as u64)
        .map_err(|error| backend("reading a stream version", error))
}

/// The append first made with an idempotency key: its stream and its first and
/// last positions.
pub struct KeyedAppend {
    /// The stream, as stored.
    pub stream: String,
    /// Its first position.
    pub first: i64,
    /// Its last position.
    pub last: i64,
}

/// The append first made with `key`, if any.
pub fn keyed_append(
    connection: &Connection,
    key: &str,
) -> Result<Option<KeyedAppend>, BackendError> {
    connection
        .prepare_cached(
            "SELECT stream_id, first_position, last_position FROM idempotency WHERE key = ?1",
        )
        .and_then(|mut statement| {
            statement
                .query_row(params![key], |row| {
                    Ok(KeyedAppend {
                        stream: row.get(0)?,
                        first: row.get(1)?,
                        last: row.get(2)?,
                    })
                })
                .optional()
        })
        .map_err(|error| backend("looking up an idempotency key", error))
}
