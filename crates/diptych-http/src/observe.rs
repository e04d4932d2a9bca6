//! The one layer around every route: gives the request its id (see
//! [`crate::request_id`]), and counts and times its answer by method, route and
//! status in `/metrics`.
//!
//! Written as a plain tower service rather than two `from_fn` middlewares: those
//! box a copy of the route's service and a future of their own on every request,
//! which `bench http` measured as a good part of what an HTTP command costs above
//! a bare route.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method};
use axum::response::Response;
use futures_util::future::BoxFuture;
use metrics::{Counter, Histogram};
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::request_id::{RequestId, id_of};

/// Wraps each route in [`Observed`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Observe;

impl<S> Layer<S> for Observe {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed { inner }
    }
}

/// A route whose requests get an id and whose answers are counted.
#[derive(Clone, Debug)]
pub(crate) struct Observed<S> {
    inner: S,
}

impl<S> Service<Request> for Observed<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        let id = id_of(&request);
        request.extensions_mut().insert(RequestId(id));
        let method = request.method().clone();
        let route = request.extensions().get::<MatchedPath>().cloned();
        let span = tracing::info_span!(
            "request",
            request_id = %id,
            method = %method,
            path = %request.uri().path()
        );
        let answer = self.inner.call(request).instrument(span);
        Box::pin(async move {
            let Ok(mut response) = answer.await;
            let mut text = uuid::Uuid::encode_buffer();
            let text = id.hyphenated().encode_lower(&mut text);
            if let Ok(value) = HeaderValue::from_str(text) {
                response.headers_mut().insert("x-request-id", value);
            }
            let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
            record(&method, route, response.status().as_u16(), started);
            Ok(response)
        })
    }
}

/// The handles of one route's metrics, kept so that an answer costs a lookup
/// rather than building label strings and finding them in the registry.
struct RouteMetrics {
    seconds: Histogram,
    /// By status; a route answers few distinct ones.
    answers: Vec<(u16, Counter)>,
}

thread_local! {
    /// Per thread, so recording takes no lock; each thread holds the same
    /// registry's handles.
    static ROUTES: RefCell<HashMap<Method, HashMap<Box<str>, RouteMetrics>>> =
        RefCell::new(HashMap::new());
}

/// Counts one answer and records how long it took.
fn record(method: &Method, route: &str, status: u16, started: Instant) {
    let elapsed = started.elapsed().as_secs_f64();
    ROUTES.with(|routes| {
        let mut routes = routes.borrow_mut();
        let of_method = routes.entry(method.clone()).or_default();
        if !of_method.contains_key(route) {
            let seconds = metrics::histogram!(
                "diptych_http_request_seconds",
                "method" => method.to_string(),
                "route" => route.to_owned()
            );
            of_method.insert(
                route.into(),
                RouteMetrics {
                    seconds,
                    answers: Vec::new(),
                },
            );
        }
        let Some(entry) = of_method.get_mut(route) else {
            return;
        };
        entry.seconds.record(elapsed);
        let counter = match entry.answers.iter().find(|(known, _)| *known == status) {
            Some((_, counter)) => counter,
            None => {
                let counter = metrics::counter!(
                    "diptych_http_requests_total",
                    "method" => method.to_string(),
                    "route" => route.to_owned(),
                    "status" => status.to_string()
                );
                entry.answers.push((status, counter));
                &entry.answers[entry.answers.len() - 1].1
            }
        };
        counter.increment(1);
    });
}
