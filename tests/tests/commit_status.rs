//! Commit status, against a real coordinator, a real agent and real git.
//!
//! No forge server can run here, so each test stands up a small HTTP
//! server that checks every request against that forge's documented
//! commit status API — Gitea/Forgejo `POST /api/v1/repos/{owner}/{repo}/
//! statuses/{sha}` with `Authorization: token T`; GitHub `POST /repos/
//! {owner}/{repo}/statuses/{sha}` with `Authorization: Bearer T`, `Accept:
//! application/vnd.github+json` and `X-GitHub-Api-Version: 2022-11-28`;
//! GitLab `POST /api/v4/projects/{id}/statuses/{sha}` with `PRIVATE-TOKEN:
//! T` and `name` for the context — path, headers, JSON body and the
//! forge's own state names.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kiln_proto::v1 as pb;
use kiln_tests::{CoordinatorOptions, Farm, Repo, eventually, kiln_as, wait_run};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const LIMIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "forge-token-0123456789";

/// One request as the server received it.
#[derive(Clone, Debug)]
struct Received {
    method: String,
    path: String,
    /// Lowercase names.
    headers: BTreeMap<String, String>,
    body: serde_json::Value,
    /// Answered 201 (else 500).
    accepted: bool,
}

/// A forge's status endpoint: records every request, answers the first
/// `fail_first` with 500 (and every one while `down`), the rest 201.
#[derive(Clone, Default)]
struct ForgeServer {
    received: Arc<Mutex<Vec<Received>>>,
    fail_first: Arc<AtomicUsize>,
    down: Arc<std::sync::atomic::AtomicBool>,
    failed: Arc<AtomicUsize>,
}

impl ForgeServer {
    async fn start(fail_first: usize) -> Result<(Self, String)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = Self::default();
        server.fail_first.store(fail_first, Ordering::SeqCst);
        let serving = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let server = serving.clone();
                tokio::spawn(async move {
                    let _ = server.serve(stream).await;
                });
            }
        });
        Ok((server, url))
    }

    async fn serve(&self, stream: tokio::net::TcpStream) -> Result<()> {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = BTreeMap::new();
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).await?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        let fail = self.down.load(Ordering::SeqCst)
            || self
                .fail_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        self.received.lock().unwrap().push(Received {
            method,
            path,
            headers,
            body,
            accepted: !fail,
        });
        let answer = if fail {
            self.failed.fetch_add(1, Ordering::SeqCst);
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        } else {
            "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
        };
        reader.get_mut().write_all(answer.as_bytes()).await?;
        reader.get_mut().shutdown().await?;
        Ok(())
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits for a request whose body's state is `state`, answered 201.
    async fn wait_state(&self, state: &str) -> Result<Received> {
        eventually(LIMIT, &format!("an accepted `{state}` status"), || async {
            Ok(self
                .received()
                .into_iter()
                .find(|r| r.accepted && r.body["state"] == state))
        })
        .await
    }
}

fn set_secret(farm: &Farm) -> Result<()> {
    let coordinator = &farm.coordinator;
    let set = kiln_as(
        &coordinator.url(),
        Some(&coordinator.admin_token),
        TOKEN.as_bytes(),
        &["secret", "set", "FORGE_TOKEN"],
    )?;
    ensure!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    Ok(())
}

fn add_repo(farm: &Farm, repo: &Repo, forge: &str, url: &str, project: &str) -> Result<()> {
    let added = farm.coordinator.kiln(&[
        "repo",
        "add",
        repo.path().to_str().unwrap(),
        "--status",
        forge,
        "--status-url",
        url,
        "--status-project",
        project,
        "--status-token-secret",
        "FORGE_TOKEN",
    ]);
    ensure!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    Ok(())
}

