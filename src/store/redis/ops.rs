//! The request-path operations: one script call (one round trip) each,
//! atomic with respect to every other node.

use super::record::{as_array, as_int, as_string, field_name, metadata_fields, unexpected};
use super::scripts::{self, CreateReply, PatchReply, RotateReply, TouchReply};
use super::{RedisStore, Result};
use crate::session::{format_id, Patch, Session};
use crate::store::{PatchOutcome, StoreError};
use redis::Value;

/// Sessions a log-out-everywhere deletes per script call: about a
/// millisecond of Redis time (five commands each, one event for the chunk),
/// whatever the user holds.
const DELETE_USER_CHUNK: u64 = 64;

/// `delete_user.lua`'s answer: whether more may remain, and the live ids it
/// deleted.
pub(super) fn delete_user_reply(reply: &Value) -> Result<(bool, Vec<[u8; 16]>)> {
    let items = as_array(reply)?;
    let more = items.first().and_then(as_int) == Some(1);
    let ids = items
        .get(1..)
        .unwrap_or_default()
        .iter()
        .filter_map(as_string)
        .filter_map(|s| crate::session::parse_session_id(&s))
        .collect();
    Ok((more, ids))
}

/// An operation's id and the floor it carries (see `inflight`).
#[derive(Clone, Copy)]
pub(super) struct Stamp {
    pub seq: u64,
    pub floor: u64,
}

/// How `create.lua` treats a session that exists or is tombstoned.
#[derive(Clone, Copy)]
pub(super) enum CreateMode {
    /// A new session: written as is.
    Live,
    /// A journaled create: skipped if it exists or was deleted.
    Replay,
    /// A mirror copy after Redis lost data: skipped if deleted; compared and
    /// set if it exists (the higher version wins, counters take the max).
    Reseed,
}

impl CreateMode {
    fn arg(self) -> &'static str {
        match self {
            CreateMode::Live => "0",
            CreateMode::Replay => "1",
            CreateMode::Reseed => "2",
        }
    }
}

impl RedisStore {
    pub async fn create(&self, s: &Session) -> Result<()> {
        if self.create_inner(s, CreateMode::Live, 0).await? == CreateReply::Exists {
            // A copy of this create was applied already (see create.lua).
            self.refused_duplicate("create");
            return Ok(());
        }
        // The cached count (refreshed every second) follows creates at once,
        // so a burst of them meets `max_sessions` without waiting for it.
        self.inner
            .active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn create_inner(
        &self,
        s: &Session,
        mode: CreateMode,
        includes: u64,
    ) -> Result<CreateReply> {
        let reply = self.run(self.create_inv(s, mode, includes)).await?;
        CreateReply::decode(&reply).ok_or_else(|| unexpected(&reply))
    }

    /// `includes`: the highest operation id of this node the record already
    /// includes (a mirror copy being restored), 0 for none.
    pub(super) fn create_inv(
        &self,
        s: &Session,
        mode: CreateMode,
        includes: u64,
    ) -> redis::ScriptInvocation<'_> {
        let id = format_id(&s.id);
        let mut inv = self.inner.scripts.create.prepare_invoke();
        inv.key(self.key("s:", &id))
            .key(self.key("t:", &id))
            .key(self.key("active", ""))
            .key(self.key("u:", &s.user_id))
            .key(self.key("ut:", &s.user_id))
            .key(self.dups_key())
            .arg(mode.arg())
            .arg(&id)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(&s.user_id)
            .arg(s.created_at)
            .arg(s.last_accessed)
            .arg(s.expires_at)
            .arg(s.request_count)
            .arg(s.version)
            .arg(self.index_limit(&s.user_id))
            .arg(&self.inner.prefix)
            .arg(self.channel())
            .arg(&self.inner.origin_field)
            .arg(includes)
            .arg(s.login_at);
        for (k, v) in metadata_fields(&s.metadata) {
            inv.arg(k).arg(v);
        }
        inv
    }

