//! When a stage runs and which runs may overlap: a stage's `if:` and
//! `changes:`, and the pipeline's `concurrency:`.
//!
//! ```yaml
//! concurrency: { group: "deploy-{{ branch }}", cancel_in_progress: true }
//! stages:
//!   train:
//!     if: branch == "main" || tag =~ "v*" || params.FORCE == true
//!     changes: ["data/**", "src/**"]
//! ```
//!
//! `if:` is a small expression language, parsed here once and never
//! evaluated as code: the variables `branch`, `tag`, `event`, `mr`,
//! `pipeline` and `params.NAME` (each the run's text, "" when it does not
//! apply); string literals in double or single quotes, and bare numbers
//! and `true`/`false` as the text they spell; `==`, `!=`, `=~` and `!~`
//! (the right side a quoted glob where `*` matches any run of characters,
//! `/` included); `!`, `&&`, `||` and parentheses. A variable alone is true
//! when it is set, not empty and not `false`. Every comparison is between
//! texts: parameters hold their canonical spelling (`params.DRY == true`).
//!
//! `changes:` lists globs (`data/**`, `*.md`) over the paths the run's
//! commit changed; the stage runs when one matches. What changed is the
//! coordinator's to find; "everything" when it cannot tell.
//!
//! A group name (`concurrency:`) is a template with `{{ VARIABLE }}` slots
//! over the same variables, the syntax of a cache key's template.

use std::collections::BTreeMap;
use std::fmt;

use super::schema::{Field, Path, read_fields, set};
use super::values;
use super::yaml::Node;
use super::{Param, Position, Problem};

/// Longest `if:` expression, in bytes.
const MAX_EXPRESSION_BYTES: usize = 4096;
/// Most `changes:` patterns one stage may list.
const MAX_CHANGE_PATTERNS: usize = 100;
/// Deepest nesting of `!` and parentheses in one expression.
const MAX_DEPTH: usize = 32;

/// A stage's `if:` and `changes:`; it runs only when both hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageCondition {
    /// `if:` parsed, with its text as written for messages.
    pub expression: Option<(Expr, String)>,
    /// `changes:` globs, each checked to compile.
    pub changes: Vec<String>,
    /// Every `params.NAME` used, and where: checked against `params:`.
    param_refs: Vec<(String, Position)>,
}

/// What a run knows when its stages' conditions are decided.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub pipeline: &'a str,
    /// `KILN_*` variables of the run: `KILN_BRANCH`, `KILN_TAG`,
    /// `KILN_EVENT`, `KILN_MR_ID`.
    pub variables: &'a BTreeMap<String, String>,
    pub params: &'a BTreeMap<String, String>,
    /// Paths the run's commit changed; `None`: everything (a first run,
    /// or nothing to compare with).
    pub changed: Option<&'a [String]>,
}

impl Facts<'_> {
    fn value(&self, variable: &Variable) -> &str {
        let of = |name: &str| self.variables.get(name).map_or("", String::as_str);
        match variable {
            Variable::Branch => of("KILN_BRANCH"),
            Variable::Tag => of("KILN_TAG"),
            Variable::Event => of("KILN_EVENT"),
            Variable::MergeRequest => of("KILN_MR_ID"),
            Variable::Pipeline => self.pipeline,
            Variable::Param(name) => self.params.get(name).map_or("", String::as_str),
        }
    }
}

impl StageCondition {
    /// `Ok` when the stage runs; else why it is skipped, with the values
    /// that decided it.
    pub fn decide(&self, facts: &Facts<'_>) -> Result<(), String> {
        if let Some((expr, text)) = &self.expression
            && !expr.eval(facts)
        {
            let mut used = Vec::new();
            expr.variables(&mut used);
            used.dedup();
            let values: Vec<String> = used
                .iter()
                .map(|variable| format!("{variable} = \"{}\"", facts.value(variable)))
                .collect();
            return Err(format!(
                "`if: {text}` is false ({})",
                if values.is_empty() {
                    "no variables".to_owned()
                } else {
                    values.join(", ")
                }
            ));
        }
        if let (false, Some(changed)) = (self.changes.is_empty(), facts.changed) {
            let globs = changes_matcher(&self.changes);
            if !changed.iter().any(|path| globs.is_match(path)) {
                return Err(format!(
                    "no changed path matches `changes: [{}]` ({} path{} changed)",
                    self.changes.join(", "),
                    changed.len(),
                    if changed.len() == 1 { "" } else { "s" }
                ));
            }
        }
        Ok(())
    }
}

