//! Key layout of the single sled tree. Integers are big-endian so prefix
//! scans come out in numeric order.
//!
//! ```text
//! p <name> 0x00 <version:u32>                     pipeline version
//! r <run:u64>                                     run
//! a <run:u64>                                     index of unfinished runs
//! s <run:u64> <stage:u32>                         stage
//! l <run:u64> <stage:u32> <attempt:u32> <seq:u64> log line
//! R <release:u64>                                 release
//! E <scope kind> <scope> 0x00 <environment>      environment of a pipeline
//!                                                 (scope kind `p`)
//! T <token name>                                  token (hash, role)
//! K <secret name>                                 sealed secret
//! U <audit:u64>                                   audit record
//! V <release:u64>                                 signed provenance
//! G <pipeline>                                    schedule/data trigger state
//! S <release:u64> <at_ms:u64>                     monitor sample of a release
//! W <pipeline> 0x00 <key>                          webhook delivery that started a run
//! M schema                                        store schema version (u32)
//! c <pipeline> 0x00 <cache key>                   shared cache entry
//! C <pipeline> 0x00 <cache key>                   last `kiln cache clear` of the key
//!                                                 ("" key: of the whole pipeline)
//! ```
//!
//! Schema 1 (before environments belonged to pipelines) had `E <environment>`
//! and no `M schema`; `migrate` carries it forward.

use kiln_common::ids::{EnvKey, EnvScope, RunId, StageKey};

pub(super) const PIPELINE: u8 = b'p';
pub(super) const RUN: u8 = b'r';
pub(super) const ACTIVE: u8 = b'a';
pub(super) const STAGE: u8 = b's';
pub(super) const LOG: u8 = b'l';
pub(super) const RELEASE: u8 = b'R';
pub(super) const ENVIRONMENT: u8 = b'E';
pub(super) const TOKEN: u8 = b'T';
pub(super) const SECRET: u8 = b'K';
pub(super) const AUDIT: u8 = b'U';
pub(super) const PROVENANCE: u8 = b'V';
pub(super) const TRIGGER_STATE: u8 = b'G';
pub(super) const MONITOR_SAMPLE: u8 = b'S';
pub(super) const CACHE: u8 = b'c';
pub(super) const CACHE_CLEARED: u8 = b'C';
pub(super) const DELIVERY: u8 = b'W';
/// Where the store records its schema version.
pub(super) const SCHEMA: &[u8] = b"Mschema";

pub(super) fn provenance(release: u64) -> Vec<u8> {
    let mut key = vec![PROVENANCE];
    key.extend_from_slice(&release.to_be_bytes());
    key
}

pub(super) fn delivery(pipeline: &str, key: &str) -> Vec<u8> {
    let mut bytes = named(DELIVERY, pipeline);
    bytes.push(0);
    bytes.extend_from_slice(key.as_bytes());
    bytes
}

pub(super) fn named(prefix: u8, name: &str) -> Vec<u8> {
    let mut key = vec![prefix];
    key.extend_from_slice(name.as_bytes());
    key
}

/// `c <pipeline> 0x00 <key>`; `key` "" gives the pipeline's prefix.
pub(super) fn cache(pipeline: &str, key: &str) -> Vec<u8> {
    cache_key(CACHE, pipeline, key)
}

/// `C <pipeline> 0x00 <key>`; `key` "" is the whole pipeline's clear.
pub(super) fn cache_cleared(pipeline: &str, key: &str) -> Vec<u8> {
    cache_key(CACHE_CLEARED, pipeline, key)
}

fn cache_key(prefix: u8, pipeline: &str, key: &str) -> Vec<u8> {
    let mut out = vec![prefix];
    out.extend_from_slice(pipeline.as_bytes());
    out.push(0);
    out.extend_from_slice(key.as_bytes());
    out
}

pub(super) fn monitor_sample(release: u64, at_ms: u64) -> Vec<u8> {
    let mut key = monitor_samples(release);
    key.extend_from_slice(&at_ms.to_be_bytes());
    key
}

pub(super) fn monitor_samples(release: u64) -> Vec<u8> {
    let mut key = vec![MONITOR_SAMPLE];
    key.extend_from_slice(&release.to_be_bytes());
    key
}

pub(super) fn audit(id: u64) -> Vec<u8> {
    let mut key = vec![AUDIT];
    key.extend_from_slice(&id.to_be_bytes());
    key
}

pub(super) fn release(id: u64) -> Vec<u8> {
    let mut key = vec![RELEASE];
    key.extend_from_slice(&id.to_be_bytes());
    key
}

pub(super) fn environment(env: &EnvKey) -> Vec<u8> {
    let mut key = vec![ENVIRONMENT];
    match &env.scope {
        EnvScope::Pipeline(pipeline) => {
            key.push(b'p');
            key.extend_from_slice(pipeline.as_bytes());
        }
    }
    key.push(0);
    key.extend_from_slice(env.name.as_bytes());
    key
}

pub(super) fn pipeline(name: &str, version: u32) -> Vec<u8> {
    let mut key = pipeline_prefix(name);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

pub(super) fn pipeline_prefix(name: &str) -> Vec<u8> {
    let mut key = vec![PIPELINE];
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key
}

pub(super) fn run(id: RunId) -> Vec<u8> {
    with_run(RUN, id)
}

pub(super) fn active(id: RunId) -> Vec<u8> {
    with_run(ACTIVE, id)
}

pub(super) fn stage(key: StageKey) -> Vec<u8> {
    let mut out = with_run(STAGE, key.run);
    out.extend_from_slice(&key.idx.to_be_bytes());
    out
}

pub(super) fn stages_of(run: RunId) -> Vec<u8> {
    with_run(STAGE, run)
}

pub(super) fn log_prefix(key: StageKey, attempt: u32) -> Vec<u8> {
    let mut out = with_run(LOG, key.run);
    out.extend_from_slice(&key.idx.to_be_bytes());
    out.extend_from_slice(&attempt.to_be_bytes());
    out
}

pub(super) fn log(key: StageKey, attempt: u32, seq: u64) -> Vec<u8> {
    let mut out = log_prefix(key, attempt);
    out.extend_from_slice(&seq.to_be_bytes());
    out
}

/// Every log line of every stage of `run`.
pub(super) fn logs_of_run(run: RunId) -> Vec<u8> {
    with_run(LOG, run)
}

/// The run id at bytes 1..9 of a run-scoped key.
pub(super) fn run_of(key: &[u8]) -> Option<RunId> {
    let bytes: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    Some(RunId(u64::from_be_bytes(bytes)))
}

/// The sequence number at the end of a log key.
pub(super) fn log_seq(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

fn with_run(tag: u8, id: RunId) -> Vec<u8> {
    let mut key = Vec::with_capacity(32);
    key.push(tag);
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}
