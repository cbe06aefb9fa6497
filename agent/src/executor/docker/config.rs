//! What a stage's container looks like: its name, labels, mounts, limits and
//! security settings. Pure functions of the job, so they are tested without
//! an engine.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, HostConfigLogConfig, Mount, MountType,
};
use kiln_proto::v1::DockerOptions;

use crate::config::AllowedMount;
use crate::executor::contract::Job;

/// Where the attempt's checkout appears inside the container.
pub(super) const WORKSPACE: &str = "/workspace";
/// Limits for a stage whose `resources` leave them out.
pub(super) const DEFAULT_MEMORY_BYTES: u64 = 2 << 30;
pub(super) const DEFAULT_CPUS: f64 = 2.0;
pub(super) const DEFAULT_PIDS: i64 = 1024;

/// What every container of this agent gets, whatever its stage asks for.
pub(super) struct HostSettings {
    /// The engine's CPUs: a stage asking for more gets all of them (docker
    /// refuses a larger limit outright).
    pub(super) n_cpus: f64,
    /// Mounted at the same path in every container.
    pub(super) allow_mounts: Vec<AllowedMount>,
    /// `uid:gid` to run as, when the agent is not root (see the module docs
    /// of `docker`); `None` keeps the image's user.
    pub(super) user: Option<String>,
}

/// `kiln-<agent>-<run>-<stage_idx>-<attempt>`, with anything docker does not
/// allow in a name turned into `-`. Unique per agent and attempt.
pub(super) fn container_name(agent: &str, job: &Job) -> String {
    let agent: String = agent
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("kiln-{agent}-{}", job.key.dir_name())
}

/// What marks everything an attempt creates on the engine (its container,
/// its services and their network) as this agent's: the start-up sweep
/// removes what carries `kiln.agent=<agent>`.
pub(super) fn labels(agent: &str, job: &Job) -> HashMap<String, String> {
    HashMap::from([
        ("kiln.agent".to_owned(), agent.to_owned()),
        ("kiln.run".to_owned(), job.key.stage.run.to_string()),
        ("kiln.stage".to_owned(), job.stage_name.clone()),
        ("kiln.attempt".to_owned(), job.key.attempt.to_string()),
    ])
}

/// The memory limit in bytes: the stage's, or the default.
pub(super) fn memory_limit(options: &DockerOptions) -> u64 {
    match options.memory_bytes {
        0 => DEFAULT_MEMORY_BYTES,
        bytes => bytes,
    }
}

/// The create request for `job`'s container, running `script` in `image`
/// (an image id, so the digest reported is the one that ran).
pub(super) fn container_body(
    job: &Job,
    image: &str,
    script: String,
    agent: &str,
    host: &HostSettings,
) -> ContainerCreateBody {
    let network = services_network(agent, job);
    let subdir = job.dir.strip_prefix(&job.workspace).unwrap_or(&job.dir);
    let working_dir = std::path::Path::new(WORKSPACE).join(subdir);
    let mut labels = labels(agent, job);
    labels.insert("kiln.image".to_owned(), job.image.clone());
    ContainerCreateBody {
        image: Some(image.to_owned()),
        // An entrypoint of our own, so neither the image's entrypoint nor its
        // command changes what runs; `$0` is `sh`, as in the process executor.
        entrypoint: Some(vec![
            "sh".into(),
            "-e".into(),
            "-c".into(),
            script,
            "sh".into(),
        ]),
        cmd: Some(Vec::new()),
        env: Some(
            job.env
                .iter()
                .chain(&job.secrets)
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        ),
        working_dir: Some(working_dir.display().to_string()),
        user: host.user.clone(),
        labels: Some(labels),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        attach_stdin: Some(false),
        open_stdin: Some(false),
        tty: Some(false),
        host_config: Some(host_config(job, host, network.as_deref())),
        ..Default::default()
    }
}

/// The attempt's own network, which a stage with `services:` and its
/// services share: `<container name>-net`. `None` without services.
pub(super) fn services_network(agent: &str, job: &Job) -> Option<String> {
    (!job.services.is_empty()).then(|| format!("{}-net", container_name(agent, job)))
}

fn host_config(job: &Job, host: &HostSettings, network: Option<&str>) -> HostConfig {
    let options = &job.docker;
    let memory = i64::try_from(memory_limit(options)).unwrap_or(i64::MAX);
    let cpus = match options.cpus {
        cpus if cpus > 0.0 => cpus.min(host.n_cpus),
        _ => DEFAULT_CPUS.min(host.n_cpus),
    };
    let mut mounts = vec![bind(&job.workspace.display().to_string(), WORKSPACE, false)];
    mounts.extend(host.allow_mounts.iter().map(|mount| {
        let path = mount.path.display().to_string();
        bind(&path, &path, mount.read_only)
    }));
    HostConfig {
        mounts: Some(mounts),
        memory: Some(memory),
        // Equal to `memory`: no swap, so the limit is a limit.
        memory_swap: Some(memory),
        nano_cpus: Some((cpus * 1e9) as i64),
        pids_limit: Some(match options.pids {
            pids if pids > 0 => pids,
            _ => DEFAULT_PIDS,
        }),
        network_mode: Some(match (network, options.network.as_str()) {
            (Some(network), _) => network.to_owned(),
            (None, "bridge") => "bridge".to_owned(),
            (None, _) => "none".to_owned(),
        }),
        privileged: Some(false),
        security_opt: Some(vec!["no-new-privileges".into()]),
        // Docker's init as PID 1 passes SIGTERM on to the shell (which, as
        // PID 1, would ignore it) and reaps what the commands leave behind.
        init: Some(true),
        // The output reaches Kiln through the attach stream; a logging
        // driver would only keep a second copy on the engine's disk.
        log_config: Some(HostConfigLogConfig {
            typ: Some("none".into()),
            config: None,
        }),
        device_requests: gpu_request(&job.gpus),
        ..Default::default()
    }
}

