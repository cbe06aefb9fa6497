//! Signed provenance for releases: an in-toto Statement v1 with a SLSA
//! Provenance v1 predicate, in a DSSE envelope signed with the coordinator's
//! ed25519 key.
//!
//! At release time the coordinator lists each released artifact archive
//! ([`list_archive`]), and calls [`sign_release`] with the [`ReleaseFacts`]
//! and its key (from [`load_or_generate`]). `kiln verify` checks a model
//! file, or an artifact archive, offline with [`verify_path`] and the
//! exported public key ([`public_key_pem`], [`load_public_key_pem`]).
//!
//! Subjects are every released archive (`<stage>/<artifact path>.tar.zst`)
//! and every regular file inside it (`<stage>/<path in the archive>`), by
//! sha256, so a user can verify the `model.pkl` they were handed without the
//! archive it came in.
//!
//! Everything is pure: no network, no clock, no process environment; the
//! only files touched are the key file and the file being verified.
//!
//! **Architecture Invariant:** nothing from an envelope is trusted before
//! its signature verifies: [`dsse::verify`] is the only way to the payload.
//!
//! # Layout
//! - `keys`: the signing key file (PKCS#8 PEM, 0600), the public key PEM and
//!   [`key_id`].
//! - `facts`: [`ReleaseFacts`], what the coordinator knows about a release.
//! - `statement`: [`ReleaseFacts`] in, [`Statement`] out; the serde types
//!   spell the in-toto and SLSA field names, and [`BUILD_TYPE`] says what
//!   Kiln puts in the parameters.
//! - `subjects`: [`list_archive`] and [`subjects`].
//! - [`dsse`]: the envelope, PAE, signing and verification.
//! - `verify`: [`verify_file`], [`verify_path`] and [`verify_statement`].
//! - `error`: [`ProvenanceError`].

pub mod dsse;
mod error;
mod facts;
mod keys;
mod statement;
mod subjects;
mod verify;

#[cfg(test)]
mod tests;

// Re-exported so callers need no ed25519 dependency of their own.
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use error::ProvenanceError;
pub use facts::{
    ArtifactFacts, DatasetFacts, GateFacts, ImageFacts, PipelineFacts, ReleaseFacts, SourceFacts,
};
pub use keys::{key_id, load_or_generate, load_public_key_pem, public_key_pem};
pub use statement::{
    BUILD_TYPE, BuildDefinition, BuildMetadata, Builder, DigestSet, PREDICATE_TYPE, Provenance,
    ResourceDescriptor, RunDetails, STATEMENT_TYPE, Statement, Subject, metric_value, rfc3339_utc,
    statement,
};
pub use subjects::{ArchiveListing, list_archive, subjects};
pub use verify::{VerifiedSubject, verify_file, verify_path, verify_statement};

use crate::archive::BlobDigest;

/// A release's provenance, signed: what the coordinator stores and serves
/// (`Provenance` and `Release.provenance_digest` in the protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedProvenance {
    /// The DSSE envelope, JSON, exactly as signed: store and serve these
    /// bytes, never a re-serialization.
    pub envelope_json: String,
    /// The statement, pretty-printed, for people (`kiln release
    /// provenance`); the signed bytes are the envelope's payload.
    pub statement_json: String,
    pub key_id: String,
    /// sha256 of `envelope_json`.
    pub digest: BlobDigest,
}

/// Builds the statement for `facts` with the subjects from `listings` (one
/// per artifact, see [`subjects`]), and signs it.
pub fn sign_release(
    facts: &ReleaseFacts,
    listings: &[ArchiveListing],
    key: &SigningKey,
) -> Result<SignedProvenance, ProvenanceError> {
    let statement = statement(facts, subjects(facts, listings)?);
    let payload = serde_json::to_vec(&statement).expect("a statement always serializes");
    let envelope = dsse::sign(&payload, key);
    let envelope_json = serde_json::to_string(&envelope).expect("an envelope always serializes");
    Ok(SignedProvenance {
        digest: BlobDigest::of(envelope_json.as_bytes()),
        statement_json: serde_json::to_string_pretty(&statement)
            .expect("a statement always serializes"),
        key_id: key_id(&key.verifying_key()),
        envelope_json,
    })
}
