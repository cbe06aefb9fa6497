//! What a stage asks of an agent besides its labels — an executor that can
//! run it, CPUs, memory, GPUs — and whether an agent has that free. Pure:
//! the pool keeps the books, dispatch asks.
//!
//! **Architecture Invariant:** a stage goes only to an agent that can run
//! it: a stage without `image:` needs a host process (an agent whose
//! `executor` label is `process`), and a stage's `resources:` must be free
//! on the agent, counted like slots. A GPU is never given to two stages,
//! and a stage asking for GPUs never goes where none are declared.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kiln_common::spec::{self, EXECUTOR_LABEL, GpuRequest};
use kiln_proto::v1 as pb;

/// What one stage needs of the agent that runs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Need {
    /// No image: only a host process can run it.
    pub(super) host_only: bool,
    /// `services:` start beside a container: only a docker agent can.
    pub(super) docker_only: bool,
    pub(super) cpus: f64,
    pub(super) memory_bytes: u64,
    pub(super) gpus: GpuRequest,
}

impl Need {
    pub(super) fn of(stage: &spec::Stage) -> Self {
        Self {
            host_only: stage.image.is_none() && !stage.agent_labels.contains_key(EXECUTOR_LABEL),
            docker_only: !stage.services.is_empty(),
            cpus: stage.container.cpus.unwrap_or(0.0),
            memory_bytes: stage.container.memory_bytes.unwrap_or(0),
            gpus: stage.container.gpus.clone(),
        }
    }

    /// Says what the stage needs, for a stage that waits.
    pub(super) fn describe(&self, labels: &BTreeMap<String, String>) -> String {
        let mut wants = Vec::new();
        if self.host_only {
            wants.push(format!(
                "`{EXECUTOR_LABEL}: process` (it names no image, so it runs as a host process)"
            ));
        }
        if self.docker_only {
            wants.push(format!(
                "`{EXECUTOR_LABEL}: docker` (its services start beside a container)"
            ));
        }
        if !labels.is_empty() {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            wants.push(format!("labels {}", labels.join(",")));
        }
        if self.cpus > 0.0 {
            wants.push(format!("{} cpus", self.cpus));
        }
        if self.memory_bytes > 0 {
            wants.push(format!("{} MiB of memory", self.memory_bytes >> 20));
        }
        match &self.gpus {
            GpuRequest::None => {}
            GpuRequest::Count(n) => wants.push(format!("{n} gpus")),
            GpuRequest::Devices(devices) => wants.push(format!("gpus {devices:?}")),
            GpuRequest::All => wants.push("every gpu of an agent with at least one".into()),
        }
        if wants.is_empty() {
            return "any agent".into();
        }
        wants.join(", ")
    }
}

/// What an agent's machine declared (its hello). Zero CPUs or memory means
/// "not declared": the agent is not limited by them.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Machine {
    pub(super) cpus: f64,
    pub(super) memory_bytes: u64,
    pub(super) gpus: Vec<u32>,
}

impl Machine {
    pub(super) fn from_hello(resources: Option<&pb::Resources>) -> Self {
        let Some(resources) = resources else {
            return Self::default();
        };
        let mut gpus = resources.gpus.clone();
        gpus.sort_unstable();
        gpus.dedup();
        Self {
            cpus: resources.cpus.max(0.0),
            memory_bytes: resources.memory_bytes,
            gpus,
        }
    }

    pub(super) fn view(&self) -> pb::Resources {
        pb::Resources {
            cpus: self.cpus,
            memory_bytes: self.memory_bytes,
            gpus: self.gpus.clone(),
        }
    }

