//! The order placement saga: reserve every line's stock; all reserved → confirm;
//! one short → reject and release what was reserved (a compensation, never a
//! distributed transaction). A cancelled order's reservations are released too,
//! including any that arrive after the cancellation.

use std::collections::BTreeSet;

use async_trait::async_trait;
use diptych::{
    Aggregate, CommandContext, EventSet, HandlerError, RecordedEvent, Repository,
    TypedProcessManager,
};
use serde::{Deserialize, Serialize};

use crate::inventory::{InventoryCommand, InventoryEvent, Stock};
use crate::ordering::{Order, OrderCommand, OrderEvent};

/// A command the saga issues.
#[derive(Clone, Debug, PartialEq)]
pub enum PlacementCommand {
    /// To a product's stock.
    Stock(InventoryCommand),
    /// To an order.
    Order {
        /// The order.
        order_id: String,
        /// What to do.
        command: OrderCommand,
    },
}

/// What the saga remembers of one order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlacementState {
    /// The products ordered.
    pub products: BTreeSet<String>,
    /// The products whose stock is reserved for the order.
    pub reserved: BTreeSet<String>,
    /// A line could not be reserved: the order is rejected.
    pub failed: bool,
    /// The customer cancelled.
    pub cancelled: bool,
}

/// Which of the saga's commands a process sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Targets {
    /// Every one: the whole shop in one process.
    All,
    /// Those to stock: the inventory service.
    Stock,
    /// Those to orders: the ordering service.
    Orders,
}

/// The events the saga reacts to.
pub enum PlacementEvent {
    /// An order's.
    Order(OrderEvent),
    /// A product's stock.
    Stock(InventoryEvent),
}

/// The saga, dispatching to the stock and order repositories.
pub struct OrderPlacement {
    stock: Repository<Stock>,
    orders: Repository<Order>,
    targets: Targets,
    events: EventSet<PlacementEvent>,
}

impl OrderPlacement {
    /// The saga over these repositories.
    pub fn new(stock: Repository<Stock>, orders: Repository<Order>) -> Self {
        Self {
            stock,
            orders,
            targets: Targets::All,
            events: EventSet::new()
                .aggregate::<Order>(PlacementEvent::Order)
                .aggregate::<Stock>(PlacementEvent::Stock),
        }
    }

    /// The saga sending only the commands for `targets`, when another service
    /// runs it too for the others. Each sees the order's and the stock's
    /// events in order per stream, but the two streams interleave differently
    /// in each service, so their states can differ for a while: inventory may
    /// release a reservation twice (after a failure, then after the
    /// cancellation). That is safe: a second release, or a confirm or reject
    /// of an order that moved on, changes nothing, and a reservation is only
    /// asked for on `OrderPlaced`, which each service sees before anything
    /// else of that order.
    pub fn sending_only(mut self, targets: Targets) -> Self {
        self.targets = targets;
        self
    }

    fn stock_of(command: &InventoryCommand) -> &str {
        match command {
            InventoryCommand::Add(add) => &add.product_id,
            InventoryCommand::Reserve { product_id, .. }
            | InventoryCommand::Release { product_id, .. } => product_id,
        }
    }

    /// What a stock event calls for: confirm once every line is reserved;
    /// on a shortage, reject and release; release what arrives too late.
    fn react_to_stock(state: &mut PlacementState, event: InventoryEvent) -> Vec<PlacementCommand> {
        match event {
            InventoryEvent::StockReserved {
                product_id,
                order_id,
                ..
            } => {
                state.reserved.insert(product_id.clone());
                if state.failed || state.cancelled {
                    vec![PlacementCommand::Stock(InventoryCommand::Release {
                        product_id,
                        order_id,
                    })]
                } else if state.reserved == state.products {
                    vec![PlacementCommand::Order {
                        order_id,
                        command: OrderCommand::Confirm,
                    }]
                } else {
                    vec![]
                }
            }
            InventoryEvent::StockReservationFailed { order_id, .. }
                if !state.failed && !state.cancelled =>
            {
                state.failed = true;
                let mut commands = vec![PlacementCommand::Order {
                    order_id: order_id.clone(),
                    command: OrderCommand::Reject {
                        reason: "insufficient_stock".to_owned(),
                    },
                }];
                commands.extend(Self::release_all(state, &order_id));
                commands
            }
            _ => vec![],
        }
    }

