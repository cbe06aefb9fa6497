//! Percentiles and a process's memory, shared by the modes.

use anyhow::{Context, Result};

/// The `p` quantile (0.0..=1.0) of `values` by nearest rank below, the way
/// the simulated mode has always reported it; 0 for no values.
pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

/// Resident set size of a process, in MB.
pub(crate) fn rss_mb(pid: i32) -> Result<f64> {
    status_mb(pid, "VmRSS:")
}

/// Resets a process's peak RSS to its current RSS (`clear_refs` value 5,
/// Linux ≥ 4.0), so a later `kiln_tests::peak_rss_mb` (VmHWM) covers one phase only. Returns
/// whether the kernel accepted it.
pub(crate) fn reset_peak_rss(pid: i32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn status_mb(pid: i32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("{field} missing from /proc/{pid}/status"))?;
    Ok(kb / 1024.0)
}
