//! The `diptych` command: benchmarks, a look into a store, and the operator's
//! controls of projections.

mod bench;
mod projections;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use diptych::sqlite::SqliteStore;
use diptych::{EventStore, Position, StreamId, StreamRead};

/// diptych: an event-sourced CQRS platform.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Append throughput and latency: 1, 16 and 64 writers; 1 and 10 events per
    /// append; own streams and one hot stream; durable.
    Append {
        /// Print one JSON object per result line.
        #[arg(long)]
        json: bool,
        /// Seconds each measurement runs (the store and the floor each).
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Writer counts to run, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        writers: Vec<usize>,
        /// Events per append to run, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,10")]
        events: Vec<usize>,
        /// Where to put the database files (a temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
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

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench {
            bench:
                BenchCommand::Append {
                    json,
                    seconds,
                    writers,
                    events,
                    dir,
                },
        } => {
            anyhow::ensure!(
                seconds.is_finite() && seconds > 0.0,
                "--seconds must be a positive number, got {seconds}"
            );
            anyhow::ensure!(
                writers.iter().chain(&events).all(|&count| count > 0),
                "--writers and --events take positive counts"
            );
            let config = bench::AppendBenchConfig {
                writers,
                events_per_append: events,
                duration: Duration::from_secs_f64(seconds),
                directory: dir,
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
            bench::run_append(&config, |result| {
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
