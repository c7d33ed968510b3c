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
//! per a hash of the id, each holding the time of the last uncached use
//! and a 12-bit fingerprint of its session (other bytes of the id). A use
//! is admitted only when its own session left the slot's time: without
//! the fingerprint, at 100 000 sessions used 15 000 times a second a slot
//! was touched by *some* session within the last second for about one use
//! in five, and those uses were cached as if used again (more than the
//! sessions really used again, ~14 %). Two sessions sharing a slot and a
//! fingerprint (1 in 4 096) may still admit each other early: that only
//! costs a fill, never a wrong answer.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const SLOTS: usize = 1 << 16;
/// Times are kept in ticks of 16 ms, in the slot's low 20 bits (they wrap
/// after 4.6 hours: a use exactly that long after the last one is admitted
/// wrongly, which costs one fill).
const TICK_SHIFT: u32 = 4;
const TICK_BITS: u32 = 20;
const TICK_MASK: u32 = (1 << TICK_BITS) - 1;

pub(super) struct Doorkeeper {
    seen: Box<[AtomicU32]>,
    /// The window in ticks; `None`: every session is admitted.
    window: Option<u32>,
    /// Uses not admitted (read through, not cached).
    refused: AtomicU64,
}

impl Doorkeeper {
    pub(super) fn new(window: Duration) -> Doorkeeper {
        // a window past the ticks' wrap is as good as no memory: every
        // session seen before within 4.6 h is admitted
        let ticks = (window.as_millis() >> TICK_SHIFT).clamp(1, u128::from(TICK_MASK));
        let window = (!window.is_zero()).then(|| u32::try_from(ticks).unwrap_or(TICK_MASK));
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
        // Bytes of a UUID v4 that are random (6 and 8 carry its version and
        // variant). The lowest bit is always set: 0 marks a slot not used.
        let tick = ((now >> TICK_SHIFT) as u32) & TICK_MASK;
        let print = u32::from(u16::from_le_bytes([id[9], id[10]])) & 0xfff;
        let mark = (print << TICK_BITS) | tick | 1;
        let slot = &self.seen[usize::from(u16::from_le_bytes([id[3], id[4]]))];
        let before = slot.swap(mark, Ordering::Relaxed);
        let admitted = before != 0
            && before >> TICK_BITS == print
            && (mark & TICK_MASK).wrapping_sub(before & TICK_MASK) & TICK_MASK <= window;
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
    fn a_session_sharing_a_slot_does_not_admit_another() {
        let door = Doorkeeper::new(Duration::from_millis(1_000));
        // the same slot (bytes 3 and 4), other fingerprints (bytes 9, 10)
        let mut a = [7u8; 16];
        let mut b = [7u8; 16];
        a[9] = 1;
        b[9] = 2;
        let t = 1_700_000_000_000;
        assert!(!door.admits(&a, t));
        assert!(!door.admits(&b, t + 100), "b was never used before");
        assert!(!door.admits(&a, t + 200), "b's use took the slot");
        assert!(door.admits(&a, t + 300));
        // across the ticks' wrap (2^20 ticks of 16 ms), a use 100 ms
        // after the last one is still within the window
        let wrap = (1u64 << 24) - 64;
        assert!(!door.admits(&b, wrap));
        assert!(door.admits(&b, wrap + 100));
    }

    #[test]
    fn a_window_of_zero_admits_every_session() {
        let door = Doorkeeper::new(Duration::ZERO);
        assert!(door.admits(&[1; 16], 1));
        assert_eq!(door.refused(), 0);
    }
}
