//! `kiln`: the command-line client of a Kiln build farm, and `kiln demo`.
//!
//! # Layout
//! - [`args`]: the command line (clap), including the exit codes in `--help`.
//! - [`commands`]: one module per group of commands; each prints its result.
//! - [`demo`]: an embedded coordinator and two agents running an example.
//! - [`client`]: the `ControlService` connection; turns failures into
//!   [`error::CliError`]. [`reconnect`]: how followers (`logs -f`,
//!   `run --wait`) get their stream back after the coordinator restarts.
//! - [`view`]: what is shown, built from the proto messages; the JSON shape.
//! - [`output`]: tables and JSON; [`timefmt`]: times and durations.
//! - [`git`]: where a pipeline directory lives in git.
//! - [`completion`]: shell completion scripts and man pages, from [`args`].
//! - [`context`]: named coordinators in `~/.config/kiln/config.toml`,
//!   filling in what flags and environment leave unset.
//! - [`error`]: failures and their exit codes.
//!
//! This file only parses flags, connects, dispatches, and turns the result
//! into an exit code.

mod args;
mod client;
mod commands;
mod completion;
mod context;
mod demo;
mod demo_ml;
mod demo_rollout;
mod error;
mod git;
mod output;
mod reconnect;
mod timefmt;
mod view;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use kiln_common::channel::{ChannelError, ClientOptions, Token};

use crate::args::{
    AgentCommand, ArtifactsCommand, CacheCommand, Cli, Command, EnvCommand, GlobalArgs,
    OutputFormat, PipelineCommand, ReleaseCommand, RepoCommand,
};
use crate::client::Coordinator;
use crate::commands::{
    agents, artifacts, cache, delivery, logs, metrics, models, pipeline, provenance, repo, rollout,
    runs, security,
};
use crate::error::{CliError, Outcome};

#[tokio::main]
async fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let code = match dispatch(cli, &matches).await {
        Ok(outcome) => outcome.exit_code(),
        Err(error) => {
            if error.should_print() {
                eprintln!("error: {error}");
            }
            error.exit_code()
        }
    };
    ExitCode::from(code)
}

async fn dispatch(mut cli: Cli, matches: &clap::ArgMatches) -> Result<Outcome, CliError> {
    // None of these needs a coordinator, a token or TLS files.
    match &cli.command {
        Command::Completion(args) => return completion::completion(args.shell),
        Command::Man(args) => return completion::man_pages(&args.dir),
        Command::Context(command) => return context::run(command, &cli.global, matches),
        _ => {}
    }
    context::apply(&mut cli.global, matches)?;
    let format = cli.global.output;
    let url = &cli.global.coordinator;
    let options = client_options(&cli.global)?;
    match cli.command {
        // The demo brings its own coordinator.
        Command::Demo(args) => demo::demo(&args, format).await,
        // Connects only for what --key and --provenance do not give.
        Command::Verify(args) => provenance::verify(url, &options, format, &args).await,
        Command::Pipeline(PipelineCommand::Register { dir }) => {
            // A broken kiln.yml is reported even when no coordinator is up.
            let prepared = pipeline::prepare(&dir)?;
            let coordinator = Coordinator::connect(url, &options).await?;
            pipeline::register(&coordinator, format, prepared).await
        }
        command => {
            let coordinator = Coordinator::connect(url, &options)
                .await?
                .with_patience(cli.global.reconnect_for);
            remote(&coordinator, format, command).await
        }
    }
}

/// TLS files and token from the global flags; both token flags at once is
/// an input error.
fn client_options(global: &GlobalArgs) -> Result<ClientOptions, CliError> {
    let token = Token::from_flags(global.token.as_deref(), global.token_file.as_deref()).map_err(
        |error| match error {
            ChannelError::TokenTwice => CliError::Input(
                "--token (KILN_TOKEN) and --token-file (KILN_TOKEN_FILE) are both set; keep one"
                    .to_owned(),
            ),
            other => CliError::Input(other.to_string()),
        },
    )?;
    Ok(ClientOptions {
        ca_file: global.ca_file.clone(),
        client_cert: global.tls_cert.clone(),
        client_key: global.tls_key.clone(),
        token,
    })
}

