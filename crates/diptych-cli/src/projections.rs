//! `diptych projections …`: an operator's view of the projections of a data
//! directory, and requests to them.
//!
//! Requests (pause, resume, rebuild, retry, skip) are recorded in the view
//! database; the process running the projections picks them up within its
//! control poll, wherever it runs. `rebuild` then follows the new generation with
//! a progress bar until it is switched in.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use diptych::sqlite::{SqliteStore, SqliteViews};
use diptych::{Control, EventStore, Position, ProjectionStatus, ViewStore, projection_status};
use indicatif::{ProgressBar, ProgressStyle};

/// What to do with the projections.
#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// Position, head, lag, state and parked events of every projection.
    Status {
        /// Print one JSON object per projection.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a projection from position 0 beside the served views, then switch.
    Rebuild {
        /// The projection.
        name: String,
        /// Record the request and return without following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop applying events to a projection until resumed.
    Pause {
        /// The projection.
        name: String,
    },
    /// Apply events to a paused projection again.
    Resume {
        /// The projection.
        name: String,
    },
    /// List a projection's parked events with their errors.
    Parked {
        /// The projection.
        name: String,
        /// Print one JSON object per event.
        #[arg(long)]
        json: bool,
    },
    /// Try a parked event again (after deploying a fix).
    Retry {
        /// The projection.
        name: String,
        /// The event's position, as `parked` lists it.
        position: u64,
    },
    /// Give up on a parked event without applying it.
    Skip {
        /// The projection.
        name: String,
        /// The event's position, as `parked` lists it.
        position: u64,
    },
}

/// The event store and view store of a data directory, both of which must exist.
fn open(data: &Path) -> Result<(SqliteStore, SqliteViews)> {
    let events = data.join("events.db");
    let views = data.join("views.db");
    for path in [&events, &views] {
        anyhow::ensure!(
            path.exists(),
            "no {} in {}: pass --data with the directory of a diptych application that has run \
             its projections",
            path.file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("database"),
            data.display()
        );
    }
    let store = SqliteStore::open(&events)
        .with_context(|| format!("opening the event store at {}", events.display()))?;
    let views = SqliteViews::open(&views)
        .with_context(|| format!("opening the views at {}", views.display()))?;
    Ok((store, views))
}

/// Runs one `projections` command against the data directory.
pub async fn run(data: PathBuf, command: ProjectionsCommand) -> Result<()> {
    let (store, views) = open(&data)?;
    let mut stdout = std::io::stdout().lock();
    match command {
        ProjectionsCommand::Status { json } => {
            let statuses = projection_status(&store, &views).await?;
            if json {
                for status in &statuses {
                    writeln!(stdout, "{}", serde_json::to_string(status)?)?;
                }
            } else {
                print_status_table(&mut stdout, &statuses)?;
            }
        }
        ProjectionsCommand::Rebuild { name, no_wait } => {
            views.control(&name, Control::Rebuild).await?;
            writeln!(stdout, "rebuild of `{name}` requested")?;
            drop(stdout);
            if !no_wait {
                follow_rebuild(&store, &views, &name).await?;
            }
        }
        ProjectionsCommand::Pause { name } => {
            views.control(&name, Control::Pause).await?;
            writeln!(stdout, "`{name}` will pause after its current batch")?;
        }
        ProjectionsCommand::Resume { name } => {
            views.control(&name, Control::Resume).await?;
            writeln!(stdout, "`{name}` resumes")?;
        }
        ProjectionsCommand::Parked { name, json } => {
            let parked = views.parked(&name).await?;
            if json {
                for event in &parked {
                    writeln!(stdout, "{}", serde_json::to_string(event)?)?;
                }
            } else if parked.is_empty() {
                writeln!(stdout, "no parked events for `{name}`")?;
            } else {
                writeln!(
                    stdout,
                    "{:>10}  {:<24}  {:<20}  {:>8}  {:<9}  error",
                    "position", "stream", "type", "attempts", "retrying"
                )?;
                for event in &parked {
                    writeln!(
                        stdout,
                        "{:>10}  {:<24}  {:<20}  {:>8}  {:<9}  {}",
                        event.position,
                        event.stream,
                        event.event_type,
                        event.attempts,
                        if event.retry_requested { "yes" } else { "no" },
                        event.error
                    )?;
                }
            }
        }
        ProjectionsCommand::Retry { name, position } => {
            views
                .control(&name, Control::Retry(Position(position)))
                .await?;
            writeln!(stdout, "event {position} of `{name}` will be tried again")?;
        }
        ProjectionsCommand::Skip { name, position } => {
            views
                .control(&name, Control::Skip(Position(position)))
                .await?;
            writeln!(stdout, "event {position} of `{name}` skipped")?;
        }
    }
    Ok(())
}

fn print_status_table(out: &mut impl Write, statuses: &[ProjectionStatus]) -> Result<()> {
    if statuses.is_empty() {
        writeln!(out, "no projections have run on this data directory")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:<15} {:<11} {:>10} {:>10} {:>10} {:>9} {:>7}",
        "name", "kind", "state", "position", "head", "lag", "lag ms", "parked"
    )?;
    for status in statuses {
        let kind = match status.kind {
            diptych::HandlerKind::Projection => "projection",
            diptych::HandlerKind::ProcessManager => "process-manager",
            diptych::HandlerKind::Inbound => "inbound",
        };
        let state = serde_json::to_value(status.state)?;
        writeln!(
            out,
            "{:<24} {:<15} {:<11} {:>10} {:>10} {:>10} {:>9} {:>7}",
            status.name,
            kind,
            state.as_str().unwrap_or("?"),
            status.position,
            status.head,
            status.lag_events,
            status.lag_ms,
            status.parked
        )?;
        if let Some(error) = &status.stalled {
            writeln!(out, "  stalled on: {error}")?;
        }
    }
    Ok(())
}

/// Draws the rebuild's progress (events applied to the new generation out of the
/// head, with rate and ETA) until the new generation is served.
async fn follow_rebuild(store: &SqliteStore, views: &SqliteViews, name: &str) -> Result<()> {
    let start = views.projection(name).await?;
    let bar = ProgressBar::new(store.head().await?.0.max(1));
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} events  {per_sec}  eta {eta}")
            .context("the progress bar template")?
            .progress_chars("=> "),
    );
    bar.set_message(format!("rebuilding {name}"));
    let started = Instant::now();
    let mut hinted = false;
    loop {
        let record = views.projection(name).await?;
        let head = store.head().await?.0;
        bar.set_length(head.max(1));
        match record.rebuild {
            Some(rebuild) => bar.set_position(rebuild.position.0),
            None if record.generation != start.generation => {
                bar.set_position(head);
                bar.finish_with_message(format!("rebuilt {name}"));
                println!(
                    "`{name}` now serves generation {} ({} events in {:.1} s)",
                    record.generation,
                    record.position,
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            None if !record.rebuild_requested => {
                bar.abandon();
                bail!("the rebuild of `{name}` is no longer requested nor running");
            }
            None => {}
        }
        if !hinted && record.rebuild.is_none() && started.elapsed() > Duration::from_secs(5) {
            hinted = true;
            bar.println(format!(
                "waiting for the process that runs `{name}` to start the rebuild (is it running on this data directory?); \
                 Ctrl-C leaves the request in place"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
