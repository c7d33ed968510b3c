//! Replaying the fallback journal: every entry of a batch in one pipelined
//! round trip, applied by Redis as a chain (see `epilogue.lua`), each entry's
//! reply decoded into what the replay does with it.

use super::ops::Stamp;
use super::scripts::{self, CreateReply, PatchReply, RotateReply, TouchReply};
use super::{RedisStore, Result};
use crate::redis_link::{is_bad_record, is_transient};
use crate::session::format_id;
use crate::store::local::journal_ops::Op;
use redis::Value;

/// The outcome of replaying one journal operation.
#[derive(Debug, PartialEq, Eq)]
pub enum Replayed {
    Applied,
    /// Redis has neither the session nor its tombstone: restore it first.
    Missing,
    /// Deleted somewhere: the operation is dropped.
    Tombstoned,
    /// It cannot apply (e.g. the merge would exceed the metadata limit, or
    /// the record in Redis is corrupt): the operation is dropped.
    Refused(String),
    /// Redis refused it for now (out of memory, read-only replica...): it was
    /// not applied and stays in the journal for the next attempt.
    Failed(String),
    /// Applied in part (a log-out-everywhere's first chunks): it stays in the
    /// journal and is sent again at once.
    Partial,
    /// Redis answered it with an error that says nothing about Redis's own
    /// state (a script error): retried a bounded number of times, then dropped.
    Rejected(String),
}

impl RedisStore {
    /// Applies journaled operations in order, in one pipelined round trip,
    /// reporting for each whether the session was there, gone for good
    /// (tombstone) or lost (restore it from the mirror). Pipelining is what
    /// lets replay outpace the fallback traffic that keeps arriving meanwhile.
    pub async fn replay_batch(&self, ops: &[(u64, &Op)]) -> Result<Vec<Replayed>> {
        // Every id of the batch is still to be applied: the floor stays
        // below the first (the journal is in id order; see `inflight`).
        let floor = self
            .inner
            .inflight
            .floor(ops.iter().map(|(seq, _)| *seq).min());
        let invocations: Vec<_> = ops
            .iter()
            .map(|&(seq, op)| match op {
                Op::Create(s) => self.create_inv(s, super::ops::CreateMode::Replay, 0),
                Op::Touch { id, at } => {
                    let ids = format_id(id);
                    self.touch_inv(
                        &ids,
                        &self.key("s:", &ids),
                        *at,
                        1,
                        Stamp { seq, floor },
                        true,
                    )
                }
                Op::Touches { id, count, at } => {
                    let ids = format_id(id);
                    self.touch_inv(
                        &ids,
                        &self.key("s:", &ids),
                        *at,
                        *count,
                        Stamp { seq, floor },
                        true,
                    )
                }
                Op::Patch { id, patch } => {
                    self.patch_inv(id, patch, None, 0, Stamp { seq, floor }, true)
                }
                Op::PatchAt { id, patch, at } => {
                    self.patch_inv(id, patch, None, *at, Stamp { seq, floor }, true)
                }
                Op::Rotate { old, new } => self.rotate_inv(old, new, 0, true),
                Op::Delete { id } => self.delete_inv(id, true),
                Op::DeleteUser { user, before } => {
                    self.delete_user_inv(user, Some(*before), *before)
                }
            })
            .collect();
        let load = self.load_scripts_pipe();
        // The chain (see EPILOGUE): the cursor starts at a fresh token.
        let cursor = self.key("replay:", &self.inner.origin_field);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("SET")
            .arg(&cursor)
            .arg(&token)
            .arg("PX")
            .arg(600_000)
            .ignore();
        let mut prev = token;
        let mut invocations = invocations;
        for (inv, (seq, _)) in invocations.iter_mut().zip(ops) {
            let own = seq.to_string();
            // Under the cursor's name, so it matches the node's key
            // pattern: a least-privilege ACL (`~edgenode:*`) checks every
            // key a script is given, this one too although it is never read.
            inv.key(&cursor).key(format!("{cursor}:chain:{prev}:{own}"));
            prev = own;
        }
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let (load, pipe) = (&load, &pipe);
        // A batch does more work than one request: allow it a few timeouts.
        let replies: Vec<redis::RedisResult<Value>> = self
            .call(self.inner.timeout * 8, |mut c| async move {
                load.query_async::<()>(&mut c).await?;
                pipe.query_async(&mut c).await
            })
            .await?;
        let mut out = Vec::with_capacity(ops.len());
        for ((_, op), reply) in ops.iter().zip(replies.iter()) {
            let outcome = match reply {
                // One bad record must not hold the whole journal up.
                Err(e) if is_bad_record(e) => {
                    let _ = self.bad_record(e.to_string());
                    Replayed::Refused(format!("corrupt record in redis: {e}"))
                }
                // Not applied, and (the chain) nothing after it either.
                Err(e) if is_transient(e) => Replayed::Failed(e.to_string()),
                Err(e) => Replayed::Rejected(e.to_string()),
                Ok(v) if scripts::chain_broken(v) => {
                    Replayed::Failed("an earlier entry of the batch was not applied".into())
                }
                Ok(v) => self.outcome(op, v).await,
            };
            out.push(outcome);
        }
        Ok(out)
    }

