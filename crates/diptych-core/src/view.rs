//! Views: the query side's storage, and the contract every view backend keeps.
//!
//! A view is a set of typed documents (JSON) in a named collection, keyed by
//! string. Each collection belongs to one projection, which is the only writer of
//! it; collections declare the fields they can be filtered and ordered by
//! (secondary indexes) and the fields full-text search looks at.
//!
//! A projection's collections live in *generations*. Queries read the served
//! generation; a rebuild fills a new one from position 0 beside it and, once it has
//! caught up, the backend switches the served generation and drops the old one in
//! one transaction, so a reader sees either the old view or the new one, never an
//! empty or half-built one.
//!
//! # The contract (invariant 5)
//!
//! [`ViewStore::commit`] applies a batch's document changes, the generation's new
//! checkpoint, the events it parked and the parked events it resolved in **one
//! transaction**. It refuses the batch, writing nothing, when the generation's
//! checkpoint is no longer the one the batch started from (two runners applying
//! the same projection would otherwise apply events twice).
//!
//! The checkpoint watch ([`ViewStore::checkpoint_watch`]) moves after each commit
//! that advances the served generation, so [`wait_for`] wakes at once.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::envelope::{Position, Timestamp};
use crate::error::{ViewError, WaitError};

/// A stored document: any JSON value, usually an object.
pub type Document = serde_json::Value;

/// The longest collection or projection name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// What a collection looks like: its name, the fields it can be filtered and
/// ordered by, and the fields full-text search reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionSpec {
    /// The collection's name: lower-case letters, digits, `-` and `_`, starting with
    /// a letter, at most [`MAX_NAME_BYTES`].
    pub name: String,
    /// Fields with a secondary index, for equality and range filters and ordering.
    /// A field is a top-level key or a dotted path (`address.city`).
    pub indexes: Vec<String>,
    /// Fields searched by a query's `text`.
    pub text_fields: Vec<String>,
}

impl CollectionSpec {
    /// A collection with no index and no full-text fields.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            indexes: Vec::new(),
            text_fields: Vec::new(),
        }
    }

    /// Declares a secondary index on `field`.
    pub fn index(mut self, field: impl Into<String>) -> Self {
        self.indexes.push(field.into());
        self
    }

    /// Declares `field` as searched by full-text queries.
    pub fn text(mut self, field: impl Into<String>) -> Self {
        self.text_fields.push(field.into());
        self
    }

    /// Checks the names of the collection and its fields.
    pub fn validate(&self) -> Result<(), ViewError> {
        validate_name("collection", &self.name)?;
        for field in self.indexes.iter().chain(&self.text_fields) {
            validate_field(field)?;
        }
        Ok(())
    }
}

/// Checks a collection or projection name: lower-case letters, digits, `-` and `_`,
/// starting with a letter, at most [`MAX_NAME_BYTES`]. Backends use names in table
/// names, so nothing else is allowed.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), ViewError> {
    let well_formed = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if well_formed {
        Ok(())
    } else {
        Err(ViewError::InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

/// Checks a field path: ASCII letters, digits and `_`, segments joined by `.`.
pub fn validate_field(field: &str) -> Result<(), ViewError> {
    let well_formed = !field.is_empty()
        && field.len() <= MAX_NAME_BYTES
        && field.split('.').all(|segment| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if well_formed {
        Ok(())
    } else {
        Err(ViewError::InvalidName {
            what: "field",
            name: field.to_owned(),
        })
    }
}

/// A comparison in a [`Filter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Comparison {
    /// Equal.
    Eq,
    /// Less than.
    Lt,
    /// Less than or equal.
    Le,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Ge,
}

/// One condition on an indexed field.
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    /// The field; it must be declared as an index.
    pub field: String,
    /// How the field compares with the value.
    pub comparison: Comparison,
    /// A scalar: string, number or boolean (booleans compare as 1 and 0).
    pub value: serde_json::Value,
}

/// The order of a query's results. Ties are broken by key, so paging is stable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// By key, ascending.
    #[default]
    ByKey,
    /// By an indexed field, then by key.
    ByField {
        /// The field; it must be declared as an index.
        field: String,
        /// Largest first (newest first, for a time).
        descending: bool,
    },
}