/// A parsed `if:` expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Equal(Operand, Operand),
    NotEqual(Operand, Operand),
    /// `=~ "glob"`; the pattern was checked when the file was read.
    Matches(Operand, String),
    NotMatches(Operand, String),
    /// A variable (or literal) alone: set, not empty and not `false`.
    Truthy(Operand),
}

/// One side of a comparison.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    Variable(Variable),
    Literal(String),
}

/// What an expression or a group template may read of a run.
#[derive(Clone, Debug, PartialEq)]
pub enum Variable {
    Branch,
    Tag,
    Event,
    MergeRequest,
    Pipeline,
    Param(String),
}

impl fmt::Display for Variable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Branch => f.write_str("branch"),
            Self::Tag => f.write_str("tag"),
            Self::Event => f.write_str("event"),
            Self::MergeRequest => f.write_str("mr"),
            Self::Pipeline => f.write_str("pipeline"),
            Self::Param(name) => write!(f, "params.{name}"),
        }
    }
}

const VARIABLES: &str = "branch, tag, event, mr, pipeline, params.NAME";

impl Expr {
    pub fn eval(&self, facts: &Facts<'_>) -> bool {
        let text = |operand: &Operand| match operand {
            Operand::Variable(variable) => facts.value(variable).to_owned(),
            Operand::Literal(text) => text.clone(),
        };
        match self {
            Self::Or(a, b) => a.eval(facts) || b.eval(facts),
            Self::And(a, b) => a.eval(facts) && b.eval(facts),
            Self::Not(a) => !a.eval(facts),
            Self::Equal(a, b) => text(a) == text(b),
            Self::NotEqual(a, b) => text(a) != text(b),
            Self::Matches(a, glob) => glob_matches(glob, &text(a)),
            Self::NotMatches(a, glob) => !glob_matches(glob, &text(a)),
            Self::Truthy(a) => {
                let value = text(a);
                !value.is_empty() && value != "false"
            }
        }
    }

    fn variables(&self, into: &mut Vec<Variable>) {
        let mut add = |operand: &Operand| {
            if let Operand::Variable(variable) = operand
                && !into.contains(variable)
            {
                into.push(variable.clone());
            }
        };
        match self {
            Self::Or(a, b) | Self::And(a, b) => {
                a.variables(into);
                b.variables(into);
            }
            Self::Not(a) => a.variables(into),
            Self::Equal(a, b) | Self::NotEqual(a, b) => {
                add(a);
                add(b);
            }
            Self::Matches(a, _) | Self::NotMatches(a, _) | Self::Truthy(a) => add(a),
        }
    }
}

/// `*` any run of characters (`/` included), the branch patterns' rule.
fn glob_matches(pattern: &str, text: &str) -> bool {
    crate::triggers::webhook::branch_matches(pattern, text)
}

/// `changes:` globs as one matcher: `*` stays within a directory, `**`
/// crosses them (gitignore-like, as GitLab and GitHub read them).
fn changes_matcher(patterns: &[String]) -> globset::GlobSet {
    let mut set = globset::GlobSetBuilder::new();
    for pattern in patterns {
        // Checked when the file was read; one that fails here matches nothing.
        if let Ok(glob) = changes_glob(pattern) {
            set.add(glob);
        }
    }
    set.build().unwrap_or_else(|_| globset::GlobSet::empty())
}

fn changes_glob(pattern: &str) -> Result<globset::Glob, globset::Error> {
    globset::GlobBuilder::new(pattern.trim_start_matches("./"))
        .literal_separator(true)
        .build()
}

// ---------------------------------------------------------------- reading

/// The non-blank text of `value`, at most [`MAX_EXPRESSION_BYTES`];
/// otherwise an error saying it must be `expected`.
fn bounded_text<'a>(value: Node<'a>, path: &Path<'_>, expected: &str) -> Result<&'a str, Problem> {
    let Some(text) = value.text().filter(|text| !text.trim().is_empty()) else {
        return Err(Problem::new(
            value.position(),
            format!("{path} must be {expected}; found {}", value.describe()),
        ));
    };
    if text.len() > MAX_EXPRESSION_BYTES {
        return Err(Problem::new(
            value.position(),
            format!("{path} is longer than {MAX_EXPRESSION_BYTES} bytes; shorten it"),
        ));
    }
    Ok(text)
}

