//! Stored pipeline versions, parsed once: a version never changes, so its
//! `kiln.yml` is parsed the first time anyone needs it (the engine for its
//! runs, the API for a pipeline's stage list, the webhook for its push
//! trigger) and kept, and a version today's parser refuses keeps its error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_common::spec;

use crate::store::PipelineRecord;

/// A parsed version, or why it cannot be parsed (file, line, column).
pub(crate) type Parsed = Result<Arc<spec::Pipeline>, Arc<str>>;

#[derive(Default)]
pub(crate) struct ParsedPipelines {
    parsed: Mutex<HashMap<(String, u32), Parsed>>,
}

impl ParsedPipelines {
    pub(crate) fn get(&self, record: &PipelineRecord) -> Parsed {
        let key = (record.name.clone(), record.version);
        if let Some(found) = self.lock().get(&key) {
            return found.clone();
        }
        // Parsed outside the lock: a large file does not hold up others.
        let parsed = spec::parse(&record.file_name, &record.spec_yaml)
            .map(Arc::new)
            .map_err(|error| Arc::from(error.to_string()));
        self.lock().entry(key).or_insert(parsed).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), Parsed>> {
        self.parsed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: u32, yaml: &str) -> PipelineRecord {
        PipelineRecord {
            name: "p".into(),
            version,
            file_name: "kiln.yml".into(),
            spec_yaml: yaml.into(),
            repo: String::new(),
            branch: "main".into(),
            subdir: String::new(),
            registered_ms: 0,
        }
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
