//! The web dashboard, end to end: a real coordinator and process agents on
//! 127.0.0.1, plain HTTP requests for the protocol-level promises (login,
//! cookies, CSRF, the raw log, event-stream resume), and a real headless
//! Chromium for what a person does (watch a run and its log, approve a
//! gate, roll back, see only the buttons their role allows).
//!
//! The browser tests need `chromium` and `chromium-driver`; without them
//! they fail and say so. Screenshots go to `target/web-screenshots/`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_proto::v1 as pb;
use kiln_tests::browser::{Browser, Proxy, is_png};
use kiln_tests::{
    CoordinatorOptions, Farm, Repo, create_token, eventually, get_run, register_and_run, stage,
    wait_run,
};
use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};

const LIVE: &str = r#"
pipeline: live
stages:
  prepare:
    commands: ["echo ready"]
  train:
    needs: [prepare]
    commands: ["for i in $(seq 1 60); do if [ $((i % 2)) -eq 0 ]; then printf '\\033[32mline %s\\033[0m\\n' $i; else echo line $i; fi; sleep 0.25; done"]
  report:
    needs: [train]
    commands: ["echo done"]
"#;

const QUICK: &str = r#"
pipeline: quick
stages:
  count:
    commands: ["for i in $(seq 1 30); do echo line $i; done"]
"#;

const GATED: &str = r#"
pipeline: careful
stages:
  evaluate:
    commands: ["mkdir -p b", "echo '{\"auc\": 0.9}' > b/m.json"]
    metrics: b/m.json
  signoff:
    needs: [evaluate]
    gate: { require: { auc: ">= 0.8" }, approval: manual }
  ship:
    needs: [signoff]
    environment: prod
    commands: ["echo shipped"]
"#;

const SHOP: &str = r#"
pipeline: shop
stages:
  build:
    commands: ["mkdir -p out", "echo v > out/model", "cp metrics.json out/metrics.json"]
    artifacts: [out]
    metrics: out/metrics.json
  deploy:
    needs: [build]
    environment: production
    commands: ["cat out/model"]
"#;

fn farm() -> Result<Farm> {
    Farm::start(&CoordinatorOptions::default(), &[("web-agent", "", 2)])
}

fn base(farm: &Farm) -> String {
    format!("http://{}", farm.coordinator.http)
}

fn http() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The `name=value` of cookie `name` among a response's `Set-Cookie`s,
/// with the whole header line.
fn set_cookie(response: &reqwest::Response, name: &str) -> Option<(String, String)> {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|line| {
            let value = line
                .split(';')
                .next()
                .unwrap_or_default()
                .split_once('=')
                .map(|(_, v)| v.to_owned())
                .unwrap_or_default();
            (value, line.to_owned())
        })
}

