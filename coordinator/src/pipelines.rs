//! Pipeline files, parsed once: a version never changes, so its file is
//! parsed the first time anyone needs it (the engine for its runs, the API
//! for a pipeline's stage list, the webhook for its push trigger) and kept,
//! and a version today's parser refuses keeps its error. Entries are keyed
//! by file name and content digest, so a file read at a run's commit (off
//! the engine loop, before the run's version exists) is parsed there once
//! and the engine finds it parsed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_common::spec;

use crate::store::PipelineRecord;

/// A parsed version, or why it cannot be parsed (file, line, column).
pub(crate) type Parsed = Result<Arc<spec::Pipeline>, Arc<str>>;

/// File name (errors name it) and "sha256:<hex>" of the text.
type Key = (String, String);

#[derive(Default)]
pub(crate) struct ParsedPipelines {
    parsed: Mutex<HashMap<Key, Parsed>>,
}

impl ParsedPipelines {
    pub(crate) fn get(&self, record: &PipelineRecord) -> Parsed {
        let digest = if record.digest.is_empty() {
            crate::repos::digest(&record.spec_yaml)
        } else {
            record.digest.clone()
        };
        self.parse(&record.file_name, &record.spec_yaml, digest)
    }

    /// `text` (whose digest is `digest`) as `file_name`, parsed once.
    pub(crate) fn parse(&self, file_name: &str, text: &str, digest: String) -> Parsed {
        let key = (file_name.to_owned(), digest);
        if let Some(found) = self.lock().get(&key) {
            return found.clone();
        }
        // Parsed outside the lock: a large file does not hold up others.
        let parsed = spec::parse(file_name, text)
            .map(Arc::new)
            .map_err(|error| Arc::from(error.to_string()));
        self.lock().entry(key).or_insert(parsed).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Parsed>> {
        self.parsed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: u32, yaml: &str) -> PipelineRecord {
        PipelineRecord::for_test("p", version, yaml)
    }

    #[test]
    fn each_version_is_parsed_once_and_errors_are_kept() {
        let cache = ParsedPipelines::default();
        let good = record(1, "pipeline: p\nstages:\n  a: { commands: [x] }\n");
        let first = cache.get(&good).unwrap();
        let again = cache.get(&good).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "parsed once");
        let bad = record(2, "pipeline: p\nstages: {}\n");
        let error = cache.get(&bad).unwrap_err();
        assert!(error.contains("kiln.yml"), "{error}");
        assert!(cache.get(&bad).is_err());
    }
}
