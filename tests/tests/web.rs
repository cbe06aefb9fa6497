//! The web dashboard over plain HTTP: a real coordinator and process agents
//! on 127.0.0.1, and the promises a client relies on — sign-in and its
//! cookie, CSRF, roles and the audit log, the raw log, the event stream's
//! resume, lists, paging and speed — and `kiln demo --serve`. What a
//! person does in a browser is in `web_browser.rs`.

mod web_common;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_proto::v1 as pb;
use kiln_tests::{
    CoordinatorOptions, Repo, create_token, get_run, register_and_run, stage, wait_run,
};
use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use web_common::{GATED, QUICK, SHOP, audit, base, farm, run_state, wait_stage};

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
        "/login?next=%2Fruns%3Fstate%3Dfailed"
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

/// Server-Sent Events: `(id, data)` of each complete line event, and
/// whether the stream said `end`.
fn parse_events(text: &str) -> (Vec<(u64, String)>, bool) {
    let mut lines = Vec::new();
    let mut ended = false;
    let complete = text.rfind("\n\n").map_or("", |end| &text[..end]);
    for block in complete.split("\n\n") {
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

/// Reads a live event stream until `enough` says stop (or it closes).
async fn read_events(
    response: &mut reqwest::Response,
    text: &mut String,
    enough: impl Fn(&str) -> bool,
) -> Result<()> {
    while !enough(text) {
        match tokio::time::timeout(Duration::from_secs(30), response.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None) | Err(_)) => return Ok(()),
            Err(_) => bail!("no event for 30s; so far: {text}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_stream_cut_by_a_coordinator_restart_is_not_ended_and_resumes_without_gaps()
-> Result<()> {
    let mut farm = farm()?;
    let repo = Repo::new(
        "pipeline: slow\nstages:\n  count:\n    commands: [\"for i in $(seq 1 40); do echo line $i; sleep 0.2; done\"]\n",
    )?;
    let run = register_and_run(&farm.coordinator, &repo).await?;
    wait_stage(&farm, run, "count", pb::StageState::Running).await?;
    let (session, _) = sign_in(&base(&farm), &farm.coordinator.admin_token).await?;
    let mut stream = http()?
        .get(format!("{}/runs/{run}/stages/count/events", base(&farm)))
        .header(COOKIE, &session.cookie)
        .send()
        .await?;
    let mut text = String::new();
    read_events(&mut stream, &mut text, |text| {
        parse_events(text).0.len() >= 6
    })
    .await?;
    let status = farm
        .coordinator
        .process
        .terminate(Duration::from_secs(20))?;
    assert!(status.success(), "{status:?}");
    read_events(&mut stream, &mut text, |_| false).await?;
    let (before, ended) = parse_events(&text);
    assert!(
        !ended,
        "a stopping coordinator told the browser the log was over: {text}"
    );
    let last = before.last().context("no line before the stop")?.0;

    farm.coordinator
        .crash_and_restart(&CoordinatorOptions::default(), Duration::ZERO)?;
    let (session, _) = sign_in(&base(&farm), &farm.coordinator.admin_token).await?;
    let mut resumed = http()?
        .get(format!("{}/runs/{run}/stages/count/events", base(&farm)))
        .header(COOKIE, &session.cookie)
        .header("last-event-id", last.to_string())
        .send()
        .await?;
    let mut rest = String::new();
    read_events(&mut resumed, &mut rest, |text| parse_events(text).1).await?;
    let (after, ended) = parse_events(&rest);
    assert!(ended, "{rest}");
    let all: Vec<(u64, String)> = before.into_iter().chain(after).collect();
    let ids: Vec<u64> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        (0..all.len() as u64).collect::<Vec<_>>(),
        "no line lost or repeated"
    );
    let output: Vec<&str> = all
        .iter()
        .map(|(_, data)| data.as_str())
        .filter(|data| data.starts_with("line "))
        .collect();
    let expected: Vec<String> = (1..=40).map(|i| format!("line {i}")).collect();
    assert_eq!(output, expected);
    Ok(())
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

    // An artifact's download link serves the blob, whole and verified.
    let shop = Repo::new(SHOP)?;
    shop.commit("metrics.json", r#"{"accuracy": 0.9}"#)?;
    let built = register_and_run(&farm.coordinator, &shop).await?;
    wait_run(&mut client, built, Duration::from_secs(30)).await?;
    let page = get(format!("{base}/runs/{built}/stages/build")).await?;
    let digest = page
        .split(r#"href="/blobs/"#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .context("no artifact link on the stage page")?
        .to_owned();
    assert!(
        page.contains("<th scope=\"row\">accuracy</th><td>0.9</td>"),
        "{page}"
    );
    let blob = http()?
        .get(format!("{base}/blobs/{digest}"))
        .header(COOKIE, &session.cookie)
        .send()
        .await?;
    assert_eq!(blob.status(), StatusCode::OK);
    let bytes = blob.bytes().await?;
    assert!(
        bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]),
        "a zstd archive"
    );
    use sha2::Digest;
    let actual = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
    assert_eq!(actual, digest);
    let missing = http()?
        .get(format!("{base}/blobs/sha256:{}", "0".repeat(64)))
        .header(COOKIE, &session.cookie)
        .send()
        .await?;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    Ok(())
}
