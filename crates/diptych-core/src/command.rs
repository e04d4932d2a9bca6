//! Typed commands: what a command is called, which aggregate instance it
//! addresses, how it is read from JSON, and how a domain's refusals are named.
//!
//! A command is a plain serde struct that says its contract name and the field
//! holding its aggregate's id:
//!
//! ```
//! use diptych_core::{Command, parse_body};
//!
//! #[derive(Debug, serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct RenameProduct {
//!     product_id: String,
//!     name: String,
//! }
//!
//! impl Command for RenameProduct {
//!     const NAME: &'static str = "RenameProduct";
//!     const ID_FIELD: &'static str = "product_id";
//!     fn aggregate_id(&self) -> &str {
//!         &self.product_id
//!     }
//! }
//!
//! let error = parse_body::<RenameProduct>(serde_json::json!({"product_id": "p1"})).unwrap_err();
//! assert_eq!(error.field.as_deref(), Some("name"));
//! ```
//!
//! [`command!`](crate::command!) writes these impls in one line. They are traits
//! with associated consts and a declarative macro rather than a derive: what the
//! macro writes is plain to read from its definition, and a procedural macro crate
//! would add a compile step (syn) to every application for no fewer lines.

use serde::de::DeserializeOwned;

use crate::Aggregate;

/// A command a client can send: its contract name and the aggregate it addresses.
pub trait Command: DeserializeOwned + Send + Sync + 'static {
    /// The contract name (`RegisterProduct`), as in `POST /commands/RegisterProduct`.
    const NAME: &'static str;
    /// The body field that holds the addressed aggregate's id (`product_id`),
    /// named when that id is missing or empty.
    const ID_FIELD: &'static str;
    /// The id of the aggregate instance it addresses.
    fn aggregate_id(&self) -> &str;
}

/// A command that one aggregate decides, as it is: no look-ups beforehand.
pub trait AggregateCommand: Command {
    /// The aggregate that decides it.
    type Aggregate: Aggregate;
    /// It, as that aggregate's command.
    fn into_command(self) -> <Self::Aggregate as Aggregate>::Command;
}

/// A body that does not fit its command: a wrong type, a missing or unknown field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the body of `{command}` does not fit it: {reason}")]
pub struct InvalidBody {
    /// The command.
    pub command: &'static str,
    /// The field at fault (`lines[0].quantity`), when one is.
    pub field: Option<String>,
    /// What is wrong, in serde's words.
    pub reason: String,
}

/// Reads the command `C` from its JSON body, naming the field at fault.
pub fn parse_body<C: Command>(body: serde_json::Value) -> Result<C, InvalidBody> {
    serde_path_to_error::deserialize(body).map_err(|error| {
        let path = error.path().to_string();
        let reason = error.inner().to_string();
        // serde names a missing or unknown field at the start of its message,
        // between backquotes; a missing one is reported at its parent's path.
        // Only those two messages are read, so a value quoted in another
        // message is never taken for a field.
        let named = reason
            .split('`')
            .nth(1)
            .filter(|_| {
                reason.starts_with("missing field `") || reason.starts_with("unknown field `")
            })
            .map(|name| match path.as_str() {
                "." => name.to_owned(),
                // An unknown field's path already ends with it.
                path if path.ends_with(name) => path.to_owned(),
                parent => format!("{parent}.{name}"),
            });
        let field = named.or_else(|| (path != ".").then_some(path));
        InvalidBody {
            command: C::NAME,
            field,
            reason,
        }
    })
}

/// A domain's refusal with a stable code that clients match on.
pub trait RejectionCode: std::error::Error + Send + Sync + 'static {
    /// The stable code (`insufficient_stock`), in snake_case.
    fn code(&self) -> &'static str;

    /// The HTTP status: 422 for a business rule; 400 for a refusal of the input
    /// itself (an empty name), which should then name its [`RejectionCode::field`].
    fn status(&self) -> u16 {
        422
    }

    /// The body field at fault, for a refusal of the input itself.
    fn field(&self) -> Option<&str> {
        None
    }
}

/// A command whose aggregate id field is empty.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` must not be empty: it names the aggregate `{command}` addresses")]
pub struct MissingId {
    /// The command.
    pub command: &'static str,
    /// Its id field.
    pub field: &'static str,
}

/// The id of the aggregate `command` addresses, refused when it is blank.
pub fn require_id<C: Command>(command: &C) -> Result<&str, MissingId> {
    let id = command.aggregate_id();
    if id.trim().is_empty() {
        return Err(MissingId {
            command: C::NAME,
            field: C::ID_FIELD,
        });
    }
    Ok(id)
}

/// Implements [`Command`] (and, given the aggregate, [`AggregateCommand`]) for a
/// command struct: its contract name is the type's name, its id the named field.
///
/// ```
/// # use diptych_core::{Aggregate, AggregateCommand, Command};
/// # #[derive(Default, serde::Serialize, serde::Deserialize)]
/// # struct Product;
/// # #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
/// # enum ProductEvent { Renamed { name: String } }
/// # #[derive(Debug, thiserror::Error)] #[error("no")] struct No;
/// # impl Aggregate for Product {
/// #     const KIND: &'static str = "product";
/// #     type Command = CatalogCommand;
/// #     type Event = ProductEvent;
/// #     type Error = No;
/// #     fn decide(&self, _: &CatalogCommand) -> Result<Vec<ProductEvent>, No> { Ok(vec![]) }
/// #     fn evolve(&mut self, _: &ProductEvent) {}
/// # }
/// #[derive(serde::Deserialize)]
/// struct RenameProduct {
///     product_id: String,
///     name: String,
/// }
///
/// enum CatalogCommand {
///     Rename(RenameProduct),
/// }
///
/// diptych_core::command!(RenameProduct, id = product_id, aggregate = Product, into = CatalogCommand::Rename);
///
/// assert_eq!(RenameProduct::NAME, "RenameProduct");
/// assert_eq!(RenameProduct::ID_FIELD, "product_id");
/// ```
#[macro_export]
macro_rules! command {
    ($command:ident, id = $field:ident) => {
        impl $crate::Command for $command {
            const NAME: &'static str = stringify!($command);
            const ID_FIELD: &'static str = stringify!($field);
            fn aggregate_id(&self) -> &str {
                &self.$field
            }
        }
    };
    ($command:ident, id = $field:ident, aggregate = $aggregate:ty, into = $into:expr) => {
        $crate::command!($command, id = $field);
        impl $crate::AggregateCommand for $command {
            type Aggregate = $aggregate;
            fn into_command(self) -> <$aggregate as $crate::Aggregate>::Command {
                ($into)(self)
            }
        }
    };
}
