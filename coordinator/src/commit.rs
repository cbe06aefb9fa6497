//! Group commit: many transitions, one flush.
//!
//! The engine hands over each transition's [`Batch`] together with the
//! effects that must wait for it (acks to agents, replies to the CLI, the
//! durable view readers see, pushes to watchers). Everything else that
//! writes — audit records, tokens, secrets, provenance envelopes — goes
//! through a [`Writer`] and awaits [`Committer::write`]. A dedicated thread
//! applies every batch that is waiting, flushes once, and only then runs
//! the effects, in submission order.
//!
//! **Architecture Invariant:** the commit thread is the only writer of the
//! store once it has started (the migration runs before it, when the store
//! opens).
//!
//! **Architecture Invariant:** nothing that confirms a transition leaves the
//! coordinator before the transition is on disk.
//! **Architecture Invariant:** the committer only writes. Effects get no
//! store handle; reads go through `read::Reader` on the blocking pool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use crate::error::ApiError;
use crate::store::{Batch, Store};

/// Work to do once a batch is durable. Effects run on the commit thread and
/// must not block: they send on channels and return.
pub(crate) type Effect = Box<dyn FnOnce() + Send>;

struct Commit {
    seq: u64,
    batch: Batch,
    effects: Vec<Effect>,
}

/// Handle to the commit thread. Dropping every handle stops the thread after
/// it has committed what it was given.
#[derive(Clone)]
pub(crate) struct Committer {
    /// Holds the next sequence number while a commit is queued, so numbers
    /// reach the thread in order.
    tx: Arc<Mutex<(u64, mpsc::Sender<Commit>)>>,
    durable: Arc<AtomicU64>,
}

impl Committer {
    /// Starts the commit thread. `on_failure` is called once if the store
    /// fails; the thread then stops and drops all later effects unrun, so no
    /// acknowledgement of a lost write ever goes out.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        on_failure: impl FnOnce(String) + Send + 'static,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Commit>();
        let durable = Arc::new(AtomicU64::new(0));
        let thread_durable = durable.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-commit".into())
            .spawn(move || commit_loop(&*store, &rx, &thread_durable, on_failure))
            .expect("spawning the commit thread");
        let committer = Self {
            tx: Arc::new(Mutex::new((1, tx))),
            durable,
        };
        (committer, thread)
    }

    /// Queues a commit; returns its sequence number.
    pub(crate) fn submit(&self, batch: Batch, effects: Vec<Effect>) -> u64 {
        let mut guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let seq = guard.0;
        guard.0 += 1;
        // A send error means the thread stopped after a store failure, which
        // already triggered shutdown.
        let _ = guard.1.send(Commit {
            seq,
            batch,
            effects,
        });
        seq
    }

    /// Commits `batch` on its own (sharing a flush with whatever else is
    /// waiting) and returns once it is durable. A store failure stops the
    /// thread without running the effect, so the write is never reported
    /// done: the caller gets an internal error.
    pub(crate) async fn write(&self, batch: Batch) -> Result<(), ApiError> {
        let (durable, flushed) = tokio::sync::oneshot::channel();
        self.submit(
            batch,
            vec![Box::new(move || {
                let _ = durable.send(());
            })],
        );
        flushed
            .await
            .map_err(|_| ApiError::Internal("the store failed; the write was not committed".into()))
    }

    /// Every commit numbered up to this is durable.
    pub(crate) fn durable(&self) -> Arc<AtomicU64> {
        self.durable.clone()
    }
}

/// The committer handle of everything outside the engine that writes
/// (audit records, tokens, secrets, provenance envelopes), shared by all of
/// them and let go of in one place at shutdown: connection tasks may
/// outlive the server, and the commit thread only ends once every
/// [`Committer`] is gone.
#[derive(Clone)]
pub(crate) struct Writer(Arc<Mutex<Option<Committer>>>);

impl Writer {
    pub(crate) fn new(committer: Committer) -> Self {
        Self(Arc::new(Mutex::new(Some(committer))))
    }

    /// [`Committer::write`], or [`ApiError::ShuttingDown`] once closed.
    pub(crate) async fn write(&self, batch: Batch) -> Result<(), ApiError> {
        let committer = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match committer {
            Some(committer) => committer.write(batch).await,
            None => Err(ApiError::ShuttingDown),
        }
    }

