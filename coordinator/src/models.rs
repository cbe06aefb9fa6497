//! The model registry, derived from what the store already keeps.
//!
//! A release whose environment stage says `model: NAME` is a version of
//! that model (`NAME@N`): every release made by one run — staging and
//! production alike — and every release `kiln promote` made from it is
//! the same version, numbered 1, 2, … per model in the order the runs
//! first released one. The numbers live on the release records, so they
//! are as durable as the releases. Aliases come in two kinds: the ones
//! named after an environment (`production`, `staging`) point at the
//! version live there and so move by themselves on every deployment,
//! promote and rollback; the others (`champion`, `challenger`) are set by
//! a person and stored (`ModelAliasRecord`).
//!
//! Pure: the engine asks it with its own releases, readers with the
//! store's, and both get the same answers.

use std::collections::BTreeMap;

use kiln_common::ids::RunId;

use crate::error::ApiError;
use crate::store::{ModelAliasRecord, ModelVersion, ReleaseRecord, ReleaseState, StageRecord};

/// One version of a model: its releases, oldest first.
#[derive(Debug)]
pub(crate) struct Version<'a> {
    pub(crate) version: u32,
    /// The run that trained it (the run of its first release).
    pub(crate) run: RunId,
    pub(crate) releases: Vec<&'a ReleaseRecord>,
}

impl Version<'_> {
    /// The release the version was first made as: its lineage.
    pub(crate) fn origin(&self) -> &ReleaseRecord {
        self.releases[0]
    }
}

/// Every model's versions, by name and number.
pub(crate) fn versions<'a>(
    releases: impl IntoIterator<Item = &'a ReleaseRecord>,
) -> BTreeMap<String, BTreeMap<u32, Version<'a>>> {
    let mut models: BTreeMap<String, BTreeMap<u32, Version<'a>>> = BTreeMap::new();
    for release in releases {
        let Some(model) = &release.model else {
            continue;
        };
        models
            .entry(model.name.clone())
            .or_default()
            .entry(model.version)
            .or_insert_with(|| Version {
                version: model.version,
                run: release.run,
                releases: Vec::new(),
            })
            .releases
            .push(release);
    }
    for versions in models.values_mut() {
        for version in versions.values_mut() {
            version.releases.sort_by_key(|release| release.id);
        }
    }
    models
}

/// The version a release of `model` made by `run` is: the one that run
/// already released, else the next number.
pub(crate) fn version_for<'a>(
    releases: impl IntoIterator<Item = &'a ReleaseRecord>,
    model: &str,
    run: RunId,
) -> ModelVersion {
    let mut highest = 0;
    for release in releases {
        let Some(version) = release.model.as_ref().filter(|m| m.name == model) else {
            continue;
        };
        if release.run == run && release.promotion.is_none() {
            return version.clone();
        }
        highest = highest.max(version.version);
    }
    ModelVersion {
        name: model.to_owned(),
        version: highest + 1,
    }
}

/// The aliases of one model: each environment a version of it is live in
/// (the newest such release wins if two pipelines share the name), then
/// the user-set ones.
pub(crate) fn aliases(
    versions: &BTreeMap<u32, Version<'_>>,
    model: &str,
    stored: &[ModelAliasRecord],
) -> BTreeMap<String, u32> {
    let mut live: Vec<&ReleaseRecord> = versions
        .values()
        .flat_map(|version| version.releases.iter().copied())
        .filter(|release| release.state == ReleaseState::Live)
        .collect();
    live.sort_by_key(|release| release.created_ms);
    let mut aliases: BTreeMap<String, u32> = live
        .into_iter()
        .filter_map(|release| {
            let version = release.model.as_ref()?.version;
            Some((release.environment.name.clone(), version))
        })
        .collect();
    for alias in stored.iter().filter(|alias| alias.model == model) {
        aliases.entry(alias.alias.clone()).or_insert(alias.version);
    }
    aliases
}

/// `NAME`, `NAME@N` or `NAME@ALIAS` as (name, what follows the `@`).
pub(crate) fn split_ref(reference: &str) -> Result<(&str, Option<&str>), ApiError> {
    let (name, at) = match reference.split_once('@') {
        Some((name, at)) => (name, Some(at)),
        None => (reference, None),
    };
    if name.is_empty() || at == Some("") {
        return Err(ApiError::InvalidArgument(format!(
            "`{reference}` is not a model version; write NAME, NAME@N or NAME@ALIAS (e.g. churn@3, churn@production)"
        )));
    }
    Ok((name, at))
}

/// The version `reference` names among `models`: `NAME` alone is the
/// newest.
pub(crate) fn resolve<'m, 'a>(
    models: &'m BTreeMap<String, BTreeMap<u32, Version<'a>>>,
    stored: &[ModelAliasRecord],
    reference: &str,
) -> Result<&'m Version<'a>, ApiError> {
    let (name, at) = split_ref(reference)?;
    let versions = models.get(name).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no model `{name}` has been released; `kiln model ls` lists the models"
        ))
    })?;
    let number = match at {
        None => *versions.keys().next_back().expect("a model has a version"),
        Some(at) => match at.parse::<u32>() {
            Ok(number) => number,
            Err(_) => *aliases(versions, name, stored).get(at).ok_or_else(|| {
                ApiError::NotFound(format!(
                    "model `{name}` has no alias `{at}`; `kiln model show {name}` lists its aliases"
                ))
            })?,
        },
    };
    versions.get(&number).ok_or_else(|| {
        ApiError::NotFound(format!(
            "model `{name}` has no version {number} (it has 1 to {})",
            versions.keys().next_back().copied().unwrap_or(0)
        ))
    })
}

