//! Typed errors, one per operation, all converting into [`Error`].
//!
//! Callers match on variants, never on message text. Backend failures (I/O, a
//! corrupt file, a lost connection) arrive as [`BackendError`] whatever the backend,
//! and rule violations (a version conflict, a reused idempotency key) have their own
//! variants so SQLite and PostgreSQL report them identically.

use std::error::Error as StdError;
use std::sync::Arc;

use uuid::Uuid;

use crate::envelope::{Position, StreamId};
use crate::store::ExpectedVersion;

/// A stream id that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidStreamId {
    /// The id was the empty string.
    #[error("stream id is empty: give each stream a name such as `order-42`")]
    Empty,
    /// The id was longer than allowed.
    #[error("stream id is {length} bytes long; the most allowed is {max}")]
    TooLong {
        /// Its length in bytes.
        length: usize,
        /// The limit in bytes.
        max: usize,
    },
}

/// An event that cannot be appended as given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidEvent {
    /// The payload text was not JSON at all.
    #[error("payload of `{event_type}` is not valid JSON: {reason}")]
    PayloadNotJson {
        /// The event type it was meant for.
        event_type: String,
        /// What the JSON parser said.
        reason: String,
    },
    /// The event type name was empty.
    #[error("event type is empty: every event needs a type name such as `OrderPlaced`")]
    EmptyEventType,
}

/// A failure of the storage underneath (I/O, a corrupt file, a lost connection).
///
/// It says what was being done and keeps the backend's own error as its source.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{context}")]
pub struct BackendError {
    context: String,
    #[source]
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl BackendError {
    /// A failure described by a message alone.
    pub fn msg(context: impl Into<String>) -> Self {
        Self {
            context: context.into(),
            source: None,
        }
    }

    /// A failure with the backend's error as its cause.
    pub fn with_source(
        context: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Self {
            context: context.into(),
            source: Some(Arc::new(source)),
        }
    }
}

/// Why an append wrote nothing.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The stream was not at the expected version. Reload and decide again.
    #[error(
        "version conflict on `{stream}`: expected {expected}, but the stream is at version {actual}"
    )]
    Conflict {
        /// The stream.
        stream: StreamId,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's version when the append was checked.
        actual: u64,
    },
    /// The append held no events.
    #[error("append to `{stream}` holds no events: an append must carry at least one")]
    NoEvents {
        /// The stream.
        stream: StreamId,
    },
    /// The idempotency key was first used for another stream.
    #[error(
        "idempotency key `{key}` was already used for stream `{first_stream}`, not `{stream}`: use a fresh key per command"
    )]
    IdempotencyKeyReused {
        /// The key.
        key: String,
        /// The stream the key was first used with.
        first_stream: StreamId,
        /// The stream of this append.
        stream: StreamId,
    },
    /// An event id is already in the store.
    #[error("event id {event_id} is already stored: event ids must be unique")]
    DuplicateEventId {
        /// The id.
        event_id: Uuid,
    },
    /// An event was malformed.
    #[error(transparent)]
    InvalidEvent(#[from] InvalidEvent),
    /// The storage failed; the append may be retried with the same idempotency key.
    #[error("append failed in the storage backend: {0}")]
    Backend(#[from] BackendError),
}

/// Why a read returned nothing.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The stream has no events.
    #[error("stream `{stream}` does not exist")]
    StreamNotFound {
        /// The stream.
        stream: StreamId,
    },
    /// The storage failed.
    #[error("read failed in the storage backend: {0}")]
    Backend(#[from] BackendError),
}

/// Why a snapshot could not be loaded or saved.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The storage failed.
    #[error("snapshot storage failed: {0}")]
    Backend(#[from] BackendError),
}

/// Why a stored event could not become a typed event (or the reverse).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// No variant of the event enum has this name.
    #[error(
        "unknown event type `{event_type}` at `{stream}` version {version}: add it to the event enum or register an upcaster that renames it"
    )]
    UnknownEventType {
        /// The stored type name.
        event_type: String,
        /// The stream of the event.
        stream: StreamId,
        /// Its version in the stream.
        version: u64,
    },
    /// The payload does not fit the type.
    #[error(
        "payload of `{event_type}` at `{stream}` version {version} does not match its type: {reason}"
    )]
    InvalidPayload {
        /// The type name.
        event_type: String,
        /// The stream of the event.
        stream: StreamId,
        /// Its version in the stream.
        version: u64,
        /// What the decoder said.
        reason: String,
    },
    /// The event was written by newer code than this.
    #[error(
        "`{event_type}` at `{stream}` version {version} has schema version {found}, newer than the {current} this code knows: upgrade the application"
    )]
    FutureSchemaVersion {
        /// The type name.
        event_type: String,
        /// The stream of the event.
        stream: StreamId,
        /// Its version in the stream.
        version: u64,
        /// The stored schema version.
        found: u32,
        /// The newest schema version known here.
        current: u32,
    },
    /// An upcaster refused the payload.
    #[error("upcasting `{event_type}` from schema version {from_version} failed: {reason}")]
    UpcastFailed {
        /// The type name.
        event_type: String,
        /// The schema version it was at.
        from_version: u32,
        /// What the upcaster said.
        reason: String,
    },
    /// A typed event could not be encoded as an externally tagged JSON enum.
    #[error("event could not be encoded: {reason}")]
    Encode {
        /// What went wrong.
        reason: String,
    },
}