    /// What one script reply means for the replay of `op`.
    async fn outcome(&self, op: &Op, reply: &Value) -> Replayed {
        let corrupt = || {
            let _ = self.bad_record(format!(
                "journal entry for session {}",
                op.id().map(|id| format_id(&id)).unwrap_or_default()
            ));
            Replayed::Refused("corrupt record in redis".into())
        };
        let unexpected = || Replayed::Rejected(format!("unexpected reply {reply:?}"));
        match op {
            // Deletes apply whatever Redis holds.
            Op::Delete { .. } => Replayed::Applied,
            // A log-out-everywhere runs in chunks: the entry stays until the
            // last one.
            Op::DeleteUser { .. } => match super::ops::delete_user_reply(reply) {
                Ok((true, _)) => Replayed::Partial,
                Ok((false, _)) => Replayed::Applied,
                Err(_) => unexpected(),
            },
            Op::Create(_) => match CreateReply::decode(reply) {
                Some(CreateReply::Created | CreateReply::Exists | CreateReply::Raised) => {
                    Replayed::Applied
                }
                Some(CreateReply::Deleted) => Replayed::Tombstoned,
                None => unexpected(),
            },
            Op::Touch { .. } | Op::Touches { .. } => match TouchReply::decode(reply) {
                Some(TouchReply::Counted(_)) => Replayed::Applied,
                Some(TouchReply::AlreadyApplied) => {
                    self.refused_duplicate("replayed touch");
                    Replayed::Applied
                }
                Some(TouchReply::Deleted) => Replayed::Tombstoned,
                Some(TouchReply::Gone) => Replayed::Missing,
                Some(TouchReply::Corrupt) => corrupt(),
                None => unexpected(),
            },
            Op::Patch { .. } | Op::PatchAt { .. } => match PatchReply::decode(reply) {
                Some(PatchReply::Applied(_)) => Replayed::Applied,
                Some(PatchReply::AlreadyApplied) => {
                    self.refused_duplicate("replayed patch");
                    Replayed::Applied
                }
                Some(PatchReply::Deleted) => Replayed::Tombstoned,
                Some(PatchReply::Gone) => Replayed::Missing,
                Some(PatchReply::Corrupt) => corrupt(),
                Some(PatchReply::TooLarge(_)) => {
                    Replayed::Refused("merged metadata would exceed the limit".into())
                }
                // A replayed patch carries no If-Match.
                Some(PatchReply::VersionMismatch(_)) | None => unexpected(),
            },
            Op::Rotate { new, .. } => match RotateReply::decode(reply) {
                Some(RotateReply::Moved(_) | RotateReply::AlreadyMoved) => Replayed::Applied,
                Some(RotateReply::Gone) => Replayed::Missing,
                Some(RotateReply::Corrupt) => corrupt(),
                // Revoked elsewhere: the rotated id must not live on.
                Some(RotateReply::Deleted) => match self.delete(new).await {
                    Ok(_) => Replayed::Tombstoned,
                    Err(e) => Replayed::Failed(e.to_string()),
                },
                None => unexpected(),
            },
        }
    }
}
