//! Every error `parse` reports, with the node it points at.

use super::check;

#[test]
fn yaml_syntax() {
    check(
        "
        pipeline: demo
        stages:
          build:
            commands: [make
        ",
        "kiln.yml:5:1: invalid yaml: while parsing a flow sequence, expected ',' or ']'; \
         fix the syntax here (indentation, quotes, brackets)",
    );
    check(
        "
        pipeline: demo
          stages: {}
        ",
        "kiln.yml:2:9: invalid yaml: mapping values are not allowed in this context; \
         fix the syntax here (indentation, quotes, brackets)",
    );
    check(
        "
        pipeline: \"demo
        ",
        "kiln.yml:1:11: invalid yaml: while scanning a quoted scalar, found unexpected end of \
         stream; fix the syntax here (indentation, quotes, brackets)",
    );
    check(
        "
        pipeline: demo
        stages:
          build: *nowhere
        ",
        "kiln.yml:3:10: invalid yaml: while parsing node, found unknown anchor; \
         fix the syntax here (indentation, quotes, brackets)",
    );
}

#[test]
fn empty_file_and_wrong_top_level() {
    let empty = "the file is empty; a pipeline needs at least `pipeline: NAME` and `stages:`";
    check("", &format!("kiln.yml:1:1: {empty}"));
    check("\n\n   \n", &format!("kiln.yml:1:1: {empty}"));
    check("# just a comment\n", &format!("kiln.yml:1:1: {empty}"));
    check("---\n", &format!("kiln.yml:1:1: {empty}"));
    check("~\n", &format!("kiln.yml:1:1: {empty}"));
    check(
        "
        - pipeline: demo
        ",
        "kiln.yml:1:1: the top level must be a mapping with `pipeline:` and `stages:`; \
         found a list",
    );
    check(
        "
        # a comment first
        pipeline
        ",
        "kiln.yml:2:1: the top level must be a mapping with `pipeline:` and `stages:`; \
         found the string `pipeline`",
    );
    check(
        "
        pipeline: demo
        stages: { build: { commands: [make] } }
        ---
        pipeline: other
        ",
        "kiln.yml:3:1: the file holds more than one yaml document; keep only the first one \
         (remove this `---` and what follows)",
    );
}

#[test]
fn unknown_keys() {
    check(
        "
        pipeline: demo
        stage:
          build: { commands: [make] }
        ",
        "kiln.yml:2:1: unknown key `stage` at the top level; expected one of: pipeline, \
         defaults, triggers, on, timeout, params, env, stages, retention (did you mean `stages`?)",
    );
    check(
        "
        pipeline: demo
        trigger: { push: { branches: [main] } }
        ",
        "kiln.yml:2:1: unknown key `trigger` at the top level; expected one of: pipeline, \
         defaults, triggers, on, timeout, params, env, stages, retention (did you mean `triggers`?)",
    );
    check(
        "
        pipeline: demo
        defaults:
          timeout: 15m
          imgae: python:3.12
        ",
        "kiln.yml:4:3: unknown key `imgae` in `defaults`; expected one of: image, timeout, \
         retries, pull, resources, network (did you mean `image`?)",
    );
    check(
        "
        pipeline: demo
        stages:
          build:
            comands: [make]
        ",
        "kiln.yml:4:5: unknown key `comands` in stage `build`; expected one of: needs, \
         commands, env, secrets, timeout, retries, allow_failure, matrix, image, agent, executor, \
         pull, \
         resources, network, \
         artifacts, metrics, environment, endpoint, model, gate, monitor, strategy, services, cache (did you mean `commands`?)",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make], Needs: [] }
        ",
        "kiln.yml:3:30: unknown key `Needs` in stage `build`; expected one of: needs, \
         commands, env, secrets, timeout, retries, allow_failure, matrix, image, agent, executor, \
         pull, \
         resources, network, \
         artifacts, metrics, environment, endpoint, model, gate, monitor, strategy, services, cache (did you mean `needs`?)",
    );
    check(
        "
        pipeline: demo
        stages:
          deploy:
            commands: [./deploy.sh]
            agent: { label: { role: deploy } }
        ",
        "kiln.yml:5:14: unknown key `label` in `agent` of stage `deploy`; expected one of: \
         labels (did you mean `labels`?)",
    );
    check(
        "
        pipeline: demo
        [a]: b
        ",
        "kiln.yml:2:1: keys at the top level must be plain words; found a list",
    );
}

