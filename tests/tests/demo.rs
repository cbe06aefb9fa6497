//! `kiln demo` end to end: the customer-behavior example trained, tested
//! and evaluated in Docker on the real Caravan data, accepted live in
//! staging and released to production; an openly injected serving fault
//! stopped in staging by the live answers; the next release rolled out to
//! production as a canary through the example's router, step by step with
//! the coordinator's analysis, to 100%; an upstream data fault in
//! production rolled back by the coordinator's monitor, the restored
//! release watched, and production frozen with an alert blaming the data.
//!
//! Needs the Docker engine and the `kiln/python-ml:bookworm` image (which
//! `tests/setup.sh` builds; the demo builds it itself when missing, which
//! this test does not wait for).

use std::process::Command;

use anyhow::Result;
use kiln_tests::binary;

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_promotes_a_model_and_rolls_back_a_degraded_one() -> Result<()> {
    const TEST: &str = "the_demo_promotes_a_model_and_rolls_back_a_degraded_one";
    if kiln_tests::docker::engine(TEST).await?.is_none() {
        return Ok(());
    }
    let image = Command::new("docker")
        .args(["image", "inspect", "kiln/python-ml:bookworm"])
        .output()?;
    if !image.status.success() {
        kiln_tests::skip::missing(
            TEST,
            "kiln/python-ml:bookworm is missing (deploy/images/python-ml/build.sh builds it)",
        )?;
        return Ok(());
    }
    let data = tempfile::tempdir()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(binary("kiln"))
        .args(["demo", "--data-dir"])
        .arg(data.path().join("demo"))
        .current_dir(&root)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let all = format!("{stdout}\n{stderr}");
    assert_eq!(output.status.code(), Some(0), "{all}");
    assert!(
        all.contains("first deployment, gated on thresholds alone"),
        "{all}"
    );
    assert!(all.contains("INJECTING A FAULT"), "{all}");
    assert!(
        all.contains("was stopped in staging: its offline metrics pass"),
        "{all}"
    );
    assert!(all.contains("live_accuracy"), "{all}");
    // The second run restored the unit tests' virtualenv that the first
    // built from PyPI, as the agent logged it.
    let cache = all
        .lines()
        .find(|line| line.contains("unit-tests keeps its virtualenv"))
        .unwrap_or_else(|| panic!("no cache line: {all}"));
    assert!(
        cache.contains("(miss; saved after the stage succeeds)")
            && cache.contains("(restored from "),
        "{cache}"
    );
    println!("{cache}");
    // The canary act, as the coordinator recorded it while it ran: the
    // first step's weight, its analysis rounds with the router's values,
    // and the decision. (The demo exits 0 only if it was promoted.)
    assert!(
        all.contains("canary step 1 of 3: release")
            && all.contains("takes 25% of production's traffic"),
        "{all}"
    );
    assert!(
        all.contains("analysis at 25%: router_error_ratio=")
            && all.contains("analysis at 50%: router_error_ratio="),
        "{all}"
    );
    assert!(all.contains("canary decision: promoted to 100%"), "{all}");
    // The production history, read back from the coordinator, keeps the
    // rollout on the release it promoted (later rolled back by the monitor).
    let canaried = all
        .lines()
        .find(|line| line.contains(" canary 25%->50%->100% promoted after "))
        .unwrap_or_else(|| panic!("no promoted canary in the history: {all}"));
    assert!(canaried.contains("rolled back"), "{canaried}");
    let rounds: u32 = canaried
        .split(" promoted after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no round count in {canaried}"));
    assert!(rounds >= 2, "analysed at 25% and at 50%: {canaried}");
    assert!(
        all.contains("was rolled back: 3 consecutive breaches"),
        "{all}"
    );
    assert!(all.contains("ALERT KilnRollback"), "{all}");
    assert!(
        all.contains("production is FROZEN: release") && all.contains("likely the data"),
        "{all}"
    );
    assert!(all.contains("ALERT KilnDataSuspected"), "{all}");
    assert!(
        all.contains("live        recall=") && all.contains("(restored by rollback)"),
        "{all}"
    );
    Ok(())
}