/// The first `name="csrf" value="…"` in a page.
fn csrf_in(html: &str) -> Option<String> {
    let at = html.find(r#"name="csrf" value=""#)? + r#"name="csrf" value=""#.len();
    Some(html[at..].split('"').next()?.to_owned())
}

/// A signed-in HTTP session: its cookie header and CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

/// Signs in through the login form; also returns the session cookie's
/// full `Set-Cookie` line.
async fn sign_in(base: &str, token: &str) -> Result<(Session, String)> {
    let client = http()?;
    let form = client.get(format!("{base}/login")).send().await?;
    let (login, _) = set_cookie(&form, "kiln_login").context("no kiln_login cookie")?;
    let page = form.text().await?;
    assert_eq!(csrf_in(&page).as_deref(), Some(login.as_str()));
    let response = client
        .post(format!("{base}/login"))
        .header(COOKIE, format!("kiln_login={login}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "token={}&csrf={login}&next=%2Fruns",
            percent(token)
        ))
        .send()
        .await?;
    if response.status() != StatusCode::SEE_OTHER {
        bail!(
            "sign-in answered {}: {}",
            response.status(),
            response.text().await?
        );
    }
    assert_eq!(response.headers()[LOCATION], "/runs");
    let (id, line) = set_cookie(&response, "kiln_session").context("no session cookie")?;
    let cookie = format!("kiln_session={id}");
    let page = client
        .get(format!("{base}/"))
        .header(COOKIE, &cookie)
        .send()
        .await?
        .text()
        .await?;
    let csrf = csrf_in(&page).context("no CSRF token on the signed-in page")?;
    Ok((Session { cookie, csrf }, line))
}

async fn post(base: &str, path: &str, session: &Session, body: &str) -> Result<reqwest::Response> {
    Ok(http()?
        .post(format!("{base}{path}"))
        .header(COOKIE, &session.cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned())
        .send()
        .await?)
}

async fn audit(farm: &Farm) -> Result<Vec<pb::AuditEntry>> {
    let mut client = farm.coordinator.client().await?;
    Ok(client
        .list_audit(pb::ListAuditRequest { limit: 100 })
        .await?
        .into_inner()
        .entries)
}

fn run_state(run: &pb::Run) -> pb::RunState {
    pb::RunState::try_from(run.state).unwrap()
}

fn stage_state(run: &pb::Run, name: &str) -> pb::StageState {
    pb::StageState::try_from(stage(run, name).state).unwrap()
}

async fn wait_stage(farm: &Farm, run: u64, name: &str, state: pb::StageState) -> Result<()> {
    let client = farm.coordinator.client().await?;
    eventually(
        Duration::from_secs(30),
        &format!("{name} to be {state:?}"),
        || {
            let mut client = client.clone();
            async move {
                Ok((stage_state(&get_run(&mut client, run).await?, name) == state).then_some(()))
            }
        },
    )
    .await
}

// ------------------------------------------------------------------ HTTP

#[tokio::test(flavor = "multi_thread")]
async fn pages_need_a_session_and_sign_in_sets_a_strict_cookie() -> Result<()> {
    let farm = farm()?;
    let base = base(&farm);
    let client = http()?;

    let page = client
        .get(format!("{base}/runs?state=failed"))
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await?;
    assert_eq!(page.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        page.headers()[LOCATION],
        "/login?next=/runs%3Fstate%3Dfailed"
    );
    // curl is told how to sign in; a form post without a session is refused.
    let curl = client
        .get(format!("{base}/runs/1/stages/a/log"))
        .send()
        .await?;
    assert_eq!(curl.status(), StatusCode::UNAUTHORIZED);
    assert!(curl.text().await?.contains("authorization: Bearer"));
    let unsigned = client
        .post(format!("{base}/runs/1/cancel"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("csrf=x")
        .send()
        .await?;
    assert_eq!(unsigned.status(), StatusCode::FORBIDDEN);

    let (session, line) = sign_in(&base, &farm.coordinator.admin_token).await?;
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(line.contains(flag), "{line}");
    }
    assert!(!line.contains("Secure"), "plain HTTP: {line}");
    let runs = client
        .get(format!("{base}/runs"))
        .header(COOKIE, &session.cookie)
        .send()
        .await?;
    assert_eq!(runs.status(), StatusCode::OK);
    let policy = runs.headers()["content-security-policy"]
        .to_str()?
        .to_owned();
    assert!(policy.starts_with("default-src 'self'"), "{policy}");
    assert!(runs.text().await?.contains("<h1>Runs</h1>"));

    // A wrong token is told so, and gets no session.
    let form = client.get(format!("{base}/login")).send().await?;
    let (login, _) = set_cookie(&form, "kiln_login").unwrap();
    let wrong = client
        .post(format!("{base}/login"))
        .header(COOKIE, format!("kiln_login={login}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token=kiln_nope&csrf={login}"))
        .send()
        .await?;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(set_cookie(&wrong, "kiln_session").is_none());
    // The sign-in form is CSRF-protected too.
    let forged = client
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", farm.coordinator.admin_token))
        .send()
        .await?;
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    // An agent token cannot sign in.
    let agent = client
        .post(format!("{base}/login"))
        .header(COOKIE, format!("kiln_login={login}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "token={}&csrf={login}",
            farm.coordinator.agent_token
        ))
        .send()
        .await?;
    assert_eq!(agent.status(), StatusCode::FORBIDDEN);

    // Signing out ends the session.
    let out = post(
        &base,
        "/logout",
        &session,
        &format!("csrf={}", session.csrf),
    )
    .await?;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let after = client
        .get(format!("{base}/runs"))
        .header(COOKIE, &session.cookie)
        .header("accept", "text/html")
        .send()
        .await?;
    assert_eq!(after.status(), StatusCode::SEE_OTHER);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn posts_without_the_csrf_token_are_refused_and_roles_are_checked_and_audited() -> Result<()>
{
    let farm = farm()?;
    let base = base(&farm);
    let url = farm.coordinator.url();
    let repo = Repo::new(GATED)?;
    let run = register_and_run(&farm.coordinator, &repo).await?;
    wait_stage(&farm, run, "signoff", pb::StageState::AwaitingApproval).await?;
    let operator = create_token(
        &url,
        &farm.coordinator.admin_token,
        "ops",
        pb::Role::Operator,
    )
    .await?;
    let viewer = create_token(&url, &farm.coordinator.admin_token, "eve", pb::Role::Viewer).await?;

    let (ops, _) = sign_in(&base, &operator).await?;
    let cancel = format!("/runs/{run}/cancel");
    for body in ["", "reason=x", "csrf=0000", "csrf="] {
        let refused = post(&base, &cancel, &ops, body).await?;
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "body {body:?}");
        assert!(refused.text().await?.contains("CSRF"));
    }
    // A viewer's form with a valid CSRF token is refused by role, and
    // recorded as the gRPC call would be.
    let (eve, _) = sign_in(&base, &viewer).await?;
    let refused = post(&base, &cancel, &eve, &format!("csrf={}", eve.csrf)).await?;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused.text().await?.contains("may not call"));
    let mut client = farm.coordinator.client().await?;
    assert_eq!(
        run_state(&get_run(&mut client, run).await?),
        pb::RunState::Running
    );
    let entries = audit(&farm).await?;
    let denied = entries
        .iter()
        .find(|e| e.principal == "eve")
        .context("the viewer's refused cancel is not in the audit log")?;
    assert_eq!(denied.method, "/kiln.v1.ControlService/CancelRun");
    assert_eq!(denied.outcome, "PERMISSION_DENIED");
    assert!(denied.peer.starts_with("127.0.0.1:"), "{denied:?}");
    assert!(
        !entries.iter().any(|e| e.principal == "ops"),
        "refused for CSRF: nothing ran"
    );

    // The operator's reject with its token goes through, audited like
    // `kiln reject`.
    let rejected = post(
        &base,
        &format!("/runs/{run}/stages/signoff/reject"),
        &ops,
        &format!("csrf={}&reason=not+today", ops.csrf),
    )
    .await?;
    assert_eq!(rejected.status(), StatusCode::SEE_OTHER);
    let done = wait_run(&mut client, run, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&done), pb::RunState::Failed);
    let entries = audit(&farm).await?;
    let decided = entries
        .iter()
        .find(|e| e.principal == "ops")
        .context("the reject is not in the audit log")?;
    assert_eq!(decided.method, "/kiln.v1.ControlService/RejectStage");
    assert_eq!(decided.target, format!("run {run} stage signoff"));
    assert_eq!(decided.outcome, "OK");
    Ok(())
}