#[test]
fn wrong_types() {
    let cases = [
        (
            "commands: 42",
            "4:15: `commands` in stage `build` must be a list of strings or a single string; found the number `42`",
        ),
        (
            "commands: {make: all}",
            "4:15: `commands` in stage `build` must be a list of strings or a single string; found a mapping",
        ),
        (
            "commands: [make, true]",
            "4:22: `commands` in stage `build` must be strings (quote a command that YAML reads as a number or boolean); found the boolean `true`",
        ),
        (
            "commands: [echo a: b]",
            "4:16: `commands` in stage `build` must be strings (quote a command that contains `: `); found a mapping",
        ),
        (
            "needs: prepare",
            "4:12: `needs` in stage `build` must be a list of stage names, like `needs: [build]`; found the string `prepare`",
        ),
        (
            "needs: [[prepare]]",
            "4:13: `needs` in stage `build` must be a list of stage names, like `needs: [build]`; found a list",
        ),
        (
            "env: [A=1]",
            "4:10: `env` in stage `build` must be a mapping of variable names to values; found a list",
        ),
        (
            "env: { A: [1] }",
            "4:15: `A` in `env` in stage `build` must be a string, number or boolean; found a list",
        ),
        (
            "retries: three",
            "4:14: `retries` in stage `build` must be a whole number from 0 to 10; found the string `three`",
        ),
        (
            "retries: \"3\"",
            "4:14: `retries` in stage `build` must be a whole number from 0 to 10; found the string `3`",
        ),
        (
            "retries: 11",
            "4:14: `retries` in stage `build` must be a whole number from 0 to 10; found the number `11`",
        ),
        (
            "retries: -1",
            "4:14: `retries` in stage `build` must be a whole number from 0 to 10; found the number `-1`",
        ),
        (
            "retries: 1.5",
            "4:14: `retries` in stage `build` must be a whole number from 0 to 10; found the number `1.5`",
        ),
        (
            "image: 3.12",
            "4:12: `image` in stage `build` must be a container image such as `python:3.12`; found the number `3.12`",
        ),
        (
            "image: \"\"",
            "4:12: `image` in stage `build` must be a container image such as `python:3.12`; found an empty string",
        ),
        (
            "image:",
            "4:10: `image` in stage `build` must be a container image such as `python:3.12`; found nothing",
        ),
        (
            "timeout: [1m]",
            "4:14: `timeout` in stage `build` must be a duration; use a number with a unit: 500ms, 30s, 15m, 2h; found a list",
        ),
        (
            "agent: [deploy]",
            "4:12: `agent` in stage `build` must be a mapping; found a list",
        ),
        (
            "agent: { labels: [role=deploy] }",
            "4:22: `labels` in `agent` of stage `build` must be a mapping of label names to values; found a list",
        ),
        (
            "agent: { labels: { role: [a] } }",
            "4:30: `labels` in `agent` of stage `build` must be a mapping of label names to strings; found a list",
        ),
    ];
    for (line, expected) in cases {
        let yaml = format!("pipeline: demo\nstages:\n  build:\n    {line}\n    commands: [make]\n");
        // `commands` cases set the key twice; keep only the case's own.
        let yaml = if line.starts_with("commands") {
            yaml.replace("    commands: [make]\n", "")
        } else {
            yaml
        };
        check(&yaml, &format!("kiln.yml:{expected}"));
    }
    check(
        "
        pipeline: demo
        defaults: [image]
        ",
        "kiln.yml:2:11: `defaults` must be a mapping; found a list",
    );
    check(
        "
        pipeline: demo
        stages:
          - build
        ",
        "kiln.yml:3:3: `stages` must be a mapping from stage name to stage; found a list",
    );
    check(
        "
        pipeline: demo
        stages:
          build: make
        ",
        "kiln.yml:3:10: stage `build` must be a mapping; found the string `make`",
    );
}

