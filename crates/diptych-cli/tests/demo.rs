//! `diptych demo` against a real socket: served, used, stopped with SIGINT,
//! restarted on the same data.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

mod support;

struct Demo {
    child: Child,
    addr: String,
    lines: std::sync::mpsc::Receiver<String>,
}

fn start(data: &str) -> Demo {
    start_with(&["demo", "--addr", "127.0.0.1:0", "--data", data], &[])
}

fn start_with(args: &[&str], env: &[(&str, &str)]) -> Demo {
    let mut child = Command::new(env!("CARGO_BIN_EXE_diptych"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the demo starts");
    let stdout = child.stdout.take().expect("stdout");
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    let first = lines
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the demo says where it listens");
    let addr = first
        .rsplit("http://")
        .next()
        .expect("an address")
        .trim()
        .replace("0.0.0.0", "127.0.0.1");
    Demo { child, addr, lines }
}

impl Demo {
    /// One HTTP/1.1 request on its own connection: the status and the JSON body.
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, Value, String) {
        let (status, head, body) = self.exchange(method, path, headers, body);
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::Null),
            head.to_lowercase(),
        )
    }

    /// One HTTP/1.1 request on its own connection: the status, head and body.
    fn exchange(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String, String) {
        support::exchange(&self.addr, method, path, headers, body)
    }

    /// SIGINT, as Ctrl-C sends; the demo must exit cleanly and say so.
    fn interrupt(mut self) -> Vec<String> {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let exit = self.child.wait().expect("the demo exits");
        assert!(exit.success(), "the demo exited with {exit}");
        // The reader thread ends at the end of the output, closing the channel.
        let mut said = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(std::time::Duration::from_secs(30)) {
            said.push(line);
        }
        said
    }
}

