//! Bearer tokens: created with a random secret that is shown once, stored
//! only as its sha256, checked on every request from an in-memory index.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use chacha20poly1305::aead::OsRng;
use chacha20poly1305::aead::rand_core::RngCore;
use sha2::{Digest, Sha256};

use super::{Principal, Role};
use crate::clock::{Clock, SystemClock};
use crate::error::ApiError;
use crate::store::{Batch, Op, Store, TokenRecord};

/// Name of the token written on first start.
pub(crate) const BOOTSTRAP_NAME: &str = "admin";
/// File in the data dir that receives the bootstrap token.
pub(crate) const BOOTSTRAP_FILE: &str = "admin.token";
/// Token secrets start with this, so they are easy to spot in a leak scan.
const SECRET_PREFIX: &str = "kiln_";

/// Every token, indexed by the hash of its secret.
pub(crate) struct Tokens {
    store: Arc<dyn Store>,
    by_hash: RwLock<HashMap<String, TokenRecord>>,
    /// Serializes create and revoke, which read then write.
    writes: Mutex<()>,
}

impl Tokens {
    pub(crate) fn load(store: Arc<dyn Store>) -> Result<Self, ApiError> {
        let by_hash = store
            .tokens()?
            .into_iter()
            .map(|record| (record.hash.clone(), record))
            .collect();
        Ok(Self {
            store,
            by_hash: RwLock::new(by_hash),
            writes: Mutex::new(()),
        })
    }

    /// The principal a bearer secret stands for.
    pub(crate) fn authenticate(&self, secret: &str) -> Result<Principal, ApiError> {
        let hash = hash(secret);
        let index = self.by_hash.read().expect("token index poisoned");
        let record = index
            .get(&hash)
            .ok_or_else(|| ApiError::Unauthenticated("the token is not valid".into()))?;
        if record.revoked_ms.is_some() {
            return Err(ApiError::Unauthenticated(format!(
                "token `{}` was revoked",
                record.name
            )));
        }
        Ok(Principal {
            name: record.name.clone(),
            role: record.role,
            pipeline: record.pipeline.clone(),
        })
    }

    pub(crate) fn list(&self) -> Vec<TokenRecord> {
        let mut records: Vec<_> = self
            .by_hash
            .read()
            .expect("token index poisoned")
            .values()
            .cloned()
            .collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
    }

    /// Creates a token and returns it with its secret, once durable.
    pub(crate) fn create(
        &self,
        name: &str,
        role: Role,
        pipeline: Option<String>,
        created_by: &str,
    ) -> Result<(TokenRecord, String), ApiError> {
        check_name(name)?;
        match (role, &pipeline) {
            (Role::Pipeline, None) => {
                return Err(ApiError::InvalidArgument(
                    "a pipeline token needs the pipeline it may act on (--pipeline NAME)".into(),
                ));
            }
            (Role::Pipeline, Some(_)) | (_, None) => {}
            (_, Some(_)) => {
                return Err(ApiError::InvalidArgument(
                    "only pipeline tokens are limited to a pipeline; drop --pipeline or use --role pipeline".into(),
                ));
            }
        }
        let _writing = self.writes.lock().expect("token writes poisoned");
        if self.list().iter().any(|record| record.name == name) {
            return Err(ApiError::AlreadyExists(format!(
                "a token named `{name}` exists; revoke it or pick another name"
            )));
        }
        let secret = new_secret();
        let record = TokenRecord {
            name: name.to_owned(),
            role,
            pipeline,
            hash: hash(&secret),
            created_ms: now_ms(),
            created_by: created_by.to_owned(),
            revoked_ms: None,
        };
        self.persist(&record)?;
        Ok((record, secret))
    }

    /// Revokes a token; requests carrying it fail from now on.
    pub(crate) fn revoke(&self, name: &str) -> Result<TokenRecord, ApiError> {
        let _writing = self.writes.lock().expect("token writes poisoned");
        let mut record = self
            .list()
            .into_iter()
            .find(|record| record.name == name)
            .ok_or_else(|| ApiError::NotFound(format!("no token named `{name}`")))?;
        if record.revoked_ms.is_none() {
            record.revoked_ms = Some(now_ms());
            self.persist(&record)?;
        }
        Ok(record)
    }

