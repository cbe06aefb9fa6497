//! The agent's modules import each other in one direction only, as the
//! picture in `src/lib.rs` shows: this test reads every source file, finds
//! each `crate::`, `super::` and `self::` path outside test code, and checks
//! it against [`ALLOWED`]. A new import that points up (an executor reaching
//! for `stage`, `logs` reaching for `stages`) fails here with the file and
//! the path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Plain modules that import nothing of the crate; any other layer may
/// import them.
const LEAVES: &[&str] = &[
    "attempt",
    "config",
    "error",
    "metrics",
    "resources",
    "timer",
];

/// Each other layer and the layers above the leaves it may import.
/// Executors see only their contract and `logs`.
const ALLOWED: &[(&str, &[&str])] = &[
    (
        "supervisor",
        &[
            "stages",
            "stage",
            "workspace",
            "connection",
            "executor",
            "logs",
            "cache",
        ],
    ),
    ("connection", &[]),
    ("stages", &["outbox", "executor::contract"]),
    ("outbox", &[]),
    (
        "stage",
        &[
            "workspace",
            "transfer",
            "executor::contract",
            "logs",
            "cache",
        ],
    ),
    ("workspace", &["logs"]),
    (
        "executor",
        &[
            "executor::contract",
            "executor::process",
            "executor::docker",
        ],
    ),
    ("executor::process", &["executor::contract", "logs"]),
    ("executor::docker", &["executor::contract", "logs"]),
    ("executor::contract", &["logs"]),
    ("logs", &[]),
    ("transfer", &[]),
    ("cache", &["transfer", "logs"]),
];

