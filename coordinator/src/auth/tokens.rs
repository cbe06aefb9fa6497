//! Bearer tokens: created with a random secret that is shown once, stored
//! only as its sha256, checked on every request from an in-memory index.
//! Records are written through the group committer; the index changes only
//! once a record is durable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use chacha20poly1305::aead::OsRng;
use chacha20poly1305::aead::rand_core::RngCore;
use sha2::{Digest, Sha256};

use super::{Principal, Role};
use crate::clock::{Clock, SystemClock};
use crate::commit::Writer;
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
    /// Where new and revoked records go (the group committer).
    writer: Writer,
    by_hash: RwLock<HashMap<String, TokenRecord>>,
    /// Serializes create and revoke, which read then write; held across
    /// the commit, so it is an async lock.
    writes: tokio::sync::Mutex<()>,
}

impl Tokens {
    pub(crate) fn load(store: &dyn Store, writer: Writer) -> Result<Self, ApiError> {
        let by_hash = store
            .tokens()?
            .into_iter()
            .map(|record| (record.hash.clone(), record))
            .collect();
        Ok(Self {
            writer,
            by_hash: RwLock::new(by_hash),
            writes: tokio::sync::Mutex::new(()),
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
    pub(crate) async fn create(
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
        let _writing = self.writes.lock().await;
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
        self.persist(&record).await?;
        Ok((record, secret))
    }

    /// Revokes a token; requests carrying it fail from now on.
    pub(crate) async fn revoke(&self, name: &str) -> Result<TokenRecord, ApiError> {
        let _writing = self.writes.lock().await;
        let mut record = self
            .list()
            .into_iter()
            .find(|record| record.name == name)
            .ok_or_else(|| ApiError::NotFound(format!("no token named `{name}`")))?;
        if record.revoked_ms.is_none() {
            record.revoked_ms = Some(now_ms());
            self.persist(&record).await?;
        }
        Ok(record)
    }

    /// On a store without tokens, creates an admin token and writes its
    /// secret to `data_dir/admin.token`, readable only by this user. The
    /// file is written first: a crash before the record is stored leaves a
    /// file that the next start overwrites.
    pub(crate) async fn bootstrap(&self, data_dir: &Path) -> Result<Option<PathBuf>, ApiError> {
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
        self.persist(&record).await?;
        Ok(Some(path))
    }

    /// Commits the record, then (only if that succeeded) updates the index.
    async fn persist(&self, record: &TokenRecord) -> Result<(), ApiError> {
        let mut batch = Batch::default();
        batch.push(Op::Token(record.clone()));
        self.writer.write(batch).await?;
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
    use std::sync::Arc;

    use crate::commit::Committer;
    use crate::store::SledStore;

    /// A store and a writer that commits to it through a real commit thread.
    fn open(dir: &Path) -> (Arc<dyn Store>, Writer) {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir).unwrap());
        let (committer, _thread) = Committer::start(store.clone(), |_| {});
        (store, Writer::new(committer))
    }

    #[tokio::test]
    async fn secrets_are_stored_only_as_hashes_and_revocation_is_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        // One store, loaded several times: sled releases its file lock
        // asynchronously, so reopening the directory at once can fail.
        let (store, writer) = open(dir.path());
        let reload = || Tokens::load(&*store, writer.clone()).unwrap();
        let secret = {
            let tokens = reload();
            let (record, secret) = tokens
                .create("ci", Role::Operator, None, "admin")
                .await
                .unwrap();
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
        tokens.revoke("ci").await.unwrap();
        let tokens = reload();
        let error = tokens.authenticate(&secret).unwrap_err().to_string();
        assert!(error.contains("revoked"), "{error}");
    }

    #[tokio::test]
    async fn bootstrap_writes_a_private_admin_token_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let tokens = Tokens::load(&*store, writer.clone()).unwrap();
        let path = tokens.bootstrap(dir.path()).await.unwrap().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let secret = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            tokens.authenticate(secret.trim()).unwrap().role,
            Role::Admin
        );
        assert_eq!(tokens.bootstrap(dir.path()).await.unwrap(), None);
        // Durable, not only in the index: a reload still has it.
        let reloaded = Tokens::load(&*store, writer).unwrap();
        assert_eq!(reloaded.bootstrap(dir.path()).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_write_the_committer_does_not_take_is_an_error_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let tokens = Tokens::load(&*store, writer.clone()).unwrap();
        writer.close();
        let error = tokens
            .create("late", Role::Viewer, None, "t")
            .await
            .unwrap_err();
        assert!(matches!(error, ApiError::ShuttingDown), "{error}");
        assert!(tokens.list().is_empty());
        assert!(store.tokens().unwrap().is_empty());
    }

    #[tokio::test]
    async fn bad_names_duplicates_and_scopes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let tokens = Tokens::load(&*store, writer).unwrap();
        for name in ["", "Upper", "a b", "x/y", &"n".repeat(65)] {
            assert!(
                tokens.create(name, Role::Viewer, None, "t").await.is_err(),
                "{name}"
            );
        }
        tokens
            .create("repo", Role::Pipeline, Some("hello".into()), "t")
            .await
            .unwrap();
        let duplicate = tokens
            .create("repo", Role::Viewer, None, "t")
            .await
            .unwrap_err();
        assert!(matches!(duplicate, ApiError::AlreadyExists(_)));
        assert!(
            tokens
                .create("p2", Role::Pipeline, None, "t")
                .await
                .is_err()
        );
        assert!(
            tokens
                .create("v2", Role::Viewer, Some("x".into()), "t")
                .await
                .is_err()
        );
        assert!(tokens.authenticate("kiln_nope").is_err());
    }
}
