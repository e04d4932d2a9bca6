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
use diptych::http::{Auth, Role};
pub use diptych::{Backend, Roles};
use diptych::{CommandContext, Node, NodeConfig};
use diptych_shop::detail::{self, CatalogClient};
use diptych_shop::services::Service;
use diptych_shop::{Shop, ShopCommand};
use serde_json::json;

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
/// Refuses to serve open (no tokens) on an address others can reach, unless
/// told the network in front of it is trusted.
pub fn refuse_open_unless_loopback(addr: SocketAddr, auth: &Auth, insecure: bool) -> Result<()> {
    anyhow::ensure!(
        !auth.is_open() || addr.ip().is_loopback() || insecure,
        "refusing to serve without authentication on {addr}, which is not a loopback address: \
         configure tokens (the settings file's [tokens], or DIPTYCH_TOKENS=token=role), or \
         pass --insecure if the network in front of it is trusted"
    );
    Ok(())
}

pub async fn run(config: ServeConfig) -> Result<()> {
    refuse_open_unless_loopback(config.addr, &config.auth, config.insecure)?;
    let split = Service::parse(&config.service);
    anyhow::ensure!(
        config.catalog.is_none() || split == Some(Service::Ordering),
        "only the ordering service calls the catalog (for the order detail): drop --catalog, \
         or run --service ordering"
    );
    // Bound first: a taken address is refused before anything starts.
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| {
            format!(
                "listening on {}; pass --addr to use another address",
                config.addr
            )
        })?;
    let stores = Node::open(&config.backend).await?;
    let fresh = stores.store.head().await?.0 == 0;
    let shop = Arc::new(Shop::named(
        &config.service,
        stores.store.clone(),
        stores.views.clone(),
    ));
    let node = Node::start(
        shop.application().clone(),
        stores,
        NodeConfig {
            roles: config.roles,
            broker: config.broker.clone(),
            partitions: config.partitions,
            auth: config.auth.clone(),
        },
    )
    .await?;
    let seeded = fresh && config.seed && config.roles.command && split.is_none();
    if seeded {
        seed(&shop).await?;
    }
    let addr = listener.local_addr()?;
    print_welcome(addr, &config, seeded);
    let mut traffic = Vec::new();
    if config.roles.command && split.is_none() {
        for customer in 0..config.traffic {
            traffic.push(tokio::spawn(simulate_customer(shop.clone(), customer)));
        }
    }
    let mut router = node.router();
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
    let served = node.serve(listener, router, shutdown_signal()).await;
    for task in traffic {
        task.abort();
    }
    served?;
    println!("stopped cleanly; run the same command to continue where it stopped");
    Ok(())
}

/// How long the order detail waits for the catalog before answering from the
/// local copy.
const CATALOG_TIMEOUT: Duration = Duration::from_millis(300);

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
