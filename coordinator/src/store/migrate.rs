//! Schema migrations, run by [`SledStore::open`](super::SledStore::open)
//! before anything else reads the store.
//!
//! The store records its schema version under `M schema`. A store without
//! one is either new (empty: it gets the current version) or was written
//! before versions were recorded (schema 1). Each step reads the old
//! records as plain JSON — not as today's types, which will move on — and
//! writes the new ones in one atomic batch together with the new version,
//! so a failed or interrupted migration leaves the store as it was. A store
//! from a newer coordinator is refused before anything is written.
//!
//! - 1 → 2: environments belong to their pipeline. Each `E <name>` is split
//!   by the pipeline of the releases made in it (a release records the
//!   pipeline of the run that made it).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use super::{Result, StoreError, keys};

/// The schema this coordinator reads and writes.
pub(super) const CURRENT: u32 = 2;

/// Brings the store in `db` (under the data directory `dir`) to
/// [`CURRENT`], or refuses without writing.
pub(super) fn to_current(db: &sled::Db, dir: &Path) -> Result<()> {
    let found = match db.get(keys::SCHEMA)? {
        Some(value) => parse::<u32>(keys::SCHEMA, &value)?,
        None if db.is_empty() => {
            db.insert(keys::SCHEMA, encode(&json!(CURRENT)))?;
            db.flush()?;
            return Ok(());
        }
        None => 1,
    };
    if found > CURRENT {
        return Err(StoreError::FutureSchema {
            dir: dir.display().to_string(),
            found,
            known: CURRENT,
        });
    }
    if found == 1 {
        let batch = environments_by_pipeline(db).map_err(|why| StoreError::Migration {
            dir: dir.display().to_string(),
            from: 1,
            to: 2,
            why,
        })?;
        db.apply_batch(batch)?;
        db.flush()?;
        tracing::info!(dir = %dir.display(), "store migrated from schema 1 to 2");
    }
    Ok(())
}

/// Schema 1 → 2: the writes, or why the store cannot be migrated.
fn environments_by_pipeline(db: &sled::Db) -> std::result::Result<sled::Batch, String> {
    let mut releases: Vec<(Vec<u8>, Value)> = scan(db, &[keys::RELEASE])?;
    let environments: Vec<(Vec<u8>, Value)> = scan(db, &[keys::ENVIRONMENT])?;
    let runs: Vec<(Vec<u8>, Value)> = scan(db, &[keys::RUN])?;

    // When each release was last put back by a rollback run that finished.
    let mut restored_ms: BTreeMap<u64, u64> = BTreeMap::new();
    for (_, run) in &runs {
        if let Some(plan) = run.get("rollback").filter(|plan| !plan.is_null())
            && run["state"] == "succeeded"
        {
            let to = number(plan, "to")?;
            let finished = run["finished_ms"].as_u64().unwrap_or_default();
            let latest = restored_ms.entry(to).or_default();
            *latest = (*latest).max(finished);
        }
    }

    // (environment, pipeline) → indexes into `releases`, oldest first.
    let mut groups: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for (idx, (_, release)) in releases.iter().enumerate() {
        let environment = text(release, "environment")?;
        let pipeline = text(release, "pipeline")?;
        groups.entry((environment, pipeline)).or_default().push(idx);
    }

    let mut batch = sled::Batch::default();
    let mut old_by_name: BTreeMap<String, Value> = BTreeMap::new();
    for (key, environment) in environments {
        let name = text(&environment, "name")?;
        if !groups.keys().any(|(env, _)| *env == name) {
            tracing::info!(environment = %name, "store migration: environment without releases dropped");
        }
        batch.remove(key);
        old_by_name.insert(name, environment);
    }

    for ((name, pipeline), group) in &groups {
        let old = old_by_name.get(name);
        let old_live = old.and_then(|env| env["live"].as_u64());
        let ids: Vec<u64> = group
            .iter()
            .map(|&idx| number(&releases[idx].1, "id"))
            .collect::<std::result::Result<_, _>>()?;
        let owns_old_live = old_live.is_some_and(|live| ids.contains(&live));
        // The pipeline's live release: the farm-wide one if it was this
        // pipeline's, else the one this pipeline last made live (by a
        // deployment or a rollback) that was not rolled back since.
        let live = if owns_old_live {
            old_live
        } else {
            group
                .iter()
                .map(|&idx| &releases[idx].1)
                .filter(|release| release["state"] != "rolled_back")
                .filter_map(|release| {
                    let id = release["id"].as_u64()?;
                    let created = release["created_ms"].as_u64().unwrap_or_default();
                    let made_live = created.max(restored_ms.get(&id).copied().unwrap_or_default());
                    Some((made_live, id))
                })
                .max()
                .map(|(_, id)| id)
        };
        for &idx in group {
            let (_, release) = &mut releases[idx];
            let id = release["id"].as_u64();
            if id == live {
                release["state"] = json!("live");
            } else if release["state"] == "live" {
                release["state"] = json!("superseded");
            }
            release["environment"] = env_key(pipeline, name);
        }
        // A freeze came from a monitor of the live release, so it stays
        // with that release's pipeline.
        let frozen = old
            .filter(|_| owns_old_live || old_live.is_none())
            .map_or(Value::Null, |env| env["frozen"].clone());
        let record = json!({
            "key": env_key(pipeline, name),
            "live": live,
            "frozen": frozen,
        });
        batch.insert(environment_key(pipeline, name), encode(&record));
        tracing::info!(
            from = %name,
            to = %format!("{pipeline}/{name}"),
            releases = ?ids,
            live = ?live,
            frozen = !frozen.is_null(),
            "store migration: environment split by pipeline"
        );
    }
    for (key, release) in &releases {
        batch.insert(key.clone(), encode(release));
    }

    // A rollback run names the environment it restores; it is always its
    // own pipeline's.
    for (key, mut run) in runs {
        if run.get("rollback").is_none_or(Value::is_null) {
            continue;
        }
        let pipeline = text(&run, "pipeline")?;
        let name = text(&run["rollback"], "environment")?;
        run["rollback"]["environment"] = env_key(&pipeline, &name);
        batch.insert(key, encode(&run));
    }
    batch.insert(keys::SCHEMA, encode(&json!(2)));
    Ok(batch)
}

/// Schema 2's `EnvKey` of an environment of a pipeline, as JSON.
fn env_key(pipeline: &str, name: &str) -> Value {
    json!({ "scope": { "pipeline": pipeline }, "name": name })
}

/// Schema 2's key of an environment of a pipeline.
fn environment_key(pipeline: &str, name: &str) -> Vec<u8> {
    keys::environment(&kiln_common::ids::EnvKey::of_pipeline(pipeline, name))
}

fn scan(db: &sled::Db, prefix: &[u8]) -> std::result::Result<Vec<(Vec<u8>, Value)>, String> {
    db.scan_prefix(prefix)
        .map(|entry| {
            let (key, value) = entry.map_err(|error| format!("reading the store: {error}"))?;
            let value = serde_json::from_slice(&value).map_err(|error| {
                format!(
                    "the record under key {} is not JSON ({error})",
                    String::from_utf8_lossy(&key)
                )
            })?;
            Ok((key.to_vec(), value))
        })
        .collect()
}

fn text(record: &Value, field: &str) -> std::result::Result<String, String> {
    record[field]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("a record has no text field `{field}`: {record}"))
}

fn number(record: &Value, field: &str) -> std::result::Result<u64, String> {
    record[field]
        .as_u64()
        .ok_or_else(|| format!("a record has no number field `{field}`: {record}"))
}

fn parse<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn encode(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("JSON values always serialize")
}
