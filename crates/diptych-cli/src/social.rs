//! `diptych demo --app social`: the social network served by a `Node`, seeded on
//! first start with a few users, follows and posts, with `--traffic` simulated
//! users who keep posting, liking, commenting and following.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use diptych::http::Auth;
use diptych::{Backend, CommandContext, Node, NodeConfig, Roles};
use diptych_social::Social;
use serde_json::{Value, json};

/// How to run the social network.
pub struct SocialConfig {
    /// Where to listen.
    pub addr: SocketAddr,
    /// Where events and views live.
    pub backend: Backend,
    /// Serve open on a non-loopback address anyway.
    pub insecure: bool,
    /// How many simulated users keep acting.
    pub traffic: usize,
    /// What this node does.
    pub roles: Roles,
    /// Partitions of each partitionable projection.
    pub partitions: u32,
    /// The NATS server the relay role publishes to, if any.
    pub broker: Option<String>,
}

/// The users seeded on first start: id, handle, display name, bio.
const USERS: [(&str, &str, &str, &str); 4] = [
    (
        "ada",
        "ada",
        "Ada Lovelace",
        "Notes on the analytical engine",
    ),
    ("bob", "bob", "Bob Kahn", "Packets, mostly"),
    ("cat", "cat", "Cat Stevens", "On the road to find out"),
    ("dan", "dan", "Dan Bricklin", "Spreadsheets since 1979"),
];

pub async fn run(config: SocialConfig) -> Result<()> {
    crate::serve::refuse_open_unless_loopback(config.addr, &Auth::open(), config.insecure)?;
    // Bound first: a taken address is refused before anything starts.
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| {
            format!(
                "listening on {}; pass --addr to use another address",
                config.addr
            )
        })?;
    let stores = Node::open(&config.backend).await?;
    let fresh = stores.store.head().await?.0 == 0;
    let social = Arc::new(Social::new(stores.store.clone(), stores.views.clone()));
    let node = Node::start(
        social.application().clone(),
        stores,
        NodeConfig {
            roles: config.roles,
            broker: config.broker.clone(),
            partitions: config.partitions,
            auth: Auth::open(),
        },
    )
    .await?;
    let seeded = fresh && config.roles.command;
    if seeded {
        seed(&social).await?;
    }
    let addr = listener.local_addr()?;
    print_welcome(addr, &config, seeded);
    let traffic: Vec<_> = if config.roles.command {
        (0..config.traffic)
            .map(|n| tokio::spawn(simulate_user(social.clone(), n)))
            .collect()
    } else {
        Vec::new()
    };
    let router = node.router();
    let served = node
        .serve(listener, router, crate::serve::shutdown_signal())
        .await;
    for task in traffic {
        task.abort();
    }
    served?;
    println!("stopped cleanly; run the same command to continue where it stopped");
    Ok(())
}

async fn send(social: &Social, name: &str, body: Value) -> Result<()> {
    social
        .application()
        .execute(name, body, &CommandContext::default())
        .await
        .with_context(|| format!("seeding with {name}"))?;
    Ok(())
}

async fn seed(social: &Social) -> Result<()> {
    for (user_id, handle, display_name, bio) in USERS {
        let body =
            json!({"user_id": user_id, "handle": handle, "display_name": display_name, "bio": bio});
        send(social, "RegisterUser", body).await?;
    }
    for (user_id, target_id) in [
        ("bob", "ada"),
        ("cat", "ada"),
        ("dan", "ada"),
        ("ada", "bob"),
    ] {
        send(
            social,
            "FollowUser",
            json!({"user_id": user_id, "target_id": target_id}),
        )
        .await?;
    }
    let posts = [
        (
            "welcome",
            "ada",
            "Hello world: the engine weaves algebraic patterns",
        ),
        (
            "tcp",
            "bob",
            "A gateway between networks needs only to forward packets",
        ),
        ("song", "cat", "Morning has broken, like the first morning"),
    ];
    for (post_id, author_id, text) in posts {
        send(
            social,
            "CreatePost",
            json!({"post_id": post_id, "author_id": author_id, "text": text}),
        )
        .await?;
    }
    send(
        social,
        "LikePost",
        json!({"post_id": "welcome", "user_id": "bob"}),
    )
    .await?;
    let comment =
        json!({"comment_id": "c-1", "post_id": "welcome", "author_id": "cat", "text": "Beautiful"});
    send(social, "CommentOnPost", comment).await
}

/// One simulated user: posts, likes and comments on the posts of others, and
/// now and then follows or unfollows someone.
async fn simulate_user(social: Arc<Social>, n: usize) {
    let (user_id, _, _, _) = USERS[n % USERS.len()];
    let context = CommandContext::default;
    for step in 0u64.. {
        tokio::time::sleep(Duration::from_millis(200 + fastrand::u64(0..800))).await;
        let post_id = format!("sim-{n}-{}-{step}", std::process::id());
        let (other, _, _, _) = USERS[fastrand::usize(0..USERS.len())];
        let (name, body) = match step % 5 {
            0 | 1 => (
                "CreatePost",
                json!({"post_id": post_id, "author_id": user_id, "text": format!("Thought number {step} from {user_id}")}),
            ),
            2 => (
                "LikePost",
                json!({"post_id": "welcome", "user_id": user_id}),
            ),
            3 => (
                "CommentOnPost",
                json!({"comment_id": post_id, "post_id": "tcp", "author_id": user_id, "text": "Agreed"}),
            ),
            _ if fastrand::bool() => (
                "FollowUser",
                json!({"user_id": user_id, "target_id": other}),
            ),
            _ => (
                "UnfollowUser",
                json!({"user_id": user_id, "target_id": other}),
            ),
        };
        // Following oneself and the like are refused: part of the simulation.
        let _ = social.application().execute(name, body, &context()).await;
    }
}

fn print_welcome(addr: SocketAddr, config: &SocialConfig, seeded: bool) {
    let url = format!("http://{addr}");
    println!("diptych social network listening on {url}");
    println!(
        "{} ({}); roles: {}; no authentication",
        config.backend.describe(),
        if seeded {
            "new: seeded four users, their follows and three posts"
        } else {
            "continuing"
        },
        config.roles.describe(),
    );
    println!();
    println!("Try:");
    println!("  curl -s '{url}/views/feeds?user_id=bob&order=-created_at_us&limit=10'");
    println!(
        "  curl -si -X POST {url}/commands/CreatePost -H 'content-type: application/json' \\\n    -d '{{\"post_id\":\"p-1\",\"author_id\":\"ada\",\"text\":\"Hello from curl\"}}'"
    );
    println!(
        "  curl -s -H 'x-diptych-wait-for: <X-Diptych-Position from above>' '{url}/views/feeds?user_id=bob&order=-created_at_us'"
    );
    println!("  curl -s {url}/views/profiles/ada");
    println!("  curl -s '{url}/views/posts?q=morning'");
    println!();
    println!("Ctrl-C stops it cleanly.");
}
