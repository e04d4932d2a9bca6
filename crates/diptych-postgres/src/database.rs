//! A connection to diptych's schema: the pool, and the one connection that
//! listens for notifications and turns them into watches.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, QueueMode, RecyclingMethod, Runtime,
};
use diptych_core::BackendError;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::error::{OpenError, backend, pool_error};
use crate::schema::{Migrations, check_schema_name};

/// Where a PostgreSQL store lives: the server, and the schema that holds its
/// tables (several independent diptych installations can share one database).
#[derive(Clone, Debug)]
pub struct PgConfig {
    /// A `postgres://user@host:port/database` URL (or a key=value string).
    pub url: String,
    /// The schema of diptych's tables, created if missing.
    pub schema: String,
    /// How many pooled connections each store keeps at most.
    pub pool_size: usize,
    /// How many groups of appends an event store writes at once, each on one
    /// pooled connection for the length of one call (at most `pool_size`).
    /// Appends that arrive while every lane is busy wait in a queue and go
    /// together in the next group.
    pub append_lanes: usize,
    /// How long an append waits, after committing, for its events to become
    /// readable in the global order (`read_all`, `head`), which a transaction
    /// older than it and still in progress holds back. Zero, the default,
    /// returns as soon as the append is durable: consistency tokens need no
    /// wait, since a view only reaches a position through `read_all` (see
    /// `docs/postgres-ordering.md`). Set it for a caller that reads the global
    /// log right after appending and must see its own events there.
    pub readable_wait: Duration,
}

impl PgConfig {
    /// The default schema, `diptych`.
    pub const DEFAULT_SCHEMA: &'static str = "diptych";

    /// The default number of append lanes.
    pub const DEFAULT_APPEND_LANES: usize = 1;

    /// A config for `url`, in schema `diptych`, with 16 connections per store.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: Self::DEFAULT_SCHEMA.to_owned(),
            pool_size: 16,
            append_lanes: Self::DEFAULT_APPEND_LANES,
            readable_wait: Duration::ZERO,
        }
    }

    /// Sets the schema.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets the pool size.
    pub fn with_pool_size(mut self, pool_size: usize) -> Self {
        self.pool_size = pool_size.max(1);
        self
    }

    /// Sets how many groups of appends are written at once.
    pub fn with_append_lanes(mut self, append_lanes: usize) -> Self {
        self.append_lanes = append_lanes.max(1);
        self
    }

    /// Makes each append wait, at most `wait`, until its events are readable
    /// in the global order (see [`PgConfig::readable_wait`]).
    pub fn with_readable_wait(mut self, wait: Duration) -> Self {
        self.readable_wait = wait;
        self
    }

    /// The connection settings, with the search path set to the schema so every
    /// statement names tables without a prefix.
    pub(crate) fn connection_config(&self) -> Result<tokio_postgres::Config, OpenError> {
        self.session_config("")
    }

    /// The connection settings, with `settings` (`-c name=value …`) added to
    /// every session after the search path.
    fn session_config(&self, settings: &str) -> Result<tokio_postgres::Config, OpenError> {
        check_schema_name(&self.schema)?;
        let mut config = tokio_postgres::Config::from_str(&self.url).map_err(|error| {
            BackendError::with_source(
                "the PostgreSQL URL is not valid (expected postgres://user@host:port/database)",
                error,
            )
        })?;
        config
            .options(format!("-c search_path={} {settings}", self.schema).trim_end())
            .application_name("diptych");
        Ok(config)
    }
}

/// The name of a notification channel of `schema`.
pub(crate) fn channel(schema: &str, topic: &str) -> String {
    format!("diptych_{schema}_{topic}")
}

/// A pool on diptych's schema, plus a listener for its notification channels.
pub(crate) struct Database {
    pub pool: Pool,
    pub schema: String,
    /// Sent as the payload of this database's own notifications, which its
    /// listener skips: what this process did, it already knows.
    pub origin: String,
    listener: Listener,
}

