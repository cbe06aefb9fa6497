//! `strategy:` of an environment stage: how a new release replaces the
//! live one — a canary in weighted steps with analysis between them, or a
//! shadow that receives mirrored traffic before it is promoted.
//!
//! Both read into one [`Strategy`]: a list of traffic weights and, between
//! them, a window in which the coordinator judges the candidate by rules
//! written like a `monitor:`'s. A shadow is the steps `[0, 100]`, where 0
//! means "mirrored traffic only".

use std::time::Duration;

use super::delivery::analysis;
use super::schema::{Field, Path, read_fields, set};
use super::values;
use super::yaml::Node;
use super::{Monitor, Position, Problem};

/// Which kind of progressive delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrategyKind {
    /// `canary:` weighted steps.
    Canary,
    /// `shadow:` mirrored traffic, then all of it.
    Shadow,
}

/// A stage's `strategy:`.
#[derive(Clone, Debug, PartialEq)]
pub struct Strategy {
    pub kind: StrategyKind,
    /// Percent of traffic the candidate gets at each step, rising, the last
    /// 100. A shadow's are `[0, 100]`: 0 is mirrored traffic only.
    pub steps: Vec<u32>,
    /// How long the coordinator analyses the candidate after each step but
    /// the last (a canary's `pause`, a shadow's `for`).
    pub pause: Duration,
    /// The rules that abort the rollout (a canary's `analysis`, a
    /// shadow's `compare`); `None`: the steps advance on time alone.
    pub analysis: Option<Monitor>,
}

impl Strategy {
    /// What a deploy at `weight` is told the traffic is: `canary` for a
    /// share, `shadow` for mirrored traffic only, `full` for all of it.
    pub fn traffic_mode(weight: u32) -> &'static str {
        match weight {
            0 => "shadow",
            100 => "full",
            _ => "canary",
        }
    }

    /// The steps for people, the current one (0-based `current`) in
    /// brackets: `10% → [50%] → 100%`, a shadow step as `shadow`.
    pub fn steps_text(steps: &[u32], current: usize) -> String {
        steps
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                let weight = if weight == 0 {
                    "shadow".to_owned()
                } else {
                    format!("{weight}%")
                };
                if i == current {
                    format!("[{weight}]")
                } else {
                    weight
                }
            })
            .collect::<Vec<_>>()
            .join(" → ")
    }
}

/// The default pause between canary steps and the default shadow window.
pub const DEFAULT_PAUSE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct CanaryDraft {
    steps: Vec<u32>,
    pause: Option<Duration>,
    /// Read after `pause`, which is its window.
    analysis: Option<Position>,
}

#[derive(Default)]
struct ShadowDraft {
    window: Option<Duration>,
    compare: Option<Position>,
}

#[rustfmt::skip]
const CANARY_FIELDS: &[Field<CanaryDraft>] = &[
    ("steps", |c, v, path| set(&mut c.steps, steps(v, path))),
    ("pause", |c, v, path| set(&mut c.pause, values::timeout(v, path).map(Some))),
    ("analysis", |c, v, _| { c.analysis = Some(v.position()); Ok(()) }),
];

#[rustfmt::skip]
const SHADOW_FIELDS: &[Field<ShadowDraft>] = &[
    ("for", |s, v, path| set(&mut s.window, values::timeout(v, path).map(Some))),
    ("compare", |s, v, _| { s.compare = Some(v.position()); Ok(()) }),
];

/// `strategy: {canary: {...}}` or `strategy: {shadow: {...}}`.
pub(super) fn read(
    value: Node<'_>,
    path: &Path<'_>,
    stage: &str,
) -> Result<(Strategy, Position), Problem> {
    let at = value.position();
    let entries = values::mapping(value, path, "`{canary: {...}}` or `{shadow: {...}}`")?;
    let [(key, body)] = entries.as_slice() else {
        return Err(Problem::new(
            at,
            format!("`strategy` of stage `{stage}` must have exactly one of `canary` or `shadow`"),
        ));
    };
    let strategy = match key.text() {
        Some("canary") => canary(*body, stage)?,
        Some("shadow") => shadow(*body, stage)?,
        other => {
            return Err(Problem::new(
                key.position(),
                format!(
                    "unknown key `{}` in `strategy` of stage `{stage}`; expected one of: canary, shadow",
                    other.unwrap_or("?")
                ),
            ));
        }
    };
    Ok((strategy, at))
}

