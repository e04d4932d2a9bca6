//! Support for tests against a real broker.

/// The variable that names the test server.
pub const TEST_URL_VARIABLE: &str = "DIPTYCH_TEST_AMQP";

/// The URL of the test server, from `DIPTYCH_TEST_AMQP`. Panics with what to do when it
/// is not set: tests that need the broker are never silently skipped.
pub fn test_url() -> String {
    std::env::var(TEST_URL_VARIABLE).unwrap_or_else(|_| {
        panic!(
            "{TEST_URL_VARIABLE} is not set: point it at the broker, e.g. \
             {TEST_URL_VARIABLE}=amqp://guest:guest@127.0.0.1:5672/%2f (.cargo/config.toml sets that default for cargo test)"
        )
    })
}
