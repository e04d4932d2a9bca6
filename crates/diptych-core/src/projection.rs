//! Projections: code that turns events into view documents.
//!
//! A projection names itself, declares its collections and the events it wants
//! ([`Interest`]), and applies one event at a time to a [`ViewTx`]. The runner
//! ([`crate::runner`]) hands it events in batches and commits each batch's changes
//! with the checkpoint in one transaction, so the projection itself never deals
//! with checkpoints, retries or crashes.
//!
//! A `ViewTx` buffers the batch's changes in memory and reads through to the view
//! store for documents the batch has not touched yet. That is safe because a
//! projection is the only writer of its collections, and it keeps the trait free of
//! any backend's transaction type. Each event's changes can be undone on their own,
//! so an event that fails leaves nothing behind in the batch.
//!
//! What a projection does outside its views (a process manager's commands) it may
//! hand back as [`Effect`]s from [`Projection::apply_deferred`] instead of doing it
//! in `apply`: the runner then runs a batch's effects together, at the same time
//! where they touch different things, before the batch commits.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, stream};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::RecordedEvent;
use crate::error::{HandlerError, ViewError};
use crate::view::{Change, CollectionSpec, Document, ViewStore};

/// Which events a projection wants. The runner skips the others without calling
/// the projection (they still advance its checkpoint).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    event_types: Option<BTreeSet<String>>,
    categories: Option<BTreeSet<String>>,
}

impl Interest {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only events of these types.
    pub fn event_types<I: IntoIterator<Item = S>, S: Into<String>>(types: I) -> Self {
        Self {
            event_types: Some(types.into_iter().map(Into::into).collect()),
            categories: None,
        }
    }

    /// Only events of streams in these categories (the part of the stream id before
    /// the first `-`: `order` for `order-42`).
    pub fn categories<I: IntoIterator<Item = S>, S: Into<String>>(categories: I) -> Self {
        Self {
            event_types: None,
            categories: Some(categories.into_iter().map(Into::into).collect()),
        }
    }

    /// Also restricts to streams in these categories.
    pub fn in_categories<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        categories: I,
    ) -> Self {
        self.categories = Some(categories.into_iter().map(Into::into).collect());
        self
    }

    /// Whether the projection wants this event.
    pub fn wants(&self, event: &RecordedEvent) -> bool {
        self.event_types
            .as_ref()
            .is_none_or(|types| types.contains(&event.event_type))
            && self
                .categories
                .as_ref()
                .is_none_or(|categories| categories.contains(event.stream_id.category()))
    }
}

/// Code that keeps views up to date from events.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// The projection's name: lower-case letters, digits, `-`, `_`. Its checkpoint
    /// and parked events are stored under it.
    fn name(&self) -> &str;

    /// The collections it writes, which only it writes. A process manager has none.
    fn collections(&self) -> Vec<CollectionSpec>;

    /// The events it wants.
    fn interest(&self) -> Interest {
        Interest::all()
    }

    /// Applies one event. An error (or a panic) undoes this event's changes; the
    /// runner retries with backoff and parks the event if it keeps failing.
    async fn apply(&self, event: &RecordedEvent, views: &mut ViewTx) -> Result<(), HandlerError>;

    /// Applies one event to the views as [`Projection::apply`] does, but hands
    /// back what it does outside them (a process manager's commands) instead of
    /// doing it. The runner applies a batch's events one after another, then
    /// runs all their effects at once where [`Effect::new`]'s targets allow, and
    /// commits only if every effect of an event succeeded; an event whose effects
    /// failed is undone and retried through `apply`, alone.
    ///
    /// So `apply` must be this method followed by running its effects in order.
    /// The default applies the event with `apply` and defers nothing.
    ///
    /// The runner calls [`Projection::prefetch`] with the events first.
    async fn apply_deferred(
        &self,
        event: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<Deferred, HandlerError> {
        self.apply(event, views).await?;
        Ok(Deferred::default())
    }

    /// Reads ahead what applying `events` will read (with
    /// [`ViewTx::prefetch`]), so it is read several documents at a time
    /// instead of one per event; the runner calls it before applying a batch.
    /// Only an optimisation: what it does not read, `apply` reads when it asks.
    /// The default reads nothing.
    async fn prefetch(&self, events: &[&RecordedEvent], views: &mut ViewTx) {
        let _ = (events, views);
    }
}

