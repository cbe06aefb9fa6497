//! Registered repositories as the coordinator reads them: a revision
//! resolved to one commit, and a pipeline file read at a commit.
//!
//! Every git call here is a child process awaited by the caller's own task
//! (a request handler, the webhook, the trigger watcher), never by the
//! engine loop: what it finds reaches the engine inside the event that
//! starts the run. A local repository is read in place; a remote one
//! through a bare mirror under `DATA/repos/`, fetched when the revision or
//! commit asked for may be newer than the mirror. The mirror fetches
//! branches, tags and the heads of merge requests (`refs/pull/*/head`,
//! `refs/merge-requests/*/head`), so a merge request from a fork is built.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Longest a git command may take (a fetch of a large remote included).
const GIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Where pipeline files live in a repository when none is named.
pub(crate) const DEFAULT_FILE: &str = "kiln.yml";
/// A directory whose every `*.yml` / `*.yaml` is a pipeline of its own.
pub(crate) const PIPELINES_DIR: &str = ".kiln";

pub(crate) struct Repos {
    /// `DATA/repos`: one bare mirror per remote repository.
    mirrors: PathBuf,
    /// One fetch at a time per mirror; readers of a mirror wait for it.
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl Repos {
    pub(crate) fn new(data_dir: &Path) -> Self {
        Self {
            mirrors: data_dir.join("repos"),
            locks: Mutex::default(),
        }
    }

    /// Pins a run to one commit: the revision asked for (a branch, tag or
    /// commit), else the branch head. A commit id is checked to be in the
    /// repository, so a run is never started for a commit agents cannot
    /// fetch.
    pub(crate) async fn resolve(
        &self,
        repo: &str,
        branch: &str,
        rev: &str,
    ) -> Result<String, ApiError> {
        let wanted = if rev.is_empty() { branch } else { rev };
        if wanted.starts_with('-') || wanted.is_empty() {
            return Err(ApiError::InvalidArgument(format!(
                "revision `{wanted}` is not a branch, tag or commit"
            )));
        }
        let is_commit = wanted.len() == 40 && wanted.chars().all(|c| c.is_ascii_hexdigit());
        // A branch of a remote may have moved: fetch first. A commit is
        // fetched only when the mirror does not have it yet.
        let dir = self.git_dir(repo, !is_commit).await?;
        let mut found = rev_parse(&dir, wanted).await?;
        if found.is_none() && is_commit && !is_local(repo) {
            let dir = self.git_dir(repo, true).await?;
            found = rev_parse(&dir, wanted).await?;
        }
        found.ok_or_else(|| {
            if is_commit {
                ApiError::FailedPrecondition(format!(
                    "commit {wanted} is not in {repo}; push it there first"
                ))
            } else {
                ApiError::FailedPrecondition(format!(
                    "cannot resolve revision `{wanted}` in {repo}; push it or pass an existing branch, tag or commit with --rev"
                ))
            }
        })
    }

    /// Whether `rev` names a branch (`KILN_BRANCH`) or a tag (`KILN_TAG`)
    /// of `repo`; `None` for a commit id or anything else. Reads what
    /// [`Repos::resolve`] already fetched.
    pub(crate) async fn ref_kind(&self, repo: &str, rev: &str) -> Option<&'static str> {
        let dir = self.git_dir(repo, false).await.ok()?;
        for (prefix, kind) in [("refs/heads/", "KILN_BRANCH"), ("refs/tags/", "KILN_TAG")] {
            let reference = format!("{prefix}{rev}");
            let found = git(&dir, &["show-ref", "--verify", "--quiet", &reference]).await;
            if found.is_ok_and(|output| output.status.success()) {
                return Some(kind);
            }
        }
        None
    }

    /// The text of `path` at `commit`, `Ok(None)` when the commit has no
    /// such file. `commit` must have been resolved by [`Repos::resolve`].
    pub(crate) async fn read_file(
        &self,
        repo: &str,
        commit: &str,
        path: &str,
    ) -> Result<Option<String>, ApiError> {
        let dir = self.git_dir(repo, false).await?;
        let object = format!("{commit}:{path}");
        let size = git(&dir, &["cat-file", "-s", &object]).await?;
        if !size.status.success() {
            return Ok(None);
        }
        let bytes: usize = String::from_utf8_lossy(&size.stdout)
            .trim()
            .parse()
            .unwrap_or(usize::MAX);
        if bytes > kiln_common::spec::MAX_FILE_BYTES {
            return Err(ApiError::FailedPrecondition(format!(
                "{path} at {commit} has {bytes} bytes; the limit is {}",
                kiln_common::spec::MAX_FILE_BYTES
            )));
        }
        let blob = git(&dir, &["cat-file", "blob", &object]).await?;
        if !blob.status.success() {
            return Ok(None);
        }
        String::from_utf8(blob.stdout).map(Some).map_err(|_| {
            ApiError::FailedPrecondition(format!("{path} at {commit} is not UTF-8 text"))
        })
    }

