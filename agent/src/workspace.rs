//! Where a stage attempt runs: a fresh directory per attempt under
//! `work_dir/ws`, checked out from a per-repository clone cache under
//! `work_dir/cache`, so each repository is cloned once per agent and fetched
//! only when a commit is missing.
//!
//! Every git operation on one repository holds that repository's async
//! mutex, so concurrent stages never clone or fetch into the same cache at
//! once; since nothing else touches the cache, a lock file found in it while
//! the mutex is held was left by a killed git and is removed.
//!
//! A workspace gets its `.git` by copying the cache's `kiln-workspace.git`:
//! the `.git` of a `git clone --shared --no-checkout` of the cache (its
//! objects shared through `alternates`, its branches as `origin/*`, its
//! tags), made once after each change of the cache and removed before the
//! next. Copying those few small files replaces a clone per stage, which
//! costs three processes (git, sh, git-upload-pack); a `git checkout` of the
//! commit then fills the workspace. So a stage whose commit is cached costs
//! two git processes: `cat-file -e` and `checkout`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use kiln_proto::v1::Source;
use sha2::{Digest, Sha256};
use tokio::process::Command;

use crate::attempt::AttemptKey;
use crate::error::Error;
use crate::logs::LogSink;

/// Hex digits of the repository's sha256 that name its cache directory.
const CACHE_NAME_LEN: usize = 16;

pub(crate) struct Workspaces {
    /// `work_dir/ws`: one directory per attempt, plus executors' scratch files.
    ws_root: PathBuf,
    /// `work_dir/cache`: one bare clone per repository.
    cache_root: PathBuf,
    /// One async mutex per cache directory (see the module docs).
    cache_locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl Workspaces {
    /// Sets up `work_dir`. Attempt directories an earlier agent process left
    /// behind belong to attempts nobody holds any more, so they are removed.
    pub(crate) async fn open(work_dir: &Path) -> Result<Self, Error> {
        tokio::fs::create_dir_all(work_dir)
            .await
            .map_err(Error::work_dir(work_dir))?;
        // Absolute, because commands run in other directories than the agent.
        let work_dir = tokio::fs::canonicalize(work_dir)
            .await
            .map_err(Error::work_dir(work_dir))?;
        let ws_root = work_dir.join("ws");
        let cache_root = work_dir.join("cache");
        if tokio::fs::try_exists(&ws_root).await.unwrap_or(false) {
            remove_tree(&ws_root)
                .await
                .map_err(Error::work_dir(&ws_root))?;
        }
        for dir in [&ws_root, &cache_root] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(Error::work_dir(dir))?;
        }
        Ok(Workspaces {
            ws_root,
            cache_root,
            cache_locks: Mutex::default(),
        })
    }

    /// Where executors keep their per-attempt files: beside, not inside, the
    /// attempt directories.
    pub(crate) fn scratch_dir(&self) -> &Path {
        &self.ws_root
    }

    /// The attempt's directory (whether or not it exists yet).
    pub(crate) fn attempt_dir(&self, key: AttemptKey) -> PathBuf {
        self.ws_root.join(key.dir_name())
    }

    /// Creates the attempt's directory and checks `source` out into it
    /// (nothing when `source.repo` is empty), logging progress as system
    /// lines. Returns where the commands run: the directory's `subdir`.
    pub(crate) async fn prepare(
        &self,
        key: AttemptKey,
        source: &Source,
        log: &LogSink,
    ) -> Result<PathBuf, Error> {
        let subdir = checked_subdir(&source.subdir)?;
        let root = self.attempt_dir(key);
        if tokio::fs::try_exists(&root).await.unwrap_or(false) {
            remove_tree(&root).await.map_err(Error::work_dir(&root))?;
        }
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(Error::work_dir(&root))?;
        let cwd = root.join(subdir);

        if source.repo.is_empty() {
            tokio::fs::create_dir_all(&cwd)
                .await
                .map_err(Error::work_dir(&cwd))?;
            return Ok(cwd);
        }
        let (repo, commit) = (source.repo.as_str(), source.commit.as_str());
        if commit.is_empty() || commit.starts_with('-') {
            return Err(Error::Source(format!("`{commit}` is not a commit id")));
        }
        log.system(format!("checking out {commit} from {repo}"))
            .await;
        self.check_out(repo, commit, &root, log).await?;
        if !tokio::fs::metadata(&cwd).await.is_ok_and(|m| m.is_dir()) {
            return Err(Error::Source(format!(
                "directory `{}` does not exist at commit {commit} of {repo}",
                source.subdir
            )));
        }
        Ok(cwd)
    }

