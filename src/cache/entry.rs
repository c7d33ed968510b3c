//! A cache value as stored, and how it is written in Redis and on the disk
//! tier (one encoding for both).

use bytes::Bytes;

/// One value as stored.
#[derive(Debug)]
pub struct Entry {
    pub content_type: Box<str>,
    /// Hash of the content type and body: the `ETag`.
    pub etag: u64,
    /// Unix ms of the PUT (for `Age`).
    pub stored_at: u64,
    /// Unix ms after which the value is gone.
    pub expires_at: u64,
    pub body: Bytes,
}

/// How an entry is written in Redis and on disk: version 1, stored-at,
/// expires-at and etag (big-endian u64s), the content type's length (u16)
/// and bytes, then the body.
pub fn encode(e: &Entry, out: &mut Vec<u8>) {
    out.push(1);
    for n in [e.stored_at, e.expires_at, e.etag] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out.extend_from_slice(&(e.content_type.len() as u16).to_be_bytes());
    out.extend_from_slice(e.content_type.as_bytes());
    out.extend_from_slice(&e.body);
}

/// The inverse of [`encode`]; `None` for anything it did not write.
pub fn decode(b: Bytes) -> Option<Entry> {
    let n = |at: usize| Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?));
    if b.first() != Some(&1) {
        return None;
    }
    let ct_len = usize::from(u16::from_be_bytes(b.get(25..27)?.try_into().ok()?));
    let content_type = std::str::from_utf8(b.get(27..27 + ct_len)?).ok()?.into();
    Some(Entry {
        stored_at: n(1)?,
        expires_at: n(9)?,
        etag: n(17)?,
        content_type,
        body: b.slice(27 + ct_len..),
    })
}

pub(super) fn etag_of(content_type: &str, body: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    h.write(content_type.as_bytes());
    h.write_u8(0);
    h.write(body);
    h.finish()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_junk_does_not_decode() {
        let e = Entry {
            content_type: "image/png".into(),
            etag: 42,
            stored_at: 1,
            expires_at: 2,
            body: Bytes::from_static(b"\x00\x01binary\x00"),
        };
        let mut out = Vec::new();
        encode(&e, &mut out);
        let d = decode(Bytes::from(out.clone())).unwrap();
        assert_eq!(
            (
                &*d.content_type,
                d.etag,
                d.stored_at,
                d.expires_at,
                &d.body[..]
            ),
            ("image/png", 42, 1, 2, &b"\x00\x01binary\x00"[..])
        );
        assert!(decode(Bytes::from(out[..20].to_vec())).is_none());
        assert!(decode(Bytes::from_static(b"\x02junk")).is_none());
    }
}
