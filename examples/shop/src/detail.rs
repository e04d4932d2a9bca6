//! The order detail: a hybrid read, local copy plus a live call.
//!
//! `GET /orders/{order_id}` answers with the order from the local `orders`
//! view and, for each line, the product's current description. In the split
//! shop that description is fetched from the catalog service's view API with a
//! short timeout; when the catalog is slow or down, the answer comes from
//! ordering's own copy of the catalog's streams and says so
//! (`"possibly_stale": true`). The request never fails because another service
//! is down. In one process the catalog is local and never stale.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use diptych::ViewStore;
use diptych::http::{Auth, Problem, Role};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::Shop;
use crate::views::OrderDocument;

/// The catalog service's view API, asked with a short timeout.
#[derive(Clone, Debug)]
pub struct CatalogClient {
    base: String,
    timeout: Duration,
    token: Option<String>,
    http: reqwest::Client,
}

/// What the catalog says of a product (a `products` document).
#[derive(Clone, Debug, Deserialize)]
struct CatalogProduct {
    name: String,
    description: String,
}

impl CatalogClient {
    /// The catalog service at `base` (`http://127.0.0.1:8081`), given `timeout`
    /// per request before the local copy is used instead.
    pub fn new(base: impl Into<String>, timeout: Duration) -> Self {
        Self {
            base: base.into().trim_end_matches('/').to_owned(),
            timeout,
            token: None,
            http: reqwest::Client::new(),
        }
    }

    /// Sends this bearer token (a `reader`'s) to a catalog that wants one.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Every product asked at once, all within the one timeout: a slow
    /// catalog costs a detail at most that long, whatever its lines. (An
    /// order's lines name each product once.)
    async fn products(&self, ids: &[&str]) -> Vec<Result<CatalogProduct, String>> {
        let asked = futures_util::future::join_all(ids.iter().map(|id| self.product(id)));
        match tokio::time::timeout(self.timeout, asked).await {
            Ok(answers) => answers,
            Err(_) => {
                let late = format!("the catalog did not answer within {:?}", self.timeout);
                ids.iter().map(|_| Err(late.clone())).collect()
            }
        }
    }

    async fn product(&self, product_id: &str) -> Result<CatalogProduct, String> {
        let url = format!("{}/views/products/{product_id}", self.base);
        let mut request = self.http.get(&url).timeout(self.timeout);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|error| {
            if error.is_timeout() {
                format!("the catalog did not answer within {:?}", self.timeout)
            } else {
                format!("the catalog is unreachable: {error}")
            }
        })?;
        if !response.status().is_success() {
            return Err(format!("the catalog answered {}", response.status()));
        }
        response
            .json()
            .await
            .map_err(|error| format!("the catalog's answer is unreadable: {error}"))
    }
}

/// One line of the detail: the order's line with the product as it is now.
#[derive(Clone, Debug, Serialize)]
struct LineDetail {
    #[serde(flatten)]
    line: Value,
    /// The product's name now (the line keeps the one it was ordered under).
    current_name: String,
    /// The product's description now.
    description: String,
    /// `catalog` (asked just now) or `local copy`.
    description_from: &'static str,
}

/// The order detail routes, for the ordering service (or the whole shop).
pub fn routes(shop: Arc<Shop>, auth: Auth, catalog: Option<CatalogClient>) -> axum::Router {
    axum::Router::new()
        .route("/orders/{order_id}", get(order_detail))
        .with_state(Arc::new(Detail {
            shop,
            auth,
            catalog,
        }))
}

struct Detail {
    shop: Arc<Shop>,
    auth: Auth,
    catalog: Option<CatalogClient>,
}

async fn order_detail(
    State(detail): State<Arc<Detail>>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    detail.auth.require(&headers, Role::Reader)?;
    let views: &Arc<dyn ViewStore> = detail.shop.views();
    let document = views
        .get("orders", &order_id)
        .await
        .map_err(|error| Problem::internal(&error))?
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "order_not_found",
                format!("no order `{order_id}` (a new order appears once the `orders` view has it; wait for its token on /views/orders/{order_id})"),
            )
        })?;
    let order: OrderDocument =
        serde_json::from_value(document.clone()).map_err(|error| Problem::internal(&error))?;
    let ids: Vec<&str> = order
        .lines
        .iter()
        .map(|line| line.product_id.as_str())
        .collect();
    // Each line on its own: one product the catalog cannot give is taken
    // from the copy, the others still from the catalog.
    let mut unavailable = None;
    let live: Vec<Option<CatalogProduct>> = match &detail.catalog {
        Some(catalog) => catalog
            .products(&ids)
            .await
            .into_iter()
            .map(|answer| {
                answer
                    .map_err(|reason| unavailable.get_or_insert(reason).clone())
                    .ok()
            })
            .collect(),
        None => vec![None; ids.len()],
    };
    let mut lines = Vec::with_capacity(order.lines.len());
    let raw_lines = document["lines"].as_array().into_iter().flatten();
    for ((line, raw), live) in order.lines.iter().zip(raw_lines).zip(live) {
        let (product, from) = match live {
            Some(product) => (product, "catalog"),
            None => {
                let copy = detail
                    .shop
                    .products
                    .load(&line.product_id)
                    .await
                    .map_err(|error| Problem::internal(&error))?
                    .state;
                let product = CatalogProduct {
                    name: copy.name,
                    description: copy.description,
                };
                (product, "local copy")
            }
        };
        lines.push(LineDetail {
            line: raw.clone(),
            current_name: product.name,
            description: product.description,
            description_from: from,
        });
    }
    let mut answer = document;
    answer["lines"] = serde_json::to_value(lines).map_err(|error| Problem::internal(&error))?;
    // Only a split shop's copy can lag behind the catalog.
    let stale = detail.shop.split_service().is_some() && answer_used_copy(&answer);
    answer["possibly_stale"] = json!(stale);
    if let Some(reason) = unavailable.filter(|_| stale) {
        answer["stale_because"] = json!(reason);
    }
    Ok(Json(answer))
}

fn answer_used_copy(answer: &Value) -> bool {
    answer["lines"].as_array().is_some_and(|lines| {
        lines
            .iter()
            .any(|line| line["description_from"] == "local copy")
    })
}
