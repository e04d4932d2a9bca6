//! A node: one process running a [`Service`] with the roles it is given, on
//! SQLite or PostgreSQL, with the HTTP API, the service's handlers (under leases
//! and in partitions on PostgreSQL), the relay of its log to NATS or RabbitMQ, the
//! consumers that copy other services' streams into it, and a graceful stop.
//!
//! ```no_run
//! # async fn run(service: diptych::Service) -> Result<(), diptych::NodeError> {
//! use diptych::{Backend, Node, NodeConfig};
//!
//! let stores = Node::open(&Backend::Sqlite("data".into())).await?;
//! let node = Node::start(service, stores, NodeConfig::default()).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.unwrap();
//! let router = node.router(); // .merge(routes of the application's own)
//! node.serve(listener, router, tokio::signal::ctrl_c()).await
//! # }
//! ```
//!
//! What a node runs, by role: `command` takes `POST /commands/…`; `query` serves
//! views, streams and the log; `projector` runs the service's projections and
//! process managers; `inbound` applies copies of other services' streams from
//! the broker; `relay` publishes the log to the broker. A node without a role answers its routes
//! with 421 and says where to go, so several nodes can share one PostgreSQL
//! database, each with some roles.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use diptych_core::Projection;
use diptych_core::{
    BackendError, EventStore, RelayConfig, RunnerConfig, RunnerHandle, StreamCopies, ViewStore,
    spawn_relay,
};
use diptych_http::{AppState, Auth, HttpConfig, app};
use diptych_nats::{InboundConfig, NatsConfig, NatsPublisher, spawn_inbound};
use diptych_postgres::{LeaseConfig, PartitionedRunner, PgConfig, PgLeases, PgStore, PgViews};
use diptych_rabbitmq::{AmqpInboundConfig, AmqpPublisher, spawn_amqp_inbound};
use diptych_sqlite::{SqliteStore, SqliteViews};

use crate::Service;

/// Why a node could not start or serve; the message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The settings do not fit together.
    #[error("{0}")]
    Settings(String),
    /// Something the node needs failed.
    #[error("{what}: {source}")]
    Failed {
        /// What it was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl NodeError {
    fn failed(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        NodeError::Failed {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// Where a node keeps its events and views.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `events.db` and `views.db` in a directory.
    Sqlite(PathBuf),
    /// A PostgreSQL database and the schema of diptych's tables, which every
    /// node of the service shares.
    Postgres {
        /// `postgres://user@host:port/database`.
        url: String,
        /// The schema.
        schema: String,
    },
}

impl Backend {
    /// PostgreSQL for a `postgres://` URL (in `schema`, or the default one),
    /// else SQLite in `data`.
    pub fn choose(store: Option<String>, schema: Option<String>, data: PathBuf) -> Self {
        match store {
            Some(url) => Backend::Postgres {
                url,
                schema: schema.unwrap_or_else(|| PgConfig::DEFAULT_SCHEMA.to_owned()),
            },
            None => Backend::Sqlite(data),
        }
    }

    /// Where the data is, for people (a PostgreSQL URL without its credentials).
    pub fn describe(&self) -> String {
        match self {
            Backend::Sqlite(data) => format!("data in {}", data.display()),
            Backend::Postgres { url, schema } => {
                let host = url.rsplit_once('@').map_or(url.as_str(), |(_, host)| host);
                format!("PostgreSQL at {host}, schema {schema}")
            }
        }
    }
}

/// What one node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    /// Takes commands (`POST /commands/…`).
    pub command: bool,
    /// Serves views, streams and the log, waiting on consistency tokens.
    pub query: bool,
    /// Runs the service's projections and process managers.
    pub projector: bool,
    /// Applies the streams the service copies from other services, received
    /// through the broker.
    pub inbound: bool,
    /// Publishes the log to the broker.
    pub relay: bool,
}

impl Roles {
    /// Every role: one process does everything.
    pub const ALL: Roles = Roles {
        command: true,
        query: true,
        projector: true,
        inbound: true,
        relay: true,
    };

    /// Parses role names (`command`, `query`, `projector`, `inbound`, `relay`).
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, NodeError> {
        if names.is_empty() {
            return Err(NodeError::Settings(
                "give at least one role: command, query, projector, inbound or relay".to_owned(),
            ));
        }
        let mut roles = Roles {
            command: false,
            query: false,
            projector: false,
            inbound: false,
            relay: false,
        };
        for name in names {
            match name.as_ref().trim() {
                "command" => roles.command = true,
                "query" => roles.query = true,
                "projector" => roles.projector = true,
                "inbound" => roles.inbound = true,
                "relay" => roles.relay = true,
                other => {
                    return Err(NodeError::Settings(format!(
                        "unknown role `{other}`: the roles are command, query, projector, inbound and relay"
                    )));
                }
            }
        }
        Ok(roles)
    }

    /// The roles' names, joined with commas.
    pub fn describe(&self) -> String {
        let names: Vec<&str> = [
            (self.command, "command"),
            (self.query, "query"),
            (self.projector, "projector"),
            (self.inbound, "inbound"),
            (self.relay, "relay"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        names.join(", ")
    }
}

/// How a node runs its service.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Its roles.
    pub roles: Roles,
    /// The broker its log is relayed to and other services' streams come from:
    /// NATS JetStream (`nats://127.0.0.1:4222`) or RabbitMQ
    /// (`amqp://guest:guest@127.0.0.1:5672/%2f`); required when the service
    /// copies streams.
    pub broker: Option<String>,
    /// Into how many partitions a partitionable handler is split on PostgreSQL.
    pub partitions: u32,
    /// Who may do what over HTTP.
    pub auth: Auth,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            roles: Roles::ALL,
            broker: None,
            partitions: 1,
            auth: Auth::open(),
        }
    }
}

