//! `diptych demo --split`: the shop as four processes wired through NATS.
//!
//! A rename in the catalog reaches ordering's order history, and the catalog's
//! consistency token lets a client wait for it there; the reservation saga
//! crosses ordering → inventory → ordering; with the catalog killed, ordering
//! still takes orders for known products and its order detail answers from its
//! local copy, marked stale; with the broker killed, every service still takes
//! its commands, and what they wrote flows once it is back.
//!
//! The services run on a private NATS server (/usr/sbin/nats-server) on a free
//! port, so their subjects (`diptych.catalog.…`) cannot meet another run's on
//! the shared one.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

/// Kills a whole process group when dropped, so a failing test leaves nothing
/// running (the demo's services are in its group).
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A first port with the next three free too.
fn four_free_ports() -> u16 {
    for _ in 0..100 {
        let first = 20_000 + fastrand_port();
        if (first..first + 4).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return first;
        }
    }
    panic!("no four consecutive free ports");
}

fn fastrand_port() -> u16 {
    (std::process::id() as u16 ^ (Instant::now().elapsed().subsec_nanos() as u16)) % 30_000
        + free_port() % 7
}

fn private_nats(dir: &std::path::Path, port: u16) -> (Group, String) {
    let server = Command::new("/usr/sbin/nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("/usr/sbin/nats-server starts (install the nats-server package)");
    let url = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&url).is_err() {
        assert!(Instant::now() < deadline, "the private NATS server listens");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Group(server), format!("nats://{url}"))
}

fn lines_of(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    lines
}

fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value, String) {
    let (status, head, body) = support::exchange(addr, method, path, headers, body);
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::Null),
        head.to_lowercase(),
    )
}

fn token(head: &str) -> String {
    head.lines()
        .find_map(|line| line.strip_prefix("x-diptych-position: "))
        .expect("a consistency token")
        .trim()
        .to_owned()
}

