//! The delivery keys of a stage: `metrics`, `environment`, `gate` and
//! `monitor`, their types and readers.
//!
//! Conditions are written as strings, `">= 0.90"`, so a file reads like the
//! rule it states; they are parsed here, once, into [`Condition`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::schema::{Field, Path, read_fields, set};
use super::values;
use super::yaml::Node;
use super::{Position, Problem};

/// A comparison against a number: `>= 0.9`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Condition {
    pub op: Op,
    pub value: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Ge,
    Le,
    Gt,
    Lt,
    Eq,
}

impl Condition {
    /// Whether `observed` satisfies the condition (NaN never does).
    pub fn holds(&self, observed: f64) -> bool {
        match self.op {
            Op::Ge => observed >= self.value,
            Op::Le => observed <= self.value,
            Op::Gt => observed > self.value,
            Op::Lt => observed < self.value,
            Op::Eq => observed == self.value,
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Ge => ">=",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Lt => "<",
            Op::Eq => "==",
        };
        write!(f, "{op} {}", self.value)
    }
}

/// What a missing or NaN value counts as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnMissing {
    /// The check fails (a gate fails; a monitor counts a breach).
    #[default]
    Fail,
    /// The check passes (a gate passes it; a monitor ignores the sample).
    Pass,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Approval {
    #[default]
    Auto,
    /// Waits for `kiln approve RUN STAGE` (or `kiln reject`).
    Manual,
}

/// How far a challenger may fall behind the champion on one metric.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaxRegression {
    pub amount: f64,
    /// `"5%"`: a fraction of the champion's value rather than an absolute
    /// difference.
    pub relative: bool,
}

/// `gate:` — a stage the coordinator evaluates itself, with no agent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gate {
    /// Thresholds on the run's metrics, by metric name.
    pub require: BTreeMap<String, Condition>,
    /// Environment whose live release is the champion.
    pub compare_to: Option<String>,
    pub max_regression: BTreeMap<String, MaxRegression>,
    pub on_missing: OnMissing,
    pub approval: Approval,
    /// `select: {metric: recall, max: true}` — best of a sweep: of the
    /// stages the gate needs, the one with the best value of `metric` wins;
    /// the gate's rules are checked on its metrics, and the stages after the
    /// gate get its artifacts.
    pub select: Option<Select>,
}

/// How a best-of gate picks its winner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Select {
    pub metric: String,
    /// The highest value wins (`max: true`), else the lowest (`min: true`).
    pub highest: bool,
}

