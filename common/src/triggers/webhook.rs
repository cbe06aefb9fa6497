//! `push:` triggers: a git forge's push webhook, checked and read.
//!
//! The coordinator's HTTP endpoint hands over the raw body and a way to look
//! headers up; [`verify_signature`] checks it was signed with the pipeline's
//! secret, [`parse_push`] reads what was pushed, and [`branch_matches`]
//! applies the pipeline's `branches`. Only push events carry a `ref`: the
//! endpoint should answer other events (GitHub's `ping`, whose
//! `X-GitHub-Event` is not `push`) without calling [`parse_push`].
//!
//! # Branch patterns
//! A pattern is a branch name in which `*` stands for any run of
//! characters, `/` included: `release/*` matches `release/1.2` and
//! `release/1.2/hotfix`, and `*` alone matches every branch; `{a,b}`
//! matches either (`{main,develop}`). No other character is special.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// GitHub's header (Gitea and Forgejo send it too): `sha256=<hex>`.
pub const GITHUB_SIGNATURE_HEADER: &str = "X-Hub-Signature-256";
/// Gitea's header: the bare hex HMAC.
pub const GITEA_SIGNATURE_HEADER: &str = "X-Gitea-Signature";
/// Forgejo's own name for the same header as Gitea's.
pub const FORGEJO_SIGNATURE_HEADER: &str = "X-Forgejo-Signature";

/// Why a webhook request was refused. Messages are lowercase and say what
/// to fix; the coordinator answers 401 for the signature errors and 400 for
/// [`WebhookError::MalformedPayload`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error(
        "the request has no signature; configure the webhook with a secret so the forge sends \
         `X-Hub-Signature-256` or `X-Gitea-Signature`"
    )]
    MissingSignature,
    #[error("the `{header}` header is malformed: {reason}")]
    MalformedSignature {
        header: &'static str,
        reason: String,
    },
    #[error(
        "the `{header}` signature does not match the body; the webhook's secret must be the \
         value of the kiln secret named in `triggers.push.secret`"
    )]
    BadSignature { header: &'static str },
    /// `path` is where in the JSON the problem is, like `repository.full_name`
    /// (empty for the document as a whole).
    #[error("malformed push payload at `{path}`: {reason}")]
    MalformedPayload { path: String, reason: String },
}

/// Checks the body's HMAC-SHA256 under `secret` against every signature
/// header the request carries; at least one must be there and all present
/// must match (compared in constant time). `header` looks a header up by
/// name, ignoring case as HTTP does.
pub fn verify_signature<'h>(
    secret: &[u8],
    body: &[u8],
    header: impl Fn(&str) -> Option<&'h str>,
) -> Result<(), WebhookError> {
    let headers = [
        (GITHUB_SIGNATURE_HEADER, Some("sha256=")),
        (GITEA_SIGNATURE_HEADER, None),
        (FORGEJO_SIGNATURE_HEADER, None),
    ];
    let mut n_checked = 0;
    for (name, prefix) in headers {
        let Some(value) = header(name) else {
            continue;
        };
        let malformed = |reason: &str| WebhookError::MalformedSignature {
            header: name,
            reason: reason.to_owned(),
        };
        let hex_digest = match prefix {
            Some(prefix) => value
                .trim()
                .strip_prefix(prefix)
                .ok_or_else(|| malformed("it must start with `sha256=`"))?,
            None => value.trim(),
        };
        let signature =
            hex::decode(hex_digest).map_err(|_| malformed("the signature must be hexadecimal"))?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret).expect("hmac accepts keys of any length");
        mac.update(body);
        mac.verify_slice(&signature)
            .map_err(|_| WebhookError::BadSignature { header: name })?;
        n_checked += 1;
    }
    if n_checked == 0 {
        return Err(WebhookError::MissingSignature);
    }
    Ok(())
}

/// A push to a branch: what a run is started from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    /// `main` for `refs/heads/main`.
    pub branch: String,
    /// The commit the branch now points at (`after`), lowercase hex.
    pub commit: String,
    /// Who pushed: `pusher.name` (GitHub), else `pusher.username` or
    /// `pusher.login` (Gitea, Forgejo), else `sender.login`.
    pub pusher: String,
    /// `repository.full_name`, like `acme/models`.
    pub repository: String,
    /// `repository.clone_url`, which the coordinator may compare with the
    /// pipeline's registered repository.
    pub clone_url: String,
}

/// What a push webhook asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushEvent {
    /// A branch moved to a commit: start a run if its branch matches.
    Branch(Push),
    /// Nothing to build; the reason is for the endpoint's answer and log.
    Ignored(Ignored),
}

