//! Named contexts, kubectl-style: `~/.config/kiln/config.toml` (or
//! `$KILN_CONFIG`, or `$XDG_CONFIG_HOME/kiln/config.toml`) holds the
//! coordinators a user talks to, and which one is current:
//!
//! ```toml
//! current-context = "prod"
//!
//! [contexts.prod]
//! coordinator = "https://kiln.example:7700"
//! token-file = "/home/me/.config/kiln/prod.token"
//! ca-file = "/etc/kiln/ca.pem"
//! ```
//!
//! A context fills in only what the command line and the environment left
//! unset: `--ca-file`/`KILN_CA_FILE` and a token (`--token`, `--token-file`
//! or their variables) always win. A coordinator given by `--coordinator`
//! or `KILN_COORDINATOR` turns the current context off altogether, so its
//! token never goes to another coordinator (unless `--context` asks for it).
//! `kiln context set NAME --coordinator URL [--token-file F] [--ca-file F]`
//! saves the connection flags it is given; `kiln context use NAME` picks
//! one; `--context NAME` (`KILN_CONTEXT`) picks one for a single command.
//! Edits keep the file's comments and layout (toml_edit).

use std::path::{Path, PathBuf};

use clap::ArgMatches;
use clap::parser::ValueSource;
use serde::Serialize;
use toml_edit::{DocumentMut, Item, Table, value};

use crate::args::{ContextCommand, GlobalArgs, OutputFormat};
use crate::error::{CliError, Outcome};
use crate::output;

/// What a context says about reaching a coordinator.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Context {
    pub(crate) coordinator: Option<String>,
    pub(crate) token_file: Option<PathBuf>,
    pub(crate) ca_file: Option<PathBuf>,
}

/// The config file, as read (or empty when it does not exist yet).
pub(crate) struct ConfigFile {
    path: PathBuf,
    doc: DocumentMut,
}

/// Where the config file lives, from the environment; `None` when neither
/// `KILN_CONFIG`, `XDG_CONFIG_HOME` nor `HOME` says.
pub(crate) fn config_path() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(path) = var("KILN_CONFIG") {
        return Some(PathBuf::from(path));
    }
    let config_home = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| Path::new(&home).join(".config")))?;
    Some(config_home.join("kiln").join("config.toml"))
}