/// Where a monitor reads its value.
#[derive(Clone, Debug, PartialEq)]
pub enum MonitorSource {
    /// A Prometheus exposition endpoint; the metric is each
    /// `rollback_when` key, narrowed by `labels`.
    Scrape {
        url: String,
        labels: BTreeMap<String, String>,
    },
    /// A Prometheus server's `/api/v1/query`; `rollback_when` has one key,
    /// which names the query's value.
    Prometheus { url: String, query: String },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnBreach {
    /// Put the previous release back.
    #[default]
    Rollback,
    /// Keep what runs, stop promotions to the environment, alert.
    Freeze,
}

/// `monitor:` on an environment stage: watch the new release after it goes
/// live.
#[derive(Clone, Debug, PartialEq)]
pub struct Monitor {
    pub source: MonitorSource,
    pub every: Duration,
    /// How long the release is watched (`for:`).
    pub window: Duration,
    /// A sample breaches when any of these holds.
    pub rollback_when: BTreeMap<String, Condition>,
    /// Consecutive breaches that trigger `on_breach`.
    pub failure_limit: u32,
    /// What a failed scrape or an empty result counts as (`fail` = breach).
    pub on_missing: OnMissing,
    pub on_breach: OnBreach,
    /// `on_breach: [rollback, retrain]`: after the rollback, the pipeline
    /// runs again on its newest commit, and its candidate must pass the
    /// gate that compares it with the restored champion.
    pub retrain: bool,
}

/// The delivery keys of a stage, as read.
#[derive(Clone, Debug, Default)]
pub(super) struct DeliveryDraft {
    pub(super) metrics: Option<String>,
    pub(super) environment: Option<String>,
    /// `endpoint: URL` and where it was written.
    pub(super) endpoint: Option<(String, Position)>,
    /// `model: NAME` and where it was written.
    pub(super) model: Option<(String, Position)>,
    pub(super) gate: Option<(Gate, Position)>,
    pub(super) monitor: Option<(Monitor, Position)>,
    /// `strategy:` (canary or shadow) and where it was written.
    pub(super) strategy: Option<(super::Strategy, Position)>,
}

/// `metrics: build/metrics.json`.
pub(super) fn metrics(value: Node<'_>, path: &Path<'_>) -> Result<String, Problem> {
    let text = value
        .string()
        .ok_or_else(|| wrong(value, path, "a workspace path to a JSON file"))?;
    crate::archive::check_artifact_path(text)
        .map_err(|why| Problem::new(value.position(), format!("metrics path `{text}` {why}")))?;
    Ok(text.to_owned())
}

/// `environment: production`.
pub(super) fn environment(value: Node<'_>, path: &Path<'_>) -> Result<String, Problem> {
    values::name(value, path)
}

/// `model: churn`: the model an environment stage's releases are
/// versions of (`churn@3`).
pub(super) fn model(value: Node<'_>, path: &Path<'_>) -> Result<(String, Position), Problem> {
    Ok((
        values::name_of(value, path, "model name")?,
        value.position(),
    ))
}

/// `endpoint: http://127.0.0.1:9102`: where the environment stage's
/// release is served.
pub(super) fn endpoint(value: Node<'_>, path: &Path<'_>) -> Result<(String, Position), Problem> {
    let url = value
        .string()
        .ok_or_else(|| wrong(value, path, "an http:// or https:// URL"))?;
    Ok((http_url(value, url, path)?, value.position()))
}

#[derive(Default)]
struct GateDraft {
    gate: Gate,
}

#[rustfmt::skip]
const GATE_FIELDS: &[Field<GateDraft>] = &[
    ("require", |g, v, path| set(&mut g.gate.require, conditions(v, path))),
    ("compare_to", |g, v, path| set(&mut g.gate.compare_to, values::name(v, path).map(Some))),
    ("max_regression", |g, v, path| set(&mut g.gate.max_regression, regressions(v, path))),
    ("on_missing", |g, v, path| set(&mut g.gate.on_missing, on_missing(v, path))),
    ("approval", |g, v, path| set(&mut g.gate.approval, approval(v, path))),
    ("select", |g, v, path| set(&mut g.gate.select, select(v, path).map(Some))),
];

pub(super) fn gate(
    value: Node<'_>,
    path: &Path<'_>,
    stage: &str,
) -> Result<(Gate, Position), Problem> {
    let mut draft = GateDraft::default();
    let place = format!(" in `gate` of stage `{stage}`");
    read_fields(&mut draft, value, GATE_FIELDS, &path.to_string(), &place)?;
    let gate = draft.gate;
    if let Some(metric) = gate.max_regression.keys().next()
        && gate.compare_to.is_none()
    {
        return Err(Problem::new(
            value.position(),
            format!(
                "`max_regression` of `{metric}` in stage `{stage}` needs a champion; add `compare_to: ENVIRONMENT`"
            ),
        ));
    }
    Ok((gate, value.position()))
}

#[derive(Default)]
struct MonitorDraft {
    scrape: Option<(String, BTreeMap<String, String>)>,
    prometheus: Option<(String, String)>,
    every: Option<Duration>,
    window: Option<Duration>,
    rollback_when: BTreeMap<String, Condition>,
    failure_limit: Option<u32>,
    on_missing: OnMissing,
    on_breach: (OnBreach, bool),
}

#[rustfmt::skip]
const MONITOR_FIELDS: &[Field<MonitorDraft>] = &[
    ("scrape", |m, v, path| set(&mut m.scrape, scrape(v, path).map(Some))),
    ("prometheus", |m, v, path| set(&mut m.prometheus, prometheus(v, path).map(Some))),
    ("every", |m, v, path| set(&mut m.every, values::timeout(v, path).map(Some))),
    ("for", |m, v, path| set(&mut m.window, values::timeout(v, path).map(Some))),
    ("rollback_when", |m, v, path| set(&mut m.rollback_when, conditions(v, path))),
    ("failure_limit", |m, v, path| set(&mut m.failure_limit, failure_limit(v, path).map(Some))),
    ("on_missing", |m, v, path| set(&mut m.on_missing, on_missing(v, path))),
    ("on_breach", |m, v, path| set(&mut m.on_breach, on_breach(v, path))),
];

pub(super) fn monitor(
    value: Node<'_>,
    path: &Path<'_>,
    stage: &str,
) -> Result<(Monitor, Position), Problem> {
    let mut draft = MonitorDraft::default();
    let place = format!(" in `monitor` of stage `{stage}`");
    read_fields(&mut draft, value, MONITOR_FIELDS, &path.to_string(), &place)?;
    let at = value.position();
    Ok((finish_monitor(draft, at, stage, "monitor")?, at))
}

/// The rules of a `strategy:` (canary `analysis:`, shadow `compare:`):
/// the monitor's syntax, without `for` (the step's pause is the window) or
/// `on_breach` (a breach aborts the rollout).
#[rustfmt::skip]
const ANALYSIS_FIELDS: &[Field<MonitorDraft>] = &[
    ("scrape", |m, v, path| set(&mut m.scrape, scrape(v, path).map(Some))),
    ("prometheus", |m, v, path| set(&mut m.prometheus, prometheus(v, path).map(Some))),
    ("every", |m, v, path| set(&mut m.every, values::timeout(v, path).map(Some))),
    ("rollback_when", |m, v, path| set(&mut m.rollback_when, conditions(v, path))),
    ("failure_limit", |m, v, path| set(&mut m.failure_limit, failure_limit(v, path).map(Some))),
    ("on_missing", |m, v, path| set(&mut m.on_missing, on_missing(v, path))),
];

/// `analysis:` of a canary or `compare:` of a shadow (`key`), watched for
/// `window` at a time.
pub(super) fn analysis(
    value: Node<'_>,
    path: &Path<'_>,
    stage: &str,
    key: &str,
    window: Duration,
) -> Result<Monitor, Problem> {
    let mut draft = MonitorDraft::default();
    let place = format!(" in `{key}` of stage `{stage}`");
    read_fields(
        &mut draft,
        value,
        ANALYSIS_FIELDS,
        &path.to_string(),
        &place,
    )?;
    draft.window = Some(window);
    finish_monitor(draft, value.position(), stage, key)
}

/// Checks what the fields of a `monitor:`-like mapping (`key`) left and
/// fills in the defaults.
fn finish_monitor(
    draft: MonitorDraft,
    at: Position,
    stage: &str,
    key: &str,
) -> Result<Monitor, Problem> {
    let source = match (draft.scrape, draft.prometheus) {
        (Some((url, labels)), None) => MonitorSource::Scrape { url, labels },
        (None, Some((url, query))) => MonitorSource::Prometheus { url, query },
        (Some(_), Some(_)) => {
            return Err(Problem::new(
                at,
                format!("`{key}` of stage `{stage}` has both `scrape` and `prometheus`; keep one"),
            ));
        }
        (None, None) => {
            return Err(Problem::new(
                at,
                format!(
                    "`{key}` of stage `{stage}` has no source; add `scrape: URL` or `prometheus: {{url, query}}`"
                ),
            ));
        }
    };
    if draft.rollback_when.is_empty() {
        return Err(Problem::new(
            at,
            format!(
                "`{key}` of stage `{stage}` has no `rollback_when`; add e.g. `rollback_when: {{error_ratio: \"> 0.05\"}}`"
            ),
        ));
    }
    if matches!(source, MonitorSource::Prometheus { .. }) && draft.rollback_when.len() != 1 {
        return Err(Problem::new(
            at,
            format!(
                "`rollback_when` of stage `{stage}` must have exactly one condition with `prometheus:` (the query has one value)"
            ),
        ));
    }
    Ok(Monitor {
        source,
        every: draft.every.unwrap_or(Duration::from_secs(10)),
        window: draft.window.unwrap_or(Duration::from_secs(600)),
        rollback_when: draft.rollback_when,
        failure_limit: draft.failure_limit.unwrap_or(3),
        on_missing: draft.on_missing,
        on_breach: draft.on_breach.0,
        retrain: draft.on_breach.1,
    })
}

/// `{metric: ">= 0.9", ...}`.
fn conditions(value: Node<'_>, path: &Path<'_>) -> Result<BTreeMap<String, Condition>, Problem> {
    let entries = value.entries().ok_or_else(|| {
        wrong(
            value,
            path,
            "a mapping of metric names to conditions, like `{recall: \">= 0.8\"}`",
        )
    })?;
    let mut out = BTreeMap::new();
    for (key, condition) in entries {
        let metric = metric_name(key, path)?;
        out.insert(metric, parse_condition(condition, path)?);
    }
    Ok(out)
}

fn metric_name(key: Node<'_>, path: &Path<'_>) -> Result<String, Problem> {
    match key.text() {
        Some(text)
            if !text.is_empty()
                && text
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') =>
        {
            Ok(text.to_owned())
        }
        _ => Err(wrong(
            key,
            path,
            "metric names of letters, digits, `_` and `:`",
        )),
    }
}

fn parse_condition(value: Node<'_>, path: &Path<'_>) -> Result<Condition, Problem> {
    const HINT: &str = "write a comparison and a number, like \">= 0.9\" (one of >=, <=, >, <, ==)";
    let text = value.text().map(str::trim).unwrap_or_default();
    let (op, rest) = [
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("==", Op::Eq),
        ("<", Op::Lt),
        (">", Op::Gt),
    ]
    .into_iter()
    .find_map(|(token, op)| text.strip_prefix(token).map(|rest| (op, rest.trim())))
    .ok_or_else(|| {
        Problem::new(
            value.position(),
            format!("bad condition `{text}` in {path}; {HINT}"),
        )
    })?;
    let number: f64 = rest
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite())
        .ok_or_else(|| {
            Problem::new(
                value.position(),
                format!("bad condition `{text}` in {path}; {HINT}"),
            )
        })?;
    Ok(Condition { op, value: number })
}

