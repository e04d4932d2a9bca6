//! Inventory: stock on hand per product, and reservations held for orders.
//!
//! A reservation that cannot be met is an event (`StockReservationFailed`), not an
//! error: the order placement saga reacts to it by rejecting the order and
//! releasing what it had reserved.

use std::collections::BTreeMap;

use diptych::{Aggregate, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use crate::Rejection;

/// `AddStock`: units of a product arrive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddStock {
    /// The product.
    pub product_id: String,
    /// How many units.
    pub quantity: u64,
}

// Stock is added only to a product the catalog knows: the shop's own handler.
diptych::command!(AddStock, id = product_id);

/// What inventory is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum InventoryCommand {
    /// See [`AddStock`].
    Add(AddStock),
    /// Holds units for an order (the saga's step).
    Reserve {
        /// The product.
        product_id: String,
        /// The order.
        order_id: String,
        /// How many units.
        quantity: u64,
    },
    /// Gives an order's units back (the saga's compensation).
    Release {
        /// The product.
        product_id: String,
        /// The order.
        order_id: String,
    },
}

/// What happened to a product's stock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum InventoryEvent {
    /// Units arrived.
    StockAdded {
        /// The product.
        product_id: String,
        /// How many.
        quantity: u64,
    },
    /// Units were held for an order.
    StockReserved {
        /// The product.
        product_id: String,
        /// The order.
        order_id: String,
        /// How many.
        quantity: u64,
    },
    /// There were not enough units for an order.
    StockReservationFailed {
        /// The product.
        product_id: String,
        /// The order.
        order_id: String,
        /// How many were asked for.
        quantity: u64,
        /// How many were available.
        available: u64,
    },
    /// An order's held units were given back.
    StockReleased {
        /// The product.
        product_id: String,
        /// The order.
        order_id: String,
        /// How many.
        quantity: u64,
    },
}

/// One product's stock.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stock {
    /// Units in the warehouse, reserved or not.
    pub on_hand: u64,
    /// Units held, by order.
    pub reservations: BTreeMap<String, u64>,
}

impl Stock {
    /// Units that can still be reserved.
    pub fn available(&self) -> u64 {
        self.on_hand - self.reservations.values().sum::<u64>()
    }
}

impl Aggregate for Stock {
    const KIND: &'static str = "stock";
    type Command = InventoryCommand;
    type Event = InventoryEvent;
    type Error = Rejection;

    fn decide(&self, command: &InventoryCommand) -> Result<Vec<InventoryEvent>, Rejection> {
        match command {
            InventoryCommand::Add(add) => {
                if add.quantity == 0 {
                    return Err(Rejection::Invalid {
                        field: "quantity",
                        reason: "must be at least 1",
                    });
                }
                Ok(vec![InventoryEvent::StockAdded {
                    product_id: add.product_id.clone(),
                    quantity: add.quantity,
                }])
            }
            InventoryCommand::Reserve {
                product_id,
                order_id,
                quantity,
            } => {
                if self.reservations.contains_key(order_id) {
                    return Ok(vec![]);
                }
                let available = self.available();
                if *quantity > available {
                    return Ok(vec![InventoryEvent::StockReservationFailed {
                        product_id: product_id.clone(),
                        order_id: order_id.clone(),
                        quantity: *quantity,
                        available,
                    }]);
                }
                Ok(vec![InventoryEvent::StockReserved {
                    product_id: product_id.clone(),
                    order_id: order_id.clone(),
                    quantity: *quantity,
                }])
            }
            InventoryCommand::Release {
                product_id,
                order_id,
            } => Ok(self
                .reservations
                .get(order_id)
                .map(|quantity| InventoryEvent::StockReleased {
                    product_id: product_id.clone(),
                    order_id: order_id.clone(),
                    quantity: *quantity,
                })
                .into_iter()
                .collect()),
        }
    }

    /// A hot product's stream grows with every reservation (or rename): a
    /// snapshot every 50 events keeps loading it cheap.
    fn snapshot_policy() -> SnapshotPolicy {
        SnapshotPolicy::Every(50)
    }

    fn evolve(&mut self, event: &InventoryEvent) {
        match event {
            InventoryEvent::StockAdded { quantity, .. } => self.on_hand += quantity,
            InventoryEvent::StockReserved {
                order_id, quantity, ..
            } => {
                self.reservations.insert(order_id.clone(), *quantity);
            }
            InventoryEvent::StockReleased { order_id, .. } => {
                self.reservations.remove(order_id);
            }
            InventoryEvent::StockReservationFailed { .. } => {}
        }
    }
}
