//! How a service's events map onto NATS subjects and a JetStream stream.

use diptych_core::StreamId;

/// The subject of an event of `stream` published by `service`:
/// `diptych.<service>.<category>.<stream id>`. Characters NATS gives a meaning to
/// in subjects (`.`, `*`, `>`, whitespace) become `_`; the exact stream id
/// travels in the `Diptych-Stream` header.
pub fn subject_for(service: &str, stream: &StreamId) -> String {
    format!(
        "diptych.{}.{}.{}",
        token(service),
        token(stream.category()),
        token(stream.as_str())
    )
}

/// Every subject of `service`'s events, for a stream or a consumer filter.
pub fn subjects_of(service: &str) -> String {
    format!("diptych.{}.>", token(service))
}

/// The JetStream stream holding `service`'s events: `DIPTYCH_<SERVICE>`.
pub fn stream_name(service: &str) -> String {
    format!("DIPTYCH_{}", token(service).to_uppercase())
}

fn token(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '.' | '*' | '>' => '_',
            c if c.is_whitespace() => '_',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_service_category_and_stream_and_escape_what_nats_would_read() {
        let stream = StreamId::new("order-42.a*b>c d").unwrap();
        assert_eq!(
            subject_for("shop", &stream),
            "diptych.shop.order.order-42_a_b_c_d"
        );
        assert_eq!(subjects_of("shop"), "diptych.shop.>");
        assert_eq!(stream_name("catalog"), "DIPTYCH_CATALOG");
    }
}
