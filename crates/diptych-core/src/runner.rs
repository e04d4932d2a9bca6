//! The projection runner: catches a projection up from its checkpoint, then follows
//! the log live, one batch per transaction.
//!
//! Each batch's view changes and its checkpoint are committed together
//! ([`ViewStore::commit`]), so after a crash the runner resumes from a checkpoint
//! that matches the views exactly: every event's effect is applied once.
//!
//! The events of a batch are applied one after another; the effects they defer
//! ([`Projection::apply_deferred`]: a process manager's commands) then run
//! together, up to [`RunnerConfig::concurrent_effects`] at a time, in the order
//! their targets and sequences ask for. The batch commits only when every
//! event's effects succeeded: after a failure the batch's changes are undone back
//! to the first event whose effects failed, that event is retried alone, and the
//! events after it are applied again (their effects run again, which effects
//! allow: they are idempotent).
//!
//! An event the projection fails on (an error or a panic) is retried with
//! exponential backoff; while it retries the projection is *stalled*. After
//! [`RunnerConfig::max_attempts`] it is *parked* (kept with its error) and the batch
//! goes on. An operator can retry or skip parked events ([`crate::view::Control`]).
//!
//! A rebuild fills a new generation from position 0 in batches interleaved with
//! the live ones, so the served generation stays fresh; the batch that reaches the
//! served checkpoint switches generations in its own transaction.
//!
//! The runner also obeys requests recorded in the view store (pause, resume,
//! rebuild, retry), woken at once for those made in this process and checking every
//! [`RunnerConfig::control_poll`] for those made elsewhere (the CLI).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::envelope::{Position, RecordedEvent, Timestamp};
use crate::error::{BackendError, Error, HandlerError, ReadError, ViewError};
use crate::projection::{Deferred, Effect, Mark, Projection, ViewTx};
use crate::store::EventStore;
use crate::view::{
    Declaration, HandlerKind, ParkedEvent, ProjectionRecord, RebuildProgress, ViewCommit, ViewStore,
};

/// How a runner batches, retries and polls.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// The most events in one transaction.
    pub batch_size: usize,
    /// How many times an event is tried before it is parked.
    pub max_attempts: u32,
    /// The wait after the first failure; it doubles after each further one.
    pub first_backoff: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
    /// How often an idle runner looks for requests made by another process.
    pub control_poll: Duration,
    /// The most effects (a process manager's commands) of one batch running at
    /// once. Concurrent commands share the event store's group commit; the bound
    /// keeps a large batch from starting more loads and appends at once than the
    /// store has connections for.
    pub concurrent_effects: usize,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            max_attempts: 5,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            control_poll: Duration::from_millis(250),
            concurrent_effects: 64,
        }
    }
}

/// One thing a node runs on the log: a projection or a process manager, and
/// whether it may be split by stream across processes (see
/// [`crate::partition`]: only when each of its documents is written by one
/// stream's events).
#[derive(Clone)]
pub struct Handler {
    /// The projection (a process manager through [`crate::process::as_projection`]).
    pub projection: Arc<dyn Projection>,
    /// What it is.
    pub kind: HandlerKind,
    /// Whether it may run as several partitions.
    pub partitionable: bool,
}

impl Handler {
    /// Starts it in this process, whole.
    pub async fn spawn(
        &self,
        store: Arc<dyn EventStore>,
        views: Arc<dyn ViewStore>,
        config: RunnerConfig,
    ) -> Result<RunnerHandle, ViewError> {
        spawn_projection(
            store,
            views,
            Arc::clone(&self.projection),
            self.kind,
            config,
        )
        .await
    }
}

