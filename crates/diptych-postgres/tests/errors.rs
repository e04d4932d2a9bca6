//! The PostgreSQL backend's refusals: each says what went wrong and what to do,
//! and writes nothing.

use diptych_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
use diptych_postgres::{OpenError, PgConfig, PgStore, PgViews, testing};
use serde_json::json;

#[tokio::test]
async fn a_schema_name_that_is_not_an_identifier_is_refused() {
    let config = PgConfig::new(testing::test_url()).with_schema("Robert'); DROP TABLE x;--");
    let error = PgStore::connect(&config).await.err().expect("refused");
    assert!(matches!(error, OpenError::InvalidSchemaName(_)), "{error}");
    assert!(error.to_string().contains("lowercase letters"), "{error}");
}

#[tokio::test]
async fn a_url_that_is_not_one_is_refused() {
    let error = PgStore::connect(&PgConfig::new("postgres://host:notaport/db"))
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains("URL is not valid"), "{error}");
}

#[tokio::test]
async fn a_server_that_is_not_there_is_named_in_the_error() {
    let error = PgStore::connect(&PgConfig::new("postgres://postgres@127.0.0.1:1/test"))
        .await
        .err()
        .expect("refused");
    let said = error.to_string();
    assert!(said.contains("127.0.0.1:1/test"), "{said}");
    assert!(said.contains("is the server up"), "{said}");
}

#[tokio::test]
async fn tables_written_by_a_newer_diptych_are_refused() {
    let config = testing::fresh_config().await;
    drop(PgStore::connect(&config).await.expect("a store"));
    drop(PgViews::connect(&config).await.expect("views"));
    let client = testing::raw_client(&config).await;
    client
        .execute("UPDATE diptych_migrations SET version = 99", &[])
        .await
        .unwrap();
    for error in [
        PgStore::connect(&config).await.err().expect("refused"),
        PgViews::connect(&config).await.err().expect("refused"),
    ] {
        assert!(
            matches!(&error, OpenError::NewerSchema { found: 99, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("upgrade diptych"), "{error}");
    }
}

#[tokio::test]
async fn an_append_too_large_for_one_transaction_is_refused_whole() {
    let config = testing::fresh_config().await;
    let store = PgStore::connect(&config).await.expect("a store");
    let stream = StreamId::new("big-1").unwrap();
    let events = (0..65_537)
        .map(|_| NewEvent::new("Tiny", json!(null)))
        .collect();
    let error = store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Any,
            events,
        ))
        .await
        .expect_err("refused");
    assert!(
        error.to_string().contains("at most 65536 events"),
        "{error}"
    );
    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        0,
        "nothing written"
    );
}

#[tokio::test]
async fn an_append_after_other_writes_in_its_transaction_is_refused() {
    let config = testing::fresh_config().await;
    let store = PgStore::connect(&config).await.expect("a store");
    let mut client = testing::raw_client(&config).await;
    let transaction = client.transaction().await.unwrap();
    // Any write assigns the transaction its id before the stream's lock.
    transaction
        .execute("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();
    let error = transaction
        .query_one(
            "SELECT * FROM diptych_append('late-1', NULL, NULL, ARRAY[gen_random_uuid()], \
             ARRAY['Late'], ARRAY[1], ARRAY['{}'::jsonb], ARRAY['{}'::jsonb])",
            &[],
        )
        .await
        .expect_err("refused");
    let said = error
        .as_db_error()
        .map(|db| db.message().to_owned())
        .unwrap_or_default();
    assert!(
        said.contains("must be the first write of its transaction"),
        "{said}"
    );
    drop(transaction);
    assert_eq!(
        store
            .stream_version(&StreamId::new("late-1").unwrap())
            .await
            .unwrap(),
        0
    );
}
