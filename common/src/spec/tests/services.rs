//! `services:` of a docker stage: what they become, and each wrong shape
//! refused at its line and column.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{DEFAULT_HEALTH_TIMEOUT, Service, check, parse_ok};

#[test]
fn services_are_read_with_their_defaults() {
    let pipeline = parse_ok(
        r#"
        pipeline: svc
        defaults:
          image: kiln/test-busybox:1
        stages:
          test:
            commands: [wget -q -O- http://web:8080/]
            services:
              - name: web
                image: kiln/test-busybox:1
                command: httpd -f -p 8080
                health: wget -q -O- http://localhost:8080/
                health_timeout: 30s
              - { name: db, image: postgres:16, env: { POSTGRES_PASSWORD: x }, command: [postgres, -F] }
          plain: { commands: [make] }
        "#,
    );
    assert_eq!(
        pipeline.stages[0].services,
        vec![
            Service {
                name: "web".into(),
                image: "kiln/test-busybox:1".into(),
                env: BTreeMap::new(),
                command: vec!["sh".into(), "-c".into(), "httpd -f -p 8080".into()],
                health: Some("wget -q -O- http://localhost:8080/".into()),
                health_timeout: Duration::from_secs(30),
            },
            Service {
                name: "db".into(),
                image: "postgres:16".into(),
                env: [("POSTGRES_PASSWORD".to_owned(), "x".to_owned())].into(),
                command: vec!["postgres".into(), "-F".into()],
                health: None,
                health_timeout: DEFAULT_HEALTH_TIMEOUT,
            },
        ]
    );
    assert!(pipeline.stages[1].services.is_empty());
}

#[test]
fn services_start_only_beside_a_docker_stage() {
    check(
        "
        pipeline: svc
        stages:
          test:
            commands: [make test]
            services: [{ name: db, image: postgres:16 }]
        ",
        "kiln.yml:5:15: stage `test` has `services` but no image, so it would run as a host \
         process; services start only beside a docker stage: add `image:` to the stage or to \
         `defaults`",
    );
    check(
        "
        pipeline: svc
        defaults: { image: kiln/test-busybox:1 }
        stages:
          test:
            executor: process
            commands: [make test]
            services: [{ name: db, image: postgres:16 }]
        ",
        "kiln.yml:7:15: stage `test` runs as a host process (`executor: process`), and \
         `services` start only beside a docker stage; remove `services` or run the stage in an \
         `image:`",
    );
    check(
        "
        pipeline: svc
        stages:
          check:
            gate: { require: { accuracy: \">= 0.5\" } }
            services: [{ name: db, image: postgres:16 }]
        ",
        "kiln.yml:4:11: stage `check` is a gate, which the coordinator evaluates without running \
         anything; remove `services` or make it a separate stage",
    );
}

#[test]
fn bad_services_are_refused_where_they_are_written() {
    let stage = |services: &str| {
        format!(
            "
            pipeline: svc
            defaults: {{ image: kiln/test-busybox:1 }}
            stages:
              test:
                commands: [make test]
                services: {services}
            "
        )
    };
    check(
        &stage("[{ name: db, image: postgres:16, port: 5432 }]"),
        "kiln.yml:6:48: unknown key `port` in service 1 of stage `test`; expected one of: name, \
         image, env, command, health, health_timeout",
    );
    check(
        &stage("[{ image: postgres:16 }]"),
        "kiln.yml:6:16: service 1 of stage `test` has no `name`; add `name: db`, the host name \
         the stage reaches it by",
    );
    check(
        &stage("[{ name: db }]"),
        "kiln.yml:6:16: service `db` of stage `test` has no `image`; add `image: IMAGE`",
    );
    check(
        &stage("[{ name: DB_1, image: postgres:16 }]"),
        "kiln.yml:6:24: `name` in service 1 of stage `test` must be a host name: lowercase \
         letters, digits and `-`, starting with a letter, at most 63 characters; found the \
         string `DB_1`",
    );
    check(
        &stage("[{ name: db, image: a }, { name: db, image: b }]"),
        "kiln.yml:6:48: stage `test` has two services named `db`; each needs its own name",
    );
    check(
        &stage("[{ name: db, image: a, health: 3 }]"),
        "kiln.yml:6:46: `health` in service 1 of stage `test` must be a shell command that \
         succeeds once the service is ready, like `pg_isready`; found the number `3`",
    );
    check(
        &stage("[{ name: db, image: a, health_timeout: soon }]"),
        "kiln.yml:6:54: bad duration `soon` for `health_timeout` in service 1 of stage `test`; \
         use a number with a unit: 500ms, 30s, 15m, 2h",
    );
    check(
        &stage("{ name: db }"),
        "kiln.yml:6:15: `services` in stage `test` must be a list of services, like \
         `services: [{name: db, image: postgres:16, health: pg_isready}]`; found a mapping",
    );
}