    /// On a store without tokens, creates an admin token and writes its
    /// secret to `data_dir/admin.token`, readable only by this user. The
    /// file is written first: a crash before the record is stored leaves a
    /// file that the next start overwrites.
    pub(crate) fn bootstrap(&self, data_dir: &Path) -> Result<Option<PathBuf>, ApiError> {
        if !self.list().is_empty() {
            return Ok(None);
        }
        let secret = new_secret();
        let path = data_dir.join(BOOTSTRAP_FILE);
        kiln_common::files::write_private(&path, format!("{secret}\n").as_bytes()).map_err(
            |error| {
                ApiError::FailedPrecondition(format!("cannot write {}: {error}", path.display()))
            },
        )?;
        let record = TokenRecord {
            name: BOOTSTRAP_NAME.to_owned(),
            role: Role::Admin,
            pipeline: None,
            hash: hash(&secret),
            created_ms: now_ms(),
            created_by: "bootstrap".to_owned(),
            revoked_ms: None,
        };
        self.persist(&record)?;
        Ok(Some(path))
    }

    fn persist(&self, record: &TokenRecord) -> Result<(), ApiError> {
        let mut batch = Batch::default();
        batch.push(Op::Token(record.clone()));
        self.store.apply(&batch)?;
        self.store.flush()?;
        self.by_hash
            .write()
            .expect("token index poisoned")
            .insert(record.hash.clone(), record.clone());
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemClock.now_ms()
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    format!("{SECRET_PREFIX}{}", hex::encode(bytes))
}

/// Token, secret and agent names: lowercase letters, digits, `.`, `_`,
/// `-` and `@`, at most 64 characters.
pub(crate) fn check_name(name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-@".contains(c));
    if valid {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "token name `{}` is invalid: use 1-64 of a-z, 0-9, '.', '_', '-', '@'",
            name.escape_debug()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn tokens(dir: &Path) -> Tokens {
        Tokens::load(Arc::new(SledStore::open(dir).unwrap())).unwrap()
    }

    #[test]
    fn secrets_are_stored_only_as_hashes_and_revocation_is_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        // One store, loaded several times: sled releases its file lock
        // asynchronously, so reopening the directory at once can fail.
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let reload = || Tokens::load(store.clone()).unwrap();
        let secret = {
            let tokens = reload();
            let (record, secret) = tokens.create("ci", Role::Operator, None, "admin").unwrap();
            assert_ne!(record.hash, secret);
            assert!(secret.starts_with(SECRET_PREFIX));
            assert_eq!(tokens.authenticate(&secret).unwrap().role, Role::Operator);
            secret
        };
        store.flush().unwrap();
        let raw = std::fs::read(dir.path().join("state.sled/db")).unwrap_or_default();
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret itself reached the store"
        );
        let tokens = reload();
        assert_eq!(tokens.authenticate(&secret).unwrap().name, "ci");
        tokens.revoke("ci").unwrap();
        let tokens = reload();
        let error = tokens.authenticate(&secret).unwrap_err().to_string();
        assert!(error.contains("revoked"), "{error}");
    }

    #[test]
    fn bootstrap_writes_a_private_admin_token_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tokens = tokens(dir.path());
        let path = tokens.bootstrap(dir.path()).unwrap().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let secret = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            tokens.authenticate(secret.trim()).unwrap().role,
            Role::Admin
        );
        assert_eq!(tokens.bootstrap(dir.path()).unwrap(), None);
    }

    #[test]
    fn bad_names_duplicates_and_scopes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = tokens(dir.path());
        for name in ["", "Upper", "a b", "x/y", &"n".repeat(65)] {
            assert!(
                tokens.create(name, Role::Viewer, None, "t").is_err(),
                "{name}"
            );
        }
        tokens
            .create("repo", Role::Pipeline, Some("hello".into()), "t")
            .unwrap();
        let duplicate = tokens.create("repo", Role::Viewer, None, "t").unwrap_err();
        assert!(matches!(duplicate, ApiError::AlreadyExists(_)));
        assert!(tokens.create("p2", Role::Pipeline, None, "t").is_err());
        assert!(
            tokens
                .create("v2", Role::Viewer, Some("x".into()), "t")
                .is_err()
        );
        assert!(tokens.authenticate("kiln_nope").is_err());
    }
}
