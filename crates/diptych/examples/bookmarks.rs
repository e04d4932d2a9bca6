//! A whole service on diptych: one aggregate, one command, one view, served with
//! every role by a node. `cargo run -p diptych --example bookmarks --features node`
use std::sync::Arc;

use diptych::*;
use serde::{Deserialize, Serialize};

#[derive(Default, Serialize, Deserialize)]
struct Shelf {
    urls: Vec<String>,
} // a user's bookmarks: stream `shelf-<user_id>`

#[derive(Clone, Serialize, Deserialize)]
enum ShelfEvent {
    Bookmarked { user_id: String, url: String },
}

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is bookmarked already")]
struct AlreadyThere(String);

impl RejectionCode for AlreadyThere {
    fn code(&self) -> &'static str {
        "already_bookmarked"
    } // a 422 with this code
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)] // a missing, unknown or mistyped field is a 400 naming it
struct Bookmark {
    user_id: String,
    url: String,
}
command!(Bookmark, id = user_id, aggregate = Shelf, into = |b| b); // POST /commands/Bookmark

impl Aggregate for Shelf {
    const KIND: &'static str = "shelf";
    type Command = Bookmark;
    type Event = ShelfEvent;
    type Error = AlreadyThere;
    fn decide(&self, b: &Bookmark) -> Result<Vec<ShelfEvent>, AlreadyThere> {
        if self.urls.contains(&b.url) {
            return Err(AlreadyThere(b.url.clone()));
        }
        Ok(vec![ShelfEvent::Bookmarked {
            user_id: b.user_id.clone(),
            url: b.url.clone(),
        }])
    }
    fn evolve(&mut self, ShelfEvent::Bookmarked { url, .. }: &ShelfEvent) {
        self.urls.push(url.clone())
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Counts {
    bookmarks: u64,
}

struct CountsView(EventSet<ShelfEvent>); // GET /views/counts/<user_id>

#[async_trait::async_trait]
impl TypedProjection for CountsView {
    type Event = ShelfEvent;
    fn name(&self) -> &str {
        "counts"
    }
    fn collections(&self) -> Vec<CollectionSpec> {
        vec![CollectionSpec::new("counts").index("bookmarks")]
    }
    fn events(&self) -> &EventSet<ShelfEvent> {
        &self.0
    }
    async fn apply(
        &self,
        event: ShelfEvent,
        _: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<(), HandlerError> {
        let ShelfEvent::Bookmarked { user_id, .. } = event;
        Ok(views
            .upsert("counts", &user_id, |c: &mut Counts| c.bookmarks += 1)
            .await?)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let stores = Node::open(&Backend::Sqlite("data-bookmarks".into())).await?;
    let service = Service::builder("bookmarks")
        .aggregate(Repository::<Shelf>::new(stores.store.clone()))
        .command::<Bookmark>()
        .projection(Arc::new(CountsView(
            EventSet::new().aggregate::<Shelf>(|e| e),
        )))
        .build()?;
    let node = Node::start(service, stores, NodeConfig::default()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8090").await?;
    let router = node.router();
    Ok(node
        .serve(listener, router, tokio::signal::ctrl_c())
        .await?)
}
