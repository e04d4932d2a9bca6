//! Operators' requests and runners' reports, recorded for whichever process
//! runs the projection, and announced to every process.

use deadpool_postgres::GenericClient;
use diptych_core::backend_kit::{no_parked_event, refuse_process_manager};
use diptych_core::{Control, ViewError};

use super::catalog::{read_stored, to_sql};
use super::errors::failure as backend;

/// Records an operator's request.
pub(crate) async fn control(
    transaction: &impl GenericClient,
    projection: &str,
    control: &Control,
) -> Result<(), ViewError> {
    let record = read_stored(transaction, projection, true).await?.record;
    let failed = |error| backend("recording an operator's request", error);
    match control {
        Control::Pause | Control::Resume => {
            transaction
                .execute(
                    "UPDATE projections SET paused = $2 WHERE name = $1",
                    &[&projection, &matches!(control, Control::Pause)],
                )
                .await
                .map_err(failed)?;
        }
        Control::Rebuild => {
            refuse_process_manager(projection, record.kind)?;
            transaction
                .execute(
                    "UPDATE projections SET rebuild_requested = true
                     WHERE name = $1 AND rebuild_generation IS NULL",
                    &[&projection],
                )
                .await
                .map_err(failed)?;
        }
        Control::Retry(position) | Control::Skip(position) => {
            let sql = if matches!(control, Control::Retry(_)) {
                "UPDATE parked SET retry_requested = true
                 WHERE projection = $1 AND generation = $2 AND position = $3"
            } else {
                "DELETE FROM parked WHERE projection = $1 AND generation = $2 AND position = $3"
            };
            let changed = transaction
                .execute(
                    sql,
                    &[&projection, &to_sql(record.generation), &to_sql(position.0)],
                )
                .await
                .map_err(failed)?;
            if changed == 0 {
                return Err(no_parked_event(projection, *position));
            }
        }
    }
    Ok(())
}

/// Records the error a runner keeps retrying, or clears it.
pub(crate) async fn set_stalled(
    transaction: &impl GenericClient,
    projection: &str,
    error: Option<&str>,
) -> Result<(), ViewError> {
    let changed = transaction
        .execute(
            "UPDATE projections SET stalled = $2 WHERE name = $1",
            &[&projection, &error],
        )
        .await
        .map_err(|error| backend("recording a stalled projection", error))?;
    if changed == 0 {
        return Err(ViewError::UnknownProjection(projection.to_owned()));
    }
    Ok(())
}

/// Notifies `channel` when the transaction commits.
pub(crate) async fn notify(
    transaction: &impl GenericClient,
    channel: &str,
    payload: &str,
) -> Result<(), ViewError> {
    transaction
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .map_err(|error| backend("notifying other processes", error))?;
    Ok(())
}
