//! `strategy:` on an environment stage: canary steps and a shadow.

use std::time::Duration;

use super::{check, parse_ok};
use crate::spec::{Condition, MonitorSource, Op, StrategyKind};

#[test]
fn a_canary_reads_its_steps_pause_and_analysis() {
    let pipeline = parse_ok(
        r#"
        pipeline: p
        stages:
          deploy:
            environment: production
            commands: [./deploy.sh]
            strategy:
              canary:
                steps: [10, 50, 100]
                pause: 2m
                analysis:
                  scrape: {url: "http://127.0.0.1:9100/metrics", labels: {backend: candidate}}
                  every: 5s
                  rollback_when: {error_ratio: "> 0.05"}
                  failure_limit: 2
        "#,
    );
    let strategy = pipeline.stages[0].strategy.as_ref().unwrap();
    assert_eq!(strategy.kind, StrategyKind::Canary);
    assert_eq!(strategy.steps, [10, 50, 100]);
    assert_eq!(strategy.pause, Duration::from_secs(120));
    let analysis = strategy.analysis.as_ref().unwrap();
    assert_eq!(analysis.window, strategy.pause, "each pause is a window");
    assert_eq!(analysis.every, Duration::from_secs(5));
    assert_eq!(analysis.failure_limit, 2);
    assert_eq!(
        analysis.rollback_when["error_ratio"],
        Condition {
            op: Op::Gt,
            value: 0.05
        }
    );
    assert!(matches!(
        &analysis.source,
        MonitorSource::Scrape { labels, .. } if labels["backend"] == "candidate"
    ));
}

#[test]
fn a_shadow_is_mirrored_traffic_then_all_of_it() {
    let pipeline = parse_ok(
        r#"
        pipeline: p
        stages:
          deploy:
            environment: production
            commands: [./deploy.sh]
            strategy:
              shadow:
                for: 30s
                compare: {scrape: "http://127.0.0.1:9100/metrics", rollback_when: {disagreement: "> 0.1"}}
        "#,
    );
    let strategy = pipeline.stages[0].strategy.as_ref().unwrap();
    assert_eq!(strategy.kind, StrategyKind::Shadow);
    assert_eq!(strategy.steps, [0, 100]);
    assert_eq!(strategy.pause, Duration::from_secs(30));
    assert!(strategy.analysis.is_some());
}

#[test]
fn bad_strategies_say_what_to_change() {
    let stage = |body: &str| {
        format!(
            "pipeline: p\nstages:\n  deploy:\n    environment: production\n    commands: [x]\n    strategy: {body}\n"
        )
    };
    check(
        &stage("{canary: {steps: [10, 50]}}"),
        "kiln.yml:6:32: `steps` in `strategy.canary` of stage `deploy` must end at 100 (the candidate takes all traffic last); \
         a list of whole percentages from 1 to 100, rising and ending at 100, like [10, 50, 100]",
    );
    check(
        &stage("{canary: {steps: [50, 10, 100]}}"),
        "kiln.yml:6:37: `steps` in `strategy.canary` of stage `deploy` must rise: 10 does not come after 50; \
         a list of whole percentages from 1 to 100, rising and ending at 100, like [10, 50, 100]",
    );
    check(
        &stage("{canary: {steps: [0, 100]}}"),
        "kiln.yml:6:33: `steps` in `strategy.canary` of stage `deploy` must be a list of whole percentages from 1 to 100, \
         rising and ending at 100, like [10, 50, 100]; found the number `0`",
    );
    check(
        &stage("{canary: {pause: 1m}}"),
        "kiln.yml:6:24: `strategy.canary` of stage `deploy` has no `steps`; add e.g. `steps: [10, 50, 100]`",
    );
    check(
        &stage("{canary: {steps: [100]}, shadow: {}}"),
        "kiln.yml:6:15: `strategy` of stage `deploy` must have exactly one of `canary` or `shadow`",
    );
    check(
        &stage("{blue_green: {}}"),
        "kiln.yml:6:16: unknown key `blue_green` in `strategy` of stage `deploy`; expected one of: canary, shadow",
    );
    check(
        &stage("{shadow: {for: 1m}}"),
        "kiln.yml:6:24: `strategy.shadow` of stage `deploy` has no `compare`; a shadow is promoted only by rules, \
         e.g. `compare: {scrape: URL, rollback_when: {error_ratio: \"> 0.05\"}}`",
    );
    check(
        &stage(
            "{canary: {steps: [100], analysis: {scrape: \"http://x/metrics\", for: 1m, rollback_when: {e: \"> 1\"}}}}",
        ),
        "kiln.yml:6:78: unknown key `for` in `analysis` of stage `deploy`; expected one of: scrape, prometheus, every, \
         rollback_when, failure_limit, on_missing",
    );
    check(
        "pipeline: p\nstages:\n  deploy:\n    commands: [x]\n    strategy: {canary: {steps: [100]}}\n",
        "kiln.yml:5:15: stage `deploy` has a `strategy` but no `environment`; a strategy says how an environment stage's \
         release replaces the live one",
    );
}

#[test]
fn steps_read_with_the_current_one_in_brackets() {
    use crate::spec::Strategy;
    assert_eq!(
        Strategy::steps_text(&[10, 50, 100], 1),
        "10% → [50%] → 100%"
    );
    assert_eq!(Strategy::steps_text(&[0, 100], 0), "[shadow] → 100%");
    assert_eq!(Strategy::steps_text(&[25, 100], usize::MAX), "25% → 100%");
}