/// Work an event leaves to do outside the views, run by the projection runner
/// before the batch commits: a process manager's command, say.
///
/// An effect may run more than once (the runner retries an event whose effects
/// failed, and a crash before the commit replays the batch), so it must be
/// idempotent, as a command with a derived id is.
pub struct Effect {
    target: Option<String>,
    run: BoxFuture<'static, Result<(), HandlerError>>,
}

impl Effect {
    /// An effect that runs `run` (which does nothing until the runner polls it)
    /// against `target`, the one thing it changes (for a command, its
    /// aggregate's stream id). Effects with different targets may run at the
    /// same time; effects with the same target run one after another, in the
    /// order they were deferred. An effect without a target may change anything:
    /// it runs alone, after every effect deferred before it and before every
    /// effect deferred after it.
    pub fn new(
        target: Option<String>,
        run: impl Future<Output = Result<(), HandlerError>> + Send + 'static,
    ) -> Self {
        Self {
            target,
            run: Box::pin(run),
        }
    }

    /// What it changes, if it says.
    pub fn target(&self) -> Option<&str> {
        self.target.as_deref()
    }

    /// Runs it.
    pub async fn run(self) -> Result<(), HandlerError> {
        self.run.await
    }

    pub(crate) fn into_parts(
        self,
    ) -> (Option<String>, BoxFuture<'static, Result<(), HandlerError>>) {
        (self.target, self.run)
    }
}

impl std::fmt::Debug for Effect {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Effect")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// The effects one event left ([`Projection::apply_deferred`]), and the sequence
/// of events it belongs to.
#[derive(Debug, Default)]
pub struct Deferred {
    /// Events of one sequence (a saga instance: the events that share its
    /// state) have their effects run in event order: an event's effects start
    /// only after every effect of the sequence's earlier events succeeded. An
    /// event whose effects fail is undone, so a later event that reacted to the
    /// state it left must not have acted on that state yet. `None` for an event
    /// that shares no state with others.
    pub sequence: Option<String>,
    /// The effects, in the order they were issued.
    pub effects: Vec<Effect>,
}

/// What a key holds inside a batch.
#[derive(Clone, Debug)]
enum Slot {
    /// Read from the store and unchanged.
    Clean(Option<Document>),
    /// Written by the batch, as JSON text: what the commit stores, encoded once.
    Put(String),
    /// Deleted by the batch.
    Deleted,
}

type SlotKey = (String, String);

/// How many reads [`ViewTx::prefetch`] has under way at once: enough to hide
/// each read's round trip, few enough to leave the view store's readers to
/// the queries it serves meanwhile.
const PREFETCH_READS: usize = 8;

/// A batch's view changes, buffered until the runner commits them with the
/// checkpoint. Reads see the batch's own writes.
pub struct ViewTx {
    store: Arc<dyn ViewStore>,
    generation: u64,
    collections: BTreeSet<String>,
    slots: BTreeMap<SlotKey, Slot>,
    /// Changes fixed in order by an SQL statement: the document changes made
    /// before it, then the statement itself.
    ordered: Vec<Change>,
    /// Keys written since the last statement, in the order first written.
    written: Vec<SlotKey>,
    written_set: BTreeSet<SlotKey>,
    undo: Vec<Undo>,
}

enum Undo {
    Slot(SlotKey, Option<Slot>),
    Written,
    /// An SQL statement: what `ordered` and `written` were before it.
    Statement {
        ordered: usize,
        written: Vec<SlotKey>,
    },
}

/// A point to roll a [`ViewTx`] back to.
#[derive(Clone, Copy, Debug)]
pub struct Mark(usize);

impl ViewTx {
    /// An empty batch on `generation` of the projection owning `collections`.
    pub fn new(store: Arc<dyn ViewStore>, generation: u64, collections: &[CollectionSpec]) -> Self {
        Self {
            store,
            generation,
            collections: collections.iter().map(|spec| spec.name.clone()).collect(),
            slots: BTreeMap::new(),
            ordered: Vec::new(),
            written: Vec::new(),
            written_set: BTreeSet::new(),
            undo: Vec::new(),
        }
    }