/// A query over one collection: every filter must hold and, with `text`, every word
/// of it must appear in the collection's text fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// Conditions on indexed fields, all of which must hold.
    pub filters: Vec<Filter>,
    /// Words to find in the text fields.
    pub text: Option<String>,
    /// The order of results.
    pub order: Order,
    /// The most documents in one page.
    pub limit: usize,
    /// Where the previous page stopped.
    pub cursor: Option<Cursor>,
}

impl Default for Query {
    fn default() -> Self {
        Self {
            filters: Vec::new(),
            text: None,
            order: Order::ByKey,
            limit: 100,
            cursor: None,
        }
    }
}

impl Query {
    /// Adds an equality filter.
    pub fn eq(self, field: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.filter(field, Comparison::Eq, value)
    }

    /// Adds a filter.
    pub fn filter(
        mut self,
        field: impl Into<String>,
        comparison: Comparison,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.filters.push(Filter {
            field: field.into(),
            comparison,
            value: value.into(),
        });
        self
    }

    /// Searches the text fields for every word of `text`.
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// Orders by an indexed field.
    pub fn order_by(mut self, field: impl Into<String>, descending: bool) -> Self {
        self.order = Order::ByField {
            field: field.into(),
            descending,
        };
        self
    }

    /// Sets the page size.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Continues after the page that returned this cursor.
    pub fn after(mut self, cursor: Cursor) -> Self {
        self.cursor = Some(cursor);
        self
    }

    /// Checks the query against the collection's declaration: filters and ordering
    /// only on indexed fields, scalar filter values, text only where text fields
    /// exist, a cursor made for this order.
    pub fn validate(&self, spec: &CollectionSpec) -> Result<(), ViewError> {
        let indexed = |field: &str| -> Result<(), ViewError> {
            if spec.indexes.iter().any(|index| index == field) {
                Ok(())
            } else {
                Err(ViewError::NotIndexed {
                    collection: spec.name.clone(),
                    field: field.to_owned(),
                })
            }
        };
        for filter in &self.filters {
            indexed(&filter.field)?;
            if filter.value.is_array() || filter.value.is_object() || filter.value.is_null() {
                return Err(ViewError::InvalidQuery(format!(
                    "the filter on `{}` needs a string, number or boolean",
                    filter.field
                )));
            }
        }
        if let Order::ByField { field, .. } = &self.order {
            indexed(field)?;
        }
        if self.text.is_some() && spec.text_fields.is_empty() {
            return Err(ViewError::InvalidQuery(format!(
                "collection `{}` declares no text fields to search",
                spec.name
            )));
        }
        if self.limit == 0 {
            return Err(ViewError::InvalidQuery(
                "the limit must be at least 1".into(),
            ));
        }
        if let Some(cursor) = &self.cursor {
            cursor.decode(&self.order)?;
        }
        Ok(())
    }
}

/// Where a page stopped: opaque text to hand back for the next page.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cursor(String);

