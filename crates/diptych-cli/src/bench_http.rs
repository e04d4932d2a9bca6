//! `diptych bench http`: commands, view reads and stream reads over real HTTP on
//! loopback, at increasing concurrency, next to the floor of the same commands
//! run on the in-process command path (`Shop::execute`, no HTTP) in the same run.
//!
//! Each client is one task with one keep-alive connection, sending its next
//! request when the previous answer is read. `PlaceOrder` goes through the whole
//! saga: the run ends when every order placed has been confirmed, and
//! `sagas_per_sec` counts orders confirmed over that whole time, next to
//! `placed_per_sec`, the orders placed per second while clients sent them: their
//! ratio (`saga_ratio`) falls below 1 by as much as the saga lags behind. Reads
//! run at their own client counts, by default up to 256, since a service usually
//! has many more readers than writers.
//!
//! `transport` lines measure the same clients against a bare socket server in
//! the same process that reads each request and writes a canned answer, with no
//! HTTP library and no command behind it: what loopback sockets and the load
//! generator alone cost. Where the machine's cores are the limit, a command over
//! HTTP cannot reach a larger share of the in-process floor than
//! `floor CPU / (floor CPU + transport CPU)` per request. `http-floor` lines
//! do the same against a plain axum server (the HTTP stack diptych's API runs
//! on) with one route answering that canned body: the least any command served
//! on that stack costs beyond the command itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use diptych::http::{AppState, Auth, HttpConfig, app};
use diptych::sqlite::{SqliteStore, SqliteViews};
use diptych::{CommandContext, EventStore, RunnerConfig, ViewStore, wait_for};
use diptych_shop::{Shop, ShopCommand};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::bench::percentile;

/// One result line.
#[derive(Debug, Serialize)]
pub struct HttpResult {
    /// Always `http`.
    pub bench: &'static str,
    /// `PlaceOrder`, `RenameProduct`, `view-read`, `stream-read`, `transport`
    /// or `http-floor`.
    pub operation: &'static str,
    /// Concurrent clients.
    pub clients: usize,
    /// Requests answered per second.
    pub per_sec: f64,
    /// Median latency, microseconds.
    pub p50_us: u64,
    /// 99th percentile latency, microseconds.
    pub p99_us: u64,
    /// The same commands on the in-process path (no HTTP), per second.
    pub floor_per_sec: Option<f64>,
    /// `per_sec / floor_per_sec`.
    pub ratio: Option<f64>,
    /// For `PlaceOrder`: orders confirmed by the saga per second, until the last.
    pub sagas_per_sec: Option<f64>,
    /// For `PlaceOrder`: orders placed per second (`per_sec`), for `saga_ratio`.
    pub placed_per_sec: Option<f64>,
    /// For `PlaceOrder`: `sagas_per_sec / placed_per_sec`, 1 when the saga keeps up.
    pub saga_ratio: Option<f64>,
    /// CPU time of the whole process (server, stores, projections and the
    /// bench's own clients) per request, in µs; on Linux only. On a shared
    /// machine this holds steadier than `per_sec`, which depends on the share
    /// of the cores the process gets.
    pub cpu_us_per_op: Option<f64>,
    /// The same for the floor's commands.
    pub floor_cpu_us_per_op: Option<f64>,
}

impl HttpResult {
    /// Adds the CPU time spent since `clock` started, over `requests`.
    fn with_cpu(mut self, clock: &CpuClock, requests: usize) -> Self {
        self.cpu_us_per_op = clock.per_op(requests);
        self
    }

    /// Adds the floor's CPU time spent since `clock` started, over `requests`.
    fn with_floor_cpu(mut self, clock: &CpuClock, requests: usize) -> Self {
        self.floor_cpu_us_per_op = clock.per_op(requests);
        self
    }
}

/// The CPU time this process has used since a start, all threads together.
struct CpuClock {
    started: Option<Duration>,
}

impl CpuClock {
    fn start() -> Self {
        Self {
            started: process_cpu_time(),
        }
    }

    /// Microseconds of CPU per request since the start.
    fn per_op(&self, requests: usize) -> Option<f64> {
        let spent = process_cpu_time()?.checked_sub(self.started?)?;
        (requests > 0).then(|| spent.as_secs_f64() * 1e6 / requests as f64)
    }
}

