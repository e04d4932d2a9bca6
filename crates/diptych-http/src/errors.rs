//! How the model's errors become an [`ApplicationError`], so an application
//! returns its domain's errors with `?` and the HTTP layer answers each with its
//! stable code, status and field, and keeps the cause of a failure for the log.

use diptych_core::{
    AppendError, CommandError, ExpectedVersion, InvalidBody, LoadError, MissingId, RejectionCode,
};

use crate::ApplicationError;

impl<E: RejectionCode> From<CommandError<E>> for ApplicationError {
    fn from(error: CommandError<E>) -> Self {
        match error {
            CommandError::Rejected(rejection) if rejection.status() == 400 => {
                ApplicationError::InvalidInput {
                    field: rejection.field().map(str::to_owned),
                    message: rejection.to_string(),
                }
            }
            CommandError::Rejected(rejection) => ApplicationError::Rejected {
                code: rejection.code(),
                status: rejection.status(),
                message: rejection.to_string(),
            },
            CommandError::Append(AppendError::Conflict {
                expected, actual, ..
            }) => ApplicationError::Conflict {
                expected: match expected {
                    ExpectedVersion::Exact(version) => version,
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
            CommandError::Load(load) => load.into(),
            CommandError::MissingId(missing) => missing.into(),
            other => ApplicationError::Internal(Box::new(other)),
        }
    }
}

impl From<LoadError> for ApplicationError {
    fn from(error: LoadError) -> Self {
        match error {
            LoadError::InvalidStreamId(invalid) => ApplicationError::InvalidInput {
                field: None,
                message: invalid.to_string(),
            },
            other => ApplicationError::Internal(Box::new(other)),
        }
    }
}

impl From<MissingId> for ApplicationError {
    fn from(error: MissingId) -> Self {
        ApplicationError::InvalidInput {
            field: Some(error.field.to_owned()),
            message: error.to_string(),
        }
    }
}

impl From<InvalidBody> for ApplicationError {
    fn from(error: InvalidBody) -> Self {
        ApplicationError::InvalidInput {
            message: match &error.field {
                Some(field) => format!("`{field}`: {}", error.reason),
                None => error.reason,
            },
            field: error.field,
        }
    }
}