    /// The document under `key`, as the batch has left it.
    pub async fn get<T: DeserializeOwned>(
        &mut self,
        collection: &str,
        key: &str,
    ) -> Result<Option<T>, ViewError> {
        let decoded = match self.slot(collection, key).await? {
            Slot::Clean(None) | Slot::Deleted => return Ok(None),
            Slot::Clean(Some(document)) => T::deserialize(document),
            Slot::Put(text) => serde_json::from_str(text),
        };
        decoded.map(Some).map_err(|error| ViewError::Document {
            collection: collection.to_owned(),
            key: key.to_owned(),
            reason: error.to_string(),
        })
    }

    /// The raw document under `key`, as the batch has left it.
    pub async fn document(
        &mut self,
        collection: &str,
        key: &str,
    ) -> Result<Option<Document>, ViewError> {
        self.get(collection, key).await
    }

    /// Reads the documents under `keys` that the batch has neither read nor
    /// written yet, several at a time, so that the batch's later reads of them
    /// are answered at once. Reading early is the same as reading when asked,
    /// as the projection is the only writer of its collections. A key that
    /// cannot be read now (or a collection that is not the projection's) is
    /// left to be read, and to fail, when asked for.
    pub async fn prefetch(&mut self, collection: &str, keys: impl IntoIterator<Item = String>) {
        if self.check_collection(collection).is_err() {
            return;
        }
        let unread: BTreeSet<String> = keys
            .into_iter()
            .filter(|key| {
                !self
                    .slots
                    .contains_key(&(collection.to_owned(), key.clone()))
            })
            .collect();
        let (store, generation) = (&self.store, self.generation);
        let read: Vec<(String, Result<Option<Document>, ViewError>)> = stream::iter(unread)
            .map(|key| async move {
                let document = store.get_in(collection, generation, &key).await;
                (key, document)
            })
            .buffer_unordered(PREFETCH_READS)
            .collect()
            .await;
        for (key, document) in read {
            if let Ok(document) = document {
                self.set_slot((collection.to_owned(), key), Slot::Clean(document));
            }
        }
    }

    /// The slot of `key`, read from the store the first time.
    async fn slot(&mut self, collection: &str, key: &str) -> Result<&Slot, ViewError> {
        self.check_collection(collection)?;
        let slot_key = (collection.to_owned(), key.to_owned());
        if !self.slots.contains_key(&slot_key) {
            let stored = self.store.get_in(collection, self.generation, key).await?;
            self.set_slot(slot_key.clone(), Slot::Clean(stored));
        }
        Ok(&self.slots[&slot_key])
    }

    /// Stores `document` under `key`, replacing any other.
    pub fn put<T: Serialize>(
        &mut self,
        collection: &str,
        key: &str,
        document: &T,
    ) -> Result<(), ViewError> {
        self.check_collection(collection)?;
        let text = serde_json::to_string(document).map_err(|error| ViewError::Document {
            collection: collection.to_owned(),
            key: key.to_owned(),
            reason: error.to_string(),
        })?;
        self.write((collection.to_owned(), key.to_owned()), Slot::Put(text));
        Ok(())
    }

