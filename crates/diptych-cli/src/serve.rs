//! `diptych demo` and `diptych serve`: the reference shop served over HTTP, on
//! SQLite under a data directory or on PostgreSQL, where several nodes with
//! different roles share one database. The demo seeds a catalogue and customers on
//! first start, can simulate customers, and runs open on a loopback address;
//! `serve` takes a config file and bearer tokens, and refuses to run open on any
//! other address unless told `--insecure`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use diptych::http::{AppState, Auth, HttpConfig, Role, app};
use diptych::nats::{InboundConfig, NatsConfig, NatsPublisher, spawn_inbound};
use diptych::postgres::{LeaseConfig, PartitionedRunner, PgConfig, PgLeases, PgStore, PgViews};
use diptych::sqlite::{SqliteStore, SqliteViews};
use diptych::{
    BackendError, CommandContext, EventStore, RelayConfig, RunnerConfig, RunnerHandle,
    StreamCopies, ViewStore, spawn_relay,
};
use diptych_shop::detail::{self, CatalogClient};
use diptych_shop::services::Service;
use diptych_shop::{Shop, ShopCommand};
use serde_json::json;

/// Where the shop keeps its events and views.
#[derive(Clone, Debug)]
pub enum Backend {
    /// `events.db` and `views.db` in a directory.
    Sqlite(PathBuf),
    /// A PostgreSQL database (URL) and the schema of diptych's tables, shared by
    /// every node of the shop.
    Postgres {
        /// `postgres://user@host:port/database`.
        url: String,
        /// The schema.
        schema: String,
    },
}

impl Backend {
    /// PostgreSQL for a `postgres://` or `postgresql://` URL, else SQLite in
    /// `data`.
    pub fn choose(store: Option<String>, schema: Option<String>, data: PathBuf) -> Self {
        match store {
            Some(url) => Backend::Postgres {
                url,
                schema: schema.unwrap_or_else(|| PgConfig::DEFAULT_SCHEMA.to_owned()),
            },
            None => Backend::Sqlite(data),
        }
    }

    fn describe(&self) -> String {
        match self {
            Backend::Sqlite(data) => format!("data in {}", data.display()),
            Backend::Postgres { url, schema } => {
                let host = url.rsplit_once('@').map_or(url.as_str(), |(_, host)| host);
                format!("PostgreSQL at {host}, schema {schema}")
            }
        }
    }
}

/// What one node does; a shop on PostgreSQL can run each in its own processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    /// Takes commands (`POST /commands/…`).
    pub command: bool,
    /// Serves views, streams and the log, waiting on consistency tokens.
    pub query: bool,
    /// Runs the projections and the saga (under leases on PostgreSQL).
    pub projector: bool,
    /// Publishes the log to a broker (nothing to publish to yet).
    pub relay: bool,
}

impl Roles {
    /// Every role: one process does everything.
    pub const ALL: Roles = Roles {
        command: true,
        query: true,
        projector: true,
        relay: true,
    };

    /// Parses role names (`command`, `query`, `projector`, `relay`).
    pub fn parse(names: &[String]) -> Result<Self> {
        anyhow::ensure!(
            !names.is_empty(),
            "give at least one role: command, query, projector or relay"
        );
        let mut roles = Roles {
            command: false,
            query: false,
            projector: false,
            relay: false,
        };
        for name in names {
            match name.trim() {
                "command" => roles.command = true,
                "query" => roles.query = true,
                "projector" => roles.projector = true,
                "relay" => roles.relay = true,
                other => anyhow::bail!(
                    "unknown role `{other}`: the roles are command, query, projector and relay"
                ),
            }
        }
        Ok(roles)
    }