    /// Counts a request on the session and returns it, in one round trip:
    /// `MULTI; EVALSHA touch; HGETALL; EXEC`, atomic like a single script.
    /// `seq`: the operation id (see `journal`), which the node reuses if it
    /// journals the touch after this call timed out.
    pub async fn touch(&self, id: &[u8; 16], now: u64, seq: u64) -> Result<Option<Session>> {
        let ids = format_id(id);
        let session_key = self.key("s:", &ids);
        let inv = self.touch_inv(&ids, &session_key, now, 1, self.stamp(seq), false);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .invoke_script(&inv)
            .cmd("HGETALL")
            .arg(&session_key);
        let (pipe, inv) = (&pipe, &inv);
        let (reply, fields): (Value, Vec<Value>) = self
            .call(self.inner.timeout, |mut c| async move {
                match pipe.query_async(&mut c).await {
                    // A Redis that restarted has no scripts: load, then retry.
                    Err(e)
                        if e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        inv.load_async(&mut c).await?;
                        pipe.query_async(&mut c).await
                    }
                    other => other,
                }
            })
            .await?;
        match TouchReply::decode(&reply) {
            Some(TouchReply::Counted(_)) => self.session_from(id, &fields).map(Some),
            Some(TouchReply::Corrupt) => Err(self.unreadable(id)),
            // A late copy of a touch already counted: whoever sent it has
            // long had its answer.
            Some(TouchReply::AlreadyApplied) => {
                self.refused_duplicate("touch");
                Ok(None)
            }
            Some(TouchReply::Gone | TouchReply::Deleted) => Ok(None),
            None => Err(unexpected(&reply)),
        }
    }

    /// `ids`: the formatted id; `session_key`: its `s:` key (the request
    /// path reads it back too, so it is built once).
    pub(super) fn touch_inv(
        &self,
        ids: &str,
        session_key: &str,
        at: u64,
        count: u64,
        stamp: Stamp,
        replay: bool,
    ) -> redis::ScriptInvocation<'_> {
        let mut inv = self.inner.scripts.touch.prepare_invoke();
        inv.key(session_key)
            .key(self.key("active", ""))
            .key(self.key("t:", ids))
            .key(self.dups_key())
            .arg(at)
            .arg(self.inner.limits.ttl_ms)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(ids)
            .arg(if replay { "1" } else { "0" })
            .arg(count)
            .arg(&self.inner.origin_field)
            .arg(stamp.seq)
            .arg(stamp.floor)
            .arg(self.inner.limits.slide_step_ms());
        inv
    }

    pub async fn patch(
        &self,
        id: &[u8; 16],
        patch: &Patch,
        if_match: Option<u64>,
        now: u64,
        seq: u64,
    ) -> Result<PatchOutcome> {
        let reply = self
            .run(self.patch_inv(id, patch, if_match, now, self.stamp(seq), false))
            .await?;
        match PatchReply::decode(&reply) {
            Some(PatchReply::Applied(fields)) => {
                Ok(PatchOutcome::Updated(self.session_from(id, fields)?))
            }
            Some(PatchReply::VersionMismatch(current)) => {
                Ok(PatchOutcome::VersionMismatch { current })
            }
            Some(PatchReply::Corrupt) => Err(self.unreadable(id)),
            Some(PatchReply::TooLarge(size)) => Err(StoreError::Input(
                crate::session::InputError::MetadataTooLarge {
                    size: size as usize,
                    limit: self.inner.limits.max_metadata_bytes,
                },
            )),
            Some(PatchReply::AlreadyApplied) => {
                self.refused_duplicate("patch");
                Ok(PatchOutcome::NotFound)
            }
            Some(PatchReply::Gone | PatchReply::Deleted) => Ok(PatchOutcome::NotFound),
            None => Err(unexpected(&reply)),
        }
    }

    pub(super) fn patch_inv(
        &self,
        id: &[u8; 16],
        patch: &Patch,
        if_match: Option<u64>,
        now: u64,
        stamp: Stamp,
        replay: bool,
    ) -> redis::ScriptInvocation<'_> {
        let ids = format_id(id);
        let mut inv = self.inner.scripts.patch.prepare_invoke();
        inv.key(self.key("s:", &ids))
            .key(self.key("t:", &ids))
            .key(self.dups_key())
            .arg(now)
            .arg(if_match.map(|v| v.to_string()).unwrap_or_default())
            .arg(patch.user_id.as_deref().unwrap_or(""))
            .arg(&self.inner.prefix)
            .arg(&ids)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(self.inner.limits.max_metadata_bytes)
            .arg(if replay { "1" } else { "0" })
            .arg(&self.inner.origin_field)
            .arg(stamp.seq)
            .arg(patch.user_id.as_deref().map_or(0, |u| self.index_limit(u)))
            .arg(self.channel())
            .arg(stamp.floor);
        if let Some(meta) = &patch.metadata {
            for (k, v) in meta {
                inv.arg(field_name(k)).arg(v.to_string());
            }
        }
        inv
    }

    pub async fn delete(&self, id: &[u8; 16]) -> Result<bool> {
        match self.run(self.delete_inv(id, false)).await? {
            Value::Int(n) => Ok(n > 0),
            other => Err(unexpected(&other)),
        }
    }

    /// `replay`: also deletes what the session was rotated into meanwhile.
    pub(super) fn delete_inv(&self, id: &[u8; 16], replay: bool) -> redis::ScriptInvocation<'_> {
        let ids = format_id(id);
        let mut inv = self.inner.scripts.delete.prepare_invoke();
        inv.key(self.key("s:", &ids))
            .key(self.key("t:", &ids))
            .key(self.key("active", ""))
            .arg(&ids)
            .arg(&self.inner.prefix)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(self.channel())
            .arg(if replay { "1" } else { "0" });
        inv
    }

    pub async fn rotate(&self, id: &[u8; 16], new_id: &[u8; 16]) -> Result<Option<Session>> {
        let reply = self
            .run(self.rotate_inv(id, new_id, crate::session::now_ms(), false))
            .await?;
        match RotateReply::decode(&reply) {
            Some(RotateReply::Moved(fields)) => Ok(Some(self.session_from(new_id, fields)?)),
            Some(RotateReply::Corrupt) => Err(self.unreadable(id)),
            Some(RotateReply::Gone | RotateReply::AlreadyMoved | RotateReply::Deleted) => Ok(None),
            None => Err(unexpected(&reply)),
        }
    }

    pub(super) fn rotate_inv(
        &self,
        id: &[u8; 16],
        new_id: &[u8; 16],
        now: u64,
        replay: bool,
    ) -> redis::ScriptInvocation<'_> {
        let (old, new) = (format_id(id), format_id(new_id));
        let mut inv = self.inner.scripts.rotate.prepare_invoke();
        inv.key(self.key("s:", &old))
            .key(self.key("s:", &new))
            .key(self.key("t:", &old))
            .key(self.key("active", ""))
            .key(self.key("t:", &new))
            .arg(&old)
            .arg(&new)
            .arg(&self.inner.prefix)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(self.channel())
            .arg(now)
            .arg(if replay { "1" } else { "0" });
        inv
    }

    /// The sessions a user's index may hold before the oldest is evicted;
    /// 0 (not indexed) for anonymous sessions, which nobody lists.
    fn index_limit(&self, user: &str) -> u64 {
        if user == crate::session::ANONYMOUS {
            0
        } else {
            self.inner.max_per_user
        }
    }

    /// One page of a user's live sessions, oldest first, and the offset of
    /// the next page (`None` at the end). At most `limit` are read.
    pub async fn list_user(
        &self,
        user: &str,
        now: u64,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<Session>, Option<u64>)> {
        let mut inv = self.inner.scripts.list_user.prepare_invoke();
        inv.key(self.key("u:", user))
            .arg(now)
            .arg(&self.inner.prefix)
            .arg(user)
            .arg(offset)
            .arg(limit);
        let reply = self.run(inv).await?;
        let items = as_array(&reply)?;
        let next = items
            .first()
            .and_then(as_int)
            .and_then(|n| u64::try_from(n).ok());
        let mut out = Vec::with_capacity(items.len() / 2);
        for pair in items.get(1..).unwrap_or_default().chunks(2) {
            let (Some(fields), Some(id)) = (pair.first(), pair.get(1).and_then(as_string)) else {
                continue;
            };
            if let Some(id) = crate::session::parse_session_id(&id) {
                match self.session_from(&id, as_array(fields)?) {
                    Ok(s) => out.push(s),
                    // Listed without it; the rest of the user's sessions stand.
                    Err(e) => tracing::error!(error = %e, "skipped in a user listing"),
                }
            }
        }
        Ok((out, next))
    }

    /// Deletes all of a user's sessions, in chunks of a bounded size (each
    /// one short script call), recording `at` as the user's log-out time;
    /// returns the ids that were live.
    pub async fn delete_user(&self, user: &str, at: u64) -> Result<Vec<[u8; 16]>> {
        let mut ids = Vec::new();
        loop {
            let reply = self.run(self.delete_user_inv(user, None, at)).await?;
            let (more, chunk) = delete_user_reply(&reply)?;
            ids.extend(chunk);
            if !more {
                return Ok(ids);
            }
        }
    }

    /// `before`: delete only sessions the user had by then (a replayed
    /// logout), or all (`None`, a live one); `at`: the log-out time recorded.
    pub(super) fn delete_user_inv(
        &self,
        user: &str,
        before: Option<u64>,
        at: u64,
    ) -> redis::ScriptInvocation<'_> {
        let mut inv = self.inner.scripts.delete_user.prepare_invoke();
        inv.key(self.key("u:", user))
            .key(self.key("active", ""))
            .key(self.key("ut:", user))
            .arg(&self.inner.prefix)
            .arg(user)
            .arg(self.inner.limits.max_lifetime_ms)
            .arg(self.channel())
            .arg(crate::session::now_ms())
            .arg(before.map_or_else(|| "+inf".to_string(), |b| b.to_string()))
            .arg(DELETE_USER_CHUNK)
            .arg(at);
        inv
    }

    /// Writes mirror copies into Redis (a re-seed), each unless it is
    /// tombstoned or its user logged out everywhere after its creation; one
    /// that exists (another node re-seeded it first) is compared and set:
    /// replaced if this copy's version is higher, its counters raised to
    /// this copy's if higher (`create.lua`). One pipelined round trip.
    /// Returns how many were written or raised; an error when Redis refused
    /// any (so the re-seed is tried again, not recorded done).
    pub async fn restore_batch(&self, sessions: &[Session]) -> Result<u64> {
        let invocations: Vec<_> = sessions
            .iter()
            .map(|s| self.create_inv(s, CreateMode::Reseed, 0))
            .collect();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let pipe = &pipe;
        let load = self.load_scripts_pipe();
        let load = &load;
        let replies: Vec<redis::RedisResult<Value>> = self
            .call(self.inner.timeout * 8, |mut c| async move {
                load.query_async::<()>(&mut c).await?;
                pipe.query_async(&mut c).await
            })
            .await?;
        let mut written = 0;
        for reply in &replies {
            match reply.as_ref().map(CreateReply::decode) {
                Ok(Some(CreateReply::Created | CreateReply::Raised)) => written += 1,
                Ok(Some(_)) => {}
                Ok(None) => return Err(StoreError::Redis("unexpected reply to a restore".into())),
                Err(e) => return Err(StoreError::Redis(format!("restore refused: {e}"))),
            }
        }
        Ok(written)
    }

    /// Loads every script (a pipelined EVALSHA does not load a missing one,
    /// and a Redis that restarted empty has none).
    pub(super) fn load_scripts_pipe(&self) -> redis::Pipeline {
        let mut load = redis::pipe();
        for body in scripts::ALL {
            load.cmd("SCRIPT")
                .arg("LOAD")
                .arg(scripts::source(body))
                .ignore();
        }
        load
    }

    /// Writes a mirror copy into Redis unless it is tombstoned, compared
    /// and set against a copy that exists (see `restore_batch`), marked as
    /// including this node's operations up to `includes`.
    pub(crate) async fn restore(&self, s: &Session, includes: u64) -> Result<CreateReply> {
        self.create_inner(s, CreateMode::Reseed, includes).await
    }
}
