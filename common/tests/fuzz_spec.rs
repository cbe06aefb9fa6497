//! `kiln_common::spec::parse` never panics, whatever text it is given, and
//! every error it returns starts with the file's name. The inputs are
//! arbitrary strings and byte-level mutations of the example pipelines and of
//! a few hand-written ones. Each property runs a bounded number of cases so
//! the file stays fast in debug builds.

use kiln_common::spec::parse;
use proptest::prelude::*;

const FILE: &str = "fuzz/kiln.yml";

/// Valid pipeline files to mutate: the examples, and a few that use the
/// corners of the format.
fn seeds() -> Vec<String> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut seeds: Vec<String> = ["hello", "customer-behavior"]
        .iter()
        .map(|example| std::fs::read_to_string(format!("{root}/{example}/kiln.yml")).unwrap())
        .collect();
    seeds.extend(
        [
            "pipeline: p\nstages:\n  a:\n    commands: [make]\n",
            "pipeline: p\ndefaults: { image: 'python:3.12', timeout: 15m, retries: 2 }\n\
             stages:\n  a:\n    commands: [\"a\", 'b']\n    env: { SEED: 42, &f FAST: true }\n  \
             b:\n    needs: [a]\n    commands:\n      - |\n        echo done\n    \
             agent: { labels: { gpu: 'yes' } }\n    timeout: 1h30m\n",
            "pipeline: p\nstages:\n  a: {commands: [x], artifacts: [out/], executor: process}\n  b: {needs: [a], commands: [y], retries: 0, env: {A: ''}}\n",
        ]
        .map(str::to_owned),
    );
    for seed in &seeds {
        parse(FILE, seed).unwrap_or_else(|err| panic!("seed does not parse: {err}"));
    }
    seeds
}

/// Parses `text`; an error must name the file first.
fn check(text: &str) -> Result<(), TestCaseError> {
    if let Err(err) = parse(FILE, text) {
        let shown = err.to_string();
        prop_assert!(shown.starts_with(&format!("{FILE}:")), "{shown}");
        prop_assert_eq!(&err.file, FILE);
        prop_assert!(
            err.position.line >= 1 && err.position.column >= 1,
            "{}",
            shown
        );
        prop_assert!(!err.message.is_empty());
    }
    Ok(())
}

/// Text that YAML and the schema find interesting.
fn odd_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[-:\\[\\]{}'\"&*!|>#?,% \n\t]{1,6}",
        "[0-9]{1,40}",
        Just("99999999999999999999999999999999999999".to_owned()),
        Just("-1".to_owned()),
        Just("1e309".to_owned()),
        Just(".nan".to_owned()),
        Just("18446744073709551616h".to_owned()),
        Just("\u{feff}".to_owned()),
        Just("\u{202e}".to_owned()),
        Just("\u{0}".to_owned()),
        Just("é😀\u{10ffff}".to_owned()),
        Just("\r\n".to_owned()),
        Just("*anchor".to_owned()),
        Just("<<: *a".to_owned()),
        Just("!!binary".to_owned()),
        Just("---\n".to_owned()),
        Just("...\n".to_owned()),
        "\\PC{1,4}",
    ]
}

#[derive(Clone, Debug)]
enum Edit {
    Insert(usize, String),
    Delete(usize, usize),
    Replace(usize, String),
    DuplicateLine(usize),
    Nest(usize, usize, bool),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), odd_text()).prop_map(|(at, text)| Edit::Insert(at, text)),
        (any::<usize>(), 1usize..20).prop_map(|(at, len)| Edit::Delete(at, len)),
        (any::<usize>(), odd_text()).prop_map(|(at, text)| Edit::Replace(at, text)),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), 1usize..2000, any::<bool>())
            .prop_map(|(at, depth, flow)| Edit::Nest(at, depth, flow)),
    ]
}

/// The largest char boundary `<= at % (len + 1)`.
fn boundary(text: &str, at: usize) -> usize {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(text: &mut String, edit: &Edit) {
    match edit {
        Edit::Insert(at, insert) => text.insert_str(boundary(text, *at), insert),
        Edit::Delete(at, len) => {
            let start = boundary(text, *at);
            let end = boundary(text, start + len).max(start);
            text.replace_range(start..end, "");
        }
        Edit::Replace(at, with) => {
            let start = boundary(text, *at);
            let end = text[start..]
                .char_indices()
                .nth(1)
                .map_or(text.len(), |(idx, _)| start + idx);
            text.replace_range(start..end, with);
        }
        Edit::DuplicateLine(at) => {
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            if !lines.is_empty() {
                let idx = at % lines.len();
                let mut duplicated: Vec<&str> = lines[..=idx].to_vec();
                duplicated.extend(&lines[idx..]);
                *text = duplicated.concat();
            }
        }
        Edit::Nest(at, depth, flow) => {
            let nested = if *flow {
                format!("{}x{}", "[".repeat(*depth), "]".repeat(*depth))
            } else {
                (0..*depth)
                    .map(|level| format!("{}- \n", " ".repeat(level * 2)))
                    .collect()
            };
            text.insert_str(boundary(text, *at), &nested);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_strings(text in "\\PC{0,200}") {
        check(&text)?;
    }

    #[test]
    fn arbitrary_yaml_punctuation(text in "[a-z0-9:\\-\\[\\]{}'\"&*!|># \n\t]{0,200}") {
        check(&text)?;
    }

    #[test]
    fn mutated_valid_files(
        seed in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let seeds = seeds();
        let mut text = seeds[seed.index(seeds.len())].clone();
        for edit in &edits {
            apply(&mut text, edit);
        }
        check(&text)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_read_lossily(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        check(&String::from_utf8_lossy(&bytes))?;
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for depth in [1_000, 100_000] {
        for text in [
            format!("pipeline: {}x{}", "[".repeat(depth), "]".repeat(depth)),
            format!("pipeline: {}", "{a: ".repeat(depth)),
            (0..depth.min(5_000))
                .map(|level| format!("{}- \n", " ".repeat(level)))
                .collect(),
        ] {
            let err = parse(FILE, &text).expect_err("too deep");
            assert!(err.to_string().starts_with(FILE), "{err}");
        }
    }
}

#[test]
fn huge_numbers_are_errors() {
    for value in [
        "99999999999999999999999999",
        "1e400",
        "-5",
        "18446744073709551616",
    ] {
        let text = format!(
            "pipeline: p\ndefaults: {{ retries: {value} }}\nstages:\n  a:\n    commands: [x]\n"
        );
        let err = parse(FILE, &text).expect_err(value);
        assert!(err.to_string().starts_with(FILE), "{err}");
    }
    let text =
        "pipeline: p\nstages:\n  a:\n    commands: [x]\n    timeout: 99999999999999999999h\n";
    assert!(parse(FILE, text).is_err());
}
