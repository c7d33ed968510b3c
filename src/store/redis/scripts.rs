//! The Lua scripts (one `.lua` file each, beside this module) and what
//! their answers mean.
//!
//! Every script is wrapped the same way ([`source`]): `prelude.lua` first (the
//! `index` helper that rebuilds a derived index key overwritten by another
//! tool), the script's body as a function, then `epilogue.lua` (the replay
//! chain: a replayed entry runs only if the one before it in its batch ran).
//!
//! Each script answers with small integer codes. They are decoded here, once,
//! into a typed reply per script, which the request path and the replay both
//! use: nobody else reads a bare `-2`.

use super::record::{as_array, as_int, as_u64};
use redis::{Script, Value};

const PRELUDE: &str = include_str!("prelude.lua");
const EPILOGUE: &str = include_str!("epilogue.lua");
const CREATE: &str = include_str!("create.lua");
const TOUCH_ONE: &str = include_str!("touch_one.lua");
const TOUCH: &str = include_str!("touch.lua");
const TOUCH_MANY: &str = include_str!("touch_many.lua");
const PATCH: &str = include_str!("patch.lua");
const DELETE: &str = include_str!("delete.lua");
const ROTATE: &str = include_str!("rotate.lua");
const LIST_USER: &str = include_str!("list_user.lua");
const DELETE_USER: &str = include_str!("delete_user.lua");

/// Every script, for loading them all ahead of a pipeline (a pipelined
/// `EVALSHA` does not load a missing script, and a Redis that restarted empty
/// has none).
/// Each a script's body, in parts (the two touch scripts share `touch_one`).
pub(super) const ALL: [&[&str]; 8] = [
    &[CREATE],
    &[TOUCH_ONE, TOUCH],
    &[TOUCH_ONE, TOUCH_MANY],
    &[PATCH],
    &[DELETE],
    &[ROTATE],
    &[LIST_USER],
    &[DELETE_USER],
];

/// A script's full source: the prelude, its body (its parts in order) as a
/// function, then the replay chain that calls it.
pub(super) fn source(body: &[&str]) -> String {
    let len: usize = body.iter().map(|p| p.len() + 1).sum();
    let mut s = String::with_capacity(PRELUDE.len() + len + EPILOGUE.len() + 40);
    s.push_str(PRELUDE);
    s.push_str("local function body()\n");
    for part in body {
        s.push_str(part);
        s.push('\n');
    }
    s.push_str("end\n");
    s.push_str(EPILOGUE);
    s
}

/// The loaded scripts, hashed once.
pub(super) struct Scripts {
    pub create: Script,
    pub touch: Script,
    pub touch_many: Script,
    pub patch: Script,
    pub delete: Script,
    pub rotate: Script,
    pub list_user: Script,
    pub delete_user: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            create: Script::new(&source(&[CREATE])),
            touch: Script::new(&source(&[TOUCH_ONE, TOUCH])),
            touch_many: Script::new(&source(&[TOUCH_ONE, TOUCH_MANY])),
            patch: Script::new(&source(&[PATCH])),
            delete: Script::new(&source(&[DELETE])),
            rotate: Script::new(&source(&[ROTATE])),
            list_user: Script::new(&source(&[LIST_USER])),
            delete_user: Script::new(&source(&[DELETE_USER])),
        }
    }
}

/// The answer of a replayed entry whose predecessor in the batch did not
/// run (see `epilogue.lua`): it did not run either.
const CHAIN_BROKEN: i64 = -9;

/// Whether a reply is the chain's "an earlier entry of the batch did not run".
pub(super) fn chain_broken(v: &Value) -> bool {
    matches!(v, Value::Int(CHAIN_BROKEN))
}

/// The first element of an array reply, or the reply itself if it is a
/// number.
fn code(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::Array(items) => items.first().and_then(as_int),
        _ => None,
    }
}

/// `create.lua`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CreateReply {
    Created,
    /// Replay: the session is already there.
    Exists,
    /// Replay: it was deleted, or its user logged out everywhere after its
    /// creation.
    Deleted,
    /// Re-seed: the session existed (another node re-seeded it) and this
    /// copy replaced its data (a higher version) or raised its counters.
    Raised,
}

impl CreateReply {
    pub fn decode(v: &Value) -> Option<CreateReply> {
        match code(v)? {
            1 => Some(CreateReply::Created),
            0 => Some(CreateReply::Exists),
            -1 => Some(CreateReply::Deleted),
            2 => Some(CreateReply::Raised),
            _ => None,
        }
    }
}

