//! The diptych model: everything an event-sourced application is made of, and the
//! contract its storage must keep, without any storage of its own.
//!
//! # The shape of it
//!
//! An application's rules live in [`Aggregate`]s: a pure `decide` (command in,
//! events out, or a rejection) and a pure `evolve` (event in, state changed). A
//! [`Repository`] runs the command path around them: load the aggregate (latest
//! [`Snapshot`] plus the events after it), decide, append the events with the
//! version it loaded as the expected version, and on a conflict load and decide
//! again, a bounded number of times. The command id doubles as the idempotency key,
//! so a retried request returns its first result and writes nothing twice.
//!
//! Events are stored in an [`EventStore`]: streams with dense versions, one global
//! order of positions, atomic appends with optimistic concurrency, durable before
//! acknowledged. The trait is async, object safe and `Send`, so an application
//! holds an `Arc<dyn EventStore>` and chooses the backend (SQLite, PostgreSQL, the
//! [`MemoryStore`] here) at run time.
//!
//! Each stored event is a [`RecordedEvent`] envelope: id, stream, version,
//! position, time, type name and schema version, JSON payload and [`Metadata`]
//! (command, correlation and causation ids). The [`EventCodec`] maps an
//! application's event enum to and from envelopes, and its [`Upcasters`] bring
//! events written under old schemas up to date on read, so history is never
//! rewritten.
//!
//! A [`Subscription`] reads the global log from a checkpoint, a page at a time, and
//! then follows it live, woken by the store rather than polling.
//!
//! # Choices
//!
//! * **No I/O here.** This crate defines the contract and the reference model; the
//!   backends (`diptych-sqlite`, later PostgreSQL) implement it. The only runtime
//!   piece used is `tokio::sync::watch`, for waking subscribers.
//! * **The contract is tested, not just written.** The `testkit` feature holds one
//!   conformance suite, generic over the backend, with property tests comparing the
//!   backend to [`MemoryStore`]; a backend is done when it passes.
//! * **Errors are typed per operation** ([`AppendError`], [`ReadError`],
//!   [`LoadError`], [`CommandError`]) and convert into one [`Error`]. A version
//!   conflict is [`AppendError::Conflict`] on every backend.

pub mod aggregate;
pub mod backend_kit;
mod cache;
pub mod codec;
pub mod command;
pub mod copies;
pub mod envelope;
pub mod error;
pub mod inbound;
pub mod memory;
pub mod memory_views;
pub mod partition;
pub mod process;
pub mod projection;
pub mod relay;
pub mod repository;
pub mod runner;
pub mod store;
pub mod subscription;
pub mod testing;
#[cfg(feature = "testkit")]
pub mod testkit;
mod turns;
pub mod typed;
pub mod view;

pub use aggregate::{Aggregate, SnapshotPolicy};
pub use codec::{DomainEvent, EventCodec, Upcasters};
pub use command::{
    AggregateCommand, Command, InvalidBody, MissingId, RejectionCode, parse_body, require_id,
};
pub use copies::{COPIED_FROM, StreamCopies, is_copy};
pub use envelope::{
    MAX_STREAM_ID_BYTES, Metadata, NewEvent, Position, RecordedEvent, StreamId, Timestamp,
};
pub use error::{
    AppendError, BackendError, CommandError, DecodeError, Error, HandlerError, InvalidEvent,
    InvalidStreamId, LoadError, ReadError, SnapshotError, ViewError, WaitError,
};
pub use inbound::{InboundProjection, InboundStats, Received, inbound_stats};
pub use memory::MemoryStore;
pub use memory_views::MemoryViews;
pub use partition::{Partition, stream_partition};
pub use process::{ProcessManager, as_projection, spawn_process_manager, state_collection};
pub use projection::{Deferred, Effect, Interest, Mark, Projection, ViewTx};
pub use relay::{Publisher, RelayConfig, spawn_relay};
pub use repository::{
    CommandContext, CommandOutcome, DEFAULT_CACHE_CAPACITY, Loaded, Repository, RepositoryConfig,
    RepositoryStats,
};
pub use runner::{
    Handler, LIVE_WITHIN, ProjectionState, ProjectionStatus, RunnerConfig, RunnerHandle,
    projection_status, spawn_projection,
};
pub use store::{
    AppendOutcome, AppendRequest, Direction, EventStore, ExpectedVersion, Snapshot, StreamRead,
    check_append_shape,
};
pub use subscription::Subscription;
pub use typed::{EventSet, TypedProcessManager, TypedProjection};
pub use view::{
    Change, CollectionSpec, Comparison, Control, Cursor, Declaration, Document, Filter,
    HandlerKind, Order, Page, ParkedEvent, ProjectionRecord, Query, RebuildProgress, ViewCommit,
    ViewStore, wait_for,
};
