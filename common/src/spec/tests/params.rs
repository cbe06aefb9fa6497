//! `params:` and the top-level `env:`.

use super::{ParamKind, check, parse_ok};

#[test]
fn params_are_declared_with_types_and_defaults() {
    let pipeline = parse_ok(
        "
        pipeline: p
        env: { REGION: eu, LEVEL: \"1\" }
        params:
          EPOCHS: { type: int, default: 10 }
          MODE: { type: choice, choices: [fast, full], default: full }
          NOTE: { type: string }
        stages:
          a: { commands: [x], env: { LEVEL: \"2\" } }
          b: { commands: [x] }
        ",
    );
    let declared: Vec<(&str, &ParamKind, Option<&str>)> = pipeline
        .params
        .iter()
        .map(|p| (p.name.as_str(), &p.kind, p.default.as_deref()))
        .collect();
    let choice = ParamKind::Choice(vec!["fast".into(), "full".into()]);
    assert_eq!(
        declared,
        [
            ("EPOCHS", &ParamKind::Int, Some("10")),
            ("MODE", &choice, Some("full")),
            ("NOTE", &ParamKind::String, None),
        ]
    );
    // The pipeline's env under each stage's own.
    assert_eq!(pipeline.stages[0].env["LEVEL"], "2");
    assert_eq!(pipeline.stages[0].env["REGION"], "eu");
    assert_eq!(pipeline.stages[1].env["LEVEL"], "1");
}

#[test]
fn bad_params_say_what_to_write() {
    check(
        "
        pipeline: p
        params:
          EPOCHS: { type: int, default: ten }
        stages: { a: { commands: [x] } }
        ",
        "kiln.yml:3:33: the default of parameter `EPOCHS` is an int (like `10` or `-3`); `ten` is not",
    );
    check(
        "
        pipeline: p
        params:
          EPOCHS: { type: integer }
        stages: { a: { commands: [x] } }
        ",
        "kiln.yml:3:19: parameter `EPOCHS` has type `integer`; use int, float, string, bool or choice",
    );
    check(
        "
        pipeline: p
        params:
          KILN_X: { type: int }
        stages: { a: { commands: [x] } }
        ",
        "kiln.yml:3:3: bad parameter name `KILN_X`; stages get it as an environment variable, so use letters, digits and `_`, not starting with a digit, and not `KILN_*` or `CI`",
    );
    check(
        "
        pipeline: p
        params:
          EPOCHS: { type: int, default: 3 }
        stages: { a: { commands: [x], env: { EPOCHS: \"5\" } } }
        ",
        "kiln.yml:3:3: `EPOCHS` is a parameter and is also set in stage `a`; stages get the run's value of a parameter, so rename one of them",
    );
    check(
        "
        pipeline: p
        params:
          M: { type: choice }
        stages: { a: { commands: [x] } }
        ",
        "kiln.yml:3:14: parameter `M` is a choice without `choices`; add `choices: [a, b]`",
    );
}