    fn describe(&self) -> String {
        let names: Vec<&str> = [
            (self.command, "command"),
            (self.query, "query"),
            (self.projector, "projector"),
            (self.relay, "relay"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        names.join(", ")
    }
}

/// How to run the shop.
pub struct ServeConfig {
    /// Where to listen.
    pub addr: SocketAddr,
    /// Where events and views live.
    pub backend: Backend,
    /// Who may do what.
    pub auth: Auth,
    /// Serve without tokens on a non-loopback address anyway.
    pub insecure: bool,
    /// Seed a catalogue and customers into an empty store.
    pub seed: bool,
    /// How many simulated customers keep placing orders.
    pub traffic: usize,
    /// What this node does.
    pub roles: Roles,
    /// Partitions of each partitionable projection, shared by projector nodes.
    pub partitions: u32,
    /// The NATS server the relay role publishes to, if any.
    pub broker: Option<String>,
    /// This service's name in the broker's subjects. One of the split shop's
    /// services (`catalog`, `inventory`, `customers`, `ordering`) runs only
    /// that service; any other name runs the whole shop.
    pub service: String,
    /// The catalog service's address, for the order detail's live call.
    pub catalog: Option<String>,
    /// A reader's token for that catalog, when it wants one.
    pub catalog_token: Option<String>,
}

/// The settings file of `diptych serve` (TOML).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    /// Where to listen, such as `0.0.0.0:8080`.
    pub addr: SocketAddr,
    /// The data directory, for SQLite.
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// A PostgreSQL URL, instead of a data directory.
    #[serde(default)]
    pub store: Option<String>,
    /// The PostgreSQL schema (`diptych` by default).
    #[serde(default)]
    pub schema: Option<String>,
    /// The roles of this node (all by default).
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// Partitions of each partitionable projection (1 by default).
    #[serde(default)]
    pub partitions: Option<u32>,
    /// A NATS server the relay role publishes the log to.
    #[serde(default)]
    pub broker: Option<String>,
    /// This service's name in the broker's subjects (`shop` by default), or
    /// the split shop's service this node runs.
    #[serde(default)]
    pub service: Option<String>,
    /// The catalog service's address (`http://127.0.0.1:8081`), for the
    /// ordering service's order detail.
    #[serde(default)]
    pub catalog: Option<String>,
    /// A reader's token for that catalog, when it has tokens.
    #[serde(default)]
    pub catalog_token: Option<String>,
    /// Bearer tokens and their roles (`reader`, `writer`, `admin`).
    #[serde(default)]
    pub tokens: std::collections::BTreeMap<String, String>,
}

impl ServeFile {
    /// The backend the file names: `store` (PostgreSQL) or `data` (SQLite).
    pub fn backend(&self) -> Result<Backend> {
        match (&self.store, &self.data) {
            (Some(_), Some(_)) => anyhow::bail!(
                "the settings file names both `store` and `data`: keep `store` for PostgreSQL or \
                 `data` for SQLite"
            ),
            (None, None) => anyhow::bail!(
                "the settings file names no storage: add `data = \"dir\"` for SQLite or \
                 `store = \"postgres://…\"` for PostgreSQL"
            ),
            (None, Some(_)) if self.partitions.is_some() || self.schema.is_some() => {
                anyhow::bail!(
                    "`partitions` and `schema` apply to a PostgreSQL store: set `store`, or drop them"
                )
            }
            (store, data) => Ok(Backend::choose(
                store.clone(),
                self.schema.clone(),
                data.clone().unwrap_or_default(),
            )),
        }
    }

    /// Reads the file; tokens in `DIPTYCH_TOKENS` (`token=role,token=role`) are
    /// added to those in the file.
    pub fn load(path: &Path) -> Result<(Self, Auth)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the settings file {}", path.display()))?;
        let file: ServeFile = toml::from_str(&text)
            .with_context(|| format!("reading the settings file {}", path.display()))?;
        let mut tokens = std::collections::BTreeMap::new();
        let from_env = std::env::var("DIPTYCH_TOKENS").unwrap_or_default();
        let env_pairs = from_env
            .split(',')
            .filter(|pair| !pair.trim().is_empty())
            .map(|pair| {
                pair.split_once('=')
                    .map(|(token, role)| (token.trim().to_owned(), role.trim().to_owned()))
                    .with_context(|| format!("DIPTYCH_TOKENS holds `{pair}`; write token=role"))
            })
            .collect::<Result<Vec<_>>>()?;
        for (token, role) in file.tokens.clone().into_iter().chain(env_pairs) {
            let role: Role = role
                .parse()
                .map_err(|error: String| anyhow::anyhow!("token `{token}`: {error}"))?;
            tokens.insert(token, role);
        }
        let auth = if tokens.is_empty() {
            Auth::open()
        } else {
            Auth::tokens(tokens)
        };
        Ok((file, auth))
    }
}

/// The catalogue seeded on first start: id, name, description, price, stock.
pub(crate) const CATALOGUE: &[(&str, &str, &str, u64, u64)] = &[
    (
        "mug",
        "Stoneware mug",
        "A blue glazed stoneware mug, 350 ml",
        1299,
        500,
    ),
    (
        "tea",
        "Green tea",
        "Loose leaf sencha from Shizuoka, 100 g",
        850,
        300,
    ),
    (
        "kettle",
        "Gooseneck kettle",
        "Stainless steel pour-over kettle, 1 l",
        4599,
        40,
    ),
    (
        "grinder",
        "Burr grinder",
        "Hand grinder with ceramic burrs",
        3499,
        25,
    ),
    (
        "beans",
        "Coffee beans",
        "Washed Ethiopian beans, medium roast, 250 g",
        1150,
        800,
    ),
];

