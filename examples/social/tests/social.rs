//! The social network's contract over HTTP, black-box, on SQLite and on
//! PostgreSQL: commands, rules with their codes, bad input, and views read with
//! the client's own writes (`X-Diptych-Wait-For`).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use diptych::http::{AppState, Auth, HttpConfig, app};
use diptych::postgres::{PgStore, PgViews, testing::fresh_config};
use diptych::sqlite::{SqliteStore, SqliteViews};
use diptych::{EventStore, RunnerConfig, RunnerHandle, ViewStore};
use diptych_social::Social;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

struct Api {
    router: Router,
    _runners: Vec<RunnerHandle>,
    _dir: Option<tempfile::TempDir>,
}

struct Answer {
    status: StatusCode,
    body: Value,
    position: Option<String>,
}

async fn api(backend: Backend) -> Api {
    let (store, views, dir): (Arc<dyn EventStore>, Arc<dyn ViewStore>, _) = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path().join("events.db")).unwrap();
            let views = SqliteViews::open(dir.path().join("views.db")).unwrap();
            (Arc::new(store), Arc::new(views), Some(dir))
        }
        Backend::Postgres => {
            let config = fresh_config().await;
            let store = PgStore::connect(&config).await.unwrap();
            let views = PgViews::connect(&config).await.unwrap();
            (Arc::new(store), Arc::new(views), None)
        }
    };
    let social = Social::new(store.clone(), views.clone());
    let service = social.application().clone();
    let mut runners = Vec::new();
    for handler in service.handlers() {
        runners.push(
            handler
                .spawn(store.clone(), views.clone(), RunnerConfig::default())
                .await
                .unwrap(),
        );
    }
    let router = app(AppState {
        application: Arc::new(service),
        store,
        views,
        auth: Auth::open(),
        config: HttpConfig::default(),
    });
    Api {
        router,
        _runners: runners,
        _dir: dir,
    }
}

