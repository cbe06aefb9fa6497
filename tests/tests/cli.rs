//! The `kiln` CLI against a real farm: exit codes, `--output json`, and the
//! validation errors a user sees.

use anyhow::Result;
use kiln_tests::{Coordinator, CoordinatorOptions, Repo, kiln, start_agent};
use serde_json::Value;

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {}", stdout(output)))
}

#[tokio::test(flavor = "multi_thread")]
async fn run_wait_exit_codes_and_json_output() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let work = tempfile::tempdir()?;
    let _agent = start_agent(&coordinator.url(), "cli-agent", "", 2, work.path())?;
    let repo = Repo::new(
        "pipeline: good\nstages:\n  one: { commands: [\"echo hello from one\"] }\n  two: { needs: [one], commands: [\"echo two\"] }\n",
    )?;
    let dir = repo.path().to_str().unwrap();

    let registered = coordinator.kiln(&["pipeline", "register", dir]);
    assert_eq!(registered.status.code(), Some(0), "{}", stderr(&registered));
    assert!(
        stdout(&registered).contains("registered good version 1"),
        "{}",
        stdout(&registered)
    );
    let again = coordinator.kiln(&["pipeline", "register", dir]);
    assert!(stdout(&again).contains("unchanged"), "{}", stdout(&again));

    // Without --wait: the run id alone on stdout.
    let started = coordinator.kiln(&["run", "good"]);
    assert_eq!(started.status.code(), Some(0), "{}", stderr(&started));
    let id: u64 = stdout(&started).trim().parse().expect("the run id alone");

    let waited = coordinator.kiln(&["--output", "json", "run", "good", "--wait"]);
    assert_eq!(waited.status.code(), Some(0), "{}", stderr(&waited));
    let run = json(&waited);
    assert_eq!(run["state"], "succeeded");
    assert_eq!(run["stages"].as_array().unwrap().len(), 2);
    assert_eq!(run["stages"][0]["name"], "one");
    assert_eq!(run["stages"][0]["exit_code"], 0);

    let status = coordinator.kiln(&["--output", "json", "status", &id.to_string()]);
    assert_eq!(json(&status)["id"], id);
    let logs = coordinator.kiln(&["logs", &run["id"].to_string(), "one"]);
    assert!(
        stdout(&logs).contains("hello from one"),
        "{}",
        stdout(&logs)
    );
    let runs = coordinator.kiln(&["--output", "json", "runs"]);
    assert_eq!(json(&runs).as_array().unwrap().len(), 2);
    let agents = coordinator.kiln(&["--output", "json", "agents"]);
    assert_eq!(json(&agents)[0]["name"], "cli-agent");

    // A failing run: exit 1.
    repo.commit(
        "kiln.yml",
        "pipeline: good\nstages:\n  one: { commands: [\"exit 4\"] }\n",
    )?;
    assert_eq!(
        coordinator
            .kiln(&["pipeline", "register", dir])
            .status
            .code(),
        Some(0)
    );
    let failed = coordinator.kiln(&["run", "good", "--wait"]);
    assert_eq!(failed.status.code(), Some(1), "{}", stdout(&failed));

    // Coordinator errors: one readable line, exit 2.
    let missing = coordinator.kiln(&["status", "999"]);
    assert_eq!(missing.status.code(), Some(2));
    assert_eq!(stderr(&missing).trim(), "error: run 999 does not exist");
    let no_pipeline = coordinator.kiln(&["run", "nope"]);
    assert_eq!(no_pipeline.status.code(), Some(2));
    assert!(
        stderr(&no_pipeline).contains("no pipeline named `nope`"),
        "{}",
        stderr(&no_pipeline)
    );
    let bad_rev = coordinator.kiln(&["run", "good", "--rev", "no-such-branch"]);
    assert_eq!(bad_rev.status.code(), Some(2));
    assert!(
        stderr(&bad_rev).contains("cannot resolve revision `no-such-branch`"),
        "{}",
        stderr(&bad_rev)
    );
    Ok(())
}

