//! The fallback journal: every operation acknowledged while Redis was away, in
//! order, replayed into Redis when it returns.
//!
//! Operations, not records, are journaled: replaying "add one to the counter"
//! or "set key k" merges with what other nodes did meanwhile, where copying a
//! whole record would overwrite it. Entries live in a sled tree keyed by a
//! big-endian sequence number and are written under the same lock and flush as
//! the mirror change they describe, so the two never disagree after a crash.
//!
//! The sequence number, with the node's [`origin`](super::SledStore::origin),
//! is the operation's id: Redis keeps, per session, the highest id of each
//! node it has applied (a hash field written atomically with the change), so a
//! replay that is interrupted and repeated, or a live request whose answer
//! was lost to a timeout and is then journaled under the same id, is never
//! applied twice.
//!
//! Touches are not journaled one entry per request: fallback touches are
//! counted in memory and written as one [`Op::Touches`] per session per
//! flush interval (and before any other entry of that session, so the order
//! per session holds).

use crate::session::{Patch, Session};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A session created in fallback, as it was created.
    Create(Session),
    /// A PATCH: metadata merge and/or user change.
    Patch {
        id: [u8; 16],
        patch: Patch,
    },
    /// One request that used the session.
    Touch {
        id: [u8; 16],
        at: u64,
    },
    /// The session moved to a new id; the old one is gone.
    Rotate {
        old: [u8; 16],
        new: [u8; 16],
    },
    Delete {
        id: [u8; 16],
    },
    /// `count` requests that used the session, the last at `at` (coalesced).
    Touches {
        id: [u8; 16],
        count: u64,
        at: u64,
    },
    /// Log-out-everywhere: every session of `user` created at or before
    /// `before` is deleted (sessions created later, by a new login, are not).
    DeleteUser {
        user: String,
        before: u64,
    },
    /// A PATCH made at `at` (a change of `user_id` is a login at that time).
    PatchAt {
        id: [u8; 16],
        patch: Patch,
        at: u64,
    },
}

impl Op {
    /// The session whose Redis state this operation depends on (the old id
    /// of a rotation); `None` for an operation on a whole user.
    pub fn id(&self) -> Option<[u8; 16]> {
        match self {
            Op::Create(s) => Some(s.id),
            Op::Patch { id, .. }
            | Op::PatchAt { id, .. }
            | Op::Touch { id, .. }
            | Op::Touches { id, .. }
            | Op::Delete { id } => Some(*id),
            Op::Rotate { old, .. } => Some(*old),
            Op::DeleteUser { .. } => None,
        }
    }

    /// Every session id the operation names (both ids of a rotation).
    pub fn ids(&self) -> [Option<[u8; 16]>; 2] {
        match self {
            Op::Rotate { old, new } => [Some(*old), Some(*new)],
            other => [other.id(), None],
        }
    }
}

/// Versioned like session records: variants are only ever appended.
#[derive(Serialize, Deserialize)]
enum Envelope {
    V1(Op),
}

#[derive(Serialize)]
enum EnvelopeRef<'a> {
    V1(&'a Op),
}

pub fn encode(op: &Op) -> Vec<u8> {
    postcard::to_allocvec(&EnvelopeRef::V1(op)).unwrap_or_default()
}

pub fn decode(bytes: &[u8]) -> Result<Op, postcard::Error> {
    match postcard::from_bytes::<Envelope>(bytes)? {
        Envelope::V1(op) => Ok(op),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Limits;

    #[test]
    fn ops_round_trip() {
        let limits = Limits {
            ttl_ms: 10,
            max_lifetime_ms: 20,
            max_metadata_bytes: 100,
        };
        let s = Session::new("u".into(), "{}".into(), 1, &limits);
        let meta = serde_json::from_str(r#"{"k":null,"j":[1]}"#).unwrap();
        for op in [
            Op::Create(s.clone()),
            Op::Patch {
                id: s.id,
                patch: Patch {
                    user_id: Some("v".into()),
                    metadata: Some(meta),
                },
            },
            Op::Touch { id: s.id, at: 5 },
            Op::Rotate {
                old: s.id,
                new: [7; 16],
            },
            Op::Delete { id: s.id },
            Op::Touches {
                id: s.id,
                count: 7,
                at: 9,
            },
            Op::DeleteUser {
                user: "u".into(),
                before: 11,
            },
            Op::PatchAt {
                id: s.id,
                patch: Patch {
                    user_id: Some("w".into()),
                    metadata: None,
                },
                at: 12,
            },
        ] {
            assert_eq!(decode(&encode(&op)).unwrap(), op);
        }
        assert!(decode(b"\x09garbage").is_err());
    }

    /// Entries written by 0.1.0 (the first five variants) still decode: new
    /// variants are only ever appended.
    #[test]
    fn entries_of_the_first_release_still_decode() {
        // Envelope::V1(Op::Delete { id: [1; 16] }) as 0.1.0 wrote it.
        let mut old = vec![0u8, 4];
        old.extend_from_slice(&[1; 16]);
        assert_eq!(decode(&old).unwrap(), Op::Delete { id: [1; 16] });
    }
}
