//! Ordering: orders, their lines and their fate.
//!
//! An order is placed with its lines priced from the catalog at that moment
//! (integer cents, never floats), then confirmed once every line's stock is
//! reserved, or rejected if one cannot be; a customer may cancel it until then,
//! or after it is confirmed.

use diptych::Aggregate;
use serde::{Deserialize, Serialize};

use crate::Rejection;

/// One line of `PlaceOrder`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderLineRequest {
    /// The product.
    pub product_id: String,
    /// How many units.
    pub quantity: u64,
}

/// `PlaceOrder`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    /// The new order's id.
    pub order_id: String,
    /// The customer placing it.
    pub customer_id: String,
    /// What they order.
    pub lines: Vec<OrderLineRequest>,
}

/// `CancelOrder`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelOrder {
    /// The order.
    pub order_id: String,
}

// An order is priced from the catalog first: the shop's own handler.
diptych::command!(PlaceOrder, id = order_id);
diptych::command!(
    CancelOrder,
    id = order_id,
    aggregate = Order,
    into = |_| OrderCommand::Cancel
);

/// A line as ordered: priced and named from the catalog when the order was placed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The product.
    pub product_id: String,
    /// The product's name when ordered.
    pub name: String,
    /// How many units.
    pub quantity: u64,
    /// The unit price when ordered, in cents.
    pub price_cents: u64,
}

impl OrderLine {
    /// Quantity times unit price, in cents.
    pub fn total_cents(&self) -> u64 {
        self.quantity * self.price_cents
    }
}

/// What ordering is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum OrderCommand {
    /// Places an order whose lines the application has priced.
    Place {
        /// The order.
        order_id: String,
        /// The customer.
        customer_id: String,
        /// The priced lines.
        lines: Vec<OrderLine>,
    },
    /// Every line is reserved (the saga's step).
    Confirm,
    /// A line could not be reserved (the saga's step).
    Reject {
        /// Why, as a stable code (`insufficient_stock`).
        reason: String,
    },
    /// The customer cancels.
    Cancel,
}

/// What happened to an order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum OrderEvent {
    /// An order was placed.
    OrderPlaced {
        /// The order.
        order_id: String,
        /// The customer.
        customer_id: String,
        /// The lines, priced.
        lines: Vec<OrderLine>,
        /// The sum of the lines, in cents.
        total_cents: u64,
    },
    /// Every line was reserved.
    OrderConfirmed {
        /// The order.
        order_id: String,
        /// The customer.
        customer_id: String,
        /// The order's total, in cents.
        total_cents: u64,
    },
    /// The order could not be fulfilled.
    OrderRejected {
        /// The order.
        order_id: String,
        /// The customer.
        customer_id: String,
        /// Why, as a stable code.
        reason: String,
    },
    /// The customer cancelled.
    OrderCancelled {
        /// The order.
        order_id: String,
        /// The customer.
        customer_id: String,
        /// Whether it had been confirmed (its total counted) before.
        was_confirmed: bool,
        /// The order's total, in cents.
        total_cents: u64,
    },
}

/// Where an order stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Not placed.
    #[default]
    None,
    /// Placed, waiting for its stock.
    Placed,
    /// Every line reserved.
    Confirmed,
    /// A line could not be reserved.
    Rejected,
    /// Cancelled by the customer.
    Cancelled,
}

/// An order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Where it stands.
    pub status: OrderStatus,
    /// Its id.
    pub order_id: String,
    /// Its customer.
    pub customer_id: String,
    /// Its lines.
    pub lines: Vec<OrderLine>,
    /// Its total, in cents.
    pub total_cents: u64,
    /// Why it was rejected.
    pub reason: Option<String>,
}

impl Aggregate for Order {
    const KIND: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = Rejection;

    fn decide(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, Rejection> {
        let order_id = self.order_id.clone();
        let customer_id = self.customer_id.clone();
        match (command, self.status) {
            (
                OrderCommand::Place {
                    order_id,
                    customer_id,
                    lines,
                },
                OrderStatus::None,
            ) => {
                if lines.is_empty() {
                    return Err(Rejection::Invalid {
                        field: "lines",
                        reason: "an order needs at least one line",
                    });
                }
                if lines.iter().any(|line| line.quantity == 0) {
                    return Err(Rejection::Invalid {
                        field: "lines.quantity",
                        reason: "must be at least 1",
                    });
                }
                let total_cents = lines.iter().map(OrderLine::total_cents).sum();
                Ok(vec![OrderEvent::OrderPlaced {
                    order_id: order_id.clone(),
                    customer_id: customer_id.clone(),
                    lines: lines.clone(),
                    total_cents,
                }])
            }
            (OrderCommand::Place { .. }, _) => Err(Rejection::OrderExists),
            (_, OrderStatus::None) => Err(Rejection::OrderNotFound),
            (OrderCommand::Confirm, OrderStatus::Placed) => Ok(vec![OrderEvent::OrderConfirmed {
                order_id,
                customer_id,
                total_cents: self.total_cents,
            }]),
            (OrderCommand::Reject { reason }, OrderStatus::Placed) => {
                Ok(vec![OrderEvent::OrderRejected {
                    order_id,
                    customer_id,
                    reason: reason.clone(),
                }])
            }
            // The saga's late steps on an order that has moved on change nothing.
            (OrderCommand::Confirm | OrderCommand::Reject { .. }, _) => Ok(vec![]),
            (OrderCommand::Cancel, OrderStatus::Placed | OrderStatus::Confirmed) => {
                Ok(vec![OrderEvent::OrderCancelled {
                    order_id,
                    customer_id,
                    was_confirmed: self.status == OrderStatus::Confirmed,
                    total_cents: self.total_cents,
                }])
            }
            (OrderCommand::Cancel, _) => Err(Rejection::OrderNotCancellable),
        }
    }

    fn evolve(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderPlaced {
                order_id,
                customer_id,
                lines,
                total_cents,
            } => {
                self.status = OrderStatus::Placed;
                self.order_id.clone_from(order_id);
                self.customer_id.clone_from(customer_id);
                self.lines.clone_from(lines);
                self.total_cents = *total_cents;
            }
            OrderEvent::OrderConfirmed { .. } => self.status = OrderStatus::Confirmed,
            OrderEvent::OrderRejected { reason, .. } => {
                self.status = OrderStatus::Rejected;
                self.reason = Some(reason.clone());
            }
            OrderEvent::OrderCancelled { .. } => self.status = OrderStatus::Cancelled,
        }
    }
}