/// User and system time of every thread of this process, from `/proc/self/stat`
/// (in clock ticks of 10 ms, Linux's `USER_HZ`); `None` where there is no such
/// file.
fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces: the fields that follow start after its
    // closing parenthesis, with the state (field 3); utime and stime are fields
    // 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// A keep-alive HTTP/1.1 connection, enough for JSON requests and answers.
struct Connection {
    reader: BufReader<TcpStream>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    async fn request(&mut self, method: &str, path: &str, body: &str) -> Result<u16> {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.reader.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        self.reader.read_line(&mut line).await?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .context("an HTTP status line")?;
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line).await?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).await?;
        Ok(status)
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct HttpBench {
    /// Client counts at which the commands run.
    pub command_clients: Vec<usize>,
    /// Client counts at which the reads run.
    pub read_clients: Vec<usize>,
    /// How long each measurement runs.
    pub duration: Duration,
}

/// Runs the whole bench: clients at each concurrency, each operation for
/// `duration`; calls `report` with each line.
pub async fn run(bench: &HttpBench, mut report: impl FnMut(&HttpResult)) -> Result<()> {
    let duration = bench.duration;
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(dir.path().join("events.db"))?);
    let views: Arc<dyn ViewStore> = Arc::new(SqliteViews::open(dir.path().join("views.db"))?);
    let shop = Arc::new(Shop::new(store.clone(), views.clone()));
    let runners = shop.start(RunnerConfig::default()).await?;
    seed(&shop).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let state = AppState {
        application: shop.clone(),
        store: store.clone(),
        views: views.clone(),
        auth: Auth::open(),
        config: HttpConfig::default(),
    };
    let server = tokio::spawn(async move { axum::serve(listener, app(state)).await });
    let bare = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let transport = bare.local_addr()?;
    let bare_server = tokio::spawn(serve_canned(bare));
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let plain_http = plain.local_addr()?;
    let plain_router = axum::Router::new().route(
        "/commands/{name}",
        axum::routing::post(|_: axum::body::Bytes| async {
            ([("content-type", "application/json")], CANNED_BODY)
        }),
    );
    let plain_server = tokio::spawn(async move { axum::serve(plain, plain_router).await });
    let orders = Arc::new(AtomicU64::new(0));
    let mut counts: Vec<usize> = bench
        .command_clients
        .iter()
        .chain(&bench.read_clients)
        .copied()
        .collect();
    counts.sort_unstable();
    counts.dedup();
    for count in counts {
        if bench.read_clients.contains(&count) {
            // Reads measure reads: nothing left to project from the last run.
            settle(&store, &views).await?;
            // Reads by key, each client on its own product.
            let cpu = CpuClock::start();
            let latencies = over_http(addr, count, duration, "GET", view_path, &no_body).await?;
            let requests = latencies.len();
            report(
                &result("view-read", count, duration, latencies, None, None)
                    .with_cpu(&cpu, requests),
            );
            // A page of a product's history.
            let cpu = CpuClock::start();
            let latencies = over_http(addr, count, duration, "GET", stream_path, &no_body).await?;
            let requests = latencies.len();
            report(
                &result("stream-read", count, duration, latencies, None, None)
                    .with_cpu(&cpu, requests),
            );
        }
        if !bench.command_clients.contains(&count) {
            continue;
        }
        // The sockets and clients alone, with the body a rename sends.
        settle(&store, &views).await?;
        let cpu = CpuClock::start();
        let rename = rename_body();
        let latencies = over_http(
            transport,
            count,
            duration,
            "POST",
            |_| "/commands/RenameProduct".to_owned(),
            &rename,
        )
        .await?;
        let requests = latencies.len();
        report(
            &result("transport", count, duration, latencies, None, None).with_cpu(&cpu, requests),
        );
        let cpu = CpuClock::start();
        let latencies = over_http(
            plain_http,
            count,
            duration,
            "POST",
            |_| "/commands/RenameProduct".to_owned(),
            &rename,
        )
        .await?;
        let requests = latencies.len();
        report(
            &result("http-floor", count, duration, latencies, None, None).with_cpu(&cpu, requests),
        );
        // PlaceOrder through the saga.
        let started = Instant::now();
        let order = order_body(orders.clone());
        let latencies = over_http(
            addr,
            count,
            duration,
            "POST",
            |_| "/commands/PlaceOrder".to_owned(),
            &order,
        )
        .await?;
        let head = store.head().await?;
        wait_for(&*views, "orders", head, Duration::from_secs(600)).await?;
        settle(&store, &views).await?;
        let saga_seconds = started.elapsed().as_secs_f64();
        let floor = in_process(&shop, count, duration, "PlaceOrder", &order).await?;
        // The floor's orders go through the saga too: let it finish them, so the
        // next measurement does not start with their backlog.
        settle(&store, &views).await?;
        let placed = latencies.len() as f64;
        report(&result(
            "PlaceOrder",
            count,
            duration,
            latencies,
            Some(floor),
            Some(placed / saga_seconds),
        ));
        // A simple command.
        let rename = rename_body();
        let cpu = CpuClock::start();
        let latencies = over_http(
            addr,
            count,
            duration,
            "POST",
            |_| "/commands/RenameProduct".to_owned(),
            &rename,
        )
        .await?;
        let requests = latencies.len();
        let http_cpu = cpu.per_op(requests);
        let cpu = CpuClock::start();
        let floor = in_process(&shop, count, duration, "RenameProduct", &rename).await?;
        let floor_requests = (floor * duration.as_secs_f64()).round() as usize;
        let mut line = result(
            "RenameProduct",
            count,
            duration,
            latencies,
            Some(floor),
            None,
        )
        .with_floor_cpu(&cpu, floor_requests);
        line.cpu_us_per_op = http_cpu;
        report(&line);
    }
    server.abort();
    bare_server.abort();
    plain_server.abort();
    for runner in runners {
        runner.stop().await;
    }
    Ok(())
}