    /// Changes the document under `key` in place; returns whether there was one.
    pub async fn update<T: Serialize + DeserializeOwned>(
        &mut self,
        collection: &str,
        key: &str,
        change: impl FnOnce(&mut T),
    ) -> Result<bool, ViewError> {
        match self.get::<T>(collection, key).await? {
            Some(mut document) => {
                change(&mut document);
                self.put(collection, key, &document)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Changes the document under `key` in place, starting from `T::default()` when
    /// there is none.
    pub async fn upsert<T: Serialize + DeserializeOwned + Default>(
        &mut self,
        collection: &str,
        key: &str,
        change: impl FnOnce(&mut T),
    ) -> Result<(), ViewError> {
        let mut document = self.get::<T>(collection, key).await?.unwrap_or_default();
        change(&mut document);
        self.put(collection, key, &document)
    }

    /// Removes the document under `key`, if any.
    pub fn delete(&mut self, collection: &str, key: &str) -> Result<(), ViewError> {
        self.check_collection(collection)?;
        self.write((collection.to_owned(), key.to_owned()), Slot::Deleted);
        Ok(())
    }

    /// The escape hatch: runs a statement in the backend's SQL in the batch's
    /// transaction, in order with the document changes around it. Write
    /// `{collection-name}` where the table of one of the projection's collections
    /// belongs (for example `UPDATE {orders} SET …`). Backends without SQL refuse
    /// the batch.
    ///
    /// What the statement writes bypasses the documents' bookkeeping: this batch's
    /// reads do not see it, and full-text indexes are not updated by it.
    pub fn execute_sql(
        &mut self,
        statement: impl Into<String>,
        parameters: Vec<serde_json::Value>,
    ) {
        let ordered = self.ordered.len();
        let written = std::mem::take(&mut self.written);
        self.written_set.clear();
        for key in &written {
            if let Some(change) = change_of(key, &self.slots) {
                self.ordered.push(change);
            }
        }
        self.ordered.push(Change::Sql {
            statement: statement.into(),
            parameters,
        });
        self.undo.push(Undo::Statement { ordered, written });
    }

    /// The current point, to roll back to if an event fails.
    pub fn mark(&self) -> Mark {
        Mark(self.undo.len())
    }

    /// Undoes everything done since `mark`.
    pub fn rollback_to(&mut self, mark: Mark) {
        while self.undo.len() > mark.0 {
            match self.undo.pop() {
                Some(Undo::Slot(key, Some(previous))) => {
                    self.slots.insert(key, previous);
                }
                Some(Undo::Slot(key, None)) => {
                    self.slots.remove(&key);
                }
                Some(Undo::Statement { ordered, written }) => {
                    self.ordered.truncate(ordered);
                    self.written_set = written.iter().cloned().collect();
                    self.written = written;
                }
                Some(Undo::Written) => {
                    if let Some(key) = self.written.pop() {
                        self.written_set.remove(&key);
                    }
                }
                None => {}
            }
        }
    }

    /// The batch's changes in the order they were made: each key's last value
    /// (a key written several times between two statements is written once), with
    /// SQL statements between the changes made before and after them.
    pub fn into_changes(mut self) -> Vec<Change> {
        let mut changes = std::mem::take(&mut self.ordered);
        changes.reserve(self.written.len());
        for key in self.written {
            let Some(slot) = self.slots.remove(&key) else {
                continue;
            };
            let (collection, key) = key;
            match slot {
                Slot::Put(json) => changes.push(Change::Put {
                    collection,
                    key,
                    json,
                }),
                Slot::Deleted => changes.push(Change::Delete { collection, key }),
                Slot::Clean(_) => {}
            }
        }
        changes
    }

    fn write(&mut self, key: SlotKey, slot: Slot) {
        if self.written_set.insert(key.clone()) {
            self.written.push(key.clone());
            self.undo.push(Undo::Written);
        }
        self.set_slot(key, slot);
    }

    fn set_slot(&mut self, key: SlotKey, slot: Slot) {
        let previous = self.slots.insert(key.clone(), slot);
        self.undo.push(Undo::Slot(key, previous));
    }

    fn check_collection(&self, collection: &str) -> Result<(), ViewError> {
        if self.collections.contains(collection) {
            Ok(())
        } else {
            Err(ViewError::UnknownCollection(collection.to_owned()))
        }
    }
}

/// The change that leaves `key` as its slot says, if it was written.
fn change_of(slot_key: &SlotKey, slots: &BTreeMap<SlotKey, Slot>) -> Option<Change> {
    let (collection, key) = slot_key;
    match slots.get(slot_key)? {
        Slot::Put(json) => Some(Change::Put {
            collection: collection.clone(),
            key: key.clone(),
            json: json.clone(),
        }),
        Slot::Deleted => Some(Change::Delete {
            collection: collection.clone(),
            key: key.clone(),
        }),
        Slot::Clean(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::envelope::Position;
    use crate::memory_views::MemoryViews;
    use crate::view::{Declaration, HandlerKind, ViewCommit};

    async fn views_holding(documents: &[(&str, serde_json::Value)]) -> Arc<dyn ViewStore> {
        let views: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
        let declaration = Declaration {
            name: "counts".to_owned(),
            kind: HandlerKind::Projection,
            collections: vec![CollectionSpec::new("counts")],
        };
        views.register(&declaration).await.expect("registered");
        let mut commit = ViewCommit::new("counts", 1, Position(0), Position(1));
        commit.changes = documents
            .iter()
            .map(|(key, document)| Change::Put {
                collection: "counts".to_owned(),
                key: (*key).to_owned(),
                json: document.to_string(),
            })
            .collect();
        views.commit(commit).await.expect("committed");
        views
    }

    async fn overwrite(views: &Arc<dyn ViewStore>, key: &str, document: serde_json::Value) {
        let record = views.projection("counts").await.expect("the record");
        let mut commit = ViewCommit::new(
            "counts",
            1,
            record.position,
            Position(record.position.0 + 1),
        );
        commit.changes = vec![Change::Put {
            collection: "counts".to_owned(),
            key: key.to_owned(),
            json: document.to_string(),
        }];
        views.commit(commit).await.expect("committed");
    }

    /// A prefetched document is answered from the batch (the store changed
    /// underneath only to show where the answer came from); what the batch
    /// wrote or already read stays as it was.
    #[tokio::test]
    async fn prefetched_documents_are_read_from_the_batch_and_never_replace_its_own() {
        let views = views_holding(&[("a", json!(1)), ("b", json!(2)), ("d", json!(4))]).await;
        let mut batch = ViewTx::new(views.clone(), 1, &[CollectionSpec::new("counts")]);
        batch.put("counts", "b", &json!(20)).expect("put");
        assert_eq!(batch.get::<u64>("counts", "d").await.expect("d"), Some(4));
        batch
            .prefetch("counts", ["a", "b", "c", "d"].map(str::to_owned))
            .await;
        for (key, document) in [("a", 100), ("b", 200), ("c", 300), ("d", 400)] {
            overwrite(&views, key, json!(document)).await;
        }
        for (key, expected, why) in [
            ("a", Some(1), "read ahead"),
            ("b", Some(20), "the batch's own write"),
            ("c", None, "read ahead as missing"),
            ("d", Some(4), "read before"),
        ] {
            let read = batch.get::<u64>("counts", key).await.expect("a read");
            assert_eq!(read, expected, "{key}: {why}");
        }
        assert_eq!(describe(batch.into_changes()), ["put b=20"]);
    }

    /// Reading ahead in a collection the projection does not own does nothing;
    /// reading it still fails as before.
    #[tokio::test]
    async fn prefetching_another_collection_is_ignored() {
        let views = views_holding(&[]).await;
        let mut batch = ViewTx::new(views, 1, &[CollectionSpec::new("counts")]);
        batch.prefetch("others", ["a".to_owned()]).await;
        let refused = batch.get::<u64>("others", "a").await;
        assert!(
            matches!(&refused, Err(ViewError::UnknownCollection(name)) if name == "others"),
            "{refused:?}"
        );
    }

    fn describe(changes: Vec<Change>) -> Vec<String> {
        changes
            .into_iter()
            .map(|change| match change {
                Change::Put { key, json, .. } => format!("put {key}={json}"),
                other => format!("{other:?}"),
            })
            .collect()
    }
}
