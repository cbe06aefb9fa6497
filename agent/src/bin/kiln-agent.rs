//! `kiln-agent`: flags → [`kiln_agent::Config`] → [`kiln_agent::run`], until
//! SIGTERM or SIGINT asks it to drain and stop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use kiln_agent::{AllowedMount, Config, DockerConfig, ExecutorKind};
use kiln_common::channel::{ClientOptions, Token};
use kiln_common::logging::LogFormat;
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

/// Runs the stages a Kiln coordinator assigns and streams their logs back.
#[derive(Debug, Parser)]
#[command(name = "kiln-agent", version)]
struct Args {
    /// gRPC address of the coordinator.
    #[arg(
        long,
        env = "KILN_AGENT_COORDINATOR",
        default_value = "http://127.0.0.1:7700",
        value_name = "URL"
    )]
    coordinator: String,
    /// Unique name of this agent.
    #[arg(long, env = "KILN_AGENT_NAME")]
    name: String,
    /// Labels stages can select this agent by: key=value,key=value.
    #[arg(long, env = "KILN_AGENT_LABELS", default_value = "", value_parser = parse_labels)]
    labels: Labels,
    /// How many stages run at once.
    #[arg(long, env = "KILN_AGENT_CAPACITY", default_value_t = 1)]
    capacity: u32,
    /// Directory for workspaces and the clone cache.
    #[arg(long, env = "KILN_AGENT_WORK_DIR", value_name = "DIR")]
    work_dir: PathBuf,
    /// How stages run; the agent advertises it as the label executor=KIND.
    #[arg(long, env = "KILN_AGENT_EXECUTOR", value_enum, default_value_t = Executor::Process)]
    executor: Executor,
    /// The Docker engine of `--executor docker`: unix:///PATH or tcp://HOST:PORT.
    #[arg(
        long,
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock",
        value_name = "URL"
    )]
    docker_host: String,
    /// A host path to mount into every stage container at the same path:
    /// PATH (read-only) or PATH:rw. Repeat it, or separate paths with commas.
    /// Nothing but the workspace is mounted without it.
    #[arg(
        long = "allow-mount",
        env = "KILN_AGENT_ALLOW_MOUNTS",
        value_name = "PATH[:rw]",
        value_delimiter = ','
    )]
    allow_mounts: Vec<AllowedMount>,
    /// On SIGTERM, how long running stages may finish before they are handed
    /// back: e.g. 30s, 500ms, 1m30s.
    #[arg(
        long,
        env = "KILN_AGENT_DRAIN_TIMEOUT",
        default_value = "30s",
        value_parser = kiln_common::duration::parse
    )]
    drain_timeout: Duration,
    /// GPUs stages may be given: `auto` (as `nvidia-smi` lists them),
    /// `none`, a count (`2` = devices 0 and 1) or device indexes (`0,2`).
    #[arg(long, env = "KILN_AGENT_GPUS", default_value = "auto")]
    gpus: String,
    /// The most the stage caches (`cache:` in kiln.yml) may take under
    /// the work dir; the least recently used go first. E.g. 10GiB.
    #[arg(
        long,
        env = "KILN_AGENT_CACHE_MAX_BYTES",
        value_name = "SIZE",
        default_value = "10GiB",
        value_parser = kiln_common::size::parse
    )]
    cache_max_bytes: u64,
    /// PEM CA bundle the coordinator's certificate must chain to (for an
    /// https:// coordinator; without it the system's roots are used).
    #[arg(long, env = "KILN_CA_FILE", value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// PEM client certificate, for a coordinator that requires one (mTLS).
    #[arg(
        long,
        env = "KILN_AGENT_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "KILN_AGENT_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// File holding the agent's token (`kiln token create NAME --role agent`;
    /// surrounding whitespace is ignored). The environment variable
    /// KILN_AGENT_TOKEN may hold the token itself instead; it never reaches
    /// stages.
    #[arg(long, env = "KILN_AGENT_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// How log lines on stderr look: text, or json (one object per line).
    #[arg(long, env = "KILN_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP; slots,
    /// running stages, start latencies, output bytes — no secrets). Port 0
    /// picks a free one; the address is printed on stdout.
    #[arg(long, env = "KILN_AGENT_METRICS", value_name = "ADDR")]
    metrics: Option<String>,
}

/// The token's value comes from the environment only: a flag would show it
/// in process listings.
const TOKEN_ENV: &str = "KILN_AGENT_TOKEN";

type Labels = BTreeMap<String, String>;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Executor {
    /// Host processes under `sh -e`.
    Process,
    /// One container per stage on the Docker engine at --docker-host.
    Docker,
}

