//! What this machine offers stages that ask for resources: its CPUs and
//! memory, read from the system, and its GPUs, as `--gpus` declares them
//! or as `nvidia-smi` lists them. Sent in every hello; the coordinator
//! places and counts by it.

use std::process::Command;

use kiln_proto::v1::Resources;

/// The machine as the hello declares it.
pub(crate) fn machine(gpus: &[u32]) -> Resources {
    Resources {
        cpus: std::thread::available_parallelism().map_or(0.0, |n| n.get() as f64),
        memory_bytes: std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| mem_total(&text))
            .unwrap_or(0),
        gpus: gpus.to_vec(),
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The GPU devices `nvidia-smi` lists; none where it is missing or fails
/// (a machine without the NVIDIA driver has no GPUs to offer).
pub fn detect_gpus() -> Vec<u32> {
    let Ok(output) = Command::new("nvidia-smi")
        .args(["--query-gpu=index", "--format=csv,noheader"])
        .output()
    else {
        return Vec::new();
    };
    if !output.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// `--gpus`: `auto` (ask `nvidia-smi`), `none`, a count (`2` = devices 0
/// and 1) or device indexes (`0,2`).
pub fn parse_gpus(text: &str) -> Result<Option<Vec<u32>>, String> {
    let hint = "write auto, none, a count like 2, or device indexes like 0,2";
    match text.trim() {
        "auto" => Ok(None),
        "none" | "0" => Ok(Some(Vec::new())),
        list if list.contains(',') => list
            .split(',')
            .map(|index| {
                index
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| format!("`{index}` is not a device index; {hint}"))
            })
            .collect::<Result<Vec<u32>, String>>()
            .map(Some),
        count => count
            .parse::<u32>()
            .map(|n| Some((0..n).collect()))
            .map_err(|_| format!("`{count}` is not a gpu count; {hint}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_flag_and_meminfo() {
        assert_eq!(parse_gpus("auto"), Ok(None));
        assert_eq!(parse_gpus("none"), Ok(Some(vec![])));
        assert_eq!(parse_gpus("2"), Ok(Some(vec![0, 1])));
        assert_eq!(parse_gpus("0,2"), Ok(Some(vec![0, 2])));
        assert!(parse_gpus("two").unwrap_err().contains("not a gpu count"));
        assert!(parse_gpus("0,x").unwrap_err().contains("`x`"));
        assert_eq!(
            mem_total("MemFree: 1 kB\nMemTotal:       16384 kB\n"),
            Some(16 << 20)
        );
        assert_eq!(mem_total("nothing"), None);
        let here = machine(&[3]);
        assert!(here.cpus >= 1.0);
        assert!(here.memory_bytes > 0, "this is Linux");
        assert_eq!(here.gpus, vec![3]);
    }
}
