//! What a forge's webhook delivery asks for: a branch push, a tag push or
//! a merge (pull) request opened or updated, from GitHub, Gitea/Forgejo
//! or GitLab. Call [`read`] only after [`super::webhook::verify_signature`]
//! accepted the same bytes.
//!
//! Only the fields a run needs are required (the ref, the commit, the
//! request's number and branches); who pushed and the repository's names
//! are read when present.
//!
//! - GitHub: `X-GitHub-Event: push | pull_request | ping`,
//!   `X-GitHub-Delivery`; a tag push is a `push` whose ref is `refs/tags/…`.
//! - Gitea/Forgejo: `X-Gitea-Event` / `X-Forgejo-Event` (`push`,
//!   `pull_request`), `X-Gitea-Delivery` / `X-Forgejo-Delivery`; payloads
//!   shaped like GitHub's.
//! - GitLab: `X-Gitlab-Event: Push Hook | Tag Push Hook | Merge Request
//!   Hook`, `X-Gitlab-Event-UUID`; the body's `object_kind` says which.

use serde_json::Value;

use super::webhook::{
    Ignored, Push, PushEvent, WebhookError, lookup_value, optional_string_at, parse_push,
    pusher_of, string_at,
};

/// One delivery: its id (for idempotency) and what it asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The forge's delivery id (`X-GitHub-Delivery`, `X-Gitea-Delivery`,
    /// `X-Forgejo-Delivery`, `X-Gitlab-Event-UUID`), if it sent one.
    pub id: Option<String>,
    pub event: ForgeEvent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForgeEvent {
    Push(Push),
    Tag(TagPush),
    MergeRequest(MergeRequest),
    /// GitHub's `ping` when a webhook is created.
    Ping,
    /// Nothing to build; the reason is for the answer and the log.
    Ignored(String),
}

impl ForgeEvent {
    /// `KILN_EVENT` of the run it starts.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Push(_) => "push",
            Self::Tag(_) => "tag",
            Self::MergeRequest(_) => "merge_request",
            Self::Ping => "ping",
            Self::Ignored(_) => "ignored",
        }
    }
}

/// A tag pushed to a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagPush {
    /// `v1.2` for `refs/tags/v1.2`.
    pub tag: String,
    /// The tagged commit (or the tag object, which resolves to it).
    pub commit: String,
    pub pusher: String,
}

/// A merge (pull) request opened, reopened or updated with new commits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeRequest {
    /// GitHub's and Gitea's `number`, GitLab's `iid`: `KILN_MR_ID`.
    pub id: u64,
    /// The head of the request's source branch.
    pub commit: String,
    pub source_branch: String,
    /// The branch it would merge into (what `merge_request.branches`
    /// filters on).
    pub target_branch: String,
    pub author: String,
}

/// Reads a delivery; `header` looks headers up by name (any case).
pub fn read<'h>(
    header: impl Fn(&str) -> Option<&'h str>,
    body: &[u8],
) -> Result<Delivery, WebhookError> {
    let id = [
        "X-GitHub-Delivery",
        "X-Gitea-Delivery",
        "X-Forgejo-Delivery",
        "X-Gitlab-Event-UUID",
    ]
    .into_iter()
    .find_map(&header)
    .map(|id| id.trim().to_owned())
    .filter(|id| !id.is_empty());
    let event = if header("X-Gitlab-Event").is_some() {
        gitlab(&json(body)?)?
    } else {
        let name = ["X-GitHub-Event", "X-Gitea-Event", "X-Forgejo-Event"]
            .into_iter()
            .find_map(&header)
            .unwrap_or("push");
        match name {
            "ping" => ForgeEvent::Ping,
            "push" => push(body)?,
            "pull_request" => pull_request(&json(body)?)?,
            other => ForgeEvent::Ignored(format!("`{other}` events start no runs")),
        }
    };
    Ok(Delivery { id, event })
}

fn json(body: &[u8]) -> Result<Value, WebhookError> {
    serde_json::from_slice(body).map_err(|error| WebhookError::MalformedPayload {
        path: String::new(),
        reason: format!("not JSON ({error})"),
    })
}

/// A GitHub or Gitea/Forgejo `push`: to a branch, or of a tag.
fn push(body: &[u8]) -> Result<ForgeEvent, WebhookError> {
    Ok(match parse_push(body)? {
        PushEvent::Branch(push) => ForgeEvent::Push(push),
        PushEvent::Ignored(Ignored::Tag(tag)) => {
            let document = json(body)?;
            match commit_at(&document, &["after"])? {
                Some(commit) => ForgeEvent::Tag(TagPush {
                    tag,
                    commit,
                    pusher: pusher_of(&document),
                }),
                None => ForgeEvent::Ignored(format!("tag `{tag}` was deleted")),
            }
        }
        PushEvent::Ignored(other) => ForgeEvent::Ignored(other.to_string()),
    })
}

