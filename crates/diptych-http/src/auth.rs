//! Bearer tokens with roles: `reader` < `writer` < `admin`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode, header};

use crate::problem::Problem;

/// What a token may do; each role includes those below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read views, streams, the log and projections' status.
    Reader,
    /// Also send commands.
    Writer,
    /// Also rebuild projections.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "reader" => Ok(Role::Reader),
            "writer" => Ok(Role::Writer),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "`{other}` is not a role: use reader, writer or admin"
            )),
        }
    }
}

/// Who may do what.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    /// `None`: open, every request may do everything (loopback demos).
    tokens: Option<Arc<BTreeMap<String, Role>>>,
}

impl Auth {
    /// No authentication: for a demo on a loopback address.
    pub fn open() -> Self {
        Self { tokens: None }
    }

    /// These tokens, each with its role.
    pub fn tokens(tokens: BTreeMap<String, Role>) -> Self {
        Self {
            tokens: Some(Arc::new(tokens)),
        }
    }

    /// Whether requests are let through without a token.
    pub fn is_open(&self) -> bool {
        self.tokens.is_none()
    }

    /// Checks that the request's bearer token has at least `needed`.
    pub fn require(&self, headers: &HeaderMap, needed: Role) -> Result<(), Problem> {
        let Some(tokens) = &self.tokens else {
            return Ok(());
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "missing_token",
                    "send `Authorization: Bearer <token>`",
                )
            })?;
        let role = tokens.get(token.trim()).ok_or_else(|| {
            Problem::new(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the token is not known",
            )
        })?;
        if *role < needed {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "insufficient_role",
                format!("this needs the {needed:?} role; the token has {role:?}").to_lowercase(),
            ));
        }
        Ok(())
    }
}
