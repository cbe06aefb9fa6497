//! Readers for single values: each checks one node's type and content and
//! says, pointing at that node, what it should have been.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::Duration;

use saphyr::Scalar;

use super::schema::{Named, Path, place_or_top_level};
use super::yaml::Node;
use super::{MAX_COMMAND_BYTES, MAX_COMMANDS, MAX_NAME_LEN, Problem, RetryWhen};
use crate::duration;

const MAX_RETRIES: u32 = 10;
const DURATION_HINT: &str = "use a number with a unit: 500ms, 30s, 15m, 2h";

/// `pipeline:`: a name under the rules of [`is_name`].
pub(super) fn name(value: Node<'_>, path: &Path<'_>) -> Result<String, Problem> {
    let Some(text) = value.text() else {
        return Err(wrong_type(value, path, "a name like `my-pipeline`"));
    };
    check_name(value, text, "pipeline name")
}

/// A name of `what` (e.g. "model name") that follows the pipeline-name
/// rules.
pub(super) fn name_of(value: Node<'_>, path: &Path<'_>, what: &str) -> Result<String, Problem> {
    let Some(text) = value.text() else {
        return Err(wrong_type(value, path, "a name like `churn`"));
    };
    check_name(value, text, what)
}

/// A key of `stages:`; the error points at the key.
pub(super) fn stage_name(key: Node<'_>) -> Result<String, Problem> {
    let Some(text) = key.text() else {
        return Err(Problem::new(
            key.position(),
            format!(
                "stage names must be names like `build`; found {}",
                key.describe()
            ),
        ));
    };
    check_name(key, text, "stage name")
}

/// A key of a mapping with fixed keys; only scalars can be keys there.
pub(super) fn key<'a>(key: Node<'a>, place: &str) -> Result<&'a str, Problem> {
    key.text().ok_or_else(|| {
        let place = place_or_top_level(place);
        Problem::new(
            key.position(),
            format!("keys{place} must be plain words; found {}", key.describe()),
        )
    })
}

/// `needs: [a, b]`: stage names, resolved later.
pub(super) fn needs(value: Node<'_>, path: &Path<'_>) -> Result<Vec<Named>, Problem> {
    const EXPECTED: &str = "a list of stage names, like `needs: [build]`";
    let items = value
        .items()
        .ok_or_else(|| wrong_type(value, path, EXPECTED))?;
    items
        .into_iter()
        .map(|item| match item.text() {
            Some(name) => Ok(Named {
                name: name.to_owned(),
                position: item.position(),
            }),
            None => Err(wrong_type(item, path, EXPECTED)),
        })
        .collect()
}

/// `commands:` a list of strings, or one string for a single command.
pub(super) fn commands(value: Node<'_>, path: &Path<'_>) -> Result<Vec<String>, Problem> {
    const EXPECTED: &str = "a list of strings or a single string";
    let items = match (value.items(), value.string()) {
        (Some(items), _) => items,
        (None, Some(_)) => vec![value],
        (None, None) => return Err(wrong_type(value, path, EXPECTED)),
    };
    if items.is_empty() {
        return Err(Problem::new(
            value.position(),
            format!("{path} is empty; list at least one command, like `commands: [make test]`"),
        ));
    }
    if let Some(extra) = items.get(MAX_COMMANDS) {
        return Err(Problem::new(
            extra.position(),
            format!(
                "{path} has {} commands, more than the limit of {MAX_COMMANDS}; move them into a \
                 script in the repository and run that",
                items.len()
            ),
        ));
    }
    items
        .into_iter()
        .map(|item| match item.string() {
            Some(command) if command.len() > MAX_COMMAND_BYTES => Err(Problem::new(
                item.position(),
                format!(
                    "a command in {path} is {} bytes, more than the limit of {MAX_COMMAND_BYTES} \
                     bytes (64 KiB); move it into a script in the repository and run that",
                    command.len()
                ),
            )),
            Some(command) if !command.trim().is_empty() => Ok(command.to_owned()),
            Some(_) => Err(empty_command(item, path)),
            None if item.is_null() => Err(empty_command(item, path)),
            // `- echo a: b` is a mapping to YAML, a classic surprise in commands.
            None if item.entries().is_some() => Err(wrong_type(
                item,
                path,
                "strings (quote a command that contains `: `)",
            )),
            None => Err(wrong_type(
                item,
                path,
                "strings (quote a command that YAML reads as a number or boolean)",
            )),
        })
        .collect()
}

