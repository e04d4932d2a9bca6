//! Partitioned projections: one projection split by stream into N partitions,
//! each with its own checkpoint, so several processes can apply it at once.
//!
//! Partition `k` of `n` applies the events of the streams that hash to `k` and
//! passes over the rest. Each partition is registered as a projection of its own,
//! named `<name>.<k>of<n>` (`orders.2of4`), sharing the collections of `<name>`;
//! a read's consistency token waits for every partition. Which process runs which
//! partition is up to a coordinator (the PostgreSQL backend's leases).
//!
//! A projection may be partitioned only when each of its documents is written by
//! the events of one stream (an order's view from the order's events, say):
//! partitions apply concurrently, so two partitions writing one document would
//! overwrite each other. A partition is never rebuilt on its own, and the number
//! of partitions is fixed once chosen: partitions split another way are refused
//! the collections (their checkpoints would start again from zero).

use std::sync::Arc;

use async_trait::async_trait;

use crate::envelope::{RecordedEvent, StreamId};
use crate::error::HandlerError;
use crate::projection::{Interest, Projection, ViewTx};
use crate::view::CollectionSpec;

/// The partition (0 to `count - 1`) a stream belongs to: FNV-1a of its id, so
/// every process and every version of diptych agrees.
pub fn stream_partition(stream: &StreamId, count: u32) -> u32 {
    let hash = stream
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    (hash % u64::from(count.max(1))) as u32
}

/// The projection name of partition `index` of `count`: `<name>.<index>of<count>`.
pub fn partition_name(name: &str, index: u32, count: u32) -> String {
    format!("{name}.{index}of{count}")
}

/// Splits a partition's name into its projection's name, index and count; `None`
/// for a name that is not a partition's.
pub fn split_partition_name(name: &str) -> Option<(&str, u32, u32)> {
    let (base, suffix) = name.rsplit_once('.')?;
    let (index, count) = suffix.split_once("of")?;
    let (index, count) = (index.parse().ok()?, count.parse().ok()?);
    (index < count).then_some((base, index, count))
}

/// The projection a name belongs to: the name itself, or a partition's base.
pub fn projection_group(name: &str) -> &str {
    split_partition_name(name).map_or(name, |(base, _, _)| base)
}

/// Every projection that serves the same collections as `name`: all partitions
/// when `name` is one, else `name` alone.
pub fn group_members(name: &str) -> Vec<String> {
    match split_partition_name(name) {
        Some((base, _, count)) => (0..count)
            .map(|index| partition_name(base, index, count))
            .collect(),
        None => vec![name.to_owned()],
    }
}

/// Partition `index` of `count` of a projection.
pub struct Partition {
    inner: Arc<dyn Projection>,
    name: String,
    index: u32,
    count: u32,
}

impl Partition {
    /// Partition `index` (0 to `count - 1`) of `inner`.
    pub fn new(inner: Arc<dyn Projection>, index: u32, count: u32) -> Self {
        Self {
            name: partition_name(inner.name(), index, count),
            inner,
            index,
            count,
        }
    }

    /// Every partition of `inner`, for a coordinator to hand out.
    pub fn all(inner: Arc<dyn Projection>, count: u32) -> Vec<Arc<dyn Projection>> {
        (0..count)
            .map(|index| {
                Arc::new(Self::new(Arc::clone(&inner), index, count)) as Arc<dyn Projection>
            })
            .collect()
    }

    /// Whether this partition applies events of `stream`.
    pub fn owns(&self, stream: &StreamId) -> bool {
        stream_partition(stream, self.count) == self.index
    }
}

#[async_trait]
impl Projection for Partition {
    fn name(&self) -> &str {
        &self.name
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        self.inner.collections()
    }

    fn interest(&self) -> Interest {
        self.inner.interest()
    }

    async fn apply(&self, event: &RecordedEvent, views: &mut ViewTx) -> Result<(), HandlerError> {
        if self.owns(&event.stream_id) {
            self.inner.apply(event, views).await
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip_and_plain_names_are_their_own_group() {
        let name = partition_name("orders", 2, 4);
        assert_eq!(name, "orders.2of4");
        assert_eq!(split_partition_name(&name), Some(("orders", 2, 4)));
        assert_eq!(projection_group(&name), "orders");
        assert_eq!(projection_group("orders"), "orders");
        assert_eq!(split_partition_name("orders.4of4"), None);
        assert_eq!(group_members("orders.1of2"), ["orders.0of2", "orders.1of2"]);
        assert_eq!(group_members("orders"), ["orders"]);
    }

    #[test]
    fn only_partitions_split_the_same_way_share_collections() {
        use crate::view::same_owner;
        assert!(same_owner("orders", "orders"));
        assert!(same_owner("orders.0of4", "orders.3of4"));
        assert!(!same_owner("orders.0of2", "orders.1of4"), "another split");
        assert!(!same_owner("orders", "orders.1of4"), "unsplit, then split");
        assert!(!same_owner("orders.0of4", "orders"), "split, then unsplit");
        assert!(!same_owner("orders.0of4", "customers.0of4"));
    }

    #[test]
    fn streams_spread_over_every_partition_and_always_land_in_the_same_one() {
        let mut seen = [0; 4];
        for n in 0..400 {
            let stream = StreamId::new(format!("order-{n}")).unwrap();
            let partition = stream_partition(&stream, 4);
            assert_eq!(partition, stream_partition(&stream, 4));
            seen[partition as usize] += 1;
        }
        assert!(seen.iter().all(|&count| count > 50), "{seen:?}");
    }
}