/// A node's stores, opened before its service is built on them.
#[derive(Clone)]
pub struct Stores {
    /// The event store (appends timed for `/metrics`).
    pub store: Arc<dyn EventStore>,
    /// The view store.
    pub views: Arc<dyn ViewStore>,
    leases: Option<PgLeases>,
}

/// A running node; see the [module](self).
pub struct Node {
    service: Service,
    stores: Stores,
    config: NodeConfig,
    /// What it started, in the order started: consumers, handlers, relay.
    running: Running,
}

impl Node {
    /// Opens the stores of `backend`, creating their tables on first use.
    pub async fn open(backend: &Backend) -> Result<Stores, NodeError> {
        match backend {
            Backend::Sqlite(data) => {
                let events = data.join("events.db");
                let store = SqliteStore::open(&events).map_err(|error| {
                    NodeError::failed(
                        format!("opening the event store at {}", events.display()),
                        error,
                    )
                })?;
                let views_path = data.join("views.db");
                let views = SqliteViews::open(&views_path).map_err(|error| {
                    NodeError::failed(
                        format!("opening the views at {}", views_path.display()),
                        error,
                    )
                })?;
                Ok(Stores {
                    store: diptych_http::metered(Arc::new(store)),
                    views: Arc::new(views),
                    leases: None,
                })
            }
            Backend::Postgres { url, schema } => {
                let config = PgConfig::new(url.clone()).with_schema(schema.clone());
                let opening = |what: &str| {
                    let what = format!("opening the {what} on PostgreSQL");
                    move |error| NodeError::failed(what, error)
                };
                let store = PgStore::connect(&config)
                    .await
                    .map_err(opening("event store"))?;
                let views = PgViews::connect(&config).await.map_err(opening("views"))?;
                let leases = PgLeases::connect(&config)
                    .await
                    .map_err(opening("leases"))?;
                Ok(Stores {
                    store: diptych_http::metered(Arc::new(store)),
                    views: Arc::new(views),
                    leases: Some(leases),
                })
            }
        }
    }

    /// Starts what `config.roles` ask of this node: the copies of other
    /// services' streams (inbound), the handlers (projector), the relay (relay).
    pub async fn start(
        service: Service,
        stores: Stores,
        config: NodeConfig,
    ) -> Result<Self, NodeError> {
        if !service.copies().is_empty() && config.broker.is_none() {
            return Err(NodeError::Settings(format!(
                "the {} service gets the other services' events through a broker: pass \
                 --broker nats://127.0.0.1:4222 (or set `broker` in the settings file)",
                service.name()
            )));
        }
        let broker = node_broker(config.broker.as_deref())?;
        let mut node = Node {
            service,
            stores,
            config,
            running: Running::default(),
        };
        let mut running = Running::default();
        let started = node.start_roles(broker.as_ref(), &mut running).await;
        node.running = running;
        if let Err(error) = started {
            // What did start stops again: nothing keeps running behind an error.
            node.stop().await;
            return Err(error);
        }
        Ok(node)
    }

