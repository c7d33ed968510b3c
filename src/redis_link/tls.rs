//! TLS to Redis: `rediss://` and `rediss+sentinel://` targets.
//!
//! rustls with the ring provider, TLS 1.3 only (Redis 6+ built with OpenSSL
//! 1.1.1+ speaks it; leaving out TLS 1.2 keeps the aarch64 release inside its
//! 4 MB budget, see Cargo.toml). The server's certificate is always verified,
//! against `redis_ca_file` or, unset, the system's CA bundle (found as
//! OpenSSL would: `SSL_CERT_FILE`, `/etc/ssl/certs`...; read from files, so
//! the static musl release finds it too). There is no switch to turn
//! verification off: redis-rs's `#insecure` URL fragment is refused at start.
//!
//! The files are read once, at start: a bad path or a file that is not PEM
//! stops the node there instead of at its first connection.

use crate::config::RedisTls;
use redis::{ClientTlsConfig, ConnectionAddr, TlsCertificates};

/// The certificates to give redis-rs, or None for the system's CA bundle
/// and no client certificate.
pub(super) fn certificates(tls: &RedisTls) -> Result<Option<TlsCertificates>, String> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{key} {}: {e}", path.display()))
    };
    let root_cert = match &tls.ca_file {
        Some(p) => Some(read("redis_ca_file", p)?),
        None => None,
    };
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read("redis_cert_file", cert)?,
            client_key: read("redis_key_file", key)?,
        }),
        (None, None) => None,
        _ => return Err("redis_cert_file and redis_key_file go together".into()),
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// Refuses an address that would skip certificate verification (redis-rs
/// reads `rediss://host/#insecure` as "trust any certificate").
pub(super) fn check_secure(addr: &ConnectionAddr, setting: &str) -> Result<(), String> {
    match addr {
        ConnectionAddr::TcpTls { insecure: true, .. } => Err(format!(
            "{setting}: #insecure is not supported: Redis's certificate is always verified (give its CA in redis_ca_file)"
        )),
        _ => Ok(()),
    }
}

/// Whether a connection error is TLS refusing the peer (a certificate that
/// redis_ca_file does not vouch for, a name it is not for, a client
/// certificate Redis refuses, a server that does not speak TLS 1.3 or TLS
/// at all): like a wrong password, it will not pass by itself, so it is a
/// configuration error, not an outage.
pub(super) fn is_refusal(text: &str) -> bool {
    const REFUSALS: [&str; 5] = [
        "invalid peer certificate",
        "received fatal alert",
        "peer is incompatible",
        "peer misbehaved",
        "received corrupt message",
    ];
    REFUSALS.iter().any(|r| text.contains(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_files_means_system_roots_and_unreadable_files_are_named() {
        assert!(certificates(&RedisTls::default()).unwrap().is_none());
        let missing = RedisTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..RedisTls::default()
        };
        let e = certificates(&missing).err().unwrap();
        assert!(e.starts_with("redis_ca_file /nonexistent/ca.pem"), "{e}");
        let half = RedisTls {
            cert_file: Some("/x".into()),
            ..RedisTls::default()
        };
        assert!(certificates(&half).is_err());
    }

    #[test]
    fn certificate_refusals_are_told_from_outages() {
        assert!(is_refusal(
            "invalid peer certificate: UnknownIssuer- IoError"
        ));
        assert!(is_refusal("received fatal alert: CertificateRequired"));
        assert!(!is_refusal("Connection refused (os error 111)"));
    }
}
