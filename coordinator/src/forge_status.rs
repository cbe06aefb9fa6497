//! Commit status: a run's state reported back on its commit in the forge
//! (Gitea/Forgejo, GitHub, GitLab), with a link to the run's page.
//!
//! The engine never waits on a forge. When it writes a run of a pipeline
//! whose repository has a status target (`kiln repo add --status ...`), the
//! same batch writes a [`CommitStatusRecord`] under its commit and context
//! (`S` records: one per commit and pipeline, a newer state overwriting an
//! older one not sent yet, so reports coalesce). The reporter task reads
//! the queue from the store, posts each report with backon's exponential
//! backoff, and removes it through the commit thread only if it is still
//! the one it posted. A report survives a restart; one whose forge keeps
//! failing is tried again in later rounds, [`ROUND_RETRY`] after the first
//! failed round and twice as long after each further one, up to
//! [`MAX_ROUND_RETRY`]. `kiln_commit_status_rounds_total{forge,outcome}`
//! counts the rounds and `kiln_commit_status_queued` the waiting reports,
//! so a forge that keeps refusing shows on `/metrics`.
//!
//! The token comes from Kiln's secret store (`--status-token-secret`), is
//! opened on the blocking pool for each round and never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::commit;
use crate::metrics::Metrics;
use crate::secrets::Secrets;
use crate::store::{Batch, Op, RunRecord, RunState, Store};

/// How often the queue is looked at.
const POLL: Duration = Duration::from_millis(500);
/// A report that failed every attempt of a round waits this long before
/// its next round, doubled after each further failed round...
const ROUND_RETRY: Duration = Duration::from_secs(10);
/// ...up to this.
const MAX_ROUND_RETRY: Duration = Duration::from_secs(600);
/// Attempts per report per round.
const ATTEMPTS: usize = 5;
/// One request's limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Which API a repository's statuses go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Forge {
    Gitea,
    Github,
    Gitlab,
}

impl Forge {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "gitea" | "forgejo" => Some(Self::Gitea),
            "github" => Some(Self::Github),
            "gitlab" => Some(Self::Gitlab),
            _ => None,
        }
    }

    /// The label value in metrics.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Gitea => "gitea",
            Self::Github => "github",
            Self::Gitlab => "gitlab",
        }
    }
}

/// Where a repository's commit statuses go, stored with its pipelines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatusTarget {
    pub(crate) forge: Forge,
    /// The API's base: `https://gitea.example` (Gitea/Forgejo and GitLab,
    /// whose `/api/v1` and `/api/v4` Kiln adds), `https://api.github.com`
    /// (GitHub; a GitHub Enterprise server's `https://host/api/v3`).
    pub(crate) url: String,
    /// `owner/repo` (GitHub, Gitea), or GitLab's project id or
    /// `group/project` path.
    pub(crate) project: String,
    /// The kiln secret holding the API token.
    pub(crate) token_secret: String,
}

/// The status target an `AddRepository` request asks for, checked.
pub(crate) fn target_of(
    request: &kiln_proto::v1::AddRepositoryRequest,
) -> Result<Option<Box<StatusTarget>>, crate::error::ApiError> {
    use crate::error::ApiError::InvalidArgument;
    let forge = request.status_forge.trim();
    if forge.is_empty() {
        return Ok(None);
    }
    let forge = Forge::parse(forge).ok_or_else(|| {
        InvalidArgument(format!(
            "--status `{forge}` is no forge Kiln reports to; use gitea, forgejo, github or gitlab"
        ))
    })?;
    let url = request.status_url.trim();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(InvalidArgument(format!(
            "--status-url `{url}` must be the forge API's http(s) base URL (https://api.github.com, https://gitea.example)"
        )));
    }
    let project = request.status_project.trim().trim_matches('/');
    if project.is_empty() || project.contains(char::is_whitespace) {
        return Err(InvalidArgument(
            "--status-project must name the repository: owner/repo (GitHub, Gitea) or a GitLab project id or group/project".to_owned(),
        ));
    }
    let token_secret = request.status_token_secret.trim();
    if !kiln_common::spec::is_secret_name(token_secret) {
        return Err(InvalidArgument(format!(
            "--status-token-secret `{token_secret}` must be a kiln secret's name (like FORGE_TOKEN) holding the API token"
        )));
    }
    Ok(Some(Box::new(StatusTarget {
        forge,
        url: url.to_owned(),
        project: project.to_owned(),
        token_secret: token_secret.to_owned(),
    })))
}

/// One queued report: the latest state of one commit and context.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CommitStatusRecord {
    pub(crate) target: StatusTarget,
    pub(crate) commit: String,
    /// `kiln/<pipeline>`: one status per pipeline on a commit.
    pub(crate) context: String,
    pub(crate) run: u64,
    pub(crate) state: RunState,
}

