//! Versioned migrations, one set per component (`events`, `views`), applied under
//! an advisory lock so processes starting together on a fresh schema do not race.

use tokio_postgres::Client;

use crate::error::{OpenError, backend};

/// One component's migrations, in order; its schema version is their count.
pub(crate) struct Migrations {
    /// `events` or `views`: the row of `diptych_migrations` that holds the version.
    pub component: &'static str,
    /// The migrations, in order.
    pub steps: &'static [&'static str],
}

impl Migrations {
    /// The version this build writes and reads.
    pub fn version(&self) -> i64 {
        self.steps.len() as i64
    }

    /// Creates the schema if needed and brings this component up to date, one
    /// migration per transaction together with its version bump.
    pub async fn apply(&self, client: &mut Client, schema: &str) -> Result<(), OpenError> {
        let fail = |what: &str| {
            let what = what.to_owned();
            move |error| OpenError::Backend(backend(what, error))
        };
        // A session lock keyed by the schema: a second process waits here until
        // the first has migrated, then finds nothing left to do.
        client
            .execute(
                "SELECT pg_advisory_lock(hashtext('diptych migrations ' || $1))",
                &[&schema],
            )
            .await
            .map_err(fail("waiting for the migration lock"))?;
        let outcome = self.apply_locked(client, schema).await;
        let unlock = client
            .execute(
                "SELECT pg_advisory_unlock(hashtext('diptych migrations ' || $1))",
                &[&schema],
            )
            .await
            .map_err(fail("releasing the migration lock"));
        outcome.and(unlock.map(|_| ()))
    }

    async fn apply_locked(&self, client: &mut Client, schema: &str) -> Result<(), OpenError> {
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE IF NOT EXISTS {schema}.diptych_migrations (
                     component text PRIMARY KEY,
                     version   bigint NOT NULL
                 );"
            ))
            .await
            .map_err(|error| OpenError::Backend(backend("creating the schema", error)))?;
        let found: i64 = client
            .query_opt(
                &format!("SELECT version FROM {schema}.diptych_migrations WHERE component = $1"),
                &[&self.component],
            )
            .await
            .map_err(|error| OpenError::Backend(backend("reading the schema version", error)))?
            .map_or(0, |row| row.get(0));
        if found > self.version() {
            return Err(OpenError::NewerSchema {
                schema: schema.to_owned(),
                component: self.component,
                found,
                supported: self.version(),
            });
        }
        for (index, step) in self.steps.iter().enumerate().skip(found as usize) {
            let target = index as i64 + 1;
            let failed = |error| {
                OpenError::Backend(backend(
                    format!(
                        "migrating the {} tables to version {target}",
                        self.component
                    ),
                    error,
                ))
            };
            let transaction = client.transaction().await.map_err(failed)?;
            transaction
                .batch_execute(&format!("SET LOCAL search_path TO {schema}; {step}"))
                .await
                .map_err(failed)?;
            transaction
                .execute(
                    &format!(
                        "INSERT INTO {schema}.diptych_migrations (component, version) \
                         VALUES ($1, $2) \
                         ON CONFLICT (component) DO UPDATE SET version = excluded.version"
                    ),
                    &[&self.component, &target],
                )
                .await
                .map_err(failed)?;
            transaction.commit().await.map_err(failed)?;
        }
        Ok(())
    }
}

/// Checks a schema name: it goes into SQL as an identifier, unquoted.
pub(crate) fn check_schema_name(schema: &str) -> Result<(), OpenError> {
    let mut chars = schema.chars();
    let valid = schema.len() <= 48
        && chars.next().is_some_and(|first| first.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(OpenError::InvalidSchemaName(schema.to_owned()))
    }
}
