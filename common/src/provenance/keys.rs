//! The coordinator's ed25519 signing key on disk, and its public half as
//! text.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use super::ProvenanceError;

/// Loads the signing key at `path`, or generates one there if no file
/// exists; `created` says which happened, so the caller can log that a new
/// key (and so a new public key to distribute) was made.
///
/// The key is stored as PKCS#8 PEM, mode 0600. A new key is written to a
/// temporary file beside `path` and renamed into place, so a crash never
/// leaves a half-written key; the caller holds the data directory
/// exclusively, so no other process races the rename. An existing key that
/// group or others can read is refused rather than used: it may have leaked.
pub fn load_or_generate(path: &Path) -> Result<(SigningKey, bool), ProvenanceError> {
    let shown = path.display().to_string();
    match fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(ProvenanceError::KeyPermissions { path: shown, mode });
            }
            let pem = fs::read_to_string(path)
                .map_err(|e| ProvenanceError::io(format!("reading signing key `{shown}`"), e))?;
            let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
                ProvenanceError::InvalidSigningKey {
                    path: shown,
                    reason: e.to_string(),
                }
            })?;
            Ok((key, false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((generate_at(path)?, true)),
        Err(e) => Err(ProvenanceError::io(
            format!("reading signing key `{shown}`"),
            e,
        )),
    }
}

/// A fresh key from the OS random generator, written atomically to `path`.
fn generate_at(path: &Path) -> Result<SigningKey, ProvenanceError> {
    let mut seed = [0u8; ed25519_dalek::SECRET_KEY_LENGTH];
    getrandom::fill(&mut seed).map_err(|e| ProvenanceError::Random {
        reason: e.to_string(),
    })?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| ProvenanceError::Random {
            reason: format!("encoding the new key: {e}"),
        })?;

    crate::files::write_private(path, pem.as_bytes()).map_err(|e| {
        ProvenanceError::io(format!("writing new signing key `{}`", path.display()), e)
    })?;
    Ok(key)
}

/// The public key as SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`),
/// the form `kiln verify` reads and `openssl pkey -pubin` understands.
pub fn public_key_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(LineEnding::LF)
        .expect("an ed25519 public key always encodes as SubjectPublicKeyInfo")
}

/// Parses a SubjectPublicKeyInfo PEM ed25519 public key.
pub fn load_public_key_pem(text: &str) -> Result<VerifyingKey, ProvenanceError> {
    VerifyingKey::from_public_key_pem(text.trim()).map_err(|e| ProvenanceError::InvalidPublicKey {
        reason: e.to_string(),
    })
}

/// The key's id in DSSE signatures and in `ProvenanceKey.key_id`: the
/// lowercase hex sha256 of the 32 raw public key bytes (not of the PEM or
/// DER encoding), so it is the same whichever way the key is written.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}