impl Cursor {
    /// The cursor a client sent back.
    pub fn from_text(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The text to hand to a client.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The cursor after a document with this sort value and key.
    pub fn encode(sort_value: Option<&serde_json::Value>, key: &str) -> Self {
        let pair = serde_json::json!([sort_value, key]);
        let text = pair.to_string();
        Self(text.bytes().map(|byte| format!("{byte:02x}")).collect())
    }

    /// The sort value (for [`Order::ByField`]) and key this cursor points after.
    pub fn decode(&self, order: &Order) -> Result<(Option<serde_json::Value>, String), ViewError> {
        let invalid = || ViewError::InvalidQuery(format!("`{}` is not a cursor", self.0));
        let bytes = (0..self.0.len())
            .step_by(2)
            .map(|at| {
                self.0
                    .get(at..at + 2)
                    .and_then(|pair| u8::from_str_radix(pair, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(invalid)?;
        let (sort_value, key): (serde_json::Value, String) =
            serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        match order {
            Order::ByKey if sort_value.is_null() => Ok((None, key)),
            Order::ByField { .. } => Ok((Some(sort_value), key)),
            Order::ByKey => Err(invalid()),
        }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One page of a query's results.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Page {
    /// The documents, with their keys, in the query's order.
    pub items: Vec<(String, Document)>,
    /// Where to continue; `None` on the last page.
    pub next: Option<Cursor>,
}

impl Page {
    /// A page of `items` (already cut to the query's limit), with a cursor after
    /// the last one when `more` rows followed.
    pub fn of(items: Vec<(String, Document)>, more: bool, order: &Order) -> Self {
        let next = items.last().filter(|_| more).map(|(key, document)| {
            let sort_value = match order {
                Order::ByKey => None,
                Order::ByField { field, .. } => field_value(document, field),
            };
            Cursor::encode(sort_value, key)
        });
        Page { items, next }
    }
}

/// Replaces each `{collection}` in a projection's SQL by that collection's table;
/// an unknown name or an unclosed brace is refused. Shared by the SQL backends.
pub fn substitute_tables(
    statement: &str,
    tables: &BTreeMap<String, String>,
) -> Result<String, ViewError> {
    let mut result = String::with_capacity(statement.len());
    let mut rest = statement;
    while let Some(open) = rest.find('{') {
        result.push_str(&rest[..open]);
        let close = rest[open..].find('}').ok_or_else(|| {
            ViewError::InvalidQuery("an unclosed `{` in the SQL: write `{collection}`".to_owned())
        })?;
        let name = &rest[open + 1..open + close];
        let table = tables
            .get(name)
            .ok_or_else(|| ViewError::UnknownCollection(name.to_owned()))?;
        result.push_str(table);
        rest = &rest[open + close + 1..];
    }
    result.push_str(rest);
    Ok(result)
}

/// A change a batch makes to a view.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Stores the document under the key, replacing any other.
    Put {
        /// The collection.
        collection: String,
        /// The key.
        key: String,
        /// The whole document as JSON text, encoded once by the projection's batch
        /// and stored as is.
        json: String,
    },
    /// Removes the document under the key, if any.
    Delete {
        /// The collection.
        collection: String,
        /// The key.
        key: String,
    },
    /// The escape hatch: a statement in the backend's own SQL, run in the batch's
    /// transaction after its document changes. `{collection}` in the text is
    /// replaced by the quoted table name of that collection's generation.
    Sql {
        /// The statement.
        statement: String,
        /// Its positional parameters.
        parameters: Vec<serde_json::Value>,
    },
}

impl Change {
    /// A put of `document` under `key`.
    pub fn put(collection: &str, key: &str, document: &Document) -> Self {
        Change::Put {
            collection: collection.to_owned(),
            key: key.to_owned(),
            json: document.to_string(),
        }
    }
}

/// An event a projection could not apply, kept with its error so the projection
/// can move on and an operator can retry or skip it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedEvent {
    /// The projection that parked it.
    pub projection: String,
    /// The generation that parked it: a rebuild starts with none parked, and its
    /// own replace the old ones when it is switched in.
    pub generation: u64,
    /// The event's global position.
    pub position: Position,
    /// The event's stream.
    pub stream: String,
    /// The event's type.
    pub event_type: String,
    /// The last error.
    pub error: String,
    /// How many times it was tried.
    pub attempts: u32,
    /// When it was (last) parked.
    pub parked_at: Timestamp,
    /// An operator asked for it to be tried again.
    pub retry_requested: bool,
}

/// One batch's effect on a projection's generation, committed atomically.
#[derive(Clone, Debug, PartialEq)]
pub struct ViewCommit {
    /// The projection.
    pub projection: String,
    /// The generation the changes go to (served, or being rebuilt).
    pub generation: u64,
    /// The generation's checkpoint when the batch started; the commit is refused if
    /// it has moved since.
    pub from: Position,
    /// The checkpoint after the batch.
    pub checkpoint: Position,
    /// Document changes, in the order they were made.
    pub changes: Vec<Change>,
    /// Events parked by this batch (new, or retried and failed again).
    pub parked: Vec<ParkedEvent>,
    /// Parked events of this generation that this batch applied: removed from the
    /// parked list.
    pub resolved: Vec<Position>,
    /// This batch completes a rebuild: its generation becomes the served one and the
    /// old one is dropped.
    pub switch: bool,
    /// Ids of events received from a broker that this batch applies. They are
    /// recorded in the same transaction, and a batch naming one already recorded
    /// for this projection is refused whole (`AlreadyReceived`), so a message
    /// redelivered after a crash between commit and acknowledgement has no effect.
    pub received: Vec<uuid::Uuid>,
}

impl ViewCommit {
    /// A batch on `generation` from `from` to `checkpoint`, with nothing else yet.
    pub fn new(projection: &str, generation: u64, from: Position, checkpoint: Position) -> Self {
        Self {
            projection: projection.to_owned(),
            generation,
            from,
            checkpoint,
            changes: Vec::new(),
            parked: Vec::new(),
            resolved: Vec::new(),
            switch: false,
            received: Vec::new(),
        }
    }
}

/// A rebuild in progress: the generation being filled and how far it has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildProgress {
    /// The new generation.
    pub generation: u64,
    /// Its checkpoint.
    pub position: Position,
}

/// What kind of handler a projection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerKind {
    /// Keeps views; can be rebuilt from position 0.
    Projection,
    /// Issues commands; never rebuilt, as that would replay its reactions.
    ProcessManager,
    /// Applies another service's events received from a broker; its position
    /// is in that service's log. Rebuilt by the broker delivering again, not
    /// from the local log.
    Inbound,
}

impl HandlerKind {
    /// Its name as view stores keep it.
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerKind::Projection => "projection",
            HandlerKind::ProcessManager => "process_manager",
            HandlerKind::Inbound => "inbound",
        }
    }

