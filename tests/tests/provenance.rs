//! Signed provenance end to end: a release on a real coordinator and
//! process agent is signed; `kiln release provenance` hands out the
//! envelope; `kiln verify` checks the released model file with only the
//! public key and the envelope (no coordinator), and refuses a changed file
//! or a changed statement; `kiln lineage` finds the release from the model's
//! digest; the envelope survives a coordinator restart unchanged.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kiln_common::archive::BlobDigest;
use kiln_proto::v1 as pb;
use kiln_tests::delivery::history;
use kiln_tests::{
    Coordinator, CoordinatorOptions, Farm, Repo, eventually, kiln, register_and_run, wait_run,
};
use serde_json::Value;

/// `train` releases build/model (with model.bin) to staging through `deploy`.
const SPEC: &str = r#"
pipeline: signed
stages:
  train:
    commands: ["mkdir -p build/model", "cp weights.txt build/model/model.bin", "echo notes > build/model/README"]
    artifacts: [build/model]
  deploy:
    needs: [train]
    environment: staging
    commands: ["test -s build/model/model.bin"]
"#;

/// Nobody listens here: a command that tries to connect exits 3.
const DEAD_COORDINATOR: &str = "http://127.0.0.1:1";

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn succeeded(output: &Output, what: &str) -> Result<()> {
    anyhow::ensure!(
        output.status.success(),
        "{what} failed ({:?}): {}{}",
        output.status.code(),
        stdout(output),
        stderr(output)
    );
    Ok(())
}

/// The envelope as `kiln release provenance` prints it, once signed.
async fn signed_envelope(coordinator: &Coordinator, release: u64) -> Result<String> {
    let id = release.to_string();
    eventually(Duration::from_secs(20), "the release to be signed", || {
        let output = coordinator.kiln(&["release", "provenance", &id]);
        async move { Ok(output.status.success().then(|| stdout(&output))) }
    })
    .await
}