/// The commands that only talk to the coordinator.
async fn remote(
    c: &Coordinator,
    format: OutputFormat,
    command: Command,
) -> Result<Outcome, CliError> {
    match command {
        Command::Pipeline(PipelineCommand::List) => pipeline::list(c, format).await,
        Command::Repo(RepoCommand::Add {
            repo: source,
            name,
            branch,
            file,
            status,
        }) => {
            let mut request = repo::prepare(&source, name, branch, file)?;
            request.status_forge = status.status.unwrap_or_default();
            request.status_url = status.status_url.unwrap_or_default();
            request.status_project = status.status_project.unwrap_or_default();
            request.status_token_secret = status.status_token_secret.unwrap_or_default();
            if let Some(poll) = status.poll {
                let every = kiln_common::duration::parse(&poll)
                    .map_err(|error| CliError::Input(format!("--poll `{poll}`: {error}")))?;
                request.poll_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
            }
            repo::add(c, format, request).await
        }
        Command::Repo(RepoCommand::List) => repo::list(c, format).await,
        Command::Pipeline(PipelineCommand::Show { name, version }) => {
            pipeline::show(c, format, &name, version).await
        }
        Command::Run(args) => runs::run(c, format, &args).await,
        Command::Runs(args) => runs::list(c, format, &args).await,
        Command::Status(run) => runs::status(c, format, run.run).await,
        Command::Logs(args) => {
            logs::logs(c, format, args.run, args.stage.as_deref(), args.follow).await
        }
        Command::Cancel(run) => runs::cancel(c, format, run.run).await,
        Command::Retry(args) => runs::retry(c, format, args.run, &args.stage).await,
        Command::Agents => agents::list(c, format).await,
        Command::Agent(AgentCommand::Drain { name }) => agents::drain(c, format, &name).await,
        Command::Artifacts(ArtifactsCommand::Ls { run, stage }) => {
            artifacts::list(c, format, run, stage.as_deref()).await
        }
        Command::Artifacts(ArtifactsCommand::Get {
            run,
            stage,
            path,
            out,
        }) => artifacts::get(c, format, run, &stage, &path, &out).await,
        Command::Gc(args) => artifacts::gc(c, format, &args).await,
        Command::Cache(CacheCommand::Ls { pipeline }) => {
            cache::list(c, format, pipeline.as_deref()).await
        }
        Command::Cache(CacheCommand::Clear { pipeline, key }) => {
            cache::clear(c, format, &pipeline, key.as_deref()).await
        }
        Command::Env(EnvCommand::Ls) => delivery::environments(c, format).await,
        Command::Env(EnvCommand::History { environment }) => {
            delivery::history(c, format, &environment).await
        }
        Command::Env(EnvCommand::Unfreeze { environment }) => {
            delivery::unfreeze(c, format, &environment).await
        }
        Command::Release(ReleaseCommand::Show { release }) => {
            delivery::show_release(c, format, release).await
        }
        Command::Release(ReleaseCommand::Provenance(args)) => provenance::show(c, &args).await,
        Command::Lineage(args) => provenance::lineage(c, format, &args.digest).await,
        Command::Approve(args) => delivery::decide(c, format, &args, true).await,
        Command::Reject(args) => delivery::decide(c, format, &args, false).await,
        Command::Rollback(args) => delivery::rollback(c, format, &args).await,
        Command::Model(command) => models::model(c, format, command).await,
        Command::Promote(args) => models::promote(c, format, &args).await,
        Command::Metrics(args) => metrics::metrics(c, format, &args).await,
        Command::Rollout(command) => rollout::rollout(c, format, &command).await,
        Command::Token(command) => security::token(c, format, command).await,
        Command::Secret(command) => security::secret(c, format, command).await,
        Command::Audit(args) => security::audit(c, format, args.limit).await,
        Command::Whoami => security::whoami(c, format).await,
        Command::Demo(_)
        | Command::Completion(_)
        | Command::Man(_)
        | Command::Context(_)
        | Command::Verify(_)
        | Command::Pipeline(PipelineCommand::Register { .. }) => {
            unreachable!("dispatch handles the commands that do more than call the coordinator")
        }
    }
}
