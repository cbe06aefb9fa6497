//! The signing key file and the exported public key.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use sha2::{Digest as _, Sha256};

use super::assert_mentions;
use crate::provenance::{
    ProvenanceError, key_id, load_or_generate, load_public_key_pem, public_key_pem,
};

#[test]
fn a_key_is_generated_once_with_mode_0600_and_loaded_after() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/provenance.key");

    let (generated, created) = load_or_generate(&path).unwrap();
    assert!(created);
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let pem = fs::read_to_string(&path).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    // Only the key is left in the directory: no temp file.
    assert_eq!(fs::read_dir(dir.path().join("data")).unwrap().count(), 1);

    let (loaded, created) = load_or_generate(&path).unwrap();
    assert!(!created);
    assert_eq!(loaded.to_bytes(), generated.to_bytes());
}

#[test]
fn a_key_file_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("provenance.key");
    load_or_generate(&path).unwrap();
    for mode in [0o640, 0o604, 0o644] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let error = load_or_generate(&path).unwrap_err();
        assert!(
            matches!(error, ProvenanceError::KeyPermissions { .. }),
            "{error:?}"
        );
        assert_mentions(
            &error,
            &format!("has mode {mode:04o} and is readable by group or others"),
        );
        assert_mentions(&error, &format!("chmod 600 {}", path.display()));
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    assert!(!load_or_generate(&path).unwrap().1);
}

#[test]
fn a_key_file_that_is_not_a_key_is_refused_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("provenance.key");
    fs::write(&path, "not a key").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let error = load_or_generate(&path).unwrap_err();
    assert_mentions(&error, "is not an ed25519 PKCS#8 PEM key");
    assert_eq!(fs::read_to_string(&path).unwrap(), "not a key");
}

#[test]
fn the_public_key_round_trips_through_pem_and_has_a_stable_id() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = load_or_generate(&dir.path().join("k")).unwrap();
    let public = key.verifying_key();
    let pem = public_key_pem(&public);
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
    assert_eq!(load_public_key_pem(&pem).unwrap(), public);
    // Pasted with surrounding whitespace, as from a terminal.
    assert_eq!(
        load_public_key_pem(&format!("\n  {pem}\n")).unwrap(),
        public
    );

    let id = key_id(&public);
    assert_eq!(id, hex::encode(Sha256::digest(public.as_bytes())));
    assert_eq!(id.len(), 64);

    let error = load_public_key_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
        .unwrap_err();
    assert_mentions(
        &error,
        "public key is not an ed25519 SubjectPublicKeyInfo PEM",
    );
}
