//! `kiln demo`: a whole farm in one process.
//!
//! An embedded coordinator on `127.0.0.1:0` and two agents run as tasks on
//! this runtime; the demo then drives them through the same code paths as
//! `kiln pipeline register`, `kiln run --wait`, `kiln logs` and `kiln
//! status`. Start-up and shutdown follow a fixed order: coordinator,
//! agents; then agents stop (finishing or handing back their stages) before
//! the coordinator stops.
//!
//! Without `--example` it plays the ML scenario of [`crate::demo_ml`]
//! (docker agent for training, process agent for deploys) when a Docker
//! engine answers, and the shell-only `examples/hello` otherwise. The
//! coordinator's web dashboard is served throughout; with `--serve` it
//! stays up after the scenario until Ctrl-C.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_agent::ExecutorKind;
use kiln_common::channel::ClientOptions;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::args::{DemoArgs, OutputFormat};
use crate::client::Coordinator;
use crate::commands::{logs, pipeline, runs, watch as progress};
use crate::error::{CliError, Outcome};
use crate::git::Drift;
use crate::{demo_ml, output};

/// Marks a directory as made by `kiln demo`, so that clearing it can never
/// wipe a directory someone passed to `--data-dir` by mistake.
const MARKER: &str = ".kiln-demo-data";
/// The agents: name and the `role` label that stages select on.
const AGENTS: [(&str, &str); 2] = [("demo-agent-1", "build"), ("demo-agent-2", "deploy")];
/// Stages each agent runs at once.
const AGENT_CAPACITY: u32 = 2;
/// Short, so a demo agent killed mid-run is noticed quickly.
const LEASE_TTL: Duration = Duration::from_secs(10);
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long stages may keep running after the demo asks agents to stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Beyond this, a task that does not stop is abandoned (and reported).
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Agents connect within milliseconds; this only bounds a broken start.
const AGENTS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A service task and the signal that stops it.
struct Service {
    name: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// `kiln demo [--example DIR] [--data-dir D] [--keep] [--serve]`.
pub(crate) async fn demo(args: &DemoArgs, format: OutputFormat) -> Result<Outcome, CliError> {
    // The libraries report through tracing; warnings and errors only, so
    // the demo's own lines stay readable.
    kiln_common::logging::init("error");
    if args.example.is_none() {
        match demo_ml::docker_missing() {
            None => return ml_demo(args, format).await,
            Some(why) => output::progress(
                format,
                &format!(
                    "no Docker engine answers ({why}); running the shell-only examples/hello instead"
                ),
            )?,
        }
    }
    let example = example_dir(args.example.as_deref());
    // Checked before anything starts: a broken or uncommitted example
    // would only fail later, inside the run.
    let registration = pipeline::prepare(&example)?;
    match (registration.drift, registration.drift_warning()) {
        (Drift::NotCommitted, Some(warning)) => return Err(CliError::Input(warning)),
        (_, Some(warning)) => output::progress(format, &format!("warning: {warning}"))?,
        (_, None) => {}
    }
    let data_dir = prepare_data_dir(&args.data_dir, args.keep)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::Input(format!("cannot listen on 127.0.0.1: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Input(format!("cannot read the listening address: {e}")))?;
    let url = format!("http://{addr}");
    output::progress(
        format,
        &format!(
            "starting an embedded coordinator on {addr} and two agents (data in {})",
            data_dir.display()
        ),
    )?;

    let (dashboard, dashboard_url) = bind_dashboard(args).await?;
    let coordinator = start_coordinator(&data_dir, listener, dashboard, None);
    announce_dashboard(format, &dashboard_url, &data_dir)?;
    let access = match Access::bootstrap(&data_dir, &url).await {
        Ok(access) => access,
        Err(error) => {
            stop(coordinator).await;
            return Err(error);
        }
    };
    let agents: Vec<Service> = AGENTS
        .iter()
        .map(|(name, role)| {
            start_agent(
                &data_dir,
                &url,
                &access.agent,
                name,
                role,
                ExecutorKind::Process,
            )
        })
        .collect();

    let script = tokio::select! {
        result = run_example(&url, &access.admin, registration, format) => result,
        _ = tokio::signal::ctrl_c() => Err(CliError::Input("interrupted".to_owned())),
    };
    let script = serve_dashboard(args, format, &dashboard_url, script).await;

    // Shutdown happens even if stdout is gone, so no `?` here.
    let _ = output::progress(format, "stopping the agents, then the coordinator");
    for agent in agents {
        stop(agent).await;
    }
    stop(coordinator).await;
    script
}

/// The part a user would type: wait for agents, register, run, show.
async fn run_example(
    url: &str,
    admin: &ClientOptions,
    registration: pipeline::Prepared,
    format: OutputFormat,
) -> Result<Outcome, CliError> {
    let coordinator = Coordinator::connect(url, admin).await?;
    let names: Vec<String> = AGENTS
        .iter()
        .map(|(n, r)| format!("{n} (role={r})"))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    wait_for_agents(&coordinator, format, &names).await?;
    let registered = pipeline::submit(&coordinator, registration.request).await?;
    output::progress(format, &pipeline::registered_line(&registered))?;
    let run = runs::trigger(&coordinator, &registered.pipeline.name, None).await?;
    let finished = progress::follow(&coordinator, run.id, format).await?;
    // In JSON mode `follow` printed the final run, which is all stdout gets.
    if format == OutputFormat::Table {
        output::line(format!("\n--- logs of run {} ---", run.id))?;
        logs::print_logs(&coordinator, format, run.id, None, false).await?;
        output::line("\n--- status ---")?;
        runs::print_status(&finished, format)?;
    }
    Ok(runs::outcome_of(&finished))
}

/// The ML scenario: image, repository copy, farm, scenario, shutdown.
async fn ml_demo(args: &DemoArgs, format: OutputFormat) -> Result<Outcome, CliError> {
    let root = repo_root();
    demo_ml::ensure_image(&root, format)?;
    let data_dir = prepare_data_dir(&args.data_dir, args.keep)?;
    let repo = demo_ml::prepare_repo(&root.join("examples/customer-behavior"), &data_dir)?;
    let (alert_url, alerts) = demo_ml::alert_printer().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::Input(format!("cannot listen on 127.0.0.1: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Input(e.to_string()))?;
    let url = format!("http://{addr}");
    output::progress(
        format,
        &format!(
            "starting an embedded coordinator on {addr}, a docker agent and a process agent (data in {})",
            data_dir.display()
        ),
    )?;
    let (dashboard, dashboard_url) = bind_dashboard(args).await?;
    let coordinator = start_coordinator(&data_dir, listener, dashboard, Some(alert_url));
    announce_dashboard(format, &dashboard_url, &data_dir)?;
    let access = match Access::bootstrap(&data_dir, &url).await {
        Ok(access) => access,
        Err(error) => {
            stop(coordinator).await;
            return Err(error);
        }
    };
    let docker = ExecutorKind::Docker(kiln_agent::DockerConfig {
        host: "unix:///var/run/docker.sock".to_owned(),
        allow_mounts: Vec::new(),
    });
    let agents = vec![
        start_agent(
            &data_dir,
            &url,
            &access.agent,
            "demo-build",
            "build",
            docker,
        ),
        start_agent(
            &data_dir,
            &url,
            &access.agent,
            "demo-deploy",
            "deploy",
            ExecutorKind::Process,
        ),
    ];
    let scenario = async {
        let client = Coordinator::connect(&url, &access.admin).await?;
        wait_for_agents(
            &client,
            format,
            &["demo-build (docker)", "demo-deploy (process)"],
        )
        .await?;
        demo_ml::run_scenario(&client, &repo, &alerts, format).await
    };
    let result = tokio::select! {
        result = scenario => result,
        _ = tokio::signal::ctrl_c() => Err(CliError::Input("interrupted".to_owned())),
    };
    let result = serve_dashboard(args, format, &dashboard_url, result).await;
    let _ = output::progress(
        format,
        "stopping the model server, the agents, then the coordinator",
    );
    demo_ml::stop_scenery();
    for agent in agents {
        stop(agent).await;
    }
    stop(coordinator).await;
    result
}

/// The project's root: here when run from it, else where this binary was
/// built from.
fn repo_root() -> PathBuf {
    if Path::new("examples/customer-behavior/kiln.yml").is_file() {
        return PathBuf::from(".")
            .canonicalize()
            .unwrap_or_else(|_| PathBuf::from("."));
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    built_from.canonicalize().unwrap_or(built_from)
}

/// The dashboard's listener and its URL.
async fn bind_dashboard(args: &DemoArgs) -> Result<(tokio::net::TcpListener, String), CliError> {
    if !args.http.ip().is_loopback() {
        return Err(CliError::Input(format!(
            "--http {}: the demo serves plain HTTP, so only on a loopback address (e.g. 127.0.0.1:7701)",
            args.http
        )));
    }
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .map_err(|e| {
            CliError::Input(format!(
                "cannot listen on {} for the dashboard: {e}",
                args.http
            ))
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Input(e.to_string()))?;
    Ok((listener, format!("http://{addr}/")))
}

fn announce_dashboard(format: OutputFormat, url: &str, data_dir: &Path) -> Result<(), CliError> {
    output::progress(
        format,
        &format!(
            "dashboard: {url} (sign in with the token in {})",
            data_dir.join("coordinator").join("admin.token").display()
        ),
    )
}

/// With `--serve`, keeps the farm up for the dashboard until Ctrl-C once
/// the scenario is over (whatever its outcome); otherwise says how to.
async fn serve_dashboard(
    args: &DemoArgs,
    format: OutputFormat,
    url: &str,
    outcome: Result<Outcome, CliError>,
) -> Result<Outcome, CliError> {
    let interrupted = matches!(&outcome, Err(CliError::Input(why)) if why == "interrupted");
    if interrupted {
        return outcome;
    }
    if !args.serve {
        let _ = output::progress(
            format,
            "(run `kiln demo --serve` to keep the dashboard open after the demo)",
        );
        return outcome;
    }
    let _ = output::progress(
        format,
        &format!("serving the dashboard at {url}; press Ctrl-C to stop"),
    );
    let _ = tokio::signal::ctrl_c().await;
    outcome
}

fn start_coordinator(
    data_dir: &Path,
    listener: tokio::net::TcpListener,
    dashboard: tokio::net::TcpListener,
    alert_webhook: Option<String>,
) -> Service {
    let config = kiln_coordinator::Config {
        data_dir: data_dir.join("coordinator"),
        grpc_listener: listener,
        http_listener: Some(dashboard),
        lease_ttl: LEASE_TTL,
        heartbeat_interval: HEARTBEAT,
        artifacts: kiln_coordinator::ArtifactPolicy::default(),
        alerts: kiln_coordinator::AlertTargets {
            webhook_url: alert_webhook,
            ..Default::default()
        },
        secret_key_file: None,
        max_agents_per_token: 64,
        max_delivery_keys: kiln_coordinator::MAX_DELIVERY_KEYS,
        public_url: None,
        // Loopback only, so plain text.
        tls: None,
    };
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(kiln_coordinator::run(config, stop_requested(stopped)));
    Service {
        name: "the coordinator".to_owned(),
        stop,
        task,
    }
}

fn start_agent(
    data_dir: &Path,
    url: &str,
    access: &ClientOptions,
    name: &str,
    role: &str,
    executor: ExecutorKind,
) -> Service {
    let config = kiln_agent::Config {
        coordinator: url.to_owned(),
        client: access.clone(),
        name: name.to_owned(),
        labels: BTreeMap::from([("role".to_owned(), role.to_owned())]),
        capacity: AGENT_CAPACITY,
        work_dir: data_dir.join("agents").join(name),
        executor,
        drain_timeout: DRAIN_TIMEOUT,
        gpus: Vec::new(),
        cache_max_bytes: 10 << 30,
    };
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(kiln_agent::run(config, stop_requested(stopped)));
    Service {
        name: name.to_owned(),
        stop,
        task,
    }
}

/// How the demo's own client and agents authenticate: as the bootstrap
/// admin the embedded coordinator wrote, and with an agent token created
/// through the API, as an operator would.
struct Access {
    admin: ClientOptions,
    agent: ClientOptions,
}

impl Access {
    async fn bootstrap(data_dir: &Path, url: &str) -> Result<Self, CliError> {
        let token_file = data_dir.join("coordinator").join("admin.token");
        let started = std::time::Instant::now();
        let admin = loop {
            match kiln_common::channel::Token::from_file(&token_file) {
                Ok(token) => break token,
                Err(_) if started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => return Err(CliError::Input(error.to_string())),
            }
        };
        let admin = ClientOptions {
            token: Some(admin),
            ..Default::default()
        };
        let coordinator = Coordinator::connect(url, &admin).await?;
        // Unique, so a kept data dir (--keep) can be reused.
        let name = format!("demo-agents-{}", crate::timefmt::now_ms());
        let request = kiln_proto::v1::CreateTokenRequest {
            name,
            role: kiln_proto::v1::Role::Agent as i32,
            pipeline: String::new(),
        };
        let created = coordinator
            .call(|mut rpc| async move { rpc.create_token(request).await })
            .await?;
        let agent = ClientOptions {
            token: Some(
                kiln_common::channel::Token::new(&created.secret)
                    .map_err(|error| CliError::Input(error.to_string()))?,
            ),
            ..Default::default()
        };
        Ok(Self { admin, agent })
    }
}

/// Completes when the flag is set, or when its sender is gone (the demo
/// itself is going away, so the service should too).
async fn stop_requested(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Signals a service and waits for it; a failure is reported, not
/// returned, because the demo's verdict is the run's.
async fn stop(service: Service) {
    let _ = service.stop.send(true);
    let mut task = service.task;
    let problem = match tokio::time::timeout(STOP_TIMEOUT, &mut task).await {
        Ok(Ok(Ok(()))) => return,
        Ok(Ok(Err(error))) => format!("failed: {error:#}"),
        Ok(Err(join_error)) if join_error.is_panic() => {
            format!("panicked: {}", panic_message(join_error.into_panic()))
        }
        Ok(Err(join_error)) => format!("was aborted: {join_error}"),
        Err(_) => {
            task.abort();
            format!(
                "did not stop within {}s and was aborted",
                STOP_TIMEOUT.as_secs()
            )
        }
    };
    eprintln!("error: {} {problem}", service.name);
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_owned(), |m| (*m).to_owned()),
    }
}

/// Waits until both agents are connected, so the first stages do not sit in
/// `ready` while the agents start.
async fn wait_for_agents(
    coordinator: &Coordinator,
    format: OutputFormat,
    names: &[&str],
) -> Result<(), CliError> {
    let deadline = tokio::time::Instant::now() + AGENTS_CONNECT_TIMEOUT;
    loop {
        let agents = coordinator.list_agents().await?;
        let connected = agents.into_iter().filter(|a| a.connected).count();
        if connected >= names.len() {
            let text = format!("agents connected: {}", names.join(", "));
            return output::progress(format, &text);
        }
        if tokio::time::Instant::now() >= deadline {
            // The coordinator queues the stages meanwhile; carry on.
            let text = format!(
                "warning: only {connected} of {} agents connected after {}s",
                names.len(),
                AGENTS_CONNECT_TIMEOUT.as_secs()
            );
            return output::progress(format, &text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `--example`, else `examples/hello` here, else the one next to the
/// sources this binary was built from.
fn example_dir(given: Option<&Path>) -> PathBuf {
    if let Some(dir) = given {
        return dir.to_path_buf();
    }
    let here = PathBuf::from("examples/hello");
    if here.join("kiln.yml").is_file() {
        return here;
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    built_from.canonicalize().unwrap_or(built_from)
}

/// Creates (or, without `keep`, clears) the data dir; returns its absolute
/// path so the agents' work dirs do not depend on the current directory.
fn prepare_data_dir(dir: &Path, keep: bool) -> Result<PathBuf, CliError> {
    let shown = dir.display();
    let io_error =
        |what: &str, e: std::io::Error| CliError::Input(format!("cannot {what} {shown}: {e}"));
    if dir.exists() && !keep {
        let is_ours = dir.join(MARKER).is_file();
        let is_empty = std::fs::read_dir(dir)
            .map_err(|e| io_error("read", e))?
            .next()
            .is_none();
        if !is_ours && !is_empty {
            return Err(CliError::Input(format!(
                "{shown} is not empty and was not made by `kiln demo`; pass another \
                 --data-dir (it is cleared at start), or --keep"
            )));
        }
        std::fs::remove_dir_all(dir).map_err(|e| io_error("clear", e))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| io_error("create", e))?;
    std::fs::write(
        dir.join(MARKER),
        "made by `kiln demo`; cleared by the next demo\n",
    )
    .map_err(|e| io_error("write into", e))?;
    dir.canonicalize().map_err(|e| io_error("resolve", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_is_cleared_only_if_the_demo_made_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("demo");
        let made = prepare_data_dir(&dir, false).unwrap();
        std::fs::write(made.join("old-run"), "x").unwrap();
        prepare_data_dir(&dir, true).unwrap();
        assert!(made.join("old-run").exists(), "--keep keeps");
        prepare_data_dir(&dir, false).unwrap();
        assert!(!made.join("old-run").exists(), "a new demo starts clean");

        let foreign = tmp.path().join("home");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("thesis.tex"), "x").unwrap();
        let error = prepare_data_dir(&foreign, false).unwrap_err().to_string();
        assert!(error.contains("was not made by `kiln demo`"), "{error}");
        assert!(foreign.join("thesis.tex").exists());
    }

    #[test]
    fn an_explicit_example_wins() {
        assert_eq!(example_dir(Some(Path::new("x/y"))), PathBuf::from("x/y"));
        assert!(example_dir(None).ends_with("examples/hello"));
    }

    #[test]
    fn panics_are_reported_with_their_message() {
        assert_eq!(panic_message(Box::new("boom")), "boom");
        assert_eq!(panic_message(Box::new(String::from("bang"))), "bang");
    }
}
