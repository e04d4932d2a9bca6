//! The view store's catalogue: projections, their checkpoints per generation,
//! their collections' declarations and parked events. The documents live in one
//! table per collection and generation (see `tables`), created as
//! projections register and rebuild.

use crate::schema::Migrations;

pub(crate) const VIEWS: Migrations = Migrations {
    component: "views",
    steps: &[
        // 1: the catalogue. Names sort bytewise (`COLLATE "C"`), as the in-memory
        // model sorts them. A collection's `id` names its tables: collection names
        // are up to 64 bytes, too long for PostgreSQL's 63-byte identifiers once a
        // generation is added.
        r#"
        CREATE TABLE projections (
            name               text COLLATE "C" PRIMARY KEY,
            kind               text    NOT NULL,
            generation         bigint  NOT NULL,
            rebuild_generation bigint,
            rebuild_requested  boolean NOT NULL DEFAULT false,
            paused             boolean NOT NULL DEFAULT false,
            stalled            text
        );
        CREATE TABLE checkpoints (
            projection text COLLATE "C" NOT NULL,
            generation bigint NOT NULL,
            position   bigint NOT NULL,
            PRIMARY KEY (projection, generation)
        );
        CREATE TABLE collections (
            name       text COLLATE "C" PRIMARY KEY,
            id         bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
            projection text COLLATE "C" NOT NULL,
            spec       jsonb  NOT NULL
        );
        CREATE INDEX collections_projection ON collections (projection);
        CREATE TABLE parked (
            projection      text COLLATE "C" NOT NULL,
            generation      bigint  NOT NULL,
            position        bigint  NOT NULL,
            stream          text    NOT NULL,
            event_type      text    NOT NULL,
            error           text    NOT NULL,
            attempts        bigint  NOT NULL,
            parked_at       bigint  NOT NULL,
            retry_requested boolean NOT NULL DEFAULT false,
            PRIMARY KEY (projection, generation, position)
        );
        "#,
        // 2: events received from a broker and applied, for deduplication.
        r#"
        CREATE TABLE received (
            projection text COLLATE "C" NOT NULL,
            event_id   uuid NOT NULL,
            PRIMARY KEY (projection, event_id)
        );
        "#,
    ],
};