fn parse_labels(text: &str) -> Result<Labels, String> {
    kiln_common::labels::parse(text)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    kiln_common::logging::init_with("info", args.log_format);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let token_value = std::env::var(TOKEN_ENV).ok();
    if token_value.is_some() && args.token_file.is_some() {
        anyhow::bail!(
            "both {TOKEN_ENV} and --token-file (KILN_AGENT_TOKEN_FILE) are set; keep one"
        );
    }
    let token = Token::from_flags(token_value.as_deref(), args.token_file.as_deref())?;
    let config = Config {
        coordinator: args.coordinator,
        client: ClientOptions {
            ca_file: args.ca_file,
            client_cert: args.tls_cert,
            client_key: args.tls_key,
            token,
        },
        name: args.name,
        labels: args.labels,
        capacity: args.capacity,
        work_dir: args.work_dir,
        executor: match args.executor {
            Executor::Process => ExecutorKind::Process,
            Executor::Docker => ExecutorKind::Docker(DockerConfig {
                host: args.docker_host,
                allow_mounts: args.allow_mounts,
            }),
        },
        drain_timeout: args.drain_timeout,
        gpus: match kiln_agent::parse_gpus(&args.gpus) {
            Ok(Some(gpus)) => gpus,
            Ok(None) => kiln_agent::detect_gpus(),
            Err(error) => anyhow::bail!("--gpus: {error}"),
        },
        cache_max_bytes: args.cache_max_bytes,
    };
    // Installed before the agent starts, so an early signal is not lost.
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let shutdown = async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        notify_systemd(&[NotifyState::Stopping]);
    };
    let metrics = kiln_agent::Metrics::new(config.executor.label());
    let metrics_server = match &args.metrics {
        Some(addr) => Some(serve_metrics(addr, metrics.clone()).await?),
        None => None,
    };
    // Under systemd (Type=notify): ready once the flags and token are
    // good and the metrics listener is bound; the agent then connects,
    // retrying with backoff until it can.
    notify_systemd(&[NotifyState::Ready]);
    let result = kiln_agent::run_with_metrics(config, metrics, shutdown).await;
    if let Some(server) = metrics_server {
        // Scrapes hold no state worth finishing.
        server.abort();
        let _ = server.await;
    }
    result
}

/// Binds `addr` and serves `GET /metrics` from `metrics` until aborted;
/// prints the bound address on stdout (for port 0).
async fn serve_metrics(
    addr: &str,
    metrics: kiln_agent::Metrics,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --metrics"))?;
    let bound = listener.local_addr()?;
    println!("kiln-agent metrics http://{bound}/metrics");
    tracing::info!(%bound, "serving /metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    Ok(tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(%error, "the metrics listener stopped");
        }
    }))
}

/// Tells systemd about a state change when it asked to be told
/// (`NOTIFY_SOCKET`); a failure to tell it is logged, never fatal.
fn notify_systemd(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_timeouts_take_any_duration_and_need_a_unit() {
        let drain_timeout = |value: &str| {
            let args = [
                "kiln-agent",
                "--name=a",
                "--work-dir=d",
                "--drain-timeout",
                value,
            ];
            Args::try_parse_from(args).map(|args| args.drain_timeout)
        };
        assert_eq!(drain_timeout("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(drain_timeout("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(drain_timeout("2h").unwrap(), Duration::from_secs(7200));
        let no_unit = drain_timeout("30").unwrap_err().to_string();
        assert!(no_unit.contains("needs a unit"), "{no_unit}");
        assert!(no_unit.contains("1m30s"), "{no_unit}");
        assert!(drain_timeout("junk").is_err());
    }

    #[test]
    fn flags_build_a_config() {
        let args = Args::try_parse_from([
            "kiln-agent",
            "--name=a1",
            "--labels=role=deploy,os=linux",
            "--capacity=3",
            "--work-dir=/tmp/kiln",
            "--drain-timeout=5s",
        ])
        .unwrap();
        assert_eq!(args.labels["role"], "deploy");
        assert_eq!(args.capacity, 3);
        assert_eq!(args.drain_timeout, Duration::from_secs(5));
        assert!(
            Args::try_parse_from(["kiln-agent", "--name=a", "--work-dir=d", "--labels=x"]).is_err()
        );
    }

    #[test]
    fn docker_flags() {
        let args = Args::try_parse_from([
            "kiln-agent",
            "--name=a1",
            "--work-dir=/tmp/kiln",
            "--executor=docker",
            "--allow-mount=/data",
            "--allow-mount=/var/run/docker.sock:rw,/cache",
        ])
        .unwrap();
        assert!(matches!(args.executor, Executor::Docker));
        let paths: Vec<_> = args
            .allow_mounts
            .iter()
            .map(|m| (m.path.display().to_string(), m.read_only))
            .collect();
        assert_eq!(
            paths,
            [
                ("/data".to_owned(), true),
                ("/var/run/docker.sock".to_owned(), false),
                ("/cache".to_owned(), true)
            ]
        );
        let relative = [
            "kiln-agent",
            "--name=a",
            "--work-dir=d",
            "--allow-mount=data",
        ];
        assert!(Args::try_parse_from(relative).is_err());
    }
}
