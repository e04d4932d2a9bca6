//! diptych: an event-sourced CQRS platform for Rust.
//!
//! This is the crate applications depend on. It re-exports the model from
//! `diptych-core` (aggregates, the event store contract, codecs, subscriptions) and,
//! behind one additive feature per backend, the backends themselves:
//!
//! | feature  | default | gives you |
//! |----------|---------|-----------|
//! | `sqlite` | yes     | [`sqlite::SqliteStore`], the embedded event store |
//! | `postgres`| no     | [`postgres::PgStore`] and [`postgres::PgViews`], for many processes on one PostgreSQL |
//! | `nats`   | no      | [`nats::NatsPublisher`] for the outbox relay, [`nats::spawn_inbound`] |
//! | `rabbitmq`| no     | [`rabbitmq::AmqpPublisher`], [`rabbitmq::spawn_amqp_inbound`] |
//! | `http`   | no      | [`http::app`], the HTTP API, and `Service`, a service as one object |
//! | `node`   | no      | `Node`: a `Service` run with roles on SQLite or PostgreSQL, relayed over NATS or RabbitMQ |
//! | `testkit`| no      | `testkit`, the backend conformance suite |
//!
//! Start with [`Aggregate`] and [`Repository`]; open a store with
//! `diptych::sqlite::SqliteStore::open("data/events.db")`. With the `http`
//! feature, `Service` gathers a service's aggregates, typed [`Command`]s,
//! projections and process managers into the HTTP layer's `Application`.

pub use diptych_core::*;

#[cfg(feature = "http")]
pub mod service;
#[cfg(feature = "http")]
pub use service::{
    CopiedStreams, ParseError, ParsedCommand, Service, ServiceBuilder, ServiceError,
};

#[cfg(feature = "node")]
pub mod node;
#[cfg(feature = "node")]
pub use node::{Backend, Node, NodeConfig, NodeError, Roles, Stores};

/// The embedded SQLite backend.
#[cfg(feature = "sqlite")]
pub mod sqlite {
    pub use diptych_sqlite::*;
}

/// The PostgreSQL backend.
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use diptych_postgres::*;
}

/// Between services over NATS JetStream: the relay's publisher, inbound consumers.
#[cfg(feature = "nats")]
pub mod nats {
    pub use diptych_nats::*;
}

/// Between services over RabbitMQ: the relay's publisher, inbound consumers.
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq {
    pub use diptych_rabbitmq::*;
}

/// The HTTP layer: `diptych::http::app(state)` and the `Application` trait.
#[cfg(feature = "http")]
pub mod http {
    pub use diptych_http::*;
}
