//! Group commit: many transitions, one flush.
//!
//! The engine (and the auth layer's audit records) hand over each
//! transition's [`Batch`] together with the effects that must wait for it
//! (acks to agents, replies to the CLI, the durable view readers see,
//! pushes to watchers). A dedicated thread applies every batch that is
//! waiting, flushes once, and only then runs the effects, in submission
//! order.
//!
//! **Architecture Invariant:** nothing that confirms a transition leaves the
//! coordinator before the transition is on disk.
//! **Architecture Invariant:** the committer only writes. Effects get no
//! store handle; reads go through `read::Reader` on the blocking pool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

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

    /// Every commit numbered up to this is durable.
    pub(crate) fn durable(&self) -> Arc<AtomicU64> {
        self.durable.clone()
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
