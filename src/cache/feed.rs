//! The invalidation feed: the background task that hears other nodes'
//! events, brings Redis back into use after an outage (replaying the
//! journal first) and probes it meanwhile.

use super::redis::{self, CacheRedis};
use super::{Cache, Operation};
use crate::shutdown::Shutdown;
use std::sync::atomic::Ordering;

impl Cache {
    /// An event from another node.
    fn heard(&self, payload: &[u8]) {
        let Some((op, origin, ns, key)) = redis::parse_event(payload) else {
            return;
        };
        if origin == self.inner.origin {
            return;
        }
        self.inner
            .counters
            .events_heard
            .fetch_add(1, Ordering::Relaxed);
        match key {
            Some(key) => {
                let mkey = format!("{ns}/{key}");
                self.drop_local(&mkey);
                if op == Operation::Put {
                    self.wake(&mkey);
                }
            }
            None => self.raise_floor(ns),
        }
    }

    /// The background task: subscribes to the events (reconnecting with
    /// backoff), replays the outage journal whenever Redis is back, and
    /// probes Redis while requests found it unreachable. Ends on shutdown.
    pub async fn run(self, mut shutdown: Shutdown) {
        let Some(r) = self.inner.redis.clone() else {
            return;
        };
        let (first, max) = self.inner.probe;
        let mut delay = first;
        loop {
            if shutdown.is_shutdown() {
                return;
            }
            match r.subscribe().await {
                Ok(mut pubsub) => {
                    delay = first;
                    let stop = match self.recover(&r).await {
                        true => self.listen(&r, &mut pubsub, &mut shutdown).await,
                        false => false,
                    };
                    self.inner.subscribed.store(false, Ordering::Release);
                    if stop {
                        return;
                    }
                }
                Err(e) => self.mark_down(&e),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.recv() => return,
            }
            delay = (delay * 2).min(max);
        }
    }

    /// Just subscribed: replays the journal, then drops everything held
    /// locally (events may have been missed) and serves from Redis again.
    async fn recover(&self, r: &CacheRedis) -> bool {
        if let Err(e) = self.replay(r).await {
            self.mark_down(&e);
            return false;
        }
        let i = &self.inner;
        i.global_floor.store(self.next_seq(), Ordering::Release);
        i.subscribed.store(true, Ordering::Release);
        self.back_up();
        true
    }

    fn back_up(&self) {
        if !self.inner.redis_up.swap(true, Ordering::AcqRel) {
            tracing::info!("cache: redis reachable; serving the cache from redis");
        }
    }

    /// Hears events until the subscription breaks; meanwhile brings Redis
    /// back into use after a request found it unreachable. True on shutdown.
    async fn listen(
        &self,
        r: &CacheRedis,
        pubsub: &mut ::redis::aio::PubSub,
        shutdown: &mut Shutdown,
    ) -> bool {
        use futures_util::StreamExt;
        let i = &self.inner;
        let mut stream = pubsub.on_message();
        let mut tick = tokio::time::interval(i.probe.0);
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(m) => self.heard(m.get_payload_bytes()),
                    None => {
                        if let Err(e) = r.ping().await {
                            self.mark_down(&e);
                        }
                        return false;
                    }
                },
                _ = tick.tick() => {
                    if !i.redis_up.load(Ordering::Acquire) || i.journal_len.load(Ordering::Acquire) > 0 {
                        let back = match r.ping().await {
                            Ok(()) => self.replay(r).await,
                            Err(e) => Err(e.into()),
                        };
                        match back {
                            Ok(()) => self.back_up(),
                            // The subscription may be as dead as the
                            // connection: start over (and drop what is
                            // held locally once it is back).
                            Err(e) => {
                                self.mark_down(&e);
                                return false;
                            }
                        }
                    }
                }
                _ = shutdown.recv() => return true,
            }
        }
    }
}