    /// Why an agent with these labels could never run `need`, even with
    /// nothing else running; `None` if it could.
    pub(super) fn never(&self, labels: &BTreeMap<String, String>, need: &Need) -> Option<String> {
        let mut why = String::new();
        if need.host_only
            && let Some(kind) = labels.get(EXECUTOR_LABEL)
            && kind != "process"
        {
            let _ = write!(why, "runs stages in {kind}");
        } else if need.docker_only
            && labels.get(EXECUTOR_LABEL).map(String::as_str) != Some("docker")
        {
            let kind = labels
                .get(EXECUTOR_LABEL)
                .map_or("no executor", String::as_str);
            let _ = write!(why, "runs stages as {kind}, not in docker");
        } else if self.cpus > 0.0 && need.cpus > self.cpus {
            let _ = write!(why, "has {} cpus", self.cpus);
        } else if self.memory_bytes > 0 && need.memory_bytes > self.memory_bytes {
            let _ = write!(why, "has {} MiB of memory", self.memory_bytes >> 20);
        } else {
            let gpus_short = match &need.gpus {
                GpuRequest::None => false,
                GpuRequest::Count(n) => self.gpus.len() < *n as usize,
                GpuRequest::Devices(devices) => devices.iter().any(|d| !self.gpus.contains(d)),
                GpuRequest::All => self.gpus.is_empty(),
            };
            if gpus_short {
                let _ = write!(why, "has gpus {:?}", self.gpus);
            }
        }
        (!why.is_empty()).then_some(why)
    }

    /// What `need` reserves here with `reserved` already taken, or `None`
    /// if that much is not free now.
    pub(super) fn reserve<'a>(
        &self,
        need: &Need,
        reserved: impl Iterator<Item = &'a Reservation> + Clone,
    ) -> Option<Reservation> {
        let used_cpus: f64 = reserved.clone().map(|r| r.cpus).sum();
        if self.cpus > 0.0 && need.cpus > 0.0 && used_cpus + need.cpus > self.cpus + 1e-9 {
            return None;
        }
        let used_memory: u64 = reserved.clone().map(|r| r.memory_bytes).sum();
        if self.memory_bytes > 0
            && used_memory.saturating_add(need.memory_bytes) > self.memory_bytes
        {
            return None;
        }
        let taken: Vec<u32> = reserved.flat_map(|r| r.gpus.iter().copied()).collect();
        let free = self.gpus.iter().copied().filter(|gpu| !taken.contains(gpu));
        let gpus = match &need.gpus {
            GpuRequest::None => Vec::new(),
            GpuRequest::Count(n) => {
                let picked: Vec<u32> = free.take(*n as usize).collect();
                (picked.len() == *n as usize).then_some(picked)?
            }
            GpuRequest::Devices(devices) => {
                let free: Vec<u32> = free.collect();
                devices
                    .iter()
                    .all(|device| free.contains(device))
                    .then(|| devices.clone())?
            }
            GpuRequest::All => {
                (!self.gpus.is_empty() && taken.is_empty()).then(|| self.gpus.clone())?
            }
        };
        Some(Reservation {
            cpus: need.cpus,
            memory_bytes: need.memory_bytes,
            gpus,
        })
    }
}