    /// Whether `older` is an ancestor of `newer` (and not the same commit).
    pub(crate) async fn is_ancestor(
        &self,
        repo: &str,
        older: &str,
        newer: &str,
    ) -> Result<bool, ApiError> {
        if older == newer {
            return Ok(false);
        }
        let dir = self.git_dir(repo, false).await?;
        let output = git(&dir, &["merge-base", "--is-ancestor", older, newer]).await?;
        match output.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(git_failed("compare commits in", repo, &output)),
        }
    }

    /// The paths `commit` changed since `base`; `None` when `base` is not
    /// in the repository (a rewritten branch): then everything counts as
    /// changed.
    pub(crate) async fn changed_paths(
        &self,
        repo: &str,
        base: &str,
        commit: &str,
    ) -> Result<Option<Vec<String>>, ApiError> {
        let dir = self.git_dir(repo, false).await?;
        if rev_parse(&dir, base).await?.is_none() {
            return Ok(None);
        }
        let output = git(
            &dir,
            &[
                "diff",
                "--name-only",
                "-z",
                "--no-renames",
                base,
                commit,
                "--",
            ],
        )
        .await?;
        if !output.status.success() {
            return Err(git_failed("diff", commit, &output));
        }
        Ok(Some(
            output
                .stdout
                .split(|&byte| byte == 0)
                .filter(|name| !name.is_empty())
                .map(|name| String::from_utf8_lossy(name).into_owned())
                .collect(),
        ))
    }

    /// The pipeline file at `path` and every file it includes (`include:`,
    /// read at the same commit), as the one text a version stores (see
    /// `kiln_common::spec::Sources`); `Ok(None)` when the commit has no
    /// file at `path`. An included file that is missing is left out: the
    /// parse names it and the line that includes it.
    pub(crate) async fn read_pipeline(
        &self,
        repo: &str,
        commit: &str,
        path: &str,
    ) -> Result<Option<String>, ApiError> {
        let Some(text) = self.read_file(repo, commit, path).await? else {
            return Ok(None);
        };
        let mut sources = kiln_common::spec::Sources::new(path, &text);
        let mut absent = std::collections::HashSet::new();
        // Each round reads one more level of includes; the parser refuses
        // more than MAX_INCLUDED_FILES, so a few more rounds than that end
        // any chain.
        for _ in 0..=kiln_common::spec::MAX_INCLUDED_FILES {
            let wanted: Vec<String> = sources
                .missing()
                .into_iter()
                .filter(|p| !absent.contains(p))
                .take(kiln_common::spec::MAX_INCLUDED_FILES + 1)
                .collect();
            if wanted.is_empty() {
                break;
            }
            for included in wanted {
                match self.read_file(repo, commit, &included).await? {
                    Some(text) => {
                        sources.included.insert(included, text);
                    }
                    None => {
                        absent.insert(included);
                    }
                }
            }
        }
        Ok(Some(sources.bundle()))
    }

    /// The branches and tags of `repo` as it is now (`git ls-remote`), ref
    /// → commit, for polling.
    pub(crate) async fn remote_refs(
        &self,
        repo: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
        let here = std::env::temp_dir();
        let listed = git(&here, &["ls-remote", "--heads", "--tags", "--", repo]).await?;
        if !listed.status.success() {
            return Err(git_failed("list the refs of", repo, &listed));
        }
        Ok(crate::triggers::poll::parse_ls_remote(
            &String::from_utf8_lossy(&listed.stdout),
        ))
    }

    /// The pipeline files at `commit`: `kiln.yml` at the root and every
    /// `.kiln/*.yml` (or `*.yaml`), in that order.
    pub(crate) async fn pipeline_files(
        &self,
        repo: &str,
        commit: &str,
    ) -> Result<Vec<String>, ApiError> {
        let dir = self.git_dir(repo, false).await?;
        let listed = git(
            &dir,
            &[
                "ls-tree",
                "--name-only",
                "-z",
                commit,
                "--",
                DEFAULT_FILE,
                &format!("{PIPELINES_DIR}/"),
            ],
        )
        .await?;
        if !listed.status.success() {
            return Err(git_failed("list the files of", commit, &listed));
        }
        let mut files: Vec<String> = listed
            .stdout
            .split(|&byte| byte == 0)
            .filter_map(|name| std::str::from_utf8(name).ok())
            .filter(|name| {
                *name == DEFAULT_FILE
                    || (name.starts_with(&format!("{PIPELINES_DIR}/"))
                        && (name.ends_with(".yml") || name.ends_with(".yaml")))
            })
            .map(str::to_owned)
            .collect();
        // `kiln.yml` first, then `.kiln/` in name order.
        files.sort_by_key(|name| (name != DEFAULT_FILE, name.clone()));
        Ok(files)
    }

    /// The git directory to read `repo` from: the repository itself when
    /// it is a local path, else its mirror (created, and fetched when
    /// `fetch` or when new).
    async fn git_dir(&self, repo: &str, fetch: bool) -> Result<PathBuf, ApiError> {
        if is_local(repo) {
            return Ok(PathBuf::from(repo));
        }
        let dir = self.mirrors.join(mirror_name(repo));
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(dir.clone()).or_default().clone()
        };
        let _one_at_a_time = lock.lock().await;
        let new = !dir.join("HEAD").exists();
        if new {
            std::fs::create_dir_all(&dir).map_err(|error| {
                ApiError::Internal(format!("cannot create {}: {error}", dir.display()))
            })?;
            let init = git(&dir, &["init", "--bare", "--quiet"]).await?;
            if !init.status.success() {
                return Err(git_failed("create a mirror of", repo, &init));
            }
        }
        if fetch || new {
            let fetched = git(
                &dir,
                &[
                    "fetch",
                    "--quiet",
                    "--prune",
                    "--force",
                    "--",
                    repo,
                    "+refs/heads/*:refs/heads/*",
                    "+refs/tags/*:refs/tags/*",
                    // A merge request from a fork: its commits are only
                    // under these (GitHub and Gitea; GitLab).
                    "+refs/pull/*/head:refs/pull/*/head",
                    "+refs/merge-requests/*/head:refs/merge-requests/*/head",
                ],
            )
            .await?;
            if !fetched.status.success() {
                return Err(ApiError::FailedPrecondition(format!(
                    "cannot fetch {repo}: {}",
                    String::from_utf8_lossy(&fetched.stderr).trim()
                )));
            }
        }
        Ok(dir)
    }
}