/// Products in the catalogue: clients spread over them (client `c` uses
/// `p<c % 256>`), so up to 256 clients never command the same product at once.
const PRODUCTS: u64 = 256;

/// Each client's requests carry `n = client * 1e9 + i`.
fn product_of(n: u64) -> String {
    format!("p{}", (n / 1_000_000_000) % PRODUCTS)
}

/// The events of a stream page that `stream-read` asks for: every product's
/// stream is seeded to hold at least that many, so each read costs the same
/// whatever ran before.
const STREAM_PAGE: u64 = 20;

fn view_path(client: usize) -> String {
    format!("/views/products/p{}", client as u64 % PRODUCTS)
}

fn stream_path(client: usize) -> String {
    format!(
        "/streams/product-p{}?limit={STREAM_PAGE}",
        client as u64 % PRODUCTS
    )
}

fn no_body(_: u64) -> String {
    String::new()
}

/// A customer, and the products with stock and a full page of history each
/// (renamed until their stream holds [`STREAM_PAGE`] events), each with a
/// product of its own for `RenameProduct`; products side by side, so their
/// appends share group commits.
async fn seed(shop: &Arc<Shop>) -> Result<()> {
    let execute = |shop: Arc<Shop>, name: &'static str, body: Value| async move {
        shop.execute(ShopCommand::parse(name, body)?, &CommandContext::default())
            .await
            .map_err(|error| anyhow::anyhow!("seeding: {error}"))
    };
    execute(
        shop.clone(),
        "RegisterCustomer",
        json!({"customer_id": "ada", "name": "Ada", "email": "ada@example.com", "address": "London"}),
    )
    .await?;
    let mut tasks = Vec::new();
    for product in 0..PRODUCTS {
        let shop = shop.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("p{product}");
            execute(shop.clone(), "RegisterProduct", json!({"product_id": id, "name": "Mug", "description": "Blue", "price_cents": 1299})).await?;
            execute(
                shop.clone(),
                "AddStock",
                json!({"product_id": id, "quantity": 1_000_000_000u64}),
            )
            .await?;
            execute(
                shop.clone(),
                "RegisterProduct",
                json!({"product_id": renamed_product(&id), "name": "Mug", "description": "Blue", "price_cents": 1299}),
            )
            .await?;
            for rename in 1..STREAM_PAGE {
                execute(
                    shop.clone(),
                    "RenameProduct",
                    json!({"product_id": id, "name": format!("Mug {rename}")}),
                )
                .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

fn order_body(orders: Arc<AtomicU64>) -> impl Fn(u64) -> String + Send + Sync + Clone + 'static {
    move |n| {
        let order = orders.fetch_add(1, Ordering::Relaxed);
        json!({"order_id": format!("bench-{order}"), "customer_id": "ada", "lines": [{"product_id": product_of(n), "quantity": 1}]}).to_string()
    }
}

/// Renames go to products of their own (`r` and the product's id), which no
/// order holds: renaming a product rewrites every order document that lists
/// it, so on the ordered products the measure was of that fan-out in the
/// orders view (about 100 s of projection work after 3 s of renames at 64
/// clients), not of the commands.
fn rename_body() -> impl Fn(u64) -> String + Send + Sync + Clone + 'static {
    |n| {
        json!({"product_id": renamed_product(&product_of(n)), "name": format!("Mug {n}")})
            .to_string()
    }
}

