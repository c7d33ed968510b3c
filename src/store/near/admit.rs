//! Which sessions the near cache takes: those used again soon.
//!
//! On a LAN of browsers most sessions are used now and then, far apart.
//! Caching each of them costs more than it saves: a read over the tracking
//! connection (Redis then keeps a tracking entry), a fill that evicts
//! another copy, the write-behind of its one count, and the invalidation
//! Redis pushes when that count lands. So a use of a session the cache does
//! not hold fills it only when the same session was used within
//! `near_admit_ms` before; otherwise it is read through (one plain `HGETALL`
//! over the main connection, not kept) and counted with the write-behind, in
//! one batch call with the other such counts (see `Store::near_read_through`).
//! A browser loading a page (several requests in a row) or polling is cached
//! from its second request on.
//!
//! The memory of recent uses is a fixed table of 65 536 slots (256 KB), one
//! per a hash of the id, holding the time of the last uncached use. Two
//! sessions sharing a slot may admit each other early: that only costs a
//! fill, never a wrong answer.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const SLOTS: usize = 1 << 16;
/// Times are kept in ticks of 16 ms (so a u32 wraps after two years; a
/// wrapped comparison only admits or refuses one use wrongly).
const TICK_SHIFT: u32 = 4;

pub(super) struct Doorkeeper {
    seen: Box<[AtomicU32]>,
    /// The window in ticks; `None`: every session is admitted.
    window: Option<u32>,
    /// Uses not admitted (read through, not cached).
    refused: AtomicU64,
}

impl Doorkeeper {
    pub(super) fn new(window: Duration) -> Doorkeeper {
        let ticks = (window.as_millis() >> TICK_SHIFT).max(1);
        let window = (!window.is_zero()).then(|| u32::try_from(ticks).unwrap_or(u32::MAX));
        Doorkeeper {
            seen: match window {
                Some(_) => (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
                None => Box::new([]),
            },
            window,
            refused: AtomicU64::new(0),
        }
    }

    /// Whether a use at `now` (unix ms) of a session the cache does not
    /// hold should fill it: the session was used within the window.
    pub(super) fn admits(&self, id: &[u8; 16], now: u64) -> bool {
        let Some(window) = self.window else {
            return true;
        };
        // never 0, which marks a slot not used yet
        let tick = ((now >> TICK_SHIFT) as u32) | 1;
        let slot = &self.seen[usize::from(u16::from_le_bytes([id[3], id[4]]))];
        let before = slot.swap(tick, Ordering::Relaxed);
        let admitted = before != 0 && tick.wrapping_sub(before) <= window;
        if !admitted {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    pub(super) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_admitted_at_its_second_use_within_the_window() {
        let door = Doorkeeper::new(Duration::from_millis(1_000));
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let t = 1_700_000_000_000;
        assert!(!door.admits(&a, t));
        assert!(door.admits(&a, t + 900));
        // a use long after the last one starts over
        assert!(!door.admits(&b, t));
        assert!(!door.admits(&b, t + 5_000));
        assert!(door.admits(&b, t + 5_100));
        assert_eq!(door.refused(), 3);
    }

    #[test]
    fn a_window_of_zero_admits_every_session() {
        let door = Doorkeeper::new(Duration::ZERO);
        assert!(door.admits(&[1; 16], 1));
        assert_eq!(door.refused(), 0);
    }
}
