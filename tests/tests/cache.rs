//! Stage caches end to end with real process agents: a miss saves the
//! cache's paths after the stage succeeds, the next run on the same agent
//! restores them, a changed key file misses again, and a `shared` cache
//! saved by one agent is restored by another through the coordinator's
//! index and blob store; `kiln cache ls|clear` see and forget it, and a
//! clear also reaches an agent's own copy of a cache that is not shared.

use std::time::Duration;

use anyhow::Result;
use kiln_proto::v1 as pb;
use kiln_tests::{CoordinatorOptions, Farm, Repo, logs, register_and_run, stage, wait_run};

const LIMIT: Duration = Duration::from_secs(60);

/// The stage builds `.cache/deps/built` unless the cache brought it.
const DEPS: &str = r#"if [ -f .cache/deps/built ]; then echo "deps cached from $(cat .cache/deps/built)"; else mkdir -p .cache/deps && echo "run $KILN_RUN_ID" > .cache/deps/built && echo "deps built"; fi"#;

async fn run_and_log(farm: &Farm, repo: &Repo, stage_name: &str) -> Result<(u64, Vec<String>)> {
    let id = register_and_run(&farm.coordinator, repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, LIMIT).await?;
    let texts: Vec<String> = logs(&mut client, id, stage_name)
        .await?
        .into_iter()
        .filter_map(|entry| entry.line.map(|line| line.text))
        .collect();
    let state = stage(&run, stage_name).state;
    assert_eq!(state, pb::StageState::Succeeded as i32, "{texts:#?}");
    Ok((id, texts))
}

fn has(texts: &[String], wanted: &str) -> bool {
    texts.iter().any(|text| text.contains(wanted))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_is_saved_on_a_miss_and_restored_by_the_next_run_on_the_agent() -> Result<()> {
    let farm = Farm::start(&CoordinatorOptions::default(), &[("cache-1", "", 1)])?;
    let repo = Repo::new(&format!(
        r#"
pipeline: cached
stages:
  deps:
    commands: ['{DEPS}']
    cache: {{ key: "deps-{{{{ hash('requirements.txt') }}}}", paths: [.cache/deps] }}
"#
    ))?;
    repo.commit("requirements.txt", "numpy==2.0\n")?;

    let (first, texts) = run_and_log(&farm, &repo, "deps").await?;
    assert!(
        has(&texts, "miss; saved after the stage succeeds"),
        "{texts:#?}"
    );
    assert!(has(&texts, "deps built"), "{texts:#?}");
    assert!(has(&texts, "saved on this agent"), "{texts:#?}");
    let entries = std::fs::read_dir(farm.dirs[1].path().join("stage-cache"))?.count();
    assert_eq!(entries, 1, "one entry under the agent's work dir");

    let (_, texts) = run_and_log(&farm, &repo, "deps").await?;
    assert!(
        has(&texts, "restored from this agent (1 files)"),
        "{texts:#?}"
    );
    assert!(
        has(&texts, &format!("deps cached from run {first}")),
        "{texts:#?}"
    );
    assert!(
        !has(&texts, "saved on this agent"),
        "a hit saves nothing: {texts:#?}"
    );

    // A new key file is a new key: a miss, built again.
    repo.commit("requirements.txt", "numpy==2.1\n")?;
    let (_, texts) = run_and_log(&farm, &repo, "deps").await?;
    assert!(
        has(&texts, "miss; saved after the stage succeeds"),
        "{texts:#?}"
    );
    assert!(has(&texts, "deps built"), "{texts:#?}");
    // Not shared: the coordinator knows of none.
    let listed = farm.coordinator.kiln(&["cache", "ls"]);
    assert!(listed.status.success(), "{listed:?}");
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        "no shared caches"
    );

    // `kiln cache clear` still reaches the agent's own copy: the next run
    // drops it and builds again, and the run after that hits the new one.
    let cleared = farm.coordinator.kiln(&["cache", "clear", "cached"]);
    assert!(cleared.status.success(), "{cleared:?}");
    assert!(
        String::from_utf8_lossy(&cleared.stdout).contains("agents drop their own copies"),
        "{cleared:?}"
    );
    let (rebuilt, texts) = run_and_log(&farm, &repo, "deps").await?;
    assert!(
        has(
            &texts,
            "this agent's copy was cleared by `kiln cache clear`"
        ),
        "{texts:#?}"
    );
    assert!(has(&texts, "deps built"), "{texts:#?}");
    let (_, texts) = run_and_log(&farm, &repo, "deps").await?;
    assert!(
        has(&texts, &format!("deps cached from run {rebuilt}")),
        "{texts:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_cache_saved_by_one_agent_is_restored_by_another() -> Result<()> {
    let farm = Farm::start(
        &CoordinatorOptions::default(),
        &[("cache-a", "box=a", 1), ("cache-b", "box=b", 1)],
    )?;
    let repo = Repo::new(&format!(
        r#"
pipeline: shared
stages:
  first:
    agent: {{ labels: {{ box: a }} }}
    commands: ['{DEPS}']
    cache: {{ key: "deps-{{{{ hash('requirements.txt') }}}}", paths: [.cache/deps], shared: true }}
  second:
    needs: [first]
    agent: {{ labels: {{ box: b }} }}
    commands: ['{DEPS}']
    cache: {{ key: "deps-{{{{ hash('requirements.txt') }}}}", paths: [.cache/deps], shared: true }}
"#
    ))?;
    repo.commit("requirements.txt", "pandas==2.2\n")?;
    let id = register_and_run(&farm.coordinator, &repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, LIMIT).await?;
    let texts = |name: &'static str| {
        let mut client = client.clone();
        async move {
            let lines: Vec<String> = logs(&mut client, id, name)
                .await?
                .into_iter()
                .filter_map(|entry| entry.line.map(|line| line.text))
                .collect();
            anyhow::Ok(lines)
        }
    };
    let (first, second) = (texts("first").await?, texts("second").await?);
    assert_eq!(stage(&run, "first").agent, "cache-a");
    assert_eq!(stage(&run, "second").agent, "cache-b");
    assert!(has(&first, "deps built"), "{first:#?}");
    assert!(has(&first, "shared through the coordinator"), "{first:#?}");
    assert!(has(&second, "restored from the coordinator"), "{second:#?}");
    assert!(
        has(&second, &format!("deps cached from run {id}")),
        "{second:#?}"
    );
    assert!(!has(&second, "deps built"), "{second:#?}");

    let listed = farm.coordinator.kiln(&["cache", "ls", "--output", "json"]);
    assert!(listed.status.success(), "{listed:?}");
    let entries: serde_json::Value = serde_json::from_slice(&listed.stdout)?;
    let entries = entries.as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0]["pipeline"], "shared");
    assert!(entries[0]["key"].as_str().unwrap().starts_with("deps-"));
    assert_eq!(entries[0]["paths"][0], ".cache/deps");

    let cleared = farm.coordinator.kiln(&["cache", "clear", "shared"]);
    assert!(cleared.status.success(), "{cleared:?}");
    assert!(
        String::from_utf8_lossy(&cleared.stdout).contains("forgot 1 shared cache entries"),
        "{cleared:?}"
    );
    let listed = farm.coordinator.kiln(&["cache", "ls"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        "no shared caches"
    );
    Ok(())
}
