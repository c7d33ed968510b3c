//! `redis+sentinel://` and `rediss+sentinel://` URLs: the one form both
//! `redis_url` and `cache_redis_url` take, so both find the master the same
//! way. The TLS form speaks TLS to the sentinels and to the master alike,
//! with the same CA (and client certificate): Sentinel hands out the
//! master's address as the master announces it, so its certificate must name
//! that address (an IP SAN when it is an IP).

/// The parts of a `redis+sentinel://` URL after the scheme.
#[derive(Debug, PartialEq, Eq)]
struct SentinelUrl<'a> {
    hosts: &'a str,
    master: String,
    db: i64,
    username: Option<&'a str>,
    password: Option<&'a str>,
}

impl<'a> SentinelUrl<'a> {
    /// `[[user]:password@]host:port[,host:port…]/master_name[/db]`; the
    /// credentials are the master's (an ACL user, say), not the sentinels'.
    fn parse(rest: &'a str) -> Result<SentinelUrl<'a>, String> {
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let (hosts, path) = rest
            .split_once('/')
            .ok_or("redis+sentinel URL needs /master_name")?;
        if hosts.is_empty() {
            return Err("redis+sentinel URL needs host:port".into());
        }
        let mut path = path.split('/');
        let master = path
            .next()
            .filter(|m| !m.is_empty())
            .ok_or("redis+sentinel URL needs /master_name")?
            .to_string();
        let db: i64 = path
            .next()
            .map(|d| d.parse().map_err(|_| "bad db number"))
            .transpose()?
            .unwrap_or(0);
        let (username, password) = match auth.map(|a| a.split_once(':')) {
            Some(Some((user, password))) => (Some(user), Some(password)),
            Some(None) => (None, auth),
            None => (None, None),
        };
        Ok(SentinelUrl {
            hosts,
            master,
            db,
            username: username.filter(|u| !u.is_empty()),
            password: password.filter(|p| !p.is_empty()),
        })
    }
}

/// `redis[s]+sentinel://[[user]:password@]host:port[,host:port…]/master_name[/db]`;
/// `secure`: TLS to the sentinels and the master, verified against `certs`
/// (None: the system's CA bundle).
pub(super) fn client(
    rest: &str,
    secure: bool,
    certs: Option<redis::TlsCertificates>,
) -> Result<redis::sentinel::SentinelClient, String> {
    use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
    let SentinelUrl {
        hosts,
        master,
        db,
        username,
        password,
    } = SentinelUrl::parse(rest)?;
    let scheme = if secure { "rediss" } else { "redis" };
    let sentinels = hosts
        .split(',')
        .map(|h| {
            redis::IntoConnectionInfo::into_connection_info(format!("{scheme}://{h}"))
                .map(|info| info.addr().clone())
                .map_err(|e| format!("redis+sentinel URL: {h}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = SentinelClientBuilder::new(sentinels, master, SentinelServerType::Master)
        .map_err(|e| format!("redis+sentinel URL: {e}"))?
        .set_client_to_redis_db(db)
        .set_client_to_redis_protocol(redis::ProtocolVersion::RESP2);
    if let Some(username) = username {
        builder = builder.set_client_to_redis_username(username);
    }
    if let Some(password) = password {
        builder = builder.set_client_to_redis_password(password);
    }
    if secure {
        builder = builder
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure);
        if let Some(certs) = certs {
            builder = builder
                .set_client_to_sentinel_certificates(certs.clone())
                .set_client_to_redis_certificates(certs);
        }
    }
    builder
        .build()
        .map_err(|e| format!("redis+sentinel URL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::{client, SentinelUrl};

    #[test]
    fn sentinel_urls_parse_into_hosts_master_db_and_password() {
        assert_eq!(
            SentinelUrl::parse(":s3cret@10.0.0.1:26379,10.0.0.2:26379/mymaster/3"),
            Ok(SentinelUrl {
                hosts: "10.0.0.1:26379,10.0.0.2:26379",
                master: "mymaster".into(),
                db: 3,
                username: None,
                password: Some("s3cret"),
            })
        );
        let bare = SentinelUrl::parse("127.0.0.1:26379/m").unwrap();
        assert_eq!((bare.db, bare.password), (0, None));
        // a password containing '@' is split at the last one
        let acl = SentinelUrl::parse("user:p@ss@h:1/m").unwrap();
        assert_eq!((acl.username, acl.password), (Some("user"), Some("p@ss")));
        for bad in ["h:1", "h:1/", "/m", "h:1/m/x"] {
            assert!(SentinelUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(client("h:1/m/2", false, None).is_ok());
        assert!(client("h:1,h:2/m", true, None).is_ok());
    }
}
