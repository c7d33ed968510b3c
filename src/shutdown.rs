//! The node's stop signal, named: every background task and the accept loop
//! holds a [`Shutdown`] and ends when it fires (as mini-redis's `Shutdown`).
//!
//! One [`ShutdownTrigger`] (kept by `node.rs`) fires it once; any number of
//! cloned [`Shutdown`]s hear it. A task that sleeps or waits races its wait
//! against [`Shutdown::recv`]; a loop between batches asks
//! [`Shutdown::is_shutdown`].

use tokio::sync::watch;

/// Fires the stop signal (held by whoever decides the node stops).
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Hears the stop signal. Cheap to clone: one per task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A trigger and its first listener.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Tells every [`Shutdown`] to stop. Idempotent.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// A signal that never fires: for a component run on its own (a test,
    /// a one-shot command) with nobody to stop it.
    pub fn never() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        // Keep the sender alive for the life of the process, so `recv`
        // waits forever instead of returning at once on a closed channel.
        std::mem::forget(tx);
        Shutdown(rx)
    }

    /// Has the signal fired?
    pub fn is_shutdown(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until the signal fires (at once if it already has). A trigger
    /// dropped without firing counts as fired: nobody can stop the task
    /// any more, so it had better stop now.
    pub async fn recv(&mut self) {
        // `wait_for` returns at once when the value already matches, and an
        // error when the sender is gone.
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_listener_hears_one_fire_even_if_it_listens_late() {
        let (trigger, mut early) = channel();
        let mut late = early.clone();
        assert!(!early.is_shutdown());
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(1), early.recv())
            .await
            .expect("early listener hears it");
        tokio::time::timeout(Duration::from_secs(1), late.recv())
            .await
            .expect("late listener hears it");
        assert!(late.is_shutdown());
    }

    #[tokio::test]
    async fn a_dropped_trigger_stops_its_listeners_and_never_never_fires() {
        let (trigger, mut s) = channel();
        drop(trigger);
        tokio::time::timeout(Duration::from_secs(1), s.recv())
            .await
            .expect("dropped trigger counts as fired");
        let mut n = Shutdown::never();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), n.recv())
                .await
                .is_err(),
            "never() must not fire"
        );
    }
}