/// Server-Sent Events of a finished stage: `(id, data)` of each line
/// event, and whether the stream said `end`.
fn parse_events(text: &str) -> (Vec<(u64, String)>, bool) {
    let mut lines = Vec::new();
    let mut ended = false;
    for block in text.split("\n\n") {
        let mut fields: HashMap<&str, &str> = HashMap::new();
        for line in block.lines() {
            if let Some((key, value)) = line.split_once(':') {
                fields.insert(key, value.strip_prefix(' ').unwrap_or(value));
            }
        }
        match (fields.get("event"), fields.get("id")) {
            (Some(&"end"), _) => ended = true,
            (None, Some(id)) => lines.push((id.parse().unwrap(), fields["data"].to_owned())),
            _ => {}
        }
    }
    (lines, ended)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_raw_log_is_text_and_the_event_stream_resumes_after_last_event_id() -> Result<()> {
    let farm = farm()?;
    let base = base(&farm);
    let repo = Repo::new(QUICK)?;
    let run = register_and_run(&farm.coordinator, &repo).await?;
    let mut client = farm.coordinator.client().await?;
    let done = wait_run(&mut client, run, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&done), pb::RunState::Succeeded);
    let (session, _) = sign_in(&base, &farm.coordinator.admin_token).await?;
    let http = http()?;

    let log = http
        .get(format!("{base}/runs/{run}/stages/count/log"))
        .header(COOKIE, &session.cookie)
        .send()
        .await?;
    assert_eq!(log.status(), StatusCode::OK);
    assert_eq!(log.headers()["content-type"], "text/plain; charset=utf-8");
    let text = log.text().await?;
    let expected: String = (1..=30).map(|i| format!("line {i}\n")).collect();
    assert!(text.ends_with(&expected), "{text}");
    // curl can use the token instead of a cookie.
    let curl = http
        .get(format!("{base}/runs/{run}/stages/count/log"))
        .bearer_auth(&farm.coordinator.admin_token)
        .send()
        .await?
        .text()
        .await?;
    assert_eq!(curl, text);
    let missing = http
        .get(format!("{base}/runs/{run}/stages/nope/log"))
        .header(COOKIE, &session.cookie)
        .send()
        .await?;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.text().await?,
        format!("run {run} has no stage `nope`\n")
    );

    // Lines before the stage's own output: the agent's and the shell's.
    let offset = text.lines().count() as u64 - 30;
    let events = |last: Option<u64>, query: &str| {
        let mut request = http
            .get(format!("{base}/runs/{run}/stages/count/events{query}"))
            .header(COOKIE, &session.cookie);
        if let Some(last) = last {
            request = request.header("last-event-id", last.to_string());
        }
        request.send()
    };
    let all = events(None, "").await?;
    assert_eq!(all.headers()["content-type"], "text/event-stream");
    let (lines, ended) = parse_events(&all.text().await?);
    assert!(ended);
    assert_eq!(lines.len() as u64, offset + 30);
    assert!(lines.iter().enumerate().all(|(i, (id, _))| *id == i as u64));

    let resumed = events(Some(offset + 9), "?from=0").await?.text().await?;
    let (lines, ended) = parse_events(&resumed);
    assert!(ended);
    let ids: Vec<u64> = lines.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        ((offset + 10)..(offset + 30)).collect::<Vec<_>>(),
        "Last-Event-ID wins over ?from"
    );
    assert_eq!(lines[0].1, "line 11");
    let from = events(None, &format!("?from={}", offset + 25))
        .await?
        .text()
        .await?;
    let (lines, _) = parse_events(&from);
    let data: Vec<&str> = lines.iter().map(|(_, data)| data.as_str()).collect();
    assert_eq!(
        data,
        ["line 26", "line 27", "line 28", "line 29", "line 30"]
    );
    Ok(())
}

