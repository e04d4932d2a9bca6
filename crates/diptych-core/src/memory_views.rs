//! `MemoryViews`: the in-memory view store, and the reference model for the
//! others (one mutex, plain collections, everything checked before anything
//! changes, so a refused commit changes nothing).
//!
//! Its query semantics are SQLite's, written out: values compare by type first
//! (numbers and booleans, then strings, then arrays and objects as JSON text),
//! numbers numerically, strings by bytes; a document without the field matches no
//! filter and is left out when ordering by that field.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::envelope::Position;
use crate::error::ViewError;
use crate::view::{
    Change, CheckpointWatches, CollectionSpec, Comparison, Control, Cursor, Declaration, Document,
    HandlerKind, Order, Page, ParkedEvent, ProjectionRecord, Query, RebuildProgress, ViewCommit,
    ViewStore, check_redeclaration, field_value, no_parked_event, refuse_process_manager,
    same_owner, verify_commit, words,
};

/// Views held in memory, for tests and as the reference model.
pub struct MemoryViews {
    inner: Mutex<Inner>,
    checkpoints: CheckpointWatches,
    controls: watch::Sender<u64>,
}

#[derive(Default)]
struct Inner {
    projections: BTreeMap<String, Record>,
    owners: BTreeMap<String, String>,
    tables: BTreeMap<(String, u64), BTreeMap<String, Document>>,
    /// By projection, generation and position.
    parked: BTreeMap<(String, u64, Position), ParkedEvent>,
    /// Events received from a broker and applied, by projection.
    received: std::collections::BTreeSet<(String, uuid::Uuid)>,
}

struct Record {
    kind: HandlerKind,
    collections: Vec<CollectionSpec>,
    generation: u64,
    checkpoints: BTreeMap<u64, Position>,
    rebuild: Option<u64>,
    rebuild_requested: bool,
    paused: bool,
    stalled: Option<String>,
}

impl Default for MemoryViews {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryViews {
    /// An empty view store.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            checkpoints: CheckpointWatches::default(),
            controls: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn record(&self, projection: &str) -> Result<&Record, ViewError> {
        self.projections
            .get(projection)
            .ok_or_else(|| ViewError::UnknownProjection(projection.to_owned()))
    }

    fn record_mut(&mut self, projection: &str) -> Result<&mut Record, ViewError> {
        self.projections
            .get_mut(projection)
            .ok_or_else(|| ViewError::UnknownProjection(projection.to_owned()))
    }

    fn snapshot(&self, name: &str, record: &Record) -> ProjectionRecord {
        ProjectionRecord {
            name: name.to_owned(),
            kind: record.kind,
            collections: record.collections.clone(),
            generation: record.generation,
            position: record.checkpoints[&record.generation],
            rebuild: record.rebuild.map(|generation| RebuildProgress {
                generation,
                position: record.checkpoints[&generation],
            }),
            rebuild_requested: record.rebuild_requested,
            paused: record.paused,
            stalled: record.stalled.clone(),
            parked: self.parked_of(name, record.generation).count() as u64,
        }
    }

    /// The parked events of one generation of a projection.
    fn parked_of<'a>(
        &'a self,
        projection: &'a str,
        generation: u64,
    ) -> impl Iterator<Item = &'a ParkedEvent> + 'a {
        self.parked
            .range((projection.to_owned(), generation, Position::START)..)
            .take_while(move |((owner, of, _), _)| owner == projection && *of == generation)
            .map(|(_, parked)| parked)
    }

    /// The served table of a collection, and its declaration.
    fn served(&self, collection: &str) -> Result<(&CollectionSpec, u64), ViewError> {
        let owner = self
            .owners
            .get(collection)
            .ok_or_else(|| ViewError::UnknownCollection(collection.to_owned()))?;
        let record = self.record(owner)?;
        let spec = record
            .collections
            .iter()
            .find(|spec| spec.name == collection)
            .ok_or_else(|| ViewError::UnknownCollection(collection.to_owned()))?;
        Ok((spec, record.generation))
    }

    fn create_tables(&mut self, collections: &[CollectionSpec], generation: u64) {
        for spec in collections {
            self.tables
                .entry((spec.name.clone(), generation))
                .or_default();
        }
    }
}

