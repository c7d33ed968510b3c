//! Counting the operations Redis refused because their id was applied
//! already (late duplicates; see `claim` in `prelude.lua`).
//!
//! Two sources, because neither sees every refusal on its own:
//! - the answers this node reads (a replay that finds its id applied, a
//!   retried write-behind batch): counted at once, even with Redis away;
//! - Redis's own counter for this node, `dups:<origin>` (field `n`), which
//!   every refusing script raises. Only it sees the commonest case: the late
//!   copy of a command the node sent on a connection it has since closed
//!   (TCP delivering it after the partition healed), whose answer nobody
//!   reads. The node reads it about once a second (`refresh_active`).
//!
//! The figure reported is the larger of the two. Both are kept monotonic, so
//! the larger is too: Redis's counter can go back (Redis restarted empty, a
//! replica that missed the last increments was promoted, or the key lapsed
//! after a lifetime without refusals), so what it says is summed as
//! increments, and a value lower than the last one read counts as a counter
//! that started again from zero. Summing both sources would count most
//! refusals twice (the script raises Redis's counter for the ones the node
//! reads too); the larger undercounts only refusals made while Redis lost
//! its counter, which is a choice of being short rather than over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub(crate) struct Refusals {
    /// Refusals whose answer this node read.
    read: AtomicU64,
    redis: Mutex<Tally>,
}

#[derive(Default)]
struct Tally {
    /// The counter's value at the last read; `None` before the first. The
    /// first read is the baseline: with an origin kept across a restart
    /// (see `local`), the counter holds the previous process's refusals,
    /// which this process's counter does not report.
    last: Option<u64>,
    /// Increments seen since the baseline.
    total: u64,
}

impl Refusals {
    /// One refusal read from a script's answer; the refusals read so far.
    pub(crate) fn read_one(&self) -> u64 {
        self.read.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// What Redis's counter for this node holds now (0: no key). Returns
    /// the refusals it showed that were new since the last read.
    pub(crate) fn redis_holds(&self, now: u64) -> u64 {
        let mut t = self.redis.lock().unwrap_or_else(|p| p.into_inner());
        let new = match t.last {
            None => 0,
            Some(last) if now >= last => now - last,
            // Started again from zero: everything it holds is new.
            Some(_) => now,
        };
        t.total += new;
        t.last = Some(now);
        new
    }

    /// The figure reported: monotonic (see the module's comment).
    pub(crate) fn total(&self) -> u64 {
        let redis = self.redis.lock().unwrap_or_else(|p| p.into_inner()).total;
        self.read.load(Ordering::Relaxed).max(redis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_figure_takes_the_larger_source_and_never_goes_back() {
        let r = Refusals::default();
        // a counter left by an earlier process of the same origin: baseline
        assert_eq!(r.redis_holds(7), 0);
        assert_eq!(r.total(), 0);
        // one refusal read, one more Redis saw on a closed connection
        r.read_one();
        assert_eq!(r.total(), 1);
        assert_eq!(r.redis_holds(9), 2);
        assert_eq!(r.total(), 2);
        // Redis lost its data: the counter starts again, the figure holds
        assert_eq!(r.redis_holds(0), 0);
        assert_eq!(r.total(), 2);
        assert_eq!(r.redis_holds(3), 3);
        assert_eq!(r.total(), 5);
        // answers read never add to what Redis already counted
        r.read_one();
        r.read_one();
        assert_eq!(r.total(), 5);
        assert_eq!(r.redis_holds(3), 0);
        assert_eq!(r.total(), 5);
    }
}
