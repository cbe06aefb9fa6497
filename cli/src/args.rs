//! The command line, as clap parses it. Only shapes live here; what each
//! command does lives in `commands/` and `demo.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Shown after `kiln --help`: the contract scripts rely on.
const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  the run finished but did not succeed (`kiln run --wait`, `kiln demo`)
  2  usage or input error, or the coordinator refused the request
     (invalid argument, not found, failed precondition, ...)
  3  the coordinator cannot be reached (`logs -f` and `run --wait`
     reconnect for --reconnect-for first)
  4  `kiln verify`: the file did not verify (the provenance signature does
     not hold, or the file is not among what the release released)

Errors are printed as one line on stderr: `error: <message>`.
With `--output json`, commands print JSON objects whose fields are listed in
cli/README.md (names are stable); `kiln logs` prints one object per line.";

/// kiln: the command-line client of a Kiln build farm.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, after_help = AFTER_HELP)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Flags every command accepts; `--help` lists them under their own
/// heading, apart from a command's own.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub(crate) struct GlobalArgs {
    /// The context (from ~/.config/kiln/config.toml) to use instead of the
    /// current one; see `kiln context`.
    #[arg(long, global = true, env = "KILN_CONTEXT", value_name = "NAME")]
    pub(crate) context: Option<String>,
    /// gRPC address of the coordinator.
    #[arg(
        long,
        global = true,
        env = "KILN_COORDINATOR",
        default_value = "http://127.0.0.1:7700",
        value_name = "URL"
    )]
    pub(crate) coordinator: String,
    /// PEM CA bundle the coordinator's certificate must chain to (for an
    /// https:// coordinator; without it the system's roots are used).
    #[arg(long, global = true, env = "KILN_CA_FILE", value_name = "PEM")]
    pub(crate) ca_file: Option<PathBuf>,
    /// PEM client certificate, for a coordinator that requires one (mTLS).
    #[arg(long, global = true, env = "KILN_TLS_CERT", value_name = "PEM")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "KILN_TLS_KEY", value_name = "PEM")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Bearer token for the coordinator (`kiln token create`); prefer
    /// --token-file or the environment, a flag shows in process listings.
    #[arg(
        long,
        global = true,
        env = "KILN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub(crate) token: Option<String>,
    /// File holding the token (surrounding whitespace is ignored).
    #[arg(long, global = true, env = "KILN_TOKEN_FILE", value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// How results are printed.
    #[arg(
        long,
        global = true,
        env = "KILN_OUTPUT",
        value_enum,
        default_value_t = OutputFormat::Table
    )]
    pub(crate) output: OutputFormat,
    /// How long `logs -f` and `run --wait` keep reconnecting to a
    /// coordinator that went away before giving up (exit code 3).
    #[arg(
        long,
        global = true,
        env = "KILN_RECONNECT_FOR",
        default_value = "2m",
        value_name = "DURATION",
        value_parser = kiln_common::duration::parse
    )]
    pub(crate) reconnect_for: std::time::Duration,
}

