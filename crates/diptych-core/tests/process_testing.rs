//! The given/when/then helper for process managers.

use async_trait::async_trait;
use diptych_core::testing::{process, recorded};
use diptych_core::{
    CommandContext, EventCodec, HandlerError, Interest, ProcessManager, RecordedEvent,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum CustomerEvent {
    CustomerRegistered {
        customer_id: String,
        email: String,
    },
    CustomerAddressUpdated {
        customer_id: String,
        address: String,
    },
}

#[derive(Debug, PartialEq)]
enum MailCommand {
    SendWelcome { email: String },
    SendAddressConfirmation { email: String, address: String },
}

/// Welcomes a customer once, and confirms address changes to the registered email.
struct Mailer;

#[derive(Default, Serialize, Deserialize)]
struct MailerState {
    email: Option<String>,
}

#[async_trait]
impl ProcessManager for Mailer {
    type State = MailerState;
    type Command = MailCommand;

    fn name(&self) -> &str {
        "mailer"
    }

    fn interest(&self) -> Interest {
        Interest::categories(["customer"])
    }

    fn instance(&self, event: &RecordedEvent) -> Option<String> {
        Some(event.stream_id.as_str().to_owned())
    }

    fn react(
        &self,
        state: &mut MailerState,
        event: &RecordedEvent,
    ) -> Result<Vec<MailCommand>, HandlerError> {
        Ok(
            match EventCodec::<CustomerEvent>::default().decode(event)? {
                CustomerEvent::CustomerRegistered { email, .. } if state.email.is_none() => {
                    state.email = Some(email.clone());
                    vec![MailCommand::SendWelcome { email }]
                }
                CustomerEvent::CustomerRegistered { .. } => vec![],
                CustomerEvent::CustomerAddressUpdated { address, .. } => match &state.email {
                    Some(email) => vec![MailCommand::SendAddressConfirmation {
                        email: email.clone(),
                        address,
                    }],
                    None => return Err(HandlerError::msg("an address update before registration")),
                },
            },
        )
    }

    /// Mail to one address goes out in order; mail to others alongside.
    fn target(&self, command: &MailCommand) -> Option<String> {
        match command {
            MailCommand::SendWelcome { email }
            | MailCommand::SendAddressConfirmation { email, .. } => {
                Some(format!("mailbox-{email}"))
            }
        }
    }

    async fn dispatch(&self, _: MailCommand, _: CommandContext) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn registered(id: &str, email: &str) -> RecordedEvent {
    let event = CustomerEvent::CustomerRegistered {
        customer_id: id.to_owned(),
        email: email.to_owned(),
    };
    recorded(&format!("customer-{id}"), 1, &event)
}

fn moved(id: &str, address: &str) -> RecordedEvent {
    let event = CustomerEvent::CustomerAddressUpdated {
        customer_id: id.to_owned(),
        address: address.to_owned(),
    };
    recorded(&format!("customer-{id}"), 2, &event)
}

#[test]
fn a_first_registration_sends_a_welcome() {
    process(&Mailer)
        .when(registered("7", "ada@example.com"))
        .then([MailCommand::SendWelcome {
            email: "ada@example.com".to_owned(),
        }]);
}

#[test]
fn state_from_the_history_shapes_the_reaction() {
    process(&Mailer)
        .given([registered("7", "ada@example.com")])
        .when(registered("7", "again@example.com"))
        .then([]);
    process(&Mailer)
        .given([
            registered("7", "ada@example.com"),
            registered("8", "bob@example.com"),
        ])
        .when(moved("7", "1 Analytical Way"))
        .then([MailCommand::SendAddressConfirmation {
            email: "ada@example.com".to_owned(),
            address: "1 Analytical Way".to_owned(),
        }]);
}

#[test]
fn a_failed_reaction_reports_its_error() {
    let error = process(&Mailer).when(moved("9", "nowhere")).then_fails();
    assert!(error.contains("before registration"), "{error}");
}

#[test]
fn issued_commands_carry_derived_ids_and_the_causing_event() {
    let event = registered("7", "ada@example.com");
    let issued = process(&Mailer).when(event.clone()).issued();
    let (_, context) = &issued[0];
    assert_eq!(context.causation_id, Some(event.event_id));
    assert_eq!(context.correlation_id, Some(event.event_id));
    // Derived, not random: reacting to the same event again gives the same id, and
    // another process manager reacting to it gets another.
    assert_eq!(
        context.command_id,
        CommandContext::caused_by(&event, "mailer", 0).command_id
    );
    assert_ne!(
        context.command_id,
        CommandContext::caused_by(&event, "other", 0).command_id
    );
    assert_ne!(
        context.command_id,
        CommandContext::caused_by(&event, "mailer", 1).command_id
    );
}

#[test]
fn issued_commands_name_their_targets() {
    let targets = process(&Mailer)
        .when(registered("7", "ada@example.com"))
        .targets();
    assert_eq!(targets, [Some("mailbox-ada@example.com".to_owned())]);
}

/// Without `target`, every command is dispatched alone, in order.
#[test]
fn commands_have_no_target_unless_the_process_manager_names_one() {
    struct Silent;

    #[async_trait]
    impl ProcessManager for Silent {
        type State = ();
        type Command = u64;

        fn name(&self) -> &str {
            "silent"
        }

        fn interest(&self) -> Interest {
            Interest::all()
        }

        fn react(&self, _: &mut (), _: &RecordedEvent) -> Result<Vec<u64>, HandlerError> {
            Ok(vec![1, 2])
        }

        async fn dispatch(&self, _: u64, _: CommandContext) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    let targets = process(&Silent)
        .when(registered("7", "ada@example.com"))
        .targets();
    assert_eq!(targets, [None, None]);
}