/// The reserved GPU devices as a Docker device request: by id, any driver
/// that offers the `gpu` capability (the NVIDIA runtime). An engine without
/// one refuses the container with its own words, which the stage reports.
fn gpu_request(gpus: &[u32]) -> Option<Vec<DeviceRequest>> {
    if gpus.is_empty() {
        return None;
    }
    Some(vec![DeviceRequest {
        device_ids: Some(gpus.iter().map(u32::to_string).collect()),
        capabilities: Some(vec![vec!["gpu".to_owned()]]),
        ..Default::default()
    }])
}

/// The stage's first system line: the image it runs in (with the digest),
/// its network and its limits, read from the same [`HostConfig`] the
/// container is created with. A stage that cannot resolve a host then shows
/// at once that it has no network unless it asks for one.
pub(super) fn describe(job: &Job, image_digest: &str, host: &HostSettings, agent: &str) -> String {
    let services_network = services_network(agent, job);
    let config = host_config(job, host, services_network.as_deref());
    let network = match (&services_network, config.network_mode.as_deref()) {
        (Some(_), _) => {
            let names: Vec<&str> = job.services.iter().map(|s| s.name.as_str()).collect();
            let outside = if job.docker.network == "bridge" {
                "and the outside"
            } else {
                "nothing outside (`network: bridge` for that)"
            };
            format!(
                "network: the attempt's own, reaching its services {} by name and {outside}",
                names.join(", ")
            )
        }
        (None, Some("bridge")) => "network: bridge".to_owned(),
        _ => "network: none (the default: no network at all; set `network: bridge` on the \
              stage in kiln.yml for one)"
            .to_owned(),
    };
    let memory = config
        .memory
        .map_or(0, |bytes| u64::try_from(bytes).unwrap_or(0));
    let cpus = config.nano_cpus.unwrap_or(0) as f64 / 1e9;
    let gpus: Vec<String> = config
        .device_requests
        .iter()
        .flatten()
        .flat_map(|request| request.device_ids.iter().flatten())
        .cloned()
        .collect();
    let gpus = if gpus.is_empty() {
        String::new()
    } else {
        format!(", gpus {}", gpus.join(","))
    };
    format!(
        "docker: image {} ({image_digest}); {network}; limits: memory {}, cpus {cpus}, pids {}{gpus}",
        job.image,
        byte_size(memory),
        config.pids_limit.unwrap_or(0),
    )
}

