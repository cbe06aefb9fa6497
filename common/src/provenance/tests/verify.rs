//! `kiln verify`'s side: a file checked against the signed provenance with
//! only the exported public key.

use std::fs;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::{MODEL, RELEASE_ID, Release, assert_mentions};
use crate::archive::{BlobDigest, Limits, unpack};
use crate::provenance::dsse::Envelope;
use crate::provenance::{
    ProvenanceError, SigningKey, load_public_key_pem, sign_release, verify_file, verify_path,
};

#[test]
fn the_model_file_verifies_with_the_exported_public_key() {
    let release = Release::new();
    let public = load_public_key_pem(&release.public_key_pem).unwrap();
    let verified = verify_path(
        &release.model(),
        &release.signed.envelope_json,
        &public,
        RELEASE_ID,
    )
    .unwrap();
    assert_eq!(verified.release_id, RELEASE_ID);
    assert_eq!(verified.name, "train/build/model/model.pkl");
    assert_eq!(verified.digest, BlobDigest::of(MODEL));
    assert_eq!(verified.key_id, release.signed.key_id);
}

#[test]
fn the_model_file_verifies_once_unpacked_elsewhere() {
    let release = Release::new();
    let target = tempfile::tempdir().unwrap();
    let archive = fs::File::open(&release.model_archive).unwrap();
    unpack(archive, target.path(), &Limits::UNLIMITED).unwrap();
    let public = load_public_key_pem(&release.public_key_pem).unwrap();
    let verified = verify_path(
        &target.path().join("build/model/config.json"),
        &release.signed.envelope_json,
        &public,
        RELEASE_ID,
    )
    .unwrap();
    assert_eq!(verified.name, "train/build/model/config.json");
}

#[test]
fn the_archive_itself_verifies() {
    let release = Release::new();
    let public = load_public_key_pem(&release.public_key_pem).unwrap();
    let verified = verify_path(
        &release.model_archive,
        &release.signed.envelope_json,
        &public,
        RELEASE_ID,
    )
    .unwrap();
    assert_eq!(verified.name, "train/build/model.tar.zst");
}

#[test]
fn one_changed_byte_of_the_model_fails() {
    let release = Release::new();
    let public = load_public_key_pem(&release.public_key_pem).unwrap();
    let mut model = MODEL.to_vec();
    model[5] ^= 1;
    fs::write(release.model(), &model).unwrap();

    let error = verify_path(
        &release.model(),
        &release.signed.envelope_json,
        &public,
        RELEASE_ID,
    )
    .unwrap_err();
    assert!(
        matches!(error, ProvenanceError::NotASubject { .. }),
        "{error:?}"
    );
    assert_mentions(
        &error,
        &format!(
            "file {} is not a subject of release 7's provenance",
            BlobDigest::of(&model)
        ),
    );
}

#[test]
fn one_changed_byte_of_the_statement_fails() {
    let release = Release::new();
    let public = load_public_key_pem(&release.public_key_pem).unwrap();
    let envelope: Envelope = serde_json::from_str(&release.signed.envelope_json).unwrap();
    let payload = STANDARD.decode(&envelope.payload).unwrap();
    // Sixteen positions spread over the whole statement, not one chosen to
    // be harmless or fatal.
    for position in (0..payload.len()).step_by(payload.len() / 16) {
        let mut changed = payload.clone();
        changed[position] ^= 0x20;
        let tampered = Envelope {
            payload: STANDARD.encode(&changed),
            ..envelope.clone()
        };
        let error = verify_file(
            MODEL,
            &serde_json::to_string(&tampered).unwrap(),
            &public,
            RELEASE_ID,
        )
        .unwrap_err();
        assert!(
            matches!(error, ProvenanceError::BadSignature { .. }),
            "{error:?}"
        );
        assert_mentions(&error, "the statement was changed after it was signed");
    }
}

#[test]
fn a_different_key_fails() {
    let release = Release::new();
    let other = SigningKey::from_bytes(&[3; 32]);
    let error = verify_file(
        MODEL,
        &release.signed.envelope_json,
        &other.verifying_key(),
        RELEASE_ID,
    )
    .unwrap_err();
    assert!(
        matches!(error, ProvenanceError::NoSignatureFromKey { .. }),
        "{error:?}"
    );

    // Signed by the other key, checked with the release's: refused too.
    let forged = sign_release(&release.facts, &release.listings, &other).unwrap();
    let public = load_public_key_pem(&release.public_key_pem).unwrap();
    let error = verify_file(MODEL, &forged.envelope_json, &public, RELEASE_ID).unwrap_err();
    assert!(
        matches!(error, ProvenanceError::NoSignatureFromKey { .. }),
        "{error:?}"
    );
}

#[test]
fn another_release_s_provenance_is_refused() {
    let release = Release::new();
    let public = release.key.verifying_key();
    let error = verify_file(MODEL, &release.signed.envelope_json, &public, 8).unwrap_err();
    assert_mentions(&error, "provenance is for release 7, not release 8");
}

#[test]
fn the_signed_provenance_is_consistent() {
    let release = Release::new();
    let signed = &release.signed;
    assert_eq!(
        signed.digest,
        BlobDigest::of(signed.envelope_json.as_bytes())
    );
    let envelope: Envelope = serde_json::from_str(&signed.envelope_json).unwrap();
    let payload: serde_json::Value =
        serde_json::from_slice(&STANDARD.decode(&envelope.payload).unwrap()).unwrap();
    assert_eq!(payload, release.statement_json());
}