/// `--output`: tables for people, JSON for scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Register, list and show pipelines.
    #[command(subcommand)]
    Pipeline(PipelineCommand),
    /// Register a repository once; every run reads its pipeline files at
    /// the commit it builds.
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Trigger a run of a pipeline; prints the run id (or follows it with --wait).
    Run(RunArgs),
    /// List recent runs, newest first.
    Runs(RunsArgs),
    /// Show a run and its stages.
    Status(RunRef),
    /// Print the logs of a run, or of one of its stages.
    Logs(LogsArgs),
    /// Cancel a run.
    Cancel(RunRef),
    /// Run a failed stage of a run again (and the stages after it).
    Retry(RetryArgs),
    /// List the agents the coordinator knows.
    Agents,
    /// Manage one agent.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// List and download the artifacts of a run.
    #[command(subcommand)]
    Artifacts(ArtifactsCommand),
    /// Delete finished runs past their pipeline's `retention:`, and stored
    /// artifacts that no run or release keeps any more.
    Gc(GcArgs),
    /// The coordinator's shared stage caches (`cache: {shared: true}`).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Environments and their releases.
    #[command(subcommand)]
    Env(EnvCommand),
    /// Create, list and revoke access tokens (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Set, list and remove secrets stages get as environment variables (admin).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// List state-changing calls: who, what, when and how it ended (admin).
    Audit(AuditArgs),
    /// Show the token this CLI uses.
    Whoami,
    /// Releases: what went live where, built from what.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Let a manual gate pass.
    Approve(DecideArgs),
    /// Fail a manual gate.
    Reject(DecideArgs),
    /// Put an environment's previous (or a chosen) release back.
    Rollback(RollbackArgs),
    /// Models (`model:`), their versions and aliases.
    #[command(subcommand)]
    Model(crate::commands::models::ModelCommand),
    /// Deploy an existing model version to another environment, after
    /// that environment's gates pass again (no training).
    Promote(crate::commands::models::PromoteArgs),
    /// What the monitors read from an environment's releases, and their metrics.
    Metrics(MetricsArgs),
    /// A progressive rollout (`strategy:`): where it is, or move it on.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Check a file (a model file, or an artifact archive) against a
    /// release's signed provenance.
    Verify(VerifyArgs),
    /// Every run and release that produced, used or released a digest.
    Lineage(LineageArgs),
    /// Start an embedded coordinator and two agents, and run an example pipeline.
    Demo(DemoArgs),
    /// Print a shell completion script, e.g. `source <(kiln completion bash)`.
    Completion(CompletionArgs),
    /// Write man pages for kiln and every subcommand (kiln.1, kiln-run.1, ...).
    Man(ManArgs),
    /// Named coordinators in ~/.config/kiln/config.toml: list, use, set.
    #[command(subcommand)]
    Context(ContextCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum ContextCommand {
    /// List the contexts; `*` marks the current one.
    Ls,
    /// Make NAME the current context.
    Use { name: String },
    /// Save the connection flags given with this command (--coordinator,
    /// --token-file, --ca-file) as context NAME; the first context saved
    /// becomes the current one.
    Set { name: String },
}

#[derive(Debug, Args)]
pub(crate) struct CompletionArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    pub(crate) shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub(crate) struct ManArgs {
    /// Directory to write the pages to (created if missing), e.g.
    /// /usr/local/share/man/man1.
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub(crate) dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PipelineCommand {
    /// Validate DIR/kiln.yml and register it with the git work tree around DIR.
    Register {
        /// Directory holding kiln.yml, inside a git work tree.
        dir: PathBuf,
    },
    /// List registered pipelines (latest versions).
    List,
    /// Show a pipeline: stages, source and its kiln.yml.
    Show {
        name: String,
        /// A specific version; the latest when omitted.
        #[arg(long)]
        version: Option<u32>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Pipeline name.
    pub(crate) pipeline: String,
    /// Branch, tag or commit; the head of the registered branch when omitted.
    #[arg(long)]
    pub(crate) rev: Option<String>,
    /// Follow the run until it ends; exit 0 only if it succeeded.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Run this directory as it is now (uncommitted work included, .gitignore
    /// honoured) instead of a git revision: it is packed and uploaded first.
    #[arg(long, value_name = "DIR", conflicts_with = "rev")]
    pub(crate) source: Option<std::path::PathBuf>,
    /// A value for one of the pipeline's `params:` (checked against its
    /// type); repeat for more. The others get their defaults.
    #[arg(short = 'p', long = "param", value_name = "NAME=VALUE")]
    pub(crate) params: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ArtifactsCommand {
    /// List what the stages of a run stored.
    Ls {
        run: u64,
        /// Only this stage.
        stage: Option<String>,
    },
    /// Download an artifact, check its digest and unpack it into a directory.
    Get {
        run: u64,
        stage: String,
        /// The artifact's workspace path, as `kiln artifacts ls` shows it.
        path: String,
        /// Where to unpack it (its path is recreated below this directory).
        #[arg(short, long, default_value = ".")]
        out: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum CacheCommand {
    /// List shared cache entries, newest first.
    Ls {
        /// Only this pipeline's.
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// Forget a pipeline's shared cache entries (the next run saves anew).
    Clear {
        pipeline: String,
        /// Only the entry under this rendered key.
        #[arg(long)]
        key: Option<String>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct GcArgs {
    /// Keep the outputs of runs finished within this many days (default: the
    /// coordinator's `--artifact-keep-days`).
    #[arg(long)]
    pub(crate) keep_days: Option<u32>,
    /// Only report what would be deleted.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RunsArgs {
    /// Only runs of this pipeline.
    #[arg(long)]
    pub(crate) pipeline: Option<String>,
    /// At most this many runs (the coordinator's default is 50).
    #[arg(long)]
    pub(crate) limit: Option<u32>,
}

#[derive(Debug, Args)]
pub(crate) struct RunRef {
    /// Run id, as printed by `kiln run`.
    pub(crate) run: u64,
}

#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    /// Run id.
    pub(crate) run: u64,
    /// Only this stage; all stages, in stage order, when omitted.
    pub(crate) stage: Option<String>,
    /// Keep printing new lines until the stage(s) end.
    #[arg(short, long)]
    pub(crate) follow: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RetryArgs {
    /// Run id.
    pub(crate) run: u64,
    /// Stage name.
    pub(crate) stage: String,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// Stop giving work to an agent; its running stages finish.
    Drain {
        /// Agent name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Directory of the example pipeline (must be committed to git).
    #[arg(long, value_name = "DIR")]
    pub(crate) example: Option<PathBuf>,
    /// Where the embedded coordinator and agents keep their state.
    #[arg(long, value_name = "D", default_value = ".kiln-demo")]
    pub(crate) data_dir: PathBuf,
    /// Keep the data dir from an earlier demo instead of clearing it.
    #[arg(long)]
    pub(crate) keep: bool,
    /// Keep serving the web dashboard after the demo, until Ctrl-C.
    #[arg(long)]
    pub(crate) serve: bool,
    /// Where the dashboard listens (loopback only: plain HTTP).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub(crate) http: std::net::SocketAddr,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "kiln",
            "runs",
            "--output",
            "json",
            "--coordinator",
            "http://h:1",
        ])
        .unwrap();
        assert_eq!(cli.global.output, OutputFormat::Json);
        assert_eq!(cli.global.coordinator, "http://h:1");
    }

    #[test]
    fn logs_takes_an_optional_stage_and_follow() {
        let cli = Cli::try_parse_from(["kiln", "logs", "7", "train", "-f"]).unwrap();
        let Command::Logs(logs) = cli.command else {
            panic!("expected logs")
        };
        assert_eq!(
            (logs.run, logs.stage.as_deref(), logs.follow),
            (7, Some("train"), true)
        );
    }

    #[test]
    fn a_bad_run_id_is_a_usage_error() {
        let err = Cli::try_parse_from(["kiln", "status", "seven"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum EnvCommand {
    /// List every pipeline's environments and what is live in each.
    Ls,
    /// Every release of an environment, newest first.
    History {
        /// PIPELINE/ENV (e.g. credit/production), or ENV alone when only
        /// one pipeline has an environment of that name.
        environment: String,
    },
    /// Allow promotions again after a monitor froze the environment.
    Unfreeze {
        /// PIPELINE/ENV, or ENV alone when only one pipeline has it.
        environment: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ReleaseCommand {
    /// A release's lineage: run, source, datasets, artifacts, image,
    /// metrics, gates, provenance digest.
    Show { release: u64 },
    /// A release's signed provenance: the DSSE envelope exactly as signed
    /// (so its sha256 is the release's provenance digest), or the statement.
    Provenance(ProvenanceArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ProvenanceArgs {
    pub(crate) release: u64,
    /// Print the in-toto statement (pretty JSON) instead of the envelope.
    #[arg(long)]
    pub(crate) statement: bool,
    /// Write to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// The file to check: a file from inside a released artifact
    /// (`model.pkl`), or an artifact archive.
    pub(crate) file: PathBuf,
    /// The release the file should come from.
    #[arg(long)]
    pub(crate) release: u64,
    /// The coordinator's public key (`provenance.pub` in its data dir, SPKI
    /// PEM). Without it the key is fetched from the coordinator, so the
    /// check trusts the coordinator.
    #[arg(long, value_name = "PEM_FILE")]
    pub(crate) key: Option<PathBuf>,
    /// The DSSE envelope (`kiln release provenance ID --out FILE`); fetched
    /// from the coordinator when omitted. With --key too, nothing is
    /// fetched: the check is offline.
    #[arg(long, value_name = "ENVELOPE_FILE")]
    pub(crate) provenance: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct LineageArgs {
    /// `sha256:<hex>` (or bare hex) of an artifact archive, a file inside a
    /// released artifact, a dataset or a source snapshot; or a 40-digit git
    /// commit.
    pub(crate) digest: String,
}

#[derive(Debug, Args)]
pub(crate) struct DecideArgs {
    pub(crate) run: u64,
    /// The gate stage waiting for a decision.
    pub(crate) stage: String,
    /// Why, recorded on the gate's decision (e.g. --reason "recall too low").
    #[arg(long, default_value = "")]
    pub(crate) reason: String,
}

#[derive(Debug, Args)]
pub(crate) struct RollbackArgs {
    /// PIPELINE/ENV (e.g. credit/production), or ENV alone when only one
    /// pipeline has an environment of that name.
    pub(crate) environment: String,
    /// The release to restore; if omitted, the one of the same environment
    /// of the same pipeline that was live before the current one.
    #[arg(long)]
    pub(crate) to: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RolloutCommand {
    /// The rollout in progress (or the last one): step, traffic weight,
    /// analysis rounds, outcome.
    Status {
        /// PIPELINE/ENV, or ENV alone when only one pipeline has it.
        environment: String,
    },
    /// Skip the remaining pauses and steps: the candidate takes all
    /// traffic next.
    Promote {
        /// PIPELINE/ENV, or ENV alone when only one pipeline has it.
        environment: String,
    },
    /// Stop the rollout: the previous release is deployed again at 100%.
    Abort {
        /// PIPELINE/ENV, or ENV alone when only one pipeline has it.
        environment: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct MetricsArgs {
    /// PIPELINE/ENV (e.g. credit/production), or ENV alone when only one
    /// pipeline has an environment of that name.
    pub(crate) environment: String,
    /// Only samples this recent (e.g. 1h, 30m); default: all kept.
    #[arg(long, value_name = "DURATION", value_parser = kiln_common::duration::parse)]
    pub(crate) since: Option<std::time::Duration>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token; its secret is printed once.
    Create {
        name: String,
        #[arg(long, value_enum)]
        role: TokenRole,
        /// The pipeline a `pipeline` token may register and trigger.
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token; calls with it fail from then on.
    Revoke { name: String },
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum TokenRole {
    /// Read everything.
    Viewer,
    /// Viewer plus run, cancel, retry, approve, reject, rollback.
    Operator,
    /// Operator plus tokens, secrets, agents, gc and the audit log.
    Admin,
    /// Only what an agent needs.
    Agent,
    /// Only register and trigger one pipeline (for repositories).
    Pipeline,
}

#[derive(Debug, Subcommand)]
pub(crate) enum SecretCommand {
    /// Set a secret; the value is read from stdin, never from the command line.
    Set { name: String },
    /// List secret names (values are never shown).
    List,
    /// Remove a secret.
    Rm { name: String },
}

#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// How many entries, newest first.
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: u32,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RepoCommand {
    /// Register the pipelines of a repository: `kiln.yml` at its root and
    /// every `.kiln/*.yml` (or the one --file), read by the coordinator at
    /// the branch head now and at each run's commit afterwards.
    Add {
        /// A git work tree here (its top level is registered), or a git
        /// URL the coordinator and agents can fetch.
        repo: String,
        /// A name for the repository; the last part of the path or URL
        /// when omitted.
        #[arg(long)]
        name: Option<String>,
        /// Branch runs build when no revision is given; for a work tree the
        /// branch checked out, else `main`, when omitted.
        #[arg(long)]
        branch: Option<String>,
        /// One pipeline file inside the repository, e.g. `ml/kiln.yml`.
        #[arg(long, value_name = "PATH")]
        file: Option<String>,
    },
    /// List registered repositories and their pipelines.
    List,
}
