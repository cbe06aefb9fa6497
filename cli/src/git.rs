//! Where a pipeline directory lives in git.
//!
//! Agents check out the committed repository at a run's commit, so a
//! pipeline is registered as (repository, branch, directory inside it)
//! rather than as files uploaded from this machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::CliError;

/// The source of a pipeline, as `RegisterPipeline` wants it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct GitSource {
    /// Absolute path of the work tree's top level.
    pub(crate) repo: String,
    /// Branch checked out now; runs without `--rev` use its head.
    pub(crate) branch: String,
    /// The directory relative to `repo`, `/`-separated, "" for the top.
    pub(crate) subdir: String,
}

/// How the work tree around a pipeline differs from the commit that
/// stages check out; they never see uncommitted files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Drift {
    /// Everything under the directory is committed.
    Clean,
    /// kiln.yml is committed, but this many files under the directory are
    /// modified, staged or untracked.
    Modified(usize),
    /// kiln.yml itself is not in the commit: every run would fail.
    NotCommitted,
}

/// Finds the work tree, branch and sub-directory of `dir`.
pub(crate) fn locate(dir: &Path) -> Result<GitSource, CliError> {
    let shown = dir.display();
    let not_git = || {
        CliError::Input(format!(
            "{shown} is not inside a git work tree; kiln runs pipelines from git \
             (git init && git commit)"
        ))
    };
    let toplevel = git(dir, &["rev-parse", "--show-toplevel"]).ok_or_else(not_git)?;
    // A fresh `git init` has a work tree but no HEAD to check out.
    if git(dir, &["rev-parse", "--verify", "--quiet", "HEAD"]).is_none() {
        return Err(CliError::Input(format!(
            "the git repository at {toplevel} has no commits yet; kiln runs pipelines \
             from git (git add && git commit)"
        )));
    }
    let branch = git(dir, &["rev-parse", "--abbrev-ref", "HEAD"]).ok_or_else(not_git)?;
    // Both sides canonical, so symlinks and `..` do not defeat the prefix test.
    let canonical = |path: &Path| {
        path.canonicalize()
            .map_err(|e| CliError::Input(format!("cannot resolve {}: {e}", path.display())))
    };
    let top = canonical(Path::new(&toplevel))?;
    let here = canonical(dir)?;
    let subdir = subdir_of(&top, &here).ok_or_else(not_git)?;
    Ok(GitSource {
        repo: top.to_string_lossy().into_owned(),
        branch,
        subdir,
    })
}

/// Compares `dir` with the commit checked out now.
pub(crate) fn drift(dir: &Path) -> Drift {
    if git(dir, &["cat-file", "-e", "HEAD:./kiln.yml"]).is_none() {
        return Drift::NotCommitted;
    }
    let changed =
        git(dir, &["status", "--porcelain", "--", "."]).map_or(0, |out| out.lines().count());
    match changed {
        0 => Drift::Clean,
        n => Drift::Modified(n),
    }
}

/// `dir` relative to `top`, `/`-separated; `None` if it is not below it.
pub(crate) fn subdir_of(top: &Path, dir: &Path) -> Option<String> {
    let relative: PathBuf = dir.strip_prefix(top).ok()?.to_path_buf();
    let parts: Vec<_> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    Some(parts.join("/"))
}

/// Runs `git -C dir args...`; its trimmed stdout, or `None` if it failed
/// (including git not being installed: then nothing is in a work tree).
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdir_is_relative_and_slash_separated() {
        let top = Path::new("/repo");
        assert_eq!(subdir_of(top, Path::new("/repo")).as_deref(), Some(""));
        assert_eq!(
            subdir_of(top, Path::new("/repo/examples/hello")).as_deref(),
            Some("examples/hello")
        );
        assert_eq!(subdir_of(top, Path::new("/elsewhere")), None);
    }

    fn sh(dir: &Path, script: &str) {
        let status = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .status()
            .unwrap();
        assert!(status.success(), "{script}");
    }

    #[test]
    fn locates_a_committed_directory_and_rejects_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("plain");
        std::fs::create_dir_all(&outside).unwrap();
        let error = locate(&outside).unwrap_err().to_string();
        // The temp dir might sit inside some work tree on a dev machine; only
        // assert the message when it does not.
        if git(&outside, &["rev-parse", "--show-toplevel"]).is_none() {
            assert!(error.contains("is not inside a git work tree"), "{error}");
        }

        let repo = tmp.path().join("repo");
        std::fs::create_dir_all(repo.join("ml/hello")).unwrap();
        sh(&repo, "git init -q -b trunk");
        let error = locate(&repo.join("ml/hello")).unwrap_err().to_string();
        assert!(error.contains("has no commits yet"), "{error}");

        sh(
            &repo,
            "echo x > ml/hello/kiln.yml && git add . && \
             git -c user.name=t -c user.email=t@t commit -q -m init",
        );
        let source = locate(&repo.join("ml/hello")).unwrap();
        assert_eq!(source.branch, "trunk");
        assert_eq!(source.subdir, "ml/hello");
        assert_eq!(Path::new(&source.repo), repo.canonicalize().unwrap());
    }

    #[test]
    fn drift_tells_committed_from_changed_from_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path();
        sh(
            repo,
            "git init -q && mkdir -p ml other && echo x > ml/kiln.yml && git add . && \
             git -c user.name=t -c user.email=t@t commit -q -m init",
        );
        assert_eq!(drift(&repo.join("ml")), Drift::Clean);
        sh(repo, "echo y > ml/new.txt");
        assert_eq!(drift(&repo.join("ml")), Drift::Modified(1));
        sh(repo, "echo z > other/kiln.yml");
        assert_eq!(drift(&repo.join("other")), Drift::NotCommitted);
    }
}
