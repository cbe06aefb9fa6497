//! Checking a file against a release's signed provenance, offline.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use ed25519_dalek::VerifyingKey;

use super::{PREDICATE_TYPE, ProvenanceError, STATEMENT_TYPE, Statement, dsse, key_id};
use crate::archive::{BlobDigest, HashingWriter};

/// A file found among a release's subjects, under a valid signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSubject {
    pub release_id: u64,
    /// The subject's name (`train/build/model/model.pkl`); the first one if
    /// the same content was released under several names.
    pub name: String,
    pub digest: BlobDigest,
    /// [`key_id`] of the key whose signature held.
    pub key_id: String,
}

/// Checks the envelope's signature by `key`, then that the statement is
/// release `release_id`'s Kiln provenance, and returns the statement.
pub fn verify_statement(
    envelope_json: &str,
    key: &VerifyingKey,
    release_id: u64,
) -> Result<Statement, ProvenanceError> {
    let payload = dsse::verify(envelope_json, key)?;
    let statement: Statement = serde_json::from_slice(&payload)
        .map_err(|e| ProvenanceError::bad_statement(format!("bad JSON: {e}")))?;
    if statement.statement_type != STATEMENT_TYPE {
        return Err(ProvenanceError::bad_statement(format!(
            "`_type` is `{}`, expected `{STATEMENT_TYPE}`",
            statement.statement_type
        )));
    }
    if statement.predicate_type != PREDICATE_TYPE {
        return Err(ProvenanceError::bad_statement(format!(
            "`predicateType` is `{}`, expected `{PREDICATE_TYPE}`",
            statement.predicate_type
        )));
    }
    let found = statement.release_id().ok_or_else(|| {
        ProvenanceError::bad_statement("`externalParameters.release.id` is missing")
    })?;
    if found != release_id {
        return Err(ProvenanceError::WrongRelease {
            expected: release_id,
            found,
        });
    }
    Ok(statement)
}

/// Verifies that `file` (a model file from inside an artifact, or an
/// artifact archive itself) is what release `release_id` released: the
/// signature first, then the file's sha256 against the subjects. The error
/// says which failed.
pub fn verify_file(
    mut file: impl Read,
    envelope_json: &str,
    key: &VerifyingKey,
    release_id: u64,
) -> Result<VerifiedSubject, ProvenanceError> {
    let statement = verify_statement(envelope_json, key, release_id)?;
    let mut hashing = HashingWriter::new(io::sink());
    io::copy(&mut file, &mut hashing)
        .map_err(|e| ProvenanceError::io("reading the file to verify", e))?;
    let digest = hashing.finish().1.digest;
    let hex = digest.hex();
    let subject = statement
        .subject
        .iter()
        .find(|subject| subject.digest.get("sha256") == Some(&hex))
        .ok_or(ProvenanceError::NotASubject { digest, release_id })?;
    Ok(VerifiedSubject {
        release_id,
        name: subject.name.clone(),
        digest,
        key_id: key_id(key),
    })
}

/// [`verify_file`] on the file at `path`.
pub fn verify_path(
    path: &Path,
    envelope_json: &str,
    key: &VerifyingKey,
    release_id: u64,
) -> Result<VerifiedSubject, ProvenanceError> {
    // Opened before anything is verified, so a wrong path is reported as such.
    let file = File::open(path)
        .map_err(|e| ProvenanceError::io(format!("opening `{}`", path.display()), e))?;
    verify_file(file, envelope_json, key, release_id)
}
