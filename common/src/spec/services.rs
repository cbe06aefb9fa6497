//! `services:` — containers started beside a docker stage (a database, a
//! model server) on a network of the attempt's own, reachable by their
//! `name`, waited for until their `health` command succeeds, and removed
//! with the stage's container.

use std::collections::BTreeMap;
use std::time::Duration;

use super::schema::{Field, Path, read_fields, set};
use super::values;
use super::yaml::Node;
use super::{Position, Problem, Service};

/// Most services one stage may start.
pub const MAX_SERVICES: usize = 8;
/// How long a service may take to become healthy when `health_timeout` is
/// left out.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Docker's network aliases are DNS labels.
const MAX_SERVICE_NAME_LEN: usize = 63;

const EXPECTED: &str = "a list of services, like \
                        `services: [{name: db, image: postgres:16, health: pg_isready}]`";

/// One service as written; `name` and `image` are required.
#[derive(Default)]
struct ServiceDraft {
    name: Option<(String, Position)>,
    image: Option<String>,
    env: BTreeMap<String, String>,
    command: Vec<String>,
    health: Option<String>,
    health_timeout: Option<Duration>,
}

#[rustfmt::skip]
const SERVICE_FIELDS: &[Field<ServiceDraft>] = &[
    ("name", |s, v, path| set(&mut s.name, service_name(v, path).map(|name| Some((name, v.position()))))),
    ("image", |s, v, path| set(&mut s.image, values::image(v, path).map(Some))),
    ("env", |s, v, path| set(&mut s.env, values::env(v, path))),
    ("command", |s, v, path| set(&mut s.command, command(v, path))),
    ("health", |s, v, path| set(&mut s.health, health(v, path).map(Some))),
    ("health_timeout", |s, v, path| set(&mut s.health_timeout, values::timeout(v, path).map(Some))),
];

/// `services: [...]` of stage `stage`, and where the list is (a stage that
/// cannot have services is blamed there).
pub(super) fn read(
    value: Node<'_>,
    path: &Path<'_>,
    stage: &str,
) -> Result<(Vec<Service>, Position), Problem> {
    let items = value
        .items()
        .filter(|items| !items.is_empty())
        .ok_or_else(|| {
            Problem::new(
                value.position(),
                format!("{path} must be {EXPECTED}; found {}", value.describe()),
            )
        })?;
    if let Some(extra) = items.get(MAX_SERVICES) {
        return Err(Problem::new(
            extra.position(),
            format!(
                "{path} lists {} services, more than the limit of {MAX_SERVICES}",
                items.len()
            ),
        ));
    }
    let mut services: Vec<Service> = Vec::with_capacity(items.len());
    for (idx, item) in items.into_iter().enumerate() {
        let what = format!("service {} of stage `{stage}`", idx + 1);
        let place = format!(" in service {} of stage `{stage}`", idx + 1);
        let mut draft = ServiceDraft::default();
        read_fields(&mut draft, item, SERVICE_FIELDS, &what, &place)?;
        let Some((name, name_at)) = draft.name else {
            return Err(Problem::new(
                item.position(),
                format!(
                    "{what} has no `name`; add `name: db`, the host name the stage reaches it by"
                ),
            ));
        };
        let Some(image) = draft.image else {
            return Err(Problem::new(
                item.position(),
                format!("service `{name}` of stage `{stage}` has no `image`; add `image: IMAGE`"),
            ));
        };
        if services.iter().any(|service| service.name == name) {
            return Err(Problem::new(
                name_at,
                format!("stage `{stage}` has two services named `{name}`; each needs its own name"),
            ));
        }
        services.push(Service {
            name,
            image,
            env: draft.env,
            command: draft.command,
            health: draft.health,
            health_timeout: draft.health_timeout.unwrap_or(DEFAULT_HEALTH_TIMEOUT),
        });
    }
    Ok((services, value.position()))
}

/// A host name: lowercase letters, digits and `-`, starting with a letter.
fn service_name(value: Node<'_>, path: &Path<'_>) -> Result<String, Problem> {
    let text = value.text().unwrap_or_default();
    let mut chars = text.chars();
    let ok = text.len() <= MAX_SERVICE_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        return Ok(text.to_owned());
    }
    Err(Problem::new(
        value.position(),
        format!(
            "{path} must be a host name: lowercase letters, digits and `-`, starting with a \
             letter, at most {MAX_SERVICE_NAME_LEN} characters; found {}",
            value.describe()
        ),
    ))
}

/// `command:` the service's arguments as a list, or one string run with
/// `sh -c`.
fn command(value: Node<'_>, path: &Path<'_>) -> Result<Vec<String>, Problem> {
    if let Some(text) = value.string().filter(|text| !text.trim().is_empty()) {
        return Ok(vec!["sh".into(), "-c".into(), text.to_owned()]);
    }
    let items = value.items().filter(|items| !items.is_empty());
    let argv = items.and_then(|items| {
        items
            .into_iter()
            .map(|item| item.text().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
    });
    argv.ok_or_else(|| {
        Problem::new(
            value.position(),
            format!(
                "{path} must be a list of arguments like `[httpd, -f]` or one string run with \
                 `sh -c`; found {}",
                value.describe()
            ),
        )
    })
}

/// `health:` a shell command run inside the service until it succeeds.
fn health(value: Node<'_>, path: &Path<'_>) -> Result<String, Problem> {
    match value.string() {
        Some(text) if !text.trim().is_empty() => Ok(text.to_owned()),
        _ => Err(Problem::new(
            value.position(),
            format!(
                "{path} must be a shell command that succeeds once the service is ready, like \
                 `pg_isready`; found {}",
                value.describe()
            ),
        )),
    }
}