impl CommitStatusRecord {
    /// The report a write of `run` queues, when its pipeline has a status
    /// target and the run has a commit.
    pub(crate) fn of(run: &RunRecord, target: Option<&StatusTarget>) -> Option<Self> {
        let target = target?;
        if run.commit.is_empty() {
            return None;
        }
        Some(Self {
            target: target.clone(),
            commit: run.commit.clone(),
            context: format!("kiln/{}", run.pipeline),
            run: run.id.0,
            state: run.state,
        })
    }

    /// Its key in the queue: the forge, project, commit and context.
    pub(crate) fn key(&self) -> String {
        format!(
            "{:?}\0{}\0{}\0{}\0{}",
            self.target.forge, self.target.url, self.target.project, self.commit, self.context
        )
    }
}

/// One request as the forge's documented API wants it.
#[derive(Debug, PartialEq)]
pub(crate) struct StatusRequest {
    pub(crate) url: String,
    /// Besides `Content-Type: application/json`.
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: serde_json::Value,
}

/// The request reporting `record`, linking to `run_url`.
///
/// - Gitea/Forgejo: `POST /api/v1/repos/{owner}/{repo}/statuses/{sha}`,
///   `Authorization: token T`, body `state` (pending, success, error,
///   failure, warning), `target_url`, `description`, `context`.
/// - GitHub: `POST /repos/{owner}/{repo}/statuses/{sha}`, `Authorization:
///   Bearer T`, `Accept: application/vnd.github+json`,
///   `X-GitHub-Api-Version: 2022-11-28`, body `state` (error, failure,
///   pending, success), `target_url`, `description`, `context`.
/// - GitLab: `POST /api/v4/projects/{id}/statuses/{sha}` (a path id
///   URL-encoded), `PRIVATE-TOKEN: T`, body `state` (pending, running,
///   success, failed, canceled), `target_url`, `description`, `name`.
pub(crate) fn request(record: &CommitStatusRecord, token: &str, run_url: &str) -> StatusRequest {
    let base = record.target.url.trim_end_matches('/');
    let project = &record.target.project;
    let sha = &record.commit;
    let description = description(record.state, record.run);
    match record.target.forge {
        Forge::Gitea | Forge::Github => {
            let state = match record.state {
                RunState::Queued | RunState::Running => "pending",
                RunState::Succeeded => "success",
                RunState::Failed => "failure",
                RunState::Cancelled => "error",
            };
            let body = serde_json::json!({
                "state": state,
                "target_url": run_url,
                "description": description,
                "context": record.context,
            });
            if record.target.forge == Forge::Gitea {
                StatusRequest {
                    url: format!("{base}/api/v1/repos/{project}/statuses/{sha}"),
                    headers: vec![("authorization", format!("token {token}"))],
                    body,
                }
            } else {
                StatusRequest {
                    url: format!("{base}/repos/{project}/statuses/{sha}"),
                    headers: vec![
                        ("authorization", format!("Bearer {token}")),
                        ("accept", "application/vnd.github+json".to_owned()),
                        ("x-github-api-version", "2022-11-28".to_owned()),
                    ],
                    body,
                }
            }
        }
        Forge::Gitlab => {
            let state = match record.state {
                RunState::Queued => "pending",
                RunState::Running => "running",
                RunState::Succeeded => "success",
                RunState::Failed => "failed",
                RunState::Cancelled => "canceled",
            };
            let id = project.replace('/', "%2F");
            StatusRequest {
                url: format!("{base}/api/v4/projects/{id}/statuses/{sha}"),
                headers: vec![("private-token", token.to_owned())],
                body: serde_json::json!({
                    "state": state,
                    "target_url": run_url,
                    "description": description,
                    "name": record.context,
                }),
            }
        }
    }
}

fn description(state: RunState, run: u64) -> String {
    let what = match state {
        RunState::Queued => "queued",
        RunState::Running => "running",
        RunState::Succeeded => "succeeded",
        RunState::Failed => "failed",
        RunState::Cancelled => "cancelled",
    };
    format!("kiln run {run} {what}")
}

/// What the reporter needs.
pub(crate) struct Reporter {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) writer: commit::Writer,
    pub(crate) secrets: Arc<Secrets>,
    pub(crate) http: reqwest::Client,
    /// The dashboard's root (`http://127.0.0.1:7701`); a run's link is
    /// `{dashboard}/runs/{id}`.
    pub(crate) dashboard: String,
    pub(crate) metrics: Arc<Metrics>,
}

/// How long a report waits after `failed` rounds in a row failed.
fn round_delay(failed: u32) -> Duration {
    let doubled = ROUND_RETRY.saturating_mul(1 << failed.saturating_sub(1).min(16));
    doubled.min(MAX_ROUND_RETRY)
}

