//! One module per group of commands. Each command function takes the
//! connected coordinator and the output format, prints its result and
//! returns how it ended; `main` turns that into an exit code.

pub(crate) mod agents;
pub(crate) mod artifacts;
pub(crate) mod cache;
pub(crate) mod delivery;
pub(crate) mod logs;
pub(crate) mod metrics;
pub(crate) mod models;
pub(crate) mod pipeline;
pub(crate) mod provenance;
pub(crate) mod repo;
pub(crate) mod rollout;
pub(crate) mod runs;
pub(crate) mod security;
pub(crate) mod watch;
