//! Rows of `events` → [`RecordedEvent`], decoded as they arrive.
//!
//! Loading an aggregate reads thousands of rows, so decoding is kept close to
//! the cost of the bytes: rows are decoded while later ones are still on the
//! wire (a row stream, not a collected `Vec<Row>`), JSON is parsed straight from
//! the row's bytes into its final type (a payload's text is checked as UTF-8
//! once, whole; metadata never passes through a `serde_json::Value`, and the
//! usual empty metadata is recognised without parsing), and a stream read does
//! not fetch the stream id it already knows.

use std::error::Error;
use std::pin::pin;

use diptych_core::{BackendError, Metadata, Position, RecordedEvent, StreamId, Timestamp};
use futures_util::TryStreamExt;
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, ToSql, Type};

use crate::error::backend;

/// The columns of a log read, in the order [`event_from_row`] decodes them.
pub(crate) const EVENT_COLUMNS: &str = "position, stream_id, version, event_id, event_type, \
                                        schema_version, payload, metadata, recorded_at";

/// A stream read: the same but the stream id, which the caller knows.
pub(crate) const STREAM_READ_FORWARD: &str = "SELECT position, version, event_id, event_type, \
     schema_version, payload, metadata, recorded_at FROM events \
     WHERE stream_id = $1 AND version >= $2 ORDER BY version LIMIT $3";

/// [`STREAM_READ_FORWARD`], newest first.
pub(crate) const STREAM_READ_BACKWARD: &str = "SELECT position, version, event_id, event_type, \
     schema_version, payload, metadata, recorded_at FROM events \
     WHERE stream_id = $1 AND version <= $2 ORDER BY version DESC LIMIT $3";

/// A `jsonb` value's JSON text, borrowed from the row.
struct JsonBytes<'a>(&'a [u8]);

impl<'a> FromSql<'a> for JsonBytes<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        // jsonb's binary format: a version byte (1), then the text.
        match raw.split_first() {
            Some((1, text)) => Ok(Self(text)),
            _ => Err("unsupported jsonb encoding version".into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
}

/// Runs a prepared event query, decoding each row with `decode` as it arrives.
pub(crate) async fn query_decoded(
    client: &deadpool_postgres::Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    capacity: usize,
    mut decode: impl FnMut(&Row) -> Result<RecordedEvent, BackendError>,
) -> Result<Vec<RecordedEvent>, BackendError> {
    let statement = client
        .prepare_cached(sql)
        .await
        .map_err(|error| backend("preparing an event query", error))?;
    let mut rows = pin!(
        client
            .query_raw(&statement, params.iter().copied())
            .await
            .map_err(|error| backend("reading events", error))?
    );
    let mut events = Vec::with_capacity(capacity);
    while let Some(row) = rows
        .try_next()
        .await
        .map_err(|error| backend("reading events", error))?
    {
        events.push(decode(&row)?);
    }
    Ok(events)
}

/// Decodes a row of [`EVENT_COLUMNS`].
pub(crate) fn event_from_row(row: &Row) -> Result<RecordedEvent, BackendError> {
    let position: i64 = row.try_get(0).map_err(column_error)?;
    let stream = row.try_get::<_, String>(1).map_err(column_error)?;
    let stream_id = StreamId::new(stream)
        .map_err(|error| corrupt(position, "its stream id is invalid", error.to_string()))?;
    decode(row, position, stream_id, 2)
}

/// Decodes a row of a stream read of `stream`.
pub(crate) fn stream_event_from_row(
    row: &Row,
    stream: &StreamId,
) -> Result<RecordedEvent, BackendError> {
    let position: i64 = row.try_get(0).map_err(column_error)?;
    decode(row, position, stream.clone(), 1)
}

/// Decodes the columns from `version` on, which start at index `first`.
fn decode(
    row: &Row,
    position: i64,
    stream_id: StreamId,
    first: usize,
) -> Result<RecordedEvent, BackendError> {
    let payload: JsonBytes<'_> = row.try_get(first + 4).map_err(column_error)?;
    // Checked as UTF-8 once, whole, rather than string by string while parsing.
    let payload = std::str::from_utf8(payload.0)
        .map_err(|error| corrupt(position, "its payload is not UTF-8", error.to_string()))
        .and_then(|text| {
            serde_json::from_str(text)
                .map_err(|error| corrupt(position, "its payload is not JSON", error.to_string()))
        })?;
    let metadata: JsonBytes<'_> = row.try_get(first + 5).map_err(column_error)?;
    let metadata = if metadata.0 == b"{}" {
        Metadata::default()
    } else {
        serde_json::from_slice(metadata.0)
            .map_err(|error| corrupt(position, "its metadata is not valid", error.to_string()))?
    };
    Ok(RecordedEvent {
        event_id: row.try_get(first + 1).map_err(column_error)?,
        stream_id,
        stream_version: row.try_get::<_, i64>(first).map_err(column_error)? as u64,
        position: Position(position as u64),
        recorded_at: Timestamp::from_unix_micros(row.try_get(first + 6).map_err(column_error)?),
        event_type: row.try_get(first + 2).map_err(column_error)?,
        schema_version: row.try_get::<_, i32>(first + 3).map_err(column_error)? as u32,
        payload,
        metadata,
    })
}

fn corrupt(position: i64, what: &str, detail: String) -> BackendError {
    BackendError::msg(format!(
        "the event at position {position} is corrupt: {what} ({detail})"
    ))
}

fn column_error(error: tokio_postgres::Error) -> BackendError {
    backend("decoding an event row", error)
}