/// Pushes that never start a run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("`{0}` is a tag, and only branch pushes start runs")]
    Tag(String),
    #[error("branch `{0}` was deleted, so there is nothing to build")]
    BranchDeleted(String),
    #[error("`{0}` is not a branch")]
    OtherRef(String),
}

/// Reads a GitHub, Gitea or Forgejo push payload. Call it only after
/// [`verify_signature`] accepted the same bytes.
pub fn parse_push(body: &[u8]) -> Result<PushEvent, WebhookError> {
    let document: Value =
        serde_json::from_slice(body).map_err(|error| WebhookError::MalformedPayload {
            path: String::new(),
            reason: format!("not JSON ({error})"),
        })?;
    let git_ref = string_at(&document, &["ref"])?;
    let commit = string_at(&document, &["after"])?;
    let Some(branch) = git_ref.strip_prefix("refs/heads/") else {
        let ignored = match git_ref.strip_prefix("refs/tags/") {
            Some(tag) => Ignored::Tag(tag.to_owned()),
            None => Ignored::OtherRef(git_ref.to_owned()),
        };
        return Ok(PushEvent::Ignored(ignored));
    };
    let is_hex = commit.bytes().all(|b| b.is_ascii_hexdigit());
    if !(is_hex && matches!(commit.len(), 40 | 64)) {
        return Err(WebhookError::MalformedPayload {
            path: "after".to_owned(),
            reason: format!("`{commit}` is not a commit id (40 or 64 hex digits)"),
        });
    }
    if commit.bytes().all(|b| b == b'0') {
        return Ok(PushEvent::Ignored(Ignored::BranchDeleted(
            branch.to_owned(),
        )));
    }
    if branch.is_empty() {
        return Err(WebhookError::MalformedPayload {
            path: "ref".to_owned(),
            reason: "`refs/heads/` names no branch".to_owned(),
        });
    }
    let pusher = [
        &["pusher", "name"][..],
        &["pusher", "username"],
        &["pusher", "login"],
        &["sender", "login"],
    ]
    .iter()
    .find_map(|path| lookup(&document, path)?.as_str().filter(|s| !s.is_empty()))
    .ok_or_else(|| WebhookError::MalformedPayload {
        path: "pusher".to_owned(),
        reason: "no `pusher.name`, `pusher.username`, `pusher.login` or `sender.login`".to_owned(),
    })?;
    Ok(PushEvent::Branch(Push {
        branch: branch.to_owned(),
        commit: commit.to_ascii_lowercase(),
        pusher: pusher.to_owned(),
        repository: string_at(&document, &["repository", "full_name"])?.to_owned(),
        clone_url: string_at(&document, &["repository", "clone_url"])?.to_owned(),
    }))
}

/// Whether `branch` matches `pattern`, where `*` stands for any run of
/// characters (see the module's branch patterns). Matched by globset with
/// `/` not special and no escapes; [`check_branch_pattern`] refuses the
/// other glob characters (`?`, `[`), so `*` is the only one left. A
/// pattern globset cannot read matches nothing.
pub fn branch_matches(pattern: &str, branch: &str) -> bool {
    globset::GlobBuilder::new(pattern)
        .literal_separator(false)
        .backslash_escape(false)
        .empty_alternates(true)
        .build()
        .is_ok_and(|glob| glob.compile_matcher().is_match(branch))
}

/// Why a `branches` entry cannot be a branch pattern, if it cannot: the
/// characters git refuses in branch names (other than `*`), `..`, a leading
/// or trailing `/`, or a full ref (`refs/heads/main`) instead of a name.
pub fn check_branch_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("is empty".to_owned());
    }
    if pattern.starts_with("refs/") {
        return Err("is a full ref; write the branch name, like `main`".to_owned());
    }
    if let Some(c) = pattern
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "~^:?[\\".contains(*c))
    {
        return Err(format!(
            "contains `{}`, which git refuses in branch names",
            c.escape_default()
        ));
    }
    if pattern.contains("..") || pattern.starts_with('/') || pattern.ends_with('/') {
        return Err("is not a valid branch name (`..`, or a leading or trailing `/`)".to_owned());
    }
    Ok(())
}

fn lookup<'v>(document: &'v Value, path: &[&str]) -> Option<&'v Value> {
    path.iter().try_fold(document, |value, key| value.get(key))
}

/// The string at `path`, or an error naming the path.
fn string_at<'v>(document: &'v Value, path: &[&str]) -> Result<&'v str, WebhookError> {
    let error = |reason: &str| WebhookError::MalformedPayload {
        path: path.join("."),
        reason: reason.to_owned(),
    };
    match lookup(document, path) {
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(error("must be a string")),
        None => Err(error("is missing")),
    }
}

#[cfg(test)]
mod tests;
