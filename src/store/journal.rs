//! The fallback journal: every operation acknowledged while Redis was away, in
//! order, replayed into Redis when it returns.
//!
//! Operations, not records, are journaled: replaying "add one to the counter"
//! or "set key k" merges with what other nodes did meanwhile, where copying a
//! whole record would overwrite it. Entries live in a sled tree keyed by a
//! big-endian sequence number and are written under the same lock and flush as
//! the mirror change they describe, so the two never disagree after a crash.

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
}

impl Op {
    /// The session ids whose Redis state this operation depends on.
    pub fn id(&self) -> [u8; 16] {
        match self {
            Op::Create(s) => s.id,
            Op::Patch { id, .. } | Op::Touch { id, .. } | Op::Delete { id } => *id,
            Op::Rotate { old, .. } => *old,
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
        ] {
            assert_eq!(decode(&encode(&op)).unwrap(), op);
        }
        assert!(decode(b"\x09garbage").is_err());
    }
}
