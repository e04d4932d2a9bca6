//! Subscriptions: read the global log from a checkpoint, catch up, then follow live.
//!
//! A subscription pulls one page at a time, so memory is bounded by the page size
//! and a slow consumer simply reads later (back-pressure for free: nothing is pushed
//! at it). When it has read everything it waits on the store's head watch, which
//! the store moves after each commit, so a live subscriber wakes at once and never
//! polls.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::watch;

use crate::envelope::{Position, RecordedEvent};
use crate::error::{BackendError, ReadError};
use crate::store::EventStore;

/// How many events a subscription reads per round trip by default.
pub const DEFAULT_PAGE_SIZE: usize = 256;

/// A reader of the global log from a position onwards, catching up then live.
pub struct Subscription {
    store: Arc<dyn EventStore>,
    after: Position,
    page_size: usize,
    buffer: VecDeque<RecordedEvent>,
    head: watch::Receiver<Position>,
}

impl Subscription {
    /// Starts after `after` (use [`Position::START`] for the whole log).
    pub fn new(store: Arc<dyn EventStore>, after: Position) -> Self {
        Self::with_page_size(store, after, DEFAULT_PAGE_SIZE)
    }

    /// Starts after `after`, reading at most `page_size` events per round trip,
    /// which also bounds the events held in memory.
    pub fn with_page_size(store: Arc<dyn EventStore>, after: Position, page_size: usize) -> Self {
        let head = store.head_watch();
        Self {
            store,
            after,
            page_size: page_size.max(1),
            buffer: VecDeque::new(),
            head,
        }
    }

    /// The position of the last event handed out (the checkpoint to resume from).
    pub fn position(&self) -> Position {
        self.after
    }

    /// The next event, waiting for one to be committed if the log is read to its end.
    pub async fn next(&mut self) -> Result<RecordedEvent, ReadError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.after = event.position;
                return Ok(event);
            }
            self.fill().await?;
        }
    }

    /// All buffered events, or the next page once one is available: for consumers
    /// that apply events in batches.
    pub async fn next_batch(&mut self) -> Result<Vec<RecordedEvent>, ReadError> {
        if self.buffer.is_empty() {
            self.fill().await?;
        }
        let batch: Vec<RecordedEvent> = self.buffer.drain(..).collect();
        if let Some(last) = batch.last() {
            self.after = last.position;
        }
        Ok(batch)
    }

    /// Reads the next page into the buffer, waiting for a commit while there is none.
    async fn fill(&mut self) -> Result<(), ReadError> {
        let read_from = self
            .buffer
            .back()
            .map_or(self.after, |event| event.position);
        loop {
            // Mark the current head as seen before reading: a commit that lands after
            // the read then still changes the watch and wakes the wait below.
            self.head.borrow_and_update();
            let page = self.store.read_all(read_from, self.page_size).await?;
            if !page.is_empty() {
                self.buffer.extend(page);
                return Ok(());
            }
            if self.head.changed().await.is_err() {
                return Err(ReadError::Backend(BackendError::msg(
                    "the event store was closed while a subscription was waiting",
                )));
            }
        }
    }
}
