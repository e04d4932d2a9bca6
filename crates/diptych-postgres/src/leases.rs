//! Leases on the partitions of a projection, held in PostgreSQL, so projector
//! processes share a partitioned projection (`diptych_core::partition`) and take
//! over the partitions of one that dies.
//!
//! Each process runs a [`PartitionedRunner`] per partitioned projection. Every
//! `ttl / 3` it renews its leases, stops the runners of any it lost, and claims
//! free or expired partitions up to its fair share (partitions divided by live
//! members, rounded up; every process running the projection renews its
//! membership whether it holds partitions or not), or hands one back when it
//! holds more than its share, so a process that joins gets work. Expiry is judged by the server's clock,
//! so processes' clocks need not agree.
//!
//! A lease is what keeps two processes from running one partition in the normal
//! case; it is not what keeps an event from being applied twice. That is the
//! view store's checkpoint check: every batch names the checkpoint it started
//! from and is refused if another runner moved it, so even a process that was
//! frozen past its lease and wakes up still holding a runner cannot apply a
//! batch twice.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diptych_core::{
    BackendError, EventStore, Handler, Partition, RunnerConfig, RunnerHandle, ViewStore,
    spawn_projection,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::database::{Database, PgConfig};
use crate::error::{OpenError, backend};
use crate::schema::Migrations;

const LEASES: Migrations = Migrations {
    component: "leases",
    steps: &["CREATE TABLE leases (
            projection text        NOT NULL,
            partition  integer     NOT NULL,
            holder     text        NOT NULL,
            expires_at timestamptz NOT NULL,
            PRIMARY KEY (projection, partition)
        );
        -- Who is there to share the work, holding partitions or not.
        CREATE TABLE lease_members (
            projection text        NOT NULL,
            holder     text        NOT NULL,
            expires_at timestamptz NOT NULL,
            PRIMARY KEY (projection, holder)
        );"],
};

/// How a process holds leases.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// How long a lease lasts unless renewed: how long a dead process's
    /// partitions wait before another process takes them. Renewed every third.
    pub ttl: Duration,
    /// This process's name in the leases table (unique per process).
    pub holder: String,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            holder: format!(
                "pid-{}-{}",
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            ),
        }
    }
}

/// The leases table of a schema.
#[derive(Clone)]
pub struct PgLeases {
    database: Arc<Database>,
}

impl PgLeases {
    /// Connects, creating the table if needed.
    pub async fn connect(config: &PgConfig) -> Result<Self, OpenError> {
        let config = config.clone().with_pool_size(2);
        Ok(Self {
            database: Arc::new(Database::open(&config, &LEASES, &[], "").await?),
        })
    }