impl Database {
    /// Connects, applies `migrations` and starts listening on `topics`.
    /// `settings` are extra `-c name=value` options for every pooled session.
    pub async fn open(
        config: &PgConfig,
        migrations: &Migrations,
        topics: &[&str],
        settings: &str,
    ) -> Result<Self, OpenError> {
        let connection_config = config.session_config(settings)?;
        let (mut client, connection) = connection_config
            .connect(NoTls)
            .await
            .map_err(|error| backend(describe_target(&connection_config), error))?;
        let driver = tokio::spawn(connection);
        let migrated = migrations.apply(&mut client, &config.schema).await;
        drop(client);
        let _ = driver.await;
        migrated?;
        let manager = Manager::from_config(
            connection_config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // The connection used last is handed out first: a few busy connections
        // keep their server processes warm in the CPU's caches, where taking
        // them in turn would wake a different, cold process for each statement.
        let pool = Pool::builder(manager)
            .queue_mode(QueueMode::Lifo)
            .max_size(config.pool_size.max(1))
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|error| BackendError::with_source("building the connection pool", error))?;
        let channels = topics
            .iter()
            .map(|topic| channel(&config.schema, topic))
            .collect();
        let origin = uuid::Uuid::now_v7().simple().to_string();
        Ok(Self {
            pool,
            schema: config.schema.clone(),
            listener: Listener::spawn(connection_config, channels, origin.clone()),
            origin,
        })
    }

    /// A pooled connection.
    pub async fn connection(&self, context: &str) -> Result<Object, BackendError> {
        self.pool
            .get()
            .await
            .map_err(|error| pool_error(context, error))
    }

    /// A counter that moves whenever `topic` is notified (and after the listener
    /// reconnects, since notifications may have been missed meanwhile).
    pub fn wakes(&self, topic: &str) -> watch::Receiver<u64> {
        self.listener.subscribe(&channel(&self.schema, topic))
    }
}

/// "connecting to PostgreSQL at host:port/db", without the password.
fn describe_target(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "connecting to PostgreSQL at {}:{port}/{} (is the server up, and the URL right?)",
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// One connection that LISTENs on a fixed set of channels and bumps a counter per
/// channel for each notification. It reconnects on its own; every counter moves
/// after a reconnect so waiters re-read what they may have missed.
struct Listener {
    wakes: Arc<HashMap<String, watch::Sender<u64>>>,
    task: JoinHandle<()>,
}

impl Listener {
    fn spawn(config: tokio_postgres::Config, channels: Vec<String>, origin: String) -> Self {
        let wakes: Arc<HashMap<String, watch::Sender<u64>>> = Arc::new(
            channels
                .into_iter()
                .map(|channel| (channel, watch::Sender::new(0)))
                .collect(),
        );
        // A store with nothing to listen for (the leases) keeps no connection.
        let task = if wakes.is_empty() {
            tokio::spawn(async {})
        } else {
            tokio::spawn(listen(config, Arc::clone(&wakes), origin))
        };
        Self { wakes, task }
    }

    fn subscribe(&self, channel: &str) -> watch::Receiver<u64> {
        match self.wakes.get(channel) {
            Some(sender) => sender.subscribe(),
            // A channel nobody listens on never moves.
            None => watch::Sender::new(0).subscribe(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn listen(
    config: tokio_postgres::Config,
    wakes: Arc<HashMap<String, watch::Sender<u64>>>,
    origin: String,
) {
    let bump = |sender: &watch::Sender<u64>| sender.send_modify(|count| *count += 1);
    let mut backoff = Duration::from_millis(50);
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let (messages_tx, mut messages) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut stream =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = stream.next().await {
                        match message {
                            Ok(message) => {
                                if messages_tx.send(message).is_err() {
                                    break;
                                }
                            }
                            Err(error) => {
                                tracing::warn!(%error, "the PostgreSQL listener connection failed");
                                break;
                            }
                        }
                    }
                });
                let statements: String = wakes
                    .keys()
                    .map(|channel| format!("LISTEN {channel};"))
                    .collect();
                if let Err(error) = client.batch_execute(&statements).await {
                    tracing::warn!(%error, "could not LISTEN on PostgreSQL");
                } else {
                    backoff = Duration::from_millis(50);
                    // Anything notified before LISTEN took effect was missed.
                    wakes.values().for_each(bump);
                    while let Some(message) = messages.recv().await {
                        if let AsyncMessage::Notification(notification) = message
                            && notification.payload() != origin
                            && let Some(sender) = wakes.get(notification.channel())
                        {
                            bump(sender);
                        }
                    }
                }
                driver.abort();
            }
            Err(error) => {
                tracing::warn!(%error, "the PostgreSQL listener cannot connect; retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        // Wake everyone: while disconnected, notifications were lost.
        wakes.values().for_each(bump);
    }
}
