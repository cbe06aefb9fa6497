//! DSSE (Dead Simple Signing Envelope) v1 with ed25519 signatures.
//!
//! The signature covers the pre-authentication encoding (PAE) of the
//! payload type and the payload bytes, never the JSON of the envelope, so
//! re-serializing an envelope cannot change what was signed.

use base64::Engine as _;
use base64::engine::general_purpose::{
    STANDARD, STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT,
};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::{ProvenanceError, key_id};

/// The payload type of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// A DSSE envelope, as stored and printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// The statement's bytes, base64 (standard alphabet, padded).
    pub payload: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    /// [`key_id`] of the signing key: a hint for picking the key, not
    /// trusted (DSSE leaves it unauthenticated).
    #[serde(default)]
    pub keyid: String,
    /// The ed25519 signature over the PAE, base64.
    pub sig: String,
}

/// Signs `payload` as an in-toto statement.
pub fn sign(payload: &[u8], key: &SigningKey) -> Envelope {
    let signature = key.sign(&pae(PAYLOAD_TYPE, payload));
    Envelope {
        payload_type: PAYLOAD_TYPE.into(),
        payload: STANDARD.encode(payload),
        signatures: vec![EnvelopeSignature {
            keyid: key_id(&key.verifying_key()),
            sig: STANDARD.encode(signature.to_bytes()),
        }],
    }
}

/// Checks the envelope's signature by `key` and returns the payload bytes,
/// which are trustworthy only once this returns `Ok`.
///
/// Signatures whose `keyid` is this key's (or empty) are tried; one that
/// verifies (ed25519 strict verification, which refuses malleable and
/// small-order signatures) is enough.
pub fn verify(envelope_json: &str, key: &VerifyingKey) -> Result<Vec<u8>, ProvenanceError> {
    let bad = |reason: String| ProvenanceError::BadEnvelope { reason };
    let envelope: Envelope =
        serde_json::from_str(envelope_json).map_err(|e| bad(format!("bad JSON: {e}")))?;
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(ProvenanceError::WrongPayloadType {
            found: envelope.payload_type,
            expected: PAYLOAD_TYPE,
        });
    }
    let payload = decode_base64(&envelope.payload)
        .ok_or_else(|| bad("the payload is not base64".to_owned()))?;

    let key_id = key_id(key);
    let ours: Vec<_> = envelope
        .signatures
        .iter()
        .filter(|s| s.keyid == key_id || s.keyid.is_empty())
        .collect();
    if ours.is_empty() {
        let found: Vec<_> = envelope
            .signatures
            .iter()
            .map(|s| s.keyid.as_str())
            .collect();
        return Err(ProvenanceError::NoSignatureFromKey {
            key_id,
            found: if found.is_empty() {
                "no signatures".to_owned()
            } else {
                found.join(", ")
            },
        });
    }
    let message = pae(&envelope.payload_type, &payload);
    let verifies = |sig: &EnvelopeSignature| {
        decode_base64(&sig.sig)
            .and_then(|bytes| Signature::from_slice(&bytes).ok())
            .is_some_and(|signature| key.verify_strict(&message, &signature).is_ok())
    };
    if ours.into_iter().any(verifies) {
        Ok(payload)
    } else {
        Err(ProvenanceError::BadSignature { key_id })
    }
}

/// DSSE's pre-authentication encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in bytes as
/// ASCII decimal without leading zeros.
pub(crate) fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut message = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    message.extend_from_slice(payload);
    message
}

/// DSSE requires accepting both base64 alphabets; padding is optional.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    STANDARD_PAD_INDIFFERENT
        .decode(text)
        .or_else(|_| URL_SAFE_PAD_INDIFFERENT.decode(text))
        .ok()
}
