//! `artifacts:` in both forms, and the paths it refuses.

use super::{check, parse_ok};

#[test]
fn short_and_long_forms() {
    let pipeline = parse_ok(
        "
        pipeline: p
        stages:
          train:
            commands: [make]
            artifacts: [build/model, build/metrics.json]
          report:
            commands: [make report]
            artifacts:
              paths: [report.xml]
              when: always
        ",
    );
    assert_eq!(
        pipeline.stages[0].artifacts,
        ["build/model", "build/metrics.json"]
    );
    assert!(!pipeline.stages[0].artifacts_always);
    assert_eq!(pipeline.stages[1].artifacts, ["report.xml"]);
    assert!(pipeline.stages[1].artifacts_always);
}

#[test]
fn paths_must_stay_in_the_workspace() {
    let with = |paths: &str| {
        format!("\npipeline: p\nstages:\n  a:\n    commands: [x]\n    artifacts: {paths}\n")
    };
    for (paths, column, fragment) in [
        ("[/etc/passwd]", 17, "artifact path `/etc/passwd`"),
        ("[../up]", 17, "artifact path `../up`"),
        ("[a/../../b]", 17, "artifact path `a/../../b`"),
        (
            "[x, x]",
            20,
            "artifact path `x` is listed twice in `artifacts` in stage `a`; list it once",
        ),
    ] {
        let error = kiln_error(&with(paths));
        assert!(
            error.starts_with(&format!("kiln.yml:5:{column}: ")),
            "{error}"
        );
        assert!(error.contains(fragment), "{error}");
    }
    check(
        "
        pipeline: p
        stages:
          a:
            commands: [x]
            artifacts: {paths: [x], when: sometimes}
        ",
        "kiln.yml:5:35: `when` in `artifacts` of stage `a` must be `always` or `on_success`; found the string `sometimes`",
    );
}

fn kiln_error(yaml: &str) -> String {
    let text = yaml.strip_prefix('\n').unwrap_or(yaml);
    crate::spec::parse("kiln.yml", text)
        .unwrap_err()
        .to_string()
}
