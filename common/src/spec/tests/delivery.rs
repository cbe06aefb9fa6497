//! `metrics`, `environment`, `gate` and `monitor`.

use std::time::Duration;

use super::{check, parse_ok};
use crate::spec::{Approval, Condition, MaxRegression, MonitorSource, OnBreach, OnMissing, Op};

#[test]
fn the_design_example_reads_as_written() {
    let pipeline = parse_ok(
        r#"
        pipeline: customer-behavior
        stages:
          evaluate:
            commands: [python -m src.evaluate]
            metrics: build/metrics.json
          deploy-staging:
            needs: [evaluate]
            environment: staging
            commands: [./deploy.sh staging]
          acceptance:
            needs: [deploy-staging]
            gate:
              require: { recall: ">= 0.10", precision: ">= 0.15", accuracy: ">= 0.90" }
              compare_to: production
              max_regression: { recall: 0.02, precision: "5%" }
              approval: manual
          deploy-production:
            needs: [acceptance]
            environment: production
            commands: [./deploy.sh production]
            monitor:
              scrape: http://127.0.0.1:9101/metrics
              every: 10s
              rollback_when: { model_error_ratio: "> 0.05" }
              failure_limit: 3
              for: 10m
        "#,
    );
    let evaluate = &pipeline.stages[0];
    assert_eq!(evaluate.metrics.as_deref(), Some("build/metrics.json"));
    assert_eq!(pipeline.stages[1].environment.as_deref(), Some("staging"));
    let gate = pipeline.stages[2].gate.as_ref().unwrap();
    assert!(pipeline.stages[2].commands.is_empty());
    assert_eq!(
        gate.require["recall"],
        Condition {
            op: Op::Ge,
            value: 0.10
        }
    );
    assert_eq!(gate.compare_to.as_deref(), Some("production"));
    assert_eq!(
        gate.max_regression["recall"],
        MaxRegression {
            amount: 0.02,
            relative: false
        }
    );
    assert_eq!(
        gate.max_regression["precision"],
        MaxRegression {
            amount: 0.05,
            relative: true
        }
    );
    assert_eq!(
        (gate.on_missing, gate.approval),
        (OnMissing::Fail, Approval::Manual)
    );
    let monitor = pipeline.stages[3].monitor.as_ref().unwrap();
    assert!(
        matches!(&monitor.source, MonitorSource::Scrape { url, .. } if url == "http://127.0.0.1:9101/metrics")
    );
    assert_eq!(
        (monitor.every, monitor.window),
        (Duration::from_secs(10), Duration::from_secs(600))
    );
    assert_eq!(
        monitor.rollback_when["model_error_ratio"],
        Condition {
            op: Op::Gt,
            value: 0.05
        }
    );
    assert_eq!(
        (monitor.failure_limit, monitor.on_breach),
        (3, OnBreach::Rollback)
    );
}