    async fn start_roles(
        &self,
        broker: Option<&Broker>,
        running: &mut Running,
    ) -> Result<(), NodeError> {
        if self.config.roles.inbound {
            if let Some(broker) = broker {
                self.receive_copies(broker, running).await?;
            }
        }
        if self.config.roles.projector {
            self.start_handlers(running).await?;
        }
        if self.config.roles.relay {
            if let Some(broker) = broker {
                self.start_relay(broker, running).await?;
            }
        }
        Ok(())
    }

    /// The service it runs.
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Its stores.
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// The HTTP API for its roles: commands only with `command`, reads only
    /// with `query`, consistency tokens of the services it copies accepted.
    /// Merge routes of the application's own into it before serving.
    pub fn router(&self) -> axum::Router {
        let sources = self
            .service
            .copies()
            .iter()
            .map(|copy| (copy.source.clone(), StreamCopies::name_for(&copy.source)))
            .collect();
        app(AppState {
            application: Arc::new(self.service.clone()),
            store: self.stores.store.clone(),
            views: self.stores.views.clone(),
            auth: self.config.auth.clone(),
            config: HttpConfig {
                commands: self.config.roles.command,
                reads: self.config.roles.query,
                sources,
                ..HttpConfig::default()
            },
        })
    }

    /// Serves `router` on `listener` until `shutdown` resolves, then stops the
    /// node: requests in flight finish, handlers commit what they applied.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        router: axum::Router,
        shutdown: impl Future<Output = impl Sized> + Send + 'static,
    ) -> Result<(), NodeError> {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown.await;
            })
            .await;
        self.stop().await;
        served.map_err(|error| NodeError::failed("serving HTTP", error))
    }

    /// Stops its handlers, consumers and relay, each after its current batch.
    pub async fn stop(self) {
        self.running.stop().await;
    }

    async fn start_handlers(&self, running: &mut Running) -> Result<(), NodeError> {
        let Stores {
            store,
            views,
            leases,
        } = &self.stores;
        let Some(leases) = leases else {
            for handler in self.service.handlers() {
                let runner = handler
                    .spawn(store.clone(), views.clone(), RunnerConfig::default())
                    .await
                    .map_err(|error| {
                        NodeError::failed(
                            format!("starting `{}`", handler.projection.name()),
                            error,
                        )
                    })?;
                running.local.push(runner);
            }
            return Ok(());
        };
        running
            .leased
            .extend(self.service.handlers().iter().map(|handler| {
                PartitionedRunner::spawn(
                    leases.clone(),
                    store.clone(),
                    views.clone(),
                    handler.clone(),
                    self.config.partitions,
                    RunnerConfig::default(),
                    LeaseConfig::default(),
                )
            }));
        Ok(())
    }

    /// A consumer per service whose streams this one copies; on PostgreSQL
    /// each under a lease, so one node at a time applies a source.
    async fn receive_copies(
        &self,
        broker: &Broker,
        running: &mut Running,
    ) -> Result<(), NodeError> {
        for copy in self.service.copies() {
            let (store, views) = (self.stores.store.clone(), self.stores.views.clone());
            let (broker, copy) = (broker.clone(), copy.clone());
            let receiver = self.service.name().to_owned();
            let name = StreamCopies::name_for(&copy.source);
            let start = move || {
                let copies =
                    StreamCopies::new(store.clone(), &copy.source, copy.categories.clone());
                let (broker, views, source, receiver) = (
                    broker.clone(),
                    views.clone(),
                    copy.source.clone(),
                    receiver.clone(),
                );
                async move {
                    broker
                        .receive(views, Arc::new(copies), &source, &receiver)
                        .await
                }
            };
            let what = format!("receiving the events of `{name}`");
            self.start_one(running, &name, &what, start).await?;
        }
        Ok(())
    }

    /// The relay: in this process on SQLite; on PostgreSQL under a lease, so
    /// one node at a time publishes and another takes over when it dies.
    async fn start_relay(&self, broker: &Broker, running: &mut Running) -> Result<(), NodeError> {
        let (store, views) = (self.stores.store.clone(), self.stores.views.clone());
        let service = self.service.name().to_owned();
        let name = broker.relay_name(&service);
        let broker = broker.clone();
        let start = move || {
            let (store, views, broker, service) = (
                store.clone(),
                views.clone(),
                broker.clone(),
                service.clone(),
            );
            async move { broker.relay(store, views, &service).await }
        };
        self.start_one(running, &name, "starting the relay", start)
            .await
    }

    /// Starts one runner of which a service needs exactly one: here on SQLite;
    /// on PostgreSQL under a lease named `name`, so one node at a time runs it
    /// and another takes over when that node dies.
    async fn start_one<F, Fut>(
        &self,
        running: &mut Running,
        name: &str,
        what: &str,
        start: F,
    ) -> Result<(), NodeError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<RunnerHandle, BackendError>> + Send + 'static,
    {
        match &self.stores.leases {
            None => running.local.push(
                start()
                    .await
                    .map_err(|error| NodeError::failed(what, error))?,
            ),
            Some(leases) => running.leased.push(PartitionedRunner::singleton(
                leases.clone(),
                name,
                LeaseConfig::default(),
                start,
            )),
        }
        Ok(())
    }
}