fn empty_command(item: Node<'_>, path: &Path<'_>) -> Problem {
    Problem::new(
        item.position(),
        format!("empty command in {path}; remove it or write the command"),
    )
}

/// `env: {KEY: VALUE}`; scalar values of any type, kept as written.
pub(super) fn env(value: Node<'_>, path: &Path<'_>) -> Result<BTreeMap<String, String>, Problem> {
    let entries = mapping(value, path, "a mapping of variable names to values")?;
    if let Some((key, position)) = value.duplicate_key() {
        return Err(Problem::new(
            position,
            format!("`{key}` is set twice in {path}; remove one"),
        ));
    }
    let mut env = BTreeMap::new();
    for (key, variable_value) in entries {
        let name = self::key(key, &format!(" in {path}"))?;
        if !is_env_name(name) {
            return Err(Problem::new(
                key.position(),
                format!(
                    "bad variable name `{name}` in {path}; use letters, digits and `_`, not \
                     starting with a digit"
                ),
            ));
        }
        if variable_value.is_null() {
            return Err(Problem::new(
                variable_value.position(),
                format!("`{name}` in {path} has no value; write `{name}: \"\"` for an empty one"),
            ));
        }
        let Some(text) = variable_value.text() else {
            return Err(Problem::new(
                variable_value.position(),
                format!(
                    "`{name}` in {path} must be a string, number or boolean; found {}",
                    variable_value.describe()
                ),
            ));
        };
        env.insert(name.to_owned(), text.to_owned());
    }
    Ok(env)
}

/// `labels: {k: v}` under `agent:`; values kept as written, like env.
pub(super) fn labels(
    value: Node<'_>,
    path: &Path<'_>,
) -> Result<BTreeMap<String, String>, Problem> {
    let entries = mapping(value, path, "a mapping of label names to values")?;
    if let Some((key, position)) = value.duplicate_key() {
        return Err(Problem::new(
            position,
            format!("label `{key}` appears twice in {path}; remove one"),
        ));
    }
    let mut labels = BTreeMap::new();
    for (key, label_value) in entries {
        let (Some(key_text), Some(value_text)) = (key.text(), label_value.text()) else {
            let node = if key.text().is_none() {
                key
            } else {
                label_value
            };
            return Err(wrong_type(
                node,
                path,
                "a mapping of label names to strings",
            ));
        };
        // Agents declare their labels under the same rule (`--labels`), so a
        // label that breaks it could never match any agent.
        if !crate::labels::is_key(key_text) {
            return Err(Problem::new(
                key.position(),
                format!(
                    "bad label name `{key_text}` in {path}; use {}",
                    crate::labels::KEY_RULE
                ),
            ));
        }
        if !crate::labels::is_value(value_text) {
            return Err(Problem::new(
                label_value.position(),
                format!(
                    "bad label value `{value_text}` in {path}; use {}",
                    crate::labels::VALUE_RULE
                ),
            ));
        }
        labels.insert(key_text.to_owned(), value_text.to_owned());
    }
    Ok(labels)
}

/// `timeout:` a duration longer than zero.
pub(super) fn timeout(value: Node<'_>, path: &Path<'_>) -> Result<Duration, Problem> {
    let Some(text) = value.text() else {
        return Err(wrong_type(
            value,
            path,
            &format!("a duration; {DURATION_HINT}"),
        ));
    };
    match duration::parse(text).ok() {
        Some(timeout) if timeout.is_zero() => Err(Problem::new(
            value.position(),
            format!("{path} must be longer than zero; {DURATION_HINT}"),
        )),
        Some(timeout) => Ok(timeout),
        None => Err(Problem::new(
            value.position(),
            format!("bad duration `{text}` for {path}; {DURATION_HINT}"),
        )),
    }
}