    /// Removes an attempt's directory, if there is one; failures are only
    /// logged, as the next agent start removes leftovers anyway.
    pub(crate) async fn remove(&self, key: AttemptKey) {
        let root = self.attempt_dir(key);
        if !tokio::fs::try_exists(&root).await.unwrap_or(true) {
            return;
        }
        if let Err(err) = remove_tree(&root).await {
            let root = root.display();
            tracing::warn!(%root, %err, "cannot remove a finished stage's workspace");
        }
    }

    /// Brings the repository's cache up to `commit`, then checks `commit` out
    /// into `root` with the cache's objects shared, not copied.
    async fn check_out(
        &self,
        repo: &str,
        commit: &str,
        root: &Path,
        log: &LogSink,
    ) -> Result<(), Error> {
        let cache = self.cache_root.join(cache_name(repo));
        let lock = self.lock_for(&cache);
        let _held = lock.lock().await;
        self.update_cache(repo, commit, &cache, log).await?;
        let git_dir = workspace_git_dir(&cache);
        if !tokio::fs::try_exists(git_dir.join("HEAD"))
            .await
            .unwrap_or(false)
        {
            make_workspace_git_dir(&cache)
                .await
                .map_err(git_error("clone of the cached repository", repo))?;
        }
        let dot_git = root.join(".git");
        let copied = dot_git.clone();
        tokio::task::spawn_blocking(move || copy_tree(&git_dir, &copied))
            .await
            .map_err(|err| io::Error::other(err.to_string()))
            .and_then(|copied| copied)
            .map_err(Error::work_dir(&dot_git))?;
        git_in(root, &["checkout", "--quiet", "--detach", commit])
            .await
            .map_err(git_error("checkout", repo))
    }

    /// Makes sure the cache at `cache` exists and holds `commit`: reuse,
    /// fetch, or clone, in that order of preference. Reuse, the common case,
    /// costs one git process.
    async fn update_cache(
        &self,
        repo: &str,
        commit: &str,
        cache: &Path,
        log: &LogSink,
    ) -> Result<(), Error> {
        // Fails alike for a missing commit and a missing or broken cache;
        // which one it was is asked only then.
        if has_commit(cache, commit).await {
            log.system("using cached clone").await;
            return Ok(());
        }
        // From here on git writes to the cache, which a lock file left by a
        // killed git would stop (see the module docs). The workspace `.git`
        // made from the cache as it was goes first, so that even a crash
        // cannot leave one that lacks what the cache gains.
        let git_dir = workspace_git_dir(cache);
        if tokio::fs::try_exists(&git_dir).await.unwrap_or(false) {
            remove_tree(&git_dir)
                .await
                .map_err(Error::work_dir(&git_dir))?;
        }
        clear_stale_locks(cache).await;
        let usable = git_in(cache, &["rev-parse", "--git-dir"]).await.is_ok();
        if usable {
            log.system(format!("fetching {repo}: the cached clone lacks {commit}"))
                .await;
            fetch(cache, commit)
                .await
                .map_err(git_error("fetch", repo))?;
        } else {
            if tokio::fs::try_exists(cache).await.unwrap_or(false) {
                log.system("the cached clone is unusable; cloning again")
                    .await;
                remove_tree(cache).await.map_err(Error::work_dir(cache))?;
            }
            log.system(format!("cloning {repo} into the cache")).await;
            clone_bare(repo, cache)
                .await
                .map_err(git_error("clone", repo))?;
            if !has_commit(cache, commit).await {
                // Not on any branch or tag: ask for it by id.
                let _ = git_in(cache, &["fetch", "--quiet", "origin", commit]).await;
            }
        }
        if has_commit(cache, commit).await {
            Ok(())
        } else {
            Err(git_error("fetch", repo)(format!(
                "commit {commit} is not in the repository"
            )))
        }
    }