fn canary(value: Node<'_>, stage: &str) -> Result<Strategy, Problem> {
    let mut draft = CanaryDraft::default();
    let place = format!(" in `strategy.canary` of stage `{stage}`");
    read_fields(&mut draft, value, CANARY_FIELDS, "strategy.canary", &place)?;
    if draft.steps.is_empty() {
        return Err(Problem::new(
            value.position(),
            format!(
                "`strategy.canary` of stage `{stage}` has no `steps`; add e.g. `steps: [10, 50, 100]`"
            ),
        ));
    }
    let pause = draft.pause.unwrap_or(DEFAULT_PAUSE);
    let analysis = rules(value, "analysis", stage, pause)?;
    Ok(Strategy {
        kind: StrategyKind::Canary,
        steps: draft.steps,
        pause,
        analysis,
    })
}

fn shadow(value: Node<'_>, stage: &str) -> Result<Strategy, Problem> {
    let mut draft = ShadowDraft::default();
    let place = format!(" in `strategy.shadow` of stage `{stage}`");
    read_fields(&mut draft, value, SHADOW_FIELDS, "strategy.shadow", &place)?;
    let window = draft.window.unwrap_or(DEFAULT_PAUSE);
    let Some(compare) = rules(value, "compare", stage, window)? else {
        return Err(Problem::new(
            value.position(),
            format!(
                "`strategy.shadow` of stage `{stage}` has no `compare`; a shadow is promoted only by rules, e.g. `compare: {{scrape: URL, rollback_when: {{error_ratio: \"> 0.05\"}}}}`"
            ),
        ));
    };
    Ok(Strategy {
        kind: StrategyKind::Shadow,
        steps: vec![0, 100],
        pause: window,
        analysis: Some(compare),
    })
}

/// The `key` mapping of `body` read as analysis rules, watched for
/// `window` per step.
fn rules(
    body: Node<'_>,
    key: &str,
    stage: &str,
    window: Duration,
) -> Result<Option<Monitor>, Problem> {
    let Some((_, value)) = body
        .entries()
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| k.text() == Some(key))
    else {
        return Ok(None);
    };
    let place = format!(" in `strategy` of stage `{stage}`");
    let path = Path { key, place: &place };
    analysis(value, &path, stage, key, window).map(Some)
}

/// `[10, 50, 100]`: whole percentages from 1, rising, ending at 100.
fn steps(value: Node<'_>, path: &Path<'_>) -> Result<Vec<u32>, Problem> {
    const HINT: &str =
        "a list of whole percentages from 1 to 100, rising and ending at 100, like [10, 50, 100]";
    let items = value.items().ok_or_else(|| {
        Problem::new(
            value.position(),
            format!("{path} must be {HINT}; found {}", value.describe()),
        )
    })?;
    let mut steps = Vec::with_capacity(items.len());
    for item in items {
        let step = item
            .text()
            .and_then(|text| text.parse::<u32>().ok())
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| {
                Problem::new(
                    item.position(),
                    format!("{path} must be {HINT}; found {}", item.describe()),
                )
            })?;
        if steps.last().is_some_and(|last| *last >= step) {
            return Err(Problem::new(
                item.position(),
                format!(
                    "{path} must rise: {step} does not come after {}; {HINT}",
                    steps[steps.len() - 1]
                ),
            ));
        }
        steps.push(step);
    }
    if steps.last() != Some(&100) {
        return Err(Problem::new(
            value.position(),
            format!("{path} must end at 100 (the candidate takes all traffic last); {HINT}"),
        ));
    }
    Ok(steps)
}
