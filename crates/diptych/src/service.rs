//! A service as one object: its aggregates, the commands each takes, its
//! projections and process managers, built once and offered to the HTTP layer
//! and the runners.
//!
//! ```
//! # use std::sync::Arc;
//! # use diptych::{Aggregate, AggregateCommand, Command, MemoryStore, RejectionCode, Repository, Service};
//! # #[derive(Default, serde::Serialize, serde::Deserialize)]
//! # struct Counter { value: u64 }
//! # #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
//! # enum CounterEvent { Added { by: u64 } }
//! # #[derive(Debug, thiserror::Error)]
//! # #[error("too big")]
//! # struct TooBig;
//! # impl RejectionCode for TooBig { fn code(&self) -> &'static str { "too_big" } }
//! # impl Aggregate for Counter {
//! #     const KIND: &'static str = "counter";
//! #     type Command = u64;
//! #     type Event = CounterEvent;
//! #     type Error = TooBig;
//! #     fn decide(&self, by: &u64) -> Result<Vec<CounterEvent>, TooBig> { Ok(vec![CounterEvent::Added { by: *by }]) }
//! #     fn evolve(&mut self, CounterEvent::Added { by }: &CounterEvent) { self.value += by; }
//! # }
//! #[derive(serde::Deserialize)]
//! struct Add {
//!     counter_id: String,
//!     by: u64,
//! }
//!
//! impl Command for Add {
//!     const NAME: &'static str = "Add";
//!     const ID_FIELD: &'static str = "counter_id";
//!     fn aggregate_id(&self) -> &str {
//!         &self.counter_id
//!     }
//! }
//!
//! impl AggregateCommand for Add {
//!     type Aggregate = Counter;
//!     fn into_command(self) -> u64 {
//!         self.by
//!     }
//! }
//!
//! let store = Arc::new(MemoryStore::new());
//! let service = Service::builder("counters")
//!     .aggregate(Repository::<Counter>::new(store))
//!     .command::<Add>()
//!     .build()
//!     .unwrap();
//! assert_eq!(service.command_names(), ["Add"]);
//! ```

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use diptych_core::{
    Aggregate, AggregateCommand, Command, CommandContext, CommandError, CommandOutcome, Handler,
    HandlerKind, InvalidBody, ProcessManager, Projection, RejectionCode, Repository, StreamId,
    as_projection, parse_body, require_id,
};
use diptych_http::{Application, ApplicationError, StateAt, StreamState};
use futures_util::future::BoxFuture;

/// Reads a command's body into the command, boxed.
type ParseCommand = fn(serde_json::Value) -> Result<Box<dyn Any + Send>, InvalidBody>;

/// Runs a parsed command; a refusal keeps the domain's typed error.
type RunCommand = Arc<
    dyn Fn(
            Box<dyn Any + Send>,
            CommandContext,
        ) -> BoxFuture<'static, Result<CommandOutcome, Box<dyn Refusal>>>
        + Send
        + Sync,
>;

/// One command: how it is read and how it runs.
#[derive(Clone)]
struct Registered {
    parse: ParseCommand,
    run: RunCommand,
}

/// A command's `CommandError<E>`, with `E` erased until the caller names it.
trait Refusal: Send {
    fn error_type(&self) -> &'static str;
    fn is(&self, error: TypeId) -> bool;
    fn into_application(self: Box<Self>) -> ApplicationError;
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

impl<E: RejectionCode> Refusal for CommandError<E> {
    fn error_type(&self) -> &'static str {
        std::any::type_name::<E>()
    }

    fn is(&self, error: TypeId) -> bool {
        TypeId::of::<E>() == error
    }