#[test]
fn imports_point_down_the_layers() {
    let allowed = layers();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for file in rust_files(&src) {
        let module = module_path(&src, &file);
        if module.is_empty() || module[0] == "bin" {
            continue; // lib.rs is the top: it declares and re-exports everything
        }
        let from = layer(&module, &allowed);
        let Some(may_use) = allowed.get(from.as_str()) else {
            violations.push(format!(
                "{}: layer `{from}` is not in ALLOWED",
                file.display()
            ));
            continue;
        };
        let text = without_test_code(&std::fs::read_to_string(&file).unwrap());
        for path in crate_paths(&text, &module) {
            let to = layer(&path, &allowed);
            if to != from && !may_use.contains(to.as_str()) {
                let what = if LEAVES.contains(&from.as_str()) {
                    "a leaf imports"
                } else {
                    "imports"
                };
                violations.push(format!(
                    "{}: `{from}` {what} `{}` (layer `{to}`)",
                    file.display(),
                    path.join("::")
                ));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// Every layer with what it may import: its entry in [`ALLOWED`] plus the
/// leaves; a leaf may import nothing.
fn layers() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    let mut layers: BTreeMap<_, BTreeSet<_>> = ALLOWED
        .iter()
        .map(|(layer, deps)| (*layer, deps.iter().chain(LEAVES).copied().collect()))
        .collect();
    layers.extend(LEAVES.iter().map(|leaf| (*leaf, BTreeSet::new())));
    layers
}

#[test]
fn the_allowed_imports_have_no_cycle() {
    let layers = layers();
    let graph: BTreeMap<&str, Vec<&str>> = layers
        .iter()
        .map(|(layer, deps)| (*layer, deps.iter().copied().collect()))
        .collect();
    // Depth-first search; a layer met again while still open closes a cycle.
    fn visit<'a>(
        layer: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        open: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(layer) {
            return;
        }
        assert!(!open.contains(&layer), "cycle: {open:?} -> {layer}");
        open.push(layer);
        for next in &graph[layer] {
            assert!(
                graph.contains_key(next),
                "`{layer}` may import unknown `{next}`"
            );
            visit(next, graph, open, done);
        }
        open.pop();
        done.insert(layer);
    }
    let mut done = BTreeSet::new();
    for layer in graph.keys() {
        visit(layer, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_checker_sees_paths_in_groups_and_relative_paths() {
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(layer, _)| (*layer, BTreeSet::new()))
        .collect();
    let module = ["executor", "docker", "config"].map(String::from).to_vec();
    let text = "use crate::{attempt::AttemptKey, executor::{contract::Job, build}};\n\
                use super::super::Job;\n\
                use super::image::find;\n\
                fn f() { crate::stage::run(); crate::Config::default(); }\n\
                #[cfg(test)]\nfn helper() { crate::supervisor::x(); }\n\
                #[cfg(test)]\nmod tests {\n    use crate::supervisor;\n}\n";
    let layers: Vec<String> = crate_paths(&without_test_code(text), &module)
        .iter()
        .map(|path| layer(path, &allowed))
        .collect();
    let expected = [
        "attempt",
        "executor::contract",
        "executor",
        "executor",
        "executor::docker",
        "stage",
        "lib",
    ];
    assert_eq!(layers, expected);
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// `src/executor/docker/config.rs` → `[executor, docker, config]`;
/// `src/lib.rs` → `[]`; `src/executor/mod.rs` → `[executor]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The layer a module path belongs to: the longest prefix that is a layer
/// (`executor::docker::config` is in `executor::docker`), or `lib` for an
/// item of `lib.rs` itself (`crate::Config`).
fn layer(path: &[String], layers: &BTreeMap<&str, BTreeSet<&str>>) -> String {
    for len in (1..=path.len().min(2)).rev() {
        let prefix = path[..len].join("::");
        if layers.contains_key(prefix.as_str()) {
            return prefix;
        }
    }
    match path.first() {
        Some(first) if first.starts_with(|c: char| c.is_ascii_lowercase()) => first.clone(),
        _ => "lib".to_owned(),
    }
}

/// `text` without the items marked `#[cfg(test)]` (test modules and
/// helpers): tests may reach anywhere.
fn without_test_code(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let (brace, semi) = (item.find('{'), item.find(';'));
        let end = match (brace, semi) {
            (Some(brace), Some(semi)) if semi < brace => semi + 1,
            (Some(brace), _) => brace + matching_brace(&item[brace..]),
            (None, Some(semi)) => semi + 1,
            (None, None) => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// The length up to and including the `}` that closes the `{` at the start
/// of `text`. Braces in strings are rare enough in this crate's test items
/// to be counted; an unbalanced one shows up as a wrong violation.
fn matching_brace(text: &str) -> usize {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    text.len()
}

/// Every absolute module path that a `crate::`, `super::` or `self::` path
/// in `text` names, resolved from `module` and with `{...}` groups expanded.
fn crate_paths(text: &str, module: &[String]) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for head in ["crate::", "super::", "self::"] {
        for (at, _) in text.match_indices(head) {
            // Only where a path starts: not `$crate::`, `a::self::`, `my_crate::`.
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || matches!(c, '_' | ':' | '$')) {
                continue;
            }
            let mut base: Vec<String> = if head == "crate::" {
                Vec::new()
            } else {
                module.to_vec()
            };
            let mut rest = &text[at + head.len()..];
            if head == "super::" {
                base.pop();
                while let Some(more) = rest.strip_prefix("super::") {
                    base.pop();
                    rest = more;
                }
            }
            paths.push((at, base, rest));
        }
    }
    // In the order they appear, so failures read like the file.
    paths.sort_by_key(|(at, _, _)| *at);
    let mut out = Vec::new();
    for (_, base, rest) in paths {
        expand(rest, base, &mut out);
    }
    out
}

/// Appends the paths `rest` names below `base`: `a::b`, or a group
/// `{a::b, c::{d, e}}`.
fn expand(rest: &str, base: Vec<String>, out: &mut Vec<Vec<String>>) {
    if rest.starts_with('{') {
        let group = &rest[1..matching_brace(rest) - 1];
        for item in split_top_level(group) {
            let item = item.trim();
            if item.is_empty() || item == "self" {
                out.push(base.clone());
            } else {
                expand(item, base.clone(), out);
            }
        }
        return;
    }
    let mut path = base;
    let mut rest = rest;
    loop {
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() || name == "self" {
            break;
        }
        rest = &rest[name.len()..];
        path.push(name);
        match rest.strip_prefix("::") {
            Some(more) if more.starts_with('{') => return expand(more, path, out),
            Some(more) => rest = more,
            None => break,
        }
    }
    out.push(path);
}

/// `a, b::{c, d}, e` → `a`, `b::{c, d}`, `e`.
fn split_top_level(group: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items
}
