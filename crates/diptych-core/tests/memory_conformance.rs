//! The conformance suite against the in-memory store, the reference model itself:
//! proof that the suite's checks hold for a store known to keep the contract, so a
//! failure on another backend points at that backend.

use std::sync::Arc;

use diptych_core::MemoryStore;
use diptych_core::testkit::Fixture;

diptych_core::event_store_conformance!(|| async { Fixture::new(Arc::new(MemoryStore::new())) });
