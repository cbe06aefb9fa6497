//! Gate decisions and the metrics files they read: pure functions of
//! the run's parsed metrics and the champion's.

use std::collections::BTreeMap;

use kiln_common::spec::{Gate, OnMissing};

use crate::store::{GateCheck, GateDecision};

/// Evaluates a gate: thresholds, then the champion comparison.
pub(super) fn decide(
    gate: &Gate,
    metrics: &BTreeMap<String, Option<f64>>,
    champion: Option<(&str, &BTreeMap<String, Option<f64>>)>,
) -> GateDecision {
    let mut checks = Vec::new();
    for (metric, condition) in &gate.require {
        let value = metrics
            .get(metric)
            .copied()
            .flatten()
            .filter(|v| !v.is_nan());
        let (passed, by_missing) = match value {
            Some(value) => (condition.holds(value), None),
            None => missing(gate.on_missing),
        };
        checks.push(GateCheck {
            metric: metric.clone(),
            rule: condition.to_string(),
            value,
            champion: None,
            passed,
            decided_by_on_missing: by_missing,
        });
    }
    let mut notes = Vec::new();
    match (gate.compare_to.as_deref(), champion) {
        (Some(env), None) => notes.push(format!(
            "no champion in `{env}` yet: first deployment, gated on thresholds alone"
        )),
        (Some(env), Some((_, champion_metrics))) => {
            for (metric, regression) in &gate.max_regression {
                let value = metrics
                    .get(metric)
                    .copied()
                    .flatten()
                    .filter(|v| !v.is_nan());
                let best = champion_metrics
                    .get(metric)
                    .copied()
                    .flatten()
                    .filter(|v| !v.is_nan());
                let allowed = |champion: f64| {
                    if regression.relative {
                        champion * regression.amount
                    } else {
                        regression.amount
                    }
                };
                let rule = if regression.relative {
                    format!("drop <= {}% vs {env}", regression.amount * 100.0)
                } else {
                    format!("drop <= {} vs {env}", regression.amount)
                };
                let (passed, by_missing) = match (value, best) {
                    (Some(value), Some(best)) => (value >= best - allowed(best), None),
                    _ => missing(gate.on_missing),
                };
                checks.push(GateCheck {
                    metric: metric.clone(),
                    rule,
                    value,
                    champion: best,
                    passed,
                    decided_by_on_missing: by_missing,
                });
            }
        }
        (None, _) => {}
    }
    let failed: Vec<String> = checks
        .iter()
        .filter(|check| !check.passed)
        .map(|check| match (check.value, &check.decided_by_on_missing) {
            (None, _) => format!(
                "{} missing or NaN for `{}` (on_missing: fail decided)",
                check.metric, check.rule
            ),
            (Some(value), _) => match check.champion {
                Some(champion) => format!(
                    "{} {value:.4} vs champion {champion:.4} ({})",
                    check.metric, check.rule
                ),
                None => format!("{} {value:.4} not {}", check.metric, check.rule),
            },
        })
        .collect();
    let passed = failed.is_empty();
    let mut summary = if passed {
        format!("gate passed: {} checks", checks.len())
    } else {
        format!("gate failed: {}", failed.join("; "))
    };
    let passed_by_missing: Vec<&str> = checks
        .iter()
        .filter(|check| check.passed && check.decided_by_on_missing.is_some())
        .map(|check| check.metric.as_str())
        .collect();
    if !passed_by_missing.is_empty() {
        summary.push_str(&format!(
            " ({} missing, passed by on_missing: pass)",
            passed_by_missing.join(", ")
        ));
    }
    for note in notes {
        summary.push_str(&format!("; {note}"));
    }
    GateDecision {
        passed,
        checks,
        summary,
        decided_ms: 0,
        decided_by: None,
        selection: None,
    }
}

/// The winner of a best-of gate among `candidates`: the best value of the
/// metric (highest or lowest); missing and NaN values never win, and the
/// first of equal values does.
pub(super) fn select_winner(candidates: &[(String, Option<f64>)], highest: bool) -> Option<String> {
    candidates
        .iter()
        .filter_map(|(name, value)| Some((name, value.filter(|v| !v.is_nan())?)))
        .reduce(|best, next| {
            let better = if highest {
                next.1 > best.1
            } else {
                next.1 < best.1
            };
            if better { next } else { best }
        })
        .map(|(name, _)| name.clone())
}

