//! Nodes: a service's events relayed through a real broker (NATS, RabbitMQ) and
//! copied into another service's log by its node; wiring mistakes refused.

use std::time::{Duration, Instant};

use diptych::{
    Aggregate, Backend, CommandContext, Node, NodeConfig, NodeError, RejectionCode, Repository,
    Roles, Service, StreamId, StreamRead,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Default, Serialize, Deserialize)]
struct Tally {
    total: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum TallyEvent {
    Added { by: u64 },
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl RejectionCode for Never {
    fn code(&self) -> &'static str {
        "never"
    }
}

impl Aggregate for Tally {
    const KIND: &'static str = "tally";
    type Command = u64;
    type Event = TallyEvent;
    type Error = Never;

    fn decide(&self, by: &u64) -> Result<Vec<TallyEvent>, Never> {
        Ok(vec![TallyEvent::Added { by: *by }])
    }

    fn evolve(&mut self, TallyEvent::Added { by }: &TallyEvent) {
        self.total += by;
    }
}

#[derive(Deserialize)]
struct Add {
    tally_id: String,
    by: u64,
}
diptych::command!(
    Add,
    id = tally_id,
    aggregate = Tally,
    into = |add: Add| add.by
);

/// A node of `name` on a fresh SQLite directory; `copies` names the service
/// whose `tally` streams it keeps.
async fn node(
    name: &str,
    copies: Option<&str>,
    broker: &str,
    dir: &tempfile::TempDir,
) -> Result<Node, NodeError> {
    node_with(name, copies, broker, dir, Roles::ALL).await
}

/// A node of `name` with only `roles`.
async fn node_with(
    name: &str,
    copies: Option<&str>,
    broker: &str,
    dir: &tempfile::TempDir,
    roles: Roles,
) -> Result<Node, NodeError> {
    let stores = Node::open(&Backend::Sqlite(dir.path().to_owned())).await?;
    let mut builder = Service::builder(name)
        .aggregate(Repository::<Tally>::new(stores.store.clone()))
        .command::<Add>();
    if let Some(source) = copies {
        builder = builder.copies(source, ["tally"]);
    }
    let config = NodeConfig {
        broker: Some(broker.to_owned()),
        roles,
        ..NodeConfig::default()
    };
    Node::start(builder.build().unwrap(), stores, config).await
}

async fn copied_through(broker: &str) {
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let (source, sink) = (
        format!("source{}", &suffix[..8]),
        format!("sink{}", &suffix[..8]),
    );
    let (source_dir, sink_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sending = node(&source, None, broker, &source_dir).await.unwrap();
    // The receiving node has only the inbound role: copying is its own role.
    let inbound = Roles::parse(&["inbound"]).unwrap();
    let receiving = node_with(&sink, Some(&source), broker, &sink_dir, inbound)
        .await
        .unwrap();
    sending
        .service()
        .execute(
            "Add",
            json!({"tally_id": "t1", "by": 5}),
            &CommandContext::default(),
        )
        .await
        .unwrap();
    let stream = StreamId::new("tally-t1").unwrap();
    let copy = receiving.stores().store.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while copy.stream_version(&stream).await.unwrap() == 0 {
        assert!(
            Instant::now() < deadline,
            "no copy arrived through {broker}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let copied = copy
        .read_stream(StreamRead::forward(stream, 1, 10))
        .await
        .unwrap();
    assert_eq!(copied[0].payload, json!({"by": 5}));
    assert_eq!(copied[0].stream_version, 1);
    sending.stop().await;
    receiving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_copies_another_services_streams_through_nats() {
    copied_through(&diptych::nats::testing::test_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_copies_another_services_streams_through_rabbitmq() {
    copied_through(&diptych::rabbitmq::testing::test_url()).await;
}

#[tokio::test]
async fn a_broker_url_of_no_known_kind_is_refused_with_the_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let Err(error) = node("s", None, "kafka://127.0.0.1:9092", &dir).await else {
        panic!("a kafka:// broker was taken")
    };
    assert!(matches!(error, NodeError::Settings(_)));
    assert!(error.to_string().contains("nats://"), "{error}");
}

#[tokio::test]
async fn a_service_that_copies_streams_needs_a_broker() {
    let dir = tempfile::tempdir().unwrap();
    let stores = Node::open(&Backend::Sqlite(dir.path().to_owned()))
        .await
        .unwrap();
    let service = Service::builder("sink")
        .copies("source", ["tally"])
        .build()
        .unwrap();
    let Err(error) = Node::start(service, stores, NodeConfig::default()).await else {
        panic!("a node that copies streams started without a broker")
    };
    assert!(error.to_string().contains("--broker"), "{error}");
}

#[test]
fn roles_are_parsed_by_name_and_an_unknown_one_is_named() {
    let roles = Roles::parse(&["command", " query"]).unwrap();
    assert!(roles.command && roles.query && !roles.projector && !roles.inbound && !roles.relay);
    assert_eq!(roles.describe(), "command, query");
    let roles = Roles::parse(&["inbound", "relay"]).unwrap();
    assert!(roles.inbound && roles.relay && !roles.projector);
    assert_eq!(
        Roles::ALL.describe(),
        "command, query, projector, inbound, relay"
    );
    let error = Roles::parse(&["writer"]).unwrap_err();
    assert!(
        error.to_string().contains("unknown role `writer`"),
        "{error}"
    );
    assert!(Roles::parse::<&str>(&[]).is_err());
}

#[tokio::test]
async fn a_store_that_cannot_be_opened_says_where() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let Err(error) = Node::open(&Backend::Sqlite(file.path().to_owned())).await else {
        panic!("a file was opened as a directory")
    };
    assert!(
        error.to_string().contains("opening the event store"),
        "{error}"
    );
}