impl Drop for Demo {
    /// A failing test must not leave its server running (it would hold the
    /// test's output open).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `path` on `node` until `done` holds for the body (at most 60 s).
fn poll(node: &Demo, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..600 {
        let (status, body, _) = node.request("GET", path, &[], "");
        if status == 200 && done(&body) {
            return body;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{what} did not happen within 60 s");
}

#[test]
fn a_write_node_two_query_nodes_and_two_projectors_share_one_postgresql() {
    let config = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(diptych::postgres::testing::fresh_config());
    let node = |roles: &str| {
        start_with(
            &[
                "demo",
                "--addr",
                "127.0.0.1:0",
                "--store",
                &config.url,
                "--schema",
                &config.schema,
                "--role",
                roles,
                "--partitions",
                "4",
            ],
            &[],
        )
    };
    // The write node seeds the catalogue before it says where it listens.
    let writer = node("command");
    let projectors = [node("projector"), node("projector")];
    let readers = [node("query"), node("query")];

    // The two projectors share the work: `orders` ends up split between them
    // (before any command, so no read waits on a partition being handed over).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let leases = runtime
        .block_on(diptych::postgres::PgLeases::connect(&config))
        .expect("the leases table");
    let mut shared = false;
    for _ in 0..600 {
        let holders = runtime.block_on(leases.holders("orders")).expect("leases");
        let distinct: std::collections::BTreeSet<&String> = holders.values().collect();
        if holders.len() == 4 && distinct.len() == 2 {
            shared = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        shared,
        "the partitions of `orders` were not split between the projectors"
    );

    for n in 0..8 {
        let order = format!(
            r#"{{"order_id":"o-{n}","customer_id":"ada","lines":[{{"product_id":"tea","quantity":1}}]}}"#
        );
        let (status, placed, _) = writer.request("POST", "/commands/PlaceOrder", &[], &order);
        assert_eq!(status, 200, "{placed}");
        let position = placed["position"].as_u64().unwrap().to_string();
        // Either query node reads its own write once the projectors have it.
        let reader = &readers[n % 2];
        let (status, read, _) = reader.request(
            "GET",
            &format!("/views/orders/o-{n}"),
            &[("X-Diptych-Wait-For", &position)],
            "",
        );
        assert_eq!(status, 200, "{read}");
        assert_eq!(read["total_cents"], 850);
    }
    // The saga, run by one of the projectors, confirms every order.
    for n in 0..8 {
        poll(
            &readers[0],
            &format!("/views/orders/o-{n}"),
            "confirmation",
            |order| order["status"] == "confirmed",
        );
    }
    // The four partitions of `orders` are split between the two projectors:
    // each has applied the whole log.
    let status = poll(&readers[1], "/projections", "the partitions", |status| {
        let names: Vec<&str> = status
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["name"].as_str())
            .collect();
        (0..4).all(|k| names.contains(&format!("orders.{k}of4").as_str()))
    });
    assert!(
        !status
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "orders"),
        "partitioned, `orders` runs only as its partitions: {status}"
    );

    // Each node refuses what its roles do not serve, and says where to go.
    let (status, problem, _) = readers[0].request("POST", "/commands/PlaceOrder", &[], "{}");
    assert_eq!(
        (status, problem["code"].as_str()),
        (421, Some("not_a_command_node"))
    );
    let (status, problem, _) = writer.request("GET", "/views/orders/o-1", &[], "");
    assert_eq!(
        (status, problem["code"].as_str()),
        (421, Some("not_a_query_node"))
    );
    drop(projectors);
}

#[test]
fn the_demo_serves_the_shop_stops_cleanly_and_continues_on_restart() {
    let data = tempfile::tempdir().unwrap();
    let data = data.path().to_str().unwrap().to_owned();
    let demo = start(&data);
    let (status, ready, _) = demo.request("GET", "/health/ready", &[], "");
    assert_eq!(status, 200, "{ready}");
    let order =
        r#"{"order_id":"o-1","customer_id":"ada","lines":[{"product_id":"mug","quantity":2}]}"#;
    let (status, placed, head) = demo.request("POST", "/commands/PlaceOrder", &[], order);
    assert_eq!(status, 200, "{placed}");
    let position = placed["position"].as_u64().unwrap().to_string();
    assert!(
        head.contains(&format!("x-diptych-position: {position}")),
        "{head}"
    );
    let (status, read, _) = demo.request(
        "GET",
        "/views/orders/o-1",
        &[("X-Diptych-Wait-For", &position)],
        "",
    );
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["total_cents"], 2 * 1299);
    let (status, problem, head) = demo.request("POST", "/commands/PlaceOrder", &[], "{oops");
    assert_eq!(status, 400);
    assert!(head.contains("application/problem+json"), "{head}");
    assert_eq!(problem["code"], "malformed_json");
    let said = demo.interrupt();
    assert!(
        said.iter().any(|line| line.contains("stopped cleanly")),
        "{said:?}"
    );

    // Restarted on the same data: nothing seeded again, the order still there.
    let demo = start(&data);
    let (status, read, _) = demo.request("GET", "/views/orders/o-1", &[], "");
    assert_eq!(status, 200, "{read}");
    let (_, audit, _) = demo.request("GET", "/streams/product-mug", &[], "");
    assert_eq!(
        audit["events"].as_array().unwrap().len(),
        1,
        "the catalogue was not seeded twice"
    );
    let said = demo.interrupt();
    assert!(
        said.iter().any(|line| line.contains("continuing")),
        "{said:?}"
    );
}

fn settings(dir: &std::path::Path, addr: &str, tokens: &str) -> String {
    let path = dir.join("serve.toml");
    let data = dir.join("data");
    std::fs::write(
        &path,
        format!("addr = \"{addr}\"\ndata = \"{}\"\n{tokens}", data.display()),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn serve_refuses_to_run_open_on_a_public_address_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let config = settings(dir.path(), "0.0.0.0:0", "");
    let refused = Command::new(env!("CARGO_BIN_EXE_diptych"))
        .args(["serve", "--config", &config])
        .env_remove("DIPTYCH_TOKENS")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("refusing to serve without authentication"),
        "{said}"
    );
    assert!(said.contains("--insecure"), "{said}");
    let open = start_with(&["serve", "--config", &config, "--insecure"], &[]);
    let (status, _, _) = open.request("GET", "/events", &[], "");
    assert_eq!(status, 200);
    open.interrupt();
}

#[test]
fn serve_takes_tokens_from_its_file_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = settings(
        dir.path(),
        "0.0.0.0:0",
        "[tokens]\nfile-reader = \"reader\"\n",
    );
    let served = start_with(
        &["serve", "--config", &config],
        &[("DIPTYCH_TOKENS", "env-writer=writer")],
    );
    let (status, problem, _) = served.request("GET", "/events", &[], "");
    assert_eq!(
        (status, problem["code"].as_str()),
        (401, Some("missing_token"))
    );
    let (status, _, _) = served.request(
        "GET",
        "/events",
        &[("Authorization", "Bearer file-reader")],
        "",
    );
    assert_eq!(status, 200);
    let customer = r#"{"customer_id":"c","name":"C","email":"c@example.com","address":""}"#;
    let (status, problem, _) = served.request(
        "POST",
        "/commands/RegisterCustomer",
        &[("Authorization", "Bearer file-reader")],
        customer,
    );
    assert_eq!(
        (status, problem["code"].as_str()),
        (403, Some("insufficient_role"))
    );
    let (status, _, _) = served.request(
        "POST",
        "/commands/RegisterCustomer",
        &[("Authorization", "Bearer env-writer")],
        customer,
    );
    assert_eq!(status, 200);
    served.interrupt();
}

