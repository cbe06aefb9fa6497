//! Identifiers as newtypes, so a run id is never mistaken for a stage index.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A run, numbered from 1 in the order runs were triggered.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct RunId(pub u64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One stage of one run: the stage's index in its pipeline's stage list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StageKey {
    pub run: RunId,
    pub idx: u32,
}

impl fmt::Display for StageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.run, self.idx)
    }
}

/// One attempt of one stage: the fencing token an assignment carries.
/// The coordinator accepts a message about a stage only from the agent
/// holding this exact attempt; the agent keys its work and its outbox by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttemptKey {
    pub stage: StageKey,
    pub attempt: u32,
}

impl AttemptKey {
    pub fn new(run: u64, idx: u32, attempt: u32) -> Self {
        Self {
            stage: StageKey {
                run: RunId(run),
                idx,
            },
            attempt,
        }
    }

    /// `<run>-<stage_idx>-<attempt>`: names the attempt's workspace.
    pub fn dir_name(self) -> String {
        format!("{}-{}-{}", self.stage.run.0, self.stage.idx, self.attempt)
    }
}

impl fmt::Display for AttemptKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run {} stage {} attempt {}",
            self.stage.run.0, self.stage.idx, self.attempt
        )
    }
}

/// What an environment belongs to. Today that is always a pipeline; a model
/// registry may later scope environments by model name instead, as another
/// variant, without touching the places that only pass keys around.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvScope {
    Pipeline(String),
}

impl EnvScope {
    /// The name of the pipeline (or, later, model) the scope is.
    pub fn name(&self) -> &str {
        match self {
            Self::Pipeline(name) => name,
        }
    }
}

/// An environment: `credit/production` is the `production` of pipeline
/// `credit`, and shares nothing (champion, history, freeze, monitor,
/// rollback) with `churn/production`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EnvKey {
    pub scope: EnvScope,
    /// The name stages use: `environment: production`.
    pub name: String,
}

impl EnvKey {
    /// The environment `name` of `pipeline`.
    pub fn of_pipeline(pipeline: &str, name: &str) -> Self {
        Self {
            scope: EnvScope::Pipeline(pipeline.to_owned()),
            name: name.to_owned(),
        }
    }

    /// The pipeline the environment belongs to.
    pub fn pipeline(&self) -> &str {
        self.scope.name()
    }

    /// Splits what a person typed: `PIPELINE/ENV`, or `ENV` alone (the
    /// scope is then `None` and must be looked up).
    pub fn parse_reference(text: &str) -> (Option<&str>, &str) {
        match text.split_once('/') {
            Some((scope, name)) => (Some(scope), name),
            None => (None, text),
        }
    }
}

impl fmt::Display for EnvKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.scope.name(), self.name)
    }
}
