//! Secrets: sealed at rest with XChaCha20-Poly1305 under a key kept in a
//! file outside the database, opened only to hand a stage its values.
//!
//! Values never leave through the API (no RPC returns one), never enter an
//! error message, and are not logged; stages get them as environment
//! variables, and their logs are masked on the agent and again here.
//! Records are written through the group committer.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::clock::{Clock, SystemClock};
use crate::commit::Writer;
use crate::error::ApiError;
use crate::store::{Batch, Op, SecretRecord, Store};

/// Largest secret value accepted.
pub(crate) const MAX_SECRET_BYTES: usize = 64 * 1024;
const NONCE_BYTES: usize = 24;

/// Sealed secrets in the store, and the key that opens them.
pub(crate) struct Secrets {
    /// Read from: listing and revealing.
    store: Arc<dyn Store>,
    /// Written through: the group committer.
    writer: Writer,
    cipher: XChaCha20Poly1305,
}

impl Secrets {
    /// Loads the key from `key_file`, creating it (mode 0600) on first use.
    /// A key file others can read is refused: it opens every secret.
    pub(crate) fn load(
        store: Arc<dyn Store>,
        writer: Writer,
        key_file: &Path,
    ) -> anyhow::Result<Self> {
        let key = match std::fs::read_to_string(key_file) {
            Ok(text) => {
                let mode = std::fs::metadata(key_file)?.permissions().mode();
                if mode & 0o077 != 0 {
                    anyhow::bail!(
                        "secret key file {} is readable by others (mode {:o}); run `chmod 600 {}`",
                        key_file.display(),
                        mode & 0o777,
                        key_file.display()
                    );
                }
                let bytes = hex::decode(text.trim()).ok().filter(|b| b.len() == 32);
                bytes.ok_or_else(|| {
                    anyhow::anyhow!(
                        "secret key file {} does not hold 64 hex digits",
                        key_file.display()
                    )
                })?
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let key = XChaCha20Poly1305::generate_key(&mut OsRng).to_vec();
                kiln_common::files::write_private(
                    key_file,
                    format!("{}\n", hex::encode(&key)).as_bytes(),
                )?;
                tracing::info!(key_file = %key_file.display(), "created the secret key");
                key
            }
            Err(error) => {
                anyhow::bail!(
                    "cannot read secret key file {}: {error}",
                    key_file.display()
                )
            }
        };
        let cipher = XChaCha20Poly1305::new_from_slice(&key).expect("the key is 32 bytes");
        Ok(Self {
            store,
            writer,
            cipher,
        })
    }

    /// Seals and stores a value, durable on return.
    pub(crate) async fn put(
        &self,
        name: &str,
        value: &str,
        by: &str,
    ) -> Result<SecretRecord, ApiError> {
        check_secret_name(name)?;
        if value.is_empty() || value.len() > MAX_SECRET_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "secret `{name}` must hold 1 to {MAX_SECRET_BYTES} bytes, got {}",
                value.len()
            )));
        }
        if !kiln_common::masking::is_maskable(value) {
            return Err(ApiError::InvalidArgument(format!(
                "secret `{name}` is too short to be masked in logs; use at least {} characters",
                kiln_common::masking::MIN_SECRET_CHARS
            )));
        }
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: value.as_bytes(),
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| ApiError::FailedPrecondition("cannot seal the secret".into()))?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        let record = SecretRecord {
            name: name.to_owned(),
            sealed,
            updated_ms: SystemClock.now_ms(),
            updated_by: by.to_owned(),
        };
        self.write(Op::Secret(record.clone())).await?;
        Ok(record)
    }

    pub(crate) fn list(&self) -> Result<Vec<SecretRecord>, ApiError> {
        Ok(self.store.secrets()?)
    }

    /// Removes a secret, durably on return; returns what was removed.
    pub(crate) async fn remove(&self, name: &str) -> Result<SecretRecord, ApiError> {
        let record = self
            .store
            .secret(name)?
            .ok_or_else(|| ApiError::NotFound(format!("no secret named `{name}`")))?;
        self.write(Op::RemoveSecret(name.to_owned())).await?;
        Ok(record)
    }

    /// The values of `names`, for one stage. The error names the first
    /// secret that is missing or cannot be opened, never a value.
    pub(crate) fn reveal<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Result<BTreeMap<String, String>, ApiError> {
        let mut values = BTreeMap::new();
        for name in names {
            let record = self.store.secret(name)?.ok_or_else(|| {
                ApiError::FailedPrecondition(format!(
                    "secret `{name}` is not set; set it with `kiln secret set {name}`"
                ))
            })?;
            values.insert(name.clone(), self.open_record(&record)?);
        }
        Ok(values)
    }

    fn open_record(&self, record: &SecretRecord) -> Result<String, ApiError> {
        let undecryptable = || {
            ApiError::FailedPrecondition(format!(
                "secret `{}` cannot be decrypted with this coordinator's key; set it again",
                record.name
            ))
        };
        if record.sealed.len() < NONCE_BYTES {
            return Err(undecryptable());
        }
        let (nonce, ciphertext) = record.sealed.split_at(NONCE_BYTES);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: record.name.as_bytes(),
                },
            )
            .map_err(|_| undecryptable())?;
        String::from_utf8(plain).map_err(|_| undecryptable())
    }

    async fn write(&self, op: Op) -> Result<(), ApiError> {
        let mut batch = Batch::default();
        batch.push(op);
        self.writer.write(batch).await
    }
}