    fn lock_for(&self, cache: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.cache_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(cache.to_owned()).or_default().clone()
    }
}

fn git_error(action: &'static str, repo: &str) -> impl FnOnce(String) -> Error {
    let repo = repo.to_owned();
    move |detail| Error::Git {
        action,
        repo,
        detail,
    }
}

/// The cache directory name of `repo`: a prefix of its sha256, so any URL or
/// path maps to a short, safe name.
fn cache_name(repo: &str) -> String {
    let digest = hex::encode(Sha256::digest(repo.as_bytes()));
    digest[..CACHE_NAME_LEN].to_owned()
}

/// `subdir` as a path that stays inside the workspace.
fn checked_subdir(subdir: &str) -> Result<&Path, Error> {
    let path = Path::new(subdir);
    let inside = path
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if inside {
        Ok(path)
    } else {
        Err(Error::Source(format!(
            "subdir `{subdir}` must be a relative path inside the repository"
        )))
    }
}

/// Clones into a temporary name first, so an interrupted clone never looks
/// like a cache.
async fn clone_bare(repo: &str, cache: &Path) -> Result<(), String> {
    let partial = cache.with_extension("partial");
    let _ = remove_tree(&partial).await;
    let mut args = ["clone", "--quiet", "--bare", "--", repo]
        .map(OsStr::new)
        .to_vec();
    args.push(partial.as_os_str());
    git(&args).await?;
    tokio::fs::rename(&partial, cache)
        .await
        .map_err(|err| format!("cannot move the new clone into place: {err}"))
}

/// Where the cache keeps the `.git` that workspaces copy (see the module
/// docs). Git ignores a directory it does not know in a bare repository.
fn workspace_git_dir(cache: &Path) -> PathBuf {
    cache.join("kiln-workspace.git")
}

/// Makes [`workspace_git_dir`] from the cache as it is now: the `.git` of a
/// `clone --shared --no-checkout`, moved into place once complete.
async fn make_workspace_git_dir(cache: &Path) -> Result<(), String> {
    let partial = cache.join("kiln-workspace.partial");
    let _ = remove_tree(&partial).await;
    let args = ["clone", "--quiet", "--shared", "--no-checkout"].map(OsStr::new);
    let mut args = args.to_vec();
    args.extend([cache.as_os_str(), partial.as_os_str()]);
    git(&args).await?;
    let moved = tokio::fs::rename(partial.join(".git"), workspace_git_dir(cache)).await;
    let _ = remove_tree(&partial).await;
    moved.map_err(|err| format!("cannot move the workspace .git into place: {err}"))
}

/// Copies the directory tree `from` to `to`, which must not exist: the
/// files (with their permissions) and directories, empty ones too, of a
/// fresh `.git`, which has nothing else.
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Fetches every branch and tag, then `commit` by id if it is still missing
/// (servers may refuse that, so only the first fetch must succeed).
async fn fetch(cache: &Path, commit: &str) -> Result<(), String> {
    let refspecs = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];
    let mut args = vec!["fetch", "--quiet", "--prune", "origin"];
    args.extend(refspecs);
    git_in(cache, &args).await?;
    if !has_commit(cache, commit).await {
        let _ = git_in(cache, &["fetch", "--quiet", "origin", commit]).await;
    }
    Ok(())
}

