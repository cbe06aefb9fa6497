//! Reuse inside pipeline files: `include:` of other files of the
//! repository, YAML merge keys (`<<: *defaults`) and `extends:` of a stage
//! template. All three are resolved on the YAML tree, before `schema` reads
//! it, so the schema sees one plain pipeline file.
//!
//! Every node keeps the markers of the file it was written in (see
//! `yaml::load`'s `source`), so an error about a key that came from an
//! included file or a template names that file, line and column.
//!
//! Merge rules, also in the README:
//! - `include:` a path or a list of paths. A path starting with `/` is from
//!   the repository root, any other is relative to the including file's
//!   directory. Included files are merged in order, and the including file
//!   on top of them; one included twice (a diamond) is merged once, a cycle
//!   or a missing file is an error at the `include:` entry.
//! - Files and `extends:` merge deeply: mappings key by key (recursively),
//!   any other value (a list, a string) is replaced whole by the later one.
//!   Keys keep the order they first appear in, so included stages come
//!   before the including file's own.
//! - `extends: NAME` or a list of names: the stage is its templates merged
//!   in order, the stage's own keys on top. A template is any stage; one
//!   whose name starts with `.` is hidden — never run, and not checked on
//!   its own, only as part of the stages that extend it.
//! - A top-level key whose name starts with `.` is hidden: it holds YAML
//!   anchors for the rest of the file and is dropped before the schema.
//! - `<<:` a mapping or a list of mappings, in any mapping: their keys
//!   are added where the mapping does not set them itself (the first
//!   mapping of a list wins), as YAML 1.1 defines it; not deep. Anchors
//!   belong to one file: an alias cannot name an anchor of another file.

use std::collections::{HashMap, HashSet};

use saphyr::{AnnotatedMapping, MarkedYaml, YamlData};

use super::suggest::did_you_mean;
use super::yaml::{self, Document, Duplicates};
use super::{Problem, Sources};

/// Most files one pipeline may include, counting includes of includes.
pub const MAX_INCLUDED_FILES: usize = 32;
/// Longest chain of `extends:` (a template extending a template ...).
pub const MAX_EXTENDS_DEPTH: usize = 10;

/// The composed tree of `sources`; `paths` gets the file of each source
/// number (0 = the pipeline file), which errors name.
pub(super) fn compose<'i>(
    sources: &'i Sources,
    paths: &mut Vec<String>,
) -> Result<Document<'i>, Problem> {
    paths.clear();
    paths.push(sources.path.clone());
    let mut composer = Composer {
        sources,
        paths,
        duplicates: Duplicates::new(),
        loaded: HashSet::new(),
    };
    let root = composer.file(0, &sources.text, &mut Vec::new())?;
    let root = match root {
        Some(mut root) => {
            // Hidden top-level keys hold anchors for the rest of the file.
            if let YamlData::Mapping(map) = &mut root.data {
                map.retain(|k, _| !k.as_text().is_some_and(|k| k.starts_with('.')));
            }
            Some(extend_stages(root)?)
        }
        None => None,
    };
    Ok(Document {
        root,
        duplicates: composer.duplicates,
    })
}

/// The paths `text` (the file at `path`) includes, resolved; empty when it
/// includes nothing or cannot be read (the parse that follows reports why).
/// The coordinator reads these at the commit, then their own includes.
pub(super) fn includes_of(path: &str, text: &str) -> Vec<String> {
    let Ok(document) = yaml::load(text, 0) else {
        return Vec::new();
    };
    let Some(root) = document.root else {
        return Vec::new();
    };
    include_entries(&root)
        .into_iter()
        .filter_map(|entry| {
            entry
                .as_text()
                .and_then(|target| resolve(path, target).ok())
        })
        .collect()
}

struct Composer<'s, 'i> {
    sources: &'i Sources,
    paths: &'s mut Vec<String>,
    duplicates: Duplicates,
    /// Files already merged: a second include of one adds nothing.
    loaded: HashSet<String>,
}

