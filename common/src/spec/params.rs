//! `params:` — the values a run is started with (`kiln run NAME -p
//! EPOCHS=20`), each declared with a type and usually a default, checked
//! before the run exists and given to every stage as an environment
//! variable of its own name.
//!
//! ```yaml
//! params:
//!   EPOCHS: { type: int, default: 10 }
//!   LR:     { type: float, default: 0.01 }
//!   MODE:   { type: choice, choices: [fast, full], default: fast }
//!   DRY:    { type: bool, default: false }
//!   NOTE:   { type: string }            # no default: every run must give it
//! ```

use std::collections::BTreeMap;

use super::schema::{Field, Path, read_fields};
use super::values;
use super::yaml::Node;
use super::{Position, Problem};

/// Most parameters one pipeline may declare.
pub const MAX_PARAMS: usize = 100;
/// Longest value a parameter may have, in bytes.
pub const MAX_PARAM_BYTES: usize = 4096;

/// One declared parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// An environment variable name (`[A-Za-z_][A-Za-z0-9_]*`).
    pub name: String,
    pub kind: ParamKind,
    /// Checked against `kind` when the file is read, in its canonical
    /// spelling; `None`: each run must give a value.
    pub default: Option<String>,
}

/// What values a parameter takes.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamKind {
    Int,
    Float,
    String,
    Bool,
    /// One of these, spelled exactly.
    Choice(Vec<String>),
}

impl ParamKind {
    fn describe(&self) -> String {
        match self {
            Self::Int => "an int (like `10` or `-3`)".to_owned(),
            Self::Float => "a float (like `0.01` or `3`)".to_owned(),
            Self::String => "a string".to_owned(),
            Self::Bool => "a bool (`true` or `false`)".to_owned(),
            Self::Choice(choices) => format!("one of: {}", choices.join(", ")),
        }
    }
}

impl Param {
    /// `value` in its canonical spelling, or what is wrong with it.
    pub fn check(&self, value: &str) -> Result<String, String> {
        let bad = || {
            format!(
                "parameter `{}` is {}; `{value}` is not",
                self.name,
                self.kind.describe()
            )
        };
        if value.len() > MAX_PARAM_BYTES {
            return Err(format!(
                "parameter `{}` has {} bytes; at most {MAX_PARAM_BYTES} are accepted",
                self.name,
                value.len()
            ));
        }
        match &self.kind {
            ParamKind::Int => value
                .trim()
                .parse::<i64>()
                .map(|n| n.to_string())
                .map_err(|_| bad()),
            ParamKind::Float => match value.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(value.trim().to_owned()),
                _ => Err(bad()),
            },
            ParamKind::Bool => match value.trim() {
                "true" => Ok("true".to_owned()),
                "false" => Ok("false".to_owned()),
                _ => Err(bad()),
            },
            ParamKind::String => Ok(value.to_owned()),
            ParamKind::Choice(choices) => choices
                .iter()
                .find(|choice| *choice == value)
                .cloned()
                .ok_or_else(bad),
        }
    }
}

/// A run's parameter values: every given one checked against its
/// declaration, the rest filled from defaults. Errors name the parameter
/// and say what to pass.
pub fn resolve(
    declared: &[Param],
    given: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    if let Some(unknown) = given
        .keys()
        .find(|name| !declared.iter().any(|param| &param.name == *name))
    {
        let names: Vec<&str> = declared.iter().map(|param| param.name.as_str()).collect();
        return Err(if names.is_empty() {
            format!(
                "the pipeline declares no parameters, so `{unknown}` cannot be set; declare it under `params:`"
            )
        } else {
            format!(
                "the pipeline has no parameter `{unknown}`; it has: {}",
                names.join(", ")
            )
        });
    }
    let mut values = BTreeMap::new();
    for param in declared {
        let value = match (given.get(&param.name), &param.default) {
            (Some(value), _) => param.check(value)?,
            (None, Some(default)) => default.clone(),
            (None, None) => {
                return Err(format!(
                    "parameter `{}` has no default; give it with `-p {}=VALUE` ({})",
                    param.name,
                    param.name,
                    param.kind.describe()
                ));
            }
        };
        values.insert(param.name.clone(), value);
    }
    Ok(values)
}

/// A parameter as it is being read.
#[derive(Default)]
struct ParamDraft {
    kind: Option<(String, Position)>,
    default: Option<(String, Position)>,
    choices: Option<Vec<String>>,
}

#[rustfmt::skip]
const PARAM_FIELDS: &[Field<ParamDraft>] = &[
    ("type", |p, v, path| {
        let kind = v.string().ok_or_else(|| Problem::new(v.position(), format!("{path} must be one of int, float, string, bool, choice")))?;
        p.kind = Some((kind.to_owned(), v.position()));
        Ok(())
    }),
    ("default", |p, v, path| {
        let text = v.text().ok_or_else(|| Problem::new(v.position(), format!("{path} must be a string, number or boolean; found {}", v.describe())))?;
        p.default = Some((text.to_owned(), v.position()));
        Ok(())
    }),
    ("choices", |p, v, path| {
        let items = v.items().ok_or_else(|| Problem::new(v.position(), format!("{path} must be a list of values, like `[fast, full]`")))?;
        let mut choices = Vec::new();
        for item in items {
            let text = item.text().ok_or_else(|| Problem::new(item.position(), format!("each of {path} must be a string, number or boolean; found {}", item.describe())))?;
            choices.push(text.to_owned());
        }
        p.choices = Some(choices);
        Ok(())
    }),
];

