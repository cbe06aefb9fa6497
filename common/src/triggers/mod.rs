//! The rules that turn outside events into runs: a signed push webhook, a
//! cron schedule, a change in a watched data directory. Pure decisions for
//! the coordinator, which owns the timers, the HTTP endpoint and the store;
//! time is always an argument (milliseconds since the Unix epoch, as the
//! coordinator's clock gives it) and nothing here reads the clock.
//!
//! # Layout
//! - [`webhook`]: signature check (GitHub, Gitea/Forgejo, GitLab), push payload,
//!   branch patterns.
//! - [`forge`]: what a GitHub, Gitea/Forgejo or GitLab delivery asks for
//!   (branch push, tag push, merge request) and its delivery id.
//! - [`schedule`]: a parsed cron expression, when it is due and when next.
//! - [`data`]: the digest of a directory tree (the only I/O here) and the
//!   debounce that decides when a changed tree starts a run.
//!
//! The pipeline file's `triggers:` key (`crate::spec::Triggers`) holds the
//! settings these rules are applied with.

pub mod data;
pub mod forge;
pub mod schedule;
pub mod webhook;