/// The broker a node relays to and receives from.
#[derive(Clone, Debug)]
enum Broker {
    /// NATS JetStream.
    Nats(String),
    /// RabbitMQ.
    Amqp(String),
}

fn node_broker(url: Option<&str>) -> Result<Option<Broker>, NodeError> {
    let Some(url) = url else { return Ok(None) };
    if url.starts_with("nats://") || url.starts_with("tls://") {
        Ok(Some(Broker::Nats(url.to_owned())))
    } else if url.starts_with("amqp://") || url.starts_with("amqps://") {
        Ok(Some(Broker::Amqp(url.to_owned())))
    } else {
        Err(NodeError::Settings(format!(
            "the broker `{url}` is neither NATS (nats://host:4222) nor RabbitMQ \
             (amqp://user:password@host:5672/%2f)"
        )))
    }
}

impl Broker {
    /// The relay's name (its checkpoint and its lease).
    fn relay_name(&self, service: &str) -> String {
        match self {
            Broker::Nats(url) => NatsConfig::new(url.clone(), service).relay_name(),
            Broker::Amqp(_) => format!("relay-amqp-{service}"),
        }
    }

    async fn relay(
        &self,
        store: Arc<dyn EventStore>,
        views: Arc<dyn ViewStore>,
        service: &str,
    ) -> Result<RunnerHandle, BackendError> {
        let started = match self {
            Broker::Nats(url) => {
                let publisher =
                    NatsPublisher::connect(&NatsConfig::new(url.clone(), service)).await?;
                spawn_relay(store, views, Arc::new(publisher), RelayConfig::default()).await
            }
            Broker::Amqp(url) => {
                let publisher = AmqpPublisher::connect(url, service).await?;
                spawn_relay(store, views, Arc::new(publisher), RelayConfig::default()).await
            }
        };
        started.map_err(|error| BackendError::with_source("starting the relay", error))
    }

    /// Applies the `source` service's events with `copies`, on a durable
    /// subscription (or queue) of the `receiver` service's own.
    async fn receive(
        &self,
        views: Arc<dyn ViewStore>,
        copies: Arc<dyn Projection>,
        source: &str,
        receiver: &str,
    ) -> Result<RunnerHandle, BackendError> {
        match self {
            Broker::Nats(url) => {
                let config = InboundConfig {
                    url: url.clone(),
                    source: source.to_owned(),
                    durable: format!("{receiver}-copies"),
                    batch: 256,
                };
                spawn_inbound(views, copies, config).await
            }
            Broker::Amqp(url) => {
                let config = AmqpInboundConfig {
                    url: url.clone(),
                    source: source.to_owned(),
                    queue: format!("{receiver}-copies-of-{source}"),
                    prefetch: 256,
                };
                spawn_amqp_inbound(views, copies, config).await
            }
        }
    }
}

/// Runners a node started: in this process (SQLite), or whatever share the
/// leases give it (PostgreSQL).
#[derive(Default)]
struct Running {
    local: Vec<RunnerHandle>,
    leased: Vec<PartitionedRunner>,
}

impl Running {
    async fn stop(self) {
        for runner in self.local {
            runner.stop().await;
        }
        for runner in self.leased {
            runner.stop().await;
        }
    }
}