/// Polls `path` until `done` holds (the saga crosses two services).
fn poll(addr: &str, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body, _) = request(addr, "GET", path, &[], "");
        if status == 200 && done(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last answer {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_split_shop_propagates_renames_and_works_without_the_catalog_or_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let nats_port = free_port();
    let (nats, broker) = private_nats(&dir.path().join("nats"), nats_port);
    let first = four_free_ports();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_diptych"))
        .args(["demo", "--split", "--addr", &format!("127.0.0.1:{first}")])
        .arg("--data")
        .arg(dir.path().join("shop"))
        .args(["--broker", &broker])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("the split demo starts");
    let lines = lines_of(&mut demo);
    let demo = Group(demo);
    let mut said = Vec::new();
    while !said.iter().any(|line: &String| line.contains("Ctrl-C")) {
        said.push(
            lines
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("the split demo starts and seeds; it said {said:?}")),
        );
    }
    assert!(
        said.iter().any(|line| line.contains("new: seeded")),
        "{said:?}"
    );
    let pid_of = |service: &str| -> String {
        let line = said
            .iter()
            .find(|line| line.trim_start().starts_with(service))
            .unwrap_or_else(|| panic!("the demo names the {service} service: {said:?}"));
        line.split("pid ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_owned()
    };
    let addr = |offset: u16| format!("127.0.0.1:{}", first + offset);
    let (catalog, inventory, ordering) = (addr(0), addr(1), addr(3));

    // The seeded order crossed ordering -> inventory -> ordering and was confirmed.
    poll(
        &ordering,
        "/views/orders/o-1",
        "o-1 is confirmed",
        |order| order["status"] == "confirmed",
    );
    poll(
        &inventory,
        "/views/products/mug",
        "inventory reserved 2 mugs",
        |mug| mug["stock_available"] == 498,
    );

    // A command for another service says where to send it.
    let (status, problem, _) = request(
        &ordering,
        "POST",
        "/commands/RenameProduct",
        &[],
        r#"{"product_id":"mug","name":"Blue mug"}"#,
    );
    assert_eq!(status, 421, "{problem}");
    assert_eq!(problem["code"], "wrong_service");
    assert!(
        problem["detail"].as_str().unwrap().contains("catalog"),
        "{problem}"
    );

    // The rename, and its token waited on at ordering.
    let (status, body, head) = request(
        &catalog,
        "POST",
        "/commands/RenameProduct",
        &[],
        r#"{"product_id":"mug","name":"Blue mug"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let wait = format!("catalog:{}", token(&head));
    let (status, history, _) = request(
        &ordering,
        "GET",
        "/views/customer-orders?customer_id=ada",
        &[("X-Diptych-Wait-For", &wait)],
        "",
    );
    assert_eq!(status, 200, "{history}");
    let line = &history["items"][0]["document"]["lines"][0];
    assert_eq!(line["product_id"], "mug");
    assert_eq!(
        line["name"], "Blue mug",
        "the history follows the rename: {history}"
    );

    // The order detail, with the catalog up: asked of the catalog.
    let (status, detail, _) = request(&ordering, "GET", "/orders/o-1", &[], "");
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["possibly_stale"], false, "{detail}");
    assert_eq!(detail["lines"][0]["description_from"], "catalog");
    assert_eq!(detail["lines"][0]["current_name"], "Blue mug");

    // The broker killed: every service still takes its commands.
    drop(nats);
    let (status, body, head) = request(
        &catalog,
        "POST",
        "/commands/RenameProduct",
        &[],
        r#"{"product_id":"mug","name":"Blue mug, large"}"#,
    );
    assert_eq!(status, 200, "a rename without the broker: {body}");
    let renamed = format!("catalog:{}", token(&head));
    let (status, body, _) = request(
        &ordering,
        "POST",
        "/commands/PlaceOrder",
        &[],
        r#"{"order_id":"o-3","customer_id":"grace","lines":[{"product_id":"tea","quantity":1}]}"#,
    );
    assert_eq!(status, 200, "an order without the broker: {body}");
    // Back on the same port and storage: what waited in the logs flows again.
    let (nats, _) = private_nats(&dir.path().join("nats"), nats_port);
    poll(
        &ordering,
        "/views/orders/o-3",
        "o-3 confirmed after the outage",
        |order| order["status"] == "confirmed",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, history, _) = request(
            &ordering,
            "GET",
            "/views/customer-orders?customer_id=ada",
            &[("X-Diptych-Wait-For", &renamed)],
            "",
        );
        if status == 200 {
            let line = &history["items"][0]["document"]["lines"][0];
            assert_eq!(line["name"], "Blue mug, large", "{history}");
            break;
        }
        assert_eq!(
            status, 503,
            "only a wait that timed out is retried: {history}"
        );
        assert!(
            Instant::now() < deadline,
            "the rename arrived after the outage"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The catalog killed: orders for known products go on.
    let killed = Command::new("kill")
        .args(["-KILL", &pid_of("catalog")])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&catalog).is_ok() {
        assert!(Instant::now() < deadline, "the catalog stopped listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body, _) = request(
        &ordering,
        "POST",
        "/commands/PlaceOrder",
        &[],
        r#"{"order_id":"o-2","customer_id":"alan","lines":[{"product_id":"mug","quantity":1},{"product_id":"beans","quantity":3}]}"#,
    );
    assert_eq!(status, 200, "an order without the catalog: {body}");
    let order = poll(
        &ordering,
        "/views/orders/o-2",
        "o-2 is confirmed",
        |order| order["status"] == "confirmed",
    );
    assert_eq!(
        order["total_cents"],
        1299 + 3 * 1150,
        "priced from the local copy"
    );
    let (status, detail, _) = request(&ordering, "GET", "/orders/o-2", &[], "");
    assert_eq!(
        status, 200,
        "the detail never fails for the catalog: {detail}"
    );
    assert_eq!(detail["possibly_stale"], true, "{detail}");
    assert!(detail["stale_because"].as_str().is_some(), "{detail}");
    for line in detail["lines"].as_array().unwrap() {
        assert_eq!(line["description_from"], "local copy", "{detail}");
    }
    let mug = detail["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|line| line["product_id"] == "mug")
        .unwrap_or_else(|| panic!("a mug line in {detail}"));
    assert_eq!(mug["current_name"], "Blue mug, large");
    assert_eq!(mug["description"], "A blue glazed stoneware mug, 350 ml");

    // A cancellation crosses to inventory, which releases o-1's two mugs.
    let (status, body, _) = request(
        &ordering,
        "POST",
        "/commands/CancelOrder",
        &[],
        r#"{"order_id":"o-1"}"#,
    );
    assert_eq!(status, 200, "{body}");
    poll(
        &inventory,
        "/views/products/mug",
        "o-1's mugs are released",
        |mug| mug["stock_available"] == 499,
    );

    // What ordering received, in GET /projections.
    let (_, projections, _) = request(&ordering, "GET", "/projections", &[], "");
    let copies = projections
        .as_array()
        .unwrap()
        .iter()
        .find(|status| status["name"] == "copies-catalog")
        .unwrap_or_else(|| panic!("copies-catalog in {projections}"));
    assert_eq!(copies["kind"], "inbound");
    let (_, _, metrics) = support::exchange(&ordering, "GET", "/metrics", &[], "");
    for metric in [
        "diptych_inbound_received_total{projection=\"copies-catalog\"}",
        "diptych_projection_lag_events{projection=\"copies-catalog\"}",
        "diptych_relay_published_total{relay=\"relay-nats-ordering\"}",
    ] {
        assert!(metrics.contains(metric), "{metric} in {metrics}");
    }
    assert!(
        copies["received"]["received"].as_u64().unwrap() >= 6,
        "{copies}"
    );

    drop(demo);
    drop(nats);
}
