//! `kiln-coordinator`: flags → config → `kiln_coordinator::run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kiln_common::logging::LogFormat;
use sd_notify::NotifyState;

/// The Kiln coordinator: stores pipelines, runs and logs in sled and
/// dispatches stages to agents.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Flags {
    /// Without a command the coordinator serves.
    #[command(subcommand)]
    command: Option<Command>,
    /// Where the database lives.
    #[arg(long, env = "KILN_DATA_DIR", default_value = "./kiln-data")]
    data_dir: PathBuf,
    /// gRPC address for agents and the CLI.
    #[arg(long, env = "KILN_GRPC", default_value = "127.0.0.1:7700")]
    grpc: String,
    /// HTTP address for /healthz and /metrics ("" to disable).
    #[arg(long, env = "KILN_HTTP", default_value = "127.0.0.1:7701")]
    http: String,
    /// An agent silent for this long loses its stages (e.g. 10s, 1500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_ttl: Duration,
    /// How often agents heartbeat.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Largest single artifact (or source snapshot) accepted: bytes, or a
    /// size such as 512MiB or 2GiB.
    #[arg(
        long,
        value_name = "SIZE",
        default_value_t = kiln_coordinator::ArtifactPolicy::default().max_blob_bytes,
        value_parser = kiln_common::size::parse
    )]
    max_artifact_bytes: u64,
    /// Total size of the artifacts one run may store (e.g. 20GiB).
    #[arg(
        long,
        value_name = "SIZE",
        default_value_t = kiln_coordinator::ArtifactPolicy::default().max_run_bytes,
        value_parser = kiln_common::size::parse
    )]
    max_run_artifact_bytes: u64,
    /// `kiln gc` keeps the outputs of runs finished within this many days.
    #[arg(long, default_value_t = kiln_coordinator::ArtifactPolicy::default().keep_days)]
    artifact_keep_days: u32,
    /// A shared stage cache entry is used, and its blobs kept by `kiln gc`,
    /// this many days after an agent saved it.
    #[arg(long, default_value_t = kiln_coordinator::ArtifactPolicy::default().cache_keep_days)]
    cache_keep_days: u32,
    /// How often the coordinator runs a garbage collection pass itself
    /// (pipelines' `retention:`, unreferenced artifacts, expired caches:
    /// what `kiln gc` does); `off` leaves it to `kiln gc`.
    #[arg(long, value_name = "DURATION|off", default_value = "1h", value_parser = parse_gc_every)]
    gc_every: GcEvery,
    /// Prometheus Alertmanager to post alerts to (root URL).
    #[arg(long, env = "KILN_ALERTMANAGER_URL")]
    alertmanager_url: Option<String>,
    /// Webhook to post alerts to as JSON.
    #[arg(long, env = "KILN_ALERT_WEBHOOK_URL")]
    alert_webhook_url: Option<String>,
    /// HMAC key for the webhook's X-Kiln-Signature header (from the
    /// environment, so it stays out of process listings).
    #[arg(long, env = "KILN_ALERT_WEBHOOK_SECRET", hide_env_values = true)]
    alert_webhook_secret: Option<String>,
    /// Key file sealing secrets at rest (created on first start, mode 0600;
    /// default: secrets.key in the data dir).
    #[arg(long, env = "KILN_SECRET_KEY_FILE")]
    secret_key_file: Option<PathBuf>,
    /// Agents that may be connected at once with one agent token.
    #[arg(long, default_value_t = 64)]
    max_agents_per_token: usize,
    /// Webhook delivery keys remembered so a redelivery starts no second
    /// run; past it the oldest runs' keys are forgotten.
    #[arg(long, default_value_t = kiln_coordinator::MAX_DELIVERY_KEYS)]
    max_webhook_deliveries: usize,
    /// The dashboard's address as people reach it (behind a proxy, say),
    /// for the run links in commit statuses; default: the --http
    /// listener's own address.
    #[arg(long, env = "KILN_PUBLIC_URL", value_name = "URL", value_parser = parse_public_url)]
    public_url: Option<String>,
    /// PEM certificate chain: serve gRPC and HTTP over TLS.
    #[arg(long, env = "KILN_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KILN_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle: gRPC clients must present a certificate it signed
    /// (mutual TLS). HTTP does not ask for one.
    #[arg(
        long,
        env = "KILN_TLS_CLIENT_CA",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,
    /// Allow plain text on a non-loopback address (behind a TLS-terminating
    /// proxy, or on a private container network).
    #[arg(long, env = "KILN_INSECURE")]
    insecure: bool,
    /// How log lines on stderr look: text, or json (one object per line).
    #[arg(long, env = "KILN_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Takes an online backup of a running coordinator into FILE: its
    /// store (consistent at one instant; the farm keeps running), key files
    /// and blobs. Needs an admin token.
    Backup {
        /// Where to write the backup (FILE.partial until it is complete).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// The running coordinator's gRPC URL.
        #[arg(
            long,
            env = "KILN_COORDINATOR",
            default_value = "http://127.0.0.1:7700"
        )]
        coordinator: String,
        /// An admin token.
        #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file holding an admin token (e.g. DATA_DIR/admin.token).
        #[arg(long, env = "KILN_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// PEM CA bundle the coordinator's certificate must chain to.
        #[arg(long, env = "KILN_CA_FILE")]
        ca_file: Option<PathBuf>,
    },
    /// Restores a backup into a new (or empty) data directory; start a
    /// coordinator on it afterwards. Nothing is written if it fails.
    Restore {
        /// The backup file.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The data directory to create.
        #[arg(long, env = "KILN_DATA_DIR")]
        data_dir: PathBuf,
    },
}

