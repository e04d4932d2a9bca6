//! A service built from typed commands answers as the HTTP contract says: names,
//! parsing with the field at fault, rejections with their code, status and field,
//! conflicts, states at a version, and wiring mistakes refused at build time.

use std::sync::Arc;

use async_trait::async_trait;
use diptych::http::{Application, ApplicationError, StateAt};
use diptych::{
    Aggregate, AggregateCommand, CollectionSpec, Command, CommandContext, HandlerError,
    HandlerKind, MemoryStore, Projection, RecordedEvent, RejectionCode, Repository, Service,
    ServiceError, StreamId, ViewTx,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Default, Serialize, Deserialize)]
struct Tally {
    total: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum TallyEvent {
    Added { by: u64 },
}

#[derive(Debug, thiserror::Error)]
enum TallyError {
    #[error("the total may not pass 100")]
    OverLimit,
    #[error("`by` must be at least 1")]
    Zero,
    #[error("the tally is locked")]
    Locked,
}

impl RejectionCode for TallyError {
    fn code(&self) -> &'static str {
        match self {
            TallyError::OverLimit => "over_limit",
            TallyError::Zero => "invalid_field",
            TallyError::Locked => "locked",
        }
    }

    fn status(&self) -> u16 {
        match self {
            TallyError::OverLimit => 422,
            TallyError::Zero => 400,
            TallyError::Locked => 423,
        }
    }

    fn field(&self) -> Option<&str> {
        matches!(self, TallyError::Zero).then_some("by")
    }
}

enum TallyCommand {
    Add(u64),
    Lock,
}

impl Aggregate for Tally {
    const KIND: &'static str = "tally";
    type Command = TallyCommand;
    type Event = TallyEvent;
    type Error = TallyError;

    fn decide(&self, command: &TallyCommand) -> Result<Vec<TallyEvent>, TallyError> {
        match command {
            TallyCommand::Add(0) => Err(TallyError::Zero),
            TallyCommand::Add(by) if self.total + by > 100 => Err(TallyError::OverLimit),
            TallyCommand::Add(by) => Ok(vec![TallyEvent::Added { by: *by }]),
            TallyCommand::Lock => Err(TallyError::Locked),
        }
    }

