//! Customers: who buys, and where to send it.

use diptych::Aggregate;
use serde::{Deserialize, Serialize};

use crate::Rejection;

/// `RegisterCustomer`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterCustomer {
    /// The new customer's id.
    pub customer_id: String,
    /// Their name.
    pub name: String,
    /// Their email address.
    pub email: String,
    /// Their postal address.
    pub address: String,
}

/// `UpdateCustomerAddress`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateCustomerAddress {
    /// The customer.
    pub customer_id: String,
    /// The new postal address.
    pub address: String,
}

/// What the customers context is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum CustomerCommand {
    /// See [`RegisterCustomer`].
    Register(RegisterCustomer),
    /// See [`UpdateCustomerAddress`].
    UpdateAddress(UpdateCustomerAddress),
}

diptych::command!(
    RegisterCustomer,
    id = customer_id,
    aggregate = Customer,
    into = CustomerCommand::Register
);
diptych::command!(
    UpdateCustomerAddress,
    id = customer_id,
    aggregate = Customer,
    into = CustomerCommand::UpdateAddress
);

/// What happened to a customer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CustomerEvent {
    /// A customer registered.
    CustomerRegistered {
        /// The customer.
        customer_id: String,
        /// Their name.
        name: String,
        /// Their email address.
        email: String,
        /// Their postal address.
        address: String,
    },
    /// A customer moved.
    CustomerAddressUpdated {
        /// The customer.
        customer_id: String,
        /// The new postal address.
        address: String,
    },
}

/// A customer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    /// Registered yet.
    pub exists: bool,
    /// Their postal address.
    pub address: String,
}

impl Aggregate for Customer {
    const KIND: &'static str = "customer";
    type Command = CustomerCommand;
    type Event = CustomerEvent;
    type Error = Rejection;

    fn decide(&self, command: &CustomerCommand) -> Result<Vec<CustomerEvent>, Rejection> {
        match command {
            CustomerCommand::Register(register) => {
                if self.exists {
                    return Err(Rejection::CustomerExists);
                }
                if register.name.trim().is_empty() {
                    return Err(Rejection::Invalid {
                        field: "name",
                        reason: "must not be empty",
                    });
                }
                if !register.email.contains('@') {
                    return Err(Rejection::Invalid {
                        field: "email",
                        reason: "must be an email address",
                    });
                }
                Ok(vec![CustomerEvent::CustomerRegistered {
                    customer_id: register.customer_id.clone(),
                    name: register.name.trim().to_owned(),
                    email: register.email.trim().to_owned(),
                    address: register.address.clone(),
                }])
            }
            CustomerCommand::UpdateAddress(update) => {
                if !self.exists {
                    return Err(Rejection::CustomerNotFound);
                }
                if self.address == update.address {
                    return Ok(vec![]);
                }
                Ok(vec![CustomerEvent::CustomerAddressUpdated {
                    customer_id: update.customer_id.clone(),
                    address: update.address.clone(),
                }])
            }
        }
    }

    fn evolve(&mut self, event: &CustomerEvent) {
        match event {
            CustomerEvent::CustomerRegistered { address, .. } => {
                self.exists = true;
                self.address.clone_from(address);
            }
            CustomerEvent::CustomerAddressUpdated { address, .. } => {
                self.address.clone_from(address);
            }
        }
    }
}
