//! `kiln pipeline register|list|show`.

use std::path::Path;

use kiln_proto::v1 as pb;

use crate::args::OutputFormat;
use crate::client::Coordinator;
use crate::error::{CliError, Outcome};
use crate::git::{self, Drift};
use crate::view::{PipelineView, RegisteredView};
use crate::{output, timefmt};

/// A registration checked locally, ready to send.
pub(crate) struct Prepared {
    pub(crate) request: pb::RegisterPipelineRequest,
    /// What the stages will not see of the local work tree.
    pub(crate) drift: Drift,
}

impl Prepared {
    /// A warning for the user when the stages will see something other
    /// than the work tree.
    pub(crate) fn drift_warning(&self) -> Option<String> {
        let dir = self
            .request
            .file_name
            .trim_end_matches("kiln.yml")
            .trim_end_matches('/');
        let dir = if dir.is_empty() { "." } else { dir };
        match self.drift {
            Drift::Clean => None,
            Drift::Modified(n) => Some(format!(
                "{dir} has {n} uncommitted change(s); stages check out the committed files \
                 at the run's commit and will not see them"
            )),
            Drift::NotCommitted => Some(format!(
                "{} is not committed; runs check out commits, so commit it first \
                 (git add {dir} && git commit)",
                self.request.file_name
            )),
        }
    }
}

/// `kiln pipeline register DIR`, once [`prepare`] has checked DIR.
pub(crate) async fn register(
    coordinator: &Coordinator,
    format: OutputFormat,
    prepared: Prepared,
) -> Result<Outcome, CliError> {
    if let Some(warning) = prepared.drift_warning() {
        eprintln!("warning: {warning}");
    }
    let registered = submit(coordinator, prepared.request).await?;
    match format {
        OutputFormat::Json => output::json(&registered)?,
        OutputFormat::Table => output::line(registered_line(&registered))?,
    }
    Ok(Outcome::Ok)
}

/// Everything that needs no coordinator: reads and validates
/// `dir/kiln.yml`, and finds the git source around `dir`.
pub(crate) fn prepare(dir: &Path) -> Result<Prepared, CliError> {
    let file = dir.join("kiln.yml");
    let file_name = file.display().to_string();
    let spec_yaml = std::fs::read_to_string(&file)
        .map_err(|e| CliError::Input(format!("cannot read {file_name}: {e}")))?;
    let spec_yaml = with_includes(dir, spec_yaml)?;
    // The coordinator validates too; checking here first needs no network
    // and points at the same file:line:col.
    kiln_common::spec::parse(&file_name, &spec_yaml).map_err(|e| CliError::Input(e.to_string()))?;
    let source = git::locate(dir)?;
    let drift = git::drift(dir);
    // A committed kiln.yml is read by every run at its own commit; one not
    // committed yet stays a snapshot of this file (and the warning says so).
    let path = match drift {
        Drift::NotCommitted => String::new(),
        Drift::Clean | Drift::Modified(_) if source.subdir.is_empty() => "kiln.yml".to_owned(),
        Drift::Clean | Drift::Modified(_) => format!("{}/kiln.yml", source.subdir),
    };
    let request = pb::RegisterPipelineRequest {
        file_name,
        spec_yaml,
        repo: source.repo,
        branch: source.branch,
        subdir: source.subdir,
        path,
    };
    Ok(Prepared { request, drift })
}

/// `dir/kiln.yml` and the files it includes (`include:`), read from the
/// work tree, as the one text a version stores; the file alone when it
/// includes nothing. Paths are the repository's, as the coordinator reads
/// them at a commit; a missing file is left for the parse to name.
fn with_includes(dir: &Path, text: String) -> Result<String, CliError> {
    use kiln_common::spec::{MAX_INCLUDED_FILES, Sources};
    let mut sources = Sources::new("kiln.yml", &text);
    if sources.missing().is_empty() {
        return Ok(text);
    }
    let source = git::locate(dir)?;
    if !source.subdir.is_empty() {
        sources.path = format!("{}/kiln.yml", source.subdir);
    }
    let root = Path::new(&source.repo);
    let mut absent = std::collections::HashSet::new();
    for _ in 0..=MAX_INCLUDED_FILES {
        let wanted: Vec<String> = sources
            .missing()
            .into_iter()
            .filter(|path| !absent.contains(path))
            .collect();
        if wanted.is_empty() {
            break;
        }
        for path in wanted {
            match std::fs::read_to_string(root.join(&path)) {
                Ok(text) => {
                    sources.included.insert(path, text);
                }
                Err(_) => {
                    absent.insert(path);
                }
            }
        }
    }
    Ok(sources.bundle())
}