#[async_trait]
impl ViewStore for MemoryViews {
    async fn register(&self, declaration: &Declaration) -> Result<ProjectionRecord, ViewError> {
        declaration.validate()?;
        let mut inner = self.lock();
        let name = &declaration.name;
        for spec in &declaration.collections {
            match inner.owners.get(&spec.name) {
                Some(owner) if !same_owner(owner, name) => {
                    return Err(ViewError::CollectionTaken {
                        collection: spec.name.clone(),
                        owner: owner.clone(),
                    });
                }
                _ => {}
            }
            let stored = inner
                .projections
                .get(name)
                .and_then(|record| record.collections.iter().find(|c| c.name == spec.name));
            if let Some(stored) = stored {
                check_redeclaration(name, stored, spec)?;
            }
        }
        for spec in &declaration.collections {
            inner.owners.insert(spec.name.clone(), name.clone());
        }
        let record = inner
            .projections
            .entry(name.clone())
            .or_insert_with(|| Record {
                kind: declaration.kind,
                collections: Vec::new(),
                generation: 1,
                checkpoints: BTreeMap::from([(1, Position::START)]),
                rebuild: None,
                rebuild_requested: false,
                paused: false,
                stalled: None,
            });
        record.kind = declaration.kind;
        record.collections = declaration.collections.clone();
        let generations: Vec<u64> = std::iter::once(record.generation)
            .chain(record.rebuild)
            .collect();
        for generation in generations {
            inner.create_tables(&declaration.collections, generation);
        }
        let snapshot = inner.snapshot(name, inner.record(name)?);
        Ok(snapshot)
    }

    async fn projections(&self) -> Result<Vec<ProjectionRecord>, ViewError> {
        let inner = self.lock();
        Ok(inner
            .projections
            .iter()
            .map(|(name, record)| inner.snapshot(name, record))
            .collect())
    }

    async fn projection(&self, projection: &str) -> Result<ProjectionRecord, ViewError> {
        let inner = self.lock();
        Ok(inner.snapshot(projection, inner.record(projection)?))
    }

    async fn owner_of(&self, collection: &str) -> Result<String, ViewError> {
        self.lock()
            .owners
            .get(collection)
            .cloned()
            .ok_or_else(|| ViewError::UnknownCollection(collection.to_owned()))
    }

    async fn get(&self, collection: &str, key: &str) -> Result<Option<Document>, ViewError> {
        let inner = self.lock();
        let (_, generation) = inner.served(collection)?;
        Ok(inner.tables[&(collection.to_owned(), generation)]
            .get(key)
            .cloned())
    }

    async fn get_in(
        &self,
        collection: &str,
        generation: u64,
        key: &str,
    ) -> Result<Option<Document>, ViewError> {
        let inner = self.lock();
        let table = inner
            .tables
            .get(&(collection.to_owned(), generation))
            .ok_or_else(|| ViewError::UnknownCollection(collection.to_owned()))?;
        Ok(table.get(key).cloned())
    }

    async fn query(&self, collection: &str, query: &Query) -> Result<Page, ViewError> {
        let inner = self.lock();
        let (spec, generation) = inner.served(collection)?;
        query.validate(spec)?;
        evaluate(
            spec,
            query,
            &inner.tables[&(collection.to_owned(), generation)],
        )
    }