/// `params:` at the top level, with where each name is written.
pub(super) fn read(value: Node<'_>, path: &Path<'_>) -> Result<Vec<(Param, Position)>, Problem> {
    let entries = values::mapping(
        value,
        path,
        "a mapping from parameter name to `{type: int, default: 10}`",
    )?;
    if let Some((key, position)) = value.duplicate_key() {
        return Err(Problem::new(
            position,
            format!("parameter `{key}` is declared twice; remove one"),
        ));
    }
    if let Some((extra, _)) = entries.get(MAX_PARAMS) {
        return Err(Problem::new(
            extra.position(),
            format!("more than {MAX_PARAMS} parameters; pass large inputs as files"),
        ));
    }
    let mut params = Vec::new();
    for (key, body) in entries {
        let name = values::key(key, " in `params`")?;
        if !values::is_env_name(name) || name.starts_with("KILN_") || name == "CI" {
            return Err(Problem::new(
                key.position(),
                format!(
                    "bad parameter name `{name}`; stages get it as an environment variable, so use letters, digits and `_`, not starting with a digit, and not `KILN_*` or `CI`"
                ),
            ));
        }
        let mut draft = ParamDraft::default();
        let what = format!("parameter `{name}`");
        let place = format!(" of parameter `{name}`");
        if body.entries().is_none() {
            return Err(Problem::new(
                body.position(),
                format!(
                    "{what} must be a mapping like `{{type: int, default: 10}}`; found {}",
                    body.describe()
                ),
            ));
        }
        read_fields(&mut draft, body, PARAM_FIELDS, &what, &place)?;
        let Some((kind, kind_position)) = draft.kind else {
            return Err(Problem::new(
                body.position(),
                format!(
                    "{what} has no `type`; add `type: int`, `float`, `string`, `bool` or `choice`"
                ),
            ));
        };
        let kind = match (kind.as_str(), draft.choices) {
            ("int", None) => ParamKind::Int,
            ("float", None) => ParamKind::Float,
            ("string", None) => ParamKind::String,
            ("bool", None) => ParamKind::Bool,
            ("choice", Some(choices)) if !choices.is_empty() => ParamKind::Choice(choices),
            ("choice", _) => {
                return Err(Problem::new(
                    kind_position,
                    format!("{what} is a choice without `choices`; add `choices: [a, b]`"),
                ));
            }
            ("int" | "float" | "string" | "bool", Some(_)) => {
                return Err(Problem::new(
                    kind_position,
                    format!(
                        "{what} has `choices` but is a {kind}; use `type: choice` or remove `choices`"
                    ),
                ));
            }
            (other, _) => {
                return Err(Problem::new(
                    kind_position,
                    format!("{what} has type `{other}`; use int, float, string, bool or choice"),
                ));
            }
        };
        let mut param = Param {
            name: name.to_owned(),
            kind,
            default: None,
        };
        if let Some((default, position)) = draft.default {
            let checked = param
                .check(&default)
                .map_err(|error| Problem::new(position, format!("the default of {error}")))?;
            param.default = Some(checked);
        }
        params.push((param, key.position()));
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(kind: ParamKind, default: Option<&str>) -> Param {
        Param {
            name: "X".into(),
            kind,
            default: default.map(str::to_owned),
        }
    }

    #[test]
    fn values_are_checked_against_their_type() {
        assert_eq!(param(ParamKind::Int, None).check(" 20 ").unwrap(), "20");
        assert!(param(ParamKind::Int, None).check("2.5").is_err());
        assert!(param(ParamKind::Float, None).check("nan").is_err());
        assert_eq!(param(ParamKind::Float, None).check("1e-3").unwrap(), "1e-3");
        assert!(param(ParamKind::Bool, None).check("yes").is_err());
        let choice = param(ParamKind::Choice(vec!["a".into(), "b".into()]), None);
        let error = choice.check("c").unwrap_err();
        assert_eq!(error, "parameter `X` is one of: a, b; `c` is not");
    }

    #[test]
    fn runs_get_defaults_and_unknown_or_missing_values_are_refused() {
        let declared = [
            param(ParamKind::Int, Some("10")),
            Param {
                name: "NOTE".into(),
                kind: ParamKind::String,
                default: None,
            },
        ];
        let given = BTreeMap::from([("NOTE".to_owned(), "hi".to_owned())]);
        let values = resolve(&declared, &given).unwrap();
        assert_eq!(values["X"], "10");
        let error = resolve(&declared, &BTreeMap::new()).unwrap_err();
        assert!(error.contains("-p NOTE=VALUE"), "{error}");
        let unknown = BTreeMap::from([("Y".to_owned(), "1".to_owned())]);
        let error = resolve(&declared, &unknown).unwrap_err();
        assert!(
            error.contains("no parameter `Y`; it has: X, NOTE"),
            "{error}"
        );
    }
}
