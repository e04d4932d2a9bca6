//! The on-disk format and its migrations.
//!
//! A diptych database is marked by `PRAGMA application_id` (so a stranger's SQLite
//! file is refused instead of written into) and versioned by `PRAGMA user_version`
//! (so a file written by a newer diptych is refused instead of misread). Migrations
//! run in order, each in its own transaction with the version bump, so a crash
//! mid-migration leaves the previous version intact.

use std::path::Path;

use diptych_core::BackendError;
use rusqlite::{Connection, ErrorCode};

use crate::error::{OpenError, backend};

/// `DPTY` in ASCII: the mark of a diptych database in its header.
pub const APPLICATION_ID: i32 = 0x4450_5459;

/// One kind of diptych file: its mark and its migrations, in order (the schema
/// version is their count).
pub struct Schema {
    /// What `PRAGMA application_id` holds in a file of this kind.
    pub application_id: i32,
    /// The migrations, in order.
    pub migrations: &'static [&'static str],
}

/// The event store's file.
pub const EVENTS: Schema = Schema {
    application_id: APPLICATION_ID,
    migrations: MIGRATIONS,
};

/// `DPTV` in ASCII: the mark of a diptych view database.
pub const VIEWS_APPLICATION_ID: i32 = 0x4450_5456;

/// The view store's file: projections, their checkpoints per generation, their
/// collections' declarations and parked events. The documents themselves live in
/// one table per collection and generation, created as projections register.
pub const VIEWS: Schema = Schema {
    application_id: VIEWS_APPLICATION_ID,
    migrations: &[
        // 1: the catalogue of projections.
        "CREATE TABLE projections (
            name               TEXT    PRIMARY KEY,
            kind               TEXT    NOT NULL,
            generation         INTEGER NOT NULL,
            rebuild_generation INTEGER,
            rebuild_requested  INTEGER NOT NULL DEFAULT 0,
            paused             INTEGER NOT NULL DEFAULT 0,
            stalled            TEXT
        ) STRICT;
        CREATE TABLE checkpoints (
            projection TEXT    NOT NULL,
            generation INTEGER NOT NULL,
            position   INTEGER NOT NULL,
            PRIMARY KEY (projection, generation)
        ) STRICT, WITHOUT ROWID;
        CREATE TABLE collections (
            name       TEXT PRIMARY KEY,
            projection TEXT NOT NULL,
            spec       TEXT NOT NULL
        ) STRICT, WITHOUT ROWID;
        CREATE TABLE parked (
            projection      TEXT    NOT NULL,
            generation      INTEGER NOT NULL,
            position        INTEGER NOT NULL,
            stream          TEXT    NOT NULL,
            event_type      TEXT    NOT NULL,
            error           TEXT    NOT NULL,
            attempts        INTEGER NOT NULL,
            parked_at       INTEGER NOT NULL,
            retry_requested INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (projection, generation, position)
        ) STRICT, WITHOUT ROWID;",
        // 2: events received from a broker and applied, for deduplication.
        "CREATE TABLE received (
            projection TEXT NOT NULL,
            event_id   BLOB NOT NULL,
            PRIMARY KEY (projection, event_id)
        ) STRICT, WITHOUT ROWID;",
    ],
};

/// The event store's migrations, in order; the schema version is their count.
const MIGRATIONS: &[&str] = &[
    // 1: the log, idempotency keys and snapshots.
    "CREATE TABLE events (
        position       INTEGER PRIMARY KEY,
        stream_id      TEXT    NOT NULL,
        version        INTEGER NOT NULL,
        event_id       BLOB    NOT NULL UNIQUE,
        event_type     TEXT    NOT NULL,
        schema_version INTEGER NOT NULL,
        payload        TEXT    NOT NULL,
        metadata       TEXT    NOT NULL,
        recorded_at    INTEGER NOT NULL,
        UNIQUE (stream_id, version)
    ) STRICT;
    CREATE TABLE idempotency (
        key            TEXT    PRIMARY KEY,
        stream_id      TEXT    NOT NULL,
        first_position INTEGER NOT NULL,
        last_position  INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE snapshots (
        stream_id      TEXT    PRIMARY KEY,
        version        INTEGER NOT NULL,
        state_version  INTEGER NOT NULL,
        state          TEXT    NOT NULL,
        taken_at       INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;",
];

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Checks that the file is a diptych database this build can read, or an empty
/// file it may initialise, without writing anything to it.
pub fn check_identity(connection: &Connection, path: &Path) -> Result<(), OpenError> {
    EVENTS.check_identity(connection, path)
}

/// Brings the event store's schema up to [`SCHEMA_VERSION`].
pub fn migrate(connection: &mut Connection) -> Result<(), OpenError> {
    EVENTS.migrate(connection)
}

/// Opens (creating it and its directory if needed) the SQLite file at `path`.
pub fn open_file(path: &Path) -> Result<Connection, OpenError> {
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|error| {
            BackendError::with_source(format!("creating directory {}", parent.display()), error)
        })?;
    }
    Connection::open(path)
        .and_then(|connection| plan_once(&connection).map(|()| connection))
        .map_err(|error| OpenError::Backend(backend(format!("opening {}", path.display()), error)))
}

