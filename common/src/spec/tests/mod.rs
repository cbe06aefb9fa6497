//! Data-driven tests of [`parse`]: each case is a pipeline file and either
//! the exact error it gets (`check`) or the pipeline it becomes (`parse_ok`).
//!
//! Cases are indented with the code around them; `trim_indent` removes that,
//! so line numbers in expectations count from the case's first line.

mod artifacts;
mod cache;
mod containers;
mod delivery;
mod errors;
mod limits;
mod matrix;
mod params;
mod pipelines;
mod policy;
mod robustness;
mod secrets;
mod services;
mod strategy;
mod triggers;

use super::*;

const FILE: &str = "kiln.yml";

/// Asserts that `yaml` fails with exactly `expected` (`file:line:col: message`).
#[track_caller]
fn check(yaml: &str, expected: &str) {
    let text = trim_indent(yaml);
    match parse(FILE, &text) {
        Ok(pipeline) => panic!("expected `{expected}`, got {pipeline:#?}\nfor:\n{text}"),
        Err(error) => assert_eq!(error.to_string(), expected, "for:\n{text}"),
    }
}

/// Parses `yaml`, which must be valid.
#[track_caller]
fn parse_ok(yaml: &str) -> Pipeline {
    let text = trim_indent(yaml);
    parse(FILE, &text).unwrap_or_else(|error| panic!("{error}\nfor:\n{text}"))
}

/// Drops a leading newline and the indentation all non-blank lines share.
fn trim_indent(text: &str) -> String {
    let text = text.strip_prefix('\n').unwrap_or(text);
    let indent = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.len() - line.trim_start().len())
        .min()
        .unwrap_or(0);
    text.lines()
        .map(|line| line.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn trim_indent_keeps_relative_indentation() {
    assert_eq!(
        trim_indent("\n    a:\n      b: 1\n\n    c: 2\n  "),
        "a:\n  b: 1\n\nc: 2\n"
    );
}
