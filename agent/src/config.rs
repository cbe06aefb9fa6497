//! What the agent is told when it starts: [`Config`] and the executor
//! settings in it. Plain data, built by the binary from flags (or by
//! `kiln demo` and the tests); every layer may read it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Which executor runs stages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecutorKind {
    /// Host processes under `sh -e`.
    Process,
    /// One container per attempt on a Docker engine.
    Docker(DockerConfig),
}

impl ExecutorKind {
    /// The value of the `executor` label the agent advertises.
    pub fn label(&self) -> &'static str {
        match self {
            ExecutorKind::Process => "process",
            ExecutorKind::Docker(_) => "docker",
        }
    }
}

/// How the docker executor reaches its engine and what it may mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerConfig {
    /// The engine's address: `unix:///var/run/docker.sock` or
    /// `tcp://HOST:PORT` (plain HTTP).
    pub host: String,
    /// Host paths mounted into every stage container, at the same path.
    /// Nothing but the workspace is mounted unless the operator lists it
    /// here: the docker socket in particular gives a stage the whole host.
    pub allow_mounts: Vec<AllowedMount>,
}

/// One entry of [`DockerConfig::allow_mounts`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedMount {
    /// An absolute host path that exists when the agent starts.
    pub path: PathBuf,
    /// Read-only unless the operator asked for `PATH:rw`.
    pub read_only: bool,
}

impl std::str::FromStr for AllowedMount {
    type Err = String;

    /// `PATH` (read-only) or `PATH:rw`; `PATH:ro` is also accepted.
    fn from_str(text: &str) -> Result<Self, String> {
        let (path, read_only) = match text.rsplit_once(':') {
            Some((path, "rw")) => (path, false),
            Some((path, "ro")) => (path, true),
            _ => (text, true),
        };
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!(
                "mount `{text}` is not an absolute path; write e.g. /data/cache or /data/cache:rw"
            ));
        }
        Ok(AllowedMount { path, read_only })
    }
}

/// Everything the agent needs to start; the binary builds it from flags.
#[derive(Clone, Debug)]
pub struct Config {
    /// The coordinator's gRPC address, e.g. `http://127.0.0.1:7700` or
    /// `https://kiln.example:7700`.
    pub coordinator: String,
    /// CA file, client certificate and token for reaching the coordinator.
    pub client: kiln_common::channel::ClientOptions,
    /// Unique per machine: a second agent with the same name replaces the
    /// first at the coordinator.
    pub name: String,
    /// What stages may ask for to be placed here (`role=deploy`).
    pub labels: BTreeMap<String, String>,
    /// How many stages run at once.
    pub capacity: u32,
    /// Workspaces and the clone cache live here.
    pub work_dir: PathBuf,
    /// How stages run; also advertised as the label `executor=...`.
    pub executor: ExecutorKind,
    /// After shutdown is requested, running stages get this long to finish
    /// before they are handed back.
    pub drain_timeout: Duration,
    /// GPU devices stages may be given (`--gpus`); empty: none.
    pub gpus: Vec<u32>,
    /// The most the stage caches under `work_dir/stage-cache` may take
    /// (`--cache-max-bytes`); the least recently used go first.
    pub cache_max_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_mounts_are_absolute_and_read_only_by_default() {
        let mount = |text: &str| text.parse::<AllowedMount>();
        assert_eq!(
            mount("/data"),
            Ok(AllowedMount {
                path: "/data".into(),
                read_only: true
            })
        );
        assert!(!mount("/var/run/docker.sock:rw").unwrap().read_only);
        assert!(mount("/data:ro").unwrap().read_only);
        assert!(mount("data").unwrap_err().contains("absolute"));
    }
}
