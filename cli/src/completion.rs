//! `kiln completion SHELL` and `kiln man`: both generated from the clap
//! definition in [`crate::args`], so they can never disagree with what the
//! CLI accepts.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::args::Cli;
use crate::error::{CliError, Outcome};

/// Prints the completion script for `shell` on stdout.
pub(crate) fn completion(shell: Shell) -> Result<Outcome, CliError> {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "kiln", &mut script);
    std::io::stdout()
        .lock()
        .write_all(&script)
        .map_err(CliError::Output)?;
    Ok(Outcome::Ok)
}

/// Writes `kiln.1` and one page per subcommand (`kiln-run.1`,
/// `kiln-env-history.1`, ...) into `dir`, and lists them on stdout.
pub(crate) fn man_pages(dir: &Path) -> Result<Outcome, CliError> {
    let cannot = |error: std::io::Error| {
        CliError::Input(format!(
            "cannot write man pages to {}: {error}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(cannot)?;
    clap_mangen::generate_to(Cli::command(), dir).map_err(cannot)?;
    let mut pages: Vec<String> = std::fs::read_dir(dir)
        .map_err(cannot)?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("kiln") && name.ends_with(".1"))
        .collect();
    pages.sort();
    let mut out = std::io::stdout().lock();
    for page in pages {
        writeln!(out, "{}", dir.join(page).display()).map_err(CliError::Output)?;
    }
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "kiln", &mut script);
            let script = String::from_utf8(script).unwrap();
            for word in ["pipeline", "rollback", "completion"] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
        }
    }
}