/// A run's metrics as its stages recorded them, later stages winning on
/// a name clash; the stages a best-of gate did not pick do not count.
pub(crate) fn run_metrics(stages: &[StageRecord]) -> BTreeMap<String, Option<f64>> {
    let losers: Vec<&str> = stages
        .iter()
        .filter_map(|stage| stage.gate.as_ref()?.selection.as_ref())
        .flat_map(|selection| selection.losers())
        .collect();
    let mut metrics = BTreeMap::new();
    for stage in stages {
        if !losers.contains(&stage.name.as_str()) {
            metrics.extend(stage.metrics.clone());
        }
    }
    metrics
}

/// Why `alias` cannot be set by hand on `model`, if it cannot.
pub(crate) fn check_alias(
    versions: &BTreeMap<u32, Version<'_>>,
    alias: &str,
) -> Result<(), ApiError> {
    let valid = alias.len() <= 64
        && alias.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && alias
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_'));
    if !valid {
        return Err(ApiError::InvalidArgument(format!(
            "bad alias `{alias}`; use lowercase letters, digits, `-` and `_`, starting with a \
             letter (a number would read as a version)"
        )));
    }
    let environment = versions
        .values()
        .flat_map(|version| &version.releases)
        .any(|release| release.environment.name == alias);
    if environment {
        return Err(ApiError::InvalidArgument(format!(
            "`{alias}` is an environment this model is released to; that alias follows the \
             environment's live release and cannot be set by hand"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kiln_common::ids::EnvKey;

    use super::*;

    fn release(id: u64, run: u64, env: &str, model: Option<(&str, u32)>) -> ReleaseRecord {
        ReleaseRecord {
            commit: "c".repeat(40),
            created_ms: id,
            state: ReleaseState::Superseded,
            model: model.map(|(name, version)| ModelVersion {
                name: name.into(),
                version,
            }),
            ..ReleaseRecord::for_test(id, EnvKey::of_pipeline("churn", env), run)
        }
    }

    #[test]
    fn a_run_is_one_version_and_the_next_run_the_next() {
        let releases = vec![
            release(1, 1, "staging", Some(("churn", 1))),
            release(2, 1, "production", Some(("churn", 1))),
            release(3, 2, "staging", Some(("other", 1))),
        ];
        assert_eq!(version_for(&releases, "churn", RunId(1)).version, 1);
        assert_eq!(version_for(&releases, "churn", RunId(5)).version, 2);
        assert_eq!(version_for(&releases, "new", RunId(5)).version, 1);
        let models = versions(&releases);
        assert_eq!(models["churn"][&1].releases.len(), 2);
        assert_eq!(models["churn"][&1].run, RunId(1));
    }

    #[test]
    fn environment_aliases_follow_the_live_releases() {
        let mut releases = vec![
            release(1, 1, "production", Some(("churn", 1))),
            release(2, 2, "staging", Some(("churn", 2))),
            release(3, 2, "production", Some(("churn", 2))),
        ];
        releases[1].state = ReleaseState::Live;
        releases[2].state = ReleaseState::Live;
        let stored = vec![ModelAliasRecord {
            model: "churn".into(),
            alias: "champion".into(),
            version: 1,
            set_by: "ada".into(),
            set_ms: 0,
        }];
        let models = versions(&releases);
        let aliases = aliases(&models["churn"], "churn", &stored);
        assert_eq!(
            aliases,
            BTreeMap::from([
                ("champion".to_owned(), 1),
                ("production".to_owned(), 2),
                ("staging".to_owned(), 2)
            ])
        );
        // A rollback: release 1 is live in production again.
        releases[2].state = ReleaseState::RolledBack;
        releases[0].state = ReleaseState::Live;
        let models = versions(&releases);
        assert_eq!(
            aliases_of(&models, &stored)["production"],
            1,
            "the alias moved back with the rollback"
        );
        assert_eq!(resolve(&models, &stored, "churn").unwrap().version, 2);
        assert_eq!(resolve(&models, &stored, "churn@1").unwrap().version, 1);
        assert_eq!(
            resolve(&models, &stored, "churn@champion").unwrap().version,
            1
        );
        for (bad, why) in [
            ("churn@9", "has no version 9 (it has 1 to 2)"),
            ("churn@nope", "has no alias `nope`"),
            ("juice", "no model `juice`"),
            ("churn@", "is not a model version"),
        ] {
            let error = resolve(&models, &stored, bad).unwrap_err().to_string();
            assert!(error.contains(why), "{bad}: {error}");
        }
        assert!(check_alias(&models["churn"], "challenger").is_ok());
        assert!(check_alias(&models["churn"], "production").is_err());
        assert!(check_alias(&models["churn"], "3").is_err());
        assert!(check_alias(&models["churn"], "Champion").is_err());
    }

    fn aliases_of(
        models: &BTreeMap<String, BTreeMap<u32, Version<'_>>>,
        stored: &[ModelAliasRecord],
    ) -> BTreeMap<String, u32> {
        aliases(&models["churn"], "churn", stored)
    }
}