/// `{recall: 0.02}` (absolute) or `{recall: "5%"}` (relative).
fn regressions(
    value: Node<'_>,
    path: &Path<'_>,
) -> Result<BTreeMap<String, MaxRegression>, Problem> {
    let entries = value.entries().ok_or_else(|| {
        wrong(
            value,
            path,
            "a mapping of metric names to amounts, like `{recall: 0.02}` or `{recall: \"5%\"}`",
        )
    })?;
    let mut out = BTreeMap::new();
    for (key, amount) in entries {
        let metric = metric_name(key, path)?;
        let text = amount.text().map(str::trim).unwrap_or_default();
        let (number, relative) = match text.strip_suffix('%') {
            Some(percent) => (percent.trim().parse::<f64>().ok().map(|p| p / 100.0), true),
            None => (text.parse::<f64>().ok(), false),
        };
        let Some(number) = number.filter(|n| n.is_finite() && *n >= 0.0) else {
            return Err(Problem::new(
                amount.position(),
                format!(
                    "bad regression `{text}` for `{metric}` in {path}; write a non-negative number (0.02) or a percentage (\"5%\")"
                ),
            ));
        };
        out.insert(
            metric,
            MaxRegression {
                amount: number,
                relative,
            },
        );
    }
    Ok(out)
}