/// Secret names are environment variable names: `[A-Z_][A-Z0-9_]*`, at
/// most 64 characters.
pub(crate) fn check_secret_name(name: &str) -> Result<(), ApiError> {
    // The same rule `kiln.yml`'s `secrets:` lists are checked against.
    let valid = kiln_common::spec::is_secret_name(name);
    if valid {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "secret name `{}` is invalid: use an environment variable name ([A-Z_][A-Z0-9_]*, at most 64)",
            name.escape_debug()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::Committer;
    use crate::store::SledStore;

    /// A store and a writer that commits to it through a real commit thread.
    fn store_and_writer(dir: &Path) -> (Arc<dyn Store>, Writer) {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir).unwrap());
        let (committer, _thread) = Committer::start(store.clone(), |_| {});
        (store, Writer::new(committer))
    }

    fn open(dir: &Path) -> Secrets {
        let (store, writer) = store_and_writer(dir);
        Secrets::load(store, writer, &dir.join("secrets.key")).unwrap()
    }

    #[tokio::test]
    async fn values_are_sealed_at_rest_and_open_again_with_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let value = "correct-horse-battery-staple";
        // One store (sled releases its lock asynchronously); the second
        // `Secrets` reads the key file the first one created.
        let (store, writer) = store_and_writer(dir.path());
        let key_file = dir.path().join("secrets.key");
        Secrets::load(store.clone(), writer.clone(), &key_file)
            .unwrap()
            .put("DB_PASSWORD", value, "admin")
            .await
            .unwrap();
        let secrets = Secrets::load(store, writer, &key_file).unwrap();
        let stored = secrets.list().unwrap();
        assert_eq!(stored.len(), 1);
        assert!(
            !stored[0]
                .sealed
                .windows(value.len())
                .any(|w| w == value.as_bytes())
        );
        let names = ["DB_PASSWORD".to_owned()];
        assert_eq!(secrets.reveal(&names).unwrap()["DB_PASSWORD"], value);
        secrets.remove("DB_PASSWORD").await.unwrap();
        let error = secrets.reveal(&names).unwrap_err().to_string();
        assert!(error.contains("`DB_PASSWORD` is not set"), "{error}");
    }

    #[tokio::test]
    async fn a_write_the_committer_does_not_take_is_an_error_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = store_and_writer(dir.path());
        let secrets =
            Secrets::load(store, writer.clone(), &dir.path().join("secrets.key")).unwrap();
        writer.close();
        let error = secrets.put("LATE", "late-value", "t").await.unwrap_err();
        assert!(matches!(error, ApiError::ShuttingDown), "{error}");
        assert!(secrets.list().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_sealed_value_moved_to_another_name_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = open(dir.path());
        let mut record = secrets.put("A", "alpha-value", "t").await.unwrap();
        record.name = "B".into();
        let error = secrets.open_record(&record).unwrap_err().to_string();
        assert!(error.contains("cannot be decrypted"), "{error}");
        assert!(!error.contains("alpha"));
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        let key_file = dir.path().join("secrets.key");
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (store, writer) = store_and_writer(&dir.path().join("other"));
        let error = Secrets::load(store, writer, &key_file)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("readable by others"), "{error}");
    }

    #[tokio::test]
    async fn bad_names_and_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = open(dir.path());
        for name in ["", "lower", "1ABC", "A-B", &"A".repeat(65)] {
            assert!(secrets.put(name, "value", "t").await.is_err(), "{name}");
        }
        assert!(secrets.put("EMPTY", "", "t").await.is_err());
        assert!(secrets.put("SHORT", "ab", "t").await.is_err());
        let big = "x".repeat(MAX_SECRET_BYTES + 1);
        assert!(secrets.put("BIG", &big, "t").await.is_err());
    }
}
