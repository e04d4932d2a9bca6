//! diptych between services over RabbitMQ (AMQP 0-9-1).
//!
//! [`AmqpPublisher`] is the outbox relay's way out: each event is published to
//! the topic exchange `diptych` with the routing key
//! `<service>.<category>.<stream>`, persistent, with the event id as the message
//! id and the envelope's metadata as headers; the channel is in confirm mode and
//! the relay's checkpoint moves only once the broker has confirmed every message
//! of a page. [`spawn_amqp_inbound`] applies another service's events to a local
//! projection through a durable queue bound to `<source>.#`, acknowledging each
//! message manually after the commit that applied it (core's
//! `InboundProjection` makes a redelivery harmless).

mod consumer;
mod publisher;

pub use consumer::{AmqpInboundConfig, declare_queue, delete_queue, spawn_amqp_inbound};
pub use publisher::{AmqpPublisher, EXCHANGE, routing_key};
pub mod testing;
