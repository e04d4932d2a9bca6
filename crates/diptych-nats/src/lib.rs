//! diptych between services over NATS JetStream.
//!
//! [`NatsPublisher`] is the outbox relay's way out (run it with
//! `diptych_core::spawn_relay`): each event goes to a subject made of the
//! service, the stream's category and the stream id
//! (`diptych.<service>.<category>.<stream>`), with the event id as the message id
//! (`Nats-Msg-Id`, so JetStream drops a republished event inside its duplicate
//! window), the envelope's metadata as headers and the whole envelope as JSON in
//! the body. A page is published pipelined, and the relay's checkpoint moves only
//! once JetStream has acknowledged every message of it. One connection publishes
//! in log order, so each stream's events arrive in version order.
//!
//! [`spawn_inbound`] applies another service's events to a local projection
//! through a durable consumer, exactly once (see the `consumer` module).

mod consumer;
mod publisher;
mod subjects;

pub use consumer::{InboundConfig, spawn_inbound};
pub use publisher::{NatsConfig, NatsPublisher, clear_stream, delete_stream};
pub use subjects::{stream_name, subject_for, subjects_of};
pub mod testing;
