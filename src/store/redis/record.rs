//! A session hash as Redis returns it, and back: the field layout is in the
//! module doc of `store::redis`.

use super::{RedisStore, Result};
use crate::session::{format_id, Session};
use crate::store::StoreError;
use redis::Value;
use std::borrow::Cow;

impl RedisStore {
    /// Builds a session from a HGETALL reply. A record missing one of the
    /// fields every node writes, or with one that is not a number, is a bad
    /// record (counted), never a session with made-up values.
    pub(super) fn session_from(&self, id: &[u8; 16], fields: &[Value]) -> Result<Session> {
        // The six fields every node writes; each must be present (and the
        // five numbers numeric) for the record to be a session.
        let mut user: Option<String> = None;
        let mut login_at = 0u64;
        let mut numbers: [Option<u64>; 5] = [None; 5];
        const NUMBERS: [&str; 5] = ["c", "a", "e", "n", "v"];
        // Borrowed from the reply: a read allocates only the user id and
        // the metadata's text (a copy of each field and value was ~40
        // allocations a read, on the path of every uncached use).
        let mut meta: Vec<(&str, Cow<'_, str>)> = Vec::new();
        let mut bad: Option<String> = None;
        for pair in fields.chunks(2) {
            // Field names are strings (an integer one would name nothing here).
            let (Some(k), Some(v)) = (
                pair.first().and_then(as_borrowed_text),
                pair.get(1).and_then(as_text),
            ) else {
                continue;
            };
            if k == "u" {
                user = Some(v.into_owned());
            } else if k == "l" {
                match v.parse::<u64>() {
                    Ok(n) => login_at = n,
                    Err(_) => bad = Some("field l is not a number".into()),
                }
            } else if let Some(i) = NUMBERS.iter().position(|n| *n == k) {
                match v.parse::<u64>() {
                    Ok(n) => numbers[i] = Some(n),
                    Err(_) => bad = Some(format!("field {k} is not a number")),
                }
            } else if let Some(key) = k.strip_prefix("m:") {
                meta.push((key, v));
            }
        }
        if let Some(why) = bad {
            return Err(self.bad_record(format!("session {}: {why}", format_id(id))));
        }
        let (Some(user_id), [Some(c), Some(a), Some(e), Some(n), Some(v)]) = (user, numbers) else {
            return Err(self.bad_record(format!("session {}: fields missing", format_id(id))));
        };
        if c.max(a).max(e).max(login_at) > crate::session::MAX_TIME_MS {
            return Err(self.bad_record(format!(
                "session {}: a time beyond the year 9999",
                format_id(id)
            )));
        }
        let mut s = Session {
            id: *id,
            user_id,
            created_at: c,
            last_accessed: a,
            expires_at: e,
            request_count: n,
            version: v,
            metadata: String::new(),
            login_at,
        };
        meta.sort();
        let mut text = String::with_capacity(
            2 + meta
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>(),
        );
        text.push('{');
        for (i, (k, v)) in meta.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(k);
            text.push(':');
            text.push_str(v);
        }
        text.push('}');
        if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_err() {
            return Err(self.bad_record(format!(
                "session {} has undecodable metadata",
                format_id(id)
            )));
        }
        s.metadata = text;
        Ok(s)
    }
}

/// The hash field of a metadata key: `m:` + the key as a JSON string.
pub(super) fn field_name(key: &str) -> String {
    format!("m:{}", serde_json::Value::String(key.to_string()))
}

/// Metadata as hash field/value pairs.
pub(super) fn metadata_fields(text: &str) -> Vec<(String, String)> {
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| (field_name(k), v.to_string()))
        .collect()
}

pub(super) fn as_array(v: &Value) -> Result<&[Value]> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(unexpected(other)),
    }
}

pub(super) fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

pub(super) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => as_string(other).and_then(|s| s.parse().ok()),
    }
}

/// A reply's text, borrowed where Redis sent a string.
fn as_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::Int(n) => Some(Cow::Owned(n.to_string())),
        other => as_borrowed_text(other).map(Cow::Borrowed),
    }
}

fn as_borrowed_text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

pub(super) fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(super) fn unexpected(v: &Value) -> StoreError {
    StoreError::Redis(format!("unexpected reply from redis: {v:?}"))
}
