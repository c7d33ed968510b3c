//! The operation ids this node has sent to Redis and not yet settled, and
//! the *floor* every script call carries: the lowest of them, minus one.
//!
//! Why a floor and not a high-water mark: ids are drawn node-wide, and two
//! requests on one session (or a request and the write-behind, which use
//! two connections) may reach Redis in another order than their ids. A
//! script that refused every id below the highest applied would refuse a
//! legitimate operation. Instead each record keeps, per node, the floor and
//! the ids above it that were applied (`claim` in `prelude.lua`); an id is
//! refused only when listed or at or below the floor. The floor is safe to
//! refuse below because an id leaves this set only once the node has its
//! answer, or, for a call that failed (an id *in doubt*: Redis may or may
//! not have applied it, and it was journaled under the same id), once the
//! journal replay that follows the outage has applied or refused it.
//! Whatever arrives afterwards under that id is a late copy of a command
//! already accounted for: a duplicate.
//!
//! Drawing an id and entering it here happen under one lock, so no call
//! carries a floor above an id drawn before it and not yet sent.

use std::collections::BTreeSet;
use std::sync::Mutex;

#[derive(Default)]
pub(crate) struct InFlight {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Sent (or about to be), answer not yet in.
    flying: BTreeSet<u64>,
    /// Failed calls: held until the journal replay after the outage.
    doubt: BTreeSet<u64>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Draws an id with `next` and enters it. Never 0 (a database's first
    /// id): the scripts' floor starts at 0, and 0 is at or below it.
    pub(crate) fn draw<E>(&self, mut next: impl FnMut() -> Result<u64, E>) -> Result<u64, E> {
        let mut st = self.lock();
        let mut seq = next()?;
        if seq == 0 {
            seq = next()?;
        }
        st.flying.insert(seq);
        Ok(seq)
    }

    /// The call answered (or will never be sent again but as a duplicate).
    pub(crate) fn settle(&self, seq: u64) {
        self.lock().flying.remove(&seq);
    }

    /// The call failed: Redis may have applied it; held until the replay.
    pub(crate) fn doubt(&self, seq: u64) {
        let mut st = self.lock();
        st.flying.remove(&seq);
        st.doubt.insert(seq);
    }

    /// The journal is drained: every id in doubt was replayed (applied or
    /// found applied) or dropped for good.
    pub(crate) fn clear_doubt(&self) {
        self.lock().doubt.clear();
    }

    /// The floor a call carries: every id at or below it is settled. `also`:
    /// the lowest id the caller itself still has to send (a replay batch's
    /// first entry), if any.
    pub(crate) fn floor(&self, also: Option<u64>) -> u64 {
        let st = self.lock();
        let low = [st.flying.first(), st.doubt.first(), also.as_ref()]
            .into_iter()
            .flatten()
            .min()
            .copied();
        low.map_or(0, |n| n.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_stays_below_every_unsettled_id() {
        let f = InFlight::default();
        let mut n = 10;
        let mut next = || -> Result<u64, ()> {
            n += 1;
            Ok(n)
        };
        let mut first = true;
        let mut from_zero = || -> Result<u64, ()> {
            if std::mem::take(&mut first) {
                Ok(0)
            } else {
                Ok(1)
            }
        };
        assert_eq!(f.draw(&mut from_zero), Ok(1), "0 is never an id");
        f.settle(1);
        let a = f.draw(&mut next).unwrap();
        let b = f.draw(&mut next).unwrap();
        assert_eq!(f.floor(None), a - 1);
        f.settle(b);
        assert_eq!(f.floor(None), a - 1);
        f.doubt(a);
        assert_eq!(f.floor(None), a - 1, "an id in doubt holds the floor");
        assert_eq!(f.floor(Some(5)), 4);
        f.clear_doubt();
        assert_eq!(f.floor(None), 0);
    }
}
