//! Turns: one command at a time per aggregate within a repository.
//!
//! Commands on one aggregate cannot both append at the same version: all but
//! one would conflict, read the winner's events and decide again, and under
//! enough writers some run out of attempts. Within one process that work is
//! wasted, so a command waits for its turn on its aggregate (first come, first
//! served) and then decides from the state the previous command left in the
//! cache, which the store confirms with the next append. Commands on different
//! aggregates never wait for each other; other processes still race through
//! the store's version check, which stays the only guarantee.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as TurnLock, OwnedMutexGuard};

use crate::envelope::StreamId;

/// Shards of the table of aggregates with a command in progress.
const SHARDS: usize = 16;

/// The aggregates with a command in progress, each with a queue of the
/// commands waiting for it.
#[derive(Default)]
pub(crate) struct Turns {
    shards: [Mutex<HashMap<StreamId, Arc<TurnLock<()>>>>; SHARDS],
    hasher: RandomState,
}

/// The turn of one command on one aggregate; the next command's starts when
/// it is dropped.
pub(crate) struct Turn {
    turns: Arc<Turns>,
    stream: StreamId,
    lock: Option<OwnedMutexGuard<()>>,
}

impl Turns {
    /// Waits until no other command of this repository is in progress on
    /// `stream`.
    pub(crate) async fn wait(self: &Arc<Self>, stream: &StreamId) -> Turn {
        let lock = {
            let mut shard = self.shard(stream);
            Arc::clone(shard.entry(stream.clone()).or_default())
        };
        Turn {
            turns: Arc::clone(self),
            stream: stream.clone(),
            lock: Some(lock.lock_owned().await),
        }
    }

    /// How many aggregates have a command in progress or waiting.
    #[cfg(test)]
    fn busy(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().map_or(0, |shard| shard.len()))
            .sum()
    }

    fn shard(
        &self,
        stream: &StreamId,
    ) -> std::sync::MutexGuard<'_, HashMap<StreamId, Arc<TurnLock<()>>>> {
        let index = (self.hasher.hash_one(stream) % SHARDS as u64) as usize;
        // Each operation under the lock is a single map call, so a poisoned
        // shard holds no half-made change.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.lock.take());
        let mut shard = self.turns.shard(&self.stream);
        // Only the table holds the lock now: nobody is waiting, so the entry
        // goes and the table holds only aggregates in use. A command that
        // cloned the lock holds a second count, and the entry stays for it.
        if shard
            .get(&self.stream)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            shard.remove(&self.stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(name: &str) -> StreamId {
        StreamId::new(name).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn commands_on_one_aggregate_take_turns_and_others_do_not_wait() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let turns = Arc::new(Turns::default());
        let in_turn = Arc::new(AtomicUsize::new(0));
        let most_at_once = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (turns, in_turn, most_at_once) = (
                Arc::clone(&turns),
                Arc::clone(&in_turn),
                Arc::clone(&most_at_once),
            );
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    let turn = turns.wait(&stream("order-hot")).await;
                    let now = in_turn.fetch_add(1, Ordering::SeqCst) + 1;
                    most_at_once.fetch_max(now, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    in_turn.fetch_sub(1, Ordering::SeqCst);
                    drop(turn);
                }
            }));
        }
        // While the hot aggregate is busy, another one gets its turn at once.
        let held = turns.wait(&stream("order-hot")).await;
        drop(turns.wait(&stream("order-other")).await);
        drop(held);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(most_at_once.load(Ordering::SeqCst), 1);
        assert_eq!(turns.busy(), 0, "finished turns leave nothing behind");
    }

    #[tokio::test]
    async fn the_table_holds_only_aggregates_in_use() {
        let turns = Arc::new(Turns::default());
        for n in 0..1000 {
            drop(turns.wait(&stream(&format!("order-{n}"))).await);
        }
        assert_eq!(turns.busy(), 0);
    }
}
