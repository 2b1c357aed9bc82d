//! Graceful drain: one trigger, many watchers.
//!
//! Every listener and every connection task holds a [`Watch`]. Triggering
//! tells them all to stop accepting / finish their in-flight requests; the
//! trigger then waits until every watch has been dropped (all connections
//! done) or the deadline passes.

use std::time::Duration;

use tokio::sync::watch;

/// The owner's half: signals the drain and waits for it to complete.
#[derive(Debug)]
pub struct Drain {
    tx: watch::Sender<bool>,
}

/// A participant's half: cheap to clone, resolves [`Watch::signaled`] once
/// the drain starts.
#[derive(Clone, Debug)]
pub struct Watch {
    rx: watch::Receiver<bool>,
}

/// What happened to a drain.
#[derive(Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection finished in time.
    Complete,
    /// The deadline passed with this many watchers still alive.
    DeadlineExceeded { remaining: usize },
}

pub fn channel() -> (Drain, Watch) {
    let (tx, rx) = watch::channel(false);
    (Drain { tx }, Watch { rx })
}

// === impl Drain ===

impl Drain {
    /// A new watch, for a listener started after the others (a
    /// configuration change). The drain waits for it like for the rest.
    pub fn watch(&self) -> Watch {
        Watch {
            rx: self.tx.subscribe(),
        }
    }

    /// Starts draining, then waits up to `deadline` for all watchers to go.
    pub async fn drain(self, deadline: Duration) -> DrainOutcome {
        // send_replace never fails, even with no receivers left.
        self.tx.send_replace(true);
        match tokio::time::timeout(deadline, self.tx.closed()).await {
            Ok(()) => DrainOutcome::Complete,
            Err(_) => DrainOutcome::DeadlineExceeded {
                remaining: self.tx.receiver_count(),
            },
        }
    }
}

// === impl Watch ===

impl Watch {
    /// Resolves once the drain has been triggered (immediately if it already was).
    pub async fn signaled(&mut self) {
        // An error means the Drain was dropped without draining: treat it as
        // a signal too, so nothing waits forever.
        let _ = self.rx.wait_for(|draining| *draining).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn completes_when_all_watches_drop() {
        let (drain, watch) = channel();
        let mut w2 = watch.clone();
        let task = tokio::spawn(async move {
            w2.signaled().await;
            drop(w2);
        });
        drop(watch);
        assert_eq!(
            drain.drain(Duration::from_secs(5)).await,
            DrainOutcome::Complete
        );
        task.await.expect("task");
    }

    #[tokio::test]
    async fn reports_stragglers_at_the_deadline() {
        let (drain, watch) = channel();
        let outcome = drain.drain(Duration::from_millis(10)).await;
        assert_eq!(outcome, DrainOutcome::DeadlineExceeded { remaining: 1 });
        assert!(watch.is_draining());
    }
}
