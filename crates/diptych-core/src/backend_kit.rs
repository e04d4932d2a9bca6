//! What the view-store backends share: the checks each runs the same way, so a
//! batch, a declaration or an operator's request is refused for the same reasons
//! on memory, SQLite and PostgreSQL, and the helpers for indexes, full-text
//! search, a projection's SQL, partitions and checkpoint watches. Backends take
//! these from here and from nowhere else in this crate; the conformance suites
//! (`testkit`) check that they keep the contract.

pub use crate::partition::{group_members, split_partition_name};
pub use crate::view::{
    CheckpointWatches, check_redeclaration, field_value, group_position, no_parked_event,
    refuse_process_manager, same_owner, substitute_tables, verify_commit, verify_commit_against,
    words,
};
