//! The input limits: each is checked at its boundary, allowed exactly at
//! the limit and refused one past it, with a message that gives both.

use super::{
    FILE, MAX_COMMAND_BYTES, MAX_COMMANDS, MAX_FILE_BYTES, MAX_STAGES, check, parse, parse_ok,
};

const ONE_STAGE: &str = "pipeline: demo\nstages:\n  build: { commands: [make] }\n";

#[test]
fn file_size() {
    // Padding with a comment keeps the file valid, so only its size matters.
    let padded = |size: usize| {
        let comment_len = size - ONE_STAGE.len() - "#\n".len();
        format!("{ONE_STAGE}#{}\n", "x".repeat(comment_len))
    };
    let at_limit = padded(MAX_FILE_BYTES);
    assert_eq!(at_limit.len(), MAX_FILE_BYTES);
    assert!(parse(FILE, &at_limit).is_ok());
    let over = padded(MAX_FILE_BYTES + 1);
    assert_eq!(
        parse(FILE, &over).unwrap_err().to_string(),
        "kiln.yml:1:1: the file is 1048577 bytes, more than the limit of 1048576 bytes (1 MiB); \
         a pipeline file holds stages, not data: move large content into the repository"
    );
    // Checked before parsing: broken YAML past the limit gets the size error.
    let broken = format!("[{}", "x".repeat(MAX_FILE_BYTES));
    assert!(
        parse(FILE, &broken)
            .unwrap_err()
            .message
            .starts_with("the file is 1048577 bytes")
    );
}

fn stages(n: usize) -> String {
    let mut text = String::from("pipeline: demo\nstages:\n");
    for idx in 0..n {
        text.push_str(&format!("  s{idx}: {{ commands: [make] }}\n"));
    }
    text
}

#[test]
fn stage_count() {
    assert_eq!(parse_ok(&stages(MAX_STAGES)).stages.len(), MAX_STAGES);
    // Points at the first stage past the limit (line 2 + 501).
    check(
        &stages(MAX_STAGES + 1),
        "kiln.yml:503:3: the pipeline has 501 stages, more than the limit of 500; split it into \
         several pipelines",
    );
}

#[test]
fn command_count_and_size() {
    let with_commands = |commands: &[String]| {
        let list = commands
            .iter()
            .map(|command| format!("      - {command}\n"))
            .collect::<String>();
        format!("pipeline: demo\nstages:\n  build:\n    commands:\n{list}")
    };
    let many = vec!["make".to_owned(); MAX_COMMANDS];
    assert_eq!(
        parse_ok(&with_commands(&many)).stages[0].commands.len(),
        100
    );
    let too_many = vec!["make".to_owned(); MAX_COMMANDS + 1];
    check(
        &with_commands(&too_many),
        "kiln.yml:105:9: `commands` in stage `build` has 101 commands, more than the limit of \
         100; move them into a script in the repository and run that",
    );

    let long = format!("echo {}", "x".repeat(MAX_COMMAND_BYTES - 5));
    assert_eq!(long.len(), MAX_COMMAND_BYTES);
    parse_ok(&with_commands(&["make".to_owned(), long.clone()]));
    check(
        &with_commands(&["make".to_owned(), format!("{long}x")]),
        "kiln.yml:6:9: a command in `commands` in stage `build` is 65537 bytes, more than the \
         limit of 65536 bytes (64 KiB); move it into a script in the repository and run that",
    );
}

#[test]
fn label_names_and_values() {
    let name_rule = "use lowercase letters, digits, `.`, `_` and `-`, starting with a letter or \
                     digit, at most 64 characters";
    let value_rule = "use letters, digits, `.`, `_` and `-`, starting with a letter or digit, at \
                      most 64 characters";
    let stage = |labels: &str| {
        format!(
            "pipeline: demo\nstages:\n  deploy:\n    commands: [make]\n    agent: {{ labels: {labels} }}\n"
        )
    };
    let ok = parse_ok(&stage("{ gpu: A100, cuda.version: 12.4, zone_a: eu-1 }"));
    assert_eq!(ok.stages[0].agent_labels["cuda.version"], "12.4");
    for (labels, column, message) in [
        (
            "{ Role: deploy }",
            24,
            format!("bad label name `Role` in `labels` in `agent` of stage `deploy`; {name_rule}"),
        ),
        (
            "{ \"a=b\": c }",
            24,
            format!("bad label name `a=b` in `labels` in `agent` of stage `deploy`; {name_rule}"),
        ),
        (
            "{ role: \"a,b\" }",
            30,
            format!("bad label value `a,b` in `labels` in `agent` of stage `deploy`; {value_rule}"),
        ),
        (
            "{ role: \" x\" }",
            30,
            format!("bad label value ` x` in `labels` in `agent` of stage `deploy`; {value_rule}"),
        ),
        (
            "{ role: \"\" }",
            30,
            format!("bad label value `` in `labels` in `agent` of stage `deploy`; {value_rule}"),
        ),
    ] {
        check(&stage(labels), &format!("kiln.yml:5:{column}: {message}"));
    }
    let long = "a".repeat(65);
    check(
        &stage(&format!("{{ {long}: x }}")),
        &format!(
            "kiln.yml:5:24: bad label name `{long}` in `labels` in `agent` of stage `deploy`; \
             {name_rule}"
        ),
    );
}

#[test]
fn wide_alias_expansion_is_refused() {
    // Not deep but wide: one anchored list of 1,000 items, aliased 200 times.
    let items = vec!["x"; 1_000].join(", ");
    let mut text = format!("pipeline: demo\nbig: &big [{items}]\nstages:\n");
    for idx in 0..200 {
        text.push_str(&format!(
            "  s{idx}: {{ commands: [make], env: {{ A: *big }} }}\n"
        ));
    }
    let error = parse(FILE, &text).expect_err("200,000 copied nodes is past the budget");
    assert!(error.message.contains("alias expansion"), "{error}");
}