    fn evolve(&mut self, TallyEvent::Added { by }: &TallyEvent) {
        self.total += by;
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    tally_id: String,
    by: u64,
}

impl Command for Add {
    const NAME: &'static str = "Add";
    const ID_FIELD: &'static str = "tally_id";
    fn aggregate_id(&self) -> &str {
        &self.tally_id
    }
}

impl AggregateCommand for Add {
    type Aggregate = Tally;
    fn into_command(self) -> TallyCommand {
        TallyCommand::Add(self.by)
    }
}

#[derive(Deserialize)]
struct Lock {
    tally_id: String,
}

impl Command for Lock {
    const NAME: &'static str = "Lock";
    const ID_FIELD: &'static str = "tally_id";
    fn aggregate_id(&self) -> &str {
        &self.tally_id
    }
}

impl AggregateCommand for Lock {
    type Aggregate = Tally;
    fn into_command(self) -> TallyCommand {
        TallyCommand::Lock
    }
}

struct Totals;

#[async_trait]
impl Projection for Totals {
    fn name(&self) -> &str {
        "totals"
    }
    fn collections(&self) -> Vec<CollectionSpec> {
        Vec::new()
    }
    async fn apply(&self, _: &RecordedEvent, _: &mut ViewTx) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn tallies() -> Repository<Tally> {
    Repository::new(Arc::new(MemoryStore::new()))
}

fn service() -> Service {
    Service::builder("tallies")
        .aggregate(tallies())
        .command::<Add>()
        .command::<Lock>()
        .build()
        .unwrap()
}

fn context() -> CommandContext {
    CommandContext::default()
}

#[tokio::test]
async fn runs_commands_by_name_and_folds_their_state() {
    let service = service();
    assert_eq!(service.name(), "tallies");
    assert_eq!(service.command_names(), ["Add", "Lock"]);
    assert_eq!(Application::commands(&service), ["Add", "Lock"]);
    for by in [3, 4] {
        let outcome = service
            .execute("Add", json!({"tally_id": "t1", "by": by}), &context())
            .await
            .unwrap();
        assert_eq!(outcome.stream.as_str(), "tally-t1");
        assert_eq!(outcome.events.len(), 1);
    }
    let stream = StreamId::new("tally-t1").unwrap();
    let latest = service.state(&stream, StateAt::Latest).await.unwrap();
    assert_eq!((latest.version, latest.state), (2, json!({"total": 7})));
    let first = service.state(&stream, StateAt::Version(1)).await.unwrap();
    assert_eq!((first.version, first.state), (1, json!({"total": 3})));
}

#[tokio::test]
async fn bad_bodies_name_the_field_at_fault() {
    let service = service();
    let field_of = |error: ApplicationError| match error {
        ApplicationError::InvalidInput { field, .. } => field,
        other => panic!("expected invalid input, got {other:?}"),
    };
    let wrong_type = service
        .execute("Add", json!({"tally_id": "t", "by": "ten"}), &context())
        .await
        .unwrap_err();
    assert_eq!(field_of(wrong_type), Some("by".to_owned()));
    let missing = service
        .execute("Add", json!({"tally_id": "t"}), &context())
        .await
        .unwrap_err();
    assert_eq!(field_of(missing), Some("by".to_owned()));
    let unknown = service
        .execute(
            "Add",
            json!({"tally_id": "t", "by": 1, "extra": 1}),
            &context(),
        )
        .await
        .unwrap_err();
    assert_eq!(field_of(unknown), Some("extra".to_owned()));
    let blank_id = service
        .execute("Add", json!({"tally_id": " ", "by": 1}), &context())
        .await
        .unwrap_err();
    assert_eq!(field_of(blank_id), Some("tally_id".to_owned()));
    let not_an_object = service
        .execute("Add", json!([1, 2]), &context())
        .await
        .unwrap_err();
    assert!(matches!(
        not_an_object,
        ApplicationError::InvalidInput { .. }
    ));
    assert!(matches!(
        service.execute("Subtract", json!({}), &context()).await,
        Err(ApplicationError::UnknownCommand(name)) if name == "Subtract"
    ));
}

#[tokio::test]
async fn rejections_keep_their_code_status_and_field() {
    let service = service();
    let over = service
        .execute("Add", json!({"tally_id": "t", "by": 101}), &context())
        .await
        .unwrap_err();
    assert!(
        matches!(over, ApplicationError::Rejected { code: "over_limit", status: 422, ref message } if message.contains("100")),
        "{over:?}"
    );
    let zero = service
        .execute("Add", json!({"tally_id": "t", "by": 0}), &context())
        .await
        .unwrap_err();
    assert!(
        matches!(zero, ApplicationError::InvalidInput { field: Some(ref field), .. } if field == "by"),
        "{zero:?}"
    );
    let locked = service
        .execute("Lock", json!({"tally_id": "t"}), &context())
        .await
        .unwrap_err();
    assert!(
        matches!(
            locked,
            ApplicationError::Rejected {
                code: "locked",
                status: 423,
                ..
            }
        ),
        "{locked:?}"
    );
}

#[tokio::test]
async fn an_expected_version_that_is_not_the_streams_is_a_conflict() {
    let service = service();
    service
        .execute("Add", json!({"tally_id": "t", "by": 1}), &context())
        .await
        .unwrap();
    let stale = service
        .execute(
            "Add",
            json!({"tally_id": "t", "by": 1}),
            &context().expecting_version(5),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            stale,
            ApplicationError::Conflict {
                expected: 5,
                actual: 1
            }
        ),
        "{stale:?}"
    );
}

#[tokio::test]
async fn states_of_unknown_kinds_and_empty_streams_are_not_found() {
    let service = service();
    let unknown = service
        .state(&StreamId::new("order-1").unwrap(), StateAt::Latest)
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, ApplicationError::NotFound(ref message) if message.contains("tally-<id>")),
        "{unknown:?}"
    );
    let empty = service
        .state(&StreamId::new("tally-none").unwrap(), StateAt::Latest)
        .await
        .unwrap_err();
    assert!(matches!(empty, ApplicationError::NotFound(_)), "{empty:?}");
}

