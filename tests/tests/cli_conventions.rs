//! The habits a CLI user brings from gh and kubectl: completion scripts
//! that load in the shell (`source <(kiln completion bash)`), man pages,
//! and `KILN_OUTPUT=json` in place of `--output json` on every command.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use kiln_tests::{Coordinator, CoordinatorOptions, binary, kiln_command};

#[test]
fn bash_completion_loads_and_completes_subcommands() -> Result<()> {
    let kiln = binary("kiln");
    // What a user puts in ~/.bashrc, then a Tab after `kiln pip` and after
    // `kiln env `.
    let script = format!(
        r#"source <('{kiln}' completion bash) || exit 1
complete -p kiln || exit 1
COMP_WORDS=(kiln pip); COMP_CWORD=1; _kiln kiln pip kiln
echo "first: ${{COMPREPLY[*]}}"
COMP_WORDS=(kiln env ''); COMP_CWORD=2; _kiln kiln '' env
echo "env: ${{COMPREPLY[*]}}""#,
        kiln = kiln.display()
    );
    let output = Command::new("bash")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .context("running bash")?;
    let said = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "{said}{stderr}");
    ensure!(stderr.trim().is_empty(), "bash complained:\n{stderr}");
    ensure!(said.contains("-F _kiln kiln"), "{said}");
    ensure!(said.contains("first: pipeline\n"), "{said}");
    let env_line = said.lines().find(|l| l.starts_with("env: ")).unwrap_or("");
    for sub in ["history", "ls", "unfreeze"] {
        ensure!(env_line.split_whitespace().any(|w| w == sub), "{said}");
    }
    Ok(())
}

#[test]
fn zsh_and_fish_scripts_are_printed() -> Result<()> {
    for (shell, marker) in [("zsh", "#compdef kiln"), ("fish", "complete -c kiln")] {
        let output = Command::new(binary("kiln"))
            .args(["completion", shell])
            .output()?;
        let script = String::from_utf8(output.stdout)?;
        ensure!(output.status.success(), "kiln completion {shell} failed");
        ensure!(script.contains(marker), "{shell}: no {marker:?}");
    }
    let output = Command::new(binary("kiln"))
        .args(["completion", "tcsh"])
        .output()?;
    ensure!(
        output.status.code() == Some(2),
        "an unknown shell is a usage error"
    );
    Ok(())
}

#[test]
fn man_pages_cover_every_subcommand() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let output = Command::new(binary("kiln"))
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()?;
    ensure!(output.status.success(), "{output:?}");
    for page in [
        "kiln.1",
        "kiln-run.1",
        "kiln-env-history.1",
        "kiln-completion.1",
    ] {
        let text =
            std::fs::read_to_string(dir.path().join(page)).with_context(|| format!("no {page}"))?;
        ensure!(text.contains(".TH "), "{page} is not a man page:\n{text}");
    }
    let listed = String::from_utf8(output.stdout)?;
    ensure!(listed.lines().count() >= 30, "few pages:\n{listed}");
    Ok(())
}

#[test]
fn kiln_output_json_in_the_environment_means_json() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let url = coordinator.url();
    let output = kiln_command(&url, &["whoami"])
        .env("KILN_OUTPUT", "json")
        .output()?;
    ensure!(output.status.success(), "{output:?}");
    let value: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&output.stdout)))?;
    ensure!(value.is_object(), "{value}");
    // Times come as RFC 3339 beside the epoch milliseconds.
    let output = kiln_command(&url, &["token", "list"])
        .env("KILN_OUTPUT", "json")
        .output()?;
    ensure!(output.status.success(), "{output:?}");
    let tokens: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let admin = &tokens[0];
    let created_ms = admin["created_ms"].as_i64().context("no created_ms")?;
    let created_at = admin["created_at"].as_str().context("no created_at")?;
    let parsed = created_at
        .strip_suffix('Z')
        .filter(|text| text.len() >= "2026-01-01T00:00:00".len() && text.as_bytes()[10] == b'T')
        .with_context(|| format!("not RFC 3339 UTC: {created_at}"))?;
    ensure!(!parsed.is_empty() && created_ms > 0, "{admin}");
    ensure!(admin["revoked_at"].is_null(), "{admin}");
    // The flag wins over the environment.
    let output = kiln_command(&url, &["whoami", "--output", "table"])
        .env("KILN_OUTPUT", "json")
        .output()?;
    ensure!(output.status.success(), "{output:?}");
    ensure!(
        serde_json::from_slice::<serde_json::Value>(&output.stdout).is_err(),
        "--output table printed JSON"
    );
    Ok(())
}

