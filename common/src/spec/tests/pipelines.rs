//! Valid files and the pipelines they become.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{DEFAULT_RETRIES, DEFAULT_TIMEOUT, Pipeline, parse_ok};

fn needs_by_name(pipeline: &Pipeline) -> Vec<(&str, Vec<&str>)> {
    pipeline
        .stages
        .iter()
        .map(|stage| {
            let needs = stage
                .needs
                .iter()
                .map(|idx| pipeline.stages[*idx].name.as_str())
                .collect();
            (stage.name.as_str(), needs)
        })
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn diamond_resolves_needs_to_indices_in_file_order() {
    let pipeline = parse_ok(
        "
        pipeline: diamond
        stages:
          top: { commands: [make top] }
          left: { needs: [top], commands: [make left] }
          right: { needs: [top], commands: [make right] }
          bottom: { needs: [right, left], commands: [make bottom] }
        ",
    );
    assert_eq!(pipeline.name, "diamond");
    let names: Vec<&str> = pipeline
        .stages
        .iter()
        .map(|stage| stage.name.as_str())
        .collect();
    assert_eq!(names, ["top", "left", "right", "bottom"]);
    let needs: Vec<&[usize]> = pipeline
        .stages
        .iter()
        .map(|stage| stage.needs.as_slice())
        .collect();
    assert_eq!(needs, [&[][..], &[0], &[0], &[2, 1]]);
    assert_eq!(pipeline.stage_idx("bottom"), Some(3));
    assert_eq!(pipeline.stage_idx("nowhere"), None);
}

#[test]
fn needs_may_point_forward() {
    let pipeline = parse_ok(
        "
        pipeline: forward
        stages:
          deploy: { needs: [build], commands: [./deploy.sh] }
          build: { commands: [make] }
        ",
    );
    assert_eq!(
        needs_by_name(&pipeline),
        [("deploy", vec!["build"]), ("build", vec![])]
    );
}

#[test]
fn defaults_apply_and_stages_override_them() {
    let pipeline = parse_ok(
        "
        pipeline: defaults
        stages:
          plain: { commands: [make] }
          custom:
            commands: [make]
            image: rust:1.85
            timeout: 1h30m
            retries: 0
        defaults:
          image: python:3.12
          timeout: 15m
          retries: 3
        ",
    );
    let [plain, custom] = &pipeline.stages[..] else {
        panic!("{pipeline:#?}")
    };
    assert_eq!(plain.image.as_deref(), Some("python:3.12"));
    assert_eq!(plain.timeout, Duration::from_secs(15 * 60));
    assert_eq!(plain.retries, 3);
    assert_eq!(custom.image.as_deref(), Some("rust:1.85"));
    assert_eq!(custom.timeout, Duration::from_secs(90 * 60));
    assert_eq!(custom.retries, 0);
}

#[test]
fn without_defaults_the_built_in_values_apply() {
    let pipeline = parse_ok(
        "
        pipeline: bare
        stages:
          build:
            commands: make
        ",
    );
    let stage = &pipeline.stages[0];
    assert_eq!(stage.commands, ["make"]);
    assert_eq!(stage.timeout, DEFAULT_TIMEOUT);
    assert_eq!(stage.retries, DEFAULT_RETRIES);
    assert_eq!(stage.image, None);
    assert!(stage.env.is_empty() && stage.agent_labels.is_empty() && stage.needs.is_empty());
}

#[test]
fn env_values_keep_their_text() {
    let pipeline = parse_ok(
        r#"
        pipeline: env
        stages:
          build:
            commands: [make]
            env:
              MODE: fast
              VERSION: 1.10
              WORKERS: 8
              HEX: 0x1F
              DEBUG: true
              EMPTY: ""
              QUOTED: "a: b"
              _under_score9: 'single'
        "#,
    );
    let expected = map(&[
        ("MODE", "fast"),
        ("VERSION", "1.10"),
        ("WORKERS", "8"),
        ("HEX", "0x1F"),
        ("DEBUG", "true"),
        ("EMPTY", ""),
        ("QUOTED", "a: b"),
        ("_under_score9", "single"),
    ]);
    assert_eq!(pipeline.stages[0].env, expected);
}

#[test]
fn commands_keep_order_and_multi_line_scripts() {
    let pipeline = parse_ok(
        "
        pipeline: scripts
        stages:
          build:
            commands:
              - make
              - \"echo done: ok\"
              - |
                for f in *.txt; do
                  wc -l $f
                done
        ",
    );
    assert_eq!(
        pipeline.stages[0].commands,
        [
            "make",
            "echo done: ok",
            "for f in *.txt; do\n  wc -l $f\ndone\n"
        ]
    );
}

#[test]
fn anchors_and_aliases_are_expanded() {
    let pipeline = parse_ok(
        "
        pipeline: anchors
        stages:
          a:
            commands: [make]
            env: &common { MODE: fast }
          b:
            commands: [make]
            env: *common
        ",
    );
    assert_eq!(pipeline.stages[1].env, map(&[("MODE", "fast")]));
}

#[test]
fn numeric_stage_names_are_names() {
    let pipeline = parse_ok(
        "
        pipeline: '2024.1'
        stages:
          1: { commands: [make] }
          2: { needs: [1], commands: [make] }
        ",
    );
    assert_eq!(pipeline.name, "2024.1");
    assert_eq!(needs_by_name(&pipeline), [("1", vec![]), ("2", vec!["1"])]);
}

/// The example from DESIGN.md, without the keys this version does not know
/// yet (triggers, artifacts, metrics, environment, endpoint, gate, monitor); the
/// acceptance gate becomes a plain stage.
#[test]
fn design_example() {
    let pipeline = parse_ok(
        "
        pipeline: customer-behavior
        defaults:
          image: kiln/python-ml:bookworm      # docker executor; ignored by process executor
          timeout: 15m
          retries: 1                          # re-dispatch on agent loss / infra failure
        stages:
          prepare:
            commands: [python -m src.prepare --out build/data]
          train:
            needs: [prepare]
            commands: [python -m src.train --data build/data --out build/model]
          unit-tests:
            needs: [prepare]
            commands: [pytest -q tests]
          evaluate:
            needs: [train]
            commands: [python -m src.evaluate --model build/model --out build/metrics.json]
          deploy-staging:
            needs: [evaluate, unit-tests]
            agent: { labels: { role: deploy } }
            commands: [./deploy.sh staging]
          acceptance:
            needs: [deploy-staging]
            commands: [./acceptance.sh]
          deploy-production:
            needs: [acceptance]
            agent: { labels: { role: deploy } }
            commands: [./deploy.sh production]
        ",
    );
    assert_eq!(pipeline.name, "customer-behavior");
    assert_eq!(
        needs_by_name(&pipeline),
        [
            ("prepare", vec![]),
            ("train", vec!["prepare"]),
            ("unit-tests", vec!["prepare"]),
            ("evaluate", vec!["train"]),
            ("deploy-staging", vec!["evaluate", "unit-tests"]),
            ("acceptance", vec!["deploy-staging"]),
            ("deploy-production", vec!["acceptance"]),
        ]
    );
    for stage in &pipeline.stages {
        assert_eq!(
            stage.image.as_deref(),
            Some("kiln/python-ml:bookworm"),
            "{}",
            stage.name
        );
        assert_eq!(
            stage.timeout,
            Duration::from_secs(15 * 60),
            "{}",
            stage.name
        );
        assert_eq!(stage.retries, 1, "{}", stage.name);
    }
    let deploy = &pipeline.stages[pipeline.stage_idx("deploy-production").unwrap()];
    assert_eq!(deploy.agent_labels, map(&[("role", "deploy")]));
    assert_eq!(deploy.commands, ["./deploy.sh production"]);
    assert!(pipeline.stages[0].agent_labels.is_empty());
}

#[test]
fn the_examples_in_the_repository_parse() {
    for (file, text) in [
        (
            "examples/hello/kiln.yml",
            include_str!("../../../../examples/hello/kiln.yml"),
        ),
        (
            "examples/customer-behavior/kiln.yml",
            include_str!("../../../../examples/customer-behavior/kiln.yml"),
        ),
    ] {
        if let Err(error) = super::parse(file, text) {
            panic!("{error}");
        }
    }
}