    /// Who holds each partition of `projection` now (expired leases left out).
    pub async fn holders(&self, projection: &str) -> Result<BTreeMap<u32, String>, BackendError> {
        let client = self.database.connection("reading leases").await?;
        let rows = client
            .query(
                "SELECT partition, holder FROM leases \
                 WHERE projection = $1 AND expires_at > now() ORDER BY partition",
                &[&projection],
            )
            .await
            .map_err(|error| backend("reading leases", error))?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, i32>(0) as u32, row.get(1)))
            .collect())
    }

    async fn renew(&self, projection: &str, lease: &LeaseConfig) -> Result<Vec<u32>, BackendError> {
        let client = self.database.connection("renewing leases").await?;
        let rows = client
            .query(
                "UPDATE leases SET expires_at = now() + make_interval(secs => $3) \
                 WHERE projection = $1 AND holder = $2 RETURNING partition",
                &[&projection, &lease.holder, &lease.ttl.as_secs_f64()],
            )
            .await
            .map_err(|error| backend("renewing leases", error))?;
        Ok(rows.iter().map(|row| row.get::<_, i32>(0) as u32).collect())
    }

    /// Records this process as a member sharing `projection` (for a lease's
    /// lifetime) and returns how many live members there are, this one included.
    async fn members(&self, projection: &str, lease: &LeaseConfig) -> Result<usize, BackendError> {
        let client = self
            .database
            .connection("joining the lease members")
            .await?;
        client
            .execute(
                "INSERT INTO lease_members (projection, holder, expires_at) \
                 VALUES ($1, $2, now() + make_interval(secs => $3)) \
                 ON CONFLICT (projection, holder) DO UPDATE SET expires_at = excluded.expires_at",
                &[&projection, &lease.holder, &lease.ttl.as_secs_f64()],
            )
            .await
            .map_err(|error| backend("joining the lease members", error))?;
        // Members that stopped renewing long ago are gone for good.
        client
            .execute(
                "DELETE FROM lease_members \
                 WHERE projection = $1 AND expires_at < now() - interval '1 hour'",
                &[&projection],
            )
            .await
            .map_err(|error| backend("forgetting departed lease members", error))?;
        let row = client
            .query_one(
                "SELECT count(*) FROM lease_members WHERE projection = $1 AND expires_at > now()",
                &[&projection],
            )
            .await
            .map_err(|error| backend("counting the lease members", error))?;
        Ok(row.get::<_, i64>(0) as usize)
    }

    async fn leave(&self, projection: &str, holder: &str) {
        if let Ok(client) = self.database.connection("leaving the lease members").await {
            let _ = client
                .execute(
                    "DELETE FROM lease_members WHERE projection = $1 AND holder = $2",
                    &[&projection, &holder],
                )
                .await;
        }
    }

    /// Partitions nobody holds, or whose lease expired.
    async fn free(&self, projection: &str, count: u32) -> Result<Vec<u32>, BackendError> {
        let client = self.database.connection("reading leases").await?;
        let rows = client
            .query(
                "SELECT p FROM generate_series(0, $2 - 1) AS p \
                 WHERE NOT EXISTS (SELECT 1 FROM leases l WHERE l.projection = $1 \
                                   AND l.partition = p AND l.expires_at > now())",
                &[&projection, &(count as i32)],
            )
            .await
            .map_err(|error| backend("reading leases", error))?;
        Ok(rows.iter().map(|row| row.get::<_, i32>(0) as u32).collect())
    }

    /// Takes a partition if it is free or its lease expired; true when taken.
    async fn claim(
        &self,
        projection: &str,
        partition: u32,
        lease: &LeaseConfig,
    ) -> Result<bool, BackendError> {
        let client = self.database.connection("claiming a lease").await?;
        let rows = client
            .query(
                "INSERT INTO leases (projection, partition, holder, expires_at) \
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4)) \
                 ON CONFLICT (projection, partition) DO UPDATE \
                     SET holder = excluded.holder, expires_at = excluded.expires_at \
                     WHERE leases.expires_at <= now() OR leases.holder = excluded.holder \
                 RETURNING partition",
                &[
                    &projection,
                    &(partition as i32),
                    &lease.holder,
                    &lease.ttl.as_secs_f64(),
                ],
            )
            .await
            .map_err(|error| backend("claiming a lease", error))?;
        Ok(!rows.is_empty())
    }

    async fn release(&self, projection: &str, partition: u32, holder: &str) {
        let released = async {
            let client = self.database.connection("releasing a lease").await?;
            client
                .execute(
                    "DELETE FROM leases WHERE projection = $1 AND partition = $2 AND holder = $3",
                    &[&projection, &(partition as i32), &holder],
                )
                .await
                .map_err(|error| backend("releasing a lease", error))
        };
        if let Err(error) = released.await {
            // It expires on its own.
            tracing::warn!(%error, projection, partition, "could not release a lease");
        }
    }
}

/// A partitioned projection run under leases. Dropping it stops the runners
/// and hands the leases back in the background; [`PartitionedRunner::stop`]
/// waits for that.
pub struct PartitionedRunner {
    stop: watch::Sender<bool>,
    held: watch::Receiver<Vec<u32>>,
    task: JoinHandle<()>,
}

impl PartitionedRunner {
    /// Starts claiming and running partitions of `handler`, split `count` ways
    /// (one partition for a handler that is not partitionable: one process runs
    /// it at a time, and another takes over when it dies).
    pub fn spawn(
        leases: PgLeases,
        store: Arc<dyn EventStore>,
        views: Arc<dyn ViewStore>,
        handler: Handler,
        count: u32,
        runner: RunnerConfig,
        lease: LeaseConfig,
    ) -> Self {
        let count = if handler.partitionable {
            count.max(1)
        } else {
            1
        };
        // A single partition is the projection itself, under its own name.
        let partitions = if count == 1 {
            vec![Arc::clone(&handler.projection)]
        } else {
            Partition::all(Arc::clone(&handler.projection), count)
        };
        let kind = handler.kind;
        let start: Starter = Arc::new(move |partition| {
            let (store, views, runner) = (Arc::clone(&store), Arc::clone(&views), runner.clone());
            let projection = Arc::clone(&partitions[partition as usize]);
            Box::pin(async move {
                spawn_projection(store, views, projection, kind, runner)
                    .await
                    .map_err(|error| BackendError::with_source("starting a runner", error))
            })
        });
        Self::coordinate(leases, handler.projection.name(), count, lease, start)
    }

