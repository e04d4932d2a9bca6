//! `diptych demo --split`: the shop as four services, each its own process
//! (this binary, `demo --service NAME`) with its own data directory and port,
//! wired through NATS. This process starts them, seeds them over HTTP the way
//! a client would (waiting at each service for the others' tokens), and stops
//! them on Ctrl-C. A service also stops when this process dies, however it
//! dies: it watches its standard input, which this process holds open.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use diptych_shop::services::Service;
use serde_json::{Value, json};

use crate::serve::{CATALOGUE, CUSTOMERS};

/// The environment variable that makes a service stop when its standard input
/// closes (its parent is gone).
pub const STOP_WITH_PARENT: &str = "DIPTYCH_STOP_WITH_PARENT";

pub struct SplitConfig {
    /// The first service's address; the others take the next ports.
    pub addr: SocketAddr,
    /// Each service's data directory is a directory of this one.
    pub data: PathBuf,
    pub broker: String,
    pub insecure: bool,
}

struct Running {
    service: Service,
    url: String,
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Already stopped cleanly, or stopped now.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub async fn run(config: SplitConfig) -> Result<()> {
    anyhow::ensure!(
        config.addr.port() != 0,
        "--split gives the services consecutive ports from --addr's: name a port, such as \
         --addr 127.0.0.1:8080"
    );
    // Fresh data means a fresh start: the broker must not hold events of an
    // earlier run, which the new stores' copies would take for their own.
    if !config.data.exists() {
        for service in Service::ALL {
            diptych::nats::clear_stream(&config.broker, service.name())
                .await
                .with_context(|| {
                    format!(
                        "clearing the {service} service's stream at {}",
                        config.broker
                    )
                })?;
        }
    }
    let mut running = Vec::new();
    let catalog_url = format!("http://{}", with_port(config.addr, 0));
    for (n, service) in Service::ALL.into_iter().enumerate() {
        let addr = with_port(config.addr, n as u16);
        let data = config.data.join(service.name());
        let mut arguments = vec![
            "demo".to_owned(),
            "--service".to_owned(),
            service.name().to_owned(),
            "--addr".to_owned(),
            addr.to_string(),
            "--data".to_owned(),
            data.display().to_string(),
            "--broker".to_owned(),
            config.broker.clone(),
        ];
        if service == Service::Ordering {
            arguments.extend(["--catalog".to_owned(), catalog_url.clone()]);
        }
        if config.insecure {
            arguments.push("--insecure".to_owned());
        }
        let mut child = Command::new(std::env::current_exe()?)
            .args(&arguments)
            .env(STOP_WITH_PARENT, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {service} service"))?;
        let url = listening_url(&mut child)
            .await
            .with_context(|| format!("the {service} service did not start"))?;
        running.push(Running {
            service,
            url,
            child,
        });
    }
    let client = reqwest::Client::new();
    let url = |service: Service| {
        running
            .iter()
            .find(|running| running.service == service)
            .map(|running| running.url.clone())
            .unwrap_or_default()
    };
    let seeded = seed(&client, &url).await.context("seeding the services")?;
    print_welcome(&config, &running, seeded);
    // A service that stops leaves the others running, as separate services
    // would: ordering still takes orders while the catalog is down.
    let shutdown = crate::serve::shutdown_signal();
    tokio::pin!(shutdown);
    let mut reported = Vec::new();
    while reported.len() < running.len() {
        tokio::select! {
            _ = &mut shutdown => break,
            (service, status) = next_exit(&mut running, &reported) => {
                println!("the {service} service stopped ({status}); the others go on");
                reported.push(service);
            }
        }
    }
    for service in &mut running {
        if matches!(service.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &service.child.id().to_string()])
                .status();
        }
    }
    for service in &mut running {
        let _ = tokio::task::block_in_place(|| service.child.wait());
    }
    println!("stopped cleanly; run the same command to continue where it stopped");
    Ok(())
}

fn with_port(addr: SocketAddr, offset: u16) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port() + offset)
}

/// Reads the service's first line (`… listening on http://…`), then drains the
/// rest of its output so it never blocks on a full pipe.
async fn listening_url(child: &mut Child) -> Result<String> {
    let stdout = child.stdout.take().context("the service's output")?;
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
        let first = lines.next();
        let _ = sender.send(first);
        for _ in lines {}
    });
    let first = tokio::time::timeout(Duration::from_secs(60), receiver)
        .await
        .context("it said nothing for 60 s")?
        .ok()
        .flatten()
        .context("it exited before listening")?;
    let url = first
        .rsplit_once("http://")
        .map(|(_, addr)| format!("http://{}", addr.trim()))
        .with_context(|| format!("it said `{first}` instead of where it listens"))?;
    Ok(url)
}

