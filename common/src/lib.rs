//! Pieces of Kiln that the coordinator, the agent and the CLI share.
//!
//! # Layout
//! - [`spec`]: the `kiln.yml` pipeline file, parsed and validated into a DAG
//!   with errors that name the file, line and column.
//! - [`archive`]: artifacts and source trees as zstd-compressed tar streams,
//!   packed deterministically and unpacked without escaping the target.
//! - [`ids`]: newtypes for run ids and stage keys.
//! - [`labels`]: `k=v,k=v` agent labels and how stages select agents.
//! - [`logging`]: tracing set-up for the binaries.
//! - [`tls`]: PEM certificates, keys and CA bundles, loaded with errors that
//!   name the file; server and client TLS configs (rustls, `ring`).
//! - [`channel`]: how clients reach a coordinator — [`channel::CoordinatorEndpoint`]
//!   (http/https, CA file, client certificate) and [`channel::KilnChannel`],
//!   which sends the bearer token on every request.

pub mod archive;
pub mod channel;
pub mod ids;
pub mod labels;
pub mod logging;
pub mod spec;
pub mod tls;