    /// The kind kept under `text`; a projection for anything unknown.
    pub fn from_stored(text: &str) -> Self {
        match text {
            "process_manager" => HandlerKind::ProcessManager,
            "inbound" => HandlerKind::Inbound,
            _ => HandlerKind::Projection,
        }
    }
}

/// A projection as it registers itself with a view store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declaration {
    /// Its name (see [`validate_name`]).
    pub name: String,
    /// What it is.
    pub kind: HandlerKind,
    /// The collections it owns.
    pub collections: Vec<CollectionSpec>,
}

impl Declaration {
    /// Checks the names of the projection and its collections.
    pub fn validate(&self) -> Result<(), ViewError> {
        // A partition's name is its projection's name with `.<k>of<n>`.
        validate_name("projection", crate::partition::projection_group(&self.name))?;
        self.collections
            .iter()
            .try_for_each(CollectionSpec::validate)
    }
}

/// What a view store keeps about one projection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionRecord {
    /// The projection's name.
    pub name: String,
    /// What it is.
    pub kind: HandlerKind,
    /// Its collections.
    pub collections: Vec<CollectionSpec>,
    /// The served generation.
    pub generation: u64,
    /// The served generation's checkpoint.
    pub position: Position,
    /// A rebuild under way, if any.
    pub rebuild: Option<RebuildProgress>,
    /// An operator asked for a rebuild that has not started yet.
    pub rebuild_requested: bool,
    /// Paused by an operator: the runner applies nothing until resumed.
    pub paused: bool,
    /// The error the runner is retrying, while it retries (the projection is stalled).
    pub stalled: Option<String>,
    /// How many events the served generation has parked.
    pub parked: u64,
}

/// An operator's request about a projection, recorded in the view store so that the
/// process running the projection picks it up, wherever the request came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Stop applying events until resumed.
    Pause,
    /// Apply events again.
    Resume,
    /// Rebuild into a new generation from position 0.
    Rebuild,
    /// Try a parked event of the served generation again.
    Retry(Position),
    /// Give up on a parked event of the served generation: remove it without
    /// applying it.
    Skip(Position),
}