async fn has_commit(repo: &Path, commit: &str) -> bool {
    let object = format!("{commit}^{{commit}}");
    git_in(repo, &["cat-file", "-e", &object]).await.is_ok()
}

/// Removes lock files a killed git left in the cache (see the module docs).
async fn clear_stale_locks(cache: &Path) {
    fn walk(dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&path);
            } else if path.extension() == Some(OsStr::new("lock")) {
                tracing::warn!(path = %path.display(), "removing a stale git lock file");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let cache = cache.to_owned();
    // Lock files live at the top and under refs/; objects need no walk.
    let _ = tokio::task::spawn_blocking(move || {
        for name in [
            "HEAD.lock",
            "config.lock",
            "packed-refs.lock",
            "shallow.lock",
            "index.lock",
        ] {
            let _ = std::fs::remove_file(cache.join(name));
        }
        walk(&cache.join("refs"));
    })
    .await;
}

async fn git_in(dir: &Path, args: &[&str]) -> Result<(), String> {
    let mut full: Vec<&OsStr> = vec!["-C".as_ref(), dir.as_os_str()];
    full.extend(args.iter().map(OsStr::new));
    git(&full).await
}

/// Runs git without a terminal; on failure, returns what it printed last.
async fn git(args: &[&OsStr]) -> Result<(), String> {
    let output = Command::new("git")
        // A transfer stalled for a minute fails instead of hanging the stage.
        .args(["-c", "http.lowSpeedLimit=1", "-c", "http.lowSpeedTime=60"])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // A stage stopped mid-checkout must not leave git running.
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|err| format!("cannot run git: {err}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().map(str::trim).rfind(|l| !l.is_empty());
    Err(match last {
        Some(line) => line.to_owned(),
        None => format!(
            "git {} exited with {}",
            args[0].to_string_lossy(),
            output.status
        ),
    })
}

/// `remove_dir_all`, also for trees with read-only directories (build tools
/// such as Go's module cache create them).
async fn remove_tree(path: &Path) -> io::Result<()> {
    match tokio::fs::remove_dir_all(path).await {
        Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
            let owned = path.to_owned();
            let _ = tokio::task::spawn_blocking(move || make_writable(&owned)).await;
            tokio::fs::remove_dir_all(path).await
        }
        other => other,
    }
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            make_writable(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::testing::{self, Capture};

    /// A git repository with one commit; returns its directory and commit id.
    struct Origin {
        dir: tempfile::TempDir,
    }

    impl Origin {
        fn new() -> Self {
            let origin = Origin {
                dir: tempfile::tempdir().unwrap(),
            };
            origin.git(&["init", "--quiet", "--initial-branch=main"]);
            origin
        }

        fn git(&self, args: &[&str]) -> String {
            let output = std::process::Command::new("git")
                .arg("-C")
                .arg(self.dir.path())
                .args(["-c", "user.name=kiln", "-c", "user.email=kiln@example.com"])
                .args(args)
                .output()
                .unwrap();
            assert!(output.status.success(), "git {args:?}: {output:?}");
            String::from_utf8(output.stdout).unwrap().trim().to_owned()
        }

        /// Commits `path` with `text`; returns the new commit id.
        fn commit(&self, path: &str, text: &str) -> String {
            let file = self.dir.path().join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
            self.git(&["add", "."]);
            self.git(&["commit", "--quiet", "-m", path]);
            self.git(&["rev-parse", "HEAD"])
        }

        fn source(&self, commit: &str, subdir: &str) -> Source {
            Source {
                repo: self.dir.path().display().to_string(),
                commit: commit.to_owned(),
                subdir: subdir.to_owned(),
                ..Source::default()
            }
        }
    }

    fn key(attempt: u32) -> AttemptKey {
        AttemptKey::new(3, 1, attempt)
    }

    async fn prepare(
        workspaces: &Workspaces,
        attempt: u32,
        source: &Source,
    ) -> (Result<PathBuf, Error>, Vec<String>) {
        let (sink, mut capture): (LogSink, Capture) = testing::sink();
        let result = workspaces.prepare(key(attempt), source, &sink).await;
        (result, capture.lines())
    }

    fn mentions(lines: &[String], text: &str) -> bool {
        lines.iter().any(|line| line.contains(text))
    }

    #[tokio::test]
    async fn checks_out_the_commit_and_reuses_the_cache() {
        let origin = Origin::new();
        let commit = origin.commit("app/hello.txt", "hello");
        let work_dir = tempfile::tempdir().unwrap();
        let workspaces = Workspaces::open(work_dir.path()).await.unwrap();
        let source = origin.source(&commit, "app");

        let (first, lines) = prepare(&workspaces, 1, &source).await;
        let first = first.unwrap();
        assert!(
            mentions(&lines, &format!("checking out {commit} from")),
            "{lines:?}"
        );
        assert!(mentions(&lines, "cloning"), "{lines:?}");
        assert!(first.ends_with("ws/3-1-1/app"), "{first:?}");
        assert_eq!(
            std::fs::read_to_string(first.join("hello.txt")).unwrap(),
            "hello"
        );

        let (second, lines) = prepare(&workspaces, 2, &source).await;
        let second = second.unwrap();
        assert!(mentions(&lines, "using cached clone"), "{lines:?}");
        assert!(
            !mentions(&lines, "cloning"),
            "the cache is not cloned twice: {lines:?}"
        );
        assert!(second.join("hello.txt").exists());
        let caches = std::fs::read_dir(work_dir.path().join("cache"))
            .unwrap()
            .count();
        assert_eq!(caches, 1);

        workspaces.remove(key(1)).await;
        assert!(!first.parent().unwrap().exists());
        assert!(second.exists());
    }

    #[tokio::test]
    async fn fetches_when_the_commit_is_new() {
        let origin = Origin::new();
        let old = origin.commit("a.txt", "old");
        let work_dir = tempfile::tempdir().unwrap();
        let workspaces = Workspaces::open(work_dir.path()).await.unwrap();
        prepare(&workspaces, 1, &origin.source(&old, ""))
            .await
            .0
            .unwrap();

        let new = origin.commit("a.txt", "new");
        let (ws, lines) = prepare(&workspaces, 2, &origin.source(&new, "")).await;
        assert!(mentions(&lines, "fetching"), "{lines:?}");
        assert!(!mentions(&lines, "cloning"), "{lines:?}");
        assert_eq!(
            std::fs::read_to_string(ws.unwrap().join("a.txt")).unwrap(),
            "new"
        );

        // The old commit is still there for a retry of an old run.
        let (ws, lines) = prepare(&workspaces, 3, &origin.source(&old, "")).await;
        assert!(mentions(&lines, "using cached clone"), "{lines:?}");
        assert_eq!(
            std::fs::read_to_string(ws.unwrap().join("a.txt")).unwrap(),
            "old"
        );
    }

    /// What `git` says in a workspace, as a stage running it would see.
    fn git_in_workspace(dir: &Path, args: &[&str]) -> String {
        let output = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "git {args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    #[tokio::test]
    async fn workspaces_are_clones_with_branches_and_tags_as_of_the_latest_fetch() {
        let origin = Origin::new();
        let old = origin.commit("a.txt", "old");
        origin.git(&["tag", "v1"]);
        let work_dir = tempfile::tempdir().unwrap();
        let workspaces = Workspaces::open(work_dir.path()).await.unwrap();
        let (ws, _) = prepare(&workspaces, 1, &origin.source(&old, "")).await;
        let ws = ws.unwrap();
        assert_eq!(git_in_workspace(&ws, &["describe", "--tags"]), "v1");
        assert_eq!(git_in_workspace(&ws, &["rev-parse", "HEAD"]), old);
        assert!(git_in_workspace(&ws, &["branch", "-r"]).contains("origin/main"));
        assert_eq!(git_in_workspace(&ws, &["status", "--porcelain"]), "");

        let new = origin.commit("a.txt", "new");
        origin.git(&["tag", "v2"]);
        let (ws, lines) = prepare(&workspaces, 2, &origin.source(&new, "")).await;
        assert!(mentions(&lines, "fetching"), "{lines:?}");
        assert_eq!(
            git_in_workspace(&ws.unwrap(), &["describe", "--tags"]),
            "v2"
        );
        let (ws, lines) = prepare(&workspaces, 3, &origin.source(&old, "")).await;
        assert!(mentions(&lines, "using cached clone"), "{lines:?}");
        let ws = ws.unwrap();
        assert_eq!(git_in_workspace(&ws, &["describe", "--tags"]), "v1");
        let tags = git_in_workspace(&ws, &["tag", "--list"]);
        assert_eq!(
            tags, "v1\nv2",
            "a retry of an old run sees the tags fetched since"
        );
    }

    #[tokio::test]
    async fn an_unknown_commit_is_an_error_that_names_it() {
        let origin = Origin::new();
        origin.commit("a.txt", "a");
        let work_dir = tempfile::tempdir().unwrap();
        let workspaces = Workspaces::open(work_dir.path()).await.unwrap();
        let missing = "0123456789abcdef0123456789abcdef01234567";
        let (result, _) = prepare(&workspaces, 1, &origin.source(missing, "")).await;
        let err = result.err().unwrap().to_string();
        assert!(err.contains(missing), "{err}");
    }

    #[tokio::test]
    async fn a_missing_repository_is_an_error() {
        let work_dir = tempfile::tempdir().unwrap();
        let workspaces = Workspaces::open(work_dir.path()).await.unwrap();
        let source = Source {
            repo: work_dir.path().join("nope").display().to_string(),
            commit: "abc".into(),
            ..Source::default()
        };
        let (result, _) = prepare(&workspaces, 1, &source).await;
        assert!(matches!(
            result,
            Err(Error::Git {
                action: "clone",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn without_a_repository_the_workspace_is_an_empty_dir() {
        let work_dir = tempfile::tempdir().unwrap();
        let workspaces = Workspaces::open(work_dir.path()).await.unwrap();
        let source = Source {
            subdir: "sub".into(),
            ..Source::default()
        };
        let (ws, lines) = prepare(&workspaces, 1, &source).await;
        let ws = ws.unwrap();
        assert!(ws.is_dir());
        assert_eq!(std::fs::read_dir(&ws).unwrap().count(), 0);
        assert!(lines.is_empty());
    }

    #[tokio::test]
    async fn subdirs_must_stay_inside_the_workspace() {
        let work_dir = tempfile::tempdir().unwrap();
        let workspaces = Workspaces::open(work_dir.path()).await.unwrap();
        for subdir in ["../escape", "/etc"] {
            let source = Source {
                subdir: subdir.into(),
                ..Source::default()
            };
            let (result, _) = prepare(&workspaces, 1, &source).await;
            assert!(matches!(result, Err(Error::Source(_))), "{subdir}");
        }
    }

    #[tokio::test]
    async fn opening_removes_workspaces_of_an_earlier_process() {
        let work_dir = tempfile::tempdir().unwrap();
        let stale = work_dir.path().join("ws/9-9-9");
        std::fs::create_dir_all(stale.join("read-only")).unwrap();
        std::fs::write(stale.join("read-only/file"), "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let read_only = std::fs::Permissions::from_mode(0o500);
        std::fs::set_permissions(stale.join("read-only"), read_only).unwrap();
        std::fs::write(work_dir.path().join("ws/9-9-9.sh"), "true").unwrap();
        Workspaces::open(work_dir.path()).await.unwrap();
        assert_eq!(
            std::fs::read_dir(work_dir.path().join("ws"))
                .unwrap()
                .count(),
            0
        );
    }
}
