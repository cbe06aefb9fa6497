//! `secrets:` on a stage: names of kiln secrets, passed as variables.

use super::{check, is_secret_name, parse_ok};

#[test]
fn listed_secrets_are_on_the_stage_in_file_order() {
    let pipeline = parse_ok(
        "
        pipeline: demo
        stages:
          train:
            commands: [make]
            env: { MODE: fast }
            secrets: [HF_TOKEN, _S3_KEY2]
          test: { commands: [make test] }
        ",
    );
    assert_eq!(pipeline.stages[0].secrets, ["HF_TOKEN", "_S3_KEY2"]);
    assert!(pipeline.stages[1].secrets.is_empty());
}

#[test]
fn secret_name_rule() {
    assert!(is_secret_name("A"));
    assert!(is_secret_name("_"));
    assert!(is_secret_name(&"A".repeat(64)));
    for bad in [
        "",
        "a",
        "Hf_TOKEN",
        "1A",
        "A-B",
        "A B",
        "É",
        &"A".repeat(65),
    ] {
        assert!(!is_secret_name(bad), "{bad:?}");
    }
}

#[test]
fn errors() {
    let rule = "use upper-case letters, digits and `_`, not starting with a digit, at most 64 \
                characters, like `HF_TOKEN`";
    let long = "A".repeat(65);
    let cases = [
        (
            "secrets: HF_TOKEN".to_owned(),
            "5:14: `secrets` in stage `train` must be a list of secret names, like `secrets: [HF_TOKEN]`; found the string `HF_TOKEN`".to_owned(),
        ),
        (
            "secrets: [hf_token]".to_owned(),
            format!("5:15: bad secret name `hf_token` in `secrets` in stage `train`; {rule}"),
        ),
        (
            "secrets: [1TOKEN]".to_owned(),
            format!("5:15: bad secret name `1TOKEN` in `secrets` in stage `train`; {rule}"),
        ),
        (
            format!("secrets: [{long}]"),
            format!("5:15: bad secret name `{long}` in `secrets` in stage `train`; {rule}"),
        ),
        (
            "secrets: [A, 42]".to_owned(),
            "5:18: `secrets` in stage `train` must be secret names, like `HF_TOKEN`; found the number `42`".to_owned(),
        ),
        (
            "secrets: [A, B, A]".to_owned(),
            "5:21: secret `A` is listed twice in `secrets` in stage `train`; list it once"
                .to_owned(),
        ),
        (
            "secrets: [MODE]".to_owned(),
            "5:14: stage `train` sets `MODE` in `env` and also lists it in `secrets`; a secret becomes the variable of its name, so remove one of the two".to_owned(),
        ),
    ];
    for (line, expected) in cases {
        check(
            &format!(
                "pipeline: demo\nstages:\n  train:\n    env: {{ MODE: fast }}\n    {line}\n    commands: [make]\n"
            ),
            &format!("kiln.yml:{expected}"),
        );
    }
}

#[test]
fn a_gate_has_no_secrets() {
    check(
        "
        pipeline: demo
        stages:
          train: { commands: [make] }
          acceptance:
            needs: [train]
            secrets: [HF_TOKEN]
            gate: { require: { accuracy: '>= 0.9' } }
        ",
        "kiln.yml:7:11: stage `acceptance` is a gate, which the coordinator evaluates without \
         running anything; remove `secrets` or make it a separate stage",
    );
}
