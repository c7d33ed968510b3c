//! The session model: the record every store keeps, its JSON view, the rules a
//! client's input must follow, and the versioned envelope records wear at rest.
//!
//! Times are unix milliseconds internally (cheap to compare and to store) and
//! RFC 3339 strings with milliseconds only at the HTTP edge. Metadata is kept as
//! the JSON text of an object: a touch, the hot path, never parses it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// The user of a session nobody logged into. Such sessions are not indexed
/// per user (nobody lists or logs out "anonymous").
pub const ANONYMOUS: &str = "anonymous";

/// Longest accepted `user_id`, in bytes.
pub const MAX_USER_ID_LEN: usize = 128;

/// A session as every store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Raw UUID bytes (postcard stores them as 16 bytes, not a string).
    pub id: [u8; 16],
    pub user_id: String,
    pub created_at: u64,
    pub last_accessed: u64,
    pub expires_at: u64,
    pub request_count: u64,
    pub version: u64,
    /// JSON text of an object; always valid and within the metadata limit.
    pub metadata: String,
    /// When the session became `user_id`'s by a login (a PATCH of
    /// `user_id`); 0 when it was created as that user. A log-out-everywhere
    /// takes the sessions a user had *before* it: created or logged into
    /// earlier. Not in the API's JSON.
    pub login_at: u64,
}

/// The record as 0.1.0 wrote it (envelope `V1`), before `login_at`.
#[derive(Deserialize)]
struct SessionV1 {
    id: [u8; 16],
    user_id: String,
    created_at: u64,
    last_accessed: u64,
    expires_at: u64,
    request_count: u64,
    version: u64,
    metadata: String,
}

impl From<SessionV1> for Session {
    fn from(s: SessionV1) -> Session {
        Session {
            id: s.id,
            user_id: s.user_id,
            created_at: s.created_at,
            last_accessed: s.last_accessed,
            expires_at: s.expires_at,
            request_count: s.request_count,
            version: s.version,
            metadata: s.metadata,
            login_at: 0,
        }
    }
}

/// Expiry and size rules shared by every store.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub ttl_ms: u64,
    pub max_lifetime_ms: u64,
    pub max_metadata_bytes: usize,
}

impl Limits {
    /// How far Redis's copy of the sliding expiry may lag a touch: a
    /// thousandth of the idle TTL, at least a second (86 s of 24 h). Moving
    /// the expiry rewrites the record's `e`, its key's TTL and the active
    /// index; in steps, a session used every few seconds pays that once in
    /// a while, not on every use, and expires at most this much early.
    pub fn slide_step_ms(&self) -> u64 {
        (self.ttl_ms / 1000).max(1000)
    }
}

impl Session {
    /// A fresh session with a new random id (UUID v4 from the OS CSPRNG).
    pub fn new(user_id: String, metadata: String, now: u64, limits: &Limits) -> Session {
        let mut s = Session {
            id: *Uuid::new_v4().as_bytes(),
            user_id,
            created_at: now,
            last_accessed: now,
            expires_at: 0,
            request_count: 0,
            version: 1,
            metadata,
            login_at: 0,
        };
        s.expires_at = s.expiry_after_touch(now, limits);
        s
    }

    /// Sliding idle expiry, capped by the absolute lifetime.
    pub fn expiry_after_touch(&self, now: u64, limits: &Limits) -> u64 {
        now.saturating_add(limits.ttl_ms)
            .min(self.created_at.saturating_add(limits.max_lifetime_ms))
    }

    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at <= now
    }

    /// Records one request that used the session: counts it and slides the expiry.
    pub fn touch(&mut self, now: u64, limits: &Limits) {
        self.request_count = self.request_count.saturating_add(1);
        self.last_accessed = self.last_accessed.max(now);
        self.expires_at = self.expires_at.max(self.expiry_after_touch(now, limits));
    }

    /// Applies a PATCH: a new user, and a shallow merge of metadata where a
    /// `null` value deletes the key. Bumps the version.
    /// A new `user_id` (a login at `now`) is recorded in `login_at`.
    pub fn apply_patch(
        &mut self,
        patch: &Patch,
        now: u64,
        limits: &Limits,
    ) -> Result<(), InputError> {
        if let Some(meta) = &patch.metadata {
            let mut current: Map<String, Value> =
                serde_json::from_str(&self.metadata).unwrap_or_default();
            for (k, v) in meta {
                if v.is_null() {
                    current.remove(k);
                } else {
                    current.insert(k.clone(), v.clone());
                }
            }
            self.metadata = encode_metadata(&current, limits)?;
        }
        if let Some(user) = &patch.user_id {
            if *user != self.user_id {
                self.login_at = now;
            }
            self.user_id = user.clone();
        }
        self.version += 1;
        Ok(())
    }

    /// The API's JSON form, written by hand so the metadata text is spliced in
    /// without being parsed again.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.metadata.len() + self.user_id.len());
        out.extend_from_slice(b"{\"session_id\":\"");
        let mut buf = Uuid::encode_buffer();
        out.extend_from_slice(id_text(&self.id, &mut buf).as_bytes());
        out.extend_from_slice(b"\",\"user_id\":");
        // Serializing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &self.user_id);
        for (name, ms) in [
            ("created_at", self.created_at),
            ("last_accessed", self.last_accessed),
            ("expires_at", self.expires_at),
        ] {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":\"");
            // Written in place, no string for each (writing to a Vec cannot
            // fail): a response allocates its buffer and nothing else.
            let _ = write!(out, "{}", rfc3339_timestamp(ms));
            out.push(b'"');
        }
        let _ = write!(
            out,
            ",\"request_count\":{},\"version\":{}",
            self.request_count, self.version
        );
        out.extend_from_slice(b",\"metadata\":");
        out.extend_from_slice(self.metadata.as_bytes());
        out.push(b'}');
        out
    }
}

