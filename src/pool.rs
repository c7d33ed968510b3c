//! Admission control: the bounds that keep a small board predictable.
//!
//! The worker pool itself is the tokio runtime, built in `main.rs` with exactly
//! `workers` threads and at most `blocking_threads` blocking threads; nothing
//! spawns a thread per request. What this module adds is the refusal: above
//! `max_connections` open connections or `max_in_flight` requests being served,
//! the node answers 503 + `Retry-After` at once instead of queueing, so memory
//! and latency stay bounded and the balancer can try another node.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Admission {
    pub workers: usize,
    max_connections: usize,
    max_in_flight: usize,
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    completed: AtomicU64,
    rejected: AtomicU64,
}

/// Figures for `/api/health` and `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    pub workers: usize,
    pub connections: usize,
    pub in_flight: usize,
    pub completed: u64,
    pub rejected: u64,
}

impl Admission {
    pub fn new(workers: usize, max_connections: usize, max_in_flight: usize) -> Arc<Admission> {
        Arc::new(Admission {
            workers,
            max_connections,
            max_in_flight,
            connections: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        })
    }

    /// A slot for a new connection, or `None` when the node is full.
    pub fn try_connect(self: &Arc<Self>) -> Option<ConnectionSlot> {
        acquire(&self.connections, self.max_connections)
            .map(|_| ConnectionSlot(self.clone()))
            .or_else(|| {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                None
            })
    }

    /// A slot for a request, or `None` when too many are being served.
    pub fn try_admit(self: &Arc<Self>) -> Option<RequestSlot> {
        acquire(&self.in_flight, self.max_in_flight)
            .map(|_| RequestSlot(self.clone()))
            .or_else(|| {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                None
            })
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            workers: self.workers,
            connections: self.connections.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }
}

/// Increments `counter` unless it is at `max`.
fn acquire(counter: &AtomicUsize, max: usize) -> Option<()> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| ())
}

/// Held for a connection's lifetime.
pub struct ConnectionSlot(Arc<Admission>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held while a request is served.
pub struct RequestSlot(Arc<Admission>);

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.completed.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_enforced_and_released() {
        let a = Admission::new(2, 1, 2);
        let r1 = a.try_admit().unwrap();
        let _r2 = a.try_admit().unwrap();
        assert!(a.try_admit().is_none());
        drop(r1);
        assert!(a.try_admit().is_some());
        let c = a.try_connect().unwrap();
        assert!(a.try_connect().is_none());
        drop(c);
        assert!(a.try_connect().is_some());
        let s = a.stats();
        assert_eq!((s.rejected, s.completed), (2, 2));
    }
}
