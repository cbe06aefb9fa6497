//! `parse` must return, never panic or overflow the stack, whatever it is
//! given, and its errors must point inside the file.

use super::{FILE, MAX_FILE_BYTES, parse, trim_indent};

const EXAMPLE: &str = "
    pipeline: demo
    defaults: { image: 'python:3.12', timeout: 15m, retries: 2 }
    triggers:
      push: { branches: [main, 'rel/*'], secret: HOOK }
      schedule: ['0 3 * * *', '*/5 1-2 L * MON#2']
      data: { watch: /srv/raw, every: 1m, into: data/raw }
    stages:
      prepare:
        commands: [make data]
        env: { SEED: 42, &flag FAST: true }
      train:
        needs: [prepare]
        commands:
          - \"python train.py\"
          - |
            echo done
        agent: { labels: { gpu: 'yes' } }
        secrets: [HF_TOKEN]
        timeout: 1h30m
";

/// Parses `text` and checks the error, if any, points inside it.
fn parse_anything(text: &str) {
    if let Err(error) = parse(FILE, text) {
        let n_lines = text.lines().count().max(1);
        // Scanner errors at the very end may point one line past the last.
        assert!(
            (1..=n_lines + 1).contains(&error.position.line) && error.position.column >= 1,
            "{error} is outside of:\n{text}"
        );
        assert!(!error.message.is_empty());
    }
}

#[test]
fn every_prefix_of_a_valid_file() {
    let text = trim_indent(EXAMPLE);
    assert!(parse(FILE, &text).is_ok());
    for (end, _) in text.char_indices() {
        parse_anything(&text[..end]);
    }
}

#[test]
fn every_single_character_change() {
    let text = trim_indent(EXAMPLE);
    let replacements = [
        ' ', '\n', '\t', ':', '-', '[', ']', '{', '}', '"', '\'', '&', '*', '!', '#', '|', '>',
        '?', ',', 'x', '0', 'é', '\0',
    ];
    for (at, original) in text.char_indices() {
        for replacement in replacements {
            let mut changed = text.clone();
            changed.replace_range(at..at + original.len_utf8(), &replacement.to_string());
            parse_anything(&changed);
        }
        let mut removed = text.clone();
        removed.remove(at);
        parse_anything(&removed);
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for text in [
        "- ".repeat(100_000),
        "[".repeat(100_000),
        "{a: ".repeat(100_000),
        // Indentation grows quadratically; 1,400 levels stay under the size limit.
        (0..1_400)
            .map(|depth| format!("{}k:\n", " ".repeat(depth)))
            .collect(),
    ] {
        assert!(text.len() <= MAX_FILE_BYTES);
        let error = parse(FILE, &text).expect_err("nesting this deep must fail");
        assert!(
            error.message.contains("levels deep") || error.message.starts_with("invalid yaml"),
            "{error}"
        );
    }
}

#[test]
fn ten_thousand_levels_of_indentation_are_refused_by_size() {
    let text: String = (0..10_000)
        .map(|depth| format!("{}k:\n", " ".repeat(depth)))
        .collect();
    let error = parse(FILE, &text).expect_err("50 MB of indentation must fail");
    assert!(error.message.contains("more than the limit"), "{error}");
}

#[test]
fn alias_bombs_are_refused() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for level in 1..20 {
        let previous = format!("*a{}", level - 1);
        text.push_str(&format!(
            "a{level}: &a{level} [{}]\n",
            vec![previous; 10].join(", ")
        ));
    }
    let error = parse(FILE, &text).expect_err("expanding this would take 10^20 nodes");
    assert!(error.message.contains("alias expansion"), "{error}");
}

#[test]
fn odd_inputs() {
    for text in [
        "\u{feff}pipeline: demo\n",
        "\0",
        "\r\n\r\n",
        "pipeline: demo\r\nstages:\r\n  a: { commands: [make] }\r\n",
        "? a\n? b\n",
        "!!map { pipeline: demo }",
        "pipeline: !!int demo",
        "pipeline: !custom demo",
        "stages: !custom { a: { commands: [make] } }",
        "%YAML 1.2\n---\npipeline: demo\n",
        "pipeline: &a demo\nstages: *a\n",
        "&a [*a]",
        "pipeline: demo\nstages:\n  a: { commands: [make], needs: [*missing] }\n",
        "{? {a: b}: c}",
        "pipeline: demo\nstages: { a: { commands: [x], env: { ? [a] : b } } }\n",
    ] {
        parse_anything(text);
    }
}