/// A PATCH request, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    pub user_id: Option<String>,
    /// Keys to set; `Value::Null` deletes. Kept as JSON text at rest (postcard
    /// cannot carry `serde_json::Value`).
    #[serde(with = "json_map_text")]
    pub metadata: Option<Map<String, Value>>,
}

mod json_map_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::{Map, Value};

    pub fn serialize<S: Serializer>(
        v: &Option<Map<String, Value>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let text = v.as_ref().map(|m| Value::Object(m.clone()).to_string());
        text.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Map<String, Value>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        match text {
            None => Ok(None),
            Some(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Why client input was refused; the HTTP layer maps each to its status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("{0}")]
    Invalid(String),
    #[error("metadata is {size} bytes encoded; the limit is {limit}")]
    MetadataTooLarge { size: usize, limit: usize },
}

/// `user_id`: 1–128 bytes of `A-Z a-z 0-9 . _ - @ : +`, so it is safe in a URL
/// path, a Redis key and a log line.
pub fn validate_user_id(user: &str) -> Result<(), InputError> {
    let ok_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | ':' | '+');
    if user.is_empty() || user.len() > MAX_USER_ID_LEN || !user.chars().all(ok_char) {
        return Err(InputError::Invalid(format!(
            "user_id must be 1-{MAX_USER_ID_LEN} characters of A-Z a-z 0-9 . _ - @ : +"
        )));
    }
    Ok(())
}

/// Encodes metadata, refusing it when the encoded form exceeds the limit.
pub fn encode_metadata(meta: &Map<String, Value>, limits: &Limits) -> Result<String, InputError> {
    let text = serde_json::to_string(meta).map_err(|e| InputError::Invalid(e.to_string()))?;
    if text.len() > limits.max_metadata_bytes {
        return Err(InputError::MetadataTooLarge {
            size: text.len(),
            limit: limits.max_metadata_bytes,
        });
    }
    Ok(text)
}

/// Parses a session id as the API accepts it: a hyphenated UUID.
pub fn parse_session_id(text: &str) -> Option<[u8; 16]> {
    if text.len() != 36 {
        return None;
    }
    Uuid::try_parse(text).ok().map(|u| *u.as_bytes())
}

/// A session id as text, written into `buf` (no allocation): for the
/// paths that run on every use.
pub fn id_text<'b>(id: &[u8; 16], buf: &'b mut [u8; 45]) -> &'b str {
    Uuid::from_bytes(*id).hyphenated().encode_lower(buf)
}

pub fn format_id(id: &[u8; 16]) -> String {
    Uuid::from_bytes(*id).hyphenated().to_string()
}

/// Milliseconds since the unix epoch, from the wall clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2026-11-26T21:24:45.123Z`
pub fn rfc3339_millis(ms: u64) -> String {
    rfc3339_timestamp(ms).to_string()
}

fn rfc3339_timestamp(ms: u64) -> humantime::Rfc3339Timestamp {
    // RFC 3339 has four-digit years; the formatter panics beyond them.
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms.min(MAX_TIME_MS)))
}

/// 9999-12-31T23:59:59.999Z: the last instant RFC 3339 can write. A stored
/// record with a time beyond it was not written by a node (the configured
/// lifetimes are bounded far below it): it is corrupt.
pub const MAX_TIME_MS: u64 = 253_402_300_799_999;

/// The at-rest form. Variants are only ever appended: a later release still
/// decodes what an earlier one wrote.
#[derive(Deserialize)]
enum Envelope {
    V1(SessionV1),
    /// Since 0.2: with `login_at`.
    V2(Session),
}

