//! Finding a stage's image on the engine, pulling it when the stage's
//! `pull` policy allows, and naming the digest the stage ran in.

use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{CreateImageInfo, ImageInspect};
use bollard::query_parameters::CreateImageOptionsBuilder;
use futures::StreamExt;
use tokio::time::Instant;

use crate::error::{Error, one_line};
use crate::logs::LogSink;

/// Progress updates of one pull reach the log at most this often; status
/// changes ("Pull complete") always do.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// An image that is on the engine.
pub(super) struct Image {
    /// `sha256:...`: what the container is created from.
    pub(super) id: String,
    /// What the stage reports it ran in: the registry digest
    /// (`name@sha256:...`) when the image has one, else `id`.
    pub(super) digest: String,
}

/// The image `reference` under `pull` ("if-missing" when empty, "always",
/// "never"). `Ok(Err(line))` when it is not there and cannot be pulled:
/// one line that names the image and how to provide it. `Err` only when the
/// engine itself fails.
pub(super) async fn find(
    docker: &Docker,
    reference: &str,
    pull: &str,
    log: &LogSink,
) -> Result<Result<Image, String>, Error> {
    let local = inspect(docker, reference).await?;
    let pull_failure = match (pull, local) {
        ("never", Some(image)) | ("" | "if-missing", Some(image)) => return Ok(Ok(image)),
        ("never", None) => "`pull: never` forbids pulling it".to_owned(),
        (_, local) => match self::pull(docker, reference, log).await {
            Ok(()) => match inspect(docker, reference).await? {
                Some(image) => return Ok(Ok(image)),
                None => "the pull finished but the engine does not list it".to_owned(),
            },
            Err(failure) => match local {
                // `pull: always` on a farm without its registry: the local
                // image is still better than no build.
                Some(image) => {
                    log.system(format!(
                        "pulling {reference} failed ({failure}); using the image already on \
                         this agent"
                    ))
                    .await;
                    return Ok(Ok(image));
                }
                None => format!("pulling it failed: {failure}"),
            },
        },
    };
    Ok(Err(format!(
        "image {reference} is not on this agent's docker engine and {pull_failure}; provide it \
         with `docker load -i IMAGE.tar` on the agent's machine or build it from its recipe in \
         deploy/images/, then retry the run"
    )))
}

/// The image if the engine has it.
async fn inspect(docker: &Docker, reference: &str) -> Result<Option<Image>, Error> {
    match docker.inspect_image(reference).await {
        Ok(inspected) => Ok(Some(image_of(inspected))),
        Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(err) => Err(Error::docker("image inspect")(err)),
    }
}

fn image_of(inspected: ImageInspect) -> Image {
    let id = inspected.id.unwrap_or_default();
    let digest = inspected
        .repo_digests
        .and_then(|digests| digests.into_iter().next())
        .unwrap_or_else(|| id.clone());
    Image { id, digest }
}

/// Pulls `reference`, with its progress as system lines. The error is the
/// engine's reason, on one line.
async fn pull(docker: &Docker, reference: &str, log: &LogSink) -> Result<(), String> {
    log.system(format!("pulling {reference}")).await;
    let (name, tag) = split_tag(reference);
    let options = CreateImageOptionsBuilder::default()
        .from_image(name)
        .tag(tag)
        .build();
    let mut progress = docker.create_image(Some(options), None, None);
    let mut last_progress: Option<Instant> = None;
    while let Some(event) = progress.next().await {
        let info = event.map_err(|err| pull_error(&err))?;
        if let Some(line) = progress_line(&info, &mut last_progress) {
            log.system(line).await;
        }
    }
    Ok(())
}

/// The engine's own words where it gave some.
fn pull_error(err: &BollardError) -> String {
    match err {
        BollardError::DockerStreamError { error } => one_line(error),
        BollardError::DockerResponseServerError { message, .. } => one_line(message),
        other => one_line(&other.to_string()),
    }
}

