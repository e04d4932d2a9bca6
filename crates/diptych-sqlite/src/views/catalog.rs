//! Reading the catalogue: a projection's record, its collections' specs, the
//! tables served, and stored documents.

use std::collections::BTreeMap;

use diptych_core::backend_kit::group_members;
use diptych_core::{
    BackendError, CollectionSpec, Document, HandlerKind, Position, ProjectionRecord,
    RebuildProgress, ViewError,
};
use rusqlite::{Connection, OptionalExtension};

use super::tables::table_name;
use crate::error::backend;

pub(super) fn read_record(
    connection: &Connection,
    projection: &str,
) -> Result<ProjectionRecord, ViewError> {
    let row = connection
        .prepare_cached(
            "SELECT p.kind, p.generation, c.position, p.rebuild_generation, r.position,
                    p.rebuild_requested, p.paused, p.stalled,
                    (SELECT count(*) FROM parked
                     WHERE projection = p.name AND generation = p.generation)
             FROM projections p
             JOIN checkpoints c ON c.projection = p.name AND c.generation = p.generation
             LEFT JOIN checkpoints r ON r.projection = p.name AND r.generation = p.rebuild_generation
             WHERE p.name = ?1",
        )
        .and_then(|mut statement| {
            statement
                .query_row([projection], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, Option<i64>>(3)?,
                        row.get::<_, Option<i64>>(4)?,
                        row.get::<_, bool>(5)?,
                        row.get::<_, bool>(6)?,
                        row.get::<_, Option<String>>(7)?,
                        row.get::<_, i64>(8)?,
                    ))
                })
                .optional()
        })
        .map_err(|error| backend("reading a projection", error))?
        .ok_or_else(|| ViewError::UnknownProjection(projection.to_owned()))?;
    let (kind, generation, position, rebuild, rebuild_position, requested, paused, stalled, parked) =
        row;
    let collections = connection
        // A partition's collections are registered under whichever partition
        // came first: look under every member of its group.
        .prepare_cached(
            "SELECT spec FROM collections WHERE projection IN (SELECT value FROM json_each(?1)) \
             ORDER BY name",
        )
        .and_then(|mut statement| {
            let members = serde_json::to_string(&group_members(projection)).unwrap_or_default();
            statement
                .query_map([members], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|error| backend("reading collections", error))?
        .iter()
        .map(|text| decode_spec(text))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ProjectionRecord {
        name: projection.to_owned(),
        kind: HandlerKind::from_stored(&kind),
        collections,
        generation: generation as u64,
        position: Position(position as u64),
        rebuild: rebuild.map(|generation| RebuildProgress {
            generation: generation as u64,
            position: Position(rebuild_position.unwrap_or(0) as u64),
        }),
        rebuild_requested: requested,
        paused,
        stalled,
        parked: parked as u64,
    })
}

pub(super) fn decode_spec(text: &str) -> Result<CollectionSpec, ViewError> {
    serde_json::from_str(text).map_err(|error| {
        ViewError::Backend(BackendError::with_source(
            "a corrupt collection declaration",
            error,
        ))
    })
}

/// A collection's declaration and its served generation.
pub(super) fn served_collection(
    connection: &Connection,
    collection: &str,
) -> Result<(CollectionSpec, u64), ViewError> {
    let (spec, generation) = connection
        .prepare_cached(
            "SELECT c.spec, p.generation FROM collections c
             JOIN projections p ON p.name = c.projection WHERE c.name = ?1",
        )
        .and_then(|mut statement| {
            statement
                .query_row([collection], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })
                .optional()
        })
        .map_err(|error| backend("reading collections", error))?
        .ok_or_else(|| ViewError::UnknownCollection(collection.to_owned()))?;
    Ok((decode_spec(&spec)?, generation as u64))
}

/// Every collection's served table, by collection name.
pub(super) fn served_tables(
    connection: &Connection,
) -> Result<BTreeMap<String, String>, ViewError> {
    connection
        .prepare_cached(
            "SELECT c.name, p.generation FROM collections c
             JOIN projections p ON p.name = c.projection",
        )
        .and_then(|mut statement| {
            statement
                .query_map([], |row| {
                    let name: String = row.get(0)?;
                    let generation: i64 = row.get(1)?;
                    Ok((name.clone(), table_name(&name, generation as u64)))
                })?
                .collect()
        })
        .map_err(|error| backend("reading collections", error).into())
}

pub(super) fn read_document(
    connection: &Connection,
    collection: &str,
    generation: u64,
    key: &str,
) -> Result<Option<Document>, ViewError> {
    let sql = format!(
        "SELECT doc FROM {} WHERE key = ?1",
        table_name(collection, generation)
    );
    let text: Option<String> = connection
        .prepare_cached(&sql)
        .map_err(|_| ViewError::UnknownCollection(collection.to_owned()))?
        .query_row([key], |row| row.get(0))
        .optional()
        .map_err(|error| backend(format!("reading `{key}` in `{collection}`"), error))?;
    text.map(|text| decode_document(collection, key, &text))
        .transpose()
}

pub(super) fn decode_document(
    collection: &str,
    key: &str,
    text: &str,
) -> Result<Document, ViewError> {
    serde_json::from_str(text).map_err(|error| {
        ViewError::Backend(BackendError::with_source(
            format!("document `{key}` in `{collection}` is corrupt"),
            error,
        ))
    })
}