/// `if:` of a stage.
pub(super) fn read_if(
    condition: &mut Option<StageCondition>,
    value: Node<'_>,
    path: &Path<'_>,
) -> Result<(), Problem> {
    let text = bounded_text(value, path, "an expression like `branch == \"main\"`")?;
    let mut parser = Parser::new(text);
    let parsed = parser.expression(0).and_then(|expr| match parser.peek() {
        None => Ok(expr),
        Some(token) => Err(parser.error(
            token.at,
            format!(
                "unexpected {}; join conditions with `&&` or `||`",
                token.kind
            ),
        )),
    });
    let (expr, param_refs) = match parsed {
        Ok(expr) => (expr, parser.param_refs),
        Err((offset, message)) => {
            return Err(Problem::new(
                at_offset(value, text, offset),
                format!("{path}: {message}"),
            ));
        }
    };
    let target = condition.get_or_insert_with(StageCondition::default);
    target.expression = Some((expr, text.to_owned()));
    target.param_refs = param_refs
        .into_iter()
        .map(|(name, offset)| (name, at_offset(value, text, offset)))
        .collect();
    Ok(())
}

/// `changes:` of a stage.
pub(super) fn read_changes(
    condition: &mut Option<StageCondition>,
    value: Node<'_>,
    path: &Path<'_>,
) -> Result<(), Problem> {
    let items = value.items().ok_or_else(|| {
        Problem::new(
            value.position(),
            format!(
                "{path} must be a list of path globs like `[\"data/**\", \"src/**\"]`; found {}",
                value.describe()
            ),
        )
    })?;
    if items.is_empty() || items.len() > MAX_CHANGE_PATTERNS {
        return Err(Problem::new(
            value.position(),
            format!("{path} must list between 1 and {MAX_CHANGE_PATTERNS} path globs"),
        ));
    }
    let mut patterns = Vec::new();
    for item in items {
        let Some(pattern) = item.text().filter(|text| !text.trim().is_empty()) else {
            return Err(Problem::new(
                item.position(),
                format!(
                    "{path} entries must be path globs like `data/**`; found {}",
                    item.describe()
                ),
            ));
        };
        if let Err(error) = changes_glob(pattern) {
            return Err(Problem::new(
                item.position(),
                format!("{path}: `{pattern}` is not a valid glob: {}", error.kind()),
            ));
        }
        if pattern.starts_with('/') || pattern.split('/').any(|part| part == "..") {
            return Err(Problem::new(
                item.position(),
                format!(
                    "{path}: `{pattern}` must be relative to the repository root, without `..`"
                ),
            ));
        }
        patterns.push(pattern.to_owned());
    }
    condition
        .get_or_insert_with(StageCondition::default)
        .changes = patterns;
    Ok(())
}

/// Every `params.NAME` in `if:` names a declared parameter.
pub(super) fn check_params(
    condition: Option<&StageCondition>,
    params: &[(Param, Position)],
) -> Result<(), Problem> {
    let refs = condition.map_or(&[][..], |condition| &condition.param_refs);
    check_param_refs(refs, params)
}

fn check_param_refs(
    refs: &[(String, Position)],
    params: &[(Param, Position)],
) -> Result<(), Problem> {
    for (name, position) in refs {
        if !params.iter().any(|(param, _)| param.name == *name) {
            let names: Vec<&str> = params.iter().map(|(p, _)| p.name.as_str()).collect();
            return Err(Problem::new(
                *position,
                if names.is_empty() {
                    format!(
                        "`params.{name}` is not a parameter: the pipeline declares none; declare it under `params:`"
                    )
                } else {
                    format!(
                        "`params.{name}` is not a parameter; declared: {}",
                        names.join(", ")
                    )
                },
            ));
        }
    }
    Ok(())
}

/// Every schedule's `params:` are values the declarations accept (the
/// same check as `kiln run -p`).
pub(super) fn check_schedule_params(
    triggers: &super::Triggers,
    params: &[(Param, Position)],
) -> Result<(), Problem> {
    let declared: Vec<Param> = params.iter().map(|(param, _)| param.clone()).collect();
    for schedule in &triggers.schedule {
        let Some(position) = schedule.params_at else {
            continue;
        };
        if let Err(why) = super::params::resolve(&declared, &schedule.params) {
            return Err(Problem::new(
                position,
                format!("`params` of schedule `{}`: {why}", schedule.expression()),
            ));
        }
    }
    Ok(())
}