/// `kiln ARGS` with only `config` for settings: none of the variables that
/// name a coordinator, token or context.
fn kiln_with_config(config: &std::path::Path, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(binary("kiln"))
        .args(args)
        .env("KILN_CONFIG", config)
        .env_remove("KILN_COORDINATOR")
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_TOKEN_FILE")
        .env_remove("KILN_CA_FILE")
        .env_remove("KILN_CONTEXT")
        .env_remove("KILN_OUTPUT")
        .stdin(Stdio::null())
        .output()?)
}

#[test]
fn contexts_name_coordinators_and_never_lend_a_token_to_another() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let url = coordinator.url();
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("kiln").join("config.toml");
    let token_file = dir.path().join("farm.token");
    std::fs::write(&token_file, &coordinator.admin_token)?;
    let token_path = token_file.display().to_string();

    // Saved from the flags given; the first context becomes the current one.
    let set = kiln_with_config(
        &config,
        &[
            "context",
            "set",
            "farm",
            "--coordinator",
            &url,
            "--token-file",
            &token_path,
        ],
    )?;
    ensure!(set.status.success(), "{set:?}");
    let agents = kiln_with_config(&config, &["agents"])?;
    ensure!(
        agents.status.success(),
        "the current context was not used: {agents:?}"
    );

    // A second context at a port nobody listens on, made current.
    let set = kiln_with_config(
        &config,
        &[
            "context",
            "set",
            "nowhere",
            "--coordinator",
            "http://127.0.0.1:9",
        ],
    )?;
    ensure!(set.status.success(), "{set:?}");
    let used = kiln_with_config(&config, &["context", "use", "nowhere"])?;
    ensure!(used.status.success(), "{used:?}");
    let listed = String::from_utf8(kiln_with_config(&config, &["context", "ls"])?.stdout)?;
    ensure!(
        listed
            .lines()
            .any(|l| l.starts_with('*') && l.contains("nowhere")),
        "{listed}"
    );
    let unreachable = kiln_with_config(&config, &["agents"])?;
    ensure!(unreachable.status.code() == Some(3), "{unreachable:?}");
    // --context picks one for a single command.
    let picked = kiln_with_config(&config, &["--context", "farm", "agents"])?;
    ensure!(picked.status.success(), "{picked:?}");
    // An unknown context is an input error naming the known ones.
    let unknown = kiln_with_config(&config, &["--context", "prod", "agents"])?;
    ensure!(unknown.status.code() == Some(2), "{unknown:?}");
    ensure!(
        String::from_utf8_lossy(&unknown.stderr).contains("it has: farm, nowhere"),
        "{unknown:?}"
    );

    // With the coordinator named on the command line the current context
    // is off: the farm context's token is not sent along.
    let used = kiln_with_config(&config, &["context", "use", "farm"])?;
    ensure!(used.status.success(), "{used:?}");
    let elsewhere = kiln_with_config(&config, &["--coordinator", &url, "agents"])?;
    ensure!(
        elsewhere.status.code() == Some(2),
        "a token went along without a context: {elsewhere:?}"
    );
    // The file keeps what a person wrote in it.
    let mut text = std::fs::read_to_string(&config)?;
    text.insert_str(0, "# my farms\n");
    std::fs::write(&config, text)?;
    let used = kiln_with_config(&config, &["context", "use", "nowhere"])?;
    ensure!(used.status.success(), "{used:?}");
    ensure!(
        std::fs::read_to_string(&config)?.starts_with("# my farms\n"),
        "the comment was lost"
    );
    Ok(())
}