/// Why an aggregate could not be loaded.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The aggregate id makes an invalid stream id.
    #[error(transparent)]
    InvalidStreamId(#[from] InvalidStreamId),
    /// Reading failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// An event could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Loading the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// Why a command did not produce its events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E> {
    /// The aggregate rejected the command: a business rule said no.
    #[error("command rejected: {0}")]
    Rejected(E),
    /// The stream kept changing under the command; it gave up after the configured
    /// number of attempts.
    #[error("gave up after {attempts} attempts: the stream kept changing ({last})")]
    TooManyConflicts {
        /// How many times it tried.
        attempts: u32,
        /// The last conflict.
        last: AppendError,
    },
    /// Loading the aggregate failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Appending failed for another reason than a conflict.
    #[error(transparent)]
    Append(AppendError),
    /// The decided events could not be encoded.
    #[error(transparent)]
    Encode(DecodeError),
    /// The command's aggregate id is blank.
    #[error(transparent)]
    MissingId(#[from] crate::command::MissingId),
}

/// A view store operation that failed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// A collection, projection or field name that cannot be used.
    #[error(
        "{what} name `{name}` is not allowed: use lower-case letters, digits, `-` and `_` (fields: letters, digits, `_`, joined by `.`), starting with a letter, at most 64 bytes"
    )]
    InvalidName {
        /// What the name was for.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// A batch names a received event that an earlier batch already applied.
    #[error(
        "projection `{projection}` already applied event {event_id} received from the broker: drop it from the batch (a redelivery)"
    )]
    AlreadyReceived {
        /// The projection.
        projection: String,
        /// The event.
        event_id: uuid::Uuid,
    },
    /// No registered projection declares this collection.
    #[error("no view named `{0}`: check the name, or start the projection that declares it")]
    UnknownCollection(String),
    /// No projection of this name was ever registered.
    #[error(
        "no projection named `{0}` in this view store: check the name (`diptych projections status` lists them)"
    )]
    UnknownProjection(String),
    /// The collection is declared by another projection.
    #[error(
        "collection `{collection}` already belongs to projection `{owner}`: give each projection its own collections"
    )]
    CollectionTaken {
        /// The collection.
        collection: String,
        /// The projection that owns it.
        owner: String,
    },
    /// A filter or ordering on a field the collection has no index for.
    #[error(
        "collection `{collection}` has no index on `{field}`: declare it with `CollectionSpec::index`"
    )]
    NotIndexed {
        /// The collection.
        collection: String,
        /// The field.
        field: String,
    },
    /// A query that cannot run as given.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// A document that could not be encoded or decoded as the expected type.
    #[error("document `{key}` in `{collection}`: {reason}")]
    Document {
        /// The collection.
        collection: String,
        /// The key.
        key: String,
        /// What serde said.
        reason: String,
    },
    /// The generation's checkpoint moved since the batch began: another runner is
    /// applying the same projection, or the generation was replaced by a rebuild.
    #[error(
        "projection `{projection}` generation {generation} is at {actual}, not {expected}: another runner is applying it, or a rebuild replaced it; run each projection in one process"
    )]
    CheckpointMoved {
        /// The projection.
        projection: String,
        /// The generation.
        generation: u64,
        /// The checkpoint the batch started from.
        expected: u64,
        /// The checkpoint found.
        actual: u64,
    },
    /// The operation needs something the projection does not have.
    #[error("projection `{projection}`: {reason}")]
    NotPossible {
        /// The projection.
        projection: String,
        /// Why, and what to do instead.
        reason: String,
    },
    /// This backend does not support the operation.
    #[error("{0}")]
    Unsupported(String),
    /// See [`BackendError`].
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Waiting for a view to reach a position failed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The view did not reach the position in time.
    #[error(
        "view `{view}` did not reach position {position} within {waited:?} (it is at {reached}); the projection may be behind, paused or stalled: check `diptych projections status`"
    )]
    Timeout {
        /// The view waited on.
        view: String,
        /// The position waited for.
        position: Position,
        /// Where the view was when the wait gave up.
        reached: Position,
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// No collection or projection of this name.
    #[error("no view named `{0}`")]
    UnknownView(String),
    /// See [`ViewError`].
    #[error(transparent)]
    View(#[from] ViewError),
}

/// A projection or process manager could not handle an event. The runner retries
/// it with backoff and parks the event if it keeps failing.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    message: String,
    #[source]
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl HandlerError {
    /// An error with this message.
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// An error with this message, caused by `source`.
    pub fn with_source(
        message: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// The message and its causes, joined by `: `.
    pub fn chain(&self) -> String {
        let mut text = self.message.clone();
        let mut cause = self.source.as_deref().map(|source| source as &dyn StdError);
        while let Some(error) = cause {
            text.push_str(": ");
            text.push_str(&error.to_string());
            cause = error.source();
        }
        text
    }
}

impl From<ViewError> for HandlerError {
    fn from(error: ViewError) -> Self {
        Self::with_source("view store", error)
    }
}

impl From<DecodeError> for HandlerError {
    fn from(error: DecodeError) -> Self {
        Self::with_source("decoding the event", error)
    }
}

impl<E: StdError + Send + Sync + 'static> From<CommandError<E>> for HandlerError {
    fn from(error: CommandError<E>) -> Self {
        Self::with_source("issuing a command", error)
    }
}

/// Any diptych error, for callers that do not need to tell operations apart.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// See [`InvalidStreamId`].
    #[error(transparent)]
    InvalidStreamId(#[from] InvalidStreamId),
    /// See [`InvalidEvent`].
    #[error(transparent)]
    InvalidEvent(#[from] InvalidEvent),
    /// See [`AppendError`].
    #[error(transparent)]
    Append(#[from] AppendError),
    /// See [`ReadError`].
    #[error(transparent)]
    Read(#[from] ReadError),
    /// See [`SnapshotError`].
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// See [`DecodeError`].
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// See [`LoadError`].
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A business rule rejected a command.
    #[error("command rejected: {0}")]
    Rejected(Box<dyn StdError + Send + Sync>),
    /// See [`ViewError`].
    #[error(transparent)]
    View(#[from] ViewError),
    /// See [`WaitError`].
    #[error(transparent)]
    Wait(#[from] WaitError),
    /// See [`BackendError`].
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// See [`crate::MissingId`].
    #[error(transparent)]
    MissingId(#[from] crate::command::MissingId),
}

impl<E: StdError + Send + Sync + 'static> From<CommandError<E>> for Error {
    fn from(error: CommandError<E>) -> Self {
        match error {
            CommandError::Rejected(rejection) => Error::Rejected(Box::new(rejection)),
            CommandError::TooManyConflicts { last, .. } => Error::Append(last),
            CommandError::Load(load) => Error::Load(load),
            CommandError::Append(append) => Error::Append(append),
            CommandError::Encode(decode) => Error::Decode(decode),
            CommandError::MissingId(missing) => Error::MissingId(missing),
        }
    }
}