/// `touch.lua`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum TouchReply {
    /// Counted: the new request count.
    Counted(u64),
    /// No such session (or it just expired).
    Gone,
    /// Replay: deleted meanwhile (a tombstone).
    Deleted,
    /// The record's counters are not numbers: not a record a node wrote.
    Corrupt,
    /// Replay: this operation id was applied already.
    AlreadyApplied,
}

impl TouchReply {
    pub fn decode(v: &Value) -> Option<TouchReply> {
        Some(match code(v)? {
            n if n > 0 => TouchReply::Counted(n as u64),
            0 => TouchReply::Gone,
            -1 => TouchReply::Deleted,
            -2 => TouchReply::Corrupt,
            -3 => TouchReply::AlreadyApplied,
            _ => return None,
        })
    }
}

/// `patch.lua`; the record fields of `Applied` are decoded by the caller.
#[derive(Debug)]
pub(super) enum PatchReply<'a> {
    Applied(&'a [Value]),
    Gone,
    Deleted,
    Corrupt,
    /// `If-Match` named another version: the current one.
    VersionMismatch(u64),
    /// The merged metadata would be this many bytes, over the limit.
    TooLarge(u64),
    AlreadyApplied,
}

impl PatchReply<'_> {
    pub fn decode(v: &Value) -> Option<PatchReply<'_>> {
        let items = as_array(v).ok();
        let second = || items.and_then(|i| i.get(1));
        Some(match code(v)? {
            1 => PatchReply::Applied(second().and_then(|f| as_array(f).ok())?),
            0 => PatchReply::Gone,
            -1 => PatchReply::Deleted,
            -2 => PatchReply::Corrupt,
            2 => PatchReply::VersionMismatch(second().and_then(as_u64).unwrap_or(0)),
            3 => PatchReply::TooLarge(second().and_then(as_u64).unwrap_or(0)),
            4 => PatchReply::AlreadyApplied,
            _ => return None,
        })
    }
}

/// `rotate.lua`.
#[derive(Debug)]
pub(super) enum RotateReply<'a> {
    /// Moved: the record under its new id.
    Moved(&'a [Value]),
    Gone,
    /// Replay: the new id exists already (this rotation ran before).
    AlreadyMoved,
    /// Replay: the old id was deleted meanwhile.
    Deleted,
    Corrupt,
}

impl RotateReply<'_> {
    pub fn decode(v: &Value) -> Option<RotateReply<'_>> {
        let items = as_array(v).ok();
        Some(match code(v)? {
            1 => RotateReply::Moved(
                items
                    .and_then(|i| i.get(1))
                    .and_then(|f| as_array(f).ok())?,
            ),
            0 => RotateReply::Gone,
            2 => RotateReply::AlreadyMoved,
            -1 => RotateReply::Deleted,
            -2 => RotateReply::Corrupt,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_compiles_into_one_chunk_with_prelude_and_epilogue() {
        for body in ALL {
            let s = source(body);
            assert!(s.starts_with(PRELUDE));
            assert!(s.ends_with(EPILOGUE));
            assert!(s.contains("local function body()"));
        }
    }

    #[test]
    fn replies_decode_by_script() {
        assert_eq!(
            TouchReply::decode(&Value::Int(7)),
            Some(TouchReply::Counted(7))
        );
        assert_eq!(
            TouchReply::decode(&Value::Int(-3)),
            Some(TouchReply::AlreadyApplied)
        );
        assert_eq!(TouchReply::decode(&Value::Int(-9)), None);
        assert!(chain_broken(&Value::Int(-9)));
        assert_eq!(
            CreateReply::decode(&Value::Int(-1)),
            Some(CreateReply::Deleted)
        );
        let mismatch = Value::Array(vec![Value::Int(2), Value::BulkString(b"5".to_vec())]);
        assert!(matches!(
            PatchReply::decode(&mismatch),
            Some(PatchReply::VersionMismatch(5))
        ));
        let moved = Value::Array(vec![Value::Int(1), Value::Array(vec![])]);
        assert!(matches!(
            RotateReply::decode(&moved),
            Some(RotateReply::Moved(_))
        ));
        assert!(matches!(
            RotateReply::decode(&Value::Array(vec![Value::Int(2)])),
            Some(RotateReply::AlreadyMoved)
        ));
    }
}
