//! The shop's HTTP API as a client sees it, request by request: every test runs
//! through `app(...)` with `oneshot` and against a real socket, each on the
//! in-memory stores and on PostgreSQL.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use diptych::http::{AppState, Auth, HttpConfig, Role, app};
use diptych::postgres::{PgStore, PgViews, testing::fresh_config};
use diptych::{EventStore, MemoryStore, MemoryViews, RunnerConfig, RunnerHandle, ViewStore};
use diptych_shop::Shop;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Api {
    router: axum::Router,
    socket: Option<std::net::SocketAddr>,
    _runners: Vec<RunnerHandle>,
}

struct Answer {
    status: StatusCode,
    request_id: Option<String>,
    position: Option<u64>,
    content_type: String,
    body: Value,
    text: String,
}

/// How the tests reach the API: `oneshot` on the router, or a real socket.
#[derive(Clone, Copy, Debug)]
enum Mode {
    App,
    Socket,
}

/// Where the shop keeps its events and views.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    /// PgStore and PgViews in a schema of their own.
    Postgres,
}

impl Backend {
    async fn stores(self) -> (Arc<dyn EventStore>, Arc<dyn ViewStore>) {
        match self {
            Backend::Memory => (Arc::new(MemoryStore::new()), Arc::new(MemoryViews::new())),
            Backend::Postgres => {
                let config = fresh_config().await;
                let store = PgStore::connect(&config).await.unwrap();
                let views = PgViews::connect(&config).await.unwrap();
                (Arc::new(store), Arc::new(views))
            }
        }
    }
}

async fn api(mode: Mode, backend: Backend, auth: Auth) -> Api {
    let (store, views) = backend.stores().await;
    let store = diptych::http::metered(store);
    let shop = Arc::new(Shop::new(store.clone(), views.clone()));
    let runners = shop.start(RunnerConfig::default()).await.unwrap();
    let state = AppState {
        application: shop,
        store,
        views,
        auth,
        config: HttpConfig {
            body_limit: 4096,
            // Long enough for these small views on a loaded machine; short enough
            // that the check of a wait that times out stays quick.
            default_wait: std::time::Duration::from_secs(2),
            ..HttpConfig::default()
        },
    };
    let router = app(state);
    let socket = match mode {
        Mode::App => None,
        Mode::Socket => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let served = router.clone();
            tokio::spawn(async move { axum::serve(listener, served).await });
            Some(addr)
        }
    };
    Api {
        router,
        socket,
        _runners: runners,
    }
}

impl Api {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Answer {
        if let Some(addr) = self.socket {
            return call_socket(addr, method, uri, headers, body).await;
        }
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, Body::from))
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let position = response
            .headers()
            .get("x-diptych-position")
            .and_then(|value| value.to_str().ok()?.parse().ok());
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Answer {
            status,
            request_id,
            position,
            content_type,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }

    async fn command(&self, name: &str, body: Value) -> Answer {
        self.call(
            "POST",
            &format!("/commands/{name}"),
            &[],
            Some(body.to_string()),
        )
        .await
    }

    /// The positions of the whole log, in order.
    async fn log_positions(&self) -> Vec<u64> {
        let log = self
            .call("GET", "/events?after=0&limit=1000", &[], None)
            .await;
        log.body["events"]
            .as_array()
            .expect("a page of events")
            .iter()
            .map(|event| event["position"].as_u64().unwrap())
            .collect()
    }

    async fn seed(&self) -> u64 {
        for (name, body) in [
            (
                "RegisterProduct",
                json!({"product_id": "mug", "name": "Mug", "description": "Blue stoneware", "price_cents": 1299}),
            ),
            ("AddStock", json!({"product_id": "mug", "quantity": 5})),
            (
                "RegisterCustomer",
                json!({"customer_id": "ada", "name": "Ada", "email": "ada@example.com", "address": "1 Engine St"}),
            ),
        ] {
            let answer = self.command(name, body).await;
            assert_eq!(answer.status, StatusCode::OK, "{name}: {}", answer.body);
        }
        let placed = self
            .command("PlaceOrder", json!({"order_id": "o1", "customer_id": "ada", "lines": [{"product_id": "mug", "quantity": 2}]}))
            .await;
        assert_eq!(placed.status, StatusCode::OK, "{}", placed.body);
        placed.position.unwrap()
    }
}