    async fn commit(&self, commit: ViewCommit) -> Result<(), ViewError> {
        let served_moved;
        {
            let mut inner = self.lock();
            let record = inner.record(&commit.projection)?;
            let checkpoint = record.checkpoints.get(&commit.generation).copied();
            verify_commit(&commit, record.generation, record.rebuild, checkpoint)?;
            let owned: Vec<String> = record.collections.iter().map(|c| c.name.clone()).collect();
            if let Some(&event_id) = commit
                .received
                .iter()
                .find(|&&id| inner.received.contains(&(commit.projection.clone(), id)))
            {
                return Err(ViewError::AlreadyReceived {
                    projection: commit.projection.clone(),
                    event_id,
                });
            }
            // Everything is checked (and every document parsed) before anything
            // changes, so a refused batch leaves no trace.
            let mut writes = Vec::with_capacity(commit.changes.len());
            for change in commit.changes {
                match change {
                    Change::Put { collection, .. } | Change::Delete { collection, .. }
                        if !owned.contains(&collection) =>
                    {
                        return Err(ViewError::UnknownCollection(collection));
                    }
                    Change::Put {
                        collection,
                        key,
                        json,
                    } => {
                        let document =
                            serde_json::from_str(&json).map_err(|error| ViewError::Document {
                                collection: collection.clone(),
                                key: key.clone(),
                                reason: error.to_string(),
                            })?;
                        writes.push((collection, key, Some(document)));
                    }
                    Change::Delete { collection, key } => writes.push((collection, key, None)),
                    Change::Sql { .. } => {
                        return Err(ViewError::Unsupported(
                            "the in-memory view store runs no SQL: test projections that use \
                             `execute_sql` against SQLite"
                                .to_owned(),
                        ));
                    }
                }
            }
            for (collection, key, document) in writes {
                let table = inner
                    .tables
                    .entry((collection, commit.generation))
                    .or_default();
                match document {
                    Some(document) => {
                        table.insert(key, document);
                    }
                    None => {
                        table.remove(&key);
                    }
                }
            }
            let parked_key =
                |position: Position| (commit.projection.clone(), commit.generation, position);
            for parked in commit.parked {
                let key = parked_key(parked.position);
                inner.parked.insert(
                    key,
                    ParkedEvent {
                        generation: commit.generation,
                        ..parked
                    },
                );
            }
            for position in commit.resolved {
                inner.parked.remove(&parked_key(position));
            }
            for event_id in commit.received {
                inner.received.insert((commit.projection.clone(), event_id));
            }
            let record = inner.record_mut(&commit.projection)?;
            record
                .checkpoints
                .insert(commit.generation, commit.checkpoint);
            let mut dropped = None;
            if commit.switch {
                dropped = Some(record.generation);
                record.checkpoints.remove(&record.generation);
                record.generation = commit.generation;
                record.rebuild = None;
            }
            served_moved = (record.generation == commit.generation).then_some(commit.checkpoint);
            if let Some(old) = dropped {
                let collections = record.collections.clone();
                for spec in collections {
                    inner.tables.remove(&(spec.name, old));
                }
                // The old generation's parked events go with it: the new one has
                // tried every event itself and parked its own.
                inner.parked.retain(|(owner, generation, _), _| {
                    owner != &commit.projection || *generation != old
                });
            }
        }
        if let Some(position) = served_moved {
            self.checkpoints.publish(&commit.projection, position);
        }
        Ok(())
    }

    async fn begin_rebuild(&self, projection: &str) -> Result<RebuildProgress, ViewError> {
        let mut inner = self.lock();
        let record = inner.record_mut(projection)?;
        refuse_process_manager(projection, record.kind)?;
        if let Some(generation) = record.rebuild {
            return Ok(RebuildProgress {
                generation,
                position: record.checkpoints[&generation],
            });
        }
        let generation = record.generation + 1;
        record.rebuild = Some(generation);
        record.rebuild_requested = false;
        record.checkpoints.insert(generation, Position::START);
        let collections = record.collections.clone();
        inner.create_tables(&collections, generation);
        Ok(RebuildProgress {
            generation,
            position: Position::START,
        })
    }

    async fn control(&self, projection: &str, control: Control) -> Result<(), ViewError> {
        {
            let mut inner = self.lock();
            let served = inner.record(projection)?.generation;
            let key = |position: Position| (projection.to_owned(), served, position);
            match control {
                Control::Pause => inner.record_mut(projection)?.paused = true,
                Control::Resume => inner.record_mut(projection)?.paused = false,
                Control::Rebuild => {
                    let record = inner.record_mut(projection)?;
                    refuse_process_manager(projection, record.kind)?;
                    if record.rebuild.is_none() {
                        record.rebuild_requested = true;
                    }
                }
                Control::Retry(position) => {
                    inner.record(projection)?;
                    inner
                        .parked
                        .get_mut(&key(position))
                        .ok_or_else(|| no_parked_event(projection, position))?
                        .retry_requested = true;
                }
                Control::Skip(position) => {
                    inner.record(projection)?;
                    inner
                        .parked
                        .remove(&key(position))
                        .ok_or_else(|| no_parked_event(projection, position))?;
                }
            }
        }
        self.controls.send_modify(|count| *count += 1);
        Ok(())
    }

    async fn set_stalled(&self, projection: &str, error: Option<String>) -> Result<(), ViewError> {
        self.lock().record_mut(projection)?.stalled = error;
        Ok(())
    }

    async fn parked(&self, projection: &str) -> Result<Vec<ParkedEvent>, ViewError> {
        let inner = self.lock();
        let served = inner.record(projection)?.generation;
        Ok(inner.parked_of(projection, served).cloned().collect())
    }

    async fn received(
        &self,
        projection: &str,
        event_ids: &[uuid::Uuid],
    ) -> Result<Vec<uuid::Uuid>, ViewError> {
        let inner = self.lock();
        Ok(event_ids
            .iter()
            .filter(|&&id| inner.received.contains(&(projection.to_owned(), id)))
            .copied()
            .collect())
    }

