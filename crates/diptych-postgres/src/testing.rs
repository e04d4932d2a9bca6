//! Support for tests against a real PostgreSQL: a fresh schema per test, so
//! tests run in parallel on one database without seeing each other's rows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::NoTls;

use crate::PgConfig;

/// The variable that names the test server.
pub const TEST_URL_VARIABLE: &str = "DIPTYCH_TEST_PG";

/// The URL of the test server, from `DIPTYCH_TEST_PG`. Panics with what to do
/// when it is not set: tests that need PostgreSQL are never silently skipped.
pub fn test_url() -> String {
    std::env::var(TEST_URL_VARIABLE).unwrap_or_else(|_| {
        panic!(
            "{TEST_URL_VARIABLE} is not set: point it at a PostgreSQL server, e.g. \
             {TEST_URL_VARIABLE}=postgres://postgres@127.0.0.1:5432/test (.cargo/config.toml \
             sets that default for cargo test)"
        )
    })
}

/// A config on the test server in a schema no other test uses. Schemas left by
/// test runs more than a day old are dropped on the way.
///
/// Its appends wait until they are readable in the global order
/// ([`PgConfig::readable_wait`]): the suites read the log right after
/// appending, and tests running in parallel on one server are never quiet,
/// since any test's transaction in progress holds back every later one's
/// events for its length.
pub async fn fresh_config() -> PgConfig {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let url = test_url();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let schema = format!(
        "test_{now}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    drop_stale_schemas(&url, now).await;
    PgConfig::new(url)
        .with_schema(schema)
        .with_pool_size(8)
        .with_readable_wait(Duration::from_secs(30))
}

async fn drop_stale_schemas(url: &str, now: u64) {
    let Ok((client, connection)) = tokio_postgres::connect(url, NoTls).await else {
        return;
    };
    let driver = tokio::spawn(connection);
    let stale = client
        .query(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'test\\_%'",
            &[],
        )
        .await
        .unwrap_or_default();
    for row in stale {
        let name: String = row.get(0);
        let born = name
            .split('_')
            .nth(1)
            .and_then(|stamp| stamp.parse::<u64>().ok());
        if born.is_some_and(|born| born + 86_400 < now) {
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .await;
        }
    }
    drop(client);
    let _ = driver.await;
}

/// A plain connection to `config`'s schema, outside any store: for tests that
/// need a transaction of their own (one held open, say).
pub async fn raw_client(config: &PgConfig) -> tokio_postgres::Client {
    let connection_config = config
        .connection_config()
        .expect("the test config is valid");
    let (client, connection) = connection_config
        .connect(NoTls)
        .await
        .expect("a connection to the test server");
    tokio::spawn(connection);
    client
}

/// A child process that is killed when this guard is dropped, so a test that
/// panics never leaves children behind (they would hold its output open, and
/// the test run would hang).
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    /// Kills the child with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