#[tokio::test]
async fn a_command_with_its_own_handler_is_checked_and_mapped_the_same_way() {
    let repository = tallies();
    let doubling = repository.clone();
    let service = Service::builder("tallies")
        .aggregate(repository)
        .command_with(move |add: Add, context: CommandContext| {
            let tallies = doubling.clone();
            async move {
                let by = add.by * 2;
                tallies
                    .execute(&add.tally_id, &TallyCommand::Add(by), &context)
                    .await
            }
        })
        .build()
        .unwrap();
    service
        .execute("Add", json!({"tally_id": "t", "by": 30}), &context())
        .await
        .unwrap();
    let state = service
        .state(&StreamId::new("tally-t").unwrap(), StateAt::Latest)
        .await
        .unwrap();
    assert_eq!(state.state, json!({"total": 60}));
    assert!(matches!(
        service
            .execute("Add", json!({"tally_id": "t", "by": 30}), &context())
            .await,
        Err(ApplicationError::Rejected {
            code: "over_limit",
            ..
        })
    ));
    assert!(matches!(
        service
            .execute("Add", json!({"tally_id": "", "by": 1}), &context())
            .await,
        Err(ApplicationError::InvalidInput { field: Some(field), .. }) if field == "tally_id"
    ));
}

#[tokio::test]
async fn a_command_taken_by_another_service_says_where_it_belongs() {
    let service = Service::builder("adding")
        .aggregate(tallies())
        .command::<Add>()
        .command::<Lock>()
        .taken_by("Lock", "locking")
        .build()
        .unwrap();
    assert_eq!(service.command_names(), ["Add"]);
    let said = service.taken_elsewhere("Lock").unwrap();
    assert!(said.contains("locking service's command"), "{said}");
    assert!(said.contains("adding service, which takes Add"), "{said}");
    assert_eq!(service.taken_elsewhere("Add"), None);
    assert!(matches!(
        service
            .execute("Lock", json!({"tally_id": "t"}), &context())
            .await,
        Err(ApplicationError::UnknownCommand(_))
    ));
}

#[test]
fn handlers_carry_their_kind_and_partitioning() {
    let service = Service::builder("tallies")
        .partitioned_projection(Arc::new(Totals))
        .build()
        .unwrap();
    let [handler] = service.handlers() else {
        panic!("one handler expected")
    };
    assert_eq!(handler.projection.name(), "totals");
    assert_eq!(handler.kind, HandlerKind::Projection);
    assert!(handler.partitionable);
}

#[test]
fn wiring_mistakes_are_refused_at_build_time() {
    let error = |builder: diptych::ServiceBuilder| builder.build().err().unwrap();
    assert_eq!(
        error(Service::builder("s").command::<Add>()),
        ServiceError::UnknownAggregate {
            command: "Add",
            kind: "tally"
        }
    );
    assert_eq!(
        error(
            Service::builder("s")
                .aggregate(tallies())
                .command::<Add>()
                .command::<Add>()
        ),
        ServiceError::DuplicateCommand("Add")
    );
    assert_eq!(
        error(
            Service::builder("s")
                .aggregate(tallies())
                .aggregate(tallies())
        ),
        ServiceError::DuplicateAggregate("tally")
    );
    assert_eq!(
        error(
            Service::builder("s")
                .projection(Arc::new(Totals))
                .projection(Arc::new(Totals))
        ),
        ServiceError::DuplicateHandler("totals".to_owned())
    );
    let message = error(Service::builder("s").command::<Add>()).to_string();
    assert!(message.contains(".aggregate(repository)"), "{message}");
}

