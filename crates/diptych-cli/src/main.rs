//! The `diptych` command: the demo shop, benchmarks, a look into a store, and
//! the operator's controls of projections.

mod bench;
mod bench_command;
mod bench_feed;
mod bench_http;
mod bench_pg;
mod bench_project_pg;
mod bench_query;
mod bench_relay;
mod projections;
mod serve;
mod social;
mod split;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use diptych::sqlite::SqliteStore;
use diptych::{EventStore, Position, StreamId, StreamRead};

// The server allocates many small buffers on many threads (requests, JSON
// values, rows); mimalloc's per-thread free lists serve that pattern with less
// contention and fragmentation than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// diptych: an event-sourced CQRS platform.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the reference shop (or, with --app social, the social network)
    /// over HTTP on SQLite, seeded on first start.
    Demo {
        /// The application: `shop` or `social`.
        #[arg(long, default_value = "shop", value_parser = ["shop", "social"])]
        app: String,
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        /// The data directory (events.db and views.db); `data` for the shop,
        /// `data-social` for the social network.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Simulated customers that keep placing orders.
        #[arg(long, default_value_t = 0)]
        traffic: usize,
        /// Serve open on a non-loopback address anyway.
        #[arg(long)]
        insecure: bool,
        /// Keep events and views in PostgreSQL (`postgres://user@host:port/db`)
        /// instead of the data directory.
        #[arg(long)]
        store: Option<String>,
        /// The PostgreSQL schema of diptych's tables.
        #[arg(long, requires = "store")]
        schema: Option<String>,
        /// What this node does, comma separated: command, query, projector,
        /// inbound, relay (all by default). Nodes with different roles share one
        /// PostgreSQL database, so this needs --store.
        #[arg(long, value_delimiter = ',', requires = "store")]
        role: Vec<String>,
        /// Partitions of each partitionable projection, shared by the projector
        /// nodes under leases (PostgreSQL).
        #[arg(long, default_value_t = 1, requires = "store")]
        partitions: u32,
        /// A NATS server (`nats://host:4222`) the relay role publishes the log to.
        #[arg(long)]
        broker: Option<String>,
        /// This service's name in the broker's subjects. `catalog`,
        /// `inventory`, `customers` or `ordering` runs only that service of the
        /// split shop (with --broker); any other name runs the whole shop.
        #[arg(long, default_value = "shop")]
        service: String,
        /// The catalog service's address, for the ordering service's order
        /// detail (`http://127.0.0.1:8081`).
        #[arg(long)]
        catalog: Option<String>,
        /// Run the shop as four services, each its own process with its own
        /// data directory and port (from --addr's port up), wired through
        /// --broker (`nats://127.0.0.1:4222` by default).
        #[arg(long, conflicts_with_all = ["store", "role", "catalog", "traffic"])]
        split: bool,
    },
    /// Serve the shop from a settings file (address, storage, roles, tokens).
    Serve {
        /// The TOML settings file.
        #[arg(long)]
        config: PathBuf,
        /// Serve without tokens on a non-loopback address anyway.
        #[arg(long)]
        insecure: bool,
        /// What this node does, comma separated (overrides the file's `roles`).
        #[arg(long, value_delimiter = ',')]
        role: Vec<String>,
        /// The split shop's service this node runs (`catalog`, `inventory`,
        /// `customers`, `ordering`); overrides the file's `service`.
        #[arg(long)]
        service: Option<String>,
    },
    /// Measure the store against a floor measured in the same run.
    Bench {
        #[command(subcommand)]
        bench: BenchCommand,
    },
    /// Status of the projections of a data directory, and requests to them.
    Projections {
        /// The data directory holding `events.db` and `views.db`.
        #[arg(long, default_value = "data", global = true)]
        data: PathBuf,
        #[command(subcommand)]
        command: projections::ProjectionsCommand,
    },
    /// Read streams and the global log of a store.
    Streams {
        /// The data directory holding `events.db`.
        #[arg(long, default_value = "data", global = true)]
        data: PathBuf,
        #[command(subcommand)]
        command: StreamsCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Projection catch-up: a log of N events into a SQLite view, one upsert per
    /// event, against the same upserts done directly with rusqlite (or, with
    /// `--store`, into PostgreSQL against the same upserts done directly with
    /// tokio-postgres).
    Project {
        /// Print one JSON object per result line.
        #[arg(long)]
        json: bool,
        /// Events in the log (1,000,000 on SQLite; 200,000 on PostgreSQL).
        #[arg(long)]
        events: Option<u64>,
        /// Events per transaction, for the runner and the floor alike.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Where to put the database files (a temporary directory by default; an
        /// existing log of the same size there is reused).
        #[arg(long, conflicts_with = "store")]
        dir: Option<PathBuf>,
        /// Measure PostgreSQL instead (`postgres://user@host:port/db`): fresh
        /// schemas in that database, dropped afterwards.
        #[arg(long)]
        store: Option<String>,
    },
    /// Commands and view reads over real HTTP on loopback at increasing
    /// concurrency, against the in-process command path.
    Http {
        /// Print one JSON object per result line.
        #[arg(long)]
        json: bool,
        /// Seconds each measurement runs.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Client counts to run, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        clients: Vec<usize>,
        /// Client counts at which the reads run, comma separated; by default
        /// those of `--clients` and 256.
        #[arg(long, value_delimiter = ',')]
        read_clients: Option<Vec<usize>>,
    },
    /// The outbox relay to NATS JetStream or RabbitMQ: publish throughput
    /// against raw publishes of the same events, and append-to-remote-view
    /// latency.
    Relay {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// The broker: `nats://127.0.0.1:4222` or
        /// `amqp://guest:guest@127.0.0.1:5672/%2f`.
        #[arg(long)]
        broker: String,
        /// Events in the log.
        #[arg(long, default_value_t = 20_000)]
        events: u64,
        /// Events per page (the relay's checkpoint moves once per page).
        #[arg(long, default_value_t = 500)]
        page: usize,
        /// Events the end-to-end latency is measured on, one at a time.
        #[arg(long, default_value_t = 300)]
        samples: usize,
    },
    /// A post by a user with many followers (the social network's fan-out):
    /// from sending the command until every follower's feed has it, against
    /// the same feed documents upserted straight into SQLite.
    Feed {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// The author's followers.
        #[arg(long, default_value_t = 10_000)]
        followers: usize,
        /// Posts measured, each alternated with a floor round.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Where to put the database files: a new or empty directory (a
        /// temporary one by default).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Live lag: appends at a steady rate; the time from each append's
    /// acknowledgement to the view having applied it, against a bare subscriber.
    Lag {
        /// Print one JSON object per result line.
        #[arg(long)]
        json: bool,
        /// Appends per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Where to put the database files (a temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Append throughput and latency: 1, 16 and 64 writers; 1 and 10 events per
    /// append; own streams and one hot stream; durable.
    Append {
        /// Print one JSON object per result line.
        #[arg(long)]
        json: bool,
        /// Seconds each measurement runs (the store and the floor each).
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Writer counts to run, comma separated (1,16,64 on SQLite; 1,8,32 on
        /// PostgreSQL).
        #[arg(long, value_delimiter = ',')]
        writers: Option<Vec<usize>>,
        /// Events per append to run, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,10")]
        events: Vec<usize>,
        /// Where to put the database files (a temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Measure a PostgreSQL store instead (`postgres://user@host:port/db`):
        /// fresh schemas in that database, dropped afterwards; writers default
        /// to 1, 8 and 32.
        #[arg(long)]
        store: Option<String>,
    },
    /// Commands as users run them (`Repository::execute`: load, decide,
    /// append), on new, existing, cold and hot aggregates, against the floor of
    /// `bench append`; and the load of one aggregate of 10,000 events.
    Command {
        /// Print one JSON object per result line.
        #[arg(long)]
        json: bool,
        /// Seconds each measurement runs (the store and the floor each).
        #[arg(long, default_value_t = 4.0)]
        seconds: f64,
        /// Scenarios to run, comma separated: new, existing, cold, hot, load_10k.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "new,existing,cold,hot,load_10k"
        )]
        scenarios: Vec<String>,
        /// Writer counts, comma separated (1,16,64,256 on SQLite, where `hot`
        /// leaves out 256; 1,16,32 on PostgreSQL).
        #[arg(long, value_delimiter = ',')]
        writers: Option<Vec<usize>>,
        /// Aggregates of the `cold` scenario.
        #[arg(long, default_value_t = 200_000)]
        aggregates: usize,
        /// Aggregates of the `existing` scenario.
        #[arg(long, default_value_t = 10_000)]
        existing: usize,
        /// The aggregate cache's capacity for new, existing and hot (the
        /// repository's default when not given; `cold` never caches).
        #[arg(long)]
        cache: Option<usize>,
        /// Where to put the database files (a temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Measure a PostgreSQL store instead (`postgres://user@host:port/db`):
        /// fresh schemas in that database, dropped afterwards.
        #[arg(long)]
        store: Option<String>,
    },
}

#[derive(Subcommand)]
enum StreamsCommand {
    /// Print one stream's events as JSON lines, oldest first.
    Show {
        /// The stream id, for example `order-42`.
        stream: String,
    },
    /// Print the global log after a position as JSON lines.
    Log {
        /// Print events after this position.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Print at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Print the position of the last event.
    Head,
}

fn main() {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));
    if let Err(error) = result {
        if is_broken_pipe(&error) {
            return;
        }
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

/// The roles named, or all of them when none is.
fn roles_or_all(names: &[String]) -> Result<serve::Roles> {
    if names.is_empty() {
        Ok(serve::Roles::ALL)
    } else {
        Ok(serve::Roles::parse(names)?)
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench {
            bench:
                BenchCommand::Relay {
                    json,
                    broker,
                    events,
                    page,
                    samples,
                },
        } => {
            anyhow::ensure!(
                events > 0 && page > 0 && samples > 0,
                "--events, --page and --samples take positive counts"
            );
            let result = bench_relay::run(&broker, events, page, samples).await?;
            if json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                println!(
                    "{}: {} events, pages of {}: {:.0} events/s; floor {:.0} events/s; ratio {:.2}; append to remote view p50 {} us, p99 {} us ({} samples)",
                    result.bench,
                    result.events,
                    result.page,
                    result.events_per_sec,
                    result.floor_events_per_sec,
                    result.ratio,
                    result.e2e_p50_us,
                    result.e2e_p99_us,
                    result.e2e_samples
                );
            }
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Command {
                    json,
                    seconds,
                    scenarios,
                    writers,
                    aggregates,
                    existing,
                    cache,
                    dir,
                    store,
                },
        } => {
            check_seconds(seconds)?;
            anyhow::ensure!(
                writers.iter().flatten().all(|&count| count > 0) && aggregates > 0 && existing > 0,
                "--writers, --aggregates and --existing take positive counts"
            );
            let config = bench_command::CommandBenchConfig {
                postgres: store,
                scenarios,
                writers,
                duration: Duration::from_secs_f64(seconds),
                cold_aggregates: aggregates,
                existing_aggregates: existing,
                cache_capacity: cache,
                directory: dir,
            };
            if !json {
                println!(
                    "{:>8} {:>7} {:>11} {:>9} {:>9} {:>11} {:>6} {:>9} {:>7}",
                    "scenario",
                    "writers",
                    "commands/s",
                    "p50 us",
                    "p99 us",
                    "floor/s",
                    "ratio",
                    "conflicts",
                    "gave up"
                );
            }
            bench_query::reset_peak_rss();
            bench_command::run(&config, |line| {
                let text = match (line, json) {
                    (bench_command::Line::Command(result), true) => {
                        serde_json::to_string(result).unwrap_or_default()
                    }
                    (bench_command::Line::Load(result), true) => {
                        serde_json::to_string(result).unwrap_or_default()
                    }
                    (bench_command::Line::Command(result), false) => format!(
                        "{:>8} {:>7} {:>11.0} {:>9} {:>9} {:>11.0} {:>6.2} {:>9} {:>7}",
                        result.scenario,
                        result.writers,
                        result.commands_per_sec,
                        result.p50_us,
                        result.p99_us,
                        result.floor_per_sec,
                        result.ratio,
                        result.conflicts_retried,
                        result.gave_up
                    ),
                    (bench_command::Line::Load(result), false) => format!(
                        "load_10k: {:.1} ms through the repository, {:.1} ms with a plain SELECT",
                        result.load_10k_ms, result.floor_ms
                    ),
                };
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{text}");
                let _ = stdout.flush();
            })
            .await?;
            eprintln!(
                "peak RSS: {:.0} MiB",
                bench_query::memory_kib("VmHWM:") as f64 / 1024.0
            );
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Append {
                    json,
                    seconds,
                    writers,
                    events,
                    dir,
                    store,
                },
        } => {
            check_seconds(seconds)?;
            anyhow::ensure!(
                writers
                    .iter()
                    .flatten()
                    .chain(&events)
                    .all(|&count| count > 0),
                "--writers and --events take positive counts"
            );
            let print = move |result: &bench::AppendBenchResult| {
                let line = if json {
                    serde_json::to_string(result).unwrap_or_default()
                } else {
                    format!(
                        "{:>7} {:>6} {:>7} {:>12.0} {:>9} {:>9} {:>12.0} {:>6.2}",
                        result.writers,
                        result.events_per_append,
                        result.streams,
                        result.events_per_sec,
                        result.p50_us,
                        result.p99_us,
                        result.floor_events_per_sec,
                        result.ratio
                    )
                };
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{line}");
                let _ = stdout.flush();
            };
            if !json {
                println!(
                    "{:>7} {:>6} {:>5} {:>12} {:>9} {:>9} {:>12} {:>6}",
                    "writers",
                    "events",
                    "streams",
                    "events/s",
                    "p50 us",
                    "p99 us",
                    "floor ev/s",
                    "ratio"
                );
            }
            if let Some(url) = store {
                let writers = writers.unwrap_or_else(|| vec![1, 8, 32]);
                let duration = Duration::from_secs_f64(seconds);
                return bench_pg::run_append(&url, &writers, &events, duration, print).await;
            }
            let config = bench::AppendBenchConfig {
                writers: writers.unwrap_or_else(|| vec![1, 16, 64]),
                events_per_append: events,
                duration: Duration::from_secs_f64(seconds),
                directory: dir,
            };
            bench::run_append(&config, print).await
        }
        Command::Bench {
            bench:
                BenchCommand::Project {
                    json,
                    events,
                    batch,
                    dir,
                    store,
                },
        } => {
            anyhow::ensure!(
                events != Some(0) && batch > 0,
                "--events and --batch take positive counts"
            );
            let result = match store {
                Some(url) => {
                    let events = events.unwrap_or(200_000);
                    bench_project_pg::run_project(&url, events, batch).await?
                }
                None => {
                    let events = events.unwrap_or(1_000_000);
                    bench_query::run_project(events, batch, dir).await?
                }
            };
            if json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                println!(
                    "{}: {} events, {} per batch: {:.0} events/s; floor {:.0} events/s; ratio {:.2}; RSS {:.0} MiB at start, peak {:.0} MiB",
                    result.bench,
                    result.events,
                    result.batch,
                    result.events_per_sec,
                    result.floor_events_per_sec,
                    result.ratio,
                    result.start_rss_mib,
                    result.peak_rss_mib
                );
            }
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Feed {
                    json,
                    followers,
                    rounds,
                    dir,
                },
        } => {
            anyhow::ensure!(
                followers > 0 && rounds > 0,
                "--followers and --rounds must be positive"
            );
            let result = bench_feed::run_feed(followers, rounds, dir).await?;
            if json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                println!(
                    "feed fan-out to {} followers: p50 {:.1} ms, max {:.1} ms; floor (same upserts) \
                     p50 {:.1} ms; ratio {:.2}; setup {:.1} s; peak RSS {:.0} MiB",
                    result.followers,
                    result.fanout_p50_ms,
                    result.fanout_max_ms,
                    result.floor_p50_ms,
                    result.ratio,
                    result.setup_s,
                    result.peak_rss_mib
                );
            }
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Lag {
                    json,
                    rate,
                    seconds,
                    dir,
                },
        } => {
            check_seconds(seconds)?;
            anyhow::ensure!(rate > 0, "--rate must be positive");
            let result = bench_query::run_lag(rate, Duration::from_secs_f64(seconds), dir).await?;
            if json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                println!(
                    "lag at {} appends/s (achieved {:.0}), {} events: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
                     bare subscriber p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                    result.rate,
                    result.achieved_rate,
                    result.events,
                    result.p50_us as f64 / 1000.0,
                    result.p99_us as f64 / 1000.0,
                    result.max_us as f64 / 1000.0,
                    result.floor_p50_us as f64 / 1000.0,
                    result.floor_p99_us as f64 / 1000.0,
                    result.floor_max_us as f64 / 1000.0
                );
            }
            Ok(())
        }
        Command::Demo {
            app,
            addr,
            data,
            traffic,
            insecure,
            store,
            schema,
            role,
            partitions,
            broker,
            service,
            catalog,
            split,
        } => {
            if app == "social" {
                anyhow::ensure!(
                    !split && catalog.is_none() && service == "shop",
                    "--split, --catalog and --service are the shop's: drop them for --app social"
                );
                let data = data.unwrap_or_else(|| PathBuf::from("data-social"));
                return social::run(social::SocialConfig {
                    addr,
                    backend: serve::Backend::choose(store, schema, data),
                    insecure,
                    traffic,
                    roles: roles_or_all(&role)?,
                    partitions: partitions.max(1),
                    broker,
                })
                .await;
            }
            let data = data.unwrap_or_else(|| PathBuf::from("data"));
            if split {
                return split::run(split::SplitConfig {
                    addr,
                    data,
                    broker: broker.unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned()),
                    insecure,
                })
                .await;
            }
            serve::run(serve::ServeConfig {
                addr,
                backend: serve::Backend::choose(store, schema, data),
                auth: diptych::http::Auth::open(),
                insecure,
                seed: true,
                traffic,
                roles: roles_or_all(&role)?,
                partitions: partitions.max(1),
                broker,
                service,
                catalog,
                catalog_token: None,
            })
            .await
        }
        Command::Serve {
            config,
            insecure,
            role,
            service,
        } => {
            let (file, auth) = serve::ServeFile::load(&config)?;
            let roles = if !role.is_empty() {
                serve::Roles::parse(&role)?
            } else if let Some(names) = &file.roles {
                serve::Roles::parse(names)?
            } else {
                serve::Roles::ALL
            };
            let backend = file.backend()?;
            anyhow::ensure!(
                roles == serve::Roles::ALL || matches!(backend, serve::Backend::Postgres { .. }),
                "roles split the shop across nodes that share one PostgreSQL database; on SQLite \
                 one node does everything: drop `roles` (or --role), or set `store`"
            );
            serve::run(serve::ServeConfig {
                addr: file.addr,
                backend,
                auth,
                insecure,
                seed: false,
                traffic: 0,
                roles,
                partitions: file.partitions.unwrap_or(1).max(1),
                broker: file.broker.clone(),
                service: service
                    .or_else(|| file.service.clone())
                    .unwrap_or_else(|| "shop".to_owned()),
                catalog: file.catalog.clone(),
                catalog_token: file.catalog_token.clone(),
            })
            .await
        }
        Command::Bench {
            bench:
                BenchCommand::Http {
                    json,
                    seconds,
                    clients,
                    read_clients,
                },
        } => {
            let read_clients = read_clients.unwrap_or_else(|| {
                let mut counts = clients.clone();
                counts.push(256);
                counts.sort_unstable();
                counts.dedup();
                counts
            });
            anyhow::ensure!(
                seconds.is_finite()
                    && seconds > 0.0
                    && clients.iter().chain(&read_clients).all(|&c| c > 0),
                "--seconds, --clients and --read-clients must be positive"
            );
            if !json {
                println!(
                    "{:<14} {:>7} {:>10} {:>9} {:>9} {:>12} {:>6} {:>10}",
                    "operation",
                    "clients",
                    "per s",
                    "p50 us",
                    "p99 us",
                    "floor per s",
                    "ratio",
                    "sagas/s"
                );
            }
            let bench = bench_http::HttpBench {
                command_clients: clients,
                read_clients,
                duration: Duration::from_secs_f64(seconds),
            };
            bench_http::run(&bench, |result| {
                let line = if json {
                    serde_json::to_string(result).unwrap_or_default()
                } else {
                    let optional = |value: Option<f64>, precision: usize| {
                        value.map_or_else(|| "-".to_owned(), |v| format!("{v:.precision$}"))
                    };
                    format!(
                        "{:<14} {:>7} {:>10.0} {:>9} {:>9} {:>12} {:>6} {:>10}",
                        result.operation,
                        result.clients,
                        result.per_sec,
                        result.p50_us,
                        result.p99_us,
                        optional(result.floor_per_sec, 0),
                        optional(result.ratio, 2),
                        optional(result.sagas_per_sec, 0)
                    )
                };
                println!("{line}");
            })
            .await
        }
        Command::Projections { data, command } => projections::run(data, command).await,
        Command::Streams { data, command } => {
            let path = data.join("events.db");
            anyhow::ensure!(
                path.exists(),
                "no store at {}: pass --data with the directory that holds events.db",
                path.display()
            );
            let store = SqliteStore::open(&path)
                .with_context(|| format!("opening the store at {}", path.display()))?;
            let mut stdout = std::io::stdout().lock();
            match command {
                StreamsCommand::Show { stream } => {
                    let stream = StreamId::new(stream)?;
                    let mut from = 1;
                    loop {
                        let page = store
                            .read_stream(StreamRead::forward(stream.clone(), from, 500))
                            .await?;
                        let Some(last) = page.last() else { break };
                        from = last.stream_version + 1;
                        for event in &page {
                            writeln!(stdout, "{}", serde_json::to_string(event)?)?;
                        }
                    }
                }
                StreamsCommand::Log { after, limit } => {
                    for event in store.read_all(Position(after), limit).await? {
                        writeln!(stdout, "{}", serde_json::to_string(&event)?)?;
                    }
                }
                StreamsCommand::Head => writeln!(stdout, "{}", store.head().await?)?,
            }
            Ok(())
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A bench's `--seconds`: a measurement needs a positive, finite duration.
fn check_seconds(seconds: f64) -> Result<()> {
    anyhow::ensure!(
        seconds.is_finite() && seconds > 0.0,
        "--seconds must be a positive number, got {seconds}"
    );
    Ok(())
}
