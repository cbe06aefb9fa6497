//! `triggers:`: what each form becomes, its defaults, and every error.

use std::path::Path;
use std::time::Duration;

use super::{DEFAULT_DATA_EVERY, MAX_SCHEDULES, PushTrigger, Triggers, check, parse_ok};

const STAGES: &str = "stages:\n  build: { commands: [make] }\n";

/// Parses a file with these `triggers:` lines (indented under the key).
fn triggers(lines: &str) -> Triggers {
    parse_ok(&format!("pipeline: demo\ntriggers:\n{lines}\n{STAGES}")).triggers
}

/// Checks the error for these `triggers:` lines; line numbers count the
/// file, where the lines start on line 3.
#[track_caller]
fn check_triggers(lines: &str, expected: &str) {
    check(
        &format!("pipeline: demo\ntriggers:\n{lines}\n{STAGES}"),
        &format!("kiln.yml:{expected}"),
    );
}

#[test]
fn no_triggers_is_the_default() {
    let pipeline = parse_ok(&format!("pipeline: demo\n{STAGES}"));
    assert_eq!(pipeline.triggers, Triggers::default());
    assert_eq!(
        parse_ok(&format!("pipeline: demo\ntriggers:\n{STAGES}")).triggers,
        Triggers::default()
    );
    assert_eq!(triggers("  {}").push, None);
}

#[test]
fn the_design_example() {
    let parsed = triggers(
        "  push: { branches: [main, \"release/*\"], secret: WEBHOOK_SECRET }\n  schedule: \"0 3 * * *\"\n  data: { watch: /srv/data/raw, every: 1m, settle: 30s, into: data/raw }",
    );
    assert_eq!(
        parsed.push,
        Some(PushTrigger {
            branches: Some(vec!["main".to_owned(), "release/*".to_owned()]),
            secret: "WEBHOOK_SECRET".to_owned(),
        })
    );
    let expressions: Vec<&str> = parsed.schedule.iter().map(|s| s.expression()).collect();
    assert_eq!(expressions, ["0 3 * * *"]);
    let data = parsed.data.unwrap();
    assert_eq!(data.watch, Path::new("/srv/data/raw"));
    assert_eq!(data.every, Duration::from_secs(60));
    assert_eq!(data.settle, Duration::from_secs(30));
    assert_eq!(data.into, "data/raw");
}

#[test]
fn push_branches() {
    let push = triggers("  push: { branches: [main, \"release/*\"], secret: S }")
        .push
        .unwrap();
    assert!(push.accepts("main", "whatever"));
    assert!(push.accepts("release/2.0", "main"));
    assert!(!push.accepts("feature/x", "feature/x"));
    // Left out: only the branch the pipeline was registered from.
    let push = triggers("  push: { secret: S }").push.unwrap();
    assert_eq!(push.branches, None);
    assert!(push.accepts("dev", "dev"));
    assert!(!push.accepts("main", "dev"));
    // One string is a list of one; `*` is every branch.
    let push = triggers("  push: { branches: \"*\", secret: S }")
        .push
        .unwrap();
    assert_eq!(push.branches, Some(vec!["*".to_owned()]));
    assert!(push.accepts("any/thing", "main"));
}

#[test]
fn schedules() {
    let parsed = triggers("  schedule: [\"0 3 * * *\", \"*/30 9-17 * * MON-FRI\", \"@weekly\"]");
    assert_eq!(parsed.schedule.len(), 3);
    assert_eq!(parsed.schedule[1].expression(), "*/30 9-17 * * MON-FRI");
}

#[test]
fn data_defaults() {
    let data = triggers("  data: { watch: /srv/data/raw/ }").data.unwrap();
    assert_eq!(data.every, DEFAULT_DATA_EVERY);
    assert_eq!(data.settle, DEFAULT_DATA_EVERY, "settle defaults to every");
    assert_eq!(data.into, "data/raw");
    let data = triggers("  data: { watch: /mnt/x, every: 5s }")
        .data
        .unwrap();
    assert_eq!(
        (data.every, data.settle),
        (Duration::from_secs(5), Duration::from_secs(5))
    );
    assert_eq!(data.into, "data/x");
}