/// `retries:` a whole number up to [`MAX_RETRIES`], or `{max: N, when:
/// [causes]}`.
pub(super) fn retries(
    value: Node<'_>,
    path: &Path<'_>,
) -> Result<(u32, Option<RetryWhen>), Problem> {
    let Some(entries) = value.entries() else {
        return retry_count(value, path).map(|max| (max, None));
    };
    let mut max = None;
    let mut when = None;
    let place = format!(" in `{}`{}", path.key, path.place);
    for (key, item) in entries {
        match key.text() {
            Some("max") => {
                let path = Path {
                    key: "max",
                    place: &place,
                };
                max = Some(retry_count(item, &path)?);
            }
            Some("when") => {
                let path = Path {
                    key: "when",
                    place: &place,
                };
                when = Some(retry_causes(item, &path)?);
            }
            _ => {
                return Err(Problem::new(
                    key.position(),
                    format!(
                        "unknown key {} in {path}; expected one of: max, when",
                        key.describe()
                    ),
                ));
            }
        }
    }
    let max = max.ok_or_else(|| {
        Problem::new(
            value.position(),
            format!("{path} needs `max:`, like `retries: {{max: 2, when: [agent_lost, timeout]}}`"),
        )
    })?;
    Ok((max, when))
}

/// `retries.when: [..]`: the causes that earn a new attempt.
fn retry_causes(value: Node<'_>, path: &Path<'_>) -> Result<RetryWhen, Problem> {
    const CAUSES: &str = "agent_lost, infra_error, timeout, failed";
    let items = value
        .items()
        .ok_or_else(|| wrong_type(value, path, &format!("a list of causes from: {CAUSES}")))?;
    let mut when = RetryWhen {
        agent_lost: false,
        infra_error: false,
        timeout: false,
        failed: false,
    };
    for item in items {
        let flag = match item.text() {
            Some("agent_lost") => &mut when.agent_lost,
            Some("infra_error") => &mut when.infra_error,
            Some("timeout") => &mut when.timeout,
            Some("failed") => &mut when.failed,
            _ => {
                return Err(Problem::new(
                    item.position(),
                    format!(
                        "{path} lists causes from: {CAUSES}; found {}",
                        item.describe()
                    ),
                ));
            }
        };
        *flag = true;
    }
    Ok(when)
}

/// `allow_failure:` true or false.
pub(super) fn flag(value: Node<'_>, path: &Path<'_>) -> Result<bool, Problem> {
    match value.scalar() {
        Some(Scalar::Boolean(flag)) => Ok(flag),
        _ => Err(wrong_type(value, path, "true or false")),
    }
}

/// A whole number of retries up to [`MAX_RETRIES`].
fn retry_count(value: Node<'_>, path: &Path<'_>) -> Result<u32, Problem> {
    match value.scalar() {
        Some(Scalar::Integer(n)) => u32::try_from(n).ok().filter(|n| *n <= MAX_RETRIES),
        _ => None,
    }
    .ok_or_else(|| {
        wrong_type(
            value,
            path,
            &format!("a whole number from 0 to {MAX_RETRIES}"),
        )
    })
}

/// `image:` a container image reference; only its presence is checked, the
/// registry is the judge of the rest.
pub(super) fn image(value: Node<'_>, path: &Path<'_>) -> Result<String, Problem> {
    match value.string() {
        Some(image) if !image.trim().is_empty() => Ok(image.to_owned()),
        _ => Err(wrong_type(
            value,
            path,
            "a container image such as `python:3.12`",
        )),
    }
}

/// The entries of a mapping, or an error saying `what` must be `must_be`.
pub(super) fn mapping<'a>(
    value: Node<'a>,
    what: &dyn Display,
    must_be: &str,
) -> Result<Vec<(Node<'a>, Node<'a>)>, Problem> {
    value
        .entries()
        .ok_or_else(|| wrong_type(value, what, must_be))
}

