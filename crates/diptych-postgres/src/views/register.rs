//! Registration and rebuilds: the two writes that create tables.

use std::collections::HashMap;

use deadpool_postgres::GenericClient;
use diptych_core::backend_kit::{check_redeclaration, refuse_process_manager, same_owner};
use diptych_core::{
    BackendError, Declaration, Position, ProjectionRecord, RebuildProgress, ViewError,
};

use super::catalog::{decode_spec, read_stored, to_sql};
use super::errors::failure as backend;
use super::tables::{create_sql, drop_sql};

/// Serializes registrations and rebuilds, which create tables: two processes
/// registering at once would otherwise race in `CREATE TABLE IF NOT EXISTS`.
/// Taken before any row lock, by every writer that takes both.
async fn lock_ddl(transaction: &impl GenericClient) -> Result<(), ViewError> {
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext('diptych views ' || current_schema()))",
            &[],
        )
        .await
        .map_err(|error| backend("waiting for other registrations", error))?;
    Ok(())
}

/// Declares a projection and its collections, creating what is missing.
pub(crate) async fn register(
    transaction: &impl GenericClient,
    declaration: &Declaration,
) -> Result<ProjectionRecord, ViewError> {
    lock_ddl(transaction).await?;
    let name = declaration.name.as_str();
    let names: Vec<&str> = declaration
        .collections
        .iter()
        .map(|spec| spec.name.as_str())
        .collect();
    let rows = transaction
        .query(
            "SELECT name, projection, spec FROM collections WHERE name = ANY($1)",
            &[&names],
        )
        .await
        .map_err(|error| backend("reading collections", error))?;
    let mut found: HashMap<String, (String, serde_json::Value)> = rows
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    for spec in &declaration.collections {
        let Some((owner, stored)) = found.remove(&spec.name) else {
            continue;
        };
        if !same_owner(&owner, name) {
            return Err(ViewError::CollectionTaken {
                collection: spec.name.clone(),
                owner,
            });
        }
        check_redeclaration(name, &decode_spec(stored)?, spec)?;
    }
    let failed = |error| backend("registering a projection", error);
    let created: bool = transaction
        .query_one(
            "INSERT INTO projections (name, kind, generation) VALUES ($1, $2, 1)
             ON CONFLICT (name) DO UPDATE SET kind = excluded.kind
             RETURNING xmax = 0",
            &[&name, &declaration.kind.as_str()],
        )
        .await
        .map_err(failed)?
        .get(0);
    if created {
        transaction
            .execute(
                "INSERT INTO checkpoints (projection, generation, position) VALUES ($1, 1, 0)",
                &[&name],
            )
            .await
            .map_err(failed)?;
    }
    for spec in &declaration.collections {
        let value = serde_json::to_value(spec).map_err(|error| {
            BackendError::with_source("encoding a collection's declaration", error)
        })?;
        transaction
            .execute(
                "INSERT INTO collections (name, projection, spec) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
                &[&spec.name, &name, &value],
            )
            .await
            .map_err(|error| backend("registering a collection", error))?;
    }
    let stored = read_stored(transaction, name, false).await?;
    let generations = std::iter::once(stored.record.generation)
        .chain(stored.record.rebuild.map(|rebuild| rebuild.generation));
    let mut ddl = String::new();
    for generation in generations {
        for spec in &declaration.collections {
            if let Some(id) = stored.ids.get(&spec.name) {
                ddl.push_str(&create_sql(spec, *id, generation));
            }
        }
    }
    transaction
        .batch_execute(&ddl)
        .await
        .map_err(|error| backend("creating the tables of a projection", error))?;
    Ok(stored.record)
}

/// Starts a rebuild, or returns the one under way.
pub(crate) async fn begin_rebuild(
    transaction: &impl GenericClient,
    projection: &str,
) -> Result<RebuildProgress, ViewError> {
    lock_ddl(transaction).await?;
    let stored = read_stored(transaction, projection, true).await?;
    let record = &stored.record;
    refuse_process_manager(projection, record.kind)?;
    if let Some(rebuild) = record.rebuild {
        return Ok(rebuild);
    }
    let generation = record.generation + 1;
    let failed = |error| backend("starting a rebuild", error);
    transaction
        .execute(
            "UPDATE projections SET rebuild_generation = $2, rebuild_requested = false
             WHERE name = $1",
            &[&projection, &to_sql(generation)],
        )
        .await
        .map_err(failed)?;
    transaction
        .execute(
            "INSERT INTO checkpoints (projection, generation, position) VALUES ($1, $2, 0)
             ON CONFLICT (projection, generation) DO UPDATE SET position = 0",
            &[&projection, &to_sql(generation)],
        )
        .await
        .map_err(failed)?;
    // Tables left by an earlier rebuild that never finished start empty.
    let mut ddl = String::new();
    for spec in &record.collections {
        if let Some(id) = stored.ids.get(&spec.name) {
            ddl.push_str(&drop_sql(*id, generation));
            ddl.push_str(&create_sql(spec, *id, generation));
        }
    }
    transaction
        .batch_execute(&ddl)
        .await
        .map_err(|error| backend("creating the tables of a rebuild", error))?;
    Ok(RebuildProgress {
        generation,
        position: Position::START,
    })
}