#[test]
fn unknown_keys_and_wrong_types() {
    check_triggers(
        "  pushh: { secret: S }",
        "3:3: unknown key `pushh` in `triggers`; expected one of: push, schedule, data, tag, \
         merge_request, secret (did you mean `push`?)",
    );
    check_triggers(
        "  push: { branch: [main], secret: S }",
        "3:11: unknown key `branch` in `push` of `triggers`; expected one of: branches, secret \
         (did you mean `branches`?)",
    );
    check_triggers(
        "  data: { watch: /srv/raw, interval: 1m }",
        "3:28: unknown key `interval` in `data` of `triggers`; expected one of: watch, every, \
         settle, into",
    );
    check_triggers(
        "  [push]",
        "3:3: `triggers` must be a mapping; found a list",
    );
    check_triggers(
        "  push: main",
        "3:9: `push` in `triggers` must be a mapping; found the string `main`",
    );
    check_triggers(
        "  push: { secret: S }\n  push: { secret: T }",
        "4:3: duplicate key `push` in `triggers`; remove one of the two",
    );
}

#[test]
fn push_errors() {
    check_triggers(
        "  push: { branches: [main] }",
        "3:9: `push` in `triggers` needs `secret: NAME`: the kiln secret that holds the \
         webhook's key, so that only the forge can start runs",
    );
    check_triggers(
        "  push: { secret: webhook }",
        "3:19: bad secret name `webhook` in `secret` in `push` of `triggers`; use upper-case \
         letters, digits and `_`, not starting with a digit, at most 64 characters, like \
         `HF_TOKEN`",
    );
    check_triggers(
        "  push: { branches: [], secret: S }",
        "3:21: `branches` in `push` of `triggers` is empty; list branches like `[main, \
         \"release/*\"]`, write `[\"*\"]` for every branch, or leave `branches` out to build \
         only the branch the pipeline is registered from",
    );
    check_triggers(
        "  push: { branches: [main, refs/heads/dev], secret: S }",
        "3:28: branch `refs/heads/dev` in `branches` in `push` of `triggers` is a full ref; \
         write the branch name, like `main`",
    );
    check_triggers(
        "  push: { branches: [\"a b\"], secret: S }",
        "3:22: branch `a b` in `branches` in `push` of `triggers` contains ` `, which git \
         refuses in branch names",
    );
    check_triggers(
        "  push: { branches: [main, main], secret: S }",
        "3:28: branch `main` is listed twice in `branches` in `push` of `triggers`; list it once",
    );
    check_triggers(
        "  push: { branches: [{a: b}], secret: S }",
        "3:22: `branches` in `push` of `triggers` must be a list of branch names or patterns, \
         like `[main, \"release/*\"]`; found a mapping",
    );
}

