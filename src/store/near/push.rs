//! What the tracking connection hears, applied to the copies: the one place
//! the near cache hears Redis. The Redis adapter (`store::redis::tracking`)
//! only reads pushes into [`LinkEvent`]s; their meaning for the cache, and
//! the rule that nothing is served while the link is down, live here.

use super::NearCache;
use crate::store::redis::{LinkEvent, TrackingSink};

impl TrackingSink for NearCache {
    fn is_up(&self) -> bool {
        NearCache::is_up(self)
    }

    fn heard(&self, event: LinkEvent) {
        match event {
            LinkEvent::Opened => self.link_up(),
            LinkEvent::Invalidated(id) => self.invalidate(&id),
            LinkEvent::Flushed => self.invalidate_all(),
            LinkEvent::Disconnected => {
                tracing::info!(
                    "the near cache's connection to redis closed; cache bypassed until it is back"
                );
                self.link_down();
            }
            LinkEvent::Closed => self.link_down(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Limits, Session};

    #[test]
    fn invalidations_drop_the_named_sessions_and_a_flush_drops_all() {
        let limits = Limits {
            ttl_ms: 60_000,
            max_lifetime_ms: 600_000,
            max_metadata_bytes: 1024,
        };
        let near = NearCache::new(1 << 20, limits);
        near.heard(LinkEvent::Opened);
        let mut a = Session::new("u".into(), "{}".into(), 1_000, &limits);
        a.id = [1; 16];
        let mut b = a.clone();
        b.id = [2; 16];
        for s in [&a, &b] {
            let t = near.ticket(&s.id);
            near.fill((*s).clone(), 0, t, 1_000);
        }
        near.heard(LinkEvent::Invalidated(a.id));
        assert!(near.touch(&a.id, 2_000).is_none());
        assert!(near.touch(&b.id, 2_000).is_some());
        near.heard(LinkEvent::Flushed);
        assert!(near.touch(&b.id, 2_000).is_none());
        assert!(TrackingSink::is_up(&near));
        near.heard(LinkEvent::Disconnected);
        assert!(!TrackingSink::is_up(&near));
        near.heard(LinkEvent::Opened);
        near.heard(LinkEvent::Closed);
        assert!(!TrackingSink::is_up(&near));
    }
}
