//! The aggregate cache: states kept between commands, so a command on a warm
//! aggregate is a decision and an append, with no read before it.
//!
//! An entry is a state *at a version*. It is never trusted on its own: the
//! repository appends with that version as the expected one, so the store
//! either confirms it (the append succeeds) or refuses it (a conflict, after
//! which the repository reads only the events after the entry's version). A
//! decision that writes nothing (a rejection, an empty decision) is confirmed by
//! reading the stream's tail before it is returned. So a stale entry, left by
//! another process or another repository on the same store, costs one read and
//! never a wrong answer.
//!
//! A command *takes* its entry out of the cache and puts the new state back
//! after its append. Two commands on one aggregate at once therefore never share
//! a state (which would need `Clone` of every user's aggregate): the second finds
//! no entry and loads from the store, as it would have to after the first one's
//! append anyway.
//!
//! Bounded by entries: each shard holds at most its share, in two generations.
//! An entry put back goes to the young generation. Once the old generation has
//! emptied and the young one holds half the share, the young one turns old.
//! Nothing is evicted until the shard is full, so a working set smaller than
//! the capacity stays cached whole; then one old entry goes, one not used since
//! the last turn: close to least-recently-used, at the cost of two hash
//! look-ups and no list to keep.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Mutex;

use crate::envelope::{StreamId, Timestamp};

/// How many shards a cache is split into, so concurrent commands on different
/// aggregates rarely wait for the same lock.
const SHARDS: usize = 16;
/// The fewest entries a shard holds, when the capacity allows.
const MIN_SHARD: usize = 256;

/// A state at a version, as the store confirmed it at some point.
pub(crate) struct Cached<A> {
    pub(crate) state: A,
    pub(crate) version: u64,
    pub(crate) last_recorded_at: Option<Timestamp>,
}

/// States by stream, bounded; see the module documentation.
pub(crate) struct AggregateCache<A> {
    shards: Box<[Mutex<Shard<A>>]>,
    hasher: RandomState,
}

struct Shard<A> {
    young: HashMap<StreamId, Cached<A>>,
    old: HashMap<StreamId, Cached<A>>,
    /// The most entries the young generation holds before it turns old.
    generation: usize,
}

impl<A> AggregateCache<A> {
    /// A cache of at most `capacity` states (2 for a capacity of 1); `None`
    /// when `capacity` is 0.
    pub(crate) fn new(capacity: usize) -> Option<Self> {
        if capacity == 0 {
            return None;
        }
        // Each shard holds at most its share, so the whole never holds more
        // than `capacity` (rounded up per shard). A small cache has few shards:
        // hashing many keys into tiny shards would evict some while others
        // have room.
        let shards = (capacity / MIN_SHARD).clamp(1, SHARDS);
        let generation = (capacity / (shards * 2)).max(1);
        Some(Self {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        young: HashMap::new(),
                        old: HashMap::new(),
                        generation,
                    })
                })
                .collect(),
            hasher: RandomState::new(),
        })
    }

    /// Takes the entry of `stream` out of the cache, if there is one.
    pub(crate) fn take(&self, stream: &StreamId) -> Option<Cached<A>> {
        let mut shard = self.shard(stream);
        shard
            .young
            .remove(stream)
            .or_else(|| shard.old.remove(stream))
    }

    /// Puts a state back, unless the cache already holds a later version of it
    /// (a concurrent command on the same aggregate got there first).
    pub(crate) fn put(&self, stream: StreamId, entry: Cached<A>) {
        let mut shard = self.shard(&stream);
        let newer_held = shard
            .young
            .get(&stream)
            .or_else(|| shard.old.get(&stream))
            .is_some_and(|held| held.version >= entry.version);
        if newer_held {
            return;
        }
        shard.old.remove(&stream);
        let capacity = shard.generation * 2;
        if !shard.young.contains_key(&stream) {
            // A turn only once the old generation has emptied: entries still in
            // it were not used since the last turn, so they are the ones to go.
            if shard.old.is_empty() && shard.young.len() >= shard.generation {
                shard.old = std::mem::take(&mut shard.young);
            }
            if shard.young.len() + shard.old.len() >= capacity {
                if let Some(unused) = shard.old.keys().next().cloned() {
                    shard.old.remove(&unused);
                }
            }
        }
        shard.young.insert(stream, entry);
    }

    /// How many states are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                shard.young.len() + shard.old.len()
            })
            .sum()
    }

    fn shard(&self, stream: &StreamId) -> std::sync::MutexGuard<'_, Shard<A>> {
        let index = (self.hasher.hash_one(stream) % self.shards.len() as u64) as usize;
        // A panic while holding the lock leaves only whole entries behind (each
        // operation is a single map call), so a poisoned shard is still sound.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(n: usize) -> StreamId {
        StreamId::new(format!("counter-{n}")).unwrap()
    }

    fn at(version: u64) -> Cached<u64> {
        Cached {
            state: version * 10,
            version,
            last_recorded_at: None,
        }
    }

    #[test]
    fn a_taken_entry_is_gone_until_it_is_put_back() {
        let cache = AggregateCache::new(8).unwrap();
        cache.put(stream(1), at(3));
        assert_eq!(cache.take(&stream(1)).map(|entry| entry.version), Some(3));
        assert!(cache.take(&stream(1)).is_none());
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        let cache = AggregateCache::new(8).unwrap();
        cache.put(stream(1), at(5));
        cache.put(stream(1), at(4));
        assert_eq!(cache.take(&stream(1)).map(|entry| entry.state), Some(50));
        cache.put(stream(1), at(4));
        cache.put(stream(1), at(6));
        assert_eq!(cache.take(&stream(1)).map(|entry| entry.version), Some(6));
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity() {
        let cache = AggregateCache::new(100).unwrap();
        for n in 0..10_000 {
            cache.put(stream(n), at(1));
            assert!(cache.len() <= 100, "{} entries after {n}", cache.len());
        }
        // Each shard keeps at least one generation's worth after a turn.
        assert!(cache.len() >= 45, "a full cache keeps most of its capacity");
    }

    #[test]
    fn a_working_set_smaller_than_the_capacity_stays_cached_whole() {
        // One shard: more than half its capacity in use, less than all.
        let cache = AggregateCache::new(200).unwrap();
        for n in 0..150 {
            cache.put(stream(n), at(1));
        }
        // Visit the set over and over, in a different order each round, as
        // commands on many aggregates do.
        for round in 1..20 {
            for step in 0..150 {
                let n = (step * 7 + round * 13) % 150;
                let entry = cache
                    .take(&stream(n))
                    .unwrap_or_else(|| panic!("stream {n} was evicted in round {round}"));
                cache.put(stream(n), at(entry.version + 1));
            }
        }
        assert_eq!(cache.len(), 150);
    }

    #[test]
    fn entries_in_use_survive_while_unused_ones_are_evicted() {
        let cache = AggregateCache::new(64).unwrap();
        cache.put(stream(0), at(1));
        for n in 1..5_000 {
            // Stream 0 is used between every other insertion, as a hot
            // aggregate would be.
            let hot = cache
                .take(&stream(0))
                .expect("the hot entry must stay cached");
            cache.put(stream(0), hot);
            cache.put(stream(n), at(1));
        }
        assert!(cache.take(&stream(1)).is_none(), "a cold entry must go");
    }

    #[test]
    fn a_capacity_of_zero_is_no_cache() {
        assert!(AggregateCache::<u64>::new(0).is_none());
    }
}