/// "`x` in stage `y` must be A; found B", pointing at the value.
fn wrong_type(value: Node<'_>, what: &dyn Display, must_be: &str) -> Problem {
    Problem::new(
        value.position(),
        format!("{what} must be {must_be}; found {}", value.describe()),
    )
}

fn check_name(node: Node<'_>, text: &str, what: &str) -> Result<String, Problem> {
    if is_name(text) {
        return Ok(text.to_owned());
    }
    Err(Problem::new(
        node.position(),
        format!(
            "bad {what} `{text}`; use lowercase letters, digits, `.`, `_` and `-`, starting with \
             a letter or digit, at most {MAX_NAME_LEN} characters"
        ),
    ))
}

/// Pipeline and stage names: `[a-z0-9][a-z0-9._-]*`, short enough for
/// container names and log paths.
fn is_name(text: &str) -> bool {
    let mut chars = text.chars();
    text.len() <= MAX_NAME_LEN
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

/// `[A-Za-z_][A-Za-z0-9_]*`, what every shell accepts as a variable name.
pub(super) fn is_env_name(text: &str) -> bool {
    let mut chars = text.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What [`super::is_secret_name`] accepts, for messages.
const SECRET_NAME_RULE: &str = "upper-case letters, digits and `_`, not starting with a digit, at \
                                most 64 characters, like `HF_TOKEN`";

/// `secrets: [NAME, ...]`: names of kiln secrets, each listed once.
pub(super) fn secrets(value: Node<'_>, path: &Path<'_>) -> Result<Vec<String>, Problem> {
    const EXPECTED: &str = "a list of secret names, like `secrets: [HF_TOKEN]`";
    let items = value
        .items()
        .ok_or_else(|| wrong_type(value, path, EXPECTED))?;
    let mut names: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let name = secret_name(item, path)?;
        if names.contains(&name) {
            return Err(Problem::new(
                item.position(),
                format!("secret `{name}` is listed twice in {path}; list it once"),
            ));
        }
        names.push(name);
    }
    Ok(names)
}

/// One secret's name, under the rule of [`super::is_secret_name`].
pub(super) fn secret_name(value: Node<'_>, path: &Path<'_>) -> Result<String, Problem> {
    let Some(text) = value.string() else {
        return Err(wrong_type(value, path, "secret names, like `HF_TOKEN`"));
    };
    if !super::is_secret_name(text) {
        return Err(Problem::new(
            value.position(),
            format!("bad secret name `{text}` in {path}; use {SECRET_NAME_RULE}"),
        ));
    }
    Ok(text.to_owned())
}

/// `artifacts:` paths: workspace-relative, no `..`, each listed once.
pub(super) fn artifact_paths(value: Node<'_>, path: &Path<'_>) -> Result<Vec<String>, Problem> {
    let expected = "a list of workspace paths, like `[build/model, build/metrics.json]`";
    let Some(items) = value.items() else {
        return Err(wrong_type(value, path, expected));
    };
    let mut paths: Vec<String> = Vec::new();
    for item in items {
        let Some(text) = item.string() else {
            return Err(wrong_type(item, path, expected));
        };
        crate::archive::check_artifact_path(text).map_err(|why| {
            Problem::new(item.position(), format!("artifact path `{text}` {why}"))
        })?;
        if paths.iter().any(|seen| seen == text) {
            return Err(Problem::new(
                item.position(),
                format!("artifact path `{text}` is listed twice in {path}; list it once"),
            ));
        }
        paths.push(text.to_owned());
    }
    Ok(paths)
}

/// `when: always | on_success`, as whether to upload after a failure too.
pub(super) fn artifacts_when(value: Node<'_>, path: &Path<'_>) -> Result<bool, Problem> {
    match value.string() {
        Some("always") => Ok(true),
        Some("on_success") => Ok(false),
        _ => Err(Problem::new(
            value.position(),
            format!(
                "{path} must be `always` or `on_success`; found {}",
                value.describe()
            ),
        )),
    }
}