/// The character `offset` bytes into `text` (an `if:` value), or the
/// value's own position when its characters cannot be placed.
fn at_offset(value: Node<'_>, text: &str, offset: usize) -> Position {
    let Some(start) = value.value_start() else {
        return value.position();
    };
    let chars = text[..offset.min(text.len())].chars().count();
    Position {
        column: start.column + chars,
        ..start
    }
}

// ------------------------------------------------------------ concurrency

/// `concurrency:` of the pipeline: runs of one group do not overlap.
#[derive(Clone, Debug, PartialEq)]
pub struct Concurrency {
    pub group: GroupTemplate,
    /// A new run cancels the older ones of its group (an environment
    /// stage already running finishes first); without it, the new run
    /// waits until they end.
    pub cancel_in_progress: bool,
}

/// A group name with `{{ VARIABLE }}` slots.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupTemplate {
    pub text: String,
    parts: Vec<Part>,
    param_refs: Vec<(String, Position)>,
}

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Text(String),
    Slot(Variable),
}

impl GroupTemplate {
    pub fn render(&self, facts: &Facts<'_>) -> String {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Text(text) => text.as_str(),
                Part::Slot(variable) => facts.value(variable),
            })
            .collect()
    }
}

#[derive(Default)]
struct ConcurrencyDraft {
    group: Option<GroupTemplate>,
    cancel_in_progress: bool,
}

#[rustfmt::skip]
const CONCURRENCY_FIELDS: &[Field<ConcurrencyDraft>] = &[
    ("group", |c, v, path| set(&mut c.group, group(v, path).map(Some))),
    ("cancel_in_progress", |c, v, path| set(&mut c.cancel_in_progress, values::flag(v, path))),
];

/// `concurrency: GROUP` or `concurrency: {group, cancel_in_progress}`.
pub(super) fn read_concurrency(value: Node<'_>, path: &Path<'_>) -> Result<Concurrency, Problem> {
    if value.entries().is_none() {
        return Ok(Concurrency {
            group: group(value, path)?,
            cancel_in_progress: false,
        });
    }
    let mut draft = ConcurrencyDraft::default();
    read_fields(
        &mut draft,
        value,
        CONCURRENCY_FIELDS,
        &path.to_string(),
        " in `concurrency`",
    )?;
    let group = draft.group.ok_or_else(|| {
        Problem::new(
            value.position(),
            format!("{path} has no `group`; add one like `group: \"deploy-{{{{ branch }}}}\"`"),
        )
    })?;
    Ok(Concurrency {
        group,
        cancel_in_progress: draft.cancel_in_progress,
    })
}

/// Every `params.NAME` in the group names a declared parameter.
pub(super) fn check_group_params(
    concurrency: Option<&Concurrency>,
    params: &[(Param, Position)],
) -> Result<(), Problem> {
    let refs = concurrency.map_or(&[][..], |c| &c.group.param_refs);
    check_param_refs(refs, params)
}

fn group(value: Node<'_>, path: &Path<'_>) -> Result<GroupTemplate, Problem> {
    let text = bounded_text(value, path, "a group name like `deploy-{{ branch }}`")?;
    let mut parts = Vec::new();
    let mut param_refs = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        let offset = text.len() - rest.len() + open;
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        let Some(close) = rest[open..].find("}}") else {
            return Err(Problem::new(
                at_offset(value, text, offset),
                format!("{path}: `{{{{` is not closed; write `{{{{ branch }}}}`"),
            ));
        };
        let inner = &rest[open + 2..open + close];
        let name = inner.trim();
        let name_offset = offset + 2 + (inner.len() - inner.trim_start().len());
        let variable = variable(name).ok_or_else(|| {
            Problem::new(
                at_offset(value, text, name_offset),
                format!("{path}: `{name}` is not a variable; use one of: {VARIABLES}"),
            )
        })?;
        if let Variable::Param(param) = &variable {
            param_refs.push((param.clone(), at_offset(value, text, name_offset)));
        }
        parts.push(Part::Slot(variable));
        rest = &rest[open + close + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(GroupTemplate {
        text: text.to_owned(),
        parts,
        param_refs,
    })
}

fn variable(name: &str) -> Option<Variable> {
    Some(match name {
        "branch" => Variable::Branch,
        "tag" => Variable::Tag,
        "event" => Variable::Event,
        "mr" => Variable::MergeRequest,
        "pipeline" => Variable::Pipeline,
        _ => {
            let param = name.strip_prefix("params.")?;
            let mut chars = param.chars();
            let valid = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return None;
            }
            Variable::Param(param.to_owned())
        }
    })
}