/// Where views, checkpoints and parked events are stored.
///
/// Object safe, so runners and servers hold an `Arc<dyn ViewStore>`. The contract is
/// in the module documentation; `diptych_core::testkit::view_store_conformance!`
/// checks it.
#[async_trait]
pub trait ViewStore: Send + Sync + 'static {
    /// Declares a projection and its collections, creating what is missing; a new
    /// projection starts at generation 1, position 0. A collection already owned
    /// by another projection is refused. Returns the projection's record.
    /// `Control::Rebuild` is refused for process managers.
    async fn register(&self, declaration: &Declaration) -> Result<ProjectionRecord, ViewError>;

    /// The record of every registered projection, by name.
    async fn projections(&self) -> Result<Vec<ProjectionRecord>, ViewError>;

    /// One projection's record; `UnknownProjection` if it was never registered.
    async fn projection(&self, projection: &str) -> Result<ProjectionRecord, ViewError>;

    /// The projection that owns a collection.
    async fn owner_of(&self, collection: &str) -> Result<String, ViewError>;

    /// The served checkpoint of the projection that owns a collection: the
    /// position a read of it reflects (`X-Diptych-Position`). Backends may answer
    /// it in one round trip; the default asks for the owner, then its record.
    async fn served_position(&self, collection: &str) -> Result<Position, ViewError> {
        let owner = self.owner_of(collection).await?;
        group_position(self, &owner).await
    }

    /// A document of the served generation.
    async fn get(&self, collection: &str, key: &str) -> Result<Option<Document>, ViewError>;

    /// A document of a given generation (the runner's reads while it applies).
    async fn get_in(
        &self,
        collection: &str,
        generation: u64,
        key: &str,
    ) -> Result<Option<Document>, ViewError>;

    /// One page of a query over the served generation.
    async fn query(&self, collection: &str, query: &Query) -> Result<Page, ViewError>;

    /// Applies a batch atomically (see the module documentation).
    async fn commit(&self, commit: ViewCommit) -> Result<(), ViewError>;

    /// Starts a rebuild: creates the projection's collections in a new generation at
    /// position 0 and records it, or returns the rebuild already under way.
    async fn begin_rebuild(&self, projection: &str) -> Result<RebuildProgress, ViewError>;

    /// Records an operator's request.
    async fn control(&self, projection: &str, control: Control) -> Result<(), ViewError>;

    /// Records the error a runner keeps retrying, or clears it (`None`).
    async fn set_stalled(&self, projection: &str, error: Option<String>) -> Result<(), ViewError>;

    /// The parked events of a projection's served generation, oldest first.
    async fn parked(&self, projection: &str) -> Result<Vec<ParkedEvent>, ViewError>;

    /// Which of `event_ids` a commit of `projection` has already recorded as
    /// received (see [`ViewCommit::received`]).
    async fn received(
        &self,
        projection: &str,
        event_ids: &[uuid::Uuid],
    ) -> Result<Vec<uuid::Uuid>, ViewError>;

    /// The served generation's checkpoint, moved after each commit that advances it.
    fn checkpoint_watch(&self, projection: &str) -> watch::Receiver<Position>;

    /// Bumped after each [`ViewStore::control`] made through this instance, so a
    /// runner in the same process reacts at once.
    fn control_watch(&self) -> watch::Receiver<u64>;
}

/// The checkpoint watches of a view store's projections: backends keep one and
/// publish after each commit that moves a served checkpoint.
#[derive(Default)]
pub struct CheckpointWatches(Mutex<BTreeMap<String, watch::Sender<Position>>>);

impl CheckpointWatches {
    /// Moves the projection's watch to `position`.
    pub fn publish(&self, projection: &str, position: Position) {
        self.lock()
            .entry(projection.to_owned())
            .or_insert_with(|| watch::Sender::new(position))
            .send_replace(position);
    }

