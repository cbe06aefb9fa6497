//! What a test does when something it needs outside Kiln (the Docker
//! engine, an offline image, Prometheus, docker-compose) is missing: it
//! fails, saying what to install. `tests/setup.sh` installs and builds all
//! of it; only `KILN_ALLOW_SKIP=1` turns a missing prerequisite into a
//! printed skip, so a green run never hides an untested part.

use std::io::Write;

use anyhow::{Result, bail};

/// The opt-out: `KILN_ALLOW_SKIP=1` lets a test skip when a prerequisite is
/// missing. Never set by `.ci/run` or the README's test command.
pub const ALLOW_SKIP_VAR: &str = "KILN_ALLOW_SKIP";

/// Whether a test may skip for a missing prerequisite.
pub fn allowed() -> bool {
    std::env::var(ALLOW_SKIP_VAR).is_ok_and(|value| value == "1")
}

/// A prerequisite of `test` is missing for `reason`: an error naming the
/// fix, or — with [`ALLOW_SKIP_VAR`] set — `Ok(())` after printing
/// `SKIPPED` to the real stderr (the harness captures `eprintln!`, and a
/// skip must be seen). The caller returns early on `Ok`.
pub fn missing(test: &str, reason: &str) -> Result<()> {
    if !allowed() {
        bail!(
            "{test}: {reason}; run tests/setup.sh, which installs and builds every test \
             prerequisite (or set {ALLOW_SKIP_VAR}=1 to skip such tests knowingly)"
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {reason} ({ALLOW_SKIP_VAR}=1 is set)"
    );
    Ok(())
}
