//! `kiln repo add|list`: repositories registered once, whose pipeline
//! files every run reads at the commit it builds.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_proto::v1 as pb;
use serde::Serialize;

use crate::args::OutputFormat;
use crate::client::Coordinator;
use crate::error::{CliError, Outcome};
use crate::git;
use crate::output;
use crate::view::{PipelineView, RegisteredView};

/// The answer to `kiln repo add`. JSON: `{commit, pipelines:
/// [RegisteredView]}`.
#[derive(Debug, Serialize)]
struct AddedView {
    /// The commit the files were read at.
    commit: String,
    pipelines: Vec<RegisteredView>,
}

/// A repository and its pipelines (`kiln repo list`). JSON: `{name, repo,
/// branch, pipelines: [{name, version, path}]}`.
#[derive(Debug, Serialize)]
struct RepositoryView {
    name: String,
    repo: String,
    branch: String,
    pipelines: Vec<RepoPipelineView>,
}

#[derive(Debug, Serialize)]
struct RepoPipelineView {
    name: String,
    version: u32,
    path: String,
}

/// The request for `kiln repo add SOURCE`: a local work tree is sent as its
/// top level, with the branch checked out and, from a sub-directory, that
/// directory's `kiln.yml`; anything else is a URL for the coordinator.
pub(crate) fn prepare(
    source: &str,
    name: Option<String>,
    branch: Option<String>,
    file: Option<String>,
) -> Result<pb::AddRepositoryRequest, CliError> {
    let mut request = pb::AddRepositoryRequest {
        url: source.to_owned(),
        branch: branch.clone().unwrap_or_default(),
        file: file.clone().unwrap_or_default(),
        name: name.unwrap_or_default(),
        ..Default::default()
    };
    if Path::new(source).is_dir() {
        let located = git::locate(Path::new(source))?;
        request.url = located.repo;
        if branch.is_none() {
            request.branch = located.branch;
        }
        if file.is_none() && !located.subdir.is_empty() {
            request.file = format!("{}/kiln.yml", located.subdir);
        }
    }
    Ok(request)
}

/// `kiln repo add`.
pub(crate) async fn add(
    coordinator: &Coordinator,
    format: OutputFormat,
    request: pb::AddRepositoryRequest,
) -> Result<Outcome, CliError> {
    let reply = coordinator.add_repository(request).await?;
    let mut pipelines = Vec::new();
    for registered in reply.pipelines {
        let pipeline = registered.pipeline.ok_or_else(|| {
            CliError::Coordinator(
                "the coordinator registered a pipeline but did not return it".to_owned(),
            )
        })?;
        pipelines.push(RegisteredView {
            created: registered.created,
            pipeline: pipeline.into(),
        });
    }
    let added = AddedView {
        commit: reply.commit,
        pipelines,
    };
    match format {
        OutputFormat::Json => output::json(&added)?,
        OutputFormat::Table => {
            let lines: Vec<String> = added
                .pipelines
                .iter()
                .map(|registered| {
                    format!(
                        "{} ({})",
                        super::pipeline::registered_line(registered),
                        registered.pipeline.path
                    )
                })
                .collect();
            output::line(format!(
                "{}\nread at {}; every run reads its pipeline file at the commit it builds",
                lines.join("\n"),
                added.commit
            ))?;
        }
    }
    Ok(Outcome::Ok)
}

/// `kiln repo list`: the pipelines that read their file at each run's
/// commit, grouped by repository.
pub(crate) async fn list(
    coordinator: &Coordinator,
    format: OutputFormat,
) -> Result<Outcome, CliError> {
    let mut repositories: BTreeMap<(String, String), RepositoryView> = BTreeMap::new();
    let pipelines = coordinator.list_pipelines().await?;
    for pipeline in pipelines.into_iter().map(PipelineView::from) {
        if pipeline.path.is_empty() {
            continue;
        }
        let name = if pipeline.repository.is_empty() {
            pipeline.repo.clone()
        } else {
            pipeline.repository.clone()
        };
        let entry = repositories
            .entry((name.clone(), pipeline.repo.clone()))
            .or_insert_with(|| RepositoryView {
                name,
                repo: pipeline.repo.clone(),
                branch: pipeline.branch.clone(),
                pipelines: Vec::new(),
            });
        entry.pipelines.push(RepoPipelineView {
            name: pipeline.name,
            version: pipeline.version,
            path: pipeline.path,
        });
    }
    let repositories: Vec<RepositoryView> = repositories.into_values().collect();
    match format {
        OutputFormat::Json => output::json(&repositories)?,
        OutputFormat::Table => {
            let rows: Vec<[String; 5]> = repositories
                .iter()
                .flat_map(|repository| {
                    repository.pipelines.iter().map(|pipeline| {
                        [
                            repository.name.clone(),
                            repository.repo.clone(),
                            repository.branch.clone(),
                            pipeline.path.clone(),
                            format!("{} v{}", pipeline.name, pipeline.version),
                        ]
                    })
                })
                .collect();
            let headers = ["REPOSITORY", "REPO", "BRANCH", "FILE", "PIPELINE"];
            output::line(output::table(headers, &rows).trim_end())?;
        }
    }
    Ok(Outcome::Ok)
}