/// A running projection. Dropping it stops the runner after its current batch;
/// [`RunnerHandle::stop`] also waits for that.
#[must_use = "dropping the handle stops the runner"]
pub struct RunnerHandle {
    name: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunnerHandle {
    /// Whether its task has ended (stopped, or failed for good).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// The handle of a task that applies events under `name` (a projection
    /// runner, a relay, a broker consumer): the task stops after its current
    /// batch once `stop` says `true`, or when the sender is dropped.
    pub fn new(name: String, stop: watch::Sender<bool>, task: JoinHandle<()>) -> Self {
        Self { name, stop, task }
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops after the current batch (nothing half-applied is committed) and waits.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Registers `projection` with the view store (so its views can be queried and
/// waited on as soon as this returns) and starts its runner on the current tokio
/// runtime. Fails if the declaration is refused (a bad name, a collection another
/// projection owns).
pub async fn spawn_projection(
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    projection: Arc<dyn Projection>,
    kind: HandlerKind,
    config: RunnerConfig,
) -> Result<RunnerHandle, ViewError> {
    let name = projection.name().to_owned();
    let declaration = Declaration {
        name: name.clone(),
        kind,
        collections: projection.collections(),
    };
    views.register(&declaration).await?;
    let (stop, stop_rx) = watch::channel(false);
    let runner = Runner {
        declaration,
        store,
        views,
        projection,
        config,
        stop: stop_rx,
        read_ahead: BTreeMap::new(),
        failures: 0,
    };
    let task = tokio::spawn(runner.run());
    Ok(RunnerHandle { name, stop, task })
}

/// Why a batch did not commit.
enum Interrupted {
    /// Asked to stop: nothing is committed.
    Stopping,
    /// Reading the log or writing the views failed.
    Failed(Error),
}

impl From<Error> for Interrupted {
    fn from(error: Error) -> Self {
        Interrupted::Failed(error)
    }
}

impl From<ViewError> for Interrupted {
    fn from(error: ViewError) -> Self {
        Interrupted::Failed(error.into())
    }
}

struct Runner {
    declaration: Declaration,
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    projection: Arc<dyn Projection>,
    config: RunnerConfig,
    stop: watch::Receiver<bool>,
    /// The next batch of each generation, being read while the current one applies.
    read_ahead: BTreeMap<u64, ReadAhead>,
    /// Failures of the store or the views since the last commit, for backoff.
    failures: u32,
}

/// A batch being read ahead.
struct ReadAhead {
    from: Position,
    read: JoinHandle<Result<Vec<RecordedEvent>, ReadError>>,
}

impl Runner {
    async fn run(mut self) {
        loop {
            match self.run_until_failure().await {
                Ok(()) | Err(Interrupted::Stopping) => return,
                Err(Interrupted::Failed(error)) => {
                    // The store or the views failed (a full disk, a lost connection):
                    // keep the process alive, say so, and try again from the last
                    // commit.
                    self.failures += 1;
                    let message = error.to_string();
                    tracing::warn!(projection = %self.declaration.name, error = %message, "projection runner failed; retrying");
                    let _ = self
                        .views
                        .set_stalled(&self.declaration.name, Some(message))
                        .await;
                    if self.sleep(self.backoff(self.failures)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn run_until_failure(&mut self) -> Result<(), Interrupted> {
        let name = self.declaration.name.clone();
        self.views.register(&self.declaration).await?;
        let mut head = self.store.head_watch();
        let mut controls = self.views.control_watch();
        // The record is read again only when a request may have changed it (a
        // control in this process, the poll for other processes, a switch); in
        // between, the runner's own commits are all that move it, and it tracks
        // those itself. A live batch thus costs no extra read of the views.
        let mut known: Option<(ProjectionRecord, Instant)> = None;
        loop {
            if self.stopping() {
                return Ok(());
            }
            head.borrow_and_update();
            let stale = match &known {
                None => true,
                Some((_, read_at)) => {
                    controls.has_changed().unwrap_or(true)
                        || read_at.elapsed() >= self.config.control_poll
                }
            };
            if stale {
                controls.borrow_and_update();
                let record = self.views.projection(&name).await?;
                if record.stalled.is_some() {
                    self.views.set_stalled(&name, None).await?;
                }
                known = Some((record, Instant::now()));
            }
            let Some((record, _)) = known.as_mut() else {
                continue;
            };
            let mut worked = false;
            if !record.paused {
                // Retries are requests: look for them only with a fresh record.
                if stale && self.retry_requested(record).await? {
                    known = None;
                    continue;
                }
                if record.rebuild_requested && record.rebuild.is_none() {
                    record.rebuild = Some(self.views.begin_rebuild(&name).await?);
                    record.rebuild_requested = false;
                }
                let serving = self.step(record.generation, record.position, None).await?;
                worked |= serving != record.position;
                record.position = serving;
                if let Some(rebuild) = record.rebuild.as_mut() {
                    let reached = self
                        .step(rebuild.generation, rebuild.position, Some(serving))
                        .await?;
                    worked |= reached != rebuild.position;
                    rebuild.position = reached;
                    if reached >= serving {
                        // Switched: the served generation changed under the record.
                        known = None;
                    }
                }
            }
            let paused = known.as_ref().is_some_and(|(record, _)| record.paused);
            if !worked {
                tokio::select! {
                    _ = head.changed(), if !paused => {}
                    _ = controls.changed() => {}
                    _ = tokio::time::sleep(self.config.control_poll) => {}
                    _ = self.stop.changed() => {}
                }
            }
        }
    }

    /// Applies the next batch after `from` to `generation` and returns the new
    /// checkpoint. With `switch_at`, this is a rebuild: the batch that reaches the
    /// served checkpoint makes its generation the served one.
    async fn step(
        &mut self,
        generation: u64,
        from: Position,
        switch_at: Option<Position>,
    ) -> Result<Position, Interrupted> {
        let events = self.read_batch(generation, from).await?;
        let checkpoint = events.last().map_or(from, |event| event.position);
        let switch = switch_at.is_some_and(|served| checkpoint >= served);
        if events.is_empty() && !switch {
            return Ok(from);
        }
        let commit = self.apply(generation, from, &events, switch).await?;
        match self.views.commit(commit).await {
            Ok(()) => {}
            Err(error) if refused_for_its_content(&error) && events.len() > 1 => {
                // One event's changes (its SQL, say) make the store refuse the whole
                // batch: commit one event at a time to find it and park it.
                self.commit_one_by_one(generation, from, &events, switch)
                    .await?;
            }
            Err(error) if refused_for_its_content(&error) => {
                self.park_refused(generation, from, &events, switch, &error)
                    .await?;
            }
            Err(error) => return Err(error.into()),
        }
        self.failures = 0;
        Ok(checkpoint)
    }

    /// Applies `events` (those the projection wants) to a new batch from `from`.
    async fn apply(
        &mut self,
        generation: u64,
        from: Position,
        events: &[RecordedEvent],
        switch: bool,
    ) -> Result<ViewCommit, Interrupted> {
        let checkpoint = events.last().map_or(from, |event| event.position);
        let mut commit = ViewCommit::new(&self.declaration.name, generation, from, checkpoint);
        commit.switch = switch;
        let mut views = ViewTx::new(
            self.views.clone(),
            generation,
            &self.declaration.collections,
        );
        let interest = self.projection.interest();
        let wanted: Vec<&RecordedEvent> = events
            .iter()
            .filter(|event| interest.wants(event))
            .collect();
        let mut next = 0;
        while next < wanted.len() {
            let round = self.apply_round(&wanted[next..], &mut views).await;
            next += round.applied;
            if let Some(failure) = round.failure {
                // Everything from the failed event on is undone: the events after
                // it may have reacted to what it left, and are applied again in
                // the next round once it is settled.
                views.rollback_to(failure.mark);
                let event = wanted[next];
                if let Some(parked) = self
                    .retry_failed(generation, event, &mut views, failure.error)
                    .await?
                {
                    commit.parked.push(parked);
                }
                next += 1;
            }
        }
        commit.changes = views.into_changes();
        Ok(commit)
    }

    /// Applies `events` in order until one fails, then runs the effects of those
    /// applied. Reports how many were applied with all their effects, and the
    /// first that was not (failing itself, or in its effects) with the mark to
    /// undo the batch back to.
    async fn apply_round(&self, events: &[&RecordedEvent], views: &mut ViewTx) -> Round {
        let mut marks = Vec::with_capacity(events.len());
        let mut deferred = Vec::with_capacity(events.len());
        let mut failed_to_apply = None;
        // A panic here (in the projection's own code) is left for `apply` to
        // meet again and report; reading ahead is only an optimisation.
        let _ = AssertUnwindSafe(self.projection.prefetch(events, views))
            .catch_unwind()
            .await;
        for event in events {
            let mark = views.mark();
            match self.apply_deferred_once(event, views).await {
                Ok(effects) => {
                    marks.push(mark);
                    deferred.push(effects);
                }
                Err(error) => {
                    failed_to_apply = Some(Failure { mark, error });
                    break;
                }
            }
        }
        let applied = marks.len();
        match run_effects(deferred, self.config.concurrent_effects).await {
            Some((index, error)) => Round {
                applied: index,
                failure: Some(Failure {
                    mark: marks[index],
                    error,
                }),
            },
            None => Round {
                applied,
                failure: failed_to_apply,
            },
        }
    }

    /// Commits a refused batch one event per transaction, parking each event whose
    /// changes the store refuses.
    async fn commit_one_by_one(
        &mut self,
        generation: u64,
        from: Position,
        events: &[RecordedEvent],
        switch: bool,
    ) -> Result<(), Interrupted> {
        let mut at = from;
        for (index, event) in events.iter().enumerate() {
            let last = index + 1 == events.len();
            let one = std::slice::from_ref(event);
            let commit = self.apply(generation, at, one, switch && last).await?;
            match self.views.commit(commit).await {
                Ok(()) => {}
                Err(error) if refused_for_its_content(&error) => {
                    self.park_refused(generation, at, one, switch && last, &error)
                        .await?;
                }
                Err(error) => return Err(error.into()),
            }
            at = event.position;
        }
        Ok(())
    }

    /// Commits one event's checkpoint without its changes, which the store
    /// refused, parking the event with the store's reason.
    async fn park_refused(
        &mut self,
        generation: u64,
        from: Position,
        events: &[RecordedEvent],
        switch: bool,
        error: &ViewError,
    ) -> Result<(), Interrupted> {
        let Some(event) = events.last() else {
            return Ok(());
        };
        let mut commit = ViewCommit::new(&self.declaration.name, generation, from, event.position);
        commit.switch = switch;
        let reason = format!("the view store refused the event's changes: {error}");
        tracing::warn!(projection = %self.declaration.name, position = %event.position, error = %reason, "parking an event");
        commit
            .parked
            .push(self.parked(generation, event, reason, 1));
        self.views.commit(commit).await?;
        Ok(())
    }

    /// The batch after `from`: the one read ahead for this generation if it starts
    /// there, or a fresh read. After a full batch the next is read ahead, so while
    /// catching up, reading the log overlaps applying and committing.
    async fn read_batch(
        &mut self,
        generation: u64,
        from: Position,
    ) -> Result<Vec<RecordedEvent>, Interrupted> {
        let events = match self.read_ahead.remove(&generation) {
            Some(ahead) if ahead.from == from => ahead
                .read
                .await
                .map_err(|error| {
                    Error::from(BackendError::with_source("a read task failed", error))
                })?
                .map_err(Error::from)?,
            stale => {
                if let Some(stale) = stale {
                    stale.read.abort();
                }
                self.store
                    .read_all(from, self.config.batch_size)
                    .await
                    .map_err(Error::from)?
            }
        };
        if let Some(last) = events
            .last()
            .filter(|_| events.len() >= self.config.batch_size)
        {
            let (store, after, limit) = (self.store.clone(), last.position, self.config.batch_size);
            let read = tokio::spawn(async move { store.read_all(after, limit).await });
            self.read_ahead
                .insert(generation, ReadAhead { from: after, read });
        }
        Ok(events)
    }

    /// Retries an event whose first attempt failed with `error` (its changes
    /// undone), with backoff; the parked event if it kept failing.
    async fn retry_failed(
        &mut self,
        generation: u64,
        event: &RecordedEvent,
        views: &mut ViewTx,
        mut error: String,
    ) -> Result<Option<ParkedEvent>, Interrupted> {
        let mut attempts = 1;
        loop {
            if attempts >= self.config.max_attempts.max(1) {
                tracing::warn!(projection = %self.declaration.name, position = %event.position, error = %error, "parking an event that keeps failing");
                if attempts > 1 {
                    self.views.set_stalled(&self.declaration.name, None).await?;
                }
                return Ok(Some(self.parked(generation, event, error, attempts)));
            }
            if attempts == 1 {
                self.views
                    .set_stalled(
                        &self.declaration.name,
                        Some(format!("event at position {}: {error}", event.position)),
                    )
                    .await?;
            }
            self.sleep(self.backoff(attempts))
                .await
                .map_err(|()| Interrupted::Stopping)?;
            attempts += 1;
            // Alone, effects and all, as before effects were deferred.
            match self.apply_once(event, views).await {
                Ok(()) => {
                    self.views.set_stalled(&self.declaration.name, None).await?;
                    return Ok(None);
                }
                Err(again) => error = again,
            }
        }
    }

    /// Applies one event with its effects, undoing its changes if it fails or
    /// panics.
    async fn apply_once(&self, event: &RecordedEvent, views: &mut ViewTx) -> Result<(), String> {
        let mark = views.mark();
        let outcome = AssertUnwindSafe(self.projection.apply(event, views))
            .catch_unwind()
            .await;
        let error = match outcome {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => error.chain(),
            Err(panic) => format!("the handler panicked: {}", panic_message(&panic)),
        };
        views.rollback_to(mark);
        Err(error)
    }

    /// Applies one event's changes and returns its effects, undoing its changes
    /// if it fails or panics.
    async fn apply_deferred_once(
        &self,
        event: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<Deferred, String> {
        let mark = views.mark();
        let outcome = AssertUnwindSafe(self.projection.apply_deferred(event, views))
            .catch_unwind()
            .await;
        let error = match outcome {
            Ok(Ok(deferred)) => return Ok(deferred),
            Ok(Err(error)) => error.chain(),
            Err(panic) => format!("the handler panicked: {}", panic_message(&panic)),
        };
        views.rollback_to(mark);
        Err(error)
    }

    /// Tries the parked events an operator asked to retry, once each.
    async fn retry_requested(&mut self, record: &ProjectionRecord) -> Result<bool, Interrupted> {
        if record.parked == 0 {
            return Ok(false);
        }
        let parked = self.views.parked(&record.name).await?;
        let mut worked = false;
        for mut parked in parked.into_iter().filter(|parked| parked.retry_requested) {
            worked = true;
            let before = Position(parked.position.0.saturating_sub(1));
            let event = self
                .store
                .read_all(before, 1)
                .await
                .map_err(Error::from)?
                .into_iter()
                .find(|event| event.position == parked.position);
            let mut commit = ViewCommit::new(
                &record.name,
                record.generation,
                record.position,
                record.position,
            );
            let mut views = ViewTx::new(
                self.views.clone(),
                record.generation,
                &self.declaration.collections,
            );
            match event {
                Some(event) => match self.apply_once(&event, &mut views).await {
                    Ok(()) => commit.resolved.push(parked.position),
                    Err(error) => {
                        parked.error = error;
                        parked.attempts += 1;
                        parked.parked_at = Timestamp::now();
                        parked.retry_requested = false;
                        commit.parked.push(parked);
                    }
                },
                None => {
                    parked.error = "the event is no longer in the log".to_owned();
                    parked.retry_requested = false;
                    commit.parked.push(parked);
                }
            }
            commit.changes = views.into_changes();
            self.views.commit(commit).await?;
        }
        Ok(worked)
    }

    fn parked(
        &self,
        generation: u64,
        event: &RecordedEvent,
        error: String,
        attempts: u32,
    ) -> ParkedEvent {
        ParkedEvent {
            projection: self.declaration.name.clone(),
            generation,
            position: event.position,
            stream: event.stream_id.as_str().to_owned(),
            event_type: event.event_type.clone(),
            error,
            attempts,
            parked_at: Timestamp::now(),
            retry_requested: false,
        }
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(16);
        (self.config.first_backoff * 2u32.pow(doublings)).min(self.config.max_backoff)
    }

    /// Asked to stop, or the handle was dropped (which closes the channel).
    fn stopping(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// Sleeps, or returns `Err` at once when asked to stop.
    async fn sleep(&mut self, duration: Duration) -> Result<(), ()> {
        if self.stopping() {
            return Err(());
        }
        tokio::select! {
            _ = tokio::time::sleep(duration) => Ok(()),
            _ = self.stop.changed() => Err(()),
        }
    }
}

/// Whether the store refused a batch for what it holds (SQL that fails, a
/// document it cannot store) rather than for its own trouble (I/O, a lost
/// connection): such a batch fails the same way every time, so the event behind
/// it is parked instead of retried forever.
fn refused_for_its_content(error: &ViewError) -> bool {
    matches!(
        error,
        ViewError::InvalidQuery(_)
            | ViewError::Document { .. }
            | ViewError::UnknownCollection(_)
            | ViewError::Unsupported(_)
    )
}

/// What one round of [`Runner::apply_round`] did.
struct Round {
    /// How many events were applied with every effect.
    applied: usize,
    /// The event after those, which failed.
    failure: Option<Failure>,
}

/// An event that failed, to its projection or in its effects.
struct Failure {
    /// Where the batch stood before the event.
    mark: Mark,
    /// Why.
    error: String,
}

/// Runs the effects the events of a round deferred (`deferred[i]` is event
/// `i`'s), at most `concurrent` at a time, and returns the first event (in the
/// round's order) whose effects did not all succeed, with the first error among
/// them.
///
/// The effects form a graph, built in the order they were issued: an effect
/// waits for the previous effect with its target; an effect without a target
/// waits for every effect before it, and every effect after it waits for it;
/// and an event's effects wait for every effect of the last earlier event of
/// its sequence that had any (which waited for the ones before, and so on). An
/// effect starts once everything it waits for has succeeded, so an effect that
/// fails holds back every effect that waits on it, directly or not: none of
/// those runs. Every effect it holds back belongs to its own event or a later
/// one, so the events before the first failing one had all their effects run
/// and succeed, which is what lets the runner keep them. Effects already
/// started are always run to the end, never dropped halfway.
async fn run_effects(deferred: Vec<Deferred>, concurrent: usize) -> Option<(usize, String)> {
    let mut graph = EffectGraph::default();
    for (event, Deferred { sequence, effects }) in deferred.into_iter().enumerate() {
        graph.add_event(event, sequence, effects);
    }
    graph.run(concurrent.max(1)).await
}

/// The effects of a round and what each waits for, one entry per effect in
/// each of the first four vectors.
#[derive(Default)]
struct EffectGraph {
    /// The event each effect belongs to.
    events: Vec<usize>,
    /// What each runs, taken when it starts.
    runs: Vec<Option<BoxFuture<'static, Result<(), HandlerError>>>>,
    /// How many effects each still waits for.
    waiting_for: Vec<usize>,
    /// The effects that wait for each.
    waited_on_by: Vec<Vec<usize>>,
    /// The last effect of each target.
    last_of_target: HashMap<String, usize>,
    /// The last effect without a target.
    last_alone: Option<usize>,
    /// The effects added since that one.
    since_alone: Vec<usize>,
    /// The effects of the last event of each sequence that had any.
    last_of_sequence: HashMap<String, Vec<usize>>,
}

impl EffectGraph {
    fn add_event(&mut self, event: usize, sequence: Option<String>, effects: Vec<Effect>) {
        if effects.is_empty() {
            return;
        }
        let after_sequence = sequence
            .as_ref()
            .and_then(|sequence| self.last_of_sequence.get(sequence))
            .cloned()
            .unwrap_or_default();
        let mut added = Vec::with_capacity(effects.len());
        for effect in effects {
            let (target, run) = effect.into_parts();
            let id = self.events.len();
            let mut waits: BTreeSet<usize> = after_sequence.iter().copied().collect();
            waits.extend(self.last_alone);
            match target {
                None => {
                    waits.extend(self.since_alone.drain(..));
                    self.last_alone = Some(id);
                }
                Some(target) => {
                    waits.extend(self.last_of_target.insert(target, id));
                    self.since_alone.push(id);
                }
            }
            self.events.push(event);
            self.runs.push(Some(run));
            self.waiting_for.push(waits.len());
            self.waited_on_by.push(Vec::new());
            for waited in waits {
                self.waited_on_by[waited].push(id);
            }
            added.push(id);
        }
        if let Some(sequence) = sequence {
            self.last_of_sequence.insert(sequence, added);
        }
    }

    async fn run(mut self, concurrent: usize) -> Option<(usize, String)> {
        // Started in the order issued, so the earliest events settle first.
        let mut ready: VecDeque<usize> = (0..self.events.len())
            .filter(|&id| self.waiting_for[id] == 0)
            .collect();
        let mut running = FuturesUnordered::new();
        let mut first_failure: Option<(usize, String)> = None;
        loop {
            while running.len() < concurrent {
                let Some(id) = ready.pop_front() else { break };
                let Some(run) = self.runs[id].take() else {
                    continue;
                };
                running.push(async move {
                    let outcome = AssertUnwindSafe(run).catch_unwind().await;
                    (id, outcome)
                });
            }
            let Some((id, outcome)) = running.next().await else {
                break;
            };
            let error = match outcome {
                Ok(Ok(())) => {
                    for &next in &self.waited_on_by[id] {
                        self.waiting_for[next] -= 1;
                        if self.waiting_for[next] == 0 {
                            ready.push_back(next);
                        }
                    }
                    continue;
                }
                Ok(Err(error)) => error.chain(),
                Err(panic) => format!("the handler panicked: {}", panic_message(&panic)),
            };
            let event = self.events[id];
            if first_failure
                .as_ref()
                .is_none_or(|(first, _)| event < *first)
            {
                first_failure = Some((event, error));
            }
        }
        first_failure
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// Where a projection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProjectionState {
    /// Behind the head by more than [`LIVE_WITHIN`].
    CatchingUp,
    /// Applying events as they come.
    Live,
    /// Retrying an event (or the views) that keeps failing.
    Stalled,
    /// Filling a new generation beside the served one.
    Rebuilding,
    /// Paused by an operator.
    Paused,
}

/// A projection whose oldest unapplied event is younger than this is live.
pub const LIVE_WITHIN: Duration = Duration::from_secs(1);

/// A projection's position, lag and state, for operators.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// What it is.
    pub kind: HandlerKind,
    /// Its served checkpoint.
    pub position: Position,
    /// The log's head.
    pub head: Position,
    /// How many events it is behind.
    pub lag_events: u64,
    /// How long ago the oldest event it has not applied was recorded (0 when
    /// caught up).
    pub lag_ms: u64,
    /// Its state.
    pub state: ProjectionState,
    /// How many events are parked.
    pub parked: u64,
    /// A rebuild under way.
    pub rebuild: Option<RebuildProgress>,
    /// The error it keeps retrying, when stalled.
    pub stalled: Option<String>,
    /// For an inbound projection whose consumer runs in this process: what
    /// it received. Its position is then in the source's log, its head is
    /// unknown here, and its lag is what the broker still holds for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received: Option<crate::inbound::InboundStats>,
}

/// The status of every projection in `views`, measured against `store`'s head.
pub async fn projection_status(
    store: &dyn EventStore,
    views: &dyn ViewStore,
) -> Result<Vec<ProjectionStatus>, Error> {
    let head = store.head().await?;
    let mut statuses = Vec::new();
    for record in views.projections().await? {
        if record.kind == HandlerKind::Inbound {
            statuses.push(inbound_status(views, record));
            continue;
        }
        let oldest_unapplied = store.read_all(record.position, 1).await?.into_iter().next();
        let lag_ms = oldest_unapplied.map_or(0, |event| {
            let age_us = Timestamp::now().as_unix_micros() - event.recorded_at.as_unix_micros();
            u64::try_from(age_us / 1000).unwrap_or(0)
        });
        let lag_events = store.events_after(record.position, head).await?;
        statuses.push(status_of(record, head, lag_events, lag_ms, None));
    }
    Ok(statuses)
}

/// An inbound projection's status, from what its consumer in this process saw:
/// its position is in the source's log, so its head is unknown here and its
/// lag is what the broker still holds for it.
fn inbound_status(views: &dyn ViewStore, record: ProjectionRecord) -> ProjectionStatus {
    // The lag is known where the consumer runs; a stall, everywhere.
    let received = crate::inbound::inbound_stats(views, &record.name);
    let (lag_events, lag_ms) = received
        .as_ref()
        .map_or((0, 0), |stats| (stats.pending, stats.lag_ms()));
    let head = record.position;
    status_of(record, head, lag_events, lag_ms, received)
}

fn status_of(
    record: ProjectionRecord,
    head: Position,
    lag_events: u64,
    lag_ms: u64,
    received: Option<crate::inbound::InboundStats>,
) -> ProjectionStatus {
    let state = if record.paused {
        ProjectionState::Paused
    } else if record.stalled.is_some() {
        ProjectionState::Stalled
    } else if record.rebuild.is_some() || record.rebuild_requested {
        ProjectionState::Rebuilding
    } else if Duration::from_millis(lag_ms) >= LIVE_WITHIN {
        ProjectionState::CatchingUp
    } else {
        ProjectionState::Live
    };
    ProjectionStatus {
        name: record.name,
        kind: record.kind,
        position: record.position,
        head,
        lag_events,
        lag_ms,
        state,
        parked: record.parked,
        rebuild: record.rebuild,
        stalled: record.stalled,
        received,
    }
}
