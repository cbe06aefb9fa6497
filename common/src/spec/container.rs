//! The docker settings of a stage (`executor`, `pull`, `resources`,
//! `network`): their readers, and how a stage's settings fall back to
//! `defaults` one field at a time.

use saphyr::Scalar;

use super::schema::Path;
use super::suggest::did_you_mean;
use super::yaml::Node;
use super::{ContainerSettings, GpuRequest, NetworkMode, Position, Problem, PullPolicy};

/// Docker refuses memory limits below 6 MiB.
const MIN_MEMORY_BYTES: u64 = 6 * 1024 * 1024;
/// Docker counts CPUs in hundredths.
const MIN_CPUS: f64 = 0.01;
const MEMORY_HINT: &str = "write a whole number with a unit: 512Mi or 512MiB, 2Gi (powers of 1024) or 500M, 1G (powers of 1000)";

/// Container settings as written; `None` where a mapping leaves one out.
#[derive(Clone, Default)]
pub(super) struct ContainerDraft {
    pub(super) pull: Option<PullPolicy>,
    pub(super) memory_bytes: Option<u64>,
    pub(super) cpus: Option<f64>,
    pub(super) pids: Option<i64>,
    pub(super) gpus: Option<GpuRequest>,
    pub(super) network: Option<NetworkMode>,
}

impl ContainerDraft {
    /// Each setting from the stage, else from `defaults`, else the built-in
    /// default (`None` limits: the agent's own).
    pub(super) fn or_defaults(self, defaults: &ContainerDraft) -> ContainerSettings {
        ContainerSettings {
            pull: self.pull.or(defaults.pull).unwrap_or_default(),
            memory_bytes: self.memory_bytes.or(defaults.memory_bytes),
            cpus: self.cpus.or(defaults.cpus),
            pids: self.pids.or(defaults.pids),
            gpus: self
                .gpus
                .or_else(|| defaults.gpus.clone())
                .unwrap_or_default(),
            network: self.network.or(defaults.network).unwrap_or_default(),
        }
    }
}

/// `executor: docker|process` of a stage: the value of the agent label it
/// requires, and where it was written (a conflict with `agent.labels` is
/// blamed on it).
pub(super) fn executor(
    value: Node<'_>,
    path: &Path<'_>,
) -> Result<(&'static str, Position), Problem> {
    let kind = choice(value, path, &[("docker", "docker"), ("process", "process")])?;
    Ok((kind, value.position()))
}

/// `pull: if-missing|always|never`.
pub(super) fn pull(value: Node<'_>, path: &Path<'_>) -> Result<PullPolicy, Problem> {
    choice(
        value,
        path,
        &[
            ("if-missing", PullPolicy::IfMissing),
            ("always", PullPolicy::Always),
            ("never", PullPolicy::Never),
        ],
    )
}

/// `network: none|bridge`.
pub(super) fn network(value: Node<'_>, path: &Path<'_>) -> Result<NetworkMode, Problem> {
    choice(
        value,
        path,
        &[("none", NetworkMode::None), ("bridge", NetworkMode::Bridge)],
    )
}

/// `memory:` bytes, plain or with a unit: `512Mi`, `2Gi`, `1G`, `1073741824`.
pub(super) fn memory(value: Node<'_>, path: &Path<'_>) -> Result<u64, Problem> {
    let Some(text) = value.text() else {
        return Err(Problem::new(
            value.position(),
            format!(
                "{path} must be a memory size; found {}; {MEMORY_HINT}",
                value.describe()
            ),
        ));
    };
    let Some(bytes) = parse_memory(text) else {
        return Err(Problem::new(
            value.position(),
            format!("bad memory size `{text}` for {path}; {MEMORY_HINT}"),
        ));
    };
    if bytes < MIN_MEMORY_BYTES {
        return Err(Problem::new(
            value.position(),
            format!("{path} is below docker's minimum of 6Mi; ask for at least 6Mi"),
        ));
    }
    Ok(bytes)
}

/// `cpus:` a number of CPUs, fractions allowed: `1.5`, `2`.
pub(super) fn cpus(value: Node<'_>, path: &Path<'_>) -> Result<f64, Problem> {
    let cpus = match value.scalar() {
        Some(Scalar::Integer(n)) => Some(n as f64),
        Some(Scalar::FloatingPoint(n)) => Some(n.into_inner()),
        _ => None,
    };
    match cpus {
        Some(cpus) if cpus.is_finite() && cpus >= MIN_CPUS => Ok(cpus),
        _ => Err(Problem::new(
            value.position(),
            format!(
                "{path} must be a number of cpus of at least {MIN_CPUS}, like 1.5 or 2; found {}",
                value.describe()
            ),
        )),
    }
}