/// Posts queued reports until `stop`.
pub(crate) async fn run_reporter(reporter: Reporter, mut stop: watch::Receiver<bool>) {
    let reporter = Arc::new(reporter);
    // A report whose last round failed: how many rounds in a row failed,
    // and when it may be tried again.
    let mut failing: HashMap<String, (u32, tokio::time::Instant)> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(POLL) => {}
        }
        let store = reporter.store.clone();
        let queued = match tokio::task::spawn_blocking(move || store.commit_statuses()).await {
            Ok(Ok(queued)) => queued,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot read the commit status queue");
                continue;
            }
            Err(_) => continue,
        };
        reporter.metrics.set_commit_statuses_queued(queued.len());
        let keys: std::collections::HashSet<String> = queued.iter().map(|r| r.key()).collect();
        failing.retain(|key, _| keys.contains(key));
        let now = tokio::time::Instant::now();
        for record in queued {
            let key = record.key();
            if failing.get(&key).is_some_and(|(_, until)| *until > now) {
                continue;
            }
            let sent = tokio::select! {
                _ = stop.changed() => return,
                sent = reporter.send(&record) => sent,
            };
            let forge = record.target.forge.name();
            reporter.metrics.commit_status_round(forge, sent.is_ok());
            match sent {
                Ok(()) => {
                    failing.remove(&key);
                    if let Err(error) = reporter
                        .writer
                        .write(Batch {
                            ops: vec![Op::RemoveCommitStatus(record)],
                        })
                        .await
                    {
                        tracing::warn!(%error, "cannot dequeue a sent commit status");
                    }
                }
                Err(error) => {
                    let rounds = failing.get(&key).map_or(1, |(rounds, _)| rounds + 1);
                    let delay = round_delay(rounds);
                    tracing::warn!(commit = %record.commit, context = %record.context, %error, rounds, retry_in = ?delay, "commit status not accepted; retried later");
                    failing.insert(key, (rounds, now + delay));
                }
            }
        }
    }
}

impl Reporter {
    async fn send(&self, record: &CommitStatusRecord) -> Result<(), String> {
        let token = self.token(&record.target.token_secret).await?;
        let run_url = format!(
            "{}/runs/{}",
            self.dashboard.trim_end_matches('/'),
            record.run
        );
        let request = request(record, &token, &run_url);
        let attempt = || async {
            let mut post = self
                .http
                .post(&request.url)
                .timeout(REQUEST_TIMEOUT)
                .json(&request.body);
            for (name, value) in &request.headers {
                post = post.header(*name, value);
            }
            let response = post.send().await.map_err(|error| error.to_string())?;
            let status = response.status();
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("{} answered {status}", request.url))
            }
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(ATTEMPTS - 1),
            )
            .sleep(tokio::time::sleep)
            .await
    }

    async fn token(&self, name: &str) -> Result<String, String> {
        let secrets = self.secrets.clone();
        let name = name.to_owned();
        let mut values = tokio::task::spawn_blocking(move || secrets.reveal([&name]))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| format!("cannot open the status token secret: {error}"))?;
        values
            .pop_first()
            .map(|(_, value)| value)
            .ok_or_else(|| "the status token secret is not set".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(forge: Forge, state: RunState, project: &str) -> CommitStatusRecord {
        CommitStatusRecord {
            target: StatusTarget {
                forge,
                url: "https://forge.example/".into(),
                project: project.into(),
                token_secret: "FORGE_TOKEN".into(),
            },
            commit: "a".repeat(40),
            context: "kiln/train".into(),
            run: 7,
            state,
        }
    }

    #[test]
    fn a_failing_report_waits_twice_as_long_each_round_up_to_ten_minutes() {
        let waits: Vec<u64> = (1..=8).map(|n| round_delay(n).as_secs()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 600, 600]);
        assert_eq!(round_delay(u32::MAX), MAX_ROUND_RETRY);
    }

    #[test]
    fn each_forge_gets_its_own_path_headers_and_state_names() {
        let sha = "a".repeat(40);
        let gitea = request(
            &record(Forge::Gitea, RunState::Cancelled, "team/models"),
            "t",
            "u",
        );
        assert_eq!(
            gitea.url,
            format!("https://forge.example/api/v1/repos/team/models/statuses/{sha}")
        );
        assert_eq!(gitea.headers, [("authorization", "token t".to_owned())]);
        assert_eq!(gitea.body["state"], "error");
        assert_eq!(gitea.body["context"], "kiln/train");
        let github = request(
            &record(Forge::Github, RunState::Running, "team/models"),
            "t",
            "u",
        );
        assert_eq!(
            github.url,
            format!("https://forge.example/repos/team/models/statuses/{sha}")
        );
        assert_eq!(github.headers[0], ("authorization", "Bearer t".to_owned()));
        assert_eq!(github.body["state"], "pending");
        let gitlab = request(
            &record(Forge::Gitlab, RunState::Failed, "group/sub/models"),
            "t",
            "u",
        );
        assert_eq!(
            gitlab.url,
            format!("https://forge.example/api/v4/projects/group%2Fsub%2Fmodels/statuses/{sha}")
        );
        assert_eq!(gitlab.headers, [("private-token", "t".to_owned())]);
        assert_eq!(gitlab.body["state"], "failed");
        assert_eq!(gitlab.body["name"], "kiln/train");
        assert_eq!(gitlab.body["target_url"], "u");
    }
}
