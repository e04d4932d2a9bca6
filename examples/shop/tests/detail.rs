//! The order detail's live call to the catalog, at the ordering service: a
//! catalog that accepts connections and never answers costs the detail one
//! timeout, however many lines, and the answer comes from the local copy,
//! marked stale; a catalog that knows some products gives those, with the
//! token it wants; an unknown order is a 404.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use diptych::http::Auth;
use diptych::{CommandContext, MemoryStore, MemoryViews, RunnerConfig, wait_for};
use diptych_shop::catalog::{CatalogCommand, RegisterProduct};
use diptych_shop::customers::{CustomerCommand, RegisterCustomer};
use diptych_shop::detail::{CatalogClient, routes};
use diptych_shop::inventory::{AddStock, InventoryCommand};
use diptych_shop::services::Service;
use diptych_shop::{Shop, ShopCommand};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// The ordering service with copies of two products, a customer and stock
/// (written here through the repositories, as the copies would be), and an
/// order of both products.
async fn ordering_with_an_order() -> Arc<Shop> {
    let shop = Arc::new(Shop::service(
        Service::Ordering,
        Arc::new(MemoryStore::new()),
        Arc::new(MemoryViews::new()),
    ));
    for (id, name) in [("mug", "Stoneware mug"), ("tea", "Green tea")] {
        let register = CatalogCommand::Register(RegisterProduct {
            product_id: id.to_owned(),
            name: name.to_owned(),
            description: format!("{name}, described"),
            price_cents: 500,
        });
        shop.products
            .execute(id, &register, &CommandContext::default())
            .await
            .unwrap();
        let add = InventoryCommand::Add(AddStock {
            product_id: id.to_owned(),
            quantity: 10,
        });
        shop.stock
            .execute(id, &add, &CommandContext::default())
            .await
            .unwrap();
    }
    let customer = CustomerCommand::Register(RegisterCustomer {
        customer_id: "ada".to_owned(),
        name: "Ada".to_owned(),
        email: "ada@example.com".to_owned(),
        address: "London".to_owned(),
    });
    shop.customers
        .execute("ada", &customer, &CommandContext::default())
        .await
        .unwrap();
    let place = ShopCommand::parse(
        "PlaceOrder",
        json!({"order_id": "o-1", "customer_id": "ada", "lines": [
            {"product_id": "mug", "quantity": 1}, {"product_id": "tea", "quantity": 2}]}),
    )
    .unwrap();
    let placed = shop
        .execute(place, &CommandContext::default())
        .await
        .unwrap();
    let runners = shop.start(RunnerConfig::default()).await.unwrap();
    wait_for(
        &**shop.views(),
        "orders",
        placed.position,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    for runner in runners {
        runner.stop().await;
    }
    shop
}

async fn get(router: axum::Router, path: &str) -> (StatusCode, Value) {
    let request = Request::builder().uri(path).body(Body::empty()).unwrap();
    let response = router.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn a_catalog_that_never_answers_costs_one_timeout_and_the_copy_answers() {
    let shop = ordering_with_an_order().await;
    // Accepts connections, answers nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let catalog = CatalogClient::new(
        format!("http://{}", silent.local_addr().unwrap()),
        Duration::from_millis(200),
    );
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            connections.push(connection);
        }
    });
    let router = routes(shop, Auth::open(), Some(catalog));
    let (status, detail) = get(router, "/orders/o-1").await;
    held.abort();
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["possibly_stale"], true, "{detail}");
    assert!(
        detail["stale_because"]
            .as_str()
            .is_some_and(|why| why.contains("did not answer within")),
        "{detail}"
    );
    let lines = detail["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 2);
    for line in lines {
        assert_eq!(line["description_from"], "local copy", "{detail}");
        assert!(
            line["description"]
                .as_str()
                .unwrap()
                .ends_with(", described")
        );
    }
}

#[tokio::test]
async fn an_unknown_order_is_a_404_and_a_token_is_required_when_tokens_are_set() {
    let shop = ordering_with_an_order().await;
    let (status, problem) = get(routes(shop.clone(), Auth::open(), None), "/orders/o-9").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    assert_eq!(problem["code"], "order_not_found");

    let tokens = Auth::tokens([("secret".to_owned(), diptych::http::Role::Reader)].into());
    let (status, problem) = get(routes(shop, tokens, None), "/orders/o-1").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{problem}");
}

/// A catalog that wants a token, knows the mug and not the tea.
async fn catalog_knowing_the_mug() -> String {
    use axum::extract::Path;
    use axum::http::HeaderMap;
    let router = axum::Router::new().route(
        "/views/products/{id}",
        axum::routing::get(|Path(id): Path<String>, headers: HeaderMap| async move {
            let authorised = headers
                .get("authorization")
                .is_some_and(|value| value == "Bearer reader-token");
            let (status, body) = match (authorised, id.as_str()) {
                (false, _) => (StatusCode::UNAUTHORIZED, json!({"code": "unauthorized"})),
                (true, "mug") => (
                    StatusCode::OK,
                    json!({"name": "Mug, renamed", "description": "From the catalog"}),
                ),
                (true, _) => (StatusCode::NOT_FOUND, json!({"code": "not_found"})),
            };
            (status, axum::Json(body))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

fn line<'a>(detail: &'a Value, product: &str) -> &'a Value {
    detail["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|line| line["product_id"] == product)
        .unwrap_or_else(|| panic!("a {product} line in {detail}"))
}

#[tokio::test]
async fn each_line_takes_what_the_catalog_gives_and_a_token_is_sent() {
    let shop = ordering_with_an_order().await;
    let catalog = catalog_knowing_the_mug().await;
    let with_token =
        CatalogClient::new(&catalog, Duration::from_secs(5)).with_token("reader-token");
    let (status, detail) = get(
        routes(shop.clone(), Auth::open(), Some(with_token)),
        "/orders/o-1",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    let mug = line(&detail, "mug");
    assert_eq!(mug["description_from"], "catalog", "{detail}");
    assert_eq!(mug["current_name"], "Mug, renamed");
    assert_eq!(mug["description"], "From the catalog");
    let tea = line(&detail, "tea");
    assert_eq!(tea["description_from"], "local copy", "{detail}");
    assert_eq!(detail["possibly_stale"], true);
    assert!(
        detail["stale_because"]
            .as_str()
            .is_some_and(|why| why.contains("404")),
        "{detail}"
    );

    // Without the token the catalog says 401, and the copy answers every line.
    let without = CatalogClient::new(&catalog, Duration::from_secs(5));
    let (status, detail) = get(routes(shop, Auth::open(), Some(without)), "/orders/o-1").await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(line(&detail, "mug")["description_from"], "local copy");
    assert!(
        detail["stale_because"]
            .as_str()
            .is_some_and(|why| why.contains("401")),
        "{detail}"
    );
}