    /// Runs what `start` starts (a relay, a broker consumer) in one process at
    /// a time, under the lease `name`: another process takes over when this
    /// one dies or stops renewing, as for a projection that is not
    /// partitioned. `start` is called again after a failure or a lost lease.
    pub fn singleton<F, Fut>(leases: PgLeases, name: &str, lease: LeaseConfig, start: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<RunnerHandle, BackendError>> + Send + 'static,
    {
        let start: Starter = Arc::new(move |_| Box::pin(start()));
        Self::coordinate(leases, name, 1, lease, start)
    }

    fn coordinate(
        leases: PgLeases,
        name: &str,
        count: u32,
        lease: LeaseConfig,
        start: Starter,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let (held_sender, held) = watch::channel(Vec::new());
        let coordinator = Coordinator {
            leases,
            start,
            name: name.to_owned(),
            count,
            lease,
            running: BTreeMap::new(),
            held: held_sender,
            renewed_at: Instant::now(),
        };
        Self {
            stop,
            held,
            task: tokio::spawn(coordinator.run(stopped)),
        }
    }

    /// The partitions this process runs now.
    pub fn held(&self) -> watch::Receiver<Vec<u32>> {
        self.held.clone()
    }

    /// Stops every runner after its batch and hands the leases back.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts the runner of a partition.
type Starter = Arc<
    dyn Fn(u32) -> Pin<Box<dyn Future<Output = Result<RunnerHandle, BackendError>> + Send>>
        + Send
        + Sync,
>;

struct Coordinator {
    leases: PgLeases,
    start: Starter,
    name: String,
    count: u32,
    lease: LeaseConfig,
    running: BTreeMap<u32, RunnerHandle>,
    held: watch::Sender<Vec<u32>>,
    /// When the leases were last renewed, by this process's monotonic clock.
    renewed_at: Instant,
}

impl Coordinator {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        let tick = self.lease.ttl / 3;
        loop {
            if let Err(error) = self.balance().await {
                tracing::warn!(%error, projection = %self.name, "could not renew or claim leases");
                self.stop_when_leases_may_have_expired().await;
            }
            self.held
                .send_replace(self.running.keys().copied().collect());
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stopped.wait_for(|stop| *stop) => break,
            }
        }
        for (partition, runner) in std::mem::take(&mut self.running) {
            runner.stop().await;
            self.leases
                .release(&self.name, partition, &self.lease.holder)
                .await;
        }
        self.leases.leave(&self.name, &self.lease.holder).await;
    }

    /// Stops every runner once the leases have gone unrenewed for two thirds of
    /// their lifetime: by the time they expire and another process claims them,
    /// this one must have stopped applying.
    async fn stop_when_leases_may_have_expired(&mut self) {
        if self.running.is_empty() || self.renewed_at.elapsed() < self.lease.ttl * 2 / 3 {
            return;
        }
        tracing::warn!(
            projection = %self.name,
            "leases not renewed for two thirds of their lifetime; stopping their runners"
        );
        for (_, runner) in std::mem::take(&mut self.running) {
            runner.stop().await;
        }
    }

    /// Renews, drops what was lost, then claims or hands back toward a fair share.
    async fn balance(&mut self) -> Result<(), BackendError> {
        // A runner whose task ended (it panicked, or gave up) holds its lease
        // for nothing: hand it back so that one process runs it again.
        let ended: Vec<u32> = self
            .running
            .iter()
            .filter(|(_, runner)| runner.is_finished())
            .map(|(partition, _)| *partition)
            .collect();
        for partition in ended {
            tracing::warn!(projection = %self.name, partition, "a runner ended; handing its lease back");
            self.running.remove(&partition);
            self.leases
                .release(&self.name, partition, &self.lease.holder)
                .await;
        }
        let renew_started = Instant::now();
        let renewed = self.leases.renew(&self.name, &self.lease).await?;
        self.renewed_at = renew_started;
        let lost: Vec<u32> = self
            .running
            .keys()
            .filter(|partition| !renewed.contains(partition))
            .copied()
            .collect();
        for partition in lost {
            tracing::warn!(projection = %self.name, partition, "lost a lease; stopping its runner");
            if let Some(runner) = self.running.remove(&partition) {
                runner.stop().await;
            }
        }
        let members = self.leases.members(&self.name, &self.lease).await?.max(1);
        let share = (self.count as usize).div_ceil(members);
        if self.running.len() > share {
            if let Some((&partition, _)) = self.running.iter().next_back() {
                if let Some(runner) = self.running.remove(&partition) {
                    runner.stop().await;
                }
                self.leases
                    .release(&self.name, partition, &self.lease.holder)
                    .await;
            }
            return Ok(());
        }
        let mut free = self.leases.free(&self.name, self.count).await?;
        fastrand::shuffle(&mut free);
        for partition in free {
            if self.running.len() >= share {
                break;
            }
            if !self
                .leases
                .claim(&self.name, partition, &self.lease)
                .await?
            {
                continue;
            }
            // Bounded, so a slow start (a broker that does not answer) cannot
            // hold back the renewals past the lease's lifetime.
            let runner = tokio::time::timeout(self.lease.ttl / 3, (self.start)(partition))
                .await
                .unwrap_or_else(|_| Err(BackendError::msg("starting the runner timed out")));
            match runner {
                Ok(runner) => {
                    self.running.insert(partition, runner);
                }
                Err(error) => {
                    self.leases
                        .release(&self.name, partition, &self.lease.holder)
                        .await;
                    return Err(BackendError::with_source(
                        format!("starting partition {partition} of `{}`", self.name),
                        error,
                    ));
                }
            }
        }
        Ok(())
    }
}
