//! The shop end to end, on the in-memory stores, on SQLite and on PostgreSQL:
//! commands in, the saga running, the five views out.

use std::sync::Arc;
use std::time::Duration;

use diptych::postgres::{PgStore, PgViews, testing::fresh_config};
use diptych::sqlite::{SqliteStore, SqliteViews};
use diptych::{
    CommandContext, CommandError, EventStore, MemoryStore, MemoryViews, Query, RunnerConfig,
    RunnerHandle, ViewStore, wait_for,
};
use diptych_shop::ordering::OrderStatus;
use diptych_shop::{Rejection, Shop, ShopCommand, VIEWS};
use serde_json::{Value, json};

struct Running {
    shop: Arc<Shop>,
    runners: Vec<RunnerHandle>,
    _dir: Option<tempfile::TempDir>,
}

async fn running(
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    dir: Option<tempfile::TempDir>,
) -> Running {
    let shop = Arc::new(Shop::new(store, views));
    let config = RunnerConfig {
        control_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    };
    let runners = shop.start(config).await.expect("the shop starts");
    Running {
        shop,
        runners,
        _dir: dir,
    }
}

async fn in_memory() -> Running {
    running(
        Arc::new(MemoryStore::new()),
        Arc::new(MemoryViews::new()),
        None,
    )
    .await
}

async fn on_sqlite() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("events.db")).unwrap();
    let views = SqliteViews::open(dir.path().join("views.db")).unwrap();
    running(Arc::new(store), Arc::new(views), Some(dir)).await
}

/// PgStore and PgViews in a schema of their own.
async fn on_postgres() -> Running {
    let config = fresh_config().await;
    let store = PgStore::connect(&config).await.unwrap();
    let views = PgViews::connect(&config).await.unwrap();
    running(Arc::new(store), Arc::new(views), None).await
}

impl Running {
    async fn send(
        &self,
        name: &str,
        body: Value,
    ) -> Result<diptych::CommandOutcome, CommandError<Rejection>> {
        let command = ShopCommand::parse(name, body).expect("a well-formed command");
        self.shop.execute(command, &CommandContext::default()).await
    }

    async fn ok(&self, name: &str, body: Value) -> diptych::CommandOutcome {
        self.send(name, body.clone())
            .await
            .unwrap_or_else(|error| panic!("{name} {body} failed: {error}"))
    }

    /// Waits until every view and the saga have applied everything, including
    /// the events the saga's own commands appended.
    async fn settle(&self) {
        let store = self.shop.store();
        loop {
            let head = store.head().await.unwrap();
            for view in VIEWS.iter().chain(["order-placement"].iter()) {
                wait_for(&**self.shop.views(), view, head, Duration::from_secs(30))
                    .await
                    .unwrap_or_else(|error| panic!("{view}: {error}"));
            }
            if store.head().await.unwrap() == head {
                return;
            }
        }
    }