/// The product that `RenameProduct` commands in place of `product`.
fn renamed_product(product: &str) -> String {
    format!("r{product}")
}

/// Waits until the saga and every view have applied everything, including what
/// the saga's own commands appended.
async fn settle(store: &Arc<dyn EventStore>, views: &Arc<dyn ViewStore>) -> Result<()> {
    loop {
        let head = store.head().await?;
        for view in diptych_shop::VIEWS.iter().chain(["order-placement"].iter()) {
            wait_for(&**views, view, head, Duration::from_secs(600)).await?;
        }
        if store.head().await? == head {
            return Ok(());
        }
    }
}

/// `clients` connections sending requests for `duration`, client `c` to
/// `path(c)`; each latency in µs.
async fn over_http(
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    method: &'static str,
    path: impl Fn(usize) -> String,
    body: &(impl Fn(u64) -> String + Send + Sync + Clone + 'static),
) -> Result<Vec<u64>> {
    let mut tasks = Vec::new();
    for client in 0..clients {
        let body = body.clone();
        let path = path(client);
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(addr).await?;
            let mut latencies = Vec::new();
            let started = Instant::now();
            let mut n = client as u64 * 1_000_000_000;
            while started.elapsed() < duration {
                let text = body(n);
                n += 1;
                let sent = Instant::now();
                let status = connection.request(method, &path, &text).await?;
                if status != 200 {
                    bail!("{method} {path} answered {status}");
                }
                latencies.push(sent.elapsed().as_micros() as u64);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

/// The body of the floors' answers, the size of a command's answer.
const CANNED_BODY: &str = r#"{"stream_id":"product-rp1","version":42,"position":123456}"#;

/// The bare socket server's whole answer, with [`CANNED_BODY`].
const CANNED: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 58\r\n\r\n{\"stream_id\":\"product-rp1\",\"version\":42,\"position\":123456}";

/// Answers every request on every connection with [`CANNED`], reading just
/// enough of it (the head and its `Content-Length` body) to stay in step.
async fn serve_canned(listener: tokio::net::TcpListener) -> Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            let mut body = Vec::new();
            loop {
                let mut length = 0usize;
                loop {
                    line.clear();
                    if reader.read_line(&mut line).await? == 0 {
                        return anyhow::Ok(());
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse()?;
                        }
                    }
                }
                body.resize(length, 0);
                reader.read_exact(&mut body).await?;
                reader.get_mut().write_all(CANNED.as_bytes()).await?;
            }
        });
    }
}

/// The same commands on the in-process path, per second.
async fn in_process(
    shop: &Arc<Shop>,
    clients: usize,
    duration: Duration,
    name: &'static str,
    body: &(impl Fn(u64) -> String + Send + Sync + Clone + 'static),
) -> Result<f64> {
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (shop, body) = (shop.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut done = 0u64;
            // The same products as the clients over HTTP, other names and ids.
            let mut n = client as u64 * 1_000_000_000 + 500_000_000;
            while started.elapsed() < duration {
                let value: Value = serde_json::from_str(&body(n))?;
                n += 1;
                shop.execute(ShopCommand::parse(name, value)?, &CommandContext::default())
                    .await
                    .map_err(|error| anyhow::anyhow!("{name}: {error}"))?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut done = 0;
    for task in tasks {
        done += task.await??;
    }
    Ok(done as f64 / duration.as_secs_f64())
}

fn result(
    operation: &'static str,
    clients: usize,
    duration: Duration,
    mut latencies: Vec<u64>,
    floor_per_sec: Option<f64>,
    sagas_per_sec: Option<f64>,
) -> HttpResult {
    latencies.sort_unstable();
    let per_sec = latencies.len() as f64 / duration.as_secs_f64();
    let placed_per_sec = sagas_per_sec.map(|_| per_sec);
    HttpResult {
        bench: "http",
        operation,
        clients,
        per_sec,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        floor_per_sec,
        ratio: floor_per_sec.map(|floor| per_sec / floor),
        sagas_per_sec,
        placed_per_sec,
        saga_ratio: sagas_per_sec.map(|sagas| sagas / per_sec),
        cpu_us_per_op: None,
        floor_cpu_us_per_op: None,
    }
}