fn verify_offline(file: &Path, release: u64, key: &Path, envelope: &Path) -> Output {
    kiln(
        DEAD_COORDINATOR,
        &[
            "verify",
            file.to_str().unwrap(),
            "--release",
            &release.to_string(),
            "--key",
            key.to_str().unwrap(),
            "--provenance",
            envelope.to_str().unwrap(),
        ],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_released_model_verifies_offline_and_its_lineage_is_found() -> Result<()> {
    let mut farm = Farm::start(&CoordinatorOptions::default(), &[("signer", "", 2)])?;
    let repo = Repo::new(SPEC)?;
    let commit = repo.commit("weights.txt", "weights v1 \u{1}\u{2}\u{3}\n")?;
    let run_id = register_and_run(&farm.coordinator, &repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, run_id, Duration::from_secs(60)).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let release = history(&farm, "staging").await?.remove(0);
    let archive = release
        .artifacts
        .iter()
        .find(|a| a.stage == "train" && a.path == "build/model")
        .context("the release has train's build/model")?
        .digest
        .clone();

    // The envelope, byte for byte as stored: its digest is the release's.
    let work = tempfile::tempdir()?;
    let envelope_json = signed_envelope(&farm.coordinator, release.id).await?;
    let envelope_path = work.path().join("envelope.json");
    std::fs::write(&envelope_path, &envelope_json)?;
    let signed = client
        .get_release(pb::GetReleaseRequest {
            release_id: release.id,
        })
        .await?
        .into_inner();
    assert_eq!(
        signed.provenance_digest,
        BlobDigest::of(envelope_json.as_bytes()).to_string()
    );

    // The model file as a user gets it, and the key as an operator hands it out.
    let out = work.path().join("out");
    let fetched = farm.coordinator.kiln(&[
        "artifacts",
        "get",
        &run_id.to_string(),
        "train",
        "build/model",
        "-o",
        out.to_str().unwrap(),
    ]);
    succeeded(&fetched, "kiln artifacts get")?;
    let model = out.join("build/model/model.bin");
    let model_digest = BlobDigest::of(&std::fs::read(&model)?);
    let key = work.path().join("provenance.pub");
    std::fs::copy(farm.coordinator.data_dir.join("provenance.pub"), &key)?;

    // Offline: the coordinator's address is dead, and it still verifies.
    let verified = verify_offline(&model, release.id, &key, &envelope_path);
    succeeded(&verified, "offline kiln verify")?;
    let said = stdout(&verified);
    assert!(
        said.contains("train/build/model/model.bin") && said.contains(&model_digest.to_string()),
        "{said}"
    );
    assert!(
        !stderr(&verified).contains("warning"),
        "{}",
        stderr(&verified)
    );

    // One flipped byte in the model: not a subject.
    let mut bytes = std::fs::read(&model)?;
    bytes[0] ^= 0x01;
    let changed = work.path().join("changed.bin");
    std::fs::write(&changed, &bytes)?;
    let refused = verify_offline(&changed, release.id, &key, &envelope_path);
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("is not a subject"),
        "{}",
        stderr(&refused)
    );

    // One changed byte in the signed statement: the signature fails.
    let mut envelope: Value = serde_json::from_str(&envelope_json)?;
    let mut payload = STANDARD.decode(envelope["payload"].as_str().unwrap())?;
    let at = payload
        .windows(b"staging".len())
        .position(|w| w == b"staging")
        .context("the statement names the environment")?;
    payload[at] = b'S';
    envelope["payload"] = Value::from(STANDARD.encode(&payload));
    let tampered = work.path().join("tampered.json");
    std::fs::write(&tampered, serde_json::to_string(&envelope)?)?;
    let refused = verify_offline(&model, release.id, &key, &tampered);
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("signature") && stderr(&refused).lines().count() == 1,
        "{}",
        stderr(&refused)
    );

    // Asked about another release, the same envelope does not vouch.
    let refused = verify_offline(&model, release.id + 1, &key, &envelope_path);
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));

    // Online, with the key fetched: it works, and says whom it trusts.
    let online = farm.coordinator.kiln(&[
        "verify",
        model.to_str().unwrap(),
        "--release",
        &release.id.to_string(),
    ]);
    succeeded(&online, "online kiln verify")?;
    assert!(
        stderr(&online).starts_with("warning:") && stderr(&online).contains("trusts"),
        "{}",
        stderr(&online)
    );

    // The statement: in-toto v1, SLSA v1, the model among the subjects,
    // the run's commit among the dependencies, a builder.
    let shown = farm.coordinator.kiln(&[
        "release",
        "provenance",
        &release.id.to_string(),
        "--statement",
    ]);
    succeeded(&shown, "kiln release provenance --statement")?;
    let statement: Value = serde_json::from_str(&stdout(&shown))?;
    assert_eq!(statement["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(statement["predicateType"], "https://slsa.dev/provenance/v1");
    let subjects = statement["subject"].as_array().unwrap();
    assert!(
        subjects
            .iter()
            .any(|s| s["name"] == "train/build/model/model.bin"
                && s["digest"]["sha256"] == model_digest.hex()),
        "{subjects:#?}"
    );
    assert!(
        subjects
            .iter()
            .any(|s| format!("sha256:{}", s["digest"]["sha256"].as_str().unwrap()) == archive),
        "{subjects:#?}"
    );
    let dependencies = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    assert!(
        dependencies
            .iter()
            .any(|d| d["digest"]["gitCommit"] == commit.as_str()),
        "{dependencies:#?}"
    );
    assert!(
        statement["predicate"]["runDetails"]["builder"]["id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{statement:#?}"
    );

    // `--out` writes the same bytes.
    let written = work.path().join("written.json");
    let out_flag = farm.coordinator.kiln(&[
        "release",
        "provenance",
        &release.id.to_string(),
        "--out",
        written.to_str().unwrap(),
    ]);
    succeeded(&out_flag, "kiln release provenance --out")?;
    assert_eq!(std::fs::read_to_string(&written)?, envelope_json);

    // Lineage from the model file's digest: the release.
    let found = farm
        .coordinator
        .kiln(&["lineage", &model_digest.to_string()]);
    succeeded(&found, "kiln lineage (file)")?;
    let table = stdout(&found);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "RUN",
            "PIPELINE",
            "STAGE",
            "RELATION",
            "RELEASE/ENV",
            "PATH"
        ]
    );
    assert!(
        table.lines().any(|line| line.contains("released")
            && line.contains(&format!("{}/staging", release.id))
            && line.contains("train/build/model/model.bin")),
        "{table}"
    );

    // Lineage from the archive's digest: produced, consumed, released.
    let found = farm
        .coordinator
        .kiln(&["lineage", &archive, "--output", "json"]);
    succeeded(&found, "kiln lineage (archive)")?;
    let uses: Vec<Value> = serde_json::from_str(&stdout(&found))?;
    let relation = |relation: &str, stage: &str| {
        uses.iter()
            .any(|u| u["relation"] == relation && u["stage"] == stage && u["run_id"] == run_id)
    };
    assert!(
        relation("produced", "train") && relation("consumed", "deploy"),
        "{uses:#?}"
    );
    assert!(
        uses.iter()
            .any(|u| u["relation"] == "released" && u["release_id"] == release.id),
        "{uses:#?}"
    );

    // `release show` names the code, the image and the signed provenance.
    let shown = farm
        .coordinator
        .kiln(&["release", "show", &release.id.to_string()]);
    succeeded(&shown, "kiln release show")?;
    let text = stdout(&shown);
    assert!(
        text.contains(&format!("@ {commit}"))
            && text.contains(&format!("provenance {}", signed.provenance_digest)),
        "{text}"
    );

    // A restart on the same data dir serves the very same envelope.
    let port = farm.coordinator.grpc.clone();
    let data_dir = farm.coordinator.data_dir.clone();
    farm.coordinator.process.kill9();
    let options = CoordinatorOptions {
        grpc: port,
        ..Default::default()
    };
    farm.coordinator = Coordinator::start(&data_dir, &options)?;
    assert_eq!(
        signed_envelope(&farm.coordinator, release.id).await?,
        envelope_json
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_refuses_what_it_cannot_read_as_input_errors() -> Result<()> {
    let work = tempfile::tempdir()?;
    let key = work.path().join("key.pem");
    std::fs::write(&key, "not a key")?;
    let envelope = work.path().join("envelope.json");
    std::fs::write(&envelope, "{}")?;
    let missing = verify_offline(&work.path().join("missing.bin"), 1, &key, &envelope);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    // Without --provenance the envelope must come from the coordinator.
    let file = work.path().join("model.bin");
    std::fs::write(&file, "x")?;
    let fetched = kiln(
        DEAD_COORDINATOR,
        &["verify", file.to_str().unwrap(), "--release", "1"],
    );
    assert_eq!(fetched.status.code(), Some(3), "{}", stderr(&fetched));
    Ok(())
}
