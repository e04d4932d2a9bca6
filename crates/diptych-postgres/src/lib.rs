//! diptych on PostgreSQL: one event store and one view database shared by many
//! processes, each running the roles it is given.
//!
//! # The global order without a global lock
//!
//! A position is `(xid << 16) | n`: the id of the transaction that appended the
//! event (`pg_current_xact_id()`), then the event's place within it. Readers of
//! the global log read only positions below `pg_snapshot_xmin(pg_current_snapshot())
//! << 16`, that is, events of transactions older than the oldest one still in
//! progress. Every transaction that has not finished yet has an id at or above
//! that bound, and every transaction that starts later gets a higher id still, so
//! no event can ever appear below a position a reader has passed. Writers take no
//! lock but their own stream's (an advisory lock). Appends that arrive together
//! are written in one transaction, which takes its streams' locks, in a fixed
//! order, before its id (`group.rs`). `docs/postgres-ordering.md` has the
//! argument in full, and the tests that prove it.
//!
//! # Waking subscribers
//!
//! After appends commit, each store sends one `NOTIFY` on a channel of the
//! schema for the whole burst (not from inside the appends: PostgreSQL
//! serialises the commits of notifying transactions). One listening connection
//! per store turns notifications into a watch on the readable head; a store's
//! own appends wake its watch directly. While committed events are held back by an older
//! transaction still in progress, the head is re-read every few milliseconds,
//! since the commit that releases them need not be an append.

mod database;
mod error;
mod events_schema;
mod group;
mod leases;
mod rows;
mod schema;
mod store;
mod views;

pub use database::PgConfig;
pub use error::OpenError;
pub use leases::{LeaseConfig, PartitionedRunner, PgLeases};
pub use store::PgStore;
pub use views::PgViews;
pub mod testing;