    async fn view(&self, view: &str, key: &str) -> Value {
        self.shop
            .views()
            .get(view, key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no `{key}` in `{view}`"))
    }

    async fn seed(&self) {
        self.ok("RegisterProduct", json!({"product_id": "mug", "name": "Mug", "description": "A blue stoneware mug", "price_cents": 1299})).await;
        self.ok("RegisterProduct", json!({"product_id": "tea", "name": "Green tea", "description": "Loose leaf, 100 g", "price_cents": 850})).await;
        self.ok("AddStock", json!({"product_id": "mug", "quantity": 10}))
            .await;
        self.ok("AddStock", json!({"product_id": "tea", "quantity": 3}))
            .await;
        self.ok("RegisterCustomer", json!({"customer_id": "ada", "name": "Ada", "email": "ada@example.com", "address": "1 Engine St"})).await;
        self.ok("RegisterCustomer", json!({"customer_id": "alan", "name": "Alan", "email": "alan@example.com", "address": "2 Bletchley Rd"})).await;
    }

    async fn stop(self) {
        for runner in self.runners {
            runner.stop().await;
        }
    }
}

async fn a_placed_order_is_confirmed_and_every_view_follows(shop: Running) {
    shop.seed().await;
    shop.ok(
        "PlaceOrder",
        json!({"order_id": "o1", "customer_id": "ada", "lines": [
        {"product_id": "mug", "quantity": 2}, {"product_id": "tea", "quantity": 1}]}),
    )
    .await;
    shop.settle().await;
    let order = shop.view("orders", "o1").await;
    assert_eq!(order["status"], "confirmed");
    assert_eq!(order["total_cents"], 2 * 1299 + 850);
    assert_eq!(order["lines"][0]["name"], "Mug");
    assert_eq!(shop.view("products", "mug").await["stock_available"], 8);
    assert_eq!(shop.view("products", "mug").await["stock_on_hand"], 10);
    let customer = shop.view("customers", "ada").await;
    assert_eq!(
        (
            customer["order_count"].clone(),
            customer["lifetime_value_cents"].clone()
        ),
        (json!(1), json!(3448))
    );
    let history = shop
        .shop
        .views()
        .query(
            "customer-orders",
            &Query::default()
                .eq("customer_id", "ada")
                .order_by("placed_at_us", true),
        )
        .await
        .unwrap();
    assert_eq!(history.items.len(), 1);
    let sales = shop
        .shop
        .views()
        .query("sales-by-hour", &Query::default().eq("product_id", "mug"))
        .await
        .unwrap();
    assert_eq!(sales.items.len(), 1);
    assert_eq!(
        (
            sales.items[0].1["units"].clone(),
            sales.items[0].1["revenue_cents"].clone()
        ),
        (json!(2), json!(2598))
    );
    let found = shop
        .shop
        .views()
        .query("products", &Query::default().text("stoneware"))
        .await
        .unwrap();
    assert_eq!(found.items[0].0, "mug");
    // Cancelling a confirmed order gives its units back and takes it off the books.
    shop.ok("CancelOrder", json!({"order_id": "o1"})).await;
    shop.settle().await;
    assert_eq!(shop.view("orders", "o1").await["status"], "cancelled");
    assert_eq!(shop.view("products", "mug").await["stock_available"], 10);
    assert_eq!(shop.view("customers", "ada").await["order_count"], 0);
    let sales = shop
        .shop
        .views()
        .query("sales-by-hour", &Query::default().eq("product_id", "mug"))
        .await
        .unwrap();
    assert_eq!(sales.items[0].1["units"], 0);
    shop.stop().await;
}

async fn business_rules_reject_with_stable_codes(shop: Running) {
    shop.seed().await;
    let refused = |result: Result<diptych::CommandOutcome, CommandError<Rejection>>| match result {
        Err(CommandError::Rejected(rejection)) => rejection.code(),
        other => panic!("expected a rejection, got {other:?}"),
    };
    assert_eq!(refused(shop.send("PlaceOrder", json!({"order_id": "o1", "customer_id": "ada", "lines": [{"product_id": "tea", "quantity": 4}]})).await), "insufficient_stock");
    assert_eq!(refused(shop.send("PlaceOrder", json!({"order_id": "o1", "customer_id": "ada", "lines": [{"product_id": "nope", "quantity": 1}]})).await), "product_not_found");
    assert_eq!(refused(shop.send("PlaceOrder", json!({"order_id": "o1", "customer_id": "nobody", "lines": [{"product_id": "tea", "quantity": 1}]})).await), "customer_not_found");
    assert_eq!(
        refused(
            shop.send(
                "PlaceOrder",
                json!({"order_id": "o1", "customer_id": "ada", "lines": []})
            )
            .await
        ),
        "invalid_field"
    );
    assert_eq!(
        refused(
            shop.send("AddStock", json!({"product_id": "nope", "quantity": 1}))
                .await
        ),
        "product_not_found"
    );
    assert_eq!(
        refused(
            shop.send(
                "RegisterProduct",
                json!({"product_id": "mug", "name": "Mug", "description": "", "price_cents": 1})
            )
            .await
        ),
        "product_exists"
    );
    assert_eq!(
        refused(
            shop.send(
                "RegisterProduct",
                json!({"product_id": "cup", "name": " ", "description": "", "price_cents": 1})
            )
            .await
        ),
        "invalid_field"
    );
    assert_eq!(
        refused(shop.send("CancelOrder", json!({"order_id": "never"})).await),
        "order_not_found"
    );
    assert!(matches!(
        ShopCommand::parse("Teleport", json!({})),
        Err(diptych_shop::ParseError::UnknownCommand(_))
    ));
    let error = ShopCommand::parse("AddStock", json!({"product_id": "mug", "quantity": "ten"}))
        .unwrap_err();
    assert!(error.to_string().contains("invalid type"), "{error}");
    let error = ShopCommand::parse("AddStock", json!({"product_id": "mug"})).unwrap_err();
    assert!(error.to_string().contains("quantity"), "{error}");
    shop.stop().await;
}

/// Many clients order the last units at once: the saga never oversells, rejects
/// what it cannot reserve, and leaves no reservation behind a rejected order.
async fn concurrent_orders_never_oversell(shop: Running) {
    shop.seed().await;
    let shop = Arc::new(shop);
    let mut clients = Vec::new();
    for n in 0..12 {
        let shop = shop.clone();
        clients.push(tokio::spawn(async move {
            // Every order takes a tea (3 in stock) and a mug (10 in stock).
            shop.send("PlaceOrder", json!({"order_id": format!("o{n}"), "customer_id": if n % 2 == 0 { "ada" } else { "alan" },
                "lines": [{"product_id": "mug", "quantity": 1}, {"product_id": "tea", "quantity": 1}]})).await
        }));
    }
    let mut placed = Vec::new();
    for (n, client) in clients.into_iter().enumerate() {
        match client.await.unwrap() {
            Ok(_) => placed.push(format!("o{n}")),
            Err(CommandError::Rejected(Rejection::InsufficientStock { .. })) => {}
            Err(other) => panic!("order o{n}: {other}"),
        }
    }
    shop.settle().await;
    let mut confirmed = Vec::new();
    for order_id in &placed {
        let order = shop.shop.orders.load(order_id).await.unwrap().state;
        match order.status {
            OrderStatus::Confirmed => confirmed.push(order_id.clone()),
            OrderStatus::Rejected => {
                assert_eq!(order.reason.as_deref(), Some("insufficient_stock"))
            }
            other => panic!("order {order_id} ended {other:?}"),
        }
    }
    assert!(
        confirmed.len() <= 3,
        "{} orders confirmed for 3 teas",
        confirmed.len()
    );
    // Reservations are keyed by order id, so compare in that order.
    confirmed.sort();
    for product in ["mug", "tea"] {
        let stock = shop.shop.stock.load(product).await.unwrap().state;
        let held: Vec<&String> = stock.reservations.keys().collect();
        assert_eq!(
            held,
            confirmed.iter().collect::<Vec<_>>(),
            "reservations of {product} must be exactly the confirmed orders'"
        );
    }
    let tea = shop.view("products", "tea").await;
    assert_eq!(tea["stock_available"], 3 - confirmed.len() as u64);
    match Arc::try_unwrap(shop) {
        Ok(shop) => shop.stop().await,
        Err(_) => panic!("a client still holds the shop"),
    }
}

async fn a_rename_reaches_every_customers_history(shop: Running) {
    shop.seed().await;
    shop.ok("PlaceOrder", json!({"order_id": "o1", "customer_id": "ada", "lines": [{"product_id": "mug", "quantity": 1}]})).await;
    shop.ok("PlaceOrder", json!({"order_id": "o2", "customer_id": "alan", "lines": [{"product_id": "mug", "quantity": 1}, {"product_id": "tea", "quantity": 1}]})).await;
    shop.settle().await;
    shop.ok(
        "RenameProduct",
        json!({"product_id": "mug", "name": "Big mug"}),
    )
    .await;
    shop.settle().await;
    for customer in ["ada", "alan"] {
        let history = shop
            .shop
            .views()
            .query(
                "customer-orders",
                &Query::default().eq("customer_id", customer),
            )
            .await
            .unwrap();
        assert_eq!(history.items.len(), 1);
        let lines = history.items[0].1["lines"].as_array().unwrap().clone();
        let mug = lines
            .iter()
            .find(|line| line["product_id"] == "mug")
            .unwrap();
        assert_eq!(mug["name"], "Big mug", "{customer}'s history");
        if let Some(tea) = lines.iter().find(|line| line["product_id"] == "tea") {
            assert_eq!(tea["name"], "Green tea");
        }
    }
    assert_eq!(shop.view("products", "mug").await["name"], "Big mug");
    shop.stop().await;
}

async fn an_order_reads_as_it_was_at_an_earlier_version(shop: Running) {
    shop.seed().await;
    shop.ok("PlaceOrder", json!({"order_id": "o1", "customer_id": "ada", "lines": [{"product_id": "mug", "quantity": 1}]})).await;
    shop.settle().await;
    let now = shop.shop.orders.load("o1").await.unwrap();
    assert_eq!((now.version, now.state.status), (2, OrderStatus::Confirmed));
    let placed = shop.shop.orders.load_at_version("o1", 1).await.unwrap();
    assert_eq!(placed.state.status, OrderStatus::Placed);
    let at_placement = shop
        .shop
        .orders
        .load_at_time("o1", placed.last_recorded_at.unwrap())
        .await
        .unwrap();
    assert_eq!(at_placement.state.status, OrderStatus::Placed);
    shop.stop().await;
}

macro_rules! on_every_store {
    ($($check:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::in_memory().await).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::on_sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::on_postgres().await).await;
                }
            )*
        }
    };
}

on_every_store!(
    a_placed_order_is_confirmed_and_every_view_follows,
    business_rules_reject_with_stable_codes,
    concurrent_orders_never_oversell,
    a_rename_reaches_every_customers_history,
    an_order_reads_as_it_was_at_an_earlier_version,
);
