//! Copies of another service's streams: each received event lands once, at its
//! version and with its id, whatever is redelivered or interrupted; a gap or a
//! locally written stream is refused; the relay publishes only its own events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use diptych_core::{
    AppendRequest, BackendError, EventStore, ExpectedVersion, InboundProjection, MemoryStore,
    MemoryViews, NewEvent, Position, Projection, Publisher, RecordedEvent, RelayConfig,
    StreamCopies, StreamId, ViewStore, ViewTx, is_copy, spawn_relay,
};
use serde_json::json;

async fn append(store: &dyn EventStore, stream: &str, event_type: &str) {
    store
        .append(AppendRequest {
            stream: StreamId::new(stream).unwrap(),
            expected: ExpectedVersion::Any,
            events: vec![NewEvent::new(event_type, json!({ "stream": stream }))],
            idempotency_key: None,
        })
        .await
        .unwrap();
}

/// A catalog log of three products, with a customer stream ordering has no use for.
async fn catalog() -> MemoryStore {
    let catalog = MemoryStore::new();
    append(&catalog, "product-a", "ProductAdded").await;
    append(&catalog, "customer-x", "CustomerRegistered").await;
    append(&catalog, "product-b", "ProductAdded").await;
    append(&catalog, "product-a", "ProductRenamed").await;
    append(&catalog, "product-a", "PriceChanged").await;
    catalog
}

async fn log(store: &dyn EventStore) -> Vec<RecordedEvent> {
    store.read_all(Position::START, 1000).await.unwrap()
}

fn copier(local: &Arc<MemoryStore>) -> Arc<StreamCopies> {
    let store: Arc<dyn EventStore> = local.clone();
    Arc::new(StreamCopies::new(store, "catalog", ["product"]))
}

#[tokio::test]
async fn received_events_are_copied_once_at_their_versions() {
    let source = log(&catalog().await).await;
    let local = Arc::new(MemoryStore::new());
    append(&*local, "order-1", "OrderPlaced").await;
    let views: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
    let mut inbound = InboundProjection::register(views.clone(), copier(&local))
        .await
        .unwrap();

    let first = inbound.apply(&source[..3]).await.unwrap();
    assert_eq!(first.applied, 3);
    // The whole log again, as a redelivery after a lost acknowledgement.
    let again = inbound.apply(&source).await.unwrap();
    assert_eq!((again.applied, again.redelivered), (2, 3));

    let copied: Vec<_> = log(&*local)
        .await
        .into_iter()
        .filter(|event| event.stream_id.category() == "product")
        .collect();
    let expected: Vec<_> = source
        .iter()
        .filter(|event| event.stream_id.category() == "product")
        .collect();
    assert_eq!(copied.len(), expected.len());
    for (copy, original) in copied.iter().zip(expected) {
        assert_eq!(copy.event_id, original.event_id);
        assert_eq!(copy.stream_id, original.stream_id);
        assert_eq!(copy.stream_version, original.stream_version);
        assert_eq!(copy.payload, original.payload);
        assert!(is_copy(copy));
        assert_eq!(
            copy.metadata.extra["copied_from"],
            format!("catalog@{}", original.position)
        );
    }
    assert!(
        local
            .stream_version(&StreamId::new("customer-x").unwrap())
            .await
            .unwrap()
            == 0,
        "a category not asked for is not copied"
    );
    // The checkpoint is the source's position: a catalog token can be waited on.
    let record = views.projection("copies-catalog").await.unwrap();
    assert_eq!(record.position, source.last().unwrap().position);
}

#[tokio::test]
async fn an_event_copied_before_a_crash_is_not_copied_again() {
    let source = log(&catalog().await).await;
    let local = Arc::new(MemoryStore::new());
    let copies = copier(&local);
    let views: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
    // The copy was appended, then the process died before recording it received.
    let mut scratch = ViewTx::new(views.clone(), 1, &[]);
    copies.apply(&source[0], &mut scratch).await.unwrap();

    let mut inbound = InboundProjection::register(views, copies).await.unwrap();
    inbound.apply(&source).await.unwrap();
    let product_a = local
        .stream_version(&StreamId::new("product-a").unwrap())
        .await
        .unwrap();
    assert_eq!(product_a, 3, "product-a holds its three events once");
}

#[tokio::test]
async fn a_missing_event_is_refused_until_it_arrives() {
    let source = log(&catalog().await).await;
    let local = Arc::new(MemoryStore::new());
    let views: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
    let mut inbound = InboundProjection::register(views, copier(&local))
        .await
        .unwrap();
    // product-a's second event without its first.
    let error = inbound.apply(&source[3..4]).await.unwrap_err();
    let message = format!("{error:#}") + &format!("{:?}", error);
    assert!(
        message.contains("has not arrived"),
        "the error says an earlier event is missing: {message}"
    );
    assert_eq!(log(&*local).await.len(), 0, "nothing was copied");
    inbound.apply(&source).await.unwrap();
    assert_eq!(log(&*local).await.len(), 4);
}

#[tokio::test]
async fn a_stream_written_locally_is_not_overwritten() {
    let source = log(&catalog().await).await;
    let local = Arc::new(MemoryStore::new());
    append(&*local, "product-a", "ProductAdded").await;
    let views: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
    let mut inbound = InboundProjection::register(views, copier(&local))
        .await
        .unwrap();
    let error = inbound.apply(&source[..1]).await.unwrap_err();
    let message = format!("{:?}", error);
    assert!(
        message.contains("written locally"),
        "the error says the stream was written here: {message}"
    );
}