/// Waits until a service not yet `reported` exits: which, and how.
async fn next_exit(running: &mut [Running], reported: &[Service]) -> (Service, String) {
    loop {
        for service in running.iter_mut() {
            if reported.contains(&service.service) {
                continue;
            }
            match service.child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => return (service.service, status.to_string()),
                Err(error) => return (service.service, error.to_string()),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sends a command; the consistency token of its answer.
async fn command(client: &reqwest::Client, base: &str, name: &str, body: Value) -> Result<String> {
    let response = client
        .post(format!("{base}/commands/{name}"))
        .json(&body)
        .send()
        .await
        .with_context(|| format!("sending {name} to {base}"))?;
    let status = response.status();
    let token = response
        .headers()
        .get("x-diptych-position")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "{name} at {base} answered {status}: {text}"
    );
    token.with_context(|| format!("{name} at {base} answered without a consistency token"))
}

/// Reads `path` at `base` once it reflects `token` (retrying while the wait
/// times out: the other service's events may still be on their way).
async fn read_after(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    token: &str,
) -> Result<Value> {
    for _ in 0..12 {
        let response = client
            .get(format!("{base}{path}"))
            .header("x-diptych-wait-for", token)
            .send()
            .await
            .with_context(|| format!("reading {path} at {base}"))?;
        if response.status().as_u16() == 503 {
            continue;
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(
            status.is_success(),
            "{path} at {base} answered {status}: {body}"
        );
        return Ok(body);
    }
    anyhow::bail!("{path} at {base} did not reach {token} within a minute")
}

/// Seeds empty services like clients would: products and customers first, stock
/// once inventory has the products, one order once ordering has it all. False
/// when the services had data already.
async fn seed(client: &reqwest::Client, url: &impl Fn(Service) -> String) -> Result<bool> {
    let (catalog, inventory, customers, ordering) = (
        url(Service::Catalog),
        url(Service::Inventory),
        url(Service::Customers),
        url(Service::Ordering),
    );
    let listing: Value = client
        .get(format!("{catalog}/views/products?limit=1"))
        .send()
        .await?
        .json()
        .await?;
    if listing["items"]
        .as_array()
        .is_some_and(|items| !items.is_empty())
    {
        return Ok(false);
    }
    let mut products = String::new();
    for (id, name, description, price_cents, _) in CATALOGUE {
        let body = json!({"product_id": id, "name": name, "description": description, "price_cents": price_cents});
        products = command(client, &catalog, "RegisterProduct", body).await?;
    }
    let mut registered = String::new();
    for (id, name, email, address) in CUSTOMERS {
        let body = json!({"customer_id": id, "name": name, "email": email, "address": address});
        registered = command(client, &customers, "RegisterCustomer", body).await?;
    }
    read_after(
        client,
        &inventory,
        "/views/products",
        &format!("catalog:{products}"),
    )
    .await?;
    let mut stocked = String::new();
    for (id, _, _, _, stock) in CATALOGUE {
        let body = json!({"product_id": id, "quantity": stock});
        stocked = command(client, &inventory, "AddStock", body).await?;
    }
    for token in [
        format!("catalog:{products}"),
        format!("customers:{registered}"),
        format!("inventory:{stocked}"),
    ] {
        read_after(client, &ordering, "/views/orders", &token).await?;
    }
    let order = json!({"order_id": "o-1", "customer_id": "ada", "lines": [
        {"product_id": "mug", "quantity": 2}, {"product_id": "tea", "quantity": 1}]});
    command(client, &ordering, "PlaceOrder", order).await?;
    Ok(true)
}

fn print_welcome(config: &SplitConfig, running: &[Running], seeded: bool) {
    println!(
        "diptych shop as {} services, wired through NATS at {}",
        running.len(),
        config.broker
    );
    for service in running {
        println!(
            "  {:<10} {}   pid {}, data in {}",
            service.service.name(),
            service.url,
            service.child.id(),
            config.data.join(service.service.name()).display()
        );
    }
    let url = |wanted: Service| {
        running
            .iter()
            .find(|running| running.service == wanted)
            .map_or("", |running| running.url.as_str())
    };
    let (catalog, ordering) = (url(Service::Catalog), url(Service::Ordering));
    println!(
        "{}",
        if seeded {
            "new: seeded products, stock, three customers and order o-1"
        } else {
            "continuing"
        }
    );
    println!();
    println!("Try:");
    println!(
        "  curl -si -X POST {catalog}/commands/RenameProduct -H 'content-type: application/json' \\\n    -d '{{\"product_id\":\"mug\",\"name\":\"Blue mug\"}}'"
    );
    println!(
        "  curl -s -H 'x-diptych-wait-for: catalog:<X-Diptych-Position from above>' \\\n    '{ordering}/views/customer-orders?customer_id=ada'"
    );
    println!("  curl -s {ordering}/orders/o-1    (the order with the catalog's descriptions)");
    println!(
        "  curl -s {ordering}/projections   (copies-catalog, copies-inventory…: what arrived)"
    );
    println!();
    println!("Ctrl-C stops them all cleanly.");
}