    fn checkpoint_watch(&self, projection: &str) -> watch::Receiver<Position> {
        self.checkpoints.subscribe(projection, || {
            self.lock()
                .projections
                .get(projection)
                .map_or(Position::START, |record| {
                    record.checkpoints[&record.generation]
                })
        })
    }

    fn control_watch(&self) -> watch::Receiver<u64> {
        self.controls.subscribe()
    }
}

/// Runs a validated query over one table.
fn evaluate(
    spec: &CollectionSpec,
    query: &Query,
    table: &BTreeMap<String, Document>,
) -> Result<Page, ViewError> {
    let wanted_words: Option<Vec<String>> = query.text.as_deref().map(|text| words(text).collect());
    if wanted_words.as_ref().is_some_and(Vec::is_empty) {
        return Err(ViewError::InvalidQuery(
            "the search text has no words".to_owned(),
        ));
    }
    let sort_field = match &query.order {
        Order::ByKey => None,
        Order::ByField { field, descending } => Some((field.as_str(), *descending)),
    };
    let after = query
        .cursor
        .as_ref()
        .map(|cursor| cursor.decode(&query.order))
        .transpose()?;
    let mut matches: Vec<(Option<&serde_json::Value>, &String, &Document)> = table
        .iter()
        .filter(|(_, document)| {
            query.filters.iter().all(|filter| {
                field_value(document, &filter.field)
                    .filter(|value| !value.is_null())
                    .is_some_and(|value| {
                        let ordering = compare(value, &filter.value);
                        match filter.comparison {
                            Comparison::Eq => ordering == Ordering::Equal,
                            Comparison::Lt => ordering == Ordering::Less,
                            Comparison::Le => ordering != Ordering::Greater,
                            Comparison::Gt => ordering == Ordering::Greater,
                            Comparison::Ge => ordering != Ordering::Less,
                        }
                    })
            })
        })
        .filter(|(_, document)| {
            wanted_words.as_ref().is_none_or(|wanted| {
                let mut present = Vec::new();
                for field in &spec.text_fields {
                    if let Some(value) = field_value(document, field) {
                        match value {
                            serde_json::Value::String(text) => present.extend(words(text)),
                            other => present.extend(words(&other.to_string())),
                        }
                    }
                }
                wanted.iter().all(|word| present.contains(word))
            })
        })
        .filter_map(|(key, document)| match sort_field {
            None => Some((None, key, document)),
            Some((field, _)) => field_value(document, field)
                .filter(|value| !value.is_null())
                .map(|value| (Some(value), key, document)),
        })
        .collect();
    let descending = sort_field.is_some_and(|(_, descending)| descending);
    let order = |a: (Option<&serde_json::Value>, &str), b: (Option<&serde_json::Value>, &str)| {
        let by_value = match (a.0, b.0) {
            (Some(x), Some(y)) => compare(x, y),
            _ => Ordering::Equal,
        };
        let ascending = by_value.then_with(|| a.1.cmp(b.1));
        if descending {
            ascending.reverse()
        } else {
            ascending
        }
    };
    matches.sort_by(|a, b| order((a.0, a.1), (b.0, b.1)));
    if let Some((value, key)) = &after {
        matches.retain(|(v, k, _)| order((*v, k), (value.as_ref(), key)) == Ordering::Greater);
    }
    let more = matches.len() > query.limit;
    matches.truncate(query.limit);
    let next = match matches.last() {
        Some((value, key, _)) if more => Some(Cursor::encode(*value, key)),
        _ => None,
    };
    Ok(Page {
        items: matches
            .into_iter()
            .map(|(_, key, document)| (key.clone(), document.clone()))
            .collect(),
        next,
    })
}

/// Compares two JSON scalars as SQLite compares the values `json_extract` gives.
fn compare(a: &serde_json::Value, b: &serde_json::Value) -> Ordering {
    fn rank(value: &serde_json::Value) -> (u8, Option<f64>) {
        match value {
            serde_json::Value::Null => (0, None),
            serde_json::Value::Bool(flag) => (1, Some(f64::from(u8::from(*flag)))),
            serde_json::Value::Number(number) => (1, number.as_f64()),
            serde_json::Value::String(_) => (2, None),
            _ => (2, None),
        }
    }
    let text = |value: &serde_json::Value| match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    // Integers compare exactly, as SQLite compares them, even beyond the 2^53
    // that an f64 holds exactly.
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x.cmp(&y);
    }
    let (rank_a, number_a) = rank(a);
    let (rank_b, number_b) = rank(b);
    rank_a
        .cmp(&rank_b)
        .then_with(|| match (number_a, number_b) {
            (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
            _ => text(a).cmp(&text(b)),
        })
}