#[test]
fn a_settings_file_with_a_mistake_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = settings(dir.path(), "127.0.0.1:0", "[tokens]\nsomeone = \"owner\"\n");
    let refused = Command::new(env!("CARGO_BIN_EXE_diptych"))
        .args(["serve", "--config", &config])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("`owner` is not a role"), "{said}");
    let missing = Command::new(env!("CARGO_BIN_EXE_diptych"))
        .args(["serve", "--config", "/nonexistent/serve.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("reading the settings file"));
}

/// Runs `diptych` with `args`, expecting it to refuse; returns what it said.
fn refused(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_diptych"))
        .args(args)
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn roles_and_storage_mistakes_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("addr = \"127.0.0.1:0\"\n{body}")).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let data = format!("data = \"{}\"\n", dir.path().join("data").display());
    let pg = "store = \"postgres://postgres@127.0.0.1:5432/test\"\n";

    let said = refused(&[
        "serve",
        "--config",
        &write("unknown.toml", &format!("{pg}roles = [\"reader\"]\n")),
    ]);
    assert!(said.contains("unknown role `reader`"), "{said}");
    let said = refused(&[
        "serve",
        "--config",
        &write("empty.toml", &format!("{pg}roles = []\n")),
    ]);
    assert!(said.contains("give at least one role"), "{said}");
    let said = refused(&[
        "serve",
        "--config",
        &write("both.toml", &format!("{pg}{data}")),
    ]);
    assert!(said.contains("both `store` and `data`"), "{said}");
    let said = refused(&["serve", "--config", &write("neither.toml", "")]);
    assert!(said.contains("names no storage"), "{said}");
    let said = refused(&[
        "serve",
        "--config",
        &write("sqlite-roles.toml", &format!("{data}roles = [\"query\"]\n")),
    ]);
    assert!(
        said.contains("on SQLite one node does everything"),
        "{said}"
    );
    let said = refused(&[
        "serve",
        "--config",
        &write("sqlite-partitions.toml", &format!("{data}partitions = 4\n")),
    ]);
    assert!(said.contains("apply to a PostgreSQL store"), "{said}");
    let said = refused(&["demo", "--role", "query"]);
    assert!(said.contains("--store"), "{said}");
    let said = refused(&[
        "demo",
        "--store",
        "postgres://postgres@127.0.0.1:5432/test",
        "--schema",
        "Not-Valid",
    ]);
    assert!(said.contains("is not a valid schema name"), "{said}");
}

#[test]
fn split_service_mistakes_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let said = refused(&["demo", "--data", data, "--service", "catalog"]);
    assert!(said.contains("through a broker: pass --broker"), "{said}");
    let said = refused(&[
        "demo",
        "--data",
        data,
        "--service",
        "inventory",
        "--broker",
        "nats://127.0.0.1:4222",
        "--catalog",
        "http://127.0.0.1:8080",
    ]);
    assert!(
        said.contains("only the ordering service calls the catalog"),
        "{said}"
    );
    let said = refused(&["demo", "--split", "--addr", "127.0.0.1:0", "--data", data]);
    assert!(said.contains("name a port"), "{said}");
    let said = refused(&[
        "demo",
        "--split",
        "--store",
        "postgres://postgres@127.0.0.1/test",
    ]);
    assert!(said.contains("cannot be used with"), "{said}");
}

#[test]
fn the_relay_role_publishes_the_log_to_nats_and_reports_its_lag() {
    let data = tempfile::tempdir().unwrap();
    let nats = std::env::var("DIPTYCH_TEST_NATS").expect("DIPTYCH_TEST_NATS names a NATS server");
    let service = format!("demo{}", std::process::id());
    let demo = start_with(
        &[
            "demo",
            "--addr",
            "127.0.0.1:0",
            "--data",
            data.path().to_str().unwrap(),
            "--broker",
            &nats,
            "--service",
            &service,
        ],
        &[],
    );
    let relay = format!("relay-nats-{service}");
    // The relay's checkpoint moves only once NATS has acknowledged what it
    // published: at the head, every seeded event is in JetStream.
    let status = poll(&demo, "/projections", "the relay catching up", |status| {
        status.as_array().into_iter().flatten().any(|p| {
            p["name"] == relay.as_str() && p["position"] == p["head"] && p["lag_events"] == 0
        })
    });
    let head = status[0]["head"].as_u64().unwrap();
    assert!(head > 0, "the demo seeded events: {status}");
    let (_, _, metrics) = demo.exchange("GET", "/metrics", &[], "");
    let published = format!("diptych_relay_published_total{{relay=\"{relay}\"}} {head}");
    assert!(metrics.contains(&published), "{published} in {metrics}");
    drop(demo);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(diptych::nats::delete_stream(&nats, &service))
        .expect("the test's stream is deleted");
}