impl ConfigFile {
    /// Reads `path`; a missing file is an empty config.
    pub(crate) fn load(path: &Path) -> Result<Self, CliError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => {
                return Err(CliError::Input(format!(
                    "cannot read {}: {error}",
                    path.display()
                )));
            }
        };
        let doc = text.parse::<DocumentMut>().map_err(|error| {
            CliError::Input(format!(
                "{} is not valid TOML: {}",
                path.display(),
                error.to_string().trim()
            ))
        })?;
        Ok(Self {
            path: path.to_owned(),
            doc,
        })
    }

    fn current(&self) -> Option<&str> {
        self.doc.get("current-context")?.as_str()
    }

    fn contexts(&self) -> Option<&Table> {
        self.doc.get("contexts")?.as_table()
    }

    /// Context names, sorted.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .contexts()
            .map(|table| table.iter().map(|(name, _)| name.to_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The context `name`, or an error naming the file and the contexts it
    /// has.
    pub(crate) fn context(&self, name: &str) -> Result<Context, CliError> {
        let Some(table) = self
            .contexts()
            .and_then(|contexts| contexts.get(name))
            .and_then(Item::as_table)
        else {
            let known = self.names();
            return Err(CliError::Input(format!(
                "no context `{name}` in {}; {}",
                self.path.display(),
                if known.is_empty() {
                    "create one with `kiln context set NAME --coordinator URL`".to_owned()
                } else {
                    format!("it has: {}", known.join(", "))
                }
            )));
        };
        let text = |key: &str| -> Result<Option<String>, CliError> {
            match table.get(key) {
                None => Ok(None),
                Some(item) => item.as_str().map(|s| Some(s.to_owned())).ok_or_else(|| {
                    CliError::Input(format!(
                        "{}: `{key}` of context `{name}` must be a string",
                        self.path.display()
                    ))
                }),
            }
        };
        for (key, _) in table.iter() {
            if !["coordinator", "token-file", "ca-file"].contains(&key) {
                return Err(CliError::Input(format!(
                    "{}: unknown key `{key}` in context `{name}`; expected coordinator, token-file or ca-file",
                    self.path.display()
                )));
            }
        }
        Ok(Context {
            coordinator: text("coordinator")?,
            token_file: text("token-file")?.map(PathBuf::from),
            ca_file: text("ca-file")?.map(PathBuf::from),
        })
    }

    fn set_context(&mut self, name: &str, context: &Context) {
        let contexts = self.doc.entry("contexts").or_insert_with(|| {
            let mut table = Table::new();
            table.set_implicit(true);
            Item::Table(table)
        });
        let Some(contexts) = contexts.as_table_mut() else {
            return;
        };
        let entry = contexts
            .entry(name)
            .or_insert_with(|| Item::Table(Table::new()));
        let Some(table) = entry.as_table_mut() else {
            return;
        };
        let mut put = |key: &str, text: Option<String>| {
            if let Some(text) = text {
                set_string(&mut table[key], &text);
            }
        };
        put("coordinator", context.coordinator.clone());
        put(
            "token-file",
            context
                .token_file
                .as_ref()
                .map(|path| path.display().to_string()),
        );
        put(
            "ca-file",
            context
                .ca_file
                .as_ref()
                .map(|path| path.display().to_string()),
        );
    }

    fn save(&self) -> Result<(), CliError> {
        let fail = |error: std::io::Error| {
            CliError::Input(format!("cannot write {}: {error}", self.path.display()))
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let temp = self.path.with_extension("toml.tmp");
        std::fs::write(&temp, self.doc.to_string()).map_err(fail)?;
        std::fs::rename(&temp, &self.path).map_err(fail)
    }
}

/// Puts `text` in `item`, keeping the comments and spacing around the
/// value it replaces (those around its key stay with the key).
fn set_string(item: &mut Item, text: &str) {
    let decor = item.as_value().map(|old| old.decor().clone());
    *item = value(text);
    if let (Some(decor), Some(new)) = (decor, item.as_value_mut()) {
        *new.decor_mut() = decor;
    }
}

fn config_file() -> Result<ConfigFile, CliError> {
    let path = config_path().ok_or_else(|| {
        CliError::Input("no config file location: set KILN_CONFIG or HOME".to_owned())
    })?;
    ConfigFile::load(&path)
}

/// Whether `id` was given on the command line or in the environment (not
/// left at its default).
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Fills in from the selected context what the command line and the
/// environment did not set. No config file and no `--context`: nothing
/// changes.
pub(crate) fn apply(global: &mut GlobalArgs, matches: &ArgMatches) -> Result<(), CliError> {
    let Some(path) = config_path() else {
        return Ok(());
    };
    let named = global.context.is_some();
    if !named && (given(matches, "coordinator") || !path.exists()) {
        return Ok(());
    }
    let file = ConfigFile::load(&path)?;
    let Some(name) = global
        .context
        .clone()
        .or_else(|| file.current().map(str::to_owned))
    else {
        return Ok(());
    };
    let context = file.context(&name)?;
    if !given(matches, "coordinator")
        && let Some(url) = context.coordinator
    {
        global.coordinator = url;
    }
    if global.ca_file.is_none() {
        global.ca_file = context.ca_file;
    }
    if global.token.is_none() && global.token_file.is_none() {
        global.token_file = context.token_file;
    }
    Ok(())
}

#[derive(Serialize)]
struct ContextRow {
    name: String,
    current: bool,
    #[serde(flatten)]
    context: Context,
}

/// `kiln context ls|use|set`.
pub(crate) fn run(
    command: &ContextCommand,
    global: &GlobalArgs,
    matches: &ArgMatches,
) -> Result<Outcome, CliError> {
    let mut file = config_file()?;
    match command {
        ContextCommand::Ls => {
            let current = file.current().map(str::to_owned);
            let mut rows = Vec::new();
            for name in file.names() {
                rows.push(ContextRow {
                    current: current.as_deref() == Some(name.as_str()),
                    context: file.context(&name)?,
                    name,
                });
            }
            match global.output {
                OutputFormat::Json => output::json(&rows)?,
                OutputFormat::Table => {
                    let cells: Vec<[String; 3]> = rows
                        .into_iter()
                        .map(|row| {
                            [
                                if row.current { "*" } else { "" }.to_owned(),
                                row.name,
                                row.context.coordinator.unwrap_or_else(|| "-".to_owned()),
                            ]
                        })
                        .collect();
                    let text = output::table(["CURRENT", "NAME", "COORDINATOR"], &cells);
                    output::line(text.trim_end())?;
                }
            }
        }
        ContextCommand::Use { name } => {
            file.context(name)?;
            set_string(&mut file.doc["current-context"], name);
            file.save()?;
            output::line(format!("now using context `{name}`"))?;
        }
        ContextCommand::Set { name } => {
            let context = Context {
                coordinator: given(matches, "coordinator").then(|| global.coordinator.clone()),
                token_file: global.token_file.clone(),
                ca_file: global.ca_file.clone(),
            };
            if context == Context::default() {
                return Err(CliError::Input(
                    "nothing to save: give --coordinator, --token-file and/or --ca-file".to_owned(),
                ));
            }
            file.set_context(name, &context);
            if file.current().is_none() {
                set_string(&mut file.doc["current-context"], name);
            }
            file.save()?;
            output::line(format!("saved context `{name}` in {}", file.path.display()))?;
        }
    }
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> ConfigFile {
        ConfigFile {
            path: PathBuf::from("config.toml"),
            doc: text.parse().unwrap(),
        }
    }

    #[test]
    fn contexts_read_back_and_unknown_keys_are_refused() {
        let config = file(
            "current-context = \"prod\"\n[contexts.prod]\ncoordinator = \"https://k:7700\"\nca-file = \"/ca.pem\"\n",
        );
        assert_eq!(config.current(), Some("prod"));
        let prod = config.context("prod").unwrap();
        assert_eq!(prod.coordinator.as_deref(), Some("https://k:7700"));
        assert_eq!(prod.ca_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!(prod.token_file, None);
        let missing = config.context("dev").unwrap_err().to_string();
        assert!(missing.contains("it has: prod"), "{missing}");
        let typo = file("[contexts.x]\ncoordinater = \"u\"\n");
        let error = typo.context("x").unwrap_err().to_string();
        assert!(error.contains("unknown key `coordinater`"), "{error}");
    }

    #[test]
    fn setting_a_context_keeps_comments() {
        let mut config = file(
            "# mine\ncurrent-context = \"a\"\n\n[contexts.a]\ncoordinator = \"http://a:1\" # first\n",
        );
        config.set_context(
            "b",
            &Context {
                coordinator: Some("http://b:2".into()),
                ..Context::default()
            },
        );
        let text = config.doc.to_string();
        assert!(
            text.contains("# mine") && text.contains("# first"),
            "{text}"
        );
        assert_eq!(
            config.context("b").unwrap().coordinator.as_deref(),
            Some("http://b:2")
        );
    }
}