/// `pids:` the most processes the stage may run at once.
pub(super) fn pids(value: Node<'_>, path: &Path<'_>) -> Result<i64, Problem> {
    match value.scalar() {
        Some(Scalar::Integer(n)) if n >= 1 => Ok(n),
        _ => Err(Problem::new(
            value.position(),
            format!(
                "{path} must be a whole number of processes from 1 up, like 512; found {}",
                value.describe()
            ),
        )),
    }
}

/// Most GPU devices one machine is expected to have.
const MAX_GPU_INDEX: i64 = 63;
const GPUS_HINT: &str = "write a count (`gpus: 1`), device indexes (`gpus: [0, 1]`) or `gpus: all`";

/// `gpus:` a count of GPUs, a list of device indexes, or `all`.
pub(super) fn gpus(value: Node<'_>, path: &Path<'_>) -> Result<GpuRequest, Problem> {
    let bad = |what: String| Problem::new(value.position(), format!("{what}; {GPUS_HINT}"));
    if let Some(items) = value.items() {
        let mut devices = Vec::new();
        for item in items {
            match item.scalar() {
                Some(Scalar::Integer(n)) if (0..=MAX_GPU_INDEX).contains(&n) => {
                    let n = n as u32;
                    if devices.contains(&n) {
                        return Err(Problem::new(
                            item.position(),
                            format!("{path} names device {n} twice; {GPUS_HINT}"),
                        ));
                    }
                    devices.push(n);
                }
                _ => {
                    return Err(Problem::new(
                        item.position(),
                        format!(
                            "{path} lists device indexes from 0 to {MAX_GPU_INDEX}; found {}; {GPUS_HINT}",
                            item.describe()
                        ),
                    ));
                }
            }
        }
        if devices.is_empty() {
            return Err(bad(format!(
                "{path} lists no device; leave `gpus` out for none"
            )));
        }
        return Ok(GpuRequest::Devices(devices));
    }
    match value.scalar() {
        Some(Scalar::Integer(n)) if (1..=MAX_GPU_INDEX + 1).contains(&n) => {
            Ok(GpuRequest::Count(n as u32))
        }
        _ if value.text() == Some("all") => Ok(GpuRequest::All),
        _ => Err(bad(format!(
            "{path} must be a count from 1 to {}, a list of device indexes, or `all`; found {}",
            MAX_GPU_INDEX + 1,
            value.describe()
        ))),
    }
}

/// One of `options`, by its spelling; anything else names them all.
fn choice<T: Copy>(value: Node<'_>, path: &Path<'_>, options: &[(&str, T)]) -> Result<T, Problem> {
    let text = value.text();
    if let Some(&(_, chosen)) = options.iter().find(|(name, _)| Some(*name) == text) {
        return Ok(chosen);
    }
    let names = options.iter().map(|(name, _)| *name);
    let expected = names.clone().collect::<Vec<_>>().join(", ");
    let hint = text
        .map(|text| did_you_mean(text, names))
        .unwrap_or_default();
    Err(Problem::new(
        value.position(),
        format!(
            "{path} must be one of: {expected}; found {}{hint}",
            value.describe()
        ),
    ))
}

/// Bytes in `text`, in Kiln's one size syntax ([`crate::size`]); `None`
/// on anything else or overflow.
fn parse_memory(text: &str) -> Option<u64> {
    crate::size::parse(text).ok()
}

#[cfg(test)]
mod tests {
    use super::parse_memory;

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory("512Mi"), Some(512 << 20));
        assert_eq!(parse_memory("2Gi"), Some(2 << 30));
        assert_eq!(parse_memory("1G"), Some(1_000_000_000));
        assert_eq!(parse_memory("64k"), Some(64_000));
        assert_eq!(parse_memory("1048576"), Some(1 << 20));
        assert_eq!(parse_memory("512MiB"), Some(512 << 20));
        assert_eq!(parse_memory("2GB"), Some(2_000_000_000));
        for bad in ["", "Gi", "2gi", "1.5Gi", "-1", "2 Gi", "99999999999Ti"] {
            assert_eq!(parse_memory(bad), None, "{bad}");
        }
    }
}
