//! The view store and projection suite against the in-memory stores, the
//! reference models themselves.

use std::sync::Arc;

use diptych_core::testkit::ViewFixture;
use diptych_core::{MemoryStore, MemoryViews};

diptych_core::view_store_conformance!(|| async {
    ViewFixture::new(Arc::new(MemoryStore::new()), Arc::new(MemoryViews::new()))
});
