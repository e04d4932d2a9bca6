//! The shop's rules without a store: aggregates and the placement saga,
//! given/when/then.

use std::sync::Arc;

use diptych::testing::{given, process, recorded};
use diptych::{MemoryStore, Repository};
use diptych_shop::Rejection;
use diptych_shop::inventory::{InventoryCommand, InventoryEvent, Stock};
use diptych_shop::ordering::{Order, OrderCommand, OrderEvent, OrderLine};
use diptych_shop::placement::{OrderPlacement, PlacementCommand};

fn line(product_id: &str, quantity: u64) -> OrderLine {
    OrderLine {
        product_id: product_id.to_owned(),
        name: product_id.to_uppercase(),
        quantity,
        price_cents: 100,
    }
}

fn placed() -> OrderEvent {
    OrderEvent::OrderPlaced {
        order_id: "o1".to_owned(),
        customer_id: "ada".to_owned(),
        lines: vec![line("mug", 2), line("tea", 1)],
        total_cents: 300,
    }
}

fn reserved(product_id: &str) -> InventoryEvent {
    InventoryEvent::StockReserved {
        product_id: product_id.to_owned(),
        order_id: "o1".to_owned(),
        quantity: 1,
    }
}

fn failed(product_id: &str) -> InventoryEvent {
    InventoryEvent::StockReservationFailed {
        product_id: product_id.to_owned(),
        order_id: "o1".to_owned(),
        quantity: 1,
        available: 0,
    }
}

fn saga() -> OrderPlacement {
    let store = Arc::new(MemoryStore::new());
    OrderPlacement::new(Repository::new(store.clone()), Repository::new(store))
}

fn release(product_id: &str) -> PlacementCommand {
    PlacementCommand::Stock(InventoryCommand::Release {
        product_id: product_id.to_owned(),
        order_id: "o1".to_owned(),
    })
}

#[test]
fn a_placed_order_reserves_every_line() {
    process(&saga())
        .when(recorded("order-o1", 1, &placed()))
        .then([
            PlacementCommand::Stock(InventoryCommand::Reserve {
                product_id: "mug".to_owned(),
                order_id: "o1".to_owned(),
                quantity: 2,
            }),
            PlacementCommand::Stock(InventoryCommand::Reserve {
                product_id: "tea".to_owned(),
                order_id: "o1".to_owned(),
                quantity: 1,
            }),
        ]);
}

#[test]
fn the_last_reservation_confirms_the_order() {
    process(&saga())
        .given([
            recorded("order-o1", 1, &placed()),
            recorded("stock-mug", 1, &reserved("mug")),
        ])
        .when(recorded("stock-tea", 1, &reserved("tea")))
        .then([PlacementCommand::Order {
            order_id: "o1".to_owned(),
            command: OrderCommand::Confirm,
        }]);
}

#[test]
fn a_short_line_rejects_the_order_and_releases_what_was_reserved() {
    process(&saga())
        .given([
            recorded("order-o1", 1, &placed()),
            recorded("stock-mug", 1, &reserved("mug")),
        ])
        .when(recorded("stock-tea", 1, &failed("tea")))
        .then([
            PlacementCommand::Order {
                order_id: "o1".to_owned(),
                command: OrderCommand::Reject {
                    reason: "insufficient_stock".to_owned(),
                },
            },
            release("mug"),
        ]);
}

#[test]
fn a_reservation_after_the_rejection_is_released_at_once() {
    process(&saga())
        .given([
            recorded("order-o1", 1, &placed()),
            recorded("stock-tea", 1, &failed("tea")),
        ])
        .when(recorded("stock-mug", 1, &reserved("mug")))
        .then([release("mug")]);
}

#[test]
fn stock_reservations_never_exceed_what_is_on_hand() {
    let added = InventoryEvent::StockAdded {
        product_id: "tea".to_owned(),
        quantity: 3,
    };
    given::<Stock>([added.clone()])
        .when(InventoryCommand::Reserve {
            product_id: "tea".to_owned(),
            order_id: "o1".to_owned(),
            quantity: 4,
        })
        .then([InventoryEvent::StockReservationFailed {
            product_id: "tea".to_owned(),
            order_id: "o1".to_owned(),
            quantity: 4,
            available: 3,
        }]);
    given::<Stock>([added, reserved("tea")])
        .when(InventoryCommand::Release {
            product_id: "tea".to_owned(),
            order_id: "o2".to_owned(),
        })
        .then([]);
}

#[test]
fn an_order_can_be_cancelled_until_it_is_rejected() {
    let rejected = OrderEvent::OrderRejected {
        order_id: "o1".to_owned(),
        customer_id: "ada".to_owned(),
        reason: "insufficient_stock".to_owned(),
    };
    given::<Order>([placed(), rejected])
        .when(OrderCommand::Cancel)
        .then_error(Rejection::OrderNotCancellable);
    given::<Order>([placed()])
        .when(OrderCommand::Cancel)
        .then([OrderEvent::OrderCancelled {
            order_id: "o1".to_owned(),
            customer_id: "ada".to_owned(),
            was_confirmed: false,
            total_cents: 300,
        }]);
}