#[test]
fn mistakes_in_delivery_keys() {
    check(
        "
        pipeline: p
        stages:
          g:
            commands: [x]
            gate: { require: { recall: \">= 0.1\" } }
        ",
        "kiln.yml:5:11: stage `g` is a gate, which the coordinator evaluates without running anything; \
         remove `commands` or make it a separate stage",
    );
    check(
        "
        pipeline: p
        stages:
          g:
            gate: { require: { recall: \"at least 0.1\" } }
        ",
        "kiln.yml:4:32: bad condition `at least 0.1` in `require` in `gate` of stage `g`; write a \
         comparison and a number, like \">= 0.9\" (one of >=, <=, >, <, ==)",
    );
    check(
        "
        pipeline: p
        stages:
          g:
            gate: { max_regression: { recall: 0.1 } }
        ",
        "kiln.yml:4:11: `max_regression` of `recall` in stage `g` needs a champion; add `compare_to: ENVIRONMENT`",
    );
    check(
        "
        pipeline: p
        stages:
          d:
            commands: [x]
            monitor: { scrape: http://h/metrics, rollback_when: { e: \"> 1\" } }
        ",
        "kiln.yml:5:14: stage `d` has a `monitor` but no `environment`; a monitor watches the release \
         an environment stage makes",
    );
    check(
        "
        pipeline: p
        stages:
          d:
            commands: [x]
            environment: prod
            monitor: { rollback_when: { e: \"> 1\" } }
        ",
        "kiln.yml:6:14: `monitor` of stage `d` has no source; add `scrape: URL` or `prometheus: {url, query}`",
    );
}

#[test]
fn retraining_after_a_rollback_needs_a_gate_against_the_champion() {
    let pipeline = parse_ok(
        r#"
        pipeline: p
        stages:
          gate:
            gate: { require: { recall: ">= 0.1" }, compare_to: production }
          deploy:
            needs: [gate]
            environment: production
            commands: [./deploy.sh]
            monitor:
              scrape: http://127.0.0.1:9101/metrics
              rollback_when: { input_psi: "> 0.25" }
              on_breach: [rollback, retrain]
        "#,
    );
    let monitor = pipeline.stages[1].monitor.as_ref().unwrap();
    assert_eq!(
        (monitor.on_breach, monitor.retrain),
        (OnBreach::Rollback, true)
    );
    let without_gate = "
        pipeline: p
        stages:
          deploy:
            environment: production
            commands: [./deploy.sh]
            monitor:
              scrape: http://127.0.0.1:9101/metrics
              rollback_when: { e: \"> 1\" }
              on_breach: [rollback, retrain]
        ";
    check(
        without_gate,
        "kiln.yml:7:7: `on_breach: [rollback, retrain]` of stage `deploy` needs a gate that \
         compares the retrained model with the restored one; add `compare_to: production` to a \
         gate",
    );
    for (on_breach, error) in [
        (
            "[freeze, retrain]",
            "`retrain` follows a rollback, not a freeze",
        ),
        (
            "retrain",
            "`retrain` follows a rollback; write `[rollback, retrain]`",
        ),
        (
            "[retrain]",
            "`retrain` follows a rollback; write `[rollback, retrain]`",
        ),
        (
            "[rollback, freeze]",
            "must be `rollback`, `freeze` or `[rollback, retrain]`",
        ),
    ] {
        let yaml = without_gate.replace("[rollback, retrain]", on_breach);
        let error_text = match crate::spec::parse("kiln.yml", &super::trim_indent(&yaml)) {
            Ok(_) => panic!("{on_breach} was accepted"),
            Err(error) => error.to_string(),
        };
        assert!(error_text.contains(error), "{on_breach}: {error_text}");
    }
}

#[test]
fn an_endpoint_belongs_to_an_environment_stage() {
    let pipeline = parse_ok(
        r#"
        pipeline: p
        stages:
          deploy:
            environment: staging
            endpoint: http://127.0.0.1:9102
            commands: [./deploy.sh staging]
        "#,
    );
    assert_eq!(
        pipeline.stages[0].endpoint.as_deref(),
        Some("http://127.0.0.1:9102")
    );
    check(
        "
        pipeline: p
        stages:
          check:
            endpoint: http://127.0.0.1:9102
            commands: [x]
        ",
        "kiln.yml:4:15: stage `check` has an `endpoint` but no `environment`; an endpoint is \
         where an environment stage's release is served",
    );
    check(
        "
        pipeline: p
        stages:
          deploy:
            environment: staging
            endpoint: 127.0.0.1:9102
            commands: [x]
        ",
        "kiln.yml:5:15: `endpoint` in stage `deploy` must be an http:// or https:// URL; found \
         `127.0.0.1:9102`",
    );
}

#[test]
fn a_model_names_what_an_environment_stage_releases() {
    let pipeline = parse_ok(
        r#"
        pipeline: p
        stages:
          deploy:
            environment: staging
            model: churn
            commands: [./deploy.sh staging]
        "#,
    );
    assert_eq!(pipeline.stages[0].model.as_deref(), Some("churn"));
    check(
        "
        pipeline: p
        stages:
          train:
            model: churn
            commands: [x]
        ",
        "kiln.yml:4:12: stage `train` has a `model` but no `environment`; `model` names what \
         an environment stage releases",
    );
    check(
        "
        pipeline: p
        stages:
          deploy:
            environment: staging
            model: Churn@2
            commands: [x]
        ",
        "kiln.yml:5:12: bad model name `Churn@2`; use lowercase letters, digits, `.`, `_` and \
         `-`, starting with a letter or digit, at most 64 characters",
    );
}
