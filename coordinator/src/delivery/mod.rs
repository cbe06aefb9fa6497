//! The network side of ML delivery: reading monitored metrics and sending
//! alerts. The decisions (releases, gates, breaches, rollback) are the
//! engine's (`engine::delivery`, `engine::monitor`); these modules only
//! talk to the outside, and never block the engine.
//!
//! # Layout
//! - `sources`: sampling a monitored metric from a Prometheus exposition
//!   endpoint or a Prometheus server's query API.
//! - `alerts`: the alerter task posting to Alertmanager and a signed
//!   webhook, fed through a queue the engine never blocks on.
//! - `history`: the stored monitor samples read back (`kiln metrics`) and
//!   thinned by the compactor task.

pub(crate) mod alerts;
pub(crate) mod history;
pub(crate) mod sources;
#[cfg(test)]
pub(crate) mod testing;

/// The HTTP client every delivery request goes through (plain HTTP for now;
/// TLS comes with its own issue). Cheap to clone: clones share one
/// connection pool.
pub(crate) type HttpClient = reqwest::Client;

/// The client `sources` and `alerts` expect: bounded connect time and a
/// user agent naming Kiln; each request sets its own overall timeout.
pub(crate) fn http_client() -> HttpClient {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .user_agent(concat!("kiln-coordinator/", env!("CARGO_PKG_VERSION")))
        .build()
        // Only TLS back-end initialisation can fail, and none is compiled in.
        .expect("building the HTTP client")
}
