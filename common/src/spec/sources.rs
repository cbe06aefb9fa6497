//! A pipeline file together with the files it includes, and the one text
//! that holds them all: a stored pipeline version is that text, so a
//! version stays readable without the repository, and its digest covers
//! every file that made it.
//!
//! A file that includes nothing is its own text, byte for byte (and so
//! keeps the digest it had before `include:` existed). One that does is a
//! bundle: a first line [`BUNDLE_HEADER`], then for each file (the
//! pipeline file first) a line `#file <bytes> <path>` and exactly that
//! many bytes of text. YAML reads the header as a comment, so no pipeline
//! file is mistaken for a bundle unless it starts with that exact line.

use std::collections::BTreeMap;

use super::compose;

/// The first line of a bundle.
pub const BUNDLE_HEADER: &str = "#kiln-bundle v1\n";

/// A pipeline file and the files it includes, by path in the repository.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// The pipeline file's path (errors name it; includes are relative to
    /// its directory).
    pub path: String,
    pub text: String,
    /// Included files (and files they include) by repository path.
    pub included: BTreeMap<String, String>,
}

impl Sources {
    /// One file that includes nothing yet.
    pub fn new(path: &str, text: &str) -> Self {
        Self {
            path: path.to_owned(),
            text: text.to_owned(),
            included: BTreeMap::new(),
        }
    }

    /// What `path`'s text (the pipeline file or an included one) includes
    /// and is not read yet: the caller reads these at the same commit and
    /// adds them to `included`, until nothing is missing. A path that does
    /// not exist stays missing; the parse then names it and where it is
    /// included.
    pub fn missing(&self) -> Vec<String> {
        let mut texts = vec![(self.path.as_str(), self.text.as_str())];
        texts.extend(self.included.iter().map(|(p, t)| (p.as_str(), t.as_str())));
        let mut missing: Vec<String> = texts
            .into_iter()
            .flat_map(|(path, text)| compose::includes_of(path, text))
            .filter(|path| *path != self.path && !self.included.contains_key(path))
            .collect();
        missing.sort();
        missing.dedup();
        missing
    }

    /// The text a version stores: the pipeline file itself when it
    /// includes nothing, else a bundle of all the files.
    pub fn bundle(&self) -> String {
        if self.included.is_empty() {
            return self.text.clone();
        }
        let mut out = String::from(BUNDLE_HEADER);
        let files = std::iter::once((&self.path, &self.text)).chain(self.included.iter());
        for (path, text) in files {
            out.push_str(&format!("#file {} {path}\n", text.len()));
            out.push_str(text);
        }
        out
    }

    /// The files of a stored text: a bundle's, or `text` alone as `path`.
    /// A damaged bundle is returned as one file, which fails to parse with
    /// YAML's own error.
    pub fn unbundle(path: &str, text: &str) -> Self {
        text.strip_prefix(BUNDLE_HEADER)
            .and_then(split_bundle)
            .unwrap_or_else(|| Self::new(path, text))
    }
}

fn split_bundle(mut rest: &str) -> Option<Sources> {
    let mut files = Vec::new();
    while !rest.is_empty() {
        let (line, after) = rest.split_once('\n')?;
        let (bytes, path) = line.strip_prefix("#file ")?.split_once(' ')?;
        let bytes: usize = bytes.parse().ok()?;
        let text = after.get(..bytes)?;
        files.push((path.to_owned(), text.to_owned()));
        rest = &after[bytes..];
    }
    let mut files = files.into_iter();
    let (path, text) = files.next()?;
    Some(Sources {
        path,
        text,
        included: files.collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_round_trips_and_a_plain_file_is_itself() {
        let plain = Sources::new("kiln.yml", "pipeline: p\n");
        assert_eq!(plain.bundle(), "pipeline: p\n");
        assert_eq!(Sources::unbundle("kiln.yml", &plain.bundle()), plain);
        let mut sources = Sources::new("ci/kiln.yml", "include: a.yml\n");
        sources
            .included
            .insert("ci/a.yml".into(), "#file 3 x\nstages: {}\n".into());
        sources.included.insert("b é.yml".into(), String::new());
        let bundle = sources.bundle();
        assert!(bundle.starts_with(BUNDLE_HEADER));
        assert_eq!(Sources::unbundle("other", &bundle), sources);
        // A truncated bundle is no bundle.
        let cut = &bundle[..bundle.len() - 4];
        assert_eq!(Sources::unbundle("k", cut).text, cut);
    }

    #[test]
    fn missing_lists_includes_of_includes_relative_to_their_files() {
        let mut sources = Sources::new("ci/kiln.yml", "include: [common.yml, /top.yml]\n");
        assert_eq!(sources.missing(), ["ci/common.yml", "top.yml"]);
        sources
            .included
            .insert("ci/common.yml".into(), "include: ../lib/x.yml\n".into());
        sources.included.insert("top.yml".into(), String::new());
        assert_eq!(sources.missing(), ["lib/x.yml"]);
    }
}