/// The customers seeded on first start.
pub(crate) const CUSTOMERS: &[(&str, &str, &str, &str)] = &[
    (
        "ada",
        "Ada Lovelace",
        "ada@example.com",
        "12 St James's Square, London",
    ),
    (
        "alan",
        "Alan Turing",
        "alan@example.com",
        "Bletchley Park, Milton Keynes",
    ),
    (
        "grace",
        "Grace Hopper",
        "grace@example.com",
        "1 Navy Yard, Arlington",
    ),
];

/// Serves the shop until Ctrl-C (or SIGTERM), then stops cleanly: the server
/// finishes its requests, the projections their batches, and the stores close.
pub async fn run(config: ServeConfig) -> Result<()> {
    anyhow::ensure!(
        !config.auth.is_open() || config.addr.ip().is_loopback() || config.insecure,
        "refusing to serve without authentication on {}, which is not a loopback address: \
         configure tokens (the settings file's [tokens], or DIPTYCH_TOKENS=token=role), or \
         pass --insecure if the network in front of it is trusted",
        config.addr
    );
    let split = Service::parse(&config.service);
    if let Some(service) = split {
        anyhow::ensure!(
            config.broker.is_some(),
            "the {service} service gets the other services' events through a broker: pass \
             --broker nats://127.0.0.1:4222 (or set `broker` in the settings file)"
        );
    }
    anyhow::ensure!(
        config.catalog.is_none() || split == Some(Service::Ordering),
        "only the ordering service calls the catalog (for the order detail): drop --catalog, \
         or run --service ordering"
    );
    let opened = open(&config.backend).await?;
    let (store, views) = (opened.store.clone(), opened.views.clone());
    let fresh = store.head().await?.0 == 0;
    let shop = Arc::new(match split {
        Some(service) => Shop::service(service, store.clone(), views.clone()),
        None => Shop::new(store.clone(), views.clone()),
    });
    let inbound = match (split, &config.broker) {
        (Some(service), Some(broker)) if config.roles.projector => {
            receive_copies(service, broker, &opened).await?
        }
        _ => Handlers::None,
    };
    let handlers = if config.roles.projector {
        Handlers::start(&shop, &opened, config.partitions).await?
    } else {
        Handlers::None
    };
    let relay = match (&config.broker, config.roles.relay) {
        (Some(broker), true) => {
            start_relay(&opened, NatsConfig::new(broker.clone(), &config.service))
                .await
                .context("starting the relay")?
        }
        _ => Handlers::None,
    };
    let seeded = fresh && config.seed && config.roles.command && split.is_none();
    if seeded {
        seed(&shop).await?;
    }
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| {
            format!(
                "listening on {}; pass --addr to use another address",
                config.addr
            )
        })?;
    let addr = listener.local_addr()?;
    print_welcome(addr, &config, seeded);
    let mut traffic = Vec::new();
    if config.roles.command && split.is_none() {
        for customer in 0..config.traffic {
            traffic.push(tokio::spawn(simulate_customer(shop.clone(), customer)));
        }
    }
    let sources = split
        .map(|service| {
            service
                .sources()
                .iter()
                .map(|source| {
                    (
                        source.name().to_owned(),
                        StreamCopies::name_for(source.name()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let state = AppState {
        application: shop.clone(),
        store,
        views,
        auth: config.auth.clone(),
        config: HttpConfig {
            commands: config.roles.command,
            reads: config.roles.query,
            sources,
            ..HttpConfig::default()
        },
    };
    let mut router = app(state);
    if config.roles.query && matches!(split, None | Some(Service::Ordering)) {
        let catalog = config.catalog.as_ref().map(|url| {
            let client = CatalogClient::new(url.clone(), CATALOG_TIMEOUT);
            match &config.catalog_token {
                Some(token) => client.with_token(token.clone()),
                None => client,
            }
        });
        router = router.merge(detail::routes(shop.clone(), config.auth.clone(), catalog));
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")?;
    for task in traffic {
        task.abort();
    }
    handlers.stop().await;
    inbound.stop().await;
    relay.stop().await;
    println!("stopped cleanly; run the same command to continue where it stopped");
    Ok(())
}

/// How long the order detail waits for the catalog before answering from the
/// local copy.
const CATALOG_TIMEOUT: Duration = Duration::from_millis(300);

/// Starts the relay: in this process on SQLite; on PostgreSQL under a lease,
/// so one node at a time publishes and another takes over when it dies.
async fn start_relay(opened: &Opened, nats: NatsConfig) -> Result<Handlers> {
    let (store, views) = (opened.store.clone(), opened.views.clone());
    let name = nats.relay_name();
    let start = move || {
        let (store, views, nats) = (store.clone(), views.clone(), nats.clone());
        async move {
            let publisher = NatsPublisher::connect(&nats).await?;
            spawn_relay(store, views, Arc::new(publisher), RelayConfig::default())
                .await
                .map_err(|error| BackendError::with_source("starting the relay", error))
        }
    };
    Ok(match &opened.leases {
        None => Handlers::Local(vec![start().await?]),
        Some(leases) => Handlers::Leased(vec![PartitionedRunner::singleton(
            leases.clone(),
            &name,
            LeaseConfig::default(),
            start,
        )]),
    })
}

/// Starts a consumer per service whose streams `service` copies into its log;
/// on PostgreSQL each under a lease, so one node at a time applies a source.
async fn receive_copies(service: Service, broker: &str, opened: &Opened) -> Result<Handlers> {
    let mut local = Vec::new();
    let mut leased = Vec::new();
    for source in service.sources() {
        let (store, views) = (opened.store.clone(), opened.views.clone());
        let config = InboundConfig {
            url: broker.to_owned(),
            source: source.name().to_owned(),
            durable: format!("{service}-copies"),
            batch: 256,
        };
        let start = move || {
            let copies = StreamCopies::new(store.clone(), source.name(), [source.category()]);
            spawn_inbound(views.clone(), Arc::new(copies), config.clone())
        };
        match &opened.leases {
            None => local.push(
                start()
                    .await
                    .with_context(|| format!("receiving the {source} service's events"))?,
            ),
            Some(leases) => leased.push(PartitionedRunner::singleton(
                leases.clone(),
                &StreamCopies::name_for(source.name()),
                LeaseConfig::default(),
                start,
            )),
        }
    }
    Ok(if leased.is_empty() {
        Handlers::Local(local)
    } else {
        Handlers::Leased(leased)
    })
}

/// The stores of one node, and the leases table on PostgreSQL.
struct Opened {
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    leases: Option<PgLeases>,
}

async fn open(backend: &Backend) -> Result<Opened> {
    match backend {
        Backend::Sqlite(data) => {
            let events = data.join("events.db");
            let store = SqliteStore::open(&events)
                .with_context(|| format!("opening the event store at {}", events.display()))?;
            let views_path = data.join("views.db");
            let views = SqliteViews::open(&views_path)
                .with_context(|| format!("opening the views at {}", views_path.display()))?;
            // Appends are timed for /metrics.
            Ok(Opened {
                store: diptych::http::metered(Arc::new(store)),
                views: Arc::new(views),
                leases: None,
            })
        }
        Backend::Postgres { url, schema } => {
            let config = PgConfig::new(url.clone()).with_schema(schema.clone());
            let store = PgStore::connect(&config)
                .await
                .context("opening the event store on PostgreSQL")?;
            let views = PgViews::connect(&config)
                .await
                .context("opening the views on PostgreSQL")?;
            let leases = PgLeases::connect(&config)
                .await
                .context("opening the leases on PostgreSQL")?;
            Ok(Opened {
                store: diptych::http::metered(Arc::new(store)),
                views: Arc::new(views),
                leases: Some(leases),
            })
        }
    }
}

/// The projections and the saga this node runs.
enum Handlers {
    /// Not a projector.
    None,
    /// On SQLite: all of them, in this process.
    Local(Vec<RunnerHandle>),
    /// On PostgreSQL: whatever share the leases give this node.
    Leased(Vec<PartitionedRunner>),
}

impl Handlers {
    async fn start(shop: &Shop, opened: &Opened, partitions: u32) -> Result<Self> {
        let Some(leases) = &opened.leases else {
            return Ok(Handlers::Local(shop.start(RunnerConfig::default()).await?));
        };
        let runners = shop
            .handlers()
            .into_iter()
            .map(|handler| {
                PartitionedRunner::spawn(
                    leases.clone(),
                    opened.store.clone(),
                    opened.views.clone(),
                    handler,
                    partitions,
                    RunnerConfig::default(),
                    LeaseConfig::default(),
                )
            })
            .collect();
        Ok(Handlers::Leased(runners))
    }

    async fn stop(self) {
        match self {
            Handlers::None => {}
            Handlers::Local(runners) => {
                for runner in runners {
                    runner.stop().await;
                }
            }
            Handlers::Leased(runners) => {
                for runner in runners {
                    runner.stop().await;
                }
            }
        }
    }
}

async fn seed(shop: &Shop) -> Result<()> {
    let mut commands = Vec::new();
    for (id, name, description, price_cents, stock) in CATALOGUE {
        commands.push(("RegisterProduct", json!({"product_id": id, "name": name, "description": description, "price_cents": price_cents})));
        commands.push(("AddStock", json!({"product_id": id, "quantity": stock})));
    }
    for (id, name, email, address) in CUSTOMERS {
        commands.push((
            "RegisterCustomer",
            json!({"customer_id": id, "name": name, "email": email, "address": address}),
        ));
    }
    for (name, body) in commands {
        let command = ShopCommand::parse(name, body)?;
        shop.execute(command, &CommandContext::default())
            .await
            .with_context(|| format!("seeding with {name}"))?;
    }
    Ok(())
}

/// One simulated customer: orders one or two products every so often, and
/// sometimes cancels.
async fn simulate_customer(shop: Arc<Shop>, customer: usize) {
    let (customer_id, _, _, _) = CUSTOMERS[customer % CUSTOMERS.len()];
    for n in 0u64.. {
        tokio::time::sleep(Duration::from_millis(200 + fastrand::u64(0..800))).await;
        let order_id = format!("sim-{customer}-{}-{n}", std::process::id());
        let mut lines = vec![
            json!({"product_id": CATALOGUE[fastrand::usize(0..CATALOGUE.len())].0, "quantity": fastrand::u64(1..3)}),
        ];
        if fastrand::bool() {
            lines.push(json!({"product_id": CATALOGUE[fastrand::usize(0..CATALOGUE.len())].0, "quantity": 1}));
        }
        let body = json!({"order_id": order_id, "customer_id": customer_id, "lines": lines});
        let Ok(command) = ShopCommand::parse("PlaceOrder", body) else {
            continue;
        };
        // Running out of stock is part of the simulation, not a failure.
        let _ = shop.execute(command, &CommandContext::default()).await;
        if n % 7 == 6 {
            if let Ok(cancel) = ShopCommand::parse("CancelOrder", json!({"order_id": order_id})) {
                let _ = shop.execute(cancel, &CommandContext::default()).await;
            }
        }
    }
}

fn print_welcome(addr: SocketAddr, config: &ServeConfig, seeded: bool) {
    let url = format!("http://{addr}");
    println!("diptych shop listening on {url}");
    println!(
        "{} ({}); roles: {}; {}",
        config.backend.describe(),
        if seeded {
            "new: seeded a catalogue and three customers"
        } else {
            "continuing"
        },
        config.roles.describe(),
        if config.auth.is_open() {
            "no authentication"
        } else {
            "bearer tokens required"
        }
    );
    match (&config.broker, config.roles.relay) {
        (Some(broker), true) => println!(
            "relay: publishing the log to NATS at {broker} as service `{}`",
            config.service
        ),
        (None, true) => {
            println!("relay: no broker is configured (--broker), so there is nothing to publish to")
        }
        _ => {}
    }
    println!();
    println!("Try:");
    println!("  curl -s {url}/views/products?q=tea");
    println!(
        "  curl -si -X POST {url}/commands/PlaceOrder -H 'content-type: application/json' \\\n    -d '{{\"order_id\":\"o-1\",\"customer_id\":\"ada\",\"lines\":[{{\"product_id\":\"mug\",\"quantity\":2}}]}}'"
    );
    println!(
        "  curl -s -H 'x-diptych-wait-for: <X-Diptych-Position from above>' {url}/views/orders/o-1"
    );
    println!("  curl -s {url}/streams/order-o-1");
    println!("  curl -s '{url}/views/customer-orders?customer_id=ada&order=-placed_at_us'");
    println!("  curl -s {url}/projections");
    println!();
    println!("Ctrl-C stops it cleanly.");
}

pub(crate) async fn shutdown_signal() {
    // A service of `demo --split` also stops when its parent is gone.
    if std::env::var_os(crate::split::STOP_WITH_PARENT).is_some() {
        tokio::select! {
            _ = signals() => {}
            _ = parent_gone() => {}
        }
    } else {
        signals().await;
    }
}

/// Resolves when standard input closes: the parent that holds it has exited.
async fn parent_gone() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await;
}

async fn signals() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
