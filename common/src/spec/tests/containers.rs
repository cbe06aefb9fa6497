//! The docker settings: `executor`, `pull`, `resources`, `network`, and
//! how stages fall back to `defaults` for each.

use std::collections::BTreeMap;

use super::{
    ContainerSettings, EXECUTOR_LABEL, GpuRequest, NetworkMode, PullPolicy, check, parse_ok,
};

#[test]
fn settings_fall_back_to_defaults_one_field_at_a_time() {
    let pipeline = parse_ok(
        "
        pipeline: docker
        defaults:
          image: kiln/test-busybox:1
          pull: never
          resources: { memory: 2Gi, cpus: 1.5, pids: 512 }
          network: bridge
        stages:
          plain: { commands: [make] }
          custom:
            commands: [make]
            pull: always
            resources: { memory: 512Mi, pids: 64 }
            network: none
        ",
    );
    let [plain, custom] = &pipeline.stages[..] else {
        panic!("{pipeline:#?}")
    };
    assert_eq!(
        plain.container,
        ContainerSettings {
            pull: PullPolicy::Never,
            memory_bytes: Some(2 << 30),
            cpus: Some(1.5),
            pids: Some(512),
            gpus: GpuRequest::None,
            network: NetworkMode::Bridge,
        }
    );
    assert_eq!(
        custom.container,
        ContainerSettings {
            pull: PullPolicy::Always,
            memory_bytes: Some(512 << 20),
            cpus: Some(1.5),
            pids: Some(64),
            gpus: GpuRequest::None,
            network: NetworkMode::None,
        }
    );
}

#[test]
fn without_settings_the_agent_decides_the_limits() {
    let pipeline = parse_ok(
        "
        pipeline: bare
        stages:
          build: { commands: [make], resources: { cpus: 2, memory: 1G } }
          test: { commands: [make test] }
        ",
    );
    let build = &pipeline.stages[0].container;
    assert_eq!(
        (build.cpus, build.memory_bytes),
        (Some(2.0), Some(1_000_000_000))
    );
    assert_eq!(pipeline.stages[1].container, ContainerSettings::default());
    assert_eq!(ContainerSettings::default().pull, PullPolicy::IfMissing);
    assert_eq!(ContainerSettings::default().network, NetworkMode::None);
}

#[test]
fn gpus_are_a_count_devices_or_all_and_fall_back_to_defaults() {
    let pipeline = parse_ok(
        "
        pipeline: gpus
        defaults:
          resources: { gpus: 1 }
        stages:
          one: { commands: [train] }
          pair: { commands: [train], resources: { gpus: [0, 1] } }
          every: { commands: [train], resources: { gpus: all } }
        ",
    );
    let gpus = |idx: usize| &pipeline.stages[idx].container.gpus;
    assert_eq!(gpus(0), &GpuRequest::Count(1));
    assert_eq!(gpus(1), &GpuRequest::Devices(vec![0, 1]));
    assert_eq!(gpus(2), &GpuRequest::All);
    check(
        "
        pipeline: demo
        stages:
          train: { commands: [x], resources: { gpus: 0 } }
        ",
        "kiln.yml:3:46: `gpus` in `resources` of stage `train` must be a count from 1 to 64, \
         a list of device indexes, or `all`; found the number `0`; write a count \
         (`gpus: 1`), device indexes (`gpus: [0, 1]`) or `gpus: all`",
    );
    check(
        "
        pipeline: demo
        stages:
          train: { commands: [x], resources: { gpus: [0, 0] } }
        ",
        "kiln.yml:3:50: `gpus` in `resources` of stage `train` names device 0 twice; \
         write a count (`gpus: 1`), device indexes (`gpus: [0, 1]`) or `gpus: all`",
    );
}