// ------------------------------------------------------------- the parser

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Word(String),
    Quoted(String),
    Equal,
    NotEqual,
    Matches,
    NotMatches,
    Not,
    And,
    Or,
    Open,
    Close,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Word(word) => write!(f, "`{word}`"),
            Self::Quoted(text) => write!(f, "string \"{text}\""),
            Self::Equal => f.write_str("`==`"),
            Self::NotEqual => f.write_str("`!=`"),
            Self::Matches => f.write_str("`=~`"),
            Self::NotMatches => f.write_str("`!~`"),
            Self::Not => f.write_str("`!`"),
            Self::And => f.write_str("`&&`"),
            Self::Or => f.write_str("`||`"),
            Self::Open => f.write_str("`(`"),
            Self::Close => f.write_str("`)`"),
        }
    }
}

#[derive(Clone, Debug)]
struct Token {
    kind: Kind,
    /// Byte offset in the expression.
    at: usize,
}

/// An error: byte offset in the expression, and the message.
type ParseError = (usize, String);

/// Recursive descent over the tokens: `or := and ("||" and)*`,
/// `and := unary ("&&" unary)*`, `unary := "!" unary | "(" or ")" |
/// comparison`, `comparison := operand (op operand)?`.
struct Parser {
    tokens: Result<Vec<Token>, ParseError>,
    next: usize,
    /// Where the expression ends, for "ends early" errors.
    end: usize,
    param_refs: Vec<(String, usize)>,
}

impl Parser {
    fn new(text: &str) -> Self {
        Self {
            tokens: tokenize(text),
            next: 0,
            end: text.len(),
            param_refs: Vec::new(),
        }
    }

    fn error(&self, at: usize, message: String) -> ParseError {
        (at, message)
    }

    fn peek(&self) -> Option<Token> {
        self.tokens.as_ref().ok()?.get(self.next).cloned()
    }

    fn bump(&mut self) -> Option<Token> {
        let token = self.peek();
        self.next += 1;
        token
    }