#[test]
fn two_relay_nodes_on_postgresql_publish_one_at_a_time_and_take_over() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = runtime.block_on(diptych::postgres::testing::fresh_config());
    let nats = std::env::var("DIPTYCH_TEST_NATS").expect("DIPTYCH_TEST_NATS names a NATS server");
    let service = format!("pgrelay{}", std::process::id());
    let node = |roles: &str| {
        start_with(
            &[
                "demo",
                "--addr",
                "127.0.0.1:0",
                "--store",
                &config.url,
                "--schema",
                &config.schema,
                "--role",
                roles,
                "--broker",
                &nats,
                "--service",
                &service,
            ],
            &[],
        )
    };
    let writer = node("command");
    let mut relays = vec![node("relay"), node("relay")];
    let relay = format!("relay-nats-{service}");
    let leases = runtime
        .block_on(diptych::postgres::PgLeases::connect(&config))
        .expect("the leases table");
    let caught_up = |node: &Demo, what: &str| {
        poll(node, "/projections", what, |status| {
            status.as_array().into_iter().flatten().any(|p| {
                p["name"] == relay.as_str() && p["lag_events"] == 0 && p["head"].as_u64() > Some(0)
            })
        })
    };
    caught_up(&relays[0], "the relay publishing the seeded log");

    // One node holds the relay's lease; the other waits.
    let holders = runtime.block_on(leases.holders(&relay)).expect("leases");
    assert_eq!(holders.len(), 1, "one relay at a time: {holders:?}");
    let holder = holders.values().next().unwrap().clone();
    let holding = relays
        .iter()
        .position(|node| holder.starts_with(&format!("pid-{}-", node.child.id())))
        .unwrap_or_else(|| panic!("the holder {holder} is one of the relay nodes"));

    // The holder dies; orders keep coming; the other node takes over.
    drop(relays.remove(holding));
    for n in 0..3 {
        let order = format!(
            r#"{{"order_id":"r-{n}","customer_id":"ada","lines":[{{"product_id":"tea","quantity":1}}]}}"#
        );
        let (status, placed, _) = writer.request("POST", "/commands/PlaceOrder", &[], &order);
        assert_eq!(status, 200, "{placed}");
    }
    let survivor = &relays[0];
    let mut taken_over = false;
    for _ in 0..300 {
        let holders = runtime.block_on(leases.holders(&relay)).expect("leases");
        if holders.len() == 1
            && holders
                .values()
                .all(|h| h.starts_with(&format!("pid-{}-", survivor.child.id())))
        {
            taken_over = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(taken_over, "the surviving node took the relay's lease");
    caught_up(survivor, "the survivor publishing the rest");
    drop(relays);
    drop(writer);
    runtime
        .block_on(diptych::nats::delete_stream(&nats, &service))
        .expect("the test's stream is deleted");
}

#[test]
fn the_social_demo_serves_feeds_read_your_writes_and_stops_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let data = data.path().to_str().unwrap().to_owned();
    let demo = start_with(
        &[
            "demo",
            "--app",
            "social",
            "--addr",
            "127.0.0.1:0",
            "--data",
            &data,
        ],
        &[],
    );
    let post = r#"{"post_id":"p-1","author_id":"ada","text":"Hello from the test"}"#;
    let (status, written, _) = demo.request("POST", "/commands/CreatePost", &[], post);
    assert_eq!(status, 200, "{written}");
    let position = written["position"].as_u64().unwrap().to_string();
    let (status, feed, _) = demo.request(
        "GET",
        "/views/feeds?user_id=bob&order=-created_at_us&limit=10",
        &[("X-Diptych-Wait-For", &position)],
        "",
    );
    assert_eq!(status, 200, "{feed}");
    assert_eq!(
        feed["items"][0]["document"]["post_id"], "p-1",
        "bob follows the seeded ada: {feed}"
    );
    let (status, profile, _) = demo.request("GET", "/views/profiles/ada", &[], "");
    assert_eq!(status, 200, "{profile}");
    assert_eq!(profile["handle"], "ada");
    let taken = r#"{"user_id":"eve","handle":"ADA","display_name":"Eve","bio":""}"#;
    let (status, problem, _) = demo.request("POST", "/commands/RegisterUser", &[], taken);
    assert_eq!(
        (status, &problem["code"]),
        (422, &Value::from("handle_taken"))
    );
    let said = demo.interrupt();
    assert!(
        said.iter().any(|line| line.contains("stopped cleanly")),
        "{said:?}"
    );
}