impl<'i> Composer<'_, 'i> {
    /// File `source`'s tree with its merge keys resolved and its includes
    /// merged under it. `stack` is the chain of files including it.
    fn file(
        &mut self,
        source: usize,
        text: &'i str,
        stack: &mut Vec<String>,
    ) -> Result<Option<MarkedYaml<'i>>, Problem> {
        let document = yaml::load(text, source)?;
        self.duplicates.extend(document.duplicates);
        let Some(mut root) = document.root else {
            return Ok(None);
        };
        apply_merge_keys(&mut root)?;
        let path = self.paths[source].clone();
        stack.push(path.clone());
        let entries = include_entries(&root);
        remove_key(&mut root, "include");
        let mut base: Option<MarkedYaml<'i>> = None;
        for entry in entries {
            let Some(target) = entry.as_text() else {
                return Err(at(
                    &entry,
                    "an `include:` entry must be a path like `ci/common.yml`",
                ));
            };
            let included = resolve(&path, target).map_err(|message| at(&entry, message))?;
            if let Some(start) = stack.iter().position(|p| *p == included) {
                let cycle: Vec<&str> = stack[start..].iter().map(String::as_str).collect();
                return Err(at(
                    &entry,
                    format!(
                        "include cycle: {} -> {included}; remove one of these includes",
                        cycle.join(" -> ")
                    ),
                ));
            }
            if !self.loaded.insert(included.clone()) {
                continue;
            }
            let Some(text) = self.sources.included.get(&included) else {
                return Err(at(
                    &entry,
                    format!(
                        "`{included}` (included from {path}) is not in the repository at this commit; commit it or fix the path"
                    ),
                ));
            };
            if self.loaded.len() > MAX_INCLUDED_FILES {
                return Err(at(
                    &entry,
                    format!(
                        "the pipeline includes more than {MAX_INCLUDED_FILES} files; merge some of them"
                    ),
                ));
            }
            self.paths.push(included.clone());
            let number = self.paths.len() - 1;
            let Some(tree) = self.file(number, text, stack)? else {
                continue;
            };
            if !matches!(tree.data, YamlData::Mapping(_)) {
                return Err(at(
                    &tree,
                    "an included file must be a mapping of pipeline keys (`stages:`, `defaults:`, ...)",
                ));
            }
            base = Some(match base {
                None => tree,
                Some(base) => deep_merge(base, tree),
            });
        }
        stack.pop();
        Ok(Some(match base {
            None => root,
            Some(base) => deep_merge(base, root),
        }))
    }
}

/// The `include:` entries of a file's top-level mapping.
fn include_entries<'i>(root: &MarkedYaml<'i>) -> Vec<MarkedYaml<'i>> {
    let Some(value) = get(root, "include") else {
        return Vec::new();
    };
    match &value.data {
        YamlData::Sequence(items) => items.clone(),
        _ => vec![value.clone()],
    }
}

/// `target` as named from the file at `from`: from the repository root
/// when it starts with `/`, else from `from`'s directory; never outside
/// the repository.
fn resolve(from: &str, target: &str) -> Result<String, String> {
    let target = target.trim();
    let mut parts: Vec<&str> = Vec::new();
    let start = match target.strip_prefix('/') {
        Some(rest) => rest,
        None => {
            parts.extend(from.split('/').filter(|p| !p.is_empty()));
            parts.pop(); // the including file's own name
            target
        }
    };
    for part in start.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!(
                        "`{target}` points outside the repository; include files of the repository only"
                    ));
                }
            }
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(format!(
            "`{target}` names no file; give a path like `ci/common.yml`"
        ));
    }
    Ok(parts.join("/"))
}

