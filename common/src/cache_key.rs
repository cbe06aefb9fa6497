//! The key of a stage's `cache:`: literal text with `{{ hash('FILE', ...) }}`
//! parts, e.g. `pip-{{ hash('requirements.txt') }}`. The spec parser checks
//! a template ([`CacheKey::parse`]); the agent renders it in the stage's
//! directory ([`CacheKey::render`]), where a hash part becomes the first 16
//! hex digits of a sha256 over the named files' paths and contents, so the
//! key changes exactly when one of them does.

use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::archive::check_artifact_path;

/// Longest template, and longest rendered key.
pub const MAX_KEY_LEN: usize = 128;
/// Hex digits a `hash(...)` part renders to.
const HASH_DIGITS: usize = 16;

/// A checked key template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheKey {
    text: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// Workspace-relative files, in the order written.
    Hash(Vec<String>),
}

impl CacheKey {
    /// Checks `text`; the error says what is wrong, for a spec error.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() || text.len() > MAX_KEY_LEN {
            return Err(format!(
                "a cache key must be 1 to {MAX_KEY_LEN} characters long"
            ));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let Some(open) = rest.find("{{") else {
                parts.push(Part::Literal(literal(rest)?));
                break;
            };
            if open > 0 {
                parts.push(Part::Literal(literal(&rest[..open])?));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or("`{{` without a closing `}}` in the cache key")?;
            parts.push(Part::Hash(hash_call(after[..close].trim())?));
            rest = &after[close + 2..];
        }
        Ok(CacheKey {
            text: text.to_owned(),
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The key for the files under `dir` (the stage's directory); an error
    /// names a file that cannot be read.
    pub fn render(&self, dir: &Path) -> Result<String, String> {
        let mut key = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => key.push_str(text),
                Part::Hash(files) => {
                    let mut hasher = Sha256::new();
                    for file in files {
                        let bytes = std::fs::read(dir.join(file)).map_err(|err| {
                            format!("cannot read `{file}` for the cache key: {err}")
                        })?;
                        hasher.update(file.as_bytes());
                        hasher.update([0]);
                        hasher.update((bytes.len() as u64).to_be_bytes());
                        hasher.update(&bytes);
                    }
                    key.push_str(&hex::encode(hasher.finalize())[..HASH_DIGITS]);
                }
            }
        }
        Ok(key)
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Literal text of a key: what is safe in a file name on any agent.
fn literal(text: &str) -> Result<String, String> {
    match text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        None => Ok(text.to_owned()),
        Some(c) => Err(format!(
            "`{c}` in the cache key; use letters, digits, `.`, `_`, `-` and \
             `{{{{ hash('FILE') }}}}` parts"
        )),
    }
}

/// `hash('a', "b")` → the file names.
fn hash_call(expression: &str) -> Result<Vec<String>, String> {
    const USAGE: &str = "the only expression a cache key knows is `hash('FILE', ...)`, \
                         like `pip-{{ hash('requirements.txt') }}`";
    let args = expression
        .strip_prefix("hash(")
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or_else(|| format!("`{{{{ {expression} }}}}`: {USAGE}"))?;
    let mut files = Vec::new();
    for arg in args.split(',') {
        let arg = arg.trim();
        let quoted = arg.len() >= 2
            && ((arg.starts_with('\'') && arg.ends_with('\''))
                || (arg.starts_with('"') && arg.ends_with('"')));
        if !quoted {
            return Err(format!(
                "`{arg}` in `hash(...)` must be a quoted file name; {USAGE}"
            ));
        }
        let file = &arg[1..arg.len() - 1];
        check_artifact_path(file).map_err(|why| format!("`{file}` in `hash(...)`: {why}"))?;
        files.push(file.to_owned());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_renders_its_literals_and_the_hash_of_its_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("requirements.txt"), "numpy\n").unwrap();
        let key = CacheKey::parse("pip-{{ hash('requirements.txt') }}-v1").unwrap();
        let first = key.render(dir.path()).unwrap();
        assert!(
            first.starts_with("pip-") && first.ends_with("-v1"),
            "{first}"
        );
        assert_eq!(first.len(), "pip--v1".len() + HASH_DIGITS);
        assert_eq!(key.render(dir.path()).unwrap(), first, "stable");
        std::fs::write(dir.path().join("requirements.txt"), "numpy\npandas\n").unwrap();
        assert_ne!(key.render(dir.path()).unwrap(), first, "follows the file");
        let missing = CacheKey::parse("x-{{hash(\"nope.txt\")}}").unwrap();
        assert!(
            missing
                .render(dir.path())
                .unwrap_err()
                .contains("`nope.txt`")
        );
        assert_eq!(
            CacheKey::parse("plain")
                .unwrap()
                .render(dir.path())
                .unwrap(),
            "plain"
        );
    }

    #[test]
    fn bad_keys_say_what_is_wrong() {
        for (text, wanted) in [
            ("", "1 to 128 characters"),
            ("a b", "` ` in the cache key"),
            ("x-{{ hash('a') ", "without a closing"),
            ("x-{{ env.HOME }}", "the only expression"),
            ("x-{{ hash(a) }}", "must be a quoted file name"),
            ("x-{{ hash('../a') }}", "`../a` in `hash(...)`"),
        ] {
            let error = CacheKey::parse(text).unwrap_err();
            assert!(error.contains(wanted), "{text}: {error}");
        }
    }
}