fn assert_problem(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.content_type, "application/problem+json");
    assert_eq!(answer.body["code"], code, "{}", answer.body);
    assert_eq!(answer.body["status"], status.as_u16());
}

async fn a_command_answers_with_its_events_and_a_consistency_token(mode: Mode, backend: Backend) {
    let api = api(mode, backend, Auth::open()).await;
    let answer = api
        .command(
            "RegisterProduct",
            json!({"product_id": "mug", "name": "Mug", "description": "Blue", "price_cents": 1299}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["stream"], "product-mug");
    assert_eq!(answer.body["version"], 1);
    assert_eq!(answer.body["events"][0]["type"], "ProductAdded");
    assert_eq!(answer.body["events"][0]["data"]["price_cents"], 1299);
    assert_eq!(
        answer.position,
        Some(answer.body["position"].as_u64().unwrap())
    );
    // Read your write with the token.
    let token = answer.position.unwrap().to_string();
    let read = api
        .call(
            "GET",
            "/views/products/mug",
            &[("x-diptych-wait-for", &token)],
            None,
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body["name"], "Mug");
    assert!(read.position.unwrap() >= answer.position.unwrap());
    // The request id is the events' correlation id when the client sent none.
    let audit = api.call("GET", "/streams/product-mug", &[], None).await;
    assert_eq!(
        audit.body["events"][0]["metadata"]["correlation_id"].as_str(),
        answer.request_id.as_deref()
    );
    let correlation = "0193a1c2-7f55-7000-8000-000000000042";
    let renamed = api
        .call(
            "POST",
            "/commands/RenameProduct",
            &[("x-correlation-id", correlation)],
            Some(json!({"product_id": "mug", "name": "Cup"}).to_string()),
        )
        .await;
    assert_eq!(renamed.status, StatusCode::OK);
    let audit = api.call("GET", "/streams/product-mug", &[], None).await;
    assert_eq!(
        audit.body["events"][1]["metadata"]["correlation_id"],
        correlation
    );
}

async fn bad_input_gets_a_problem_with_a_stable_code_and_the_field(mode: Mode, backend: Backend) {
    let api = api(mode, backend, Auth::open()).await;
    assert_problem(
        &api.command("Teleport", json!({})).await,
        StatusCode::NOT_FOUND,
        "unknown_command",
    );
    let malformed = api
        .call(
            "POST",
            "/commands/AddStock",
            &[],
            Some("{not json".to_owned()),
        )
        .await;
    assert_problem(&malformed, StatusCode::BAD_REQUEST, "malformed_json");
    let wrong_type = api
        .command("AddStock", json!({"product_id": "mug", "quantity": "ten"}))
        .await;
    assert_problem(&wrong_type, StatusCode::BAD_REQUEST, "invalid_field");
    assert_eq!(wrong_type.body["field"], "quantity");
    let missing = api.command("AddStock", json!({"product_id": "mug"})).await;
    assert_problem(&missing, StatusCode::BAD_REQUEST, "invalid_field");
    assert_eq!(missing.body["field"], "quantity");
    let nested = api
        .command("PlaceOrder", json!({"order_id": "o", "customer_id": "c", "lines": [{"product_id": "mug", "quantity": -1}]}))
        .await;
    assert_eq!(nested.body["field"], "lines[0].quantity", "{}", nested.body);
    let unknown_field = api
        .command("CancelOrder", json!({"order_id": "o", "reason": "x"}))
        .await;
    assert_problem(&unknown_field, StatusCode::BAD_REQUEST, "invalid_field");
    assert_eq!(unknown_field.body["field"], "reason");
    let empty_name = api
        .command(
            "RegisterProduct",
            json!({"product_id": "cup", "name": "", "description": "", "price_cents": 5}),
        )
        .await;
    assert_problem(&empty_name, StatusCode::BAD_REQUEST, "invalid_field");
    assert_eq!(empty_name.body["field"], "name");
    let huge = json!({"product_id": "x".repeat(5000), "quantity": 1}).to_string();
    let too_large = api
        .call("POST", "/commands/AddStock", &[], Some(huge))
        .await;
    assert_problem(&too_large, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    let bad_header = api
        .call(
            "POST",
            "/commands/CancelOrder",
            &[("if-match", "seven")],
            Some(json!({"order_id": "o"}).to_string()),
        )
        .await;
    assert_problem(&bad_header, StatusCode::BAD_REQUEST, "invalid_header");
    assert_problem(
        &api.call("GET", "/nowhere", &[], None).await,
        StatusCode::NOT_FOUND,
        "no_route",
    );
}

async fn business_rules_conflicts_and_repeats(mode: Mode, backend: Backend) {
    let api = api(mode, backend, Auth::open()).await;
    api.seed().await;
    let short = api
        .command("PlaceOrder", json!({"order_id": "o2", "customer_id": "ada", "lines": [{"product_id": "mug", "quantity": 50}]}))
        .await;
    assert_problem(
        &short,
        StatusCode::UNPROCESSABLE_ENTITY,
        "insufficient_stock",
    );
    let unknown = api
        .command("PlaceOrder", json!({"order_id": "o2", "customer_id": "ada", "lines": [{"product_id": "lamp", "quantity": 1}]}))
        .await;
    assert_problem(
        &unknown,
        StatusCode::UNPROCESSABLE_ENTITY,
        "product_not_found",
    );
    // If-Match with a stale version.
    let rename = json!({"product_id": "mug", "name": "Cup"}).to_string();
    let conflict = api
        .call(
            "POST",
            "/commands/RenameProduct",
            &[("if-match", "7")],
            Some(rename.clone()),
        )
        .await;
    assert_problem(&conflict, StatusCode::CONFLICT, "version_conflict");
    let matched = api
        .call(
            "POST",
            "/commands/RenameProduct",
            &[("if-match", "1")],
            Some(rename),
        )
        .await;
    assert_eq!(matched.status, StatusCode::OK, "{}", matched.body);
    // The same Idempotency-Key twice: the first result, nothing written again.
    let body = json!({"product_id": "mug", "quantity": 3}).to_string();
    let first = api
        .call(
            "POST",
            "/commands/AddStock",
            &[("idempotency-key", "delivery-42")],
            Some(body.clone()),
        )
        .await;
    let again = api
        .call(
            "POST",
            "/commands/AddStock",
            &[("idempotency-key", "delivery-42")],
            Some(body),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["position"], first.body["position"]);
    assert_eq!(again.body["deduplicated"], true);
    let reused = api
        .call(
            "POST",
            "/commands/AddStock",
            &[("idempotency-key", "delivery-42")],
            Some(json!({"product_id": "mug", "quantity": 4}).to_string()),
        )
        .await;
    assert_eq!(
        reused.body["position"], first.body["position"],
        "a repeat returns the first result"
    );
}

async fn views_streams_the_log_and_projections_read_back(mode: Mode, backend: Backend) {
    let api = api(mode, backend, Auth::open()).await;
    let token = api.seed().await.to_string();
    let order = api
        .call(
            "GET",
            &format!("/views/orders/o1?wait_for={token}"),
            &[],
            None,
        )
        .await;
    assert_eq!(order.status, StatusCode::OK, "{}", order.body);
    assert_eq!(order.body["total_cents"], 2598);
    let history = api
        .call(
            "GET",
            &format!("/views/customer-orders?customer_id=ada&order=-placed_at_us&wait_for={token}"),
            &[],
            None,
        )
        .await;
    assert_eq!(history.body["items"][0]["key"], "o1", "{}", history.body);
    let cheap = api
        .call(
            "GET",
            &format!("/views/products?price_cents[lt]=2000&q=stoneware&wait_for={token}"),
            &[],
            None,
        )
        .await;
    assert_eq!(cheap.body["items"][0]["key"], "mug", "{}", cheap.body);
    assert_problem(
        &api.call("GET", "/views/nothing/x", &[], None).await,
        StatusCode::NOT_FOUND,
        "unknown_view",
    );
    assert_problem(
        &api.call("GET", "/views/orders/none", &[], None).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_problem(
        &api.call("GET", "/views/orders?name=x", &[], None).await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    );
    // Past any position a backend hands out, PostgreSQL's sparse ones included.
    let far = api
        .call(
            "GET",
            &format!("/views/orders/o1?wait_for={}", i64::MAX),
            &[],
            None,
        )
        .await;
    assert_problem(&far, StatusCode::SERVICE_UNAVAILABLE, "wait_timeout");

    let audit = api.call("GET", "/streams/order-o1", &[], None).await;
    assert_eq!(
        audit.body["events"][0]["event_type"], "OrderPlaced",
        "{}",
        audit.body
    );
    let then = api
        .call("GET", "/streams/order-o1/state?version=1", &[], None)
        .await;
    assert_eq!(then.body["state"]["status"], "placed", "{}", then.body);
    assert_problem(
        &api.call("GET", "/streams/nothing-1", &[], None).await,
        StatusCode::NOT_FOUND,
        "unknown_stream",
    );
    assert_problem(
        &api.call("GET", "/streams/order-o1/state?at=yesterday", &[], None)
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    );
    let log = api.call("GET", "/events?after=0&limit=2", &[], None).await;
    assert_eq!(log.body["events"].as_array().unwrap().len(), 2);
    assert_eq!(log.body["next_after"], log.body["events"][1]["position"]);

    let projections = api.call("GET", "/projections", &[], None).await;
    let names: Vec<&str> = projections
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"customer-orders") && names.contains(&"order-placement"),
        "{names:?}"
    );
    let rebuild = api
        .call("POST", "/projections/products/rebuild", &[], None)
        .await;
    assert_eq!(rebuild.status, StatusCode::ACCEPTED);
    assert_problem(
        &api.call("POST", "/projections/order-placement/rebuild", &[], None)
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not_rebuildable",
    );
    assert_eq!(
        api.call("GET", "/health/live", &[], None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        api.call("GET", "/health/ready", &[], None).await.status,
        StatusCode::OK
    );
}

async fn tokens_and_roles_guard_every_endpoint(mode: Mode, backend: Backend) {
    let tokens = BTreeMap::from([
        ("r".to_owned(), Role::Reader),
        ("w".to_owned(), Role::Writer),
        ("a".to_owned(), Role::Admin),
    ]);
    let api = api(mode, backend, Auth::tokens(tokens)).await;
    let body = Some(
        json!({"customer_id": "c", "name": "C", "email": "c@example.com", "address": ""})
            .to_string(),
    );
    assert_problem(
        &api.call("POST", "/commands/RegisterCustomer", &[], body.clone())
            .await,
        StatusCode::UNAUTHORIZED,
        "missing_token",
    );
    assert_problem(
        &api.call(
            "POST",
            "/commands/RegisterCustomer",
            &[("authorization", "Bearer nope")],
            body.clone(),
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    );
    assert_problem(
        &api.call(
            "POST",
            "/commands/RegisterCustomer",
            &[("authorization", "Bearer r")],
            body.clone(),
        )
        .await,
        StatusCode::FORBIDDEN,
        "insufficient_role",
    );
    assert_eq!(
        api.call(
            "POST",
            "/commands/RegisterCustomer",
            &[("authorization", "Bearer w")],
            body
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_problem(
        &api.call("GET", "/events", &[], None).await,
        StatusCode::UNAUTHORIZED,
        "missing_token",
    );
    assert_eq!(
        api.call("GET", "/events", &[("authorization", "Bearer r")], None)
            .await
            .status,
        StatusCode::OK
    );
    assert_problem(
        &api.call(
            "POST",
            "/projections/products/rebuild",
            &[("authorization", "Bearer w")],
            None,
        )
        .await,
        StatusCode::FORBIDDEN,
        "insufficient_role",
    );
    assert_eq!(
        api.call(
            "POST",
            "/projections/products/rebuild",
            &[("authorization", "Bearer a")],
            None
        )
        .await
        .status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        api.call("GET", "/health/live", &[], None).await.status,
        StatusCode::OK
    );
}

/// Reads SSE events (id, data) from a streaming body until `wanted` have come.
async fn sse_events(feed: &mut Feed, wanted: usize) -> Vec<(u64, Value)> {
    let mut text = String::new();
    let mut events = Vec::new();
    while events.len() < wanted {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(30), feed.next_bytes())
            .await
            .expect("an event in time");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let id = block
                .lines()
                .find_map(|line| line.strip_prefix("id: "))
                .map(|id| id.parse().unwrap());
            let data = block.lines().find_map(|line| line.strip_prefix("data: "));
            if let (Some(id), Some(data)) = (id, data) {
                events.push((id, serde_json::from_str(data).unwrap()));
            }
        }
    }
    events
}

impl Api {
    async fn open_feed(&self, uri: &str, last_event_id: Option<u64>) -> Feed {
        let id = last_event_id.map(|id| id.to_string());
        let headers: Vec<(&str, &str)> =
            id.iter().map(|id| ("last-event-id", id.as_str())).collect();
        if let Some(addr) = self.socket {
            let mut reader = send_socket(addr, "GET", uri, &headers, None).await;
            let (status, response_headers) = read_head(&mut reader).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(response_headers["content-type"], "text/event-stream");
            return Feed::Socket(reader);
        }
        let mut request = Request::builder().uri(uri);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Feed::Body(response.into_body())
    }
}

async fn the_live_log_resumes_after_a_disconnect_without_gap_or_duplicate(
    mode: Mode,
    backend: Backend,
) {
    let api = api(mode, backend, Auth::open()).await;
    api.seed().await;
    let mut feed = api.open_feed("/events/live?after=0", None).await;
    let first = sse_events(&mut feed, 5).await;
    // Positions may have gaps (PostgreSQL's do), so the feed is compared with
    // the log as `/events` reads it rather than with counting numbers.
    assert_eq!(ids(&first), api.log_positions().await[..first.len()]);
    assert_eq!(first[0].1["event_type"], "ProductAdded");
    drop(feed);
    // Meanwhile more is written.
    api.command("AddStock", json!({"product_id": "mug", "quantity": 1}))
        .await;
    let log = api.log_positions().await;
    let mut resumed = api.open_feed("/events/live", Some(log[4])).await;
    let rest = sse_events(&mut resumed, log.len() - 5).await;
    assert_eq!(ids(&rest), log[5..]);
    // And it follows live, still without a gap (the saga may append in between).
    let head = *log.last().unwrap();
    let added = api
        .command("AddStock", json!({"product_id": "mug", "quantity": 2}))
        .await
        .position
        .unwrap();
    let mut live = Vec::new();
    while live.last().is_none_or(|last| *last < added) {
        live.extend(ids(&sse_events(&mut resumed, 1).await));
    }
    let appended: Vec<u64> = api
        .log_positions()
        .await
        .into_iter()
        .filter(|position| (head + 1..=*live.last().unwrap()).contains(position))
        .collect();
    assert_eq!(live, appended, "a gap or a duplicate in the live feed");
}

/// The ids of SSE events.
fn ids(events: &[(u64, Value)]) -> Vec<u64> {
    events.iter().map(|(id, _)| *id).collect()
}

async fn a_documents_feed_sends_each_new_version(mode: Mode, backend: Backend) {
    let api = api(mode, backend, Auth::open()).await;
    api.seed().await;
    // Let the saga finish (the order confirmed), then the products view catch up
    // with everything, so the feed's first document is the settled one.
    for _ in 0..3000 {
        let order = api.call("GET", "/views/orders/o1", &[], None).await;
        if order.body["status"] == "confirmed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let log = api
        .call("GET", "/events?after=0&limit=1000", &[], None)
        .await;
    let head = log.body["next_after"].clone();
    let settled = api
        .call(
            "GET",
            &format!("/views/products/mug?wait_for={head}"),
            &[],
            None,
        )
        .await;
    assert_eq!(settled.status, StatusCode::OK);
    let mut feed = api.open_feed("/views/products/mug/live", None).await;
    let now = sse_events(&mut feed, 1).await;
    let available = now[0].1["stock_available"].as_u64().unwrap();
    api.command("AddStock", json!({"product_id": "mug", "quantity": 10}))
        .await;
    let next = sse_events(&mut feed, 1).await;
    assert!(next[0].0 > now[0].0);
    assert_eq!(next[0].1["stock_available"], available + 10);
    assert_problem(
        &api.call("GET", "/views/nothing/x/live", &[], None).await,
        StatusCode::NOT_FOUND,
        "unknown_view",
    );
    assert_problem(
        &api.call("GET", "/events/live?after=soon", &[], None).await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    );
}

async fn metrics_count_requests_commands_appends_and_lag(mode: Mode, backend: Backend) {
    let api = api(mode, backend, Auth::open()).await;
    api.seed().await;
    assert_problem(
        &api.command("Teleport", json!({})).await,
        StatusCode::NOT_FOUND,
        "unknown_command",
    );
    let metrics = api.call("GET", "/metrics", &[], None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.text;
    for expected in [
        r#"diptych_commands_total{command="PlaceOrder",outcome="ok"}"#,
        r#"diptych_http_requests_total{method="POST",route="/commands/{name}",status="200"}"#,
        r#"diptych_http_requests_total{method="POST",route="/commands/{name}",status="404"}"#,
        "diptych_command_seconds",
        "diptych_append_seconds",
        r#"diptych_projection_lag_events{projection="orders"}"#,
        r#"diptych_projection_lag_ms{projection="customer-orders"}"#,
    ] {
        assert!(
            text.contains(expected),
            "`{expected}` missing from:\n{text}"
        );
    }
}

/// The OpenAPI document lists every command, and every path it lists is routed
/// (none answers `no_route`), so the document and the router agree.
async fn openapi_lists_every_command_and_only_routed_paths(mode: Mode, backend: Backend) {
    let api = api(mode, backend, Auth::open()).await;
    let console = api.call("GET", "/", &[], None).await;
    assert_eq!(console.status, StatusCode::OK);
    assert!(console.content_type.starts_with("text/html"));
    assert!(console.text.contains("diptych console"));
    let document = api.call("GET", "/openapi.json", &[], None).await;
    assert_eq!(document.status, StatusCode::OK);
    assert!(document.body["openapi"].as_str().unwrap().starts_with("3."));
    let paths = document.body["paths"].as_object().unwrap();
    let commands = paths["/commands/{name}"]["post"]["description"]
        .as_str()
        .unwrap();
    for name in diptych_shop::ShopCommand::NAMES {
        assert!(commands.contains(name), "{name} missing from {commands}");
    }
    for (path, item) in paths {
        let concrete = path
            .replace("{name}", "products")
            .replace("{view}", "products")
            .replace("{key}", "mug")
            .replace("{stream}", "product-mug");
        let method = if item.get("post").is_some() {
            "POST"
        } else {
            "GET"
        };
        if concrete.ends_with("/live") {
            continue; // a feed never ends; its routing is tested with the feeds
        }
        let answer = api
            .call(method, &concrete, &[], Some("{}".to_owned()))
            .await;
        assert_ne!(
            answer.body["code"], "no_route",
            "{method} {path} is listed but not routed"
        );
    }
}

/// Polls an order's document until the saga has decided it.
async fn decided(api: &Api, order_id: &str) -> String {
    for _ in 0..3000 {
        let order = api
            .call("GET", &format!("/views/orders/{order_id}"), &[], None)
            .await;
        if let Some(status) = order.body["status"].as_str() {
            if status != "placed" {
                return status.to_owned();
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("order {order_id} was never confirmed or rejected");
}

async fn many_clients_ordering_the_last_units_over_http_never_oversell(
    mode: Mode,
    backend: Backend,
) {
    let api = Arc::new(api(mode, backend, Auth::open()).await);
    api.seed().await; // 5 mugs, 2 ordered by o1
    assert_eq!(decided(&api, "o1").await, "confirmed");
    let mut clients = Vec::new();
    for n in 0..10 {
        let api = api.clone();
        clients.push(tokio::spawn(async move {
            let body = json!({"order_id": format!("c{n}"), "customer_id": "ada", "lines": [{"product_id": "mug", "quantity": 1}]});
            (format!("c{n}"), api.command("PlaceOrder", body).await)
        }));
    }
    let mut confirmed = vec!["o1".to_owned()];
    for client in clients {
        let (order_id, answer) = client.await.unwrap();
        match answer.status {
            StatusCode::OK => {
                if decided(&api, &order_id).await == "confirmed" {
                    confirmed.push(order_id);
                }
            }
            StatusCode::UNPROCESSABLE_ENTITY => {
                assert_eq!(answer.body["code"], "insufficient_stock")
            }
            other => panic!("{order_id}: {other} {}", answer.body),
        }
    }
    confirmed.sort();
    assert!(
        confirmed.len() <= 4,
        "{} orders confirmed for 5 mugs of which o1 holds 2",
        confirmed.len()
    );
    let stock = api.call("GET", "/streams/stock-mug/state", &[], None).await;
    let mut holders: Vec<String> = stock.body["state"]["reservations"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    holders.sort();
    assert_eq!(
        holders, confirmed,
        "reservations must be exactly the confirmed orders'"
    );
}

async fn a_rename_and_an_earlier_time_over_http(mode: Mode, backend: Backend) {
    let api = api(mode, backend, Auth::open()).await;
    api.seed().await;
    assert_eq!(decided(&api, "o1").await, "confirmed");
    let renamed = api
        .command(
            "RenameProduct",
            json!({"product_id": "mug", "name": "Big mug"}),
        )
        .await;
    let token = renamed.position.unwrap();
    let history = api
        .call(
            "GET",
            &format!("/views/customer-orders?customer_id=ada&wait_for={token}"),
            &[],
            None,
        )
        .await;
    assert_eq!(
        history.body["items"][0]["document"]["lines"][0]["name"], "Big mug",
        "{}",
        history.body
    );
    let audit = api.call("GET", "/streams/order-o1", &[], None).await;
    let placed_at = audit.body["events"][0]["recorded_at"].as_i64().unwrap();
    let at = diptych::Timestamp::from_unix_micros(placed_at).to_string();
    let then = api
        .call(
            "GET",
            &format!("/streams/order-o1/state?at={at}"),
            &[],
            None,
        )
        .await;
    assert_eq!(then.body["state"]["status"], "placed", "{}", then.body);
    assert_eq!(then.body["version"], 1);
    let now = api.call("GET", "/streams/order-o1/state", &[], None).await;
    assert_eq!(now.body["state"]["status"], "confirmed");
}

/// Opens a connection and sends one HTTP/1.1 request on it.
async fn send_socket(
    addr: std::net::SocketAddr,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> tokio::io::BufReader<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or_default();
    let mut request = format!(
        "{method} {uri} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::io::BufReader::new(stream)
}

/// Reads a response's status line and headers (names lower-cased).
async fn read_head(
    reader: &mut tokio::io::BufReader<tokio::net::TcpStream>,
) -> (StatusCode, BTreeMap<String, String>) {
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status");
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_lowercase(), value.trim().to_owned());
        }
    }
    (StatusCode::from_u16(status).unwrap(), headers)
}

/// One chunk of a chunked body; `None` at its end.
async fn read_chunk(reader: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> Option<Vec<u8>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut line = String::new();
    reader.read_line(&mut line).await.ok()?;
    let size = usize::from_str_radix(line.trim(), 16).ok()?;
    if size == 0 {
        return None;
    }
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk).await.ok()?;
    chunk.truncate(size);
    Some(chunk)
}

async fn call_socket(
    addr: std::net::SocketAddr,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Answer {
    use tokio::io::AsyncReadExt;
    let mut reader = send_socket(addr, method, uri, headers, body).await;
    let (status, headers) = read_head(&mut reader).await;
    let mut bytes = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|value| value.contains("chunked"))
    {
        while let Some(chunk) = read_chunk(&mut reader).await {
            bytes.extend(chunk);
        }
    } else {
        reader.read_to_end(&mut bytes).await.unwrap();
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Answer {
        status,
        request_id: headers.get("x-request-id").cloned(),
        position: headers
            .get("x-diptych-position")
            .and_then(|value| value.parse().ok()),
        content_type: headers.get("content-type").cloned().unwrap_or_default(),
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

/// An open SSE feed, through the router or over a socket.
enum Feed {
    Body(Body),
    Socket(tokio::io::BufReader<tokio::net::TcpStream>),
}

impl Feed {
    async fn next_bytes(&mut self) -> Vec<u8> {
        match self {
            Feed::Body(body) => loop {
                let frame = body.frame().await.expect("the feed is open").unwrap();
                if let Ok(data) = frame.into_data() {
                    return data.to_vec();
                }
            },
            Feed::Socket(reader) => read_chunk(reader).await.expect("the feed is open"),
        }
    }
}

/// Every test in one module: each run in `mode` on `backend`.
macro_rules! tests_in {
    ($module:ident, $mode:ident, $backend:ident; $($test:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Mode::$mode, super::Backend::$backend).await;
                }
            )*
        }
    };
}

/// Every test, through `app(...)` and against a real socket, on each backend.
macro_rules! in_every_mode_and_backend {
    ($($test:ident),* $(,)?) => {
        tests_in!(through_app, App, Memory; $($test),*);
        tests_in!(over_a_socket, Socket, Memory; $($test),*);
        tests_in!(through_app_on_postgres, App, Postgres; $($test),*);
        tests_in!(over_a_socket_on_postgres, Socket, Postgres; $($test),*);
    };
}

in_every_mode_and_backend!(
    a_command_answers_with_its_events_and_a_consistency_token,
    bad_input_gets_a_problem_with_a_stable_code_and_the_field,
    business_rules_conflicts_and_repeats,
    views_streams_the_log_and_projections_read_back,
    tokens_and_roles_guard_every_endpoint,
    the_live_log_resumes_after_a_disconnect_without_gap_or_duplicate,
    a_documents_feed_sends_each_new_version,
    metrics_count_requests_commands_appends_and_lag,
    openapi_lists_every_command_and_only_routed_paths,
    many_clients_ordering_the_last_units_over_http_never_oversell,
    a_rename_and_an_earlier_time_over_http,
);
