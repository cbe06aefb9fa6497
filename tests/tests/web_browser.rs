//! The web dashboard in a real headless Chromium, driven over WebDriver:
//! watch a run's DAG and a live log that survives a cut connection,
//! approve a gate, roll back an environment, and see only the buttons a
//! role allows. Needs `chromium` and `chromium-driver` (the tests fail
//! and say so without them); screenshots go to `target/web-screenshots/`.

mod web_common;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_proto::v1 as pb;
use kiln_tests::browser::{Browser, Proxy, is_png};
use kiln_tests::{Repo, create_token, get_run, register_and_run, stage, wait_run};
use web_common::{GATED, LIVE, SHOP, audit, base, farm, run_state, stage_state, wait_stage};

#[tokio::test(flavor = "multi_thread")]
async fn browser_watches_a_running_dag_and_a_live_log_that_survives_a_cut() -> Result<()> {
    let farm = farm()?;
    let proxy = Proxy::start(&farm.coordinator.http).await?;
    let site = proxy.url();
    let browser = Browser::start("live").await?;
    browser
        .sign_in(&site, &farm.coordinator.admin_token)
        .await?;
    let repo = Repo::new(LIVE)?;
    let run = register_and_run(&farm.coordinator, &repo).await?;

    browser.goto(&format!("{site}/runs/{run}")).await?;
    let state = |name: &str| {
        format!(
            "const g = document.querySelector('svg.dag g[data-stage=\"{name}\"]'); return g ? g.dataset.state : null;"
        )
    };
    browser
        .wait_js(
            Duration::from_secs(30),
            "train running in the DAG",
            "const g = document.querySelector('svg.dag g[data-stage=\"train\"]'); return g && g.dataset.state === 'running';",
        )
        .await?;
    assert_eq!(browser.js(&state("prepare")).await?, "succeeded");
    assert_eq!(browser.js(&state("report")).await?, "pending");
    let edges = browser
        .js("return document.querySelectorAll('svg.dag path.edge').length")
        .await?;
    assert_eq!(edges, 2);
    assert!(is_png(&browser.screenshot("run").await?));

    browser
        .goto(&format!("{site}/runs/{run}/stages/train"))
        .await?;
    let count = "return document.querySelectorAll('#log li').length";
    browser
        .wait_js(
            Duration::from_secs(20),
            "live lines",
            "return document.getElementById('live-status').dataset.state === 'live' && document.querySelectorAll('#log li code').length >= 8",
        )
        .await?;
    let before_cut = browser.js(count).await?.as_u64().unwrap();
    proxy.cut();
    browser
        .wait_js(
            Duration::from_secs(10),
            "the page to notice the cut",
            "return document.getElementById('live-status').dataset.state === 'reconnecting'",
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut client = farm.coordinator.client().await?;
    let during = get_run(&mut client, run).await?;
    assert_eq!(
        stage_state(&during, "train"),
        pb::StageState::Running,
        "the cut must fall inside the stage's output for this test to mean anything"
    );
    proxy.restore();
    browser
        .wait_js(
            Duration::from_secs(40),
            "the end of the stage's log",
            "return document.getElementById('live-status').dataset.state === 'ended'",
        )
        .await?;
    let texts = browser
        .js("return Array.from(document.querySelectorAll('#log li code')).map(c => c.textContent)")
        .await?;
    let texts: Vec<String> = serde_json::from_value(texts)?;
    let output: Vec<&String> = texts.iter().filter(|t| t.starts_with("line ")).collect();
    let expected: Vec<String> = (1..=60).map(|i| format!("line {i}")).collect();
    assert_eq!(
        output,
        expected.iter().collect::<Vec<_>>(),
        "every line once, in order"
    );
    assert!(before_cut < texts.len() as u64);
    // Numbered 1.. without a gap: nothing from other lines slipped in twice.
    let ids = browser
        .js("return Array.from(document.querySelectorAll('#log li')).map(li => li.id)")
        .await?;
    let ids: Vec<String> = serde_json::from_value(ids)?;
    let want: Vec<String> = (1..=ids.len()).map(|n| format!("L{n}")).collect();
    assert_eq!(ids, want);
    let green = browser
        .js("return document.querySelectorAll('#log li code span.f2').length")
        .await?;
    assert_eq!(green, 30, "ANSI green on every even line");
    browser
        .wait_js(
            Duration::from_secs(10),
            "the stage's state to follow",
            "return document.getElementById('stage-state').textContent === 'succeeded'",
        )
        .await?;
    assert!(is_png(&browser.screenshot("stage").await?));
    browser.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_approves_a_waiting_gate_and_the_run_goes_on() -> Result<()> {
    let farm = farm()?;
    let site = base(&farm);
    let url = farm.coordinator.url();
    let operator = create_token(
        &url,
        &farm.coordinator.admin_token,
        "ops",
        pb::Role::Operator,
    )
    .await?;
    let repo = Repo::new(GATED)?;
    let run = register_and_run(&farm.coordinator, &repo).await?;
    let browser = Browser::start("approve").await?;
    browser.sign_in(&site, &operator).await?;
    browser.goto(&format!("{site}/runs/{run}")).await?;
    browser
        .wait_js(
            Duration::from_secs(30),
            "the approve button",
            "return document.querySelector('button.approve[data-gate=\"signoff\"]') !== null",
        )
        .await?;
    let gate = browser
        .js("return document.querySelector('svg.dag g[data-stage=\"signoff\"]').getAttribute('class')")
        .await?;
    assert_eq!(
        gate, "node gate awaiting_approval",
        "a gate is drawn as one"
    );
    let ship = browser
        .js("return document.querySelector('svg.dag g[data-stage=\"ship\"]').getAttribute('class')")
        .await?;
    assert_eq!(
        ship, "node environment pending",
        "so is an environment stage"
    );
    assert!(is_png(&browser.screenshot("waiting").await?));
    browser
        .client
        .find(fantoccini::Locator::Css(
            "button.approve[data-gate=\"signoff\"]",
        ))
        .await?
        .click()
        .await?;
    browser
        .wait_js(
            Duration::from_secs(30),
            "ship to succeed on the page",
            "const g = document.querySelector('svg.dag g[data-stage=\"ship\"]'); return g && g.dataset.state === 'succeeded';",
        )
        .await?;
    let mut client = farm.coordinator.client().await?;
    let done = wait_run(&mut client, run, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&done), pb::RunState::Succeeded);
    let gate = stage(&done, "signoff")
        .gate
        .clone()
        .context("no gate decision")?;
    assert_eq!(gate.decided_by, "ops");
    let entries = audit(&farm).await?;
    let approved = entries
        .iter()
        .find(|e| e.method == "/kiln.v1.ControlService/ApproveStage")
        .context("the approval is not in the audit log")?;
    assert_eq!(
        (approved.principal.as_str(), approved.outcome.as_str()),
        ("ops", "OK")
    );
    assert_eq!(approved.target, format!("run {run} stage signoff"));
    assert!(is_png(&browser.screenshot("approved").await?));
    browser.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_rolls_back_an_environment_and_sees_the_history_change() -> Result<()> {
    let farm = farm()?;
    let site = base(&farm);
    let repo = Repo::new(SHOP)?;
    let mut client = farm.coordinator.client().await?;
    for metrics in [
        r#"{"accuracy": 0.91, "recall": 0.62}"#,
        r#"{"accuracy": 0.87, "recall": 0.48}"#,
    ] {
        repo.commit("metrics.json", metrics)?;
        let run = register_and_run(&farm.coordinator, &repo).await?;
        let done = wait_run(&mut client, run, Duration::from_secs(30)).await?;
        assert_eq!(run_state(&done), pb::RunState::Succeeded);
    }
    let history = kiln_tests::delivery::history(&farm, "shop/production").await?;
    let (newer, older) = (history[0].id, history[1].id);
    let browser = Browser::start("rollback").await?;
    browser
        .sign_in(&site, &farm.coordinator.admin_token)
        .await?;
    let page = format!("{site}/environments/shop/production");
    browser.goto(&page).await?;
    let row_state = |id: u64| {
        format!(
            "const r = document.querySelector('tr[data-release=\"{id}\"]'); return r ? r.dataset.state : null;"
        )
    };
    assert_eq!(browser.js(&row_state(newer)).await?, "live");
    assert_eq!(browser.js(&row_state(older)).await?, "superseded");
    let points = browser
        .js("return document.querySelectorAll('svg.chart circle').length")
        .await?;
    assert_eq!(points, 4, "two metrics of two releases on the chart");
    let legend = browser
        .js("return Array.from(document.querySelectorAll('svg.chart text.legend')).map(t => t.textContent)")
        .await?;
    assert_eq!(legend, serde_json::json!(["accuracy", "recall"]));
    browser
        .client
        .find(fantoccini::Locator::Id("rollback"))
        .await?
        .click()
        .await?;
    let limit = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        browser.goto(&page).await?;
        let newer_state = browser.js(&row_state(newer)).await?;
        let older_state = browser.js(&row_state(older)).await?;
        if newer_state == "rolled_back" && older_state == "live" {
            break;
        }
        if std::time::Instant::now() > limit {
            bail!(
                "the history did not change: release {newer} is {newer_state}, {older} is {older_state}"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let live = browser
        .js("return document.getElementById('live-release').textContent")
        .await?;
    assert!(
        live.as_str().unwrap().contains(&format!("release {older}")),
        "{live}"
    );
    let entries = audit(&farm).await?;
    let rollback = entries
        .iter()
        .find(|e| e.method == "/kiln.v1.ControlService/Rollback")
        .context("the rollback is not in the audit log")?;
    assert_eq!(rollback.target, "environment shop/production");
    assert_eq!(rollback.outcome, "OK");
    let marked = browser
        .js("return document.querySelectorAll('svg.chart line.mark').length")
        .await?;
    assert_eq!(marked, 1, "the rolled-back release is marked on the chart");
    assert!(is_png(&browser.screenshot("rolled-back").await?));

    // The restored release's lineage, and its signed provenance checked
    // against the coordinator's key (signed moments after it went live).
    let limit = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        browser.goto(&format!("{site}/releases/{older}")).await?;
        let verdict = browser
            .js("return document.getElementById('signature').className")
            .await?;
        if verdict == "verified" {
            break;
        }
        if std::time::Instant::now() > limit {
            let said = browser
                .js("return document.getElementById('signature').textContent")
                .await?;
            bail!("release {older}'s provenance never verified: {said}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let artifacts = browser
        .js("return Array.from(document.querySelectorAll('ul.artifacts a')).map(a => a.textContent)")
        .await?;
    assert_eq!(
        artifacts,
        serde_json::json!(["build: out", "build: out/metrics.json"])
    );
    assert!(is_png(&browser.screenshot("release").await?));
    browser.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_viewer_sees_no_buttons_and_a_forged_post_is_refused() -> Result<()> {
    let farm = farm()?;
    let site = base(&farm);
    let url = farm.coordinator.url();
    let viewer = create_token(&url, &farm.coordinator.admin_token, "eve", pb::Role::Viewer).await?;
    let operator = create_token(
        &url,
        &farm.coordinator.admin_token,
        "ops",
        pb::Role::Operator,
    )
    .await?;
    let repo = Repo::new(GATED)?;
    let run = register_and_run(&farm.coordinator, &repo).await?;
    wait_stage(&farm, run, "signoff", pb::StageState::AwaitingApproval).await?;
    let buttons = "return document.querySelectorAll('form.action button').length";

    // The operator sees cancel, approve and reject on this page...
    let browser = Browser::start("viewer").await?;
    browser.sign_in(&site, &operator).await?;
    browser.goto(&format!("{site}/runs/{run}")).await?;
    assert_eq!(browser.js(buttons).await?, 3);
    // ...but a POST without the form's CSRF token does nothing.
    let forged = browser
        .js(&format!(
            "const x = new XMLHttpRequest(); x.open('POST', '/runs/{run}/cancel', false); \
             x.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded'); \
             x.send('reason=forged'); return x.status;"
        ))
        .await?;
    assert_eq!(forged, 403);
    let mut client = farm.coordinator.client().await?;
    assert_eq!(
        run_state(&get_run(&mut client, run).await?),
        pb::RunState::Running
    );
    browser
        .client
        .find(fantoccini::Locator::Css("form.who button"))
        .await?
        .click()
        .await?;

    // A viewer sees the same run without a single action button.
    browser.sign_in(&site, &viewer).await?;
    browser.goto(&format!("{site}/runs/{run}")).await?;
    assert_eq!(
        browser
            .js("return document.getElementById('user').textContent.trim()")
            .await?,
        "eve (viewer)"
    );
    assert_eq!(browser.js(buttons).await?, 0);
    let waiting = browser
        .js("return document.querySelector('svg.dag g[data-stage=\"signoff\"]').dataset.state")
        .await?;
    assert_eq!(waiting, "awaiting_approval");
    browser
        .goto(&format!("{site}/runs/{run}/stages/signoff"))
        .await?;
    assert_eq!(browser.js(buttons).await?, 0);
    let checks = browser
        .js("return document.querySelector('table.checks tbody td').textContent")
        .await?;
    assert_eq!(checks, "auc");
    assert!(is_png(&browser.screenshot("viewer").await?));
    browser.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_that_prefers_dark_gets_the_dark_palette() -> Result<()> {
    let farm = farm()?;
    let site = base(&farm);
    let repo = Repo::new(GATED)?;
    let run = register_and_run(&farm.coordinator, &repo).await?;
    wait_stage(&farm, run, "signoff", pb::StageState::AwaitingApproval).await?;
    // Blink's preferred colour scheme 0 is dark.
    let browser = Browser::start_with("dark", &["--blink-settings=preferredColorScheme=0"]).await?;
    browser
        .sign_in(&site, &farm.coordinator.admin_token)
        .await?;
    browser.goto(&format!("{site}/runs/{run}")).await?;
    let dark = browser
        .js("return matchMedia('(prefers-color-scheme: dark)').matches")
        .await?;
    assert_eq!(dark, true, "the browser does not prefer dark");
    let background = browser
        .js("return getComputedStyle(document.body).backgroundColor")
        .await?;
    assert_eq!(background, "rgb(13, 17, 23)");
    assert!(is_png(&browser.screenshot("run").await?));
    browser.finish().await
}