impl Api {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        wait_for: Option<&str>,
        body: Option<String>,
    ) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json");
        if let Some(position) = wait_for {
            request = request.header("x-diptych-wait-for", position);
        }
        let request = request
            .body(body.map_or_else(Body::empty, Body::from))
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let position = response
            .headers()
            .get("x-diptych-position")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert!(
            !status.is_server_error(),
            "{method} {uri} answered {status}: {body}"
        );
        Answer {
            status,
            body,
            position,
        }
    }

    async fn send(&self, command: &str, body: Value) -> Answer {
        self.call(
            "POST",
            &format!("/commands/{command}"),
            None,
            Some(body.to_string()),
        )
        .await
    }

    /// Runs a command that must succeed; its consistency token.
    async fn ok(&self, command: &str, body: Value) -> String {
        let answer = self.send(command, body.clone()).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{command} {body}: {}",
            answer.body
        );
        answer.position.expect("a consistency token")
    }

    /// Runs a command that a business rule must refuse (422); its code.
    async fn rule(&self, command: &str, body: Value) -> String {
        let (status, code, _) = self.refused(command, body.clone()).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{command} {body}: {code}"
        );
        code
    }

    /// Runs a command that must be refused; the problem's code (and field).
    async fn refused(&self, command: &str, body: Value) -> (StatusCode, String, Option<String>) {
        let answer = self.send(command, body).await;
        let code = answer.body["code"].as_str().unwrap_or_default().to_owned();
        let field = answer.body["field"].as_str().map(str::to_owned);
        (answer.status, code, field)
    }

    /// Reads `uri` once the views include `position`.
    async fn read(&self, uri: &str, position: &str) -> Answer {
        self.call("GET", uri, Some(position), None).await
    }

    async fn feed(&self, reader: &str, position: &str) -> Vec<String> {
        let answer = self
            .read(
                &format!("/views/feeds?user_id={reader}&order=-created_at_us&limit=50"),
                position,
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        answer.body["items"]
            .as_array()
            .unwrap_or_else(|| panic!("a page: {}", answer.body))
            .iter()
            .map(|item| item["document"]["post_id"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn register(&self, user_id: &str, handle: &str) -> String {
        self.ok(
            "RegisterUser",
            json!({"user_id": user_id, "handle": handle, "display_name": handle.to_uppercase(), "bio": ""}),
        )
        .await
    }

    async fn follow(&self, user_id: &str, target_id: &str) -> String {
        self.ok(
            "FollowUser",
            json!({"user_id": user_id, "target_id": target_id}),
        )
        .await
    }

    async fn post(&self, post_id: &str, author_id: &str, text: &str) -> String {
        self.ok(
            "CreatePost",
            json!({"post_id": post_id, "author_id": author_id, "text": text}),
        )
        .await
    }
}

async fn feeds_follow_posts_unfollows_and_deletes(backend: Backend) {
    let api = api(backend).await;
    for (id, handle) in [
        ("ada", "Ada"),
        ("bob", "bob"),
        ("cat", "cat"),
        ("dan", "dan"),
    ] {
        api.register(id, handle).await;
    }
    api.follow("bob", "ada").await;
    api.follow("cat", "ada").await;
    api.follow("dan", "ada").await;
    api.post("p1", "ada", "hello world").await;
    let at = api.post("p2", "ada", "second thoughts").await;
    assert_eq!(api.feed("bob", &at).await, ["p2", "p1"]);
    assert_eq!(api.feed("cat", &at).await, ["p2", "p1"]);
    assert!(api.feed("ada", &at).await.is_empty(), "ada follows no one");

    let profile = api.read("/views/profiles/ada", &at).await.body;
    assert_eq!(
        (&profile["handle"], &profile["followers"], &profile["posts"]),
        (&json!("Ada"), &json!(3), &json!(2))
    );
    assert_eq!(
        api.read("/views/profiles/bob", &at).await.body["following"],
        1
    );

    api.ok(
        "CommentOnPost",
        json!({"comment_id": "c1", "post_id": "p1", "author_id": "bob", "text": "hi ada"}),
    )
    .await;
    let at = api
        .ok("LikePost", json!({"post_id": "p1", "user_id": "cat"}))
        .await;
    let again = api
        .send("LikePost", json!({"post_id": "p1", "user_id": "cat"}))
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(
        again.body["events"],
        json!([]),
        "a second like writes nothing"
    );
    let post = api.read("/views/posts/p1", &at).await.body;
    assert_eq!(post["author_handle"], "Ada");
    assert_eq!(post["likes"], 1);
    assert_eq!(post["comments"][0]["author_handle"], "bob");
    let found = api.read("/views/posts?q=hello", &at).await.body;
    let ids: Vec<&str> = found["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["document"]["post_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["p1"]);

    let at = api
        .ok(
            "UnfollowUser",
            json!({"user_id": "cat", "target_id": "ada"}),
        )
        .await;
    assert!(
        api.feed("cat", &at).await.is_empty(),
        "unfollowing takes posts out"
    );
    assert_eq!(api.feed("bob", &at).await, ["p2", "p1"]);

    assert_eq!(
        api.refused("DeletePost", json!({"post_id": "p2", "author_id": "bob"}))
            .await,
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_author".to_owned(),
            None
        )
    );
    let at = api
        .ok("DeletePost", json!({"post_id": "p2", "author_id": "ada"}))
        .await;
    assert_eq!(
        api.feed("bob", &at).await,
        ["p1"],
        "a deleted post leaves every feed"
    );
    assert_eq!(
        api.feed("dan", &at).await,
        ["p1"],
        "a deleted post leaves every feed"
    );
    assert_eq!(
        api.read("/views/posts/p2", &at).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(api.read("/views/profiles/ada", &at).await.body["posts"], 1);
    assert_eq!(
        api.refused("LikePost", json!({"post_id": "p2", "user_id": "bob"}))
            .await
            .1,
        "post_not_found",
        "a deleted post is not found"
    );

    // Following brings the author's 20 latest posts in, newest first.
    for n in 0..22 {
        api.post(&format!("q{n:02}"), "bob", &format!("post {n}"))
            .await;
    }
    let at = api.follow("cat", "bob").await;
    let feed = api.feed("cat", &at).await;
    let expected: Vec<String> = (2..22).rev().map(|n| format!("q{n:02}")).collect();
    assert_eq!(feed, expected);
    // After a deletion a new follower still gets 20: the next older one too.
    api.ok("DeletePost", json!({"post_id": "q21", "author_id": "bob"}))
        .await;
    let at = api.follow("dan", "bob").await;
    let expected: Vec<String> = (1..21).rev().map(|n| format!("q{n:02}")).collect();
    let feed: Vec<String> = api
        .feed("dan", &at)
        .await
        .into_iter()
        .filter(|id| id.starts_with('q'))
        .collect();
    assert_eq!(feed, expected);
}

async fn rules_answer_with_their_codes(backend: Backend) {
    let api = api(backend).await;
    api.register("ada", "Ada").await;
    api.register("bob", "bob").await;
    let taken = |handle: &str| json!({"user_id": format!("other-{handle}"), "handle": handle, "display_name": "X", "bio": ""});
    for handle in ["ada", "ADA", "Ada"] {
        assert_eq!(
            api.rule("RegisterUser", taken(handle)).await,
            "handle_taken",
            "{handle}"
        );
    }
    for (command, body) in [
        (
            "FollowUser",
            json!({"user_id": "ada", "target_id": "nobody"}),
        ),
        (
            "FollowUser",
            json!({"user_id": "nobody", "target_id": "ada"}),
        ),
        (
            "CreatePost",
            json!({"post_id": "p", "author_id": "nobody", "text": "hi"}),
        ),
        ("LikePost", json!({"post_id": "p", "user_id": "nobody"})),
        (
            "CommentOnPost",
            json!({"comment_id": "c", "post_id": "p", "author_id": "nobody", "text": "hi"}),
        ),
    ] {
        assert_eq!(
            api.rule(command, body.clone()).await,
            "user_not_found",
            "{command} {body}"
        );
    }
    assert_eq!(
        api.rule("FollowUser", json!({"user_id": "ada", "target_id": "ada"}))
            .await,
        "cannot_follow_self"
    );
    for (command, body) in [
        ("LikePost", json!({"post_id": "none", "user_id": "ada"})),
        (
            "CommentOnPost",
            json!({"comment_id": "c", "post_id": "none", "author_id": "ada", "text": "hi"}),
        ),
        ("DeletePost", json!({"post_id": "none", "author_id": "ada"})),
    ] {
        assert_eq!(api.rule(command, body).await, "post_not_found", "{command}");
    }
    // A refused registration holds no handle: someone else may take it.
    let (status, _, field) = api
        .refused(
            "RegisterUser",
            json!({"user_id": "cy", "handle": "zz", "display_name": "", "bio": ""}),
        )
        .await;
    assert_eq!(
        (status, field.as_deref()),
        (StatusCode::BAD_REQUEST, Some("display_name"))
    );
    api.register("dee", "ZZ").await;
}

async fn concurrent_registrations_of_one_handle_let_one_win(backend: Backend) {
    let api = Arc::new(api(backend).await);
    let racers: Vec<_> = ["zed", "Zed", "ZED", "zeD", "zEd", "ZeD"]
        .into_iter()
        .enumerate()
        .map(|(n, handle)| {
            let api = api.clone();
            tokio::spawn(async move {
                api.send(
                    "RegisterUser",
                    json!({"user_id": format!("u{n}"), "handle": handle, "display_name": "Z", "bio": ""}),
                )
                .await
            })
        })
        .collect();
    let mut won = 0;
    for racer in racers {
        let answer = racer.await.unwrap();
        match answer.status {
            StatusCode::OK => won += 1,
            _ => assert_eq!(answer.body["code"], "handle_taken", "{}", answer.body),
        }
    }
    assert_eq!(won, 1, "exactly one registration holds the handle");
}

async fn bad_input_is_a_400_naming_the_field_and_unknown_names_a_404(backend: Backend) {
    let api = api(backend).await;
    api.register("ada", "ada").await;
    let long = "x".repeat(501);
    for (command, body, field) in [
        (
            "CreatePost",
            json!({"post_id": "p", "author_id": "ada", "text": 5}),
            "text",
        ),
        (
            "CreatePost",
            json!({"post_id": "p", "author_id": "ada"}),
            "text",
        ),
        (
            "CreatePost",
            json!({"post_id": "p", "author_id": "ada", "text": "hi", "mood": "happy"}),
            "mood",
        ),
        (
            "CreatePost",
            json!({"post_id": "p", "author_id": "ada", "text": long}),
            "text",
        ),
        (
            "CreatePost",
            json!({"post_id": "p", "author_id": "ada", "text": "  "}),
            "text",
        ),
        (
            "CreatePost",
            json!({"post_id": "", "author_id": "ada", "text": "hi"}),
            "post_id",
        ),
        (
            "RegisterUser",
            json!({"user_id": "bob", "handle": "no spaces", "display_name": "B", "bio": ""}),
            "handle",
        ),
        (
            "RegisterUser",
            json!({"user_id": "bob", "handle": "bob", "display_name": "B", "bio": long}),
            "bio",
        ),
        (
            "FollowUser",
            json!({"user_id": "ada", "target_id": [1]}),
            "target_id",
        ),
        ("UnfollowUser", json!({"user_id": "ada"}), "target_id"),
        (
            "UnfollowUser",
            json!({"user_id": "ada", "target_id": "b", "x": 1}),
            "x",
        ),
        ("LikePost", json!({"post_id": "p"}), "user_id"),
        (
            "DeletePost",
            json!({"post_id": 7, "author_id": "ada"}),
            "post_id",
        ),
        ("DeletePost", json!({"post_id": "p"}), "author_id"),
        (
            "CommentOnPost",
            json!({"comment_id": "c", "post_id": "p", "author_id": "ada", "text": ""}),
            "text",
        ),
        (
            "CommentOnPost",
            json!({"comment_id": "c", "post_id": "p", "author_id": "ada", "text": long}),
            "text",
        ),
        (
            "CreatePost",
            json!({"post_id": "p", "author_id": "nobody", "text": ""}),
            "text",
        ),
    ] {
        let (status, code, named) = api.refused(command, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{command} {body}");
        assert_eq!(named.as_deref(), Some(field), "{command} {body}: {code}");
    }
    assert_eq!(
        api.refused("Teleport", json!({})).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.call("GET", "/views/timelines/ada", None, None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let answer = api
        .call(
            "POST",
            "/commands/CreatePost",
            None,
            Some("{not json".to_owned()),
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
}

macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_both_backends!(
    feeds_follow_posts_unfollows_and_deletes,
    rules_answer_with_their_codes,
    concurrent_registrations_of_one_handle_let_one_win,
    bad_input_is_a_400_naming_the_field_and_unknown_names_a_404,
);
