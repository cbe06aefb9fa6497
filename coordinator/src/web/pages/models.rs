//! `/models` and `/models/NAME@N`: the model registry (`crate::models`),
//! read from the store on the blocking pool like `kiln model ls|show`.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Response;

use super::{Page, Signed, Web, blocking, fail, finish};
use crate::models;
use crate::web::format::{self, Chrome, render, short};

struct ModelRow {
    name: String,
    href: String,
    pipeline: String,
    latest: String,
    latest_href: String,
    versions: usize,
    aliases: String,
}

#[derive(Template)]
#[template(path = "models.html")]
struct ModelsPage {
    chrome: Chrome,
    models: Vec<ModelRow>,
}

pub(crate) async fn models_list(State(web): State<Arc<Web>>, signed: Signed) -> Response {
    finish(models_page(&web, &signed).await)
}

async fn models_page(web: &Web, signed: &Signed) -> Page {
    let models = blocking(web, |store| {
        let (releases, stored) = (store.releases()?, store.model_aliases()?);
        let versions = models::versions(&releases);
        Ok(versions
            .iter()
            .map(|(name, versions)| {
                let newest = versions
                    .values()
                    .next_back()
                    .expect("a model has a version");
                let aliases = models::aliases(versions, name, &stored)
                    .into_iter()
                    .map(|(alias, version)| format!("{alias}=@{version}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                ModelRow {
                    name: name.clone(),
                    href: format!("/models/{name}"),
                    pipeline: newest.origin().pipeline.clone(),
                    latest: format!("{name}@{}", newest.version),
                    latest_href: format!("/models/{name}@{}", newest.version),
                    versions: versions.len(),
                    aliases,
                }
            })
            .collect::<Vec<_>>())
    })
    .await
    .map_err(fail(signed))?;
    Ok(render(&ModelsPage {
        chrome: signed.chrome(),
        models,
    }))
}

struct MetricRow {
    name: String,
    value: String,
}

struct VersionReleaseRow {
    href: String,
    id: u64,
    environment: String,
    state: &'static str,
    how: String,
    created: String,
}

struct VersionLink {
    href: String,
    label: String,
}

#[derive(Template)]
#[template(path = "model.html")]
struct ModelPage {
    chrome: Chrome,
    model: String,
    aliases: String,
    run_href: String,
    run_id: u64,
    pipeline: String,
    pipeline_version: u32,
    commit: String,
    params: String,
    image: String,
    metrics: Vec<MetricRow>,
    releases: Vec<VersionReleaseRow>,
    artifacts: Vec<(String, String, String)>,
    versions: Vec<VersionLink>,
}

pub(crate) async fn model(
    State(web): State<Arc<Web>>,
    signed: Signed,
    Path(reference): Path<String>,
) -> Response {
    finish(model_page(&web, &signed, reference).await)
}

async fn model_page(web: &Web, signed: &Signed, reference: String) -> Page {
    let chrome = signed.chrome();
    let page = blocking(web, move |store| {
        let (releases, stored) = (store.releases()?, store.model_aliases()?);
        let all = models::versions(&releases);
        let version = models::resolve(&all, &stored, &reference)?;
        let origin = version.origin();
        let name = origin
            .model
            .as_ref()
            .expect("a version names its model")
            .name
            .clone();
        let aliases = models::aliases(&all[&name], &name, &stored)
            .into_iter()
            .filter(|(_, v)| *v == version.version)
            .map(|(alias, _)| alias)
            .collect::<Vec<_>>()
            .join(", ");
        let stages = store.stages(origin.run)?;
        let metrics = if stages.is_empty() {
            origin.metrics.clone()
        } else {
            models::run_metrics(&stages)
        };
        let params = store
            .run(origin.run)?
            .map(|run| {
                run.params
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        Ok(ModelPage {
            chrome,
            model: format!("{name}@{}", version.version),
            aliases,
            run_href: format!("/runs/{}", origin.run.0),
            run_id: origin.run.0,
            pipeline: origin.pipeline.clone(),
            pipeline_version: origin.pipeline_version,
            commit: short(&origin.commit),
            params,
            image: origin.image_digest.clone().unwrap_or_default(),
            metrics: metrics
                .iter()
                .map(|(metric, value)| MetricRow {
                    name: metric.clone(),
                    value: value.map_or("NaN".into(), format::number),
                })
                .collect(),
            releases: version
                .releases
                .iter()
                .map(|release| VersionReleaseRow {
                    href: format!("/releases/{}", release.id),
                    id: release.id,
                    environment: release.environment.to_string(),
                    state: super::delivery::release_state(release.state),
                    how: match &release.promotion {
                        Some(p) => format!("promoted from release {} by {}", p.from_release, p.by),
                        None => format!("run {}", release.run.0),
                    },
                    created: format::time(release.created_ms),
                })
                .collect(),
            artifacts: origin
                .artifacts
                .iter()
                .map(|a| {
                    (
                        a.stage.clone(),
                        a.artifact.path.clone(),
                        a.artifact.digest.clone(),
                    )
                })
                .collect(),
            versions: all[&name]
                .keys()
                .map(|n| VersionLink {
                    href: format!("/models/{name}@{n}"),
                    label: format!("@{n}"),
                })
                .collect(),
        })
    })
    .await
    .map_err(fail(signed))?;
    Ok(render(&page))
}