    /// A receiver of the projection's checkpoint. `current` reads the stored
    /// checkpoint, and is called only for the first watcher: commits keep the
    /// watch up to date after that.
    pub fn subscribe(
        &self,
        projection: &str,
        current: impl FnOnce() -> Position,
    ) -> watch::Receiver<Position> {
        self.lock()
            .entry(projection.to_owned())
            .or_insert_with(|| watch::Sender::new(current()))
            .subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, watch::Sender<Position>>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The position a projection's collections reflect: its checkpoint, or for a
/// partitioned projection the lowest of its partitions' (one not registered yet
/// has applied nothing).
pub async fn group_position<V: ViewStore + ?Sized>(
    views: &V,
    projection: &str,
) -> Result<Position, ViewError> {
    let mut lowest: Option<Position> = None;
    for member in crate::partition::group_members(projection) {
        let position = match views.projection(&member).await {
            Ok(record) => record.position,
            Err(ViewError::UnknownProjection(_)) => Position::START,
            Err(error) => return Err(error),
        };
        lowest = Some(lowest.map_or(position, |lowest| lowest.min(position)));
    }
    Ok(lowest.unwrap_or(Position::START))
}

/// A watch of the position a projection's collections reflect: its checkpoint,
/// or for a partitioned projection the lowest of its partitions' checkpoints
/// (moved by a task that follows every partition's watch).
pub fn group_watch(views: &dyn ViewStore, projection: &str) -> watch::Receiver<Position> {
    let members = crate::partition::group_members(projection);
    if members.len() == 1 {
        return views.checkpoint_watch(projection);
    }
    let mut watches: Vec<watch::Receiver<Position>> = members
        .iter()
        .map(|member| views.checkpoint_watch(member))
        .collect();
    let lowest = |watches: &mut [watch::Receiver<Position>]| {
        watches
            .iter_mut()
            .map(|watch| *watch.borrow_and_update())
            .min()
            .unwrap_or_default()
    };
    let (sender, receiver) = watch::channel(lowest(&mut watches));
    tokio::spawn(async move {
        loop {
            let changed = {
                let changes = watches.iter_mut().map(|watch| Box::pin(watch.changed()));
                futures_util::future::select_all(changes).await.0.is_ok()
            };
            if !changed || sender.is_closed() {
                return;
            }
            let position = lowest(&mut watches);
            sender.send_if_modified(|current| {
                let moved = position != *current;
                *current = position;
                moved
            });
        }
    });
    receiver
}

/// Whether two projection names may share collections: the same projection, or
/// partitions of one split the same number of ways. A projection split another
/// way (or not at all) would keep checkpoints of its own and apply every event
/// again, so it is refused.
pub fn same_owner(owner: &str, projection: &str) -> bool {
    use crate::partition::split_partition_name;
    match (
        split_partition_name(owner),
        split_partition_name(projection),
    ) {
        (Some((a, _, count_a)), Some((b, _, count_b))) => a == b && count_a == count_b,
        _ => owner == projection,
    }
}

/// Waits until `view` (a collection or a projection) has applied `position`, so a
/// client reads its own writes. Woken by the checkpoint watch when the projection
/// commits through the same view store; commits by another process on the same
/// views are seen by a re-read every [`STORED_CHECKPOINT_RECHECK`].
pub async fn wait_for(
    views: &dyn ViewStore,
    view: &str,
    position: Position,
    timeout: Duration,
) -> Result<Position, WaitError> {
    let projection = match views.owner_of(view).await {
        Ok(owner) => owner,
        Err(ViewError::UnknownCollection(_)) => {
            views
                .projection(view)
                .await
                .map_err(|_| WaitError::UnknownView(view.to_owned()))?
                .name
        }
        Err(other) => return Err(WaitError::View(other)),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    // A partitioned projection has applied `position` when each partition has.
    let mut reached = Position(u64::MAX);
    for member in crate::partition::group_members(&projection) {
        let member_reached =
            wait_for_projection(views, view, &member, position, deadline, timeout).await?;
        reached = reached.min(member_reached);
    }
    Ok(reached)
}

async fn wait_for_projection(
    views: &dyn ViewStore,
    view: &str,
    projection: &str,
    position: Position,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<Position, WaitError> {
    let mut watch = views.checkpoint_watch(projection);
    let mut reached = *watch.borrow_and_update();
    while reached < position {
        tokio::select! {
            changed = watch.changed() => {
                if changed.is_err() {
                    return Err(WaitError::View(ViewError::Backend(
                        crate::error::BackendError::msg("the view store was closed while waiting"),
                    )));
                }
                reached = reached.max(*watch.borrow_and_update());
            }
            // Commits made through this instance wake the watch at once; this
            // re-read catches those made by another process on the same views.
            _ = tokio::time::sleep(STORED_CHECKPOINT_RECHECK) => {
                let stored = match views.projection(projection).await {
                    Ok(record) => record.position,
                    // A partition no process has started yet.
                    Err(ViewError::UnknownProjection(_)) => Position::START,
                    Err(error) => return Err(error.into()),
                };
                reached = reached.max(stored);
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(WaitError::Timeout {
                    view: view.to_owned(),
                    position,
                    reached,
                    waited: timeout,
                });
            }
        }
    }
    Ok(reached)
}

/// How often [`wait_for`] re-reads the stored checkpoint, for commits made by
/// another process (those made through the same view store wake it at once).
pub const STORED_CHECKPOINT_RECHECK: Duration = Duration::from_millis(100);

/// Checks a batch against a projection's served generation, its rebuild
/// generation, and the checkpoint of the batch's generation.
pub fn verify_commit(
    commit: &ViewCommit,
    served: u64,
    rebuild: Option<u64>,
    checkpoint: Option<Position>,
) -> Result<(), ViewError> {
    // One id twice in a batch would be applied twice.
    let mut received = std::collections::HashSet::with_capacity(commit.received.len());
    if let Some(&event_id) = commit.received.iter().find(|&&id| !received.insert(id)) {
        return Err(ViewError::AlreadyReceived {
            projection: commit.projection.clone(),
            event_id,
        });
    }
    let live = commit.generation == served || Some(commit.generation) == rebuild;
    let Some(actual) = checkpoint.filter(|_| live) else {
        return Err(ViewError::NotPossible {
            projection: commit.projection.clone(),
            reason: format!(
                "generation {} is neither served nor being rebuilt (it was replaced)",
                commit.generation
            ),
        });
    };
    if actual != commit.from {
        return Err(ViewError::CheckpointMoved {
            projection: commit.projection.clone(),
            generation: commit.generation,
            expected: commit.from.0,
            actual: actual.0,
        });
    }
    if commit.switch && Some(commit.generation) != rebuild {
        return Err(ViewError::NotPossible {
            projection: commit.projection.clone(),
            reason: format!("generation {} is not being rebuilt", commit.generation),
        });
    }
    Ok(())
}

/// [`verify_commit`] against a projection's stored record: the batch's
/// generation must be the served one or the one being rebuilt, and start from
/// its checkpoint.
pub fn verify_commit_against(
    commit: &ViewCommit,
    record: &ProjectionRecord,
) -> Result<(), ViewError> {
    let rebuild = record.rebuild.map(|rebuild| rebuild.generation);
    let checkpoint = if commit.generation == record.generation {
        Some(record.position)
    } else {
        record
            .rebuild
            .filter(|rebuild| rebuild.generation == commit.generation)
            .map(|rebuild| rebuild.position)
    };
    verify_commit(commit, record.generation, rebuild, checkpoint)
}

/// Refuses a new declaration of a collection whose text fields differ from the
/// stored one: documents already stored are not indexed for new text fields (and
/// SQLite stores the two kinds of collection in tables of different shapes).
/// Indexes may change: backends build a new one over the documents already there.
pub fn check_redeclaration(
    projection: &str,
    stored: &CollectionSpec,
    declared: &CollectionSpec,
) -> Result<(), ViewError> {
    if stored.text_fields == declared.text_fields {
        return Ok(());
    }
    Err(ViewError::NotPossible {
        projection: projection.to_owned(),
        reason: format!(
            "collection `{}` has text fields {:?} and is now declared with {:?}; the documents \
             already stored are not indexed that way: keep the old text fields, or declare a \
             collection with a new name and rebuild the projection to fill it",
            declared.name, stored.text_fields, declared.text_fields
        ),
    })
}

/// Refuses a rebuild of a process manager, or of one partition of a projection
/// (its partitions share one generation of the collections).
pub fn refuse_process_manager(projection: &str, kind: HandlerKind) -> Result<(), ViewError> {
    if crate::partition::split_partition_name(projection).is_some() {
        return Err(ViewError::NotPossible {
            projection: projection.to_owned(),
            reason: "a partition of a projection is not rebuilt on its own: stop its \
                     processes, drop its collections and start them again to rebuild"
                .to_owned(),
        });
    }
    match kind {
        HandlerKind::Projection => Ok(()),
        HandlerKind::ProcessManager => Err(ViewError::NotPossible {
            projection: projection.to_owned(),
            reason: "a process manager is never rebuilt, as that would replay its commands"
                .to_owned(),
        }),
        HandlerKind::Inbound => Err(ViewError::NotPossible {
            projection: projection.to_owned(),
            reason: "an inbound projection is fed by a broker, not by this log: to rebuild it, \
                     stop it, drop its collections and its durable consumer, and start it again"
                .to_owned(),
        }),
    }
}

/// The error for a retry or skip of an event that is not parked.
pub fn no_parked_event(projection: &str, position: Position) -> ViewError {
    ViewError::NotPossible {
        projection: projection.to_owned(),
        reason: format!(
            "no event is parked at position {position}: `diptych projections parked` lists them"
        ),
    }
}

/// Reads a field (a dotted path) out of a document.
pub fn field_value<'a>(document: &'a Document, field: &str) -> Option<&'a serde_json::Value> {
    field
        .split('.')
        .try_fold(document, |value, segment| value.get(segment))
}

/// The words of a text, as full-text search splits them: runs of letters and
/// digits, lower-cased.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
}
