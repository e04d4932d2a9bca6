//! The shop as a service: its commands and states offered to the HTTP layer.
//!
//! This is the one place where the shop meets the outside: it maps command
//! names and JSON bodies to [`ShopCommand`]s, rejections to stable codes, and
//! stream categories to the aggregates whose state can be read at a version or a
//! time. The domain modules know nothing of it.

use async_trait::async_trait;
use diptych::http::{Application, ApplicationError, StateAt, StreamState};
use diptych::{
    Aggregate, AppendError, CommandContext, CommandError, CommandOutcome, LoadError, Repository,
    StreamId,
};

use crate::services::Service;
use crate::{ParseError, Rejection, Shop, ShopCommand};

#[async_trait]
impl Application for Shop {
    fn commands(&self) -> Vec<&'static str> {
        match self.split_service() {
            Some(service) => service.commands().to_vec(),
            None => ShopCommand::NAMES.to_vec(),
        }
    }

    fn taken_elsewhere(&self, command: &str) -> Option<String> {
        let service = self.split_service()?;
        let owner = Service::of_command(command).filter(|owner| *owner != service)?;
        Some(format!(
            "it is the {owner} service's command; this is the {service} service, which takes {}",
            service.commands().join(", ")
        ))
    }

    async fn execute(
        &self,
        name: &str,
        body: serde_json::Value,
        context: &CommandContext,
    ) -> Result<CommandOutcome, ApplicationError> {
        let command = ShopCommand::parse(name, body).map_err(|error| match error {
            ParseError::UnknownCommand(name) => ApplicationError::UnknownCommand(name),
            ParseError::InvalidBody { field, reason, .. } => ApplicationError::InvalidInput {
                message: match &field {
                    Some(field) => format!("`{field}`: {reason}"),
                    None => reason,
                },
                field,
            },
        })?;
        Shop::execute(self, command, context)
            .await
            .map_err(application_error)
    }

    async fn state(&self, stream: &StreamId, at: StateAt) -> Result<StreamState, ApplicationError> {
        let id = stream
            .as_str()
            .split_once('-')
            .map(|(_, id)| id)
            .unwrap_or_default();
        match stream.category() {
            "product" => state_of(&self.products, id, at).await,
            "stock" => state_of(&self.stock, id, at).await,
            "customer" => state_of(&self.customers, id, at).await,
            "order" => state_of(&self.orders, id, at).await,
            other => Err(ApplicationError::NotFound(format!(
                "no aggregate kind `{other}`: streams are product-, stock-, customer- or order-<id>"
            ))),
        }
    }
}

async fn state_of<A: Aggregate>(
    repository: &Repository<A>,
    id: &str,
    at: StateAt,
) -> Result<StreamState, ApplicationError> {
    let loaded = match at {
        StateAt::Latest => repository.load(id).await,
        StateAt::Version(version) => repository.load_at_version(id, version).await,
        StateAt::Time(time) => repository.load_at_time(id, time).await,
    }
    .map_err(|error| load_error(&error))?;
    if loaded.version == 0 {
        return Err(ApplicationError::NotFound(format!(
            "stream `{}` has no events{}",
            loaded.stream,
            match at {
                StateAt::Latest => "",
                _ => " at that point",
            }
        )));
    }
    let state = serde_json::to_value(&loaded.state)
        .map_err(|error| ApplicationError::Internal(Box::new(error)))?;
    Ok(StreamState {
        version: loaded.version,
        state,
    })
}

fn load_error(error: &LoadError) -> ApplicationError {
    match error {
        LoadError::InvalidStreamId(invalid) => ApplicationError::InvalidInput {
            field: Some("stream".to_owned()),
            message: invalid.to_string(),
        },
        other => ApplicationError::Internal(other.to_string().into()),
    }
}

/// The HTTP layer's view of a command that did not apply.
fn application_error(error: CommandError<Rejection>) -> ApplicationError {
    match error {
        CommandError::Rejected(Rejection::Invalid { field, reason }) => {
            ApplicationError::InvalidInput {
                field: Some(field.to_owned()),
                message: format!("`{field}` {reason}"),
            }
        }
        CommandError::Rejected(rejection) => ApplicationError::Rejected {
            code: rejection.code(),
            message: rejection.to_string(),
        },
        CommandError::Append(AppendError::Conflict {
            expected, actual, ..
        }) => ApplicationError::Conflict {
            expected: match expected {
                diptych::ExpectedVersion::Exact(version) => version,
                _ => 0,
            },
            actual,
        },
        CommandError::TooManyConflicts { attempts, .. } => ApplicationError::Busy(format!(
            "the aggregate kept changing; gave up after {attempts} attempts"
        )),
        CommandError::Append(AppendError::IdempotencyKeyReused { .. }) => {
            ApplicationError::IdempotencyKeyReused
        }
        CommandError::Load(LoadError::InvalidStreamId(invalid)) => ApplicationError::InvalidInput {
            field: None,
            message: invalid.to_string(),
        },
        other => ApplicationError::Internal(other.to_string().into()),
    }
}
