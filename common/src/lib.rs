//! Pieces of Kiln that the coordinator, the agent and the CLI share.
//!
//! # Layout
//! - [`spec`]: the `kiln.yml` pipeline file, parsed and validated into a DAG
//!   with errors that name the file, line and column.
//! - [`archive`]: artifacts and source trees as zstd-compressed tar streams,
//!   packed deterministically and unpacked without escaping the target.
//! - [`cache_key`]: the key template of a stage's `cache:` (`pip-{{
//!   hash('requirements.txt') }}`), checked by the parser, rendered by agents.
//! - [`provenance`]: signed release provenance (in-toto Statement v1, SLSA
//!   Provenance v1, DSSE, ed25519) and verifying a model file against it.
//! - [`files`]: owner-only files (keys, tokens), written atomically.
//! - [`duration`]: the one reader of durations (`1m30s`, `250ms`, `2h`), for
//!   `kiln.yml` and every command-line flag.
//! - [`loglines`]: the one rule for how long a log line may be and how a
//!   longer one is cut and marked.
//! - [`ids`]: newtypes for run ids and stage keys.
//! - [`labels`]: `k=v,k=v` agent labels and how stages select agents.
//! - [`logging`]: tracing set-up for the binaries.
//! - [`triggers`]: pure rules for push webhooks, cron schedules and watched
//!   data directories: when an outside event starts a run.
//! - [`masking`]: secret values replaced by `***` in complete strings and in
//!   output that arrives in chunks.
//! - [`tls`]: PEM certificates, keys and CA bundles, loaded with errors that
//!   name the file; server and client TLS configs (rustls, `ring`).
//! - [`channel`]: how clients reach a coordinator — [`channel::CoordinatorEndpoint`]
//!   (http/https, CA file, client certificate) and [`channel::KilnChannel`],
//!   which sends the bearer token on every request.

pub mod archive;
pub mod cache_key;
pub mod channel;
pub mod duration;
pub mod files;
pub mod ids;
pub mod labels;
pub mod logging;
pub mod loglines;
pub mod masking;
pub mod provenance;
pub mod size;
pub mod spec;
pub mod tls;
pub mod triggers;