/// `2 GiB`, `512 MiB`, `1536 KiB`: the largest binary unit that divides
/// `bytes`, else MiB with one decimal.
fn byte_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn bind(source: &str, target: &str, read_only: bool) -> Mount {
    Mount {
        source: Some(source.to_owned()),
        target: Some(target.to_owned()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::attempt::AttemptKey;

    fn job(options: DockerOptions) -> Job {
        Job {
            gpus: Vec::new(),
            key: AttemptKey::new(7, 2, 3),
            stage_name: "train".into(),
            name: "7-2-3".into(),
            workspace: "/work/ws/7-2-3".into(),
            dir: "/work/ws/7-2-3/ml".into(),
            scratch: "/work/ws".into(),
            commands: vec!["true".into()],
            env: BTreeMap::from([("KILN_RUN_ID".to_owned(), "7".to_owned())]),
            secrets: BTreeMap::from([("API_TOKEN".to_owned(), "hunter2secret".to_owned())]),
            timeout: None,
            image: "kiln/test-busybox:1".into(),
            docker: options,
            services: Vec::new(),
        }
    }

    fn host(n_cpus: f64) -> HostSettings {
        HostSettings {
            n_cpus,
            allow_mounts: vec![AllowedMount {
                path: "/data".into(),
                read_only: true,
            }],
            user: None,
        }
    }

    #[test]
    fn the_first_line_names_image_network_and_limits() {
        let line = describe(
            &job(DockerOptions::default()),
            "sha256:abc",
            &host(8.0),
            "a",
        );
        assert_eq!(
            line,
            "docker: image kiln/test-busybox:1 (sha256:abc); network: none (the default: no \
             network at all; set `network: bridge` on the stage in kiln.yml for one); limits: \
             memory 2 GiB, cpus 2, pids 1024"
        );
        let bridged = DockerOptions {
            network: "bridge".into(),
            memory_bytes: 512 << 20,
            cpus: 1.5,
            pids: 64,
            ..DockerOptions::default()
        };
        let mut bridged = job(bridged);
        let line = describe(&bridged, "sha256:abc", &host(8.0), "a");
        assert!(
            line.ends_with("; network: bridge; limits: memory 512 MiB, cpus 1.5, pids 64"),
            "{line}"
        );
        bridged.gpus = vec![0, 2];
        let line = describe(&bridged, "sha256:abc", &host(8.0), "a");
        assert!(line.ends_with(", pids 64, gpus 0,2"), "{line}");
        assert_eq!(byte_size(1_500_000), "1.4 MiB");
    }

    #[test]
    fn names_are_valid_for_docker_and_unique_per_attempt() {
        let job = job(DockerOptions::default());
        assert_eq!(container_name("gpu box/1", &job), "kiln-gpu-box-1-7-2-3");
        assert_eq!(container_name("a_1.x", &job), "kiln-a_1.x-7-2-3");
    }

    #[test]
    fn unset_limits_get_defaults_and_cpus_are_capped_at_the_engines() {
        let body = container_body(
            &job(DockerOptions::default()),
            "sha256:x",
            "true\n".into(),
            "a",
            &host(8.0),
        );
        let host_config = body.host_config.unwrap();
        assert_eq!(host_config.memory, Some(2 << 30));
        assert_eq!(host_config.memory_swap, Some(2 << 30));
        assert_eq!(host_config.nano_cpus, Some(2_000_000_000));
        assert_eq!(host_config.pids_limit, Some(1024));
        assert_eq!(host_config.network_mode.as_deref(), Some("none"));

        let options = DockerOptions {
            memory_bytes: 16 << 20,
            cpus: 4.0,
            pids: 64,
            network: "bridge".into(),
            ..DockerOptions::default()
        };
        let body = container_body(&job(options), "sha256:x", "true\n".into(), "a", &host(2.0));
        let host_config = body.host_config.unwrap();
        assert_eq!(host_config.memory, Some(16 << 20));
        assert_eq!(host_config.nano_cpus, Some(2_000_000_000));
        assert_eq!(host_config.pids_limit, Some(64));
        assert_eq!(host_config.network_mode.as_deref(), Some("bridge"));
    }

    #[test]
    fn reserved_gpus_become_one_device_request_by_id() {
        let plain = container_body(
            &job(DockerOptions::default()),
            "sha256:x",
            "true\n".into(),
            "a",
            &host(2.0),
        );
        assert_eq!(plain.host_config.unwrap().device_requests, None);
        let mut gpu_job = job(DockerOptions::default());
        gpu_job.gpus = vec![0, 2];
        let body = container_body(&gpu_job, "sha256:x", "true\n".into(), "a", &host(2.0));
        let requests = body.host_config.unwrap().device_requests.unwrap();
        assert_eq!(requests.len(), 1);
        assert_eq!(
            requests[0].device_ids,
            Some(vec!["0".to_owned(), "2".to_owned()])
        );
        assert_eq!(requests[0].capabilities, Some(vec![vec!["gpu".to_owned()]]));
        assert_eq!(
            requests[0].count, None,
            "ids and a count exclude each other"
        );
    }

    #[test]
    fn only_the_workspace_and_allowed_mounts_are_mounted_and_nothing_is_privileged() {
        let body = container_body(
            &job(DockerOptions::default()),
            "sha256:x",
            "true\n".into(),
            "a",
            &host(2.0),
        );
        assert_eq!(body.working_dir.as_deref(), Some("/workspace/ml"));
        assert_eq!(body.image.as_deref(), Some("sha256:x"));
        assert_eq!(
            body.env,
            Some(vec![
                "KILN_RUN_ID=7".to_owned(),
                "API_TOKEN=hunter2secret".to_owned()
            ])
        );
        let labels = body.labels.unwrap();
        assert!(
            !format!("{labels:?}{:?}", body.entrypoint).contains("hunter2secret"),
            "secrets reach the container only as variables"
        );
        assert_eq!(labels["kiln.agent"], "a");
        assert_eq!(labels["kiln.run"], "7");
        assert_eq!(labels["kiln.stage"], "train");
        assert_eq!(labels["kiln.attempt"], "3");
        let host_config = body.host_config.unwrap();
        let mounts: Vec<(String, String, bool)> = host_config
            .mounts
            .unwrap()
            .into_iter()
            .map(|m| (m.source.unwrap(), m.target.unwrap(), m.read_only.unwrap()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("/work/ws/7-2-3".into(), "/workspace".into(), false),
                ("/data".into(), "/data".into(), true),
            ]
        );
        assert_eq!(host_config.binds, None);
        assert_eq!(host_config.privileged, Some(false));
        assert_eq!(
            host_config.security_opt,
            Some(vec!["no-new-privileges".to_owned()])
        );
        assert_eq!(host_config.init, Some(true));
    }
}