/// Resolves `<<` keys everywhere below `node`.
fn apply_merge_keys(node: &mut MarkedYaml<'_>) -> Result<(), Problem> {
    match &mut node.data {
        YamlData::Sequence(items) => items.iter_mut().try_for_each(apply_merge_keys),
        YamlData::Mapping(map) => {
            for value in map.values_mut() {
                apply_merge_keys(value)?;
            }
            let Some(merge) = map.iter().find(|(k, _)| k.as_text() == Some("<<")) else {
                return Ok(());
            };
            let merged: Vec<MarkedYaml<'_>> = match &merge.1.data {
                YamlData::Mapping(_) => vec![merge.1.clone()],
                YamlData::Sequence(items) => items.clone(),
                _ => vec![merge.1.clone()],
            };
            let mut entries: Vec<(MarkedYaml<'_>, MarkedYaml<'_>)> = Vec::new();
            let mut own: HashSet<String> = map
                .keys()
                .filter_map(|k| k.as_text().map(str::to_owned))
                .collect();
            for (key, value) in map.iter() {
                if key.as_text() != Some("<<") {
                    entries.push((key.clone(), value.clone()));
                }
            }
            for source in merged {
                let YamlData::Mapping(from) = &source.data else {
                    return Err(at(
                        &source,
                        "`<<` merges mappings: give it an alias of a mapping (`<<: *defaults`) or a list of them",
                    ));
                };
                for (key, value) in from {
                    let Some(text) = key.as_text() else { continue };
                    if own.insert(text.to_owned()) {
                        entries.push((key.clone(), value.clone()));
                    }
                }
            }
            *map = entries.into_iter().collect();
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `over` merged onto `base`: mappings key by key, recursively; anything
/// else is `over`'s.
fn deep_merge<'i>(base: MarkedYaml<'i>, over: MarkedYaml<'i>) -> MarkedYaml<'i> {
    let (YamlData::Mapping(base_map), YamlData::Mapping(over_map)) = (&base.data, &over.data)
    else {
        return over;
    };
    let mut entries: Vec<(MarkedYaml<'i>, MarkedYaml<'i>)> = base_map
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, value) in over_map {
        let found = entries
            .iter()
            .position(|(k, _)| k.as_text().is_some() && k.as_text() == key.as_text());
        match found {
            Some(i) => {
                let (_, old) = entries.remove(i);
                entries.insert(i, (key.clone(), deep_merge(old, value.clone())));
            }
            None => entries.push((key.clone(), value.clone())),
        }
    }
    MarkedYaml {
        span: over.span,
        data: YamlData::Mapping(
            entries
                .into_iter()
                .collect::<AnnotatedMapping<'i, MarkedYaml<'i>>>(),
        ),
    }
}

/// Resolves every stage's `extends:` and drops the hidden (`.name`) stages.
fn extend_stages(mut root: MarkedYaml<'_>) -> Result<MarkedYaml<'_>, Problem> {
    let YamlData::Mapping(top) = &mut root.data else {
        return Ok(root);
    };
    let Some(stages) = top
        .iter_mut()
        .find(|(k, _)| k.as_text() == Some("stages"))
        .map(|(_, v)| v)
    else {
        return Ok(root);
    };
    let YamlData::Mapping(map) = &stages.data else {
        return Ok(root);
    };
    let written: Vec<(MarkedYaml<'_>, MarkedYaml<'_>)> =
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let by_name: HashMap<&str, &MarkedYaml<'_>> = written
        .iter()
        .filter_map(|(k, v)| k.as_text().map(|name| (name, v)))
        .collect();
    let mut resolved = Vec::new();
    for (key, body) in &written {
        let name = key.as_text().unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        let body = extended(name, body, &by_name, &mut Vec::new())?;
        resolved.push((key.clone(), body));
    }
    stages.data = YamlData::Mapping(resolved.into_iter().collect());
    Ok(root)
}

/// Stage `name`'s body with its `extends:` resolved; `chain` holds the
/// stages being resolved around it, to find cycles.
fn extended<'i>(
    name: &str,
    body: &MarkedYaml<'i>,
    stages: &HashMap<&str, &MarkedYaml<'i>>,
    chain: &mut Vec<String>,
) -> Result<MarkedYaml<'i>, Problem> {
    let Some(value) = get(body, "extends") else {
        return Ok(body.clone());
    };
    let names = match &value.data {
        YamlData::Sequence(items) => items.clone(),
        _ => vec![value.clone()],
    };
    if chain.len() >= MAX_EXTENDS_DEPTH {
        return Err(at(
            value,
            format!(
                "`extends:` goes more than {MAX_EXTENDS_DEPTH} templates deep; flatten the templates"
            ),
        ));
    }
    chain.push(name.to_owned());
    let mut base: Option<MarkedYaml<'i>> = None;
    for entry in names {
        let Some(template) = entry.as_text().filter(|t| !t.is_empty()) else {
            return Err(at(
                &entry,
                "`extends:` names a template stage (`.defaults`) or a list of them",
            ));
        };
        if chain.iter().any(|c| c == template) {
            return Err(at(
                &entry,
                format!(
                    "`extends:` cycle: {} -> {template}; a template cannot extend itself",
                    chain.join(" -> ")
                ),
            ));
        }
        let Some(found) = stages.get(template) else {
            let hint = did_you_mean(template, stages.keys().copied());
            return Err(at(
                &entry,
                format!(
                    "stage `{name}` extends `{template}`, which is no stage or template here{hint}; templates are stages whose name starts with `.`"
                ),
            ));
        };
        let template_body = extended(template, found, stages, chain)?;
        base = Some(match base {
            None => template_body,
            Some(base) => deep_merge(base, template_body),
        });
    }
    chain.pop();
    let mut own = body.clone();
    remove_key(&mut own, "extends");
    Ok(match base {
        Some(base) => deep_merge(base, own),
        None => own,
    })
}

fn get<'a, 'i>(node: &'a MarkedYaml<'i>, key: &str) -> Option<&'a MarkedYaml<'i>> {
    match &node.data {
        YamlData::Mapping(map) => map
            .iter()
            .find(|(k, _)| k.as_text() == Some(key))
            .map(|(_, v)| v),
        _ => None,
    }
}

fn remove_key(node: &mut MarkedYaml<'_>, key: &str) {
    if let YamlData::Mapping(map) = &mut node.data {
        map.retain(|k, _| k.as_text() != Some(key));
    }
}

fn at(node: &MarkedYaml<'_>, message: impl Into<String>) -> Problem {
    Problem::new(yaml::position(node.span.start), message)
}

/// The text of a scalar node as written.
trait AsText {
    fn as_text(&self) -> Option<&str>;
}

impl AsText for MarkedYaml<'_> {
    fn as_text(&self) -> Option<&str> {
        match &self.data {
            YamlData::Representation(text, ..) => Some(text),
            _ => None,
        }
    }
}