/// What a running stage holds of its agent.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Reservation {
    pub(super) cpus: f64,
    pub(super) memory_bytes: u64,
    pub(super) gpus: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(cpus: f64, gpus: &[u32]) -> Machine {
        Machine {
            cpus,
            memory_bytes: 8 << 30,
            gpus: gpus.to_vec(),
        }
    }

    fn need(cpus: f64, gpus: GpuRequest) -> Need {
        Need {
            cpus,
            gpus,
            ..Need::default()
        }
    }

    #[test]
    fn cpus_and_memory_are_counted_like_slots() {
        let two = machine(2.0, &[]);
        let first = two
            .reserve(&need(2.0, GpuRequest::None), [].iter())
            .unwrap();
        assert!(
            two.reserve(&need(2.0, GpuRequest::None), [first.clone()].iter())
                .is_none(),
            "two 2-cpu stages never share a 2-cpu agent"
        );
        assert!(
            two.reserve(&need(0.0, GpuRequest::None), [first].iter())
                .is_some(),
            "a stage that asks for nothing still fits"
        );
        assert_eq!(
            two.never(&BTreeMap::new(), &need(4.0, GpuRequest::None)),
            Some("has 2 cpus".into())
        );
        let undeclared = Machine::default();
        assert!(
            undeclared
                .reserve(&need(64.0, GpuRequest::None), [].iter())
                .is_some(),
            "undeclared cpus do not limit"
        );
        let big = Need {
            memory_bytes: 16 << 30,
            ..Need::default()
        };
        assert_eq!(
            two.never(&BTreeMap::new(), &big),
            Some("has 8192 MiB of memory".into())
        );
    }

    #[test]
    fn gpus_are_given_to_one_stage_at_a_time_and_never_invented() {
        let none = machine(8.0, &[]);
        assert_eq!(
            none.never(&BTreeMap::new(), &need(0.0, GpuRequest::Count(1))),
            Some("has gpus []".into())
        );
        assert!(
            none.reserve(&need(0.0, GpuRequest::All), [].iter())
                .is_none()
        );
        let pair = machine(8.0, &[0, 1]);
        let first = pair
            .reserve(&need(0.0, GpuRequest::Count(1)), [].iter())
            .unwrap();
        assert_eq!(first.gpus, vec![0]);
        let second = pair
            .reserve(&need(0.0, GpuRequest::Count(1)), [first.clone()].iter())
            .unwrap();
        assert_eq!(second.gpus, vec![1]);
        let both = [first.clone(), second];
        assert!(
            pair.reserve(&need(0.0, GpuRequest::Count(1)), both.iter())
                .is_none()
        );
        assert!(
            pair.reserve(
                &need(0.0, GpuRequest::Devices(vec![0])),
                [first.clone()].iter()
            )
            .is_none(),
            "device 0 is taken"
        );
        assert_eq!(
            pair.reserve(
                &need(0.0, GpuRequest::Devices(vec![1])),
                [first.clone()].iter()
            )
            .unwrap()
            .gpus,
            vec![1]
        );
        assert!(
            pair.reserve(&need(0.0, GpuRequest::All), [first].iter())
                .is_none(),
            "all means all free"
        );
        assert_eq!(
            pair.reserve(&need(0.0, GpuRequest::All), [].iter())
                .unwrap()
                .gpus,
            vec![0, 1]
        );
        assert!(
            pair.never(&BTreeMap::new(), &need(0.0, GpuRequest::Devices(vec![2])))
                .is_some()
        );
    }

    #[test]
    fn a_stage_without_an_image_needs_a_host_process() {
        let host_only = Need {
            host_only: true,
            ..Need::default()
        };
        let docker: BTreeMap<String, String> =
            [(EXECUTOR_LABEL.to_owned(), "docker".to_owned())].into();
        let process: BTreeMap<String, String> =
            [(EXECUTOR_LABEL.to_owned(), "process".to_owned())].into();
        let any = Machine::default();
        assert_eq!(
            any.never(&docker, &host_only),
            Some("runs stages in docker".into())
        );
        assert_eq!(any.never(&process, &host_only), None);
        assert!(
            host_only
                .describe(&BTreeMap::new())
                .contains("it names no image")
        );
    }

    #[test]
    fn a_stage_with_services_needs_a_docker_agent() {
        let with_services = Need {
            docker_only: true,
            ..Need::default()
        };
        let docker: BTreeMap<String, String> =
            [(EXECUTOR_LABEL.to_owned(), "docker".to_owned())].into();
        let process: BTreeMap<String, String> =
            [(EXECUTOR_LABEL.to_owned(), "process".to_owned())].into();
        let any = Machine::default();
        assert_eq!(any.never(&docker, &with_services), None);
        assert_eq!(
            any.never(&process, &with_services),
            Some("runs stages as process, not in docker".into())
        );
        assert!(
            with_services
                .describe(&BTreeMap::new())
                .contains("its services start beside a container")
        );
    }
}