/// Exit code when the flags ask for something unsafe (as clap's usage errors).
const EXIT_USAGE: u8 = 2;

/// `--public-url`: an absolute http(s) URL with a host, no query or
/// fragment (run links are appended to it).
fn parse_public_url(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .ok_or_else(|| format!("`{text}` must start with https:// or http://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("`{text}` names no host"));
    }
    if rest.contains(['?', '#', ' ']) {
        return Err(format!(
            "`{text}` may not hold a query, a fragment or spaces: run links are appended to it"
        ));
    }
    Ok(text.trim_end_matches('/').to_owned())
}

/// `--gc-every`: a period, or `off`.
#[derive(Clone, Copy, Debug)]
struct GcEvery(Option<Duration>);

fn parse_gc_every(text: &str) -> Result<GcEvery, String> {
    if text == "off" {
        return Ok(GcEvery(None));
    }
    parse_duration(text).map(|every| GcEvery(Some(every)))
}

/// A duration flag (`10s`, `1500ms`, `1m30s`); a lease or heartbeat of zero
/// makes no sense.
fn parse_duration(text: &str) -> Result<Duration, String> {
    match kiln_common::duration::parse(text) {
        Ok(duration) if duration.is_zero() => Err(format!(
            "`{text}` is zero; give a duration longer than that, e.g. {}",
            kiln_common::duration::EXAMPLES
        )),
        Ok(duration) => Ok(duration),
        Err(err) => Err(err.to_string()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut flags = Flags::parse();
    kiln_common::logging::init_with("info", flags.log_format);
    let result = match flags.command.take() {
        Some(command) => admin(command).await,
        None => serve(flags).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(line)) => {
            eprintln!("error: {line}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Failed(error)) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    /// The flags ask for something unsafe; one line saying what to do.
    Refused(String),
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self::Failed(error)
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Self::Failed(error.into())
    }
}

/// `backup` and `restore`: one line on stdout saying what was done.
async fn admin(command: Command) -> Result<(), Failure> {
    match command {
        Command::Backup {
            to,
            coordinator,
            token,
            token_file,
            ca_file,
        } => {
            let token =
                kiln_common::channel::Token::from_flags(token.as_deref(), token_file.as_deref())
                    .map_err(|error| Failure::Refused(error.to_string()))?;
            let options = kiln_common::channel::ClientOptions {
                ca_file,
                token,
                ..Default::default()
            };
            let endpoint = kiln_common::channel::CoordinatorEndpoint::new(&coordinator, &options)
                .map_err(|error| Failure::Refused(error.to_string()))?;
            let summary = kiln_coordinator::backup::save(&endpoint, &to)
                .await
                .map_err(anyhow::Error::from)?;
            println!("backed up {summary} to {}", to.display());
        }
        Command::Restore { from, data_dir } => {
            let summary =
                kiln_coordinator::backup::restore(&from, &data_dir).map_err(anyhow::Error::from)?;
            println!(
                "restored {summary} into {}; start the coordinator with --data-dir {}",
                data_dir.display(),
                data_dir.display()
            );
        }
    }
    Ok(())
}

async fn serve(flags: Flags) -> Result<(), Failure> {
    let grpc_listener = tokio::net::TcpListener::bind(&flags.grpc)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {} for gRPC: {error}", flags.grpc))?;
    let http_listener = if flags.http.is_empty() {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(&flags.http)
                .await
                .map_err(|error| {
                    anyhow::anyhow!("cannot listen on {} for HTTP: {error}", flags.http)
                })?,
        )
    };
    let tls = match (flags.tls_cert, flags.tls_key) {
        (Some(cert), Some(key)) => Some(kiln_common::tls::ServerTlsFiles {
            cert,
            key,
            client_ca: flags.tls_client_ca,
        }),
        // clap's `requires` makes the flags come in pairs.
        _ => None,
    };
    let mut listening = vec![("gRPC", grpc_listener.local_addr()?)];
    if let Some(listener) = &http_listener {
        listening.push(("HTTP", listener.local_addr()?));
    }
    if tls.is_none() {
        for (what, addr) in exposed(&listening) {
            if !flags.insecure {
                return Err(Failure::Refused(refusal(what, addr)));
            }
            tracing::warn!(%addr, "serving {what} without TLS on a non-loopback address (--insecure)");
        }
    }
    // One line on stdout with the bound addresses, so scripts and tests that
    // pass port 0 learn the real ones.
    println!(
        "kiln-coordinator listening grpc={} http={}",
        grpc_listener.local_addr()?,
        http_listener
            .as_ref()
            .map(|listener| listener.local_addr().map(|addr| addr.to_string()))
            .transpose()?
            .unwrap_or_default()
    );
    let config = kiln_coordinator::Config {
        data_dir: flags.data_dir,
        grpc_listener,
        http_listener,
        lease_ttl: flags.lease_ttl,
        heartbeat_interval: flags.heartbeat,
        artifacts: kiln_coordinator::ArtifactPolicy {
            max_blob_bytes: flags.max_artifact_bytes,
            max_run_bytes: flags.max_run_artifact_bytes,
            keep_days: flags.artifact_keep_days,
            cache_keep_days: flags.cache_keep_days,
            gc_every: flags.gc_every.0,
        },
        alerts: kiln_coordinator::AlertTargets {
            alertmanager_url: flags.alertmanager_url,
            webhook_url: flags.alert_webhook_url,
            webhook_secret: flags.alert_webhook_secret,
        },
        secret_key_file: flags.secret_key_file,
        max_agents_per_token: flags.max_agents_per_token,
        max_delivery_keys: flags.max_webhook_deliveries,
        public_url: flags.public_url,
        tls,
    };
    // Installed before readiness is announced, so a stop that follows at
    // once is a clean shutdown, not SIGTERM's default death.
    let shutdown = shutdown_signal()?;
    // Under systemd (Type=notify): ready once the listeners are bound, so
    // clients that connect from now on are queued, not refused.
    notify_systemd(&[NotifyState::Ready]);
    kiln_coordinator::run(config, shutdown).await?;
    Ok(())
}

/// Tells systemd about a state change when it asked to be told
/// (`NOTIFY_SOCKET`); a failure to tell it is logged, never fatal.
fn notify_systemd(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// The listeners other machines can reach.
fn exposed<'a>(
    listening: &'a [(&'static str, SocketAddr)],
) -> impl Iterator<Item = (&'static str, SocketAddr)> + 'a {
    listening
        .iter()
        .copied()
        .filter(|(_, addr)| !addr.ip().is_loopback())
}

fn refusal(what: &str, addr: SocketAddr) -> String {
    format!(
        "refusing to serve {what} on {addr} without TLS: pass --tls-cert and --tls-key \
         (see deploy/README.md), listen on a loopback address, or pass --insecure"
    )
}

/// Resolves on SIGTERM or SIGINT; both handlers are installed when this
/// returns.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        notify_systemd(&[NotifyState::Stopping]);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_loopback_listeners_are_exposed() {
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        let listening = [
            ("gRPC", addr("127.0.0.1:7700")),
            ("HTTP", addr("0.0.0.0:7701")),
            ("gRPC", addr("[::1]:7700")),
            ("gRPC", addr("[::]:7700")),
        ];
        let exposed: Vec<_> = exposed(&listening).collect();
        assert_eq!(
            exposed,
            [("HTTP", addr("0.0.0.0:7701")), ("gRPC", addr("[::]:7700"))]
        );
        let line = refusal("HTTP", addr("0.0.0.0:7701"));
        assert!(line.starts_with("refusing to serve HTTP on 0.0.0.0:7701 without TLS"));
        assert!(!line.contains('\n'));
    }

    #[test]
    fn public_urls_are_absolute_http_with_a_host_and_nothing_after_the_path() {
        assert_eq!(
            parse_public_url("https://kiln.example.org/ci/").unwrap(),
            "https://kiln.example.org/ci"
        );
        assert_eq!(
            parse_public_url("http://10.0.0.5:7701").unwrap(),
            "http://10.0.0.5:7701"
        );
        for bad in [
            "kiln.example.org",
            "ftp://x",
            "https://",
            "https:///x",
            "https://x/?a=1",
        ] {
            assert!(parse_public_url(bad).is_err(), "{bad}");
        }
        // Wiring check: the flag reaches the parsed flags, gc off works.
        let flags = Flags::try_parse_from([
            "kiln-coordinator",
            "--public-url",
            "https://kiln.example.org/",
            "--gc-every",
            "off",
        ])
        .unwrap();
        assert_eq!(
            flags.public_url.as_deref(),
            Some("https://kiln.example.org")
        );
        assert!(flags.gc_every.0.is_none());
        assert!(Flags::try_parse_from(["kiln-coordinator", "--gc-every", "0s"]).is_err());
    }

    #[test]
    fn duration_flags_take_any_duration_above_zero() {
        let parse = |args: &[&str]| Flags::try_parse_from(["kiln-coordinator"].iter().chain(args));
        let flags = parse(&["--lease-ttl=1m30s", "--heartbeat=250ms"]).unwrap();
        assert_eq!(flags.lease_ttl, Duration::from_secs(90));
        assert_eq!(flags.heartbeat, Duration::from_millis(250));
        let no_unit = parse(&["--lease-ttl=30"]).err().unwrap().to_string();
        assert!(no_unit.contains("needs a unit"), "{no_unit}");
        assert!(parse(&["--heartbeat=0s"]).is_err());
    }

    #[test]
    fn size_flags_take_sizes_with_units() {
        let parse = |args: &[&str]| Flags::try_parse_from(["kiln-coordinator"].iter().chain(args));
        let flags = parse(&["--max-artifact-bytes=512MiB", "--max-run-artifact-bytes=2G"]).unwrap();
        assert_eq!(flags.max_artifact_bytes, 512 << 20);
        assert_eq!(flags.max_run_artifact_bytes, 2_000_000_000);
        assert_eq!(
            parse(&["--max-artifact-bytes=1048576"])
                .unwrap()
                .max_artifact_bytes,
            1 << 20
        );
        let bad = parse(&["--max-artifact-bytes=1.5GiB"])
            .err()
            .unwrap()
            .to_string();
        assert!(bad.contains("512MiB"), "{bad}");
    }

    #[test]
    fn tls_flags_come_in_pairs() {
        let parse = |args: &[&str]| Flags::try_parse_from(["kiln-coordinator"].iter().chain(args));
        assert!(parse(&["--tls-cert=c.pem"]).is_err());
        assert!(parse(&["--tls-key=k.pem"]).is_err());
        assert!(parse(&["--tls-client-ca=ca.pem"]).is_err());
        let flags = parse(&[
            "--tls-cert=c.pem",
            "--tls-key=k.pem",
            "--tls-client-ca=ca.pem",
        ])
        .unwrap();
        assert_eq!(flags.tls_client_ca, Some(PathBuf::from("ca.pem")));
        assert!(!flags.insecure);
    }
}