    /// Lets go of the commit thread; later writes fail with
    /// [`ApiError::ShuttingDown`]. A write already queued still completes.
    pub(crate) fn close(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn commit_loop(
    store: &dyn Store,
    rx: &mpsc::Receiver<Commit>,
    durable: &AtomicU64,
    on_failure: impl FnOnce(String),
) {
    let mut group = Vec::new();
    while let Ok(first) = rx.recv() {
        group.push(first);
        group.extend(rx.try_iter());
        let result = group
            .iter()
            .filter(|commit| !commit.batch.is_empty())
            .try_for_each(|commit| store.apply(&commit.batch))
            .and_then(|()| {
                if group.iter().any(|commit| !commit.batch.is_empty()) {
                    store.flush()
                } else {
                    Ok(())
                }
            });
        if let Err(error) = result {
            tracing::error!(%error, "store failed; stopping without acknowledging");
            on_failure(error.to_string());
            return;
        }
        if let Some(last) = group.last() {
            durable.store(last.seq, Ordering::Release);
        }
        for commit in group.drain(..) {
            for effect in commit.effects {
                effect();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use kiln_common::ids::{RunId, StageKey};

    use super::*;
    use crate::auth::Role;
    use crate::auth::tokens::Tokens;
    use crate::store::{
        AuditRecord, EnvironmentRecord, Op, PipelineRecord, ProvenanceRecord, ReleaseRecord,
        Result, RunRecord, SecretRecord, SledStore, StageRecord, StoreError, StoredLog,
        TokenRecord, TriggerStateRecord,
    };

    /// A sled store whose writes fail once `failing` is set.
    struct FlakyStore {
        inner: SledStore,
        failing: AtomicBool,
    }

    impl FlakyStore {
        fn check(&self) -> Result<()> {
            if self.failing.load(Ordering::Relaxed) {
                let source = serde_json::from_str::<u8>("not json").unwrap_err();
                return Err(StoreError::Corrupt {
                    key: "test".into(),
                    source,
                });
            }
            Ok(())
        }
    }

    impl Store for FlakyStore {
        fn apply(&self, batch: &Batch) -> Result<()> {
            self.check()?;
            self.inner.apply(batch)
        }
        fn flush(&self) -> Result<()> {
            self.check()?;
            self.inner.flush()
        }
        fn raw_page(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            self.inner.raw_page(after, limit)
        }
        fn record_writes(&self, on: bool) -> Vec<crate::store::RawWrite> {
            self.inner.record_writes(on)
        }
        fn pipeline(&self, name: &str, version: u32) -> Result<Option<PipelineRecord>> {
            self.inner.pipeline(name, version)
        }
        fn latest_pipelines(&self) -> Result<Vec<PipelineRecord>> {
            self.inner.latest_pipelines()
        }
        fn pipeline_versions(&self) -> Result<Vec<PipelineRecord>> {
            self.inner.pipeline_versions()
        }
        fn deliveries(&self) -> Result<Vec<crate::store::DeliveryRecord>> {
            self.inner.deliveries()
        }
        fn run(&self, id: RunId) -> Result<Option<RunRecord>> {
            self.inner.run(id)
        }
        fn runs(
            &self,
            pipeline: Option<&str>,
            up_to: RunId,
            limit: usize,
        ) -> Result<Vec<RunRecord>> {
            self.inner.runs(pipeline, up_to, limit)
        }
        fn unfinished_runs(&self) -> Result<Vec<RunRecord>> {
            self.inner.unfinished_runs()
        }
        fn last_run_id(&self) -> Result<u64> {
            self.inner.last_run_id()
        }
        fn stages(&self, run: RunId) -> Result<Vec<StageRecord>> {
            self.inner.stages(run)
        }
        fn log_page(
            &self,
            key: StageKey,
            attempt: u32,
            from_seq: u64,
            below_seq: u64,
            max_lines: usize,
        ) -> Result<Vec<StoredLog>> {
            self.inner
                .log_page(key, attempt, from_seq, below_seq, max_lines)
        }
        fn release(&self, id: u64) -> Result<Option<ReleaseRecord>> {
            self.inner.release(id)
        }
        fn releases(&self) -> Result<Vec<ReleaseRecord>> {
            self.inner.releases()
        }
        fn environments(&self) -> Result<Vec<EnvironmentRecord>> {
            self.inner.environments()
        }
        fn tokens(&self) -> Result<Vec<TokenRecord>> {
            self.inner.tokens()
        }
        fn secret(&self, name: &str) -> Result<Option<SecretRecord>> {
            self.inner.secret(name)
        }
        fn secrets(&self) -> Result<Vec<SecretRecord>> {
            self.inner.secrets()
        }
        fn cache(&self, pipeline: &str, key: &str) -> Result<Option<crate::store::CacheRecord>> {
            self.inner.cache(pipeline, key)
        }
        fn caches(&self, pipeline: Option<&str>) -> Result<Vec<crate::store::CacheRecord>> {
            self.inner.caches(pipeline)
        }
        fn caches_cleared(&self, pipeline: &str) -> Result<Vec<crate::store::CacheClearedRecord>> {
            self.inner.caches_cleared(pipeline)
        }
        fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>> {
            self.inner.audit(limit)
        }
        fn last_audit_id(&self) -> Result<u64> {
            self.inner.last_audit_id()
        }
        fn provenance(&self, release: u64) -> Result<Option<ProvenanceRecord>> {
            self.inner.provenance(release)
        }
        fn monitor_samples(
            &self,
            release: u64,
            limit: usize,
        ) -> Result<Vec<crate::store::MonitorSampleRecord>> {
            self.inner.monitor_samples(release, limit)
        }
        fn trigger_state(&self, pipeline: &str) -> Result<Option<TriggerStateRecord>> {
            self.inner.trigger_state(pipeline)
        }
    }

    fn flaky(dir: &std::path::Path) -> Arc<FlakyStore> {
        Arc::new(FlakyStore {
            inner: SledStore::open(dir).unwrap(),
            failing: AtomicBool::new(false),
        })
    }

    fn token(name: &str) -> Batch {
        let mut batch = Batch::default();
        batch.push(Op::Token(TokenRecord {
            name: name.into(),
            role: Role::Viewer,
            pipeline: None,
            hash: format!("hash-of-{name}"),
            created_ms: 1,
            created_by: "test".into(),
            revoked_ms: None,
        }));
        batch
    }

    #[tokio::test]
    async fn a_write_is_durable_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let store = flaky(dir.path());
        let (committer, thread) = Committer::start(store.clone(), |_| {});
        committer.write(token("one")).await.unwrap();
        assert_eq!(committer.durable().load(Ordering::Acquire), 1);
        assert_eq!(store.tokens().unwrap()[0].name, "one");
        drop(committer);
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn a_store_failure_is_an_internal_error_and_never_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let store = flaky(dir.path());
        let (failed_tx, failed_rx) = std::sync::mpsc::channel();
        let (committer, thread) = Committer::start(store.clone(), move |error| {
            failed_tx.send(error).unwrap();
        });
        let writer = Writer::new(committer);
        let tokens = Tokens::load(&*store, writer.clone()).unwrap();
        store.failing.store(true, Ordering::Relaxed);
        let error = tokens
            .create("lost", Role::Viewer, None, "t")
            .await
            .unwrap_err();
        assert!(matches!(error, ApiError::Internal(_)), "{error}");
        assert!(tokens.list().is_empty(), "a token that was not stored");
        assert!(
            failed_rx
                .recv()
                .unwrap()
                .contains("corrupt record under key test")
        );
        // The thread has stopped: later writes fail too, without hanging.
        let error = writer.write(token("later")).await.unwrap_err();
        assert!(matches!(error, ApiError::Internal(_)), "{error}");
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn closing_the_writer_lets_the_thread_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = flaky(dir.path());
        let (committer, thread) = Committer::start(store, |_| {});
        let writer = Writer::new(committer);
        let holder = writer.clone();
        writer.write(token("one")).await.unwrap();
        writer.close();
        let error = holder.write(token("two")).await.unwrap_err();
        assert!(matches!(error, ApiError::ShuttingDown), "{error}");
        // `holder` still exists, yet the thread ends.
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        drop(holder);
    }
}