fn scrape(value: Node<'_>, path: &Path<'_>) -> Result<(String, BTreeMap<String, String>), Problem> {
    if let Some(url) = value.string() {
        return Ok((http_url(value, url, path)?, BTreeMap::new()));
    }
    let mut url = None;
    let mut labels = BTreeMap::new();
    for (key, item) in value
        .entries()
        .ok_or_else(|| wrong(value, path, "a URL or `{url, labels}`"))?
    {
        match key.text() {
            Some("url") => url = Some(http_url(item, item.string().unwrap_or_default(), path)?),
            Some("labels") => labels = values::labels(item, path)?,
            other => {
                return Err(Problem::new(
                    key.position(),
                    format!(
                        "unknown key `{}` in {path}; expected one of: url, labels",
                        other.unwrap_or("?")
                    ),
                ));
            }
        }
    }
    let url = url.ok_or_else(|| Problem::new(value.position(), format!("{path} has no `url`")))?;
    Ok((url, labels))
}

fn prometheus(value: Node<'_>, path: &Path<'_>) -> Result<(String, String), Problem> {
    let (mut url, mut query) = (None, None);
    for (key, item) in value
        .entries()
        .ok_or_else(|| wrong(value, path, "`{url, query}`"))?
    {
        match key.text() {
            Some("url") => url = Some(http_url(item, item.string().unwrap_or_default(), path)?),
            Some("query") => {
                query = item
                    .string()
                    .filter(|q| !q.trim().is_empty())
                    .map(str::to_owned)
            }
            other => {
                return Err(Problem::new(
                    key.position(),
                    format!(
                        "unknown key `{}` in {path}; expected one of: url, query",
                        other.unwrap_or("?")
                    ),
                ));
            }
        }
    }
    match (url, query) {
        (Some(url), Some(query)) => Ok((url, query)),
        _ => Err(Problem::new(
            value.position(),
            format!("{path} needs both `url` and a non-empty `query`"),
        )),
    }
}

