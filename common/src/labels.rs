//! Agent labels: `role=deploy,os=linux` on the command line, a map on the
//! wire, and the rule that decides whether a stage may run on an agent.
//!
//! One naming rule serves both sides, the agent's `--labels` and a stage's
//! `agent: { labels: .. }`, so that any label a stage can ask for is one an
//! agent can declare, and the other way round.

use std::collections::BTreeMap;

/// Longest label name or value, the same as pipeline and stage names.
pub const MAX_LABEL_LEN: usize = 64;

/// What [`is_key`] accepts, for messages.
pub const KEY_RULE: &str = "lowercase letters, digits, `.`, `_` and `-`, starting with a letter \
                            or digit, at most 64 characters";
/// What [`is_value`] accepts, for messages.
pub const VALUE_RULE: &str = "letters, digits, `.`, `_` and `-`, starting with a letter or \
                              digit, at most 64 characters";

/// A label name: `[a-z0-9][a-z0-9._-]*`, at most [`MAX_LABEL_LEN`] bytes.
pub fn is_key(text: &str) -> bool {
    is_word(text, |c| c.is_ascii_lowercase())
}

/// A label value: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most [`MAX_LABEL_LEN`]
/// bytes. Upper case is allowed here (`gpu=A100`), not in names.
pub fn is_value(text: &str) -> bool {
    is_word(text, |c| c.is_ascii_alphabetic())
}

/// `[L0-9][L0-9._-]*` up to [`MAX_LABEL_LEN`], where `letter` decides L.
fn is_word(text: &str, letter: impl Fn(char) -> bool) -> bool {
    let mut chars = text.chars();
    text.len() <= MAX_LABEL_LEN
        && chars
            .next()
            .is_some_and(|c| letter(c) || c.is_ascii_digit())
        && chars.all(|c| letter(c) || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

/// Parses `k=v,k=v` (empty string = no labels); names and values must pass
/// [`is_key`] and [`is_value`].
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!(
                "label `{pair}` has no `=`; write labels as key=value,key=value"
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if !is_key(key) {
            return Err(format!(
                "bad label name `{key}` in `{pair}`; use {KEY_RULE}"
            ));
        }
        if !is_value(value) {
            return Err(format!(
                "bad label value `{value}` in `{pair}`; use {VALUE_RULE}"
            ));
        }
        if labels.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(format!("label `{key}` is given twice; give it once"));
        }
    }
    Ok(labels)
}

/// True when every label the stage asks for is on the agent with that value.
pub fn satisfies<'a>(
    agent: &BTreeMap<String, String>,
    wanted: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> bool {
    wanted
        .into_iter()
        .all(|(key, value)| agent.get(key) == Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_rejects_missing_equals() {
        let labels = parse("role=deploy, os=linux").unwrap();
        assert_eq!(labels["role"], "deploy");
        assert_eq!(labels["os"], "linux");
        assert!(parse("").unwrap().is_empty());
        assert!(parse("role").unwrap_err().contains("role"));
    }

    #[test]
    fn names_and_values_follow_one_rule() {
        assert!(parse("gpu=A100,cuda.version=12.4,zone_a=eu-1").is_ok());
        for bad in [
            "Role=deploy",
            "=deploy",
            "-role=deploy",
            "role=",
            "role=a b",
            "role=-x",
            "role=a=b",
            "rôle=x",
            "role=deploy,role=train",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let long = "a".repeat(MAX_LABEL_LEN);
        assert!(parse(&format!("{long}={long}")).is_ok());
        assert!(parse(&format!("{long}a=x")).is_err());
        assert!(parse(&format!("x={long}a")).is_err());
        assert_eq!(
            parse("Role=x").unwrap_err(),
            format!("bad label name `Role` in `Role=x`; use {KEY_RULE}")
        );
    }

    #[test]
    fn stage_needs_every_label() {
        let agent = parse("role=deploy,os=linux").unwrap();
        assert!(satisfies(&agent, &parse("role=deploy").unwrap()));
        assert!(!satisfies(&agent, &parse("role=train").unwrap()));
        assert!(!satisfies(&agent, &parse("gpu=yes").unwrap()));
    }
}