/// Borrowing twin of [`Envelope`] so encoding does not clone; postcard encodes
/// both identically (variant index, then the fields). The variant written
/// is always the newest.
#[derive(Serialize)]
enum EnvelopeRef<'a> {
    #[allow(dead_code)]
    V1(()),
    V2(&'a Session),
}

/// A record at rest that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("undecodable session record: {0}")]
    Format(#[from] postcard::Error),
    #[error("session record with a time beyond the year 9999")]
    TimeOutOfRange,
}

impl Session {
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain structs into a Vec cannot fail.
        postcard::to_allocvec(&EnvelopeRef::V2(self)).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Session, DecodeError> {
        let s = match postcard::from_bytes::<Envelope>(bytes)? {
            Envelope::V1(old) => Session::from(old),
            Envelope::V2(s) => s,
        };
        if s.times_in_range() {
            Ok(s)
        } else {
            Err(DecodeError::TimeOutOfRange)
        }
    }

    /// Whether every time of the record can be written as RFC 3339.
    pub fn times_in_range(&self) -> bool {
        self.created_at
            .max(self.last_accessed)
            .max(self.expires_at)
            .max(self.login_at)
            <= MAX_TIME_MS
    }

    /// When the session became its user's: created as it, or logged in.
    pub fn born(&self) -> u64 {
        self.created_at.max(self.login_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        ttl_ms: 1_000,
        max_lifetime_ms: 5_000,
        max_metadata_bytes: 64,
    };

    #[test]
    fn envelope_round_trips_and_rejects_garbage() {
        let s = Session::new("alice".into(), "{\"a\":1}".into(), 10, &LIMITS);
        assert_eq!(Session::decode(&s.encode()).unwrap(), s);
        assert!(Session::decode(&[0xff, 0xff, 0x01]).is_err());
        assert!(Session::decode(&[]).is_err());
        // A record as 0.1.0 wrote it: envelope V1, no login_at.
        let mut v1 = vec![0u8];
        v1.extend_from_slice(&[9; 16]);
        v1.extend_from_slice(&[1, b'u', 1, 2, 3, 4, 5]);
        v1.extend_from_slice(&[2, b'{', b'}']);
        let old = Session::decode(&v1).unwrap();
        assert_eq!(
            (old.user_id.as_str(), old.version, old.login_at),
            ("u", 5, 0)
        );
    }

    #[test]
    fn expiry_slides_but_never_past_the_lifetime() {
        let mut s = Session::new("anonymous".into(), "{}".into(), 0, &LIMITS);
        assert_eq!(s.expires_at, 1_000);
        s.touch(900, &LIMITS);
        assert_eq!((s.expires_at, s.request_count), (1_900, 1));
        s.touch(4_500, &LIMITS);
        assert_eq!(s.expires_at, 5_000);
    }

    #[test]
    fn patch_merges_deletes_and_enforces_the_limit() {
        let mut s = Session::new("u".into(), r#"{"a":1,"b":2}"#.into(), 0, &LIMITS);
        let patch: Map<String, Value> = serde_json::from_str(r#"{"a":null,"c":[]}"#).unwrap();
        s.apply_patch(
            &Patch {
                user_id: Some("v".into()),
                metadata: Some(patch),
            },
            7,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(
            (s.metadata.as_str(), s.user_id.as_str(), s.version),
            (r#"{"b":2,"c":[]}"#, "v", 2)
        );
        assert_eq!((s.login_at, s.born()), (7, 7), "a login is recorded");
        let big: Map<String, Value> =
            serde_json::from_str(&format!(r#"{{"x":"{}"}}"#, "y".repeat(100))).unwrap();
        let before = s.clone();
        assert!(matches!(
            s.apply_patch(
                &Patch {
                    user_id: None,
                    metadata: Some(big)
                },
                8,
                &LIMITS
            ),
            Err(InputError::MetadataTooLarge { .. })
        ));
        assert_eq!(s.metadata, before.metadata);
    }

    #[test]
    fn json_view_has_the_documented_fields() {
        let s = Session::new("a\"b".into(), "{}".into(), 1_700_000_000_123, &LIMITS);
        let v: Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(v["user_id"], "a\"b");
        assert_eq!(v["created_at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["request_count"], 0);
        assert_eq!(v["version"], 1);
        assert!(v["metadata"].is_object());
        assert_eq!(
            parse_session_id(v["session_id"].as_str().unwrap()),
            Some(s.id)
        );
    }

    #[test]
    fn user_ids_are_restricted() {
        assert!(validate_user_id("alice@example.com").is_ok());
        for bad in ["", "../etc", "a b", "ü", &"x".repeat(129)] {
            assert!(validate_user_id(bad).is_err(), "{bad:?}");
        }
    }
}