#[test]
fn an_unreachable_coordinator_is_exit_3() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let output = kiln(&url, &["runs"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(
        stderr(&output).starts_with("error: cannot reach the coordinator"),
        "{}",
        stderr(&output)
    );
}

/// Invalid pipeline files are refused with file:line:column, by the CLI
/// before anything is sent and by the coordinator itself.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_files_are_refused_with_their_position() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let cases = [
        (
            "pipeline: p\nstages:\n  a: { comands: [x] }\n",
            "kiln.yml:3:8: unknown key `comands` in stage `a`",
        ),
        (
            "pipeline: p\nstages:\n  a: { needs: [b], commands: [x] }\n  b: { needs: [a], commands: [x] }\n",
            "kiln.yml:3:3: cycle in `needs`: a -> b -> a",
        ),
        (
            "pipeline: p\nstages:\n  a: { needs: [zz], commands: [x] }\n",
            "kiln.yml:3:16: ",
        ),
        (
            "pipeline: p\nstages:\n  a: { commands: [x], timeout: 15x }\n",
            "bad duration `15x`",
        ),
    ];
    for (yaml, expected) in cases {
        let repo = Repo::new(yaml)?;
        let output = coordinator.kiln(&["pipeline", "register", repo.path().to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(2), "{yaml}");
        let message = stderr(&output);
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
        assert_eq!(message.lines().count(), 1, "one line: {message}");

        // The coordinator validates on its own too.
        let mut client = coordinator.client().await?;
        let request = kiln_proto::v1::RegisterPipelineRequest {
            file_name: "kiln.yml".into(),
            spec_yaml: yaml.into(),
            repo: "/r".into(),
            branch: "main".into(),
            subdir: String::new(),
        };
        let status = client.register_pipeline(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status
                .message()
                .contains(expected.trim_start_matches("kiln.yml:")),
            "{}",
            status.message()
        );
    }
    let listed = coordinator.kiln(&["--output", "json", "pipeline", "list"]);
    assert_eq!(json(&listed), serde_json::json!([]), "nothing was stored");
    Ok(())
}

/// `kiln logs RUN STAGE -f` prints lines as they arrive and returns when
/// the stage ends; without `-f` it prints what is stored and returns.
#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_a_running_stage_until_it_ends() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let work = tempfile::tempdir()?;
    let _agent = start_agent(&coordinator.url(), "follow-agent", "", 1, work.path())?;
    let repo = Repo::new(
        "pipeline: chatty\nstages:\n  talk: { commands: [\"for i in 1 2 3 4 5 6; do echo tick-$i; sleep 0.3; done\"] }\n",
    )?;
    assert_eq!(
        coordinator
            .kiln(&["pipeline", "register", repo.path().to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let started = coordinator.kiln(&["run", "chatty"]);
    let id = stdout(&started).trim().to_owned();
    let began = std::time::Instant::now();
    let followed = coordinator.kiln(&["logs", &id, "talk", "-f"]);
    assert_eq!(followed.status.code(), Some(0), "{}", stderr(&followed));
    let ticks: Vec<String> = stdout(&followed)
        .lines()
        .filter(|l| l.starts_with("tick-"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        ticks,
        (1..=6).map(|i| format!("tick-{i}")).collect::<Vec<_>>(),
        "every line once, in order"
    );
    assert!(
        began.elapsed() >= std::time::Duration::from_millis(900),
        "it followed the stage rather than returning at once"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_show_their_resources_and_what_running_stages_hold() -> Result<()> {
    let farm = kiln_tests::Farm::start(&CoordinatorOptions::default(), &[("res-agent", "", 2)])?;
    let coordinator = &farm.coordinator;
    let repo = Repo::new(
        "pipeline: held\nstages:\n  hold:\n    resources: { cpus: 1, memory: 64Mi }\n    commands: [\"sleep 3\"]\n",
    )?;
    let run = kiln_tests::register_and_run(coordinator, &repo).await?;
    let held = kiln_tests::eventually(
        std::time::Duration::from_secs(30),
        "the stage to hold its resources",
        || async {
            let agents = json(&coordinator.kiln(&["--output", "json", "agents"]));
            let agent = agents[0].clone();
            Ok((agent["in_use"]["cpus"] == 1.0).then_some(agent))
        },
    )
    .await?;
    assert_eq!(held["in_use"]["memory_bytes"], 64 << 20, "{held}");
    assert!(held["resources"]["cpus"].as_f64().unwrap() >= 1.0, "{held}");
    assert!(
        held["resources"]["memory_bytes"].as_u64().unwrap() > 0,
        "{held}"
    );
    let table = stdout(&coordinator.kiln(&["agents"]));
    assert!(
        table.contains("CPUS") && table.contains("MEMORY"),
        "{table}"
    );
    assert!(table.contains(" 1/"), "cpus in use of declared: {table}");

    let mut client = coordinator.client().await?;
    kiln_tests::wait_run(&mut client, run, std::time::Duration::from_secs(30)).await?;
    let agents = json(&coordinator.kiln(&["--output", "json", "agents"]));
    assert_eq!(agents[0]["in_use"]["cpus"], 0.0, "{agents}");
    Ok(())
}
