//! A partitioned view as readers see it: its position is the lowest of its
//! partitions', it moves when a lagging partition catches up, and a projection
//! split another way is refused its collections.

use diptych_core::partition::partition_name;
use diptych_core::view::{group_position, group_watch};
use diptych_core::{
    CollectionSpec, Declaration, HandlerKind, MemoryViews, Position, ViewCommit, ViewError,
    ViewStore,
};

fn declaration(name: &str) -> Declaration {
    Declaration {
        name: name.to_owned(),
        kind: HandlerKind::Projection,
        collections: vec![CollectionSpec::new("tallies")],
    }
}

#[tokio::test]
async fn a_partitioned_view_is_as_far_as_its_slowest_partition() {
    let views = MemoryViews::new();
    let (first, second) = (
        partition_name("tallies", 0, 2),
        partition_name("tallies", 1, 2),
    );
    views.register(&declaration(&first)).await.unwrap();
    views.register(&declaration(&second)).await.unwrap();
    let mut watch = group_watch(&views, &first);
    assert_eq!(*watch.borrow_and_update(), Position::START);

    views
        .commit(ViewCommit::new(&first, 1, Position::START, Position(10)))
        .await
        .unwrap();
    assert_eq!(
        group_position(&views, &first).await.unwrap(),
        Position::START
    );
    assert_eq!(
        views.served_position("tallies").await.unwrap(),
        Position::START
    );

    views
        .commit(ViewCommit::new(&second, 1, Position::START, Position(7)))
        .await
        .unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        watch.wait_for(|p| *p == Position(7)),
    )
    .await
    .expect("the group's watch moved when the lagging partition caught up")
    .unwrap();
    assert_eq!(views.served_position("tallies").await.unwrap(), Position(7));
}

#[tokio::test]
async fn a_projection_split_another_way_is_refused_the_collections() {
    let views = MemoryViews::new();
    views
        .register(&declaration(&partition_name("tallies", 0, 4)))
        .await
        .unwrap();
    for other in [partition_name("tallies", 0, 2), "tallies".to_owned()] {
        let error = views.register(&declaration(&other)).await.unwrap_err();
        assert!(
            matches!(&error, ViewError::CollectionTaken { collection, .. } if collection == "tallies"),
            "{other}: {error:?}"
        );
    }
}
