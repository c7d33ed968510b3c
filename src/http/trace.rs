//! Following one request through the logs: its id (`X-Request-ID`) and the
//! optional access log.
//!
//! The id is the balancer's `X-Request-ID` when it is one a log can carry
//! safely (at most [`MAX_ID_LEN`] bytes of `[A-Za-z0-9._-]`, one header),
//! else a fresh one (16 hex digits from a thread-local generator: unique
//! enough to tell requests apart in one node's logs, and no syscall). A
//! client's value that is too long or carries other bytes is replaced, not
//! trimmed: a log line must never hold what an attacker chose to forge.
//! The id names a tracing span around the whole request, so every line the
//! request causes (the store's warnings included) carries it, and it is
//! echoed in the answer so a client can quote it.
//!
//! The access log writes route templates, never paths: a session id in
//! `/api/sessions/{id}` (or a cookie, or `X-Session-ID`) is a bearer
//! credential and must not reach a log file.

use crate::config::AccessLog;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use std::sync::atomic::{AtomicU32, Ordering};

/// The header a balancer sets and the node echoes.
pub static HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied id accepted as is.
pub const MAX_ID_LEN: usize = 64;

/// The request's id: the client's single well-formed `X-Request-ID`, else a
/// new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let mut given = headers.get_all(&HEADER).iter();
    match (given.next(), given.next()) {
        (Some(v), None) if acceptable(v.as_bytes()) => v.clone(),
        _ => fresh(),
    }
}

/// At most [`MAX_ID_LEN`] bytes, each a letter, a digit, `.`, `_` or `-`.
pub fn acceptable(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// 16 lower-case hex digits.
fn fresh() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u64(..);
    let mut buf = [0u8; 16];
    for b in buf.iter_mut() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
}

/// Which requests get an access-log line.
pub struct AccessLogger {
    mode: AccessLog,
    one_in: u32,
    seen: AtomicU32,
}

impl AccessLogger {
    pub fn new(mode: AccessLog, one_in: u32) -> AccessLogger {
        AccessLogger {
            mode,
            one_in: one_in.max(1),
            seen: AtomicU32::new(0),
        }
    }

    /// Whether this request is logged: all of them, one in `one_in` (by a
    /// counter, so the rate is exact and costs one atomic add), or none.
    pub fn pick(&self) -> bool {
        match self.mode {
            AccessLog::Off => false,
            AccessLog::Full => true,
            AccessLog::Sampled => self.seen.fetch_add(1, Ordering::Relaxed) % self.one_in == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_safe_single_ids_are_kept() {
        let mut h = HeaderMap::new();
        h.insert(&HEADER, HeaderValue::from_static("abc-123_x.y"));
        assert_eq!(request_id(&h), "abc-123_x.y");
        for bad in ["", "a b", "a;b", "<script>", "a%0d%0ab", "ü"] {
            assert!(!acceptable(bad.as_bytes()), "{bad:?}");
        }
        assert!(acceptable("a".repeat(64).as_bytes()));
        assert!(!acceptable("a".repeat(65).as_bytes()));
        h.append(&HEADER, HeaderValue::from_static("second"));
        let id = request_id(&h);
        assert_eq!(id.len(), 16, "two ids: replaced");
        assert!(acceptable(id.as_bytes()));
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
    }

    #[test]
    fn sampling_logs_exactly_one_in_n() {
        let l = AccessLogger::new(AccessLog::Sampled, 10);
        assert_eq!((0..100).filter(|_| l.pick()).count(), 10);
        assert!(!AccessLogger::new(AccessLog::Off, 1).pick());
        assert!(AccessLogger::new(AccessLog::Full, 1).pick());
    }
}