#[test]
fn schedule_errors() {
    let hint = "write five fields in UTC, minute hour day-of-month month day-of-week, like \"0 3 * \
                * *\"";
    check_triggers(
        "  schedule: \"0 3 * *\"",
        &format!(
            "3:13: bad cron expression `0 3 * *` in `schedule` in `triggers`: Invalid pattern: \
             Pattern must have 5 fields when seconds are disallowed; {hint}"
        ),
    );
    check_triggers(
        "  schedule:\n    - \"0 3 * * *\"\n    - \"0 0 3 * * *\"",
        &format!(
            "5:7: bad cron expression `0 0 3 * * *` in `schedule` in `triggers`: Invalid \
             pattern: Pattern must have 5 fields when seconds are disallowed; {hint}"
        ),
    );
    check_triggers(
        "  schedule: \"61 * * * *\"",
        &format!(
            "3:13: bad cron expression `61 * * * *` in `schedule` in `triggers`: Component \
             error: Number out of bounds; {hint}"
        ),
    );
    check_triggers(
        "  schedule: \"0 0 30 2 *\"",
        &format!(
            "3:13: bad cron expression `0 0 30 2 *` in `schedule` in `triggers`: it matches no \
             date (check the day of month against the month); {hint}"
        ),
    );
    let minutes = |n: usize| {
        (0..n)
            .map(|minute| format!("\"{minute} 3 * * *\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    assert_eq!(
        triggers(&format!("  schedule: [{}]", minutes(MAX_SCHEDULES)))
            .schedule
            .len(),
        20
    );
    check_triggers(
        &format!("  schedule: [{}]", minutes(MAX_SCHEDULES + 1)),
        "3:284: `schedule` in `triggers` lists 21 cron expressions, more than the limit of 20; \
         combine them (`0 3,15 * * *` is 03:00 and 15:00)",
    );
    check_triggers(
        "  schedule: []",
        "3:13: `schedule` in `triggers` is empty; write a cron expression like \"0 3 * * *\"",
    );
    check_triggers(
        "  schedule: 5",
        "3:13: `schedule` in `triggers` must be a cron expression like \"0 3 * * *\", or a list \
         of them; found the number `5`",
    );
    check_triggers(
        "  schedule: [\"@daily\", \"@daily\"]",
        "3:24: cron expression `@daily` is listed twice in `schedule` in `triggers`; list it once",
    );
}

#[test]
fn data_errors() {
    let absolute = "write an absolute directory like `/srv/data/raw`";
    check_triggers(
        "  data: { every: 1m }",
        "3:9: `data` in `triggers` needs `watch: DIRECTORY`, an absolute path on the \
         coordinator's host",
    );
    for (watch, why) in [
        ("data/raw", "is not absolute"),
        ("/srv/../etc", "contains `..`"),
        ("/", "is the root directory"),
    ] {
        check_triggers(
            &format!("  data: {{ watch: \"{watch}\" }}"),
            &format!("3:18: `watch` in `data` of `triggers` `{watch}` {why}; {absolute}"),
        );
    }
    check_triggers(
        "  data: { watch: [a] }",
        "3:18: `watch` in `data` of `triggers` must be an absolute directory on the \
         coordinator's host, like `/srv/data/raw`; found a list",
    );
    check_triggers(
        "  data: { watch: /srv/raw, every: 500ms }",
        "3:35: `every` in `data` of `triggers` must be at least 1s; polling a directory more \
         often only adds load",
    );
    check_triggers(
        "  data: { watch: /srv/raw, settle: 0s }",
        "3:36: `settle` in `data` of `triggers` must be longer than zero; use a number with a \
         unit: 500ms, 30s, 15m, 2h",
    );
    check_triggers(
        "  data: { watch: /srv/raw, every: soon }",
        "3:35: bad duration `soon` for `every` in `data` of `triggers`; use a number with a \
         unit: 500ms, 30s, 15m, 2h",
    );
    let into = crate::archive::check_artifact_path("../raw").unwrap_err();
    check_triggers(
        "  data: { watch: /srv/raw, into: ../raw }",
        &format!("3:34: `into` path `../raw` {into}"),
    );
    let into = crate::archive::check_artifact_path("/abs").unwrap_err();
    check_triggers(
        "  data: { watch: /srv/raw, into: /abs }",
        &format!("3:34: `into` path `/abs` {into}"),
    );
    check_triggers(
        "  data: { watch: /srv/.., into: x }",
        &format!("3:18: `watch` in `data` of `triggers` `/srv/..` contains `..`; {absolute}"),
    );
}

#[test]
fn tags_merge_requests_and_one_secret_for_all() {
    let pipeline = parse_ok(
        "
        pipeline: p
        on:
          push: { branches: [main] }
          tag: [\"v*\"]
          merge_request: { branches: [main] }
          secret: HOOK
        stages: { a: { commands: [x] } }
        ",
    );
    let triggers = &pipeline.triggers;
    assert_eq!(triggers.webhook_secret(), Some("HOOK"));
    assert_eq!(triggers.push.as_ref().unwrap().secret, "HOOK");
    assert_eq!(triggers.tag.as_deref(), Some(&["v*".to_owned()][..]));
    let requests = triggers.merge_request.as_ref().unwrap();
    assert!(requests.accepts("main") && !requests.accepts("dev"));
    let every = parse_ok(
        "
        pipeline: p
        triggers: { merge_request: true, secret: HOOK }
        stages: { a: { commands: [x] } }
        ",
    );
    assert!(
        every
            .triggers
            .merge_request
            .as_ref()
            .unwrap()
            .accepts("any")
    );
    check_triggers(
        "  tag: [\"v*\"]",
        "3:3: `tag` and `merge_request` in `triggers` need `secret: NAME` in `triggers`: the kiln \
         secret that holds the webhook's key, so that only the forge can start runs",
    );
}