/// Plans each statement once, whatever values are bound to it. By default
/// SQLite plans a statement with a bound `LIMIT ?` (every page of a read) for
/// the value bound, and so re-prepares it at every execution: a tenth of a
/// reader thread's time under `bench command` went to parsing the same
/// statement again (`BENCHMARKS.md`). The stores' statements look rows up by
/// key or index range, and with no statistics gathered (nothing here runs
/// `ANALYZE`) their plans never depend on values; a store that gathered them
/// would want this looked at again.
pub(crate) fn plan_once(connection: &Connection) -> rusqlite::Result<()> {
    connection
        .set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )
        .map(|_| ())
}

impl Schema {
    /// The schema version this build writes and reads.
    pub fn version(&self) -> i64 {
        self.migrations.len() as i64
    }

    /// Checks that the file is of this kind and a version this build can read, or
    /// an empty file it may initialise, without writing anything to it.
    pub fn check_identity(&self, connection: &Connection, path: &Path) -> Result<(), OpenError> {
        let read_header = |connection: &Connection| -> rusqlite::Result<(i32, i64, i64)> {
            let application_id =
                connection.query_row("PRAGMA application_id", [], |row| row.get(0))?;
            let user_version = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
            let objects =
                connection.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))?;
            Ok((application_id, user_version, objects))
        };
        let (application_id, user_version, objects) = match read_header(connection) {
            Ok(header) => header,
            Err(rusqlite::Error::SqliteFailure(error, _))
                if error.code == ErrorCode::NotADatabase =>
            {
                return Err(OpenError::NotDiptychDatabase {
                    path: path.to_owned(),
                    reason: "the file is not an SQLite database".to_owned(),
                });
            }
            Err(error) => {
                return Err(OpenError::Backend(backend(
                    "reading the database header",
                    error,
                )));
            }
        };
        let is_fresh = application_id == 0 && objects == 0;
        if !is_fresh && application_id != self.application_id {
            return Err(OpenError::NotDiptychDatabase {
                path: path.to_owned(),
                reason: format!(
                    "it is an SQLite database of another application (application id {application_id:#x})"
                ),
            });
        }
        if user_version > self.version() {
            return Err(OpenError::NewerSchema {
                path: path.to_owned(),
                found: user_version,
                supported: self.version(),
            });
        }
        Ok(())
    }

    /// Brings the schema up to date, one migration per transaction.
    pub fn migrate(&self, connection: &mut Connection) -> Result<(), OpenError> {
        let current: i64 = connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|error| OpenError::Backend(backend("reading the schema version", error)))?;
        for (index, migration) in self.migrations.iter().enumerate().skip(current as usize) {
            let target = index as i64 + 1;
            let apply = |connection: &mut Connection| -> rusqlite::Result<()> {
                let transaction = connection.transaction()?;
                transaction.execute_batch(migration)?;
                transaction.execute_batch(&format!(
                    "PRAGMA application_id = {}; PRAGMA user_version = {target};",
                    self.application_id
                ))?;
                transaction.commit()
            };
            apply(connection).map_err(|error| {
                OpenError::Backend(backend(
                    format!("migrating the schema to version {target}"),
                    error,
                ))
            })?;
        }
        Ok(())
    }
}