/// Records what it is asked to publish.
#[derive(Default)]
struct Recorder(Mutex<Vec<RecordedEvent>>);

#[async_trait]
impl Publisher for Recorder {
    fn name(&self) -> &str {
        "relay-recorder"
    }

    async fn publish(&self, events: &[RecordedEvent]) -> Result<(), BackendError> {
        self.0.lock().unwrap().extend_from_slice(events);
        Ok(())
    }
}

#[tokio::test]
async fn the_relay_publishes_only_the_services_own_events() {
    let source = log(&catalog().await).await;
    let local = Arc::new(MemoryStore::new());
    let views: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
    append(&*local, "order-1", "OrderPlaced").await;
    InboundProjection::register(views.clone(), copier(&local))
        .await
        .unwrap()
        .apply(&source)
        .await
        .unwrap();
    append(&*local, "order-1", "OrderConfirmed").await;
    let head = local.head().await.unwrap();

    let recorder = Arc::new(Recorder::default());
    let relay = spawn_relay(
        local.clone(),
        views.clone(),
        recorder.clone(),
        RelayConfig::default(),
    )
    .await
    .unwrap();
    let mut watch = views.checkpoint_watch("relay-recorder");
    tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|p| *p >= head))
        .await
        .expect("the relay passed the copies")
        .unwrap();
    relay.stop().await;
    let published: Vec<String> = recorder
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|event| event.event_type.clone())
        .collect();
    assert_eq!(published, ["OrderPlaced", "OrderConfirmed"]);
}

#[tokio::test]
async fn an_event_twice_in_one_batch_changes_a_view_once() {
    let source = MemoryStore::new();
    diptych_core::testkit::append_tallies(&source, &mut 0, 2, 2).await;
    let events = log(&source).await;
    let views: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
    let mut inbound = InboundProjection::register(
        views.clone(),
        Arc::new(diptych_core::testkit::Tallies::default()),
    )
    .await
    .unwrap();
    let doubled = [events[0].clone(), events[1].clone(), events[0].clone()];
    inbound.apply(&doubled).await.unwrap();
    let counted = diptych_core::testkit::dump_collection(&*views, "tallies").await;
    let once = {
        let clean: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
        let mut clean_inbound = InboundProjection::register(
            clean.clone(),
            Arc::new(diptych_core::testkit::Tallies::default()),
        )
        .await
        .unwrap();
        clean_inbound.apply(&events).await.unwrap();
        diptych_core::testkit::dump_collection(&*clean, "tallies").await
    };
    assert_eq!(counted, once, "the repeated event counted once");
}

#[tokio::test]
async fn an_event_twice_in_one_batch_is_applied_once() {
    let source = log(&catalog().await).await;
    let local = Arc::new(MemoryStore::new());
    let views: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
    let mut inbound = InboundProjection::register(views, copier(&local))
        .await
        .unwrap();
    // Republished after the broker's duplicate window: the same event again
    // within one batch.
    let batch = [source[0].clone(), source[1].clone(), source[0].clone()];
    let received = inbound.apply(&batch).await.unwrap();
    assert_eq!((received.applied, received.redelivered), (2, 1));
    assert_eq!(log(&*local).await.len(), 1, "product-a's first event, once");
}

#[tokio::test]
async fn an_inbound_projection_reports_what_it_received_and_a_failure_as_stalled() {
    let source = log(&catalog().await).await;
    let local = Arc::new(MemoryStore::new());
    let views: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
    let mut inbound = InboundProjection::register(views.clone(), copier(&local))
        .await
        .unwrap();
    let status = |views: Arc<dyn ViewStore>, local: Arc<MemoryStore>| async move {
        diptych_core::projection_status(&*local, &*views)
            .await
            .unwrap()
            .into_iter()
            .find(|status| status.name == "copies-catalog")
            .unwrap()
    };

    inbound.apply(&source[..2]).await.unwrap();
    inbound.apply(&source[..2]).await.unwrap();
    inbound.report_pending(3);
    let seen = status(views.clone(), local.clone()).await;
    assert_eq!(seen.kind, diptych_core::HandlerKind::Inbound);
    assert_eq!(
        seen.position, source[1].position,
        "a position in the source's log"
    );
    assert_eq!(seen.lag_events, 3, "what the broker still holds");
    let received = seen.received.expect("what the consumer saw");
    assert_eq!((received.received, received.redelivered), (4, 2));

    // A gap: retried and reported, the projection shows as stalled with why.
    let error = inbound.apply(&source[4..]).await.unwrap_err();
    inbound.report_failure(&error).await;
    let stalled = status(views.clone(), local.clone()).await;
    assert_eq!(stalled.state, diptych_core::ProjectionState::Stalled);
    assert!(stalled.stalled.is_some_and(|why| why.contains("applying")));
    // Once a batch goes through, it is not stalled any more.
    inbound.apply(&source).await.unwrap();
    let recovered = status(views, local).await;
    assert_ne!(recovered.state, diptych_core::ProjectionState::Stalled);
}