fn missing(policy: OnMissing) -> (bool, Option<String>) {
    match policy {
        OnMissing::Fail => (false, Some("fail".into())),
        OnMissing::Pass => (true, Some("pass".into())),
    }
}

/// A flat JSON object of numbers. Python's `json` writes NaN as a bare
/// `NaN`, which is not JSON; it is accepted (and kept as NaN) so a gate can
/// apply `on_missing` to it.
pub(crate) fn parse_metrics(text: &str) -> Result<BTreeMap<String, Option<f64>>, String> {
    let cleaned = replace_bare_nan(text);
    let value: serde_json::Value = serde_json::from_str(&cleaned).map_err(|error| {
        format!("not valid JSON ({error}); write a flat object like {{\"accuracy\": 0.94}}")
    })?;
    let object = value
        .as_object()
        .ok_or_else(|| "must be a flat JSON object like {\"accuracy\": 0.94}".to_owned())?;
    object
        .iter()
        .map(|(name, value)| match value {
            serde_json::Value::Number(number) => Ok((name.clone(), number.as_f64())),
            serde_json::Value::Null => Ok((name.clone(), None)),
            other => Err(format!(
                "`{name}` is {other}, not a number; metrics must be a flat object of numbers"
            )),
        })
        .collect()
}

/// Replaces `NaN` tokens outside strings with `null`.
fn replace_bare_nan(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string && rest.starts_with("NaN") {
            out.push_str("null");
            rest = &rest[3..];
            continue;
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_common::spec::{Approval, Condition, MaxRegression, Op};

    fn metrics(pairs: &[(&str, Option<f64>)]) -> BTreeMap<String, Option<f64>> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn metrics_files_are_flat_numbers_with_nan_allowed() {
        let parsed = parse_metrics(r#"{"accuracy": 0.94, "recall": NaN, "note_NaN": 1}"#).unwrap();
        assert_eq!(
            parsed,
            metrics(&[
                ("accuracy", Some(0.94)),
                ("note_NaN", Some(1.0)),
                ("recall", None)
            ])
        );
        assert!(
            parse_metrics(r#"{"a": {"b": 1}}"#)
                .unwrap_err()
                .contains("`a`")
        );
        assert!(
            parse_metrics("[1, 2]")
                .unwrap_err()
                .contains("flat JSON object")
        );
        assert!(parse_metrics("{").unwrap_err().contains("not valid JSON"));
    }

    fn gate(on_missing: OnMissing) -> Gate {
        Gate {
            require: [(
                "recall".to_string(),
                Condition {
                    op: Op::Ge,
                    value: 0.5,
                },
            )]
            .into(),
            compare_to: Some("production".into()),
            max_regression: [(
                "recall".to_string(),
                MaxRegression {
                    amount: 0.1,
                    relative: true,
                },
            )]
            .into(),
            on_missing,
            approval: Approval::Auto,
            select: None,
        }
    }

    #[test]
    fn thresholds_champion_and_missing_values() {
        let first = decide(
            &gate(OnMissing::Fail),
            &metrics(&[("recall", Some(0.6))]),
            None,
        );
        assert!(first.passed);
        assert!(
            first.summary.contains("first deployment"),
            "{}",
            first.summary
        );

        let champion = metrics(&[("recall", Some(0.8))]);
        let regressed = decide(
            &gate(OnMissing::Fail),
            &metrics(&[("recall", Some(0.6))]),
            Some(("production", &champion)),
        );
        assert!(!regressed.passed, "0.6 is more than 10% below 0.8");
        assert!(
            regressed.summary.contains("vs champion 0.8000"),
            "{}",
            regressed.summary
        );
        let close = decide(
            &gate(OnMissing::Fail),
            &metrics(&[("recall", Some(0.75))]),
            Some(("production", &champion)),
        );
        assert!(close.passed, "{}", close.summary);

        let nan = decide(&gate(OnMissing::Fail), &metrics(&[("recall", None)]), None);
        assert!(!nan.passed);
        assert!(
            nan.summary.contains("on_missing: fail decided"),
            "{}",
            nan.summary
        );
        let lenient = decide(&gate(OnMissing::Pass), &metrics(&[]), None);
        assert!(lenient.passed);
        assert!(
            lenient.summary.contains("passed by on_missing: pass"),
            "{}",
            lenient.summary
        );
    }
}