/// A GitHub or Gitea/Forgejo `pull_request`.
fn pull_request(document: &Value) -> Result<ForgeEvent, WebhookError> {
    let action = string_at(document, &["action"])?;
    // Gitea says `synchronized`, GitHub `synchronize`.
    if !matches!(
        action,
        "opened" | "reopened" | "synchronize" | "synchronized"
    ) {
        return Ok(ForgeEvent::Ignored(format!(
            "pull request action `{action}` starts no run (opened, reopened and new commits do)"
        )));
    }
    let id = number_at(document, &["number"])
        .or_else(|_| number_at(document, &["pull_request", "number"]))?;
    let commit = commit_at(document, &["pull_request", "head", "sha"])?
        .ok_or_else(|| malformed("pull_request.head.sha", "is all zeros"))?;
    Ok(ForgeEvent::MergeRequest(MergeRequest {
        id,
        commit,
        source_branch: string_at(document, &["pull_request", "head", "ref"])?.to_owned(),
        target_branch: string_at(document, &["pull_request", "base", "ref"])?.to_owned(),
        author: pusher_of(document),
    }))
}

/// A GitLab delivery, by its `object_kind`.
fn gitlab(document: &Value) -> Result<ForgeEvent, WebhookError> {
    let kind = string_at(document, &["object_kind"])?;
    match kind {
        "push" | "tag_push" => {
            let git_ref = string_at(document, &["ref"])?;
            // `checkout_sha` is the commit (for a tag too); `after` the
            // new ref value, all zeros for a deletion.
            let Some(after) = commit_at(document, &["after"])? else {
                return Ok(ForgeEvent::Ignored(format!("`{git_ref}` was deleted")));
            };
            let commit = commit_at(document, &["checkout_sha"])
                .ok()
                .flatten()
                .unwrap_or(after);
            let pusher = pusher_of(document);
            if let Some(branch) = git_ref.strip_prefix("refs/heads/") {
                return Ok(ForgeEvent::Push(Push {
                    branch: branch.to_owned(),
                    commit,
                    pusher,
                    repository: optional_string_at(document, &["project", "path_with_namespace"])?,
                    clone_url: optional_string_at(document, &["project", "git_http_url"])?,
                }));
            }
            if let Some(tag) = git_ref.strip_prefix("refs/tags/") {
                return Ok(ForgeEvent::Tag(TagPush {
                    tag: tag.to_owned(),
                    commit,
                    pusher,
                }));
            }
            Ok(ForgeEvent::Ignored(format!(
                "`{git_ref}` is not a branch or tag"
            )))
        }
        "merge_request" => {
            let attributes = ["object_attributes"];
            let at = |key: &'static str| [attributes[0], key];
            let action = optional_string_at(document, &at("action"))?;
            if !matches!(action.as_str(), "open" | "reopen" | "update") {
                return Ok(ForgeEvent::Ignored(format!(
                    "merge request action `{action}` starts no run (open, reopen and update do)"
                )));
            }
            let commit = commit_at(document, &["object_attributes", "last_commit", "id"])?
                .ok_or_else(|| malformed("object_attributes.last_commit.id", "is all zeros"))?;
            Ok(ForgeEvent::MergeRequest(MergeRequest {
                id: number_at(document, &at("iid"))?,
                commit,
                source_branch: string_at(document, &at("source_branch"))?.to_owned(),
                target_branch: string_at(document, &at("target_branch"))?.to_owned(),
                author: pusher_of(document),
            }))
        }
        other => Ok(ForgeEvent::Ignored(format!(
            "GitLab `{other}` events start no runs"
        ))),
    }
}

/// A commit id at `path`, lowercase; `None` when all zeros (a deletion).
fn commit_at(document: &Value, path: &[&str]) -> Result<Option<String>, WebhookError> {
    let commit = string_at(document, path)?;
    let is_hex = commit.bytes().all(|b| b.is_ascii_hexdigit());
    if !(is_hex && matches!(commit.len(), 40 | 64)) {
        return Err(malformed(
            &path.join("."),
            &format!("`{commit}` is not a commit id (40 or 64 hex digits)"),
        ));
    }
    if commit.bytes().all(|b| b == b'0') {
        return Ok(None);
    }
    Ok(Some(commit.to_ascii_lowercase()))
}

fn number_at(document: &Value, path: &[&str]) -> Result<u64, WebhookError> {
    match lookup_value(document, path) {
        Some(value) => value
            .as_u64()
            .ok_or_else(|| malformed(&path.join("."), "must be a positive number")),
        None => Err(malformed(&path.join("."), "is missing")),
    }
}

fn malformed(path: &str, reason: &str) -> WebhookError {
    WebhookError::MalformedPayload {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests;