#[test]
fn names() {
    let rules = "use lowercase letters, digits, `.`, `_` and `-`, starting with a letter or digit, \
                 at most 64 characters";
    check(
        "
        pipeline: Customer Behavior
        ",
        &format!("kiln.yml:1:11: bad pipeline name `Customer Behavior`; {rules}"),
    );
    check(
        "
        pipeline: [demo]
        ",
        "kiln.yml:1:11: `pipeline` must be a name like `my-pipeline`; found a list",
    );
    check(
        "
        pipeline:
        stages: {}
        ",
        "kiln.yml:1:9: `pipeline` must be a name like `my-pipeline`; found nothing",
    );
    check(
        "
        pipeline: demo
        stages:
          Build: { commands: [make] }
        ",
        &format!("kiln.yml:3:3: bad stage name `Build`; {rules}"),
    );
    check(
        "
        pipeline: demo
        stages:
          -build: { commands: [make] }
        ",
        &format!("kiln.yml:3:3: bad stage name `-build`; {rules}"),
    );
    let long = "a".repeat(65);
    check(
        &format!("pipeline: {long}\n"),
        &format!("kiln.yml:1:11: bad pipeline name `{long}`; {rules}"),
    );
    check(
        "
        pipeline: demo
        stages:
          ~: { commands: [make] }
        ",
        "kiln.yml:3:3: stage names must be names like `build`; found nothing",
    );
    check(
        "
        pipeline: demo
        stages:
          build:
            commands: [make]
            env: { 1A: x }
        ",
        "kiln.yml:5:12: bad variable name `1A` in `env` in stage `build`; use letters, digits \
         and `_`, not starting with a digit",
    );
    check(
        "
        pipeline: demo
        stages:
          build:
            commands: [make]
            env: { MY-VAR: x }
        ",
        "kiln.yml:5:12: bad variable name `MY-VAR` in `env` in stage `build`; use letters, \
         digits and `_`, not starting with a digit",
    );
    check(
        "
        pipeline: demo
        stages:
          build:
            commands: [make]
            env: { A: }
        ",
        "kiln.yml:5:13: `A` in `env` in stage `build` has no value; write `A: \"\"` for an \
         empty one",
    );
    check(
        "
        pipeline: demo
        stages:
          deploy:
            commands: [make]
            agent: { labels: { role: \"a,b\" } }
        ",
        "kiln.yml:5:30: bad label value `a,b` in `labels` in `agent` of stage `deploy`; use \
         letters, digits, `.`, `_` and `-`, starting with a letter or digit, at most 64 \
         characters",
    );
    check(
        "
        pipeline: demo
        stages:
          deploy:
            commands: [make]
            agent: { labels: { \"a=b\": c } }
        ",
        "kiln.yml:5:24: bad label name `a=b` in `labels` in `agent` of stage `deploy`; use \
         lowercase letters, digits, `.`, `_` and `-`, starting with a letter or digit, at most \
         64 characters",
    );
}

#[test]
fn missing_pipeline_or_stages() {
    check(
        "
        # no name
        stages:
          build: { commands: [make] }
        ",
        "kiln.yml:2:1: the file has no `pipeline` name; add `pipeline: NAME` at the top",
    );
    let no_stages = "the pipeline has no stages; add at least one under `stages:`";
    check("pipeline: demo\n", &format!("kiln.yml:1:1: {no_stages}"));
    check(
        "pipeline: demo\nstages: {}\n",
        &format!("kiln.yml:2:9: {no_stages}"),
    );
    check(
        "pipeline: demo\nstages:\n",
        &format!("kiln.yml:2:7: {no_stages}"),
    );
}

#[test]
fn no_commands() {
    check(
        "
        pipeline: demo
        stages:
          build:
            image: rust:1
        ",
        "kiln.yml:3:3: stage `build` has no commands; add `commands: [...]`",
    );
    check(
        "
        pipeline: demo
        stages:
          build:
          test: { commands: [make test] }
        ",
        "kiln.yml:3:3: stage `build` has no commands; add `commands: [...]`",
    );
    check(
        "
        pipeline: demo
        stages:
          build: {}
        ",
        "kiln.yml:3:3: stage `build` has no commands; add `commands: [...]`",
    );
    check(
        "
        pipeline: demo
        stages:
          build:
            commands: []
        ",
        "kiln.yml:4:15: `commands` in stage `build` is empty; list at least one command, \
         like `commands: [make test]`",
    );
    check(
        "
        pipeline: demo
        stages:
          build:
            commands:
              - make
              - '  '
        ",
        "kiln.yml:6:9: empty command in `commands` in stage `build`; remove it or write the \
         command",
    );
    check(
        "
        pipeline: demo
        stages:
          build:
            commands:
              - make
              -
              - test
        ",
        "kiln.yml:6:8: empty command in `commands` in stage `build`; remove it or write the \
         command",
    );
}

#[test]
fn duplicates() {
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make] }
          test: { commands: [make test] }
          build: { commands: [make again] }
        ",
        "kiln.yml:5:3: duplicate stage `build`; stage names must be unique, rename or remove \
         this one",
    );
    // Quoting does not make a different name.
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make] }
          \"build\": { commands: [make] }
        ",
        "kiln.yml:4:3: duplicate stage `build`; stage names must be unique, rename or remove \
         this one",
    );
    check(
        "
        pipeline: demo
        stages:
          build: { commands: [make] }
        pipeline: other
        ",
        "kiln.yml:4:1: duplicate key `pipeline` at the top level; remove one of the two",
    );
    check(
        "
        pipeline: demo
        defaults:
          retries: 1
          retries: 2
        ",
        "kiln.yml:4:3: duplicate key `retries` in `defaults`; remove one of the two",
    );
    check(
        "
        pipeline: demo
        stages:
          build:
            commands: [make]
            timeout: 1m
            commands: [make all]
        ",
        "kiln.yml:6:5: duplicate key `commands` in stage `build`; remove one of the two",
    );
    check(
        "
        pipeline: demo
        stages:
          build:
            commands: [make]
            env:
              MODE: fast
              MODE: slow
        ",
        "kiln.yml:7:7: `MODE` is set twice in `env` in stage `build`; remove one",
    );
    check(
        "
        pipeline: demo
        stages:
          deploy:
            commands: [make]
            agent: { labels: { role: a, role: b } }
        ",
        "kiln.yml:5:33: label `role` appears twice in `labels` in `agent` of stage `deploy`; \
         remove one",
    );
    check(
        "
        pipeline: demo
        stages:
          a: { commands: [make] }
          b: { commands: [make], needs: [a, a] }
        ",
        "kiln.yml:4:37: stage `b` lists `a` twice in `needs`; remove one",
    );
}