    fn release_all(state: &PlacementState, order_id: &str) -> Vec<PlacementCommand> {
        state
            .reserved
            .iter()
            .map(|product_id| {
                PlacementCommand::Stock(InventoryCommand::Release {
                    product_id: product_id.clone(),
                    order_id: order_id.to_owned(),
                })
            })
            .collect()
    }
}

#[async_trait]
impl TypedProcessManager for OrderPlacement {
    type Event = PlacementEvent;
    type State = PlacementState;
    type Command = PlacementCommand;

    fn name(&self) -> &str {
        "order-placement"
    }

    fn events(&self) -> &EventSet<PlacementEvent> {
        &self.events
    }

    /// An order's placement is one instance; the events it does not react to
    /// have none, so they read and write no state.
    fn instance(&self, event: &PlacementEvent, _: &RecordedEvent) -> Option<String> {
        match event {
            PlacementEvent::Order(
                OrderEvent::OrderPlaced { order_id, .. }
                | OrderEvent::OrderCancelled { order_id, .. },
            )
            | PlacementEvent::Stock(
                InventoryEvent::StockReserved { order_id, .. }
                | InventoryEvent::StockReservationFailed { order_id, .. },
            ) => Some(order_id.clone()),
            _ => None,
        }
    }

    fn react(
        &self,
        state: &mut PlacementState,
        event: PlacementEvent,
        _: &RecordedEvent,
    ) -> Result<Vec<PlacementCommand>, HandlerError> {
        let event = match event {
            PlacementEvent::Order(event) => event,
            PlacementEvent::Stock(event) => return Ok(Self::react_to_stock(state, event)),
        };
        Ok(match event {
            OrderEvent::OrderPlaced {
                order_id, lines, ..
            } => {
                state.products = lines.iter().map(|line| line.product_id.clone()).collect();
                lines
                    .into_iter()
                    .map(|line| {
                        PlacementCommand::Stock(InventoryCommand::Reserve {
                            product_id: line.product_id,
                            order_id: order_id.clone(),
                            quantity: line.quantity,
                        })
                    })
                    .collect()
            }
            OrderEvent::OrderCancelled { order_id, .. } => {
                state.cancelled = true;
                Self::release_all(state, &order_id)
            }
            _ => vec![],
        })
    }

    /// Each command touches one aggregate, a product's stock or an order, and
    /// none reads another's effect: reservations for different products and
    /// confirmations of different orders go out together.
    fn target(&self, command: &PlacementCommand) -> Option<String> {
        Some(match command {
            PlacementCommand::Stock(command) => {
                format!("{}-{}", Stock::KIND, Self::stock_of(command))
            }
            PlacementCommand::Order { order_id, .. } => format!("{}-{order_id}", Order::KIND),
        })
    }

    async fn dispatch(
        &self,
        command: PlacementCommand,
        context: CommandContext,
    ) -> Result<(), HandlerError> {
        match command {
            PlacementCommand::Stock(_) if self.targets == Targets::Orders => {}
            PlacementCommand::Order { .. } if self.targets == Targets::Stock => {}
            PlacementCommand::Stock(command) => {
                let product_id = Self::stock_of(&command).to_owned();
                self.stock.execute(&product_id, &command, &context).await?;
            }
            PlacementCommand::Order { order_id, command } => {
                self.orders.execute(&order_id, &command, &context).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use diptych::testing::{process, recorded};
    use diptych::{MemoryStore, Repository};

    use super::*;

    /// A rejection's commands touch the order and each reserved product's stock:
    /// four aggregates, so the runner sends all four at once.
    #[test]
    fn each_command_targets_its_own_aggregate() {
        let store = Arc::new(MemoryStore::new());
        let saga = OrderPlacement::new(Repository::new(store.clone()), Repository::new(store));
        let reserved = |product_id: &str, version| {
            let event = InventoryEvent::StockReserved {
                product_id: product_id.to_owned(),
                order_id: "o1".to_owned(),
                quantity: 1,
            };
            recorded(&format!("stock-{product_id}"), version, &event)
        };
        let short = InventoryEvent::StockReservationFailed {
            product_id: "jam".to_owned(),
            order_id: "o1".to_owned(),
            quantity: 1,
            available: 0,
        };
        let targets = process(&saga)
            .given([reserved("mug", 1), reserved("tea", 1)])
            .when(recorded("stock-jam", 1, &short))
            .targets();
        assert_eq!(
            targets,
            [
                Some("order-o1".to_owned()),
                Some("stock-mug".to_owned()),
                Some("stock-tea".to_owned()),
            ]
        );
    }
}
