//! The embedded default backend: diptych's event store on one SQLite file.
//!
//! # Durability and speed
//!
//! The file runs in WAL mode with `synchronous=FULL`, so an append is fsynced
//! before it is acknowledged and survives a crash of the process or the machine.
//! An fsync costs far more than the inserts it protects, so appends are **group
//! committed**: one writer thread owns the only writing connection, takes every
//! append waiting on its channel, and commits them in one transaction with one
//! fsync. Each append is still checked and atomic on its own: the checks that can
//! refuse it (expected version, idempotency key) run before it writes anything,
//! so a refused append is reported to its caller while the rest of its group
//! commits; an append that fails halfway (a duplicate event id) makes the writer
//! roll back and rewrite the group without it. Payloads are serialized by the
//! calling task before they reach the writer, and outcomes are built back in the
//! calling task, so the single writer thread spends its time in SQLite.
//!
//! Reads run on their own connections (WAL lets them proceed while the writer
//! commits) on tokio's blocking threads. Positions are assigned inside the write
//! transaction, under SQLite's write lock, so they commit in order and a reader can
//! never see position `p` before a lower one: the global log has no gaps to skip.
//! After each commit the writer moves a watch, which wakes this process's live
//! subscribers without polling.
//!
//! # The file
//!
//! The schema is versioned (`PRAGMA user_version`) and marked as diptych's
//! (`PRAGMA application_id`). Opening refuses, without writing a byte, a file that
//! is not a diptych database or that a newer diptych wrote. The table layout is in
//! `schema.rs`.

mod error;
mod pool;
mod queue;
mod rows;
mod schema;
mod store;
mod views;
mod writer;

pub use error::OpenError;
pub use schema::{APPLICATION_ID, SCHEMA_VERSION, VIEWS_APPLICATION_ID};
pub use store::{SqliteConfig, SqliteStore};
pub use views::SqliteViews;