fn http_url(value: Node<'_>, url: &str, path: &Path<'_>) -> Result<String, Problem> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(url.to_owned())
    } else {
        Err(Problem::new(
            value.position(),
            format!("{path} must be an http:// or https:// URL; found `{url}`"),
        ))
    }
}

fn failure_limit(value: Node<'_>, path: &Path<'_>) -> Result<u32, Problem> {
    value
        .text()
        .and_then(|text| text.parse::<u32>().ok())
        .filter(|n| (1..=1000).contains(n))
        .ok_or_else(|| wrong(value, path, "a whole number from 1 to 1000"))
}

fn on_missing(value: Node<'_>, path: &Path<'_>) -> Result<OnMissing, Problem> {
    match value.text() {
        Some("fail") => Ok(OnMissing::Fail),
        Some("pass") => Ok(OnMissing::Pass),
        _ => Err(wrong(value, path, "`fail` or `pass`")),
    }
}

/// `select: {metric: NAME, max: true}` or `{metric: NAME, min: true}`.
fn select(value: Node<'_>, path: &Path<'_>) -> Result<Select, Problem> {
    const EXPECTED: &str = "`{metric: recall, max: true}` or `{metric: loss, min: true}`";
    let entries = value
        .entries()
        .ok_or_else(|| wrong(value, path, EXPECTED))?;
    let mut metric = None;
    let mut highest = None;
    for (key, item) in entries {
        match (key.text(), item.scalar()) {
            (Some("metric"), _) => metric = item.text().map(str::to_owned),
            (Some("max"), Some(saphyr::Scalar::Boolean(true))) => highest = Some(true),
            (Some("min"), Some(saphyr::Scalar::Boolean(true))) => highest = Some(false),
            _ => return Err(wrong(value, path, EXPECTED)),
        }
    }
    match (metric, highest) {
        (Some(metric), Some(highest)) if !metric.is_empty() => Ok(Select { metric, highest }),
        _ => Err(wrong(value, path, EXPECTED)),
    }
}

fn approval(value: Node<'_>, path: &Path<'_>) -> Result<Approval, Problem> {
    match value.text() {
        Some("auto") => Ok(Approval::Auto),
        Some("manual") => Ok(Approval::Manual),
        _ => Err(wrong(value, path, "`auto` or `manual`")),
    }
}

/// `rollback`, `freeze`, or a list of them plus `retrain` (which follows a
/// rollback): what to do, and whether to retrain afterwards.
fn on_breach(value: Node<'_>, path: &Path<'_>) -> Result<(OnBreach, bool), Problem> {
    const EXPECTED: &str = "`rollback`, `freeze` or `[rollback, retrain]`";
    let Some(items) = value.items() else {
        return match value.text() {
            Some("rollback") => Ok((OnBreach::Rollback, false)),
            Some("freeze") => Ok((OnBreach::Freeze, false)),
            Some("retrain") => Err(Problem::new(
                value.position(),
                format!("{path}: `retrain` follows a rollback; write `[rollback, retrain]`"),
            )),
            _ => Err(wrong(value, path, EXPECTED)),
        };
    };
    let (mut action, mut retrain) = (None, false);
    for item in items {
        match (item.text(), action) {
            (Some("rollback"), None) => action = Some(OnBreach::Rollback),
            (Some("freeze"), None) => action = Some(OnBreach::Freeze),
            (Some("retrain"), _) if !retrain => retrain = true,
            _ => return Err(wrong(item, path, EXPECTED)),
        }
    }
    match action {
        Some(OnBreach::Freeze) if retrain => Err(Problem::new(
            value.position(),
            format!(
                "{path}: `retrain` follows a rollback, not a freeze; write `[rollback, retrain]`"
            ),
        )),
        Some(action) => Ok((action, retrain)),
        None => Err(Problem::new(
            value.position(),
            format!("{path}: `retrain` follows a rollback; write `[rollback, retrain]`"),
        )),
    }
}

fn wrong(value: Node<'_>, path: &Path<'_>, must_be: &str) -> Problem {
    Problem::new(
        value.position(),
        format!("{path} must be {must_be}; found {}", value.describe()),
    )
}
