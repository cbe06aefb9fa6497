//! The one error type of the provenance module.

use std::io;

use crate::archive::{ArchiveError, BlobDigest};

/// Why a key could not be loaded, a statement built, or an envelope or a
/// file verified. Messages are lowercase, name what was wrong and say what to
/// do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvenanceError {
    /// A filesystem error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What failed, naming the path: "reading `/var/lib/kiln/provenance.key`".
        context: String,
        #[source]
        source: io::Error,
    },

    /// The private key file can be read by other users.
    #[error(
        "signing key `{path}` has mode {mode:04o} and is readable by group or others; \
         run `chmod 600 {path}` (or generate a new key if it may have leaked)"
    )]
    KeyPermissions { path: String, mode: u32 },

    /// The private key file is not a PKCS#8 PEM ed25519 key.
    #[error(
        "signing key `{path}` is not an ed25519 PKCS#8 PEM key ({reason}); restore it or move it away to generate a new one"
    )]
    InvalidSigningKey { path: String, reason: String },

    /// The public key text is not an ed25519 SubjectPublicKeyInfo PEM.
    #[error(
        "public key is not an ed25519 SubjectPublicKeyInfo PEM ({reason}); export it again with the coordinator's provenance key command"
    )]
    InvalidPublicKey { reason: String },

    /// The OS random generator failed while generating a key.
    #[error("cannot generate a signing key: the system random generator failed ({reason})")]
    Random { reason: String },

    /// The envelope is not DSSE JSON (or its payload or a signature is not
    /// base64).
    #[error("provenance envelope is not a valid DSSE envelope: {reason}")]
    BadEnvelope { reason: String },

    /// The envelope carries something other than an in-toto statement.
    #[error(
        "provenance envelope has payloadType `{found}`, expected `{expected}`; it is not an in-toto statement"
    )]
    WrongPayloadType {
        found: String,
        expected: &'static str,
    },

    /// No signature in the envelope claims the verifying key.
    #[error(
        "provenance envelope has no signature by key {key_id} (it has: {found}); \
         verify with the public key of the coordinator that signed it"
    )]
    NoSignatureFromKey { key_id: String, found: String },

    /// A signature claims the key but does not verify: the statement (or
    /// the signature) was changed after signing.
    #[error(
        "provenance signature by key {key_id} is invalid: the statement was changed after it \
         was signed, or it was signed by another key; do not trust this release's provenance"
    )]
    BadSignature { key_id: String },

    /// The signed payload is not an in-toto Statement v1 with a SLSA
    /// provenance v1 predicate as Kiln writes it.
    #[error("signed statement is not a kiln provenance statement: {reason}")]
    BadStatement { reason: String },

    /// The statement is about another release than the one asked for.
    #[error(
        "provenance is for release {found}, not release {expected}; fetch the provenance of release {expected}"
    )]
    WrongRelease { expected: u64, found: u64 },

    /// The signature holds, but the file is not among what was released.
    #[error(
        "file {digest} is not a subject of release {release_id}'s provenance; \
         it is not the file that was released (or was changed since)"
    )]
    NotASubject { digest: BlobDigest, release_id: u64 },

    /// A released artifact whose archive listing was not given to
    /// [`super::subjects`].
    #[error(
        "artifact `{path}` of stage `{stage}` ({digest}) has no archive listing; \
         list its archive with `list_archive` before building the subjects"
    )]
    MissingListing {
        stage: String,
        path: String,
        digest: BlobDigest,
    },

    /// The archive of an artifact could not be read.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
}

impl ProvenanceError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ProvenanceError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn bad_statement(reason: impl Into<String>) -> Self {
        ProvenanceError::BadStatement {
            reason: reason.into(),
        }
    }
}
