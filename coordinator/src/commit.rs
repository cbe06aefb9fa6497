//! Group commit: many transitions, one flush.
//!
//! The engine hands over each transition's [`Batch`] together with the
//! effects that must wait for it (acks to agents, replies to the CLI, pushes
//! to watchers). A dedicated thread applies every batch that is waiting,
//! flushes once, and only then runs the effects, in submission order.
//! **Architecture Invariant:** nothing that confirms a transition leaves the
//! coordinator before the transition is on disk.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::store::{Batch, Store};

/// Work to do once a batch is durable. Effects run on the commit thread and
/// must not block: they send on channels and return.
pub(crate) type Effect = Box<dyn FnOnce(&dyn Store) + Send>;

struct Commit {
    batch: Batch,
    effects: Vec<Effect>,
}

/// Handle to the commit thread. Dropping every handle stops the thread after
/// it has committed what it was given.
#[derive(Clone)]
pub(crate) struct Committer {
    tx: mpsc::Sender<Commit>,
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
        let thread = std::thread::Builder::new()
            .name("kiln-commit".into())
            .spawn(move || commit_loop(&*store, &rx, on_failure))
            .expect("spawning the commit thread");
        (Self { tx }, thread)
    }

    pub(crate) fn submit(&self, batch: Batch, effects: Vec<Effect>) {
        // A send error means the thread stopped after a store failure, which
        // already triggered shutdown.
        let _ = self.tx.send(Commit { batch, effects });
    }
}

fn commit_loop(store: &dyn Store, rx: &mpsc::Receiver<Commit>, on_failure: impl FnOnce(String)) {
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
        for commit in group.drain(..) {
            for effect in commit.effects {
                effect(store);
            }
        }
    }
}