#[tokio::test]
async fn a_parsed_command_runs_in_process_with_the_domains_typed_error() {
    let service = service();
    let unknown = service.parse("Subtract", json!({})).unwrap_err();
    assert!(
        matches!(&unknown, diptych::ParseError::UnknownCommand { name, known } if name == "Subtract" && known == "Add, Lock"),
        "{unknown:?}"
    );
    let invalid = service
        .parse("Add", json!({"tally_id": "t", "by": "ten"}))
        .unwrap_err();
    assert!(
        matches!(&invalid, diptych::ParseError::InvalidBody(body) if body.field.as_deref() == Some("by")),
        "{invalid:?}"
    );
    let add = service
        .parse("Add", json!({"tally_id": "t", "by": 60}))
        .unwrap();
    assert_eq!(add.name(), "Add");
    let outcome = service.run_as::<TallyError>(add, &context()).await.unwrap();
    assert_eq!(outcome.version, 1);
    let over = service
        .parse("Add", json!({"tally_id": "t", "by": 60}))
        .unwrap();
    assert!(matches!(
        service.run_as::<TallyError>(over, &context()).await,
        Err(diptych::CommandError::Rejected(TallyError::OverLimit))
    ));
    let blank = service
        .parse("Add", json!({"tally_id": "", "by": 1}))
        .unwrap();
    assert!(matches!(
        service.run_as::<TallyError>(blank, &context()).await,
        Err(diptych::CommandError::MissingId(missing)) if missing.field == "tally_id"
    ));
}

#[derive(Debug, thiserror::Error)]
#[error("another domain's error")]
struct OtherError;

impl RejectionCode for OtherError {
    fn code(&self) -> &'static str {
        "other"
    }
}

#[tokio::test]
#[should_panic(expected = "call run_as with that type")]
async fn running_a_command_as_another_error_type_names_the_right_one() {
    let service = service();
    let over = service
        .parse("Add", json!({"tally_id": "t", "by": 101}))
        .unwrap();
    let _ = service.run_as::<OtherError>(over, &context()).await;
}

#[test]
fn a_quoted_value_is_never_taken_for_a_field_name() {
    let invalid = service()
        .parse("Add", json!({"tally_id": "t", "by": "field `evil`"}))
        .unwrap_err();
    assert!(
        matches!(&invalid, diptych::ParseError::InvalidBody(body) if body.field.as_deref() == Some("by")),
        "{invalid:?}"
    );
}

#[tokio::test]
#[should_panic(expected = "run it on the service that parsed it")]
async fn a_command_parsed_by_another_service_is_refused_by_name() {
    let locking = Service::builder("locking")
        .aggregate(tallies())
        .command::<Lock>()
        .build()
        .unwrap();
    let lock = service()
        .parse("Add", json!({"tally_id": "t", "by": 1}))
        .unwrap();
    let _ = locking.run_as::<TallyError>(lock, &context()).await;
}

/// Reacts to nothing; here to be registered.
struct Quiet(diptych::EventSet<TallyEvent>);

#[async_trait]
impl diptych::TypedProcessManager for Quiet {
    type Event = TallyEvent;
    type State = ();
    type Command = ();

    fn name(&self) -> &str {
        "quiet"
    }

    fn events(&self) -> &diptych::EventSet<TallyEvent> {
        &self.0
    }

    fn react(
        &self,
        (): &mut (),
        _: TallyEvent,
        _: &RecordedEvent,
    ) -> Result<Vec<()>, HandlerError> {
        Ok(Vec::new())
    }

    async fn dispatch(&self, (): (), _: CommandContext) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[test]
fn a_process_manager_is_registered_as_one() {
    let quiet = Quiet(diptych::EventSet::new().aggregate::<Tally>(|event| event));
    let service = Service::builder("tallies")
        .projection(Arc::new(Totals))
        .process_manager(Arc::new(quiet))
        .build()
        .unwrap();
    let kinds: Vec<(&str, HandlerKind, bool)> = service
        .handlers()
        .iter()
        .map(|handler| {
            (
                handler.projection.name(),
                handler.kind,
                handler.partitionable,
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("totals", HandlerKind::Projection, false),
            ("quiet", HandlerKind::ProcessManager, false),
        ]
    );
}