async fn run(farm: &Farm, pipeline: &str) -> Result<pb::Run> {
    let mut client = farm.coordinator.client().await?;
    let run = client
        .trigger_run(pb::TriggerRunRequest {
            pipeline: pipeline.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    wait_run(&mut client, run.id, LIMIT).await
}

/// The value of one sample of the coordinator's `/metrics`, as written
/// (`name{labels}`), or `None` when it has no such sample.
fn metric(farm: &Farm, sample: &str) -> Result<Option<f64>> {
    let (status, text) = kiln_tests::prom::http_get(&farm.coordinator.http, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    Ok(text.lines().find_map(|line| {
        let value = line.strip_prefix(sample)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    }))
}

fn pipeline(name: &str, command: &str) -> String {
    format!("pipeline: {name}\nstages:\n  only: {{ commands: [\"{command}\"] }}\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn each_forge_gets_the_runs_state_per_its_documented_api() -> Result<()> {
    let farm = Farm::start(&Default::default(), &[("status-agent", "", 2)])?;
    set_secret(&farm)?;
    let cases = [
        ("gitea", "team/models"),
        ("github", "team/models"),
        ("gitlab", "group/sub/models"),
    ];
    for (forge, project) in cases {
        let (server, url) = ForgeServer::start(0).await?;
        let name = format!("st-{forge}");
        let repo = Repo::new(&pipeline(&name, "true"))?;
        add_repo(&farm, &repo, forge, &url, project)?;
        let done = run(&farm, &name).await?;
        assert_eq!(done.state, pb::RunState::Succeeded as i32, "{done:#?}");
        let sha = &done.commit;
        let got = server.wait_state("success").await?;
        assert_eq!(got.method, "POST");
        assert_eq!(
            got.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        let link = got.body["target_url"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        ensure!(
            link.starts_with("http://127.0.0.1:") && link.ends_with(&format!("/runs/{}", done.id)),
            "the status links to the run's page: {link}"
        );
        ensure!(
            got.body["description"]
                .as_str()
                .is_some_and(|d| d.contains("succeeded")),
            "{:?}",
            got.body
        );
        match forge {
            "gitea" => {
                assert_eq!(
                    got.path,
                    format!("/api/v1/repos/team/models/statuses/{sha}")
                );
                assert_eq!(got.headers["authorization"], format!("token {TOKEN}"));
                assert_eq!(got.body["context"], "kiln/st-gitea");
            }
            "github" => {
                assert_eq!(got.path, format!("/repos/team/models/statuses/{sha}"));
                assert_eq!(got.headers["authorization"], format!("Bearer {TOKEN}"));
                assert_eq!(got.headers["accept"], "application/vnd.github+json");
                assert_eq!(got.headers["x-github-api-version"], "2022-11-28");
                ensure!(
                    got.headers.contains_key("user-agent"),
                    "GitHub requires a User-Agent"
                );
                assert_eq!(got.body["context"], "kiln/st-github");
            }
            _ => {
                assert_eq!(
                    got.path,
                    format!("/api/v4/projects/group%2Fsub%2Fmodels/statuses/{sha}")
                );
                assert_eq!(got.headers["private-token"], TOKEN);
                assert_eq!(got.body["name"], "kiln/st-gitlab");
            }
        }
        // Every request, the earlier states included, used the forge's
        // own state names.
        let allowed: &[&str] = match forge {
            "gitlab" => &["pending", "running", "success", "failed", "canceled"],
            _ => &["pending", "success", "failure", "error"],
        };
        for request in server.received() {
            let state = request.body["state"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            ensure!(
                allowed.contains(&state.as_str()),
                "{forge}: state `{state}`"
            );
        }
    }

    // A failing run is reported as a failure in the forge's words.
    let (server, url) = ForgeServer::start(0).await?;
    let repo = Repo::new(&pipeline("st-fail", "false"))?;
    add_repo(&farm, &repo, "gitlab", &url, "7")?;
    let done = run(&farm, "st-fail").await?;
    assert_eq!(done.state, pb::RunState::Failed as i32);
    let got = server.wait_state("failed").await?;
    assert_eq!(
        got.path,
        format!("/api/v4/projects/7/statuses/{}", done.commit)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_forge_is_retried_and_a_queued_report_survives_a_restart() -> Result<()> {
    // Behind a proxy: the links name the address people reach.
    let options = CoordinatorOptions {
        extra_args: vec!["--public-url".into(), "https://kiln.example.org/".into()],
        ..CoordinatorOptions::default()
    };
    let mut farm = Farm::start(&options, &[("status-agent", "", 2)])?;
    set_secret(&farm)?;

    // The forge fails three times: the report is retried until accepted.
    let (flaky, url) = ForgeServer::start(3).await?;
    let repo = Repo::new(&pipeline("st-retry", "true"))?;
    add_repo(&farm, &repo, "gitea", &url, "team/retry")?;
    let done = run(&farm, "st-retry").await?;
    assert_eq!(done.state, pb::RunState::Succeeded as i32);
    let got = flaky.wait_state("success").await?;
    assert_eq!(
        got.path,
        format!("/api/v1/repos/team/retry/statuses/{}", done.commit)
    );
    assert_eq!(flaky.failed.load(Ordering::SeqCst), 3);
    assert_eq!(
        got.body["target_url"],
        format!("https://kiln.example.org/runs/{}", done.id),
        "--public-url names the run links"
    );

    // A forge that is down while the run ends: the report waits in the
    // queue, through a crash of the coordinator, and is delivered after.
    let (down, url) = ForgeServer::start(0).await?;
    down.down.store(true, Ordering::SeqCst);
    let repo = Repo::new(&pipeline("st-restart", "true"))?;
    add_repo(&farm, &repo, "github", &url, "team/restart")?;
    let done = run(&farm, "st-restart").await?;
    assert_eq!(done.state, pb::RunState::Succeeded as i32);
    eventually(LIMIT, "a refused success", || async {
        Ok(down
            .received()
            .iter()
            .any(|r| r.body["state"] == "success")
            .then_some(()))
    })
    .await?;
    // /metrics shows the forge refusing and the report waiting.
    eventually(LIMIT, "a failed round on /metrics", || async {
        let failed = metric(
            &farm,
            r#"kiln_commit_status_rounds_total{forge="github",outcome="failed"}"#,
        )?;
        Ok(failed.is_some_and(|n| n >= 1.0).then_some(()))
    })
    .await?;
    assert!(metric(&farm, "kiln_commit_status_queued")?.is_some_and(|n| n >= 1.0));
    farm.coordinator
        .crash_and_restart(&options, Duration::from_millis(200))?;
    down.down.store(false, Ordering::SeqCst);
    let got = down
        .wait_state("success")
        .await
        .context("a queued report was lost in the restart")?;
    assert_eq!(
        got.path,
        format!("/repos/team/restart/statuses/{}", done.commit)
    );
    eventually(LIMIT, "the queue drained on /metrics", || async {
        let sent = metric(
            &farm,
            r#"kiln_commit_status_rounds_total{forge="github",outcome="sent"}"#,
        )?;
        let queued = metric(&farm, "kiln_commit_status_queued")?;
        Ok((sent.is_some_and(|n| n >= 1.0) && queued == Some(0.0)).then_some(()))
    })
    .await?;
    Ok(())
}