    fn into_application(self: Box<Self>) -> ApplicationError {
        (*self).into()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// A command read from its body by [`Service::parse`], ready to run.
pub struct ParsedCommand {
    name: &'static str,
    command: Box<dyn Any + Send>,
}

impl ParsedCommand {
    /// The command's contract name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl std::fmt::Debug for ParsedCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedCommand")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Why [`Service::parse`] could not read a command.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// No command of that name in this service.
    #[error("no command named `{name}`; this service's commands are {known}")]
    UnknownCommand {
        /// The name asked for.
        name: String,
        /// The names it has, comma separated.
        known: String,
    },
    /// The body does not fit the command.
    #[error(transparent)]
    InvalidBody(#[from] InvalidBody),
}

impl From<ParseError> for ApplicationError {
    fn from(error: ParseError) -> Self {
        match error {
            ParseError::UnknownCommand { name, .. } => ApplicationError::UnknownCommand(name),
            ParseError::InvalidBody(invalid) => invalid.into(),
        }
    }
}

type FoldState = Arc<
    dyn Fn(String, StateAt) -> BoxFuture<'static, Result<StreamState, ApplicationError>>
        + Send
        + Sync,
>;

/// Why a service could not be built: a mistake in its wiring.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// Two commands share a name.
    #[error("command `{0}` is registered twice: each command name must be unique in a service")]
    DuplicateCommand(&'static str),
    /// A command's aggregate was not registered first.
    #[error(
        "command `{command}` is decided by aggregate `{kind}`, which is not registered: call `.aggregate(repository)` before `.command::<{command}>()`"
    )]
    UnknownAggregate {
        /// The command.
        command: &'static str,
        /// The aggregate's kind.
        kind: &'static str,
    },
    /// Two aggregates share a kind (a stream category).
    #[error("aggregate kind `{0}` is registered twice: each stream category has one aggregate")]
    DuplicateAggregate(&'static str),
    /// Two handlers share a name.
    #[error(
        "handler `{0}` is registered twice: projections and process managers need unique names"
    )]
    DuplicateHandler(String),
}

/// Another service's streams that a service keeps copies of in its own log,
/// fed through the broker ([`diptych_core::StreamCopies`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopiedStreams {
    /// The other service's name, as its relay publishes it.
    pub source: String,
    /// The stream categories copied (`product` for `product-<id>`).
    pub categories: Vec<String>,
}

/// Builds a [`Service`]; see the [module](self) for an example.
pub struct ServiceBuilder {
    name: String,
    repositories: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    states: BTreeMap<&'static str, FoldState>,
    commands: Vec<(&'static str, Registered)>,
    elsewhere: BTreeMap<String, String>,
    handlers: Vec<Handler>,
    copies: Vec<CopiedStreams>,
    errors: Vec<ServiceError>,
}

impl ServiceBuilder {
    /// Registers an aggregate: its commands may then be added, and its state is
    /// served at a version or a time for streams of its kind.
    pub fn aggregate<A: Aggregate>(mut self, repository: Repository<A>) -> Self {
        if self.states.contains_key(A::KIND) {
            self.errors.push(ServiceError::DuplicateAggregate(A::KIND));
            return self;
        }
        let folding = repository.clone();
        self.states.insert(
            A::KIND,
            Arc::new(move |id, at| {
                let repository = folding.clone();
                Box::pin(async move { state_of(&repository, &id, at).await })
            }),
        );
        self.repositories
            .insert(TypeId::of::<A>(), Box::new(repository));
        self
    }

    /// Adds a command its aggregate decides as it is.
    pub fn command<C>(self) -> Self
    where
        C: AggregateCommand,
        <C::Aggregate as Aggregate>::Error: RejectionCode,
    {
        let Some(repository) = self
            .repositories
            .get(&TypeId::of::<C::Aggregate>())
            .and_then(|repository| repository.downcast_ref::<Repository<C::Aggregate>>())
            .cloned()
        else {
            let mut builder = self;
            builder.errors.push(ServiceError::UnknownAggregate {
                command: C::NAME,
                kind: <C::Aggregate as Aggregate>::KIND,
            });
            return builder;
        };
        // `command_with` has checked the id by the time this runs.
        self.command_with(move |command: C, context: CommandContext| {
            let repository = repository.clone();
            let id = command.aggregate_id().to_owned();
            async move {
                repository
                    .execute(&id, &command.into_command(), &context)
                    .await
            }
        })
    }

