//! DSSE: the PAE bytes, and what verification refuses.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use super::{Release, assert_mentions};
use crate::provenance::dsse::{self, Envelope, PAYLOAD_TYPE, pae};
use crate::provenance::{ProvenanceError, SigningKey, key_id};

/// The example from the DSSE v1 protocol document.
#[test]
fn pae_matches_the_dsse_spec() {
    assert_eq!(
        pae("http://example.com/HelloWorld", b"hello world"),
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    );
    assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
}

#[test]
fn sign_then_verify_returns_the_payload() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let envelope = dsse::sign(b"{\"a\":1}", &key);
    assert_eq!(envelope.payload_type, PAYLOAD_TYPE);
    assert_eq!(envelope.signatures[0].keyid, key_id(&key.verifying_key()));
    let json = serde_json::to_string(&envelope).unwrap();
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["payloadType"], PAYLOAD_TYPE);
    assert_eq!(value["payload"], STANDARD.encode(b"{\"a\":1}"));
    assert!(value["signatures"][0]["sig"].is_string());

    assert_eq!(
        dsse::verify(&json, &key.verifying_key()).unwrap(),
        b"{\"a\":1}"
    );
}

#[test]
fn the_url_safe_alphabet_without_padding_is_accepted() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let mut envelope = dsse::sign(b"??>>", &key);
    envelope.payload = URL_SAFE_NO_PAD.encode(b"??>>");
    let json = serde_json::to_string(&envelope).unwrap();
    assert_eq!(dsse::verify(&json, &key.verifying_key()).unwrap(), b"??>>");
}

#[test]
fn verification_refuses_what_it_should() {
    let release = Release::new();
    let public = release.key.verifying_key();
    let envelope: Envelope = serde_json::from_str(&release.signed.envelope_json).unwrap();
    let with = |change: &dyn Fn(&mut Envelope)| {
        let mut changed = envelope.clone();
        change(&mut changed);
        dsse::verify(&serde_json::to_string(&changed).unwrap(), &public).unwrap_err()
    };

    let error = dsse::verify("{\"payloadType\": ", &public).unwrap_err();
    assert!(
        matches!(error, ProvenanceError::BadEnvelope { .. }),
        "{error:?}"
    );
    assert_mentions(&error, "is not a valid DSSE envelope: bad JSON");

    let error = with(&|e| e.payload_type = "application/json".into());
    assert_mentions(
        &error,
        "payloadType `application/json`, expected `application/vnd.in-toto+json`",
    );

    let error = with(&|e| e.payload = "not base64!".into());
    assert_mentions(&error, "the payload is not base64");

    let error = with(&|e| e.signatures.clear());
    assert!(
        matches!(error, ProvenanceError::NoSignatureFromKey { .. }),
        "{error:?}"
    );
    assert_mentions(&error, "(it has: no signatures)");

    let error = with(&|e| e.signatures[0].sig = "AAAA".into());
    assert!(
        matches!(error, ProvenanceError::BadSignature { .. }),
        "{error:?}"
    );

    // An empty keyid is only a missing hint: the signature still counts.
    let mut no_hint = envelope.clone();
    no_hint.signatures[0].keyid.clear();
    dsse::verify(&serde_json::to_string(&no_hint).unwrap(), &public).unwrap();
}

#[test]
fn another_key_does_not_verify() {
    let release = Release::new();
    let other = SigningKey::from_bytes(&[9; 32]).verifying_key();

    let error = dsse::verify(&release.signed.envelope_json, &other).unwrap_err();
    assert!(
        matches!(error, ProvenanceError::NoSignatureFromKey { .. }),
        "{error:?}"
    );
    assert_mentions(
        &error,
        &format!("has no signature by key {}", key_id(&other)),
    );
    assert_mentions(&error, &release.signed.key_id);

    // Claiming the other key's id does not help: the signature is checked.
    let mut envelope: Envelope = serde_json::from_str(&release.signed.envelope_json).unwrap();
    envelope.signatures[0].keyid = key_id(&other);
    let error = dsse::verify(&serde_json::to_string(&envelope).unwrap(), &other).unwrap_err();
    assert!(
        matches!(error, ProvenanceError::BadSignature { .. }),
        "{error:?}"
    );
}
