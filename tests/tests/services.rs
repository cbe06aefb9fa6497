//! `services:` against the real Docker engine: a service started beside a
//! docker stage on the attempt's own network, reachable by its name, waited
//! for until healthy, and removed afterwards — also after the agent is
//! killed with SIGKILL, by the sweep of its next start.

use std::time::Duration;

use anyhow::Result;
use kiln_proto::v1 as pb;
use kiln_tests::docker::{DockerFarm, TEST_IMAGE};
use kiln_tests::{Repo, eventually, logs, stage, wait_run};

const RUN_LIMIT: Duration = Duration::from_secs(120);

/// A busybox web server answering `hello-from-web` on port 8080.
fn web_service(health: &str, health_timeout: &str) -> String {
    format!(
        r#"
      - name: web
        image: {TEST_IMAGE}
        command: mkdir -p /tmp/www && echo hello-from-web > /tmp/www/index.html && httpd -f -p 8080 -h /tmp/www
        health: {health}
        health_timeout: {health_timeout}"#
    )
}

macro_rules! farm_or_skip {
    ($test:expr) => {
        match DockerFarm::start($test).await? {
            Some(farm) => farm,
            None => return Ok(()),
        }
    };
}

async fn log_texts(farm: &DockerFarm, run: u64, stage: &str) -> Result<Vec<String>> {
    let mut client = farm.coordinator.client().await?;
    Ok(logs(&mut client, run, stage)
        .await?
        .into_iter()
        .filter_map(|entry| entry.line.map(|line| line.text))
        .collect())
}

/// Waits until the agent left no container and no network.
async fn nothing_left(farm: &DockerFarm) -> Result<()> {
    farm.no_containers_left().await?;
    eventually(Duration::from_secs(15), "no network left", || async {
        Ok(farm.networks().await?.is_empty().then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_is_reached_by_name_once_healthy_and_removed_afterwards() -> Result<()> {
    let farm = farm_or_skip!("services");
    let repo = Repo::new(&format!(
        r#"
pipeline: services
defaults:
  image: {TEST_IMAGE}
stages:
  test:
    commands:
      - wget -q -O- http://web:8080/
    services:{}
"#,
        web_service("wget -q -O- http://127.0.0.1:8080/", "30s")
    ))?;
    let id = farm.run(&repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, RUN_LIMIT).await?;
    let test = stage(&run, "test");
    let texts = log_texts(&farm, id, "test").await?;
    assert_eq!(
        test.state,
        pb::StageState::Succeeded as i32,
        "{test:?} {texts:#?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("service `web`") && t.contains("is ready after")),
        "{texts:#?}"
    );
    assert!(texts.iter().any(|t| t == "hello-from-web"), "{texts:#?}");
    assert!(
        texts
            .iter()
            .any(|t| t.contains("reaching its services web by name and nothing outside")),
        "{texts:#?}"
    );
    nothing_left(&farm).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_that_never_gets_healthy_fails_the_stage_naming_it() -> Result<()> {
    let farm = farm_or_skip!("services-unhealthy");
    let repo = Repo::new(&format!(
        r#"
pipeline: unhealthy
defaults:
  image: {TEST_IMAGE}
stages:
  test:
    commands: [echo never runs]
    services:{}
"#,
        web_service("'echo db still warming up; false'", "3s")
    ))?;
    let id = farm.run(&repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, RUN_LIMIT).await?;
    let test = stage(&run, "test");
    assert_eq!(test.state, pb::StageState::Failed as i32, "{test:?}");
    assert!(
        test.message.contains("service `web`")
            && test.message.contains("was not healthy within 3s")
            && test.message.contains("db still warming up"),
        "{}",
        test.message
    );
    let texts = log_texts(&farm, id, "test").await?;
    assert!(!texts.iter().any(|t| t == "never runs"), "{texts:#?}");
    nothing_left(&farm).await
}

#[tokio::test(flavor = "multi_thread")]
async fn services_a_killed_agent_left_are_removed_by_its_next_start() -> Result<()> {
    let mut farm = farm_or_skip!("services-orphans");
    // Attempt 1 hangs with its service up; attempt 2, after the restart, ends.
    let repo = Repo::new(&format!(
        r#"
pipeline: orphans
defaults:
  image: {TEST_IMAGE}
stages:
  hang:
    retries: 1
    commands:
      - wget -q -O- http://web:8080/
      - echo "attempt $KILN_ATTEMPT"
      - if [ "$KILN_ATTEMPT" = 1 ]; then sleep 1000; fi
    services:{}
"#,
        web_service("wget -q -O- http://127.0.0.1:8080/", "30s")
    ))?;
    let id = farm.run(&repo).await?;
    eventually(RUN_LIMIT, "attempt 1 to run", || async {
        let texts = log_texts(&farm, id, "hang").await?;
        Ok(texts.iter().any(|t| t == "attempt 1").then_some(()))
    })
    .await?;
    let containers = farm.containers().await?;
    let networks = farm.networks().await?;
    assert_eq!(
        containers.len(),
        2,
        "the stage and its service: {containers:?}"
    );
    assert!(
        containers.iter().any(|name| name.ends_with("-svc-web")),
        "{containers:?}"
    );
    assert_eq!(networks.len(), 1, "{networks:?}");

    farm.agent.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(farm.containers().await?.len(), 2, "the orphans still exist");
    assert_eq!(
        farm.networks().await?,
        networks,
        "the orphan network still exists"
    );
    farm.restart_agent()?;
    eventually(RUN_LIMIT, "the orphans to be removed", || async {
        let left_containers = farm.containers().await?;
        let left_networks = farm.networks().await?;
        let gone = !left_containers.iter().any(|name| containers.contains(name))
            && !left_networks.iter().any(|name| networks.contains(name));
        Ok(gone.then_some(()))
    })
    .await?;

    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, RUN_LIMIT).await?;
    let hang = stage(&run, "hang");
    assert_eq!(hang.state, pb::StageState::Succeeded as i32, "{hang:?}");
    assert_eq!(hang.attempt, 2);
    nothing_left(&farm).await
}