    fn expression(&mut self, depth: usize) -> Result<Expr, ParseError> {
        if let Err(error) = &self.tokens {
            return Err(error.clone());
        }
        if depth > MAX_DEPTH {
            let at = self.peek().map_or(self.end, |t| t.at);
            return Err((
                at,
                format!("the expression nests deeper than {MAX_DEPTH} levels; simplify it"),
            ));
        }
        let mut left = self.conjunction(depth)?;
        while self.peek().is_some_and(|t| t.kind == Kind::Or) {
            self.bump();
            let right = self.conjunction(depth)?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn conjunction(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut left = self.unary(depth)?;
        while self.peek().is_some_and(|t| t.kind == Kind::And) {
            self.bump();
            let right = self.unary(depth)?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, ParseError> {
        match self.peek().map(|t| (t.kind, t.at)) {
            Some((Kind::Not, _)) => {
                let token = self.bump();
                if depth + 1 > MAX_DEPTH {
                    let at = token.map_or(self.end, |t| t.at);
                    return Err((
                        at,
                        format!("the expression nests deeper than {MAX_DEPTH} levels; simplify it"),
                    ));
                }
                Ok(Expr::Not(Box::new(self.unary(depth + 1)?)))
            }
            Some((Kind::Open, _)) => {
                self.bump();
                let inner = self.expression(depth + 1)?;
                match self.bump() {
                    Some(Token {
                        kind: Kind::Close, ..
                    }) => Ok(inner),
                    Some(token) => Err((
                        token.at,
                        format!(
                            "expected `)` to close the `(` opened before; found {}",
                            token.kind
                        ),
                    )),
                    None => Err((self.end, "the `(` is never closed; add `)`".to_owned())),
                }
            }
            _ => self.comparison(),
        }
    }

    fn comparison(&mut self) -> Result<Expr, ParseError> {
        let left = self.operand()?;
        let op = match self.peek() {
            Some(token)
                if matches!(
                    token.kind,
                    Kind::Equal | Kind::NotEqual | Kind::Matches | Kind::NotMatches
                ) =>
            {
                self.bump();
                token.kind
            }
            _ => return Ok(Expr::Truthy(left)),
        };
        if matches!(op, Kind::Matches | Kind::NotMatches) {
            return match self.bump() {
                Some(Token {
                    kind: Kind::Quoted(pattern),
                    ..
                }) => Ok(if op == Kind::Matches {
                    Expr::Matches(left, pattern)
                } else {
                    Expr::NotMatches(left, pattern)
                }),
                Some(token) => Err((
                    token.at,
                    format!(
                        "{op} takes a quoted glob on its right, like `branch =~ \"release/*\"`; found {}",
                        token.kind
                    ),
                )),
                None => Err((
                    self.end,
                    format!("the expression ends after {op}; add a quoted glob"),
                )),
            };
        }
        let right = self.operand()?;
        Ok(if op == Kind::Equal {
            Expr::Equal(left, right)
        } else {
            Expr::NotEqual(left, right)
        })
    }

    fn operand(&mut self) -> Result<Operand, ParseError> {
        match self.bump() {
            Some(Token {
                kind: Kind::Quoted(text),
                ..
            }) => Ok(Operand::Literal(text)),
            Some(Token {
                kind: Kind::Word(word),
                at,
            }) => {
                let literal = word == "true"
                    || word == "false"
                    || word
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
                        && word.chars().any(|c| c.is_ascii_digit());
                if literal {
                    return Ok(Operand::Literal(word));
                }
                let variable = variable(&word).ok_or_else(|| {
                    let hint = if word.contains('.') || word.contains('/') {
                        "; quote text: \"...\""
                    } else {
                        ""
                    };
                    (
                        at,
                        format!("`{word}` is not a variable; use one of: {VARIABLES}{hint}"),
                    )
                })?;
                if let Variable::Param(name) = &variable {
                    self.param_refs.push((name.clone(), at));
                }
                Ok(Operand::Variable(variable))
            }
            Some(token) => Err((
                token.at,
                format!(
                    "expected a variable or a quoted string; found {}",
                    token.kind
                ),
            )),
            None => Err((
                self.end,
                "the expression ends early; expected a variable or a quoted string".to_owned(),
            )),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<Token>, ParseError> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let mut two = |second: char, kind: Kind| {
            if chars.peek().is_some_and(|&(_, next)| next == second) {
                chars.next();
                Some(kind)
            } else {
                None
            }
        };
        let kind = match c {
            c if c.is_whitespace() => continue,
            '(' => Kind::Open,
            ')' => Kind::Close,
            '=' => two('=', Kind::Equal)
                .or_else(|| two('~', Kind::Matches))
                .ok_or((
                    at,
                    "`=` alone is not an operator; use `==` or `=~`".to_owned(),
                ))?,
            '!' => two('=', Kind::NotEqual)
                .or_else(|| two('~', Kind::NotMatches))
                .unwrap_or(Kind::Not),
            '&' => two('&', Kind::And)
                .ok_or((at, "`&` alone is not an operator; use `&&`".to_owned()))?,
            '|' => two('|', Kind::Or)
                .ok_or((at, "`|` alone is not an operator; use `||`".to_owned()))?,
            '"' | '\'' => {
                let mut value = String::new();
                let mut closed = false;
                for (_, next) in chars.by_ref() {
                    if next == c {
                        closed = true;
                        break;
                    }
                    value.push(next);
                }
                if !closed {
                    return Err((at, format!("this string is never closed; add `{c}`")));
                }
                Kind::Quoted(value)
            }
            c if c.is_alphanumeric() || "_.-".contains(c) => {
                let mut word = c.to_string();
                while let Some(&(_, next)) = chars.peek() {
                    if next.is_alphanumeric() || "_.-/".contains(next) {
                        word.push(next);
                        chars.next();
                    } else {
                        break;
                    }
                }
                Kind::Word(word)
            }
            other => {
                return Err((
                    at,
                    format!(
                        "`{}` is not part of the `if:` language; it has variables, quoted strings, ==, !=, =~, !~, !, &&, || and parentheses",
                        other.escape_default()
                    ),
                ));
            }
        };
        tokens.push(Token { kind, at });
    }
    if tokens.is_empty() {
        return Err((0, "the expression is empty".to_owned()));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Expr, ParseError> {
        let mut parser = Parser::new(text);
        let expr = parser.expression(0)?;
        match parser.peek() {
            None => Ok(expr),
            Some(token) => Err((token.at, format!("unexpected {}", token.kind))),
        }
    }

    fn holds(text: &str, variables: &[(&str, &str)], params: &[(&str, &str)]) -> bool {
        let variables: BTreeMap<String, String> = variables
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let params: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let facts = Facts {
            pipeline: "p",
            variables: &variables,
            params: &params,
            changed: None,
        };
        parse(text).expect(text).eval(&facts)
    }

    #[test]
    fn comparisons_globs_and_logic() {
        let main = [("KILN_BRANCH", "main"), ("KILN_EVENT", "push")];
        assert!(holds(r#"branch == "main""#, &main, &[]));
        assert!(!holds(r#"branch != 'main'"#, &main, &[]));
        assert!(holds(r#"branch == "dev" || event == "push""#, &main, &[]));
        assert!(!holds(
            r#"branch == "dev" || event == "push" && tag"#,
            &main,
            &[]
        ));
        assert!(holds(
            r#"(branch == "dev" || event == "push") && !tag"#,
            &main,
            &[]
        ));
        assert!(holds(r#"tag =~ "v*""#, &[("KILN_TAG", "v1.2")], &[]));
        assert!(holds(
            r#"branch =~ "release/*""#,
            &[("KILN_BRANCH", "release/a/b")],
            &[]
        ));
        assert!(holds(r#"branch !~ "release/*""#, &main, &[]));
        assert!(holds(
            "params.DRY == true && params.N == 10",
            &[],
            &[("DRY", "true"), ("N", "10")]
        ));
        assert!(!holds("params.DRY", &[], &[("DRY", "false")]));
        assert!(!holds("mr", &main, &[]));
        assert!(holds("pipeline == \"p\"", &[], &[]));
    }

    #[test]
    fn errors_point_at_the_offending_character() {
        let cases = [
            (r#"branch = "main""#, 7, "`=` alone"),
            (r#"branch == "main" &&"#, 19, "ends early"),
            (r#"branch == "main"#, 10, "never closed"),
            (r#"brnch == "main""#, 0, "`brnch` is not a variable"),
            (r#"(branch == "a""#, 14, "never closed; add `)`"),
            (r#"branch == "a" tag"#, 14, "unexpected `tag`"),
            (r#"tag =~ v1"#, 7, "quoted glob"),
            (r#"branch == "a" ; rm -rf /"#, 14, "`;` is not part"),
            ("", 0, "empty"),
        ];
        for (text, at, message) in cases {
            let (offset, error) = parse(text).expect_err(text);
            assert_eq!(offset, at, "{text}: {error}");
            assert!(error.contains(message), "{text}: {error}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let text = format!("{}branch{}", "(".repeat(1000), ")".repeat(1000));
        assert!(parse(&text).unwrap_err().1.contains("nests deeper"));
        let text = format!("{}branch", "!".repeat(10_000));
        assert!(parse(&text).unwrap_err().1.contains("nests deeper"));
    }

    #[test]
    fn changes_match_within_directories() {
        let condition = StageCondition {
            changes: vec!["data/**".into(), "*.py".into()],
            ..StageCondition::default()
        };
        let decide = |changed: &[&str]| {
            let changed: Vec<String> = changed.iter().map(|s| (*s).to_owned()).collect();
            let empty = BTreeMap::new();
            condition.decide(&Facts {
                pipeline: "p",
                variables: &empty,
                params: &empty,
                changed: Some(&changed),
            })
        };
        assert!(decide(&["data/raw/a.csv"]).is_ok());
        assert!(decide(&["train.py"]).is_ok());
        let skipped = decide(&["src/train.py", "README.md"]).unwrap_err();
        assert!(skipped.contains("no changed path matches"), "{skipped}");
        assert!(decide(&[]).is_err());
    }

    #[test]
    fn a_false_condition_says_which_values_decided() {
        let condition = StageCondition {
            expression: Some((
                parse(r#"branch == "main""#).unwrap(),
                r#"branch == "main""#.into(),
            )),
            ..StageCondition::default()
        };
        let variables = BTreeMap::from([("KILN_BRANCH".to_owned(), "dev".to_owned())]);
        let empty = BTreeMap::new();
        let reason = condition
            .decide(&Facts {
                pipeline: "p",
                variables: &variables,
                params: &empty,
                changed: None,
            })
            .unwrap_err();
        assert_eq!(
            reason,
            r#"`if: branch == "main"` is false (branch = "dev")"#
        );
    }
}

#[cfg(test)]
mod file_tests {
    //! `if:`, `changes:` and `concurrency:` as the whole parser reads them:
    //! errors carry the file, line and column of the offending character.

    fn error(text: &str) -> String {
        let text = text.replace("\n        ", "\n");
        crate::spec::parse("kiln.yml", &text)
            .expect_err("the file is refused")
            .to_string()
    }

    fn parse(text: &str) -> crate::spec::Pipeline {
        let text = text.replace("\n        ", "\n");
        crate::spec::parse("kiln.yml", &text).expect("the file parses")
    }

    #[test]
    fn if_errors_point_into_the_expression() {
        assert_eq!(
            error(
                r#"
        pipeline: p
        stages:
          build:
            if: branch == "main" && evnt == "push"
            commands: [make]
        "#
            ),
            "kiln.yml:5:29: `if` in stage `build`: `evnt` is not a variable; use one of: branch, tag, event, mr, pipeline, params.NAME"
        );
        assert_eq!(
            error(
                r#"
        pipeline: p
        stages:
          build:
            if: 'branch = "main"'
            commands: [make]
        "#
            ),
            "kiln.yml:5:17: `if` in stage `build`: `=` alone is not an operator; use `==` or `=~`"
        );
        assert_eq!(
            error(
                r#"
        pipeline: p
        params: { N: { type: int, default: 1 } }
        stages:
          build:
            if: params.M == 2
            commands: [make]
        "#
            ),
            "kiln.yml:6:9: `params.M` is not a parameter; declared: N"
        );
    }

    #[test]
    fn schedule_params_are_checked_against_their_declarations() {
        assert_eq!(
            error(
                r#"
        pipeline: p
        params: { EPOCHS: { type: int, default: 1 } }
        on:
          schedule:
            - { cron: "0 3 * * *", params: { EPOCHS: many } }
        stages:
          build: { commands: [make] }
        "#
            ),
            "kiln.yml:6:36: `params` of schedule `0 3 * * *`: parameter `EPOCHS` is an int (like `10` or `-3`); `many` is not"
        );
        let pipeline = parse(
            r#"
        pipeline: p
        params: { EPOCHS: { type: int, default: 1 } }
        on:
          schedule: ["0 4 * * *", { cron: "0 3 * * *", params: { EPOCHS: 50 } }]
        stages:
          build: { commands: [make] }
        "#,
        );
        let schedules = &pipeline.triggers.schedule;
        assert!(schedules[0].params.is_empty());
        assert_eq!(schedules[1].params["EPOCHS"], "50");
    }

    #[test]
    fn changes_and_concurrency_are_checked() {
        assert!(
            error(
                r#"
        pipeline: p
        stages:
          build:
            changes: ["data/[a"]
            commands: [make]
        "#
            )
            .starts_with(
                "kiln.yml:5:15: `changes` in stage `build`: `data/[a` is not a valid glob"
            )
        );
        assert_eq!(
            error(
                r#"
        pipeline: p
        concurrency: "deploy-{{ brnch }}"
        stages:
          build: { commands: [make] }
        "#
            ),
            "kiln.yml:3:25: `concurrency`: `brnch` is not a variable; use one of: branch, tag, event, mr, pipeline, params.NAME"
        );
        let pipeline = parse(
            r#"
        pipeline: p
        concurrency: { group: "deploy-{{ branch }}", cancel_in_progress: true }
        stages:
          build:
            if: event != "schedule"
            changes: ["src/**"]
            commands: [make]
        "#,
        );
        let concurrency = pipeline.concurrency.expect("concurrency is read");
        assert!(concurrency.cancel_in_progress);
        let variables = [("KILN_BRANCH".to_owned(), "main".to_owned())].into();
        let facts = super::Facts {
            pipeline: "p",
            variables: &variables,
            params: &Default::default(),
            changed: None,
        };
        assert_eq!(concurrency.group.render(&facts), "deploy-main");
        let condition = pipeline.stages[0].condition.as_ref().expect("if: is read");
        assert_eq!(condition.changes, ["src/**"]);
        assert!(condition.decide(&facts).is_ok());
    }
}