#[test]
fn executor_becomes_an_agent_label() {
    let pipeline = parse_ok(
        "
        pipeline: executors
        stages:
          boxed: { commands: [make], executor: docker, agent: { labels: { role: build } } }
          host: { commands: [make], executor: process }
          same: { commands: [make], executor: docker, agent: { labels: { executor: docker } } }
          any: { commands: [make] }
        ",
    );
    let labels = |idx: usize| &pipeline.stages[idx].agent_labels;
    let expected: BTreeMap<String, String> = [
        (EXECUTOR_LABEL.to_owned(), "docker".to_owned()),
        ("role".to_owned(), "build".to_owned()),
    ]
    .into();
    assert_eq!(labels(0), &expected);
    assert_eq!(labels(1)[EXECUTOR_LABEL], "process");
    assert_eq!(labels(2)[EXECUTOR_LABEL], "docker");
    assert!(labels(3).is_empty());
}

#[test]
fn bad_choices_name_the_choices() {
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], executor: podman }
        ",
        "kiln.yml:3:40: `executor` in stage `build` must be one of: docker, process; \
         found the string `podman`",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], pull: ifmissing }
        ",
        "kiln.yml:3:36: `pull` in stage `build` must be one of: if-missing, always, never; \
         found the string `ifmissing` (did you mean `if-missing`?)",
    );
    check(
        "
        pipeline: demo
        defaults:
          network: host
        stages:
          build: { commands: [make] }
        ",
        "kiln.yml:3:12: `network` in `defaults` must be one of: none, bridge; \
         found the string `host`",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], network: [none] }
        ",
        "kiln.yml:3:39: `network` in stage `build` must be one of: none, bridge; found a list",
    );
}

#[test]
fn executor_conflicting_with_an_agent_label() {
    check(
        "
        pipeline: demo
        stages:
          build:
            commands: [make]
            agent: { labels: { executor: process } }
            executor: docker
        ",
        "kiln.yml:6:15: stage `build` sets `executor: docker` but its `agent.labels` require \
         `executor: process`; remove one of the two",
    );
}

#[test]
fn bad_resources() {
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], resources: { memory: 2gb } }
        ",
        "kiln.yml:3:51: bad memory size `2gb` for `memory` in `resources` of stage `build`; \
         write a whole number with a unit: 512Mi or 512MiB, 2Gi (powers of 1024) or 500M, 1G \
         (powers of 1000)",
    );
    check(
        "
        pipeline: demo
        defaults:
          resources: { memory: 4Mi }
        stages:
          build: { commands: [make] }
        ",
        "kiln.yml:3:24: `memory` in `resources` of `defaults` is below docker's minimum of 6Mi; \
         ask for at least 6Mi",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], resources: { memory: [1] } }
        ",
        "kiln.yml:3:51: `memory` in `resources` of stage `build` must be a memory size; found a \
         list; write a whole number with a unit: 512Mi or 512MiB, 2Gi (powers of 1024) or 500M, \
         1G (powers of 1000)",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], resources: { cpus: 0 } }
        ",
        "kiln.yml:3:49: `cpus` in `resources` of stage `build` must be a number of cpus of at \
         least 0.01, like 1.5 or 2; found the number `0`",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], resources: { cpus: \"2\" } }
        ",
        "kiln.yml:3:49: `cpus` in `resources` of stage `build` must be a number of cpus of at \
         least 0.01, like 1.5 or 2; found the string `2`",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], resources: { pids: 1.5 } }
        ",
        "kiln.yml:3:49: `pids` in `resources` of stage `build` must be a whole number of \
         processes from 1 up, like 512; found the number `1.5`",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], resources: { memroy: 1Gi } }
        ",
        "kiln.yml:3:43: unknown key `memroy` in `resources` of stage `build`; expected one of: \
         memory, cpus, pids, gpus (did you mean `memory`?)",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], resources: 2Gi }
        ",
        "kiln.yml:3:41: `resources` in stage `build` must be a mapping; found the string `2Gi`",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], resources: { pids: 1, pids: 2 } }
        ",
        "kiln.yml:3:52: duplicate key `pids` in `resources` of stage `build`; remove one of the \
         two",
    );
}