#[test]
fn unknown_needs() {
    check(
        "
        pipeline: demo
        stages:
          train: { commands: [make] }
          test:
            needs: [trian]
            commands: [make]
        ",
        "kiln.yml:5:13: stage `test` needs `trian`, which is not a stage of this pipeline; \
         name one of the stages under `stages:` (did you mean `train`?)",
    );
    check(
        "
        pipeline: demo
        stages:
          train: { commands: [make] }
          test:
            needs:
              - train
              - lint
            commands: [make]
        ",
        "kiln.yml:7:9: stage `test` needs `lint`, which is not a stage of this pipeline; \
         name one of the stages under `stages:`",
    );
    check(
        "
        pipeline: demo
        stages:
          build:
            needs: [build]
            commands: [make]
        ",
        "kiln.yml:4:13: stage `build` needs itself; remove `build` from its `needs`",
    );
}

#[test]
fn cycles() {
    check(
        "
        pipeline: demo
        stages:
          a: { needs: [b], commands: [make] }
          b: { needs: [c], commands: [make] }
          c: { needs: [a], commands: [make] }
        ",
        "kiln.yml:3:3: cycle in `needs`: a -> b -> c -> a; remove one of these dependencies",
    );
    // The search enters the cycle at `c` (through `x`); the message still
    // starts at the cycle's first stage in the file.
    check(
        "
        pipeline: demo
        stages:
          x: { needs: [c], commands: [make] }
          a: { needs: [b], commands: [make] }
          b: { needs: [c], commands: [make] }
          c: { needs: [a], commands: [make] }
        ",
        "kiln.yml:4:3: cycle in `needs`: a -> b -> c -> a; remove one of these dependencies",
    );
    check(
        "
        pipeline: demo
        stages:
          ok: { commands: [make] }
          b: { needs: [ok, a], commands: [make] }
          a: { needs: [b], commands: [make] }
        ",
        "kiln.yml:4:3: cycle in `needs`: b -> a -> b; remove one of these dependencies",
    );
}

#[test]
fn bad_durations() {
    let hint = "use a number with a unit: 500ms, 30s, 15m, 2h";
    for (timeout, column, expected) in [
        (
            "15x",
            14,
            format!("bad duration `15x` for `timeout` in stage `build`; {hint}"),
        ),
        (
            "30",
            14,
            format!("bad duration `30` for `timeout` in stage `build`; {hint}"),
        ),
        (
            "1.5h",
            14,
            format!("bad duration `1.5h` for `timeout` in stage `build`; {hint}"),
        ),
        (
            "30m1h",
            14,
            format!("bad duration `30m1h` for `timeout` in stage `build`; {hint}"),
        ),
        (
            "0s",
            14,
            format!("`timeout` in stage `build` must be longer than zero; {hint}"),
        ),
        (
            "",
            12,
            format!("`timeout` in stage `build` must be a duration; {hint}; found nothing"),
        ),
    ] {
        check(
            &format!(
                "pipeline: demo\nstages:\n  build:\n    timeout: {timeout}\n    commands: [make]\n"
            ),
            &format!("kiln.yml:4:{column}: {expected}"),
        );
    }
    check(
        "
        pipeline: demo
        defaults:
          timeout: 15 minutes
        ",
        "kiln.yml:3:12: bad duration `15 minutes` for `timeout` in `defaults`; use a number with \
         a unit: 500ms, 30s, 15m, 2h",
    );
}