/// Sends a prepared registration; shared with `kiln demo`.
pub(crate) async fn submit(
    coordinator: &Coordinator,
    request: pb::RegisterPipelineRequest,
) -> Result<RegisteredView, CliError> {
    let reply = coordinator.register_pipeline(request).await?;
    let pipeline = reply.pipeline.ok_or_else(|| {
        CliError::Coordinator(
            "the coordinator registered the pipeline but did not return it".to_owned(),
        )
    })?;
    Ok(RegisteredView {
        created: reply.created,
        pipeline: pipeline.into(),
    })
}

/// `registered NAME version N` or `NAME unchanged (version N)`.
pub(crate) fn registered_line(registered: &RegisteredView) -> String {
    let p = &registered.pipeline;
    if registered.created {
        format!("registered {} version {}", p.name, p.version)
    } else {
        format!("{} unchanged (version {})", p.name, p.version)
    }
}

/// `kiln pipeline list`.
pub(crate) async fn list(
    coordinator: &Coordinator,
    format: OutputFormat,
) -> Result<Outcome, CliError> {
    let pipelines: Vec<PipelineView> = coordinator
        .list_pipelines()
        .await?
        .into_iter()
        .map(PipelineView::from)
        .collect();
    match format {
        OutputFormat::Json => output::json(&pipelines)?,
        OutputFormat::Table => {
            output::line(output::pipelines_table(&pipelines, timefmt::now_ms()).trim_end())?;
        }
    }
    Ok(Outcome::Ok)
}

/// `kiln pipeline show NAME [--version N]`.
pub(crate) async fn show(
    coordinator: &Coordinator,
    format: OutputFormat,
    name: &str,
    version: Option<u32>,
) -> Result<Outcome, CliError> {
    let pipeline = PipelineView::from(coordinator.get_pipeline(name, version.unwrap_or(0)).await?);
    match format {
        OutputFormat::Json => output::json(&pipeline)?,
        OutputFormat::Table => output::line(output::pipeline_details(&pipeline).trim_end())?,
    }
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_says_whether_anything_changed() {
        let pipeline = PipelineView {
            name: "hello".into(),
            version: 3,
            repo: "/r".into(),
            branch: "main".into(),
            subdir: String::new(),
            path: "kiln.yml".into(),
            digest: String::new(),
            repository: String::new(),
            stages: vec![],
            registered_ms: None,
            spec_yaml: String::new(),
        };
        let mut registered = RegisteredView {
            created: true,
            pipeline,
        };
        assert_eq!(registered_line(&registered), "registered hello version 3");
        registered.created = false;
        assert_eq!(registered_line(&registered), "hello unchanged (version 3)");
    }

    #[test]
    fn drift_warnings_name_the_directory() {
        let prepared = |file_name: &str, drift| Prepared {
            request: pb::RegisterPipelineRequest {
                file_name: file_name.into(),
                ..Default::default()
            },
            drift,
        };
        assert_eq!(prepared("a/kiln.yml", Drift::Clean).drift_warning(), None);
        let warning = prepared("a/b/kiln.yml", Drift::Modified(2))
            .drift_warning()
            .unwrap();
        assert!(
            warning.starts_with("a/b has 2 uncommitted change(s)"),
            "{warning}"
        );
        let warning = prepared("kiln.yml", Drift::NotCommitted)
            .drift_warning()
            .unwrap();
        assert!(warning.contains("(git add . && git commit)"), "{warning}");
    }
}
