//! Failure policy: `retries: {max, when}`, `allow_failure`, and the
//! pipeline's own `timeout`.

use std::time::Duration;

use super::{RetryWhen, check, parse_ok};

#[test]
fn retries_say_how_many_and_for_what() {
    let pipeline = parse_ok(
        "
        pipeline: policy
        timeout: 90m
        defaults:
          retries: { max: 2, when: [agent_lost, timeout] }
        stages:
          inherits: { commands: [make] }
          plain: { commands: [make], retries: 3 }
          flaky:
            commands: [make]
            allow_failure: true
            retries: { max: 1, when: [failed] }
        ",
    );
    assert_eq!(pipeline.timeout, Some(Duration::from_secs(90 * 60)));
    let [inherits, plain, flaky] = &pipeline.stages[..] else {
        panic!("{pipeline:#?}")
    };
    assert_eq!(inherits.retries, 2);
    assert!(inherits.retry_when.agent_lost && inherits.retry_when.timeout);
    assert!(!inherits.retry_when.infra_error && !inherits.retry_when.failed);
    assert_eq!(plain.retries, 3);
    assert_eq!(
        plain.retry_when,
        RetryWhen::default(),
        "a plain count retries for infrastructure causes only"
    );
    assert!(!plain.allow_failure);
    assert!(flaky.allow_failure);
    assert!(flaky.retry_when.failed && !flaky.retry_when.agent_lost);
    assert_eq!(
        parse_ok("pipeline: p\nstages:\n  a: { commands: [x] }\n").timeout,
        None
    );
}

#[test]
fn bad_policies_say_what_to_write() {
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], retries: { when: [timeout] } }
        ",
        "kiln.yml:3:39: `retries` in stage `build` needs `max:`, like \
         `retries: {max: 2, when: [agent_lost, timeout]}`",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], retries: { max: 1, when: [oom] } }
        ",
        "kiln.yml:3:56: `when` in `retries` in stage `build` lists causes from: \
         agent_lost, infra_error, timeout, failed; found the string `oom`",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], allow_failure: yes }
        ",
        "kiln.yml:3:45: `allow_failure` in stage `build` must be true or false; found the string `yes`",
    );
}

#[test]
fn retention_keeps_runs_or_days_and_says_what_is_wrong() {
    let pipeline = parse_ok(
        "
        pipeline: kept
        retention: { keep: { runs: 20, days: 30 } }
        stages:
          a: { commands: [x] }
        ",
    );
    assert_eq!(
        pipeline.retention,
        Some(super::Retention {
            runs: Some(20),
            days: Some(30)
        })
    );
    assert_eq!(
        parse_ok("pipeline: p\nstages:\n  a: { commands: [x] }\n").retention,
        None
    );
    check(
        "
        pipeline: kept
        retention: { keep: { runs: 0 } }
        stages:
          a: { commands: [x] }
        ",
        "kiln.yml:2:28: `runs` in `keep` of `retention` must be a whole number from 1 up; \
         found the number `0`",
    );
    check(
        "
        pipeline: kept
        retention: { keep: { weeks: 2 } }
        stages:
          a: { commands: [x] }
        ",
        "kiln.yml:2:22: unknown key `weeks` in `keep` of `retention`; expected one of: runs, days",
    );
    check(
        "
        pipeline: kept
        retention: { keep: {} }
        stages:
          a: { commands: [x] }
        ",
        "kiln.yml:2:12: `retention` keeps nothing in particular; say what to keep, like \
         `retention: {keep: {runs: 20, days: 30}}`",
    );
}