/// "sha256:<hex>" of a pipeline file's text: its version's identity.
pub(crate) fn digest(text: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes())))
}

/// The directory stages of the pipeline in `path` run in: the file's own
/// directory, or the repository root for the files of `.kiln/`.
pub(crate) fn subdir_of(path: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, _)) if dir != PIPELINES_DIR => dir.to_owned(),
        _ => String::new(),
    }
}

/// A repository's default name: the last part of its path or URL,
/// without `.git`.
pub(crate) fn default_name(url: &str) -> String {
    let last = url
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or(url);
    last.trim_end_matches(".git").to_owned()
}

fn is_local(repo: &str) -> bool {
    Path::new(repo).is_dir()
}

/// A mirror's directory name: readable, and unique per URL.
fn mirror_name(url: &str) -> String {
    let hash = hex::encode(&Sha256::digest(url.as_bytes())[..8]);
    let readable: String = default_name(url)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    format!("{readable}-{hash}.git")
}

async fn rev_parse(dir: &Path, wanted: &str) -> Result<Option<String>, ApiError> {
    let output = git(
        dir,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            &format!("{wanted}^{{commit}}"),
        ],
    )
    .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let commit = stdout.trim();
    Ok((output.status.success() && commit.len() == 40).then(|| commit.to_owned()))
}

async fn git(dir: &Path, args: &[&str]) -> Result<std::process::Output, ApiError> {
    let mut command = tokio::process::Command::new("git");
    command
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(GIT_TIMEOUT, command.output()).await {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(error)) => Err(ApiError::Internal(format!("cannot run git: {error}"))),
        Err(_) => Err(ApiError::FailedPrecondition(format!(
            "git {} in {} took longer than {GIT_TIMEOUT:?}",
            args.first().unwrap_or(&""),
            dir.display()
        ))),
    }
}

fn git_failed(what: &str, target: &str, output: &std::process::Output) -> ApiError {
    ApiError::FailedPrecondition(format!(
        "cannot {what} {target}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_of_kiln_dir_files_run_at_the_root() {
        assert_eq!(subdir_of("kiln.yml"), "");
        assert_eq!(subdir_of("ml/kiln.yml"), "ml");
        assert_eq!(subdir_of(".kiln/train.yml"), "");
        assert_eq!(subdir_of("a/b/kiln.yml"), "a/b");
    }

    #[test]
    fn default_names_come_from_the_last_part() {
        assert_eq!(default_name("https://git.example/team/model.git"), "model");
        assert_eq!(default_name("git@host:team/model.git"), "model");
        assert_eq!(default_name("/srv/repos/model/"), "model");
        assert_ne!(
            mirror_name("https://a/x.git"),
            mirror_name("https://b/x.git")
        );
    }
}