    /// Adds a command with a handler of its own, for a command that looks at
    /// other aggregates before one decides (prices an order from the catalog).
    /// The command's id is checked before the handler runs.
    pub fn command_with<C, E, F, Fut>(mut self, handler: F) -> Self
    where
        C: Command,
        E: RejectionCode,
        F: Fn(C, CommandContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<CommandOutcome, CommandError<E>>> + Send + 'static,
    {
        if self.commands.iter().any(|(name, _)| *name == C::NAME) {
            self.errors.push(ServiceError::DuplicateCommand(C::NAME));
            return self;
        }
        let handler = Arc::new(handler);
        let run: RunCommand = Arc::new(move |command, context| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let command = *command
                    .downcast::<C>()
                    .expect("a command is run only after its own parser read it");
                let refused = |error: CommandError<E>| Box::new(error) as Box<dyn Refusal>;
                require_id(&command).map_err(|missing| refused(missing.into()))?;
                handler(command, context).await.map_err(refused)
            })
        });
        let parse: ParseCommand =
            |body| Ok(Box::new(parse_body::<C>(body)?) as Box<dyn Any + Send>);
        self.commands.push((C::NAME, Registered { parse, run }));
        self
    }

    /// Says that `command` is another service's (`owner`): this one does not
    /// take it, and answers a client who sends it here with where it belongs.
    /// Removes it if it was added.
    pub fn taken_by(mut self, command: &str, owner: impl Into<String>) -> Self {
        self.commands.retain(|(name, _)| *name != command);
        self.elsewhere.insert(command.to_owned(), owner.into());
        self
    }

    /// Keeps copies of the `source` service's streams of these categories in
    /// this service's log, so its handlers and commands read them as its own;
    /// a node applies them from the broker.
    pub fn copies<I, S>(mut self, source: impl Into<String>, categories: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.copies.push(CopiedStreams {
            source: source.into(),
            categories: categories.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// Adds a projection that runs whole.
    pub fn projection(self, projection: Arc<dyn Projection>) -> Self {
        self.handler(projection, HandlerKind::Projection, false)
    }

    /// Adds a projection that may run as several partitions: each of its
    /// documents is written by one stream's events alone.
    pub fn partitioned_projection(self, projection: Arc<dyn Projection>) -> Self {
        self.handler(projection, HandlerKind::Projection, true)
    }

    /// Adds a process manager.
    pub fn process_manager<P: ProcessManager>(self, process_manager: Arc<P>) -> Self {
        self.handler(
            as_projection(process_manager),
            HandlerKind::ProcessManager,
            false,
        )
    }

    fn handler(
        mut self,
        projection: Arc<dyn Projection>,
        kind: HandlerKind,
        partitionable: bool,
    ) -> Self {
        let name = projection.name();
        if self.handlers.iter().any(|h| h.projection.name() == name) {
            self.errors
                .push(ServiceError::DuplicateHandler(name.to_owned()));
            return self;
        }
        self.handlers.push(Handler {
            projection,
            kind,
            partitionable,
        });
        self
    }

    /// The service, or the first mistake in its wiring.
    pub fn build(self) -> Result<Service, ServiceError> {
        if let Some(error) = self.errors.into_iter().next() {
            return Err(error);
        }
        Ok(Service(Arc::new(Inner {
            name: self.name,
            names: self.commands.iter().map(|(name, _)| *name).collect(),
            commands: self.commands.into_iter().collect(),
            states: self.states,
            elsewhere: self.elsewhere,
            handlers: self.handlers,
            copies: self.copies,
        })))
    }
}

/// A service: the commands it takes, the aggregates whose state it folds and the
/// handlers it runs on its log. Cheap to clone; it is the HTTP layer's
/// [`Application`].
#[derive(Clone)]
pub struct Service(Arc<Inner>);

struct Inner {
    name: String,
    names: Vec<&'static str>,
    commands: HashMap<&'static str, Registered>,
    states: BTreeMap<&'static str, FoldState>,
    elsewhere: BTreeMap<String, String>,
    handlers: Vec<Handler>,
    copies: Vec<CopiedStreams>,
}

impl Service {
    /// A new service named `name` (`catalog`), as people and messages call it.
    pub fn builder(name: impl Into<String>) -> ServiceBuilder {
        ServiceBuilder {
            name: name.into(),
            repositories: HashMap::new(),
            states: BTreeMap::new(),
            commands: Vec::new(),
            elsewhere: BTreeMap::new(),
            handlers: Vec::new(),
            copies: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The names of the commands it takes, in the order they were added.
    pub fn command_names(&self) -> &[&'static str] {
        &self.0.names
    }

    /// Its projections and process managers, each with its kind.
    pub fn handlers(&self) -> &[Handler] {
        &self.0.handlers
    }

    /// The other services' streams it keeps copies of.
    pub fn copies(&self) -> &[CopiedStreams] {
        &self.0.copies
    }

    /// Reads the command `name` from its JSON body, naming the field at fault.
    pub fn parse(&self, name: &str, body: serde_json::Value) -> Result<ParsedCommand, ParseError> {
        let Some((name, registered)) = self.0.commands.get_key_value(name) else {
            return Err(ParseError::UnknownCommand {
                name: name.to_owned(),
                known: self.0.names.join(", "),
            });
        };
        Ok(ParsedCommand {
            name,
            command: (registered.parse)(body)?,
        })
    }

    /// Runs a parsed command in this process, keeping the domain's typed error:
    /// for tests, seeding and load generators that match on rejections.
    ///
    /// # Panics
    ///
    /// When `E` is not the error type of the command's handler: a programming
    /// error, and the message names the right one.
    pub async fn run_as<E: RejectionCode>(
        &self,
        command: ParsedCommand,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError<E>> {
        let Some(registered) = self.0.commands.get(command.name) else {
            panic!(
                "command `{}` is not the {} service's: run it on the service that parsed it",
                command.name, self.0.name
            );
        };
        let refusal = match (registered.run)(command.command, context.clone()).await {
            Ok(outcome) => return Ok(outcome),
            Err(refusal) => refusal,
        };
        if !refusal.is(TypeId::of::<E>()) {
            panic!(
                "command `{}` fails with CommandError<{}>, not CommandError<{}>: call run_as with that type",
                command.name,
                refusal.error_type(),
                std::any::type_name::<E>()
            );
        }
        match refusal.into_any().downcast::<CommandError<E>>() {
            Ok(error) => Err(*error),
            Err(_) => unreachable!("the type was checked above"),
        }
    }

    /// Runs the command `name` with its JSON body.
    pub async fn execute(
        &self,
        name: &str,
        body: serde_json::Value,
        context: &CommandContext,
    ) -> Result<CommandOutcome, ApplicationError> {
        let parsed = self.parse(name, body)?;
        let run = &self.0.commands[parsed.name].run;
        run(parsed.command, context.clone())
            .await
            .map_err(Refusal::into_application)
    }
}

#[async_trait]
impl Application for Service {
    fn commands(&self) -> Vec<&'static str> {
        self.0.names.clone()
    }

    fn taken_elsewhere(&self, command: &str) -> Option<String> {
        let owner = self.0.elsewhere.get(command)?;
        Some(format!(
            "it is the {owner} service's command; this is the {} service, which takes {}",
            self.0.name,
            self.0.names.join(", ")
        ))
    }

    async fn execute(
        &self,
        name: &str,
        body: serde_json::Value,
        context: &CommandContext,
    ) -> Result<CommandOutcome, ApplicationError> {
        Service::execute(self, name, body, context).await
    }

    async fn state(&self, stream: &StreamId, at: StateAt) -> Result<StreamState, ApplicationError> {
        let kind = stream.category();
        let Some(fold) = self.0.states.get(kind) else {
            let kinds: Vec<String> = self.0.states.keys().map(|k| format!("{k}-<id>")).collect();
            return Err(ApplicationError::NotFound(format!(
                "no aggregate kind `{kind}`: this service's streams are {}",
                kinds.join(", ")
            )));
        };
        let id = stream
            .as_str()
            .strip_prefix(kind)
            .and_then(|rest| rest.strip_prefix('-'))
            .unwrap_or_default();
        fold(id.to_owned(), at).await
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
    }?;
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