/// A log line for one pull event, or `None` for a progress tick that comes
/// too soon after the last one shown.
fn progress_line(info: &CreateImageInfo, last_progress: &mut Option<Instant>) -> Option<String> {
    let status = info.status.as_deref()?;
    let layer = info
        .id
        .as_deref()
        .map(|id| format!("{id}: "))
        .unwrap_or_default();
    let detail = info.progress_detail.as_ref();
    let Some((current, total)) = detail.and_then(|d| Some((d.current?, d.total?))) else {
        return Some(format!("pull: {layer}{status}"));
    };
    let now = Instant::now();
    if last_progress.is_some_and(|last| now - last < PROGRESS_EVERY) {
        return None;
    }
    *last_progress = Some(now);
    let mib = |bytes: i64| bytes as f64 / f64::from(1 << 20);
    Some(format!(
        "pull: {layer}{status} {:.1}/{:.1} MiB",
        mib(current),
        mib(total)
    ))
}

/// `name:tag` → (`name`, `tag`), `name@sha256:..` → (`name`, `sha256:..`),
/// and a bare `name` means `latest`: the engine pulls every tag when none is
/// given.
fn split_tag(reference: &str) -> (&str, &str) {
    if let Some((name, digest)) = reference.split_once('@') {
        return (name, digest);
    }
    // A colon before the last `/` belongs to a registry's port.
    let last_part = reference.rfind('/').map_or(0, |slash| slash + 1);
    match reference[last_part..].rfind(':') {
        Some(colon) => (
            &reference[..last_part + colon],
            &reference[last_part + colon + 1..],
        ),
        None => (reference, "latest"),
    }
}

#[cfg(test)]
mod tests {
    use bollard::models::ProgressDetail;

    use super::*;

    #[test]
    fn references_split_into_name_and_tag() {
        assert_eq!(split_tag("busybox"), ("busybox", "latest"));
        assert_eq!(
            split_tag("kiln/python-ml:bookworm"),
            ("kiln/python-ml", "bookworm")
        );
        assert_eq!(
            split_tag("registry:5000/team/img"),
            ("registry:5000/team/img", "latest")
        );
        assert_eq!(
            split_tag("registry:5000/img:1.2"),
            ("registry:5000/img", "1.2")
        );
        assert_eq!(split_tag("img@sha256:abc"), ("img", "sha256:abc"));
    }

    #[test]
    fn the_registry_digest_wins_over_the_id() {
        let inspected = ImageInspect {
            id: Some("sha256:id".into()),
            repo_digests: Some(vec!["img@sha256:repo".into()]),
            ..Default::default()
        };
        assert_eq!(image_of(inspected).digest, "img@sha256:repo");
        let local = ImageInspect {
            id: Some("sha256:id".into()),
            repo_digests: Some(Vec::new()),
            ..Default::default()
        };
        let image = image_of(local);
        assert_eq!(
            (image.id.as_str(), image.digest.as_str()),
            ("sha256:id", "sha256:id")
        );
    }

    #[test]
    fn progress_ticks_are_thinned_but_status_changes_are_not() {
        let tick = CreateImageInfo {
            id: Some("abc".into()),
            status: Some("Downloading".into()),
            progress_detail: Some(ProgressDetail {
                current: Some(1 << 20),
                total: Some(4 << 20),
            }),
            ..Default::default()
        };
        let done = CreateImageInfo {
            id: Some("abc".into()),
            status: Some("Pull complete".into()),
            ..Default::default()
        };
        let mut last = None;
        assert_eq!(
            progress_line(&tick, &mut last).as_deref(),
            Some("pull: abc: Downloading 1.0/4.0 MiB")
        );
        assert_eq!(progress_line(&tick, &mut last), None);
        assert_eq!(
            progress_line(&done, &mut last).as_deref(),
            Some("pull: abc: Pull complete")
        );
    }
}