// ------------------------------------------------------------------ browser

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

// ------------------------------------------------------------------ demo

#[tokio::test(flavor = "multi_thread")]
async fn kiln_demo_serve_keeps_the_dashboard_up_until_ctrl_c() -> Result<()> {
    use std::io::{BufRead, BufReader};
    let data = tempfile::tempdir()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let child = std::process::Command::new(kiln_tests::binary("kiln"))
        .args([
            "demo",
            "--example",
            "examples/hello",
            "--serve",
            "--data-dir",
        ])
        .arg(data.path().join("demo"))
        .current_dir(&root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let mut demo = kiln_tests::Process {
        child,
        name: "kiln demo".into(),
    };
    let stdout = demo.child.stdout.take().context("demo stdout")?;
    let (tx, mut said) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut url = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let line = tokio::time::timeout_at(deadline, said.recv())
            .await
            .context("the demo did not say it serves the dashboard within 90s")?
            .context("the demo ended before serving the dashboard")?;
        if let Some(rest) = line.strip_prefix("dashboard: ") {
            url = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.starts_with("serving the dashboard at ") {
            break;
        }
    }
    let url = url.context("the demo never printed the dashboard's URL")?;
    let base = url.trim_end_matches('/');
    let token = std::fs::read_to_string(data.path().join("demo/coordinator/admin.token"))?;
    let (session, _) = sign_in(base, token.trim()).await?;
    let runs = http()?
        .get(format!("{base}/runs"))
        .header(COOKIE, &session.cookie)
        .send()
        .await?
        .text()
        .await?;
    assert!(
        runs.contains("<td>hello</td>") && runs.contains("succeeded"),
        "{runs}"
    );
    unsafe { libc::kill(demo.pid(), libc::SIGINT) };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = demo.child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            bail!("kiln demo did not stop within 30s of Ctrl-C");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_retry_and_unfreeze_forms_go_through_the_control_service() -> Result<()> {
    let farm = farm()?;
    let base = base(&farm);
    let marker = tempfile::tempdir()?;
    let ok = marker.path().join("ok");
    let flaky = format!(
        "pipeline: flaky\nstages:\n  check:\n    commands: [\"test -f {}\"]\n  deploy:\n    needs: [check]\n    environment: staging\n    commands: [\"true\"]\n  slow:\n    commands: [\"sleep 60\"]\n",
        ok.display()
    );
    let repo = Repo::new(&flaky)?;
    let run = register_and_run(&farm.coordinator, &repo).await?;
    wait_stage(&farm, run, "check", pb::StageState::Failed).await?;
    wait_stage(&farm, run, "slow", pb::StageState::Running).await?;
    let (admin, _) = sign_in(&base, &farm.coordinator.admin_token).await?;
    let csrf = format!("csrf={}", admin.csrf);

    // The failed stage's page offers a retry; it runs again and passes.
    let page = http()?
        .get(format!("{base}/runs/{run}/stages/check"))
        .header(COOKIE, &admin.cookie)
        .send()
        .await?
        .text()
        .await?;
    assert!(page.contains(r#"id="retry-stage""#), "{page}");
    std::fs::write(&ok, "")?;
    let retried = post(
        &base,
        &format!("/runs/{run}/stages/check/retry"),
        &admin,
        &csrf,
    )
    .await?;
    assert_eq!(retried.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        retried.headers()[LOCATION],
        format!("/runs/{run}/stages/check")
    );
    wait_stage(&farm, run, "deploy", pb::StageState::Succeeded).await?;

    // Cancel stops the stage that still sleeps.
    let cancelled = post(&base, &format!("/runs/{run}/cancel"), &admin, &csrf).await?;
    assert_eq!(cancelled.status(), StatusCode::SEE_OTHER);
    let mut client = farm.coordinator.client().await?;
    let done = wait_run(&mut client, run, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&done), pb::RunState::Cancelled);
    assert_eq!(stage(&done, "check").attempt, 2);

    // Unfreezing answers as `kiln env unfreeze` does, page or refusal,
    // and is audited either way.
    let unfreeze = post(&base, "/environments/flaky/staging/unfreeze", &admin, &csrf).await?;
    let status = unfreeze.status();
    assert!(
        status == StatusCode::SEE_OTHER || status.is_client_error(),
        "{status}: {}",
        unfreeze.text().await?
    );
    let entries = audit(&farm).await?;
    let find = |method: &str| {
        entries
            .iter()
            .find(|e| e.method == format!("/kiln.v1.ControlService/{method}"))
            .with_context(|| format!("no {method} in the audit log: {entries:?}"))
    };
    assert_eq!(find("RetryStage")?.target, format!("run {run} stage check"));
    assert_eq!(find("CancelRun")?.target, format!("run {run}"));
    assert_eq!(find("CancelRun")?.outcome, "OK");
    let unfrozen = find("UnfreezeEnvironment")?;
    assert_eq!(
        unfrozen.outcome == "OK",
        status == StatusCode::SEE_OTHER,
        "{unfrozen:?}"
    );
    assert!(
        [find("RetryStage")?, find("CancelRun")?, unfrozen]
            .iter()
            .all(|e| e.principal == "admin")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_filter_and_page_and_the_run_page_of_500_stages_renders_quickly() -> Result<()> {
    let farm = farm()?;
    let base = base(&farm);
    let repo = Repo::new(QUICK)?;
    let mut client = farm.coordinator.client().await?;
    for _ in 0..3 {
        let run = register_and_run(&farm.coordinator, &repo).await?;
        wait_run(&mut client, run, Duration::from_secs(30)).await?;
    }
    let (session, _) = sign_in(&base, &farm.coordinator.admin_token).await?;
    let get = |path: String| {
        let cookie = session.cookie.clone();
        async move {
            let response = http()?.get(path).header(COOKIE, cookie).send().await?;
            anyhow::ensure!(response.status() == StatusCode::OK, "{}", response.status());
            Ok::<_, anyhow::Error>(response.text().await?)
        }
    };
    let rows = |page: &str| page.matches("<tr data-run=").count();
    assert_eq!(rows(&get(format!("{base}/runs")).await?), 3);
    assert_eq!(
        rows(&get(format!("{base}/runs?state=succeeded&branch=main")).await?),
        3
    );
    assert_eq!(rows(&get(format!("{base}/runs?state=failed")).await?), 0);
    assert_eq!(rows(&get(format!("{base}/runs?branch=other")).await?), 0);
    let older = get(format!("{base}/runs?before=3")).await?;
    assert!(older.contains(r#"data-run="2""#) && older.contains(r#"data-run="1""#));
    assert_eq!(rows(&older), 2);
    let home = get(format!("{base}/")).await?;
    assert_eq!(
        home.matches(r#"class="mark succeeded""#).count(),
        3,
        "{home}"
    );
    let found = get(format!("{base}/runs/1/stages/count?q=line+30")).await?;
    assert!(
        found.contains(">line 30<") && !found.contains(">line 29<"),
        "{found}"
    );
    let agents = get(format!("{base}/agents")).await?;
    assert!(agents.contains(r#"data-agent="web-agent""#) && agents.contains("connected"));

    // 500 stages (the pipeline limit), ten chains of fifty, not yet run.
    let mut wide = String::from("pipeline: wide\nstages:\n");
    for i in 0..500 {
        wide.push_str(&format!(
            "  s{i}:\n    agent: {{ labels: {{ role: none }} }}\n    commands: [\"true\"]\n"
        ));
        if i % 50 != 0 {
            wide.push_str(&format!("    needs: [s{}]\n", i - 1));
        }
    }
    let big = Repo::new(&wide)?;
    let run = register_and_run(&farm.coordinator, &big).await?;
    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let page = get(format!("{base}/runs/{run}")).await?;
        fastest = fastest.min(started.elapsed());
        assert_eq!(page.matches("<g class=\"node ").count(), 500);
    }
    assert!(
        fastest < Duration::from_millis(200),
        "the 500-stage run page took {fastest:?}"
    );
    eprintln!("500-stage run page: {fastest:?}");
    Ok(())
}
