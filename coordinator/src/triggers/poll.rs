//! Polling a repository for a forge without webhooks (`kiln repo add
//! --poll 1m`): `git ls-remote` lists its branches and tags, and every
//! branch or tag whose commit changed since the last poll starts a run
//! when the pipeline's `on: push` / `on: tag` filters accept it, as a
//! webhook delivery would.
//!
//! A run started by a poll carries the same idempotency key as a webhook
//! delivery of that event, ref and commit (`webhook::commit_key`), so
//! the two never start two runs for one commit. The refs last seen are
//! written to the pipeline's trigger state after each poll that changed
//! them; the first poll of a pipeline only records them (it starts
//! nothing for what was pushed before polling began). A run whose start
//! failed keeps its ref's old commit, so the next poll tries again; a
//! crash between a run and the state is covered by the idempotency key.

use std::collections::BTreeMap;

use kiln_common::spec::Triggers;
use kiln_common::triggers::webhook::branch_matches;

use super::{Starter, TriggeredRun, webhook};
use crate::error::ApiError;
use crate::store::{PipelineRecord, TriggerStateRecord};

/// One poll. Returns the trigger state to keep (and write) when the refs
/// it records changed.
pub(super) async fn poll_refs(
    starter: &Starter,
    pipeline: &PipelineRecord,
    triggers: &Triggers,
    state: &TriggerStateRecord,
) -> Option<TriggerStateRecord> {
    let listed = match starter.repos.remote_refs(&pipeline.repo).await {
        Ok(listed) => listed,
        Err(error) => {
            tracing::warn!(pipeline = %pipeline.name, %error, "cannot poll the repository");
            return None;
        }
    };
    let Some(seen) = &state.refs else {
        tracing::info!(pipeline = %pipeline.name, refs = listed.len(), "first poll: recording the repository's refs");
        return Some(TriggerStateRecord {
            refs: Some(listed),
            ..state.clone()
        });
    };
    let mut kept = seen.clone();
    // Refs that went away are forgotten, so a branch created again builds.
    kept.retain(|name, _| listed.contains_key(name));
    for (name, commit) in &listed {
        if seen.get(name) == Some(commit) {
            continue;
        }
        let started = match wanted(triggers, pipeline, name, commit) {
            Some(run) => start(starter, pipeline, run, name, commit).await,
            None => true,
        };
        if started {
            kept.insert(name.clone(), commit.clone());
        }
    }
    (Some(&kept) != state.refs.as_ref()).then(|| TriggerStateRecord {
        refs: Some(kept),
        ..state.clone()
    })
}

/// Whether a run for `commit` exists now (started, or started before by a
/// webhook delivery or an earlier poll).
async fn start(
    starter: &Starter,
    pipeline: &PipelineRecord,
    run: TriggeredRun,
    name: &str,
    commit: &str,
) -> bool {
    match starter.start(run).await {
        Ok(run) => {
            tracing::info!(pipeline = %pipeline.name, run = run.id, git_ref = name, commit, "a polled ref started a run");
            true
        }
        Err(ApiError::AlreadyExists(_)) => true,
        Err(error) => {
            tracing::warn!(pipeline = %pipeline.name, git_ref = name, %error, "a polled ref's run could not start");
            false
        }
    }
}

/// The run a moved ref asks for under the pipeline's triggers, if any.
fn wanted(
    triggers: &Triggers,
    pipeline: &PipelineRecord,
    name: &str,
    commit: &str,
) -> Option<TriggeredRun> {
    if let Some(branch) = name.strip_prefix("refs/heads/") {
        let trigger = triggers.push.as_ref()?;
        if !trigger.accepts(branch, &pipeline.branch) {
            return None;
        }
        let mut run = TriggeredRun::new(
            pipeline.clone(),
            Some(commit.to_owned()),
            "push",
            format!("poll:{branch}"),
        );
        run.variables
            .insert("KILN_BRANCH".to_owned(), branch.to_owned());
        run.deliveries = vec![webhook::commit_key("push", branch, commit)];
        return Some(run);
    }
    let tag = name.strip_prefix("refs/tags/")?;
    let patterns = triggers.tag.as_ref()?;
    if !patterns.iter().any(|pattern| branch_matches(pattern, tag)) {
        return None;
    }
    let mut run = TriggeredRun::new(
        pipeline.clone(),
        Some(commit.to_owned()),
        "tag",
        format!("poll:{tag}"),
    );
    run.variables.insert("KILN_TAG".to_owned(), tag.to_owned());
    run.deliveries = vec![webhook::commit_key("tag", name, commit)];
    Some(run)
}

/// `git ls-remote --heads --tags` output as ref → commit; an annotated
/// tag's peeled commit (`^{}`) replaces the tag object.
pub(crate) fn parse_ls_remote(output: &str) -> BTreeMap<String, String> {
    let mut refs = BTreeMap::new();
    for line in output.lines() {
        let Some((commit, name)) = line.split_once('\t') else {
            continue;
        };
        if commit.len() != 40 || !commit.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let name = name.strip_suffix("^{}").unwrap_or(name);
        refs.insert(name.to_owned(), commit.to_owned());
    }
    refs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_annotated_tag_is_its_commit() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let c = "c".repeat(40);
        let output =
            format!("{a}\trefs/heads/main\n{b}\trefs/tags/v1\n{c}\trefs/tags/v1^{{}}\nnoise\n");
        let refs = parse_ls_remote(&output);
        assert_eq!(refs.len(), 2);
        assert_eq!(refs["refs/heads/main"], a);
        assert_eq!(refs["refs/tags/v1"], c);
    }
}
