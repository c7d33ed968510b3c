//! `redis+sentinel://` URLs: the one form both `redis_url` and
//! `cache_redis_url` take, so both find the master the same way.

/// The parts of a `redis+sentinel://` URL after the scheme.
#[derive(Debug, PartialEq, Eq)]
struct SentinelUrl<'a> {
    hosts: &'a str,
    master: String,
    db: i64,
    password: Option<&'a str>,
}

impl<'a> SentinelUrl<'a> {
    /// `[[user]:password@]host:port[,host:port…]/master_name[/db]`
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
        let password = auth
            .map(|a| a.split_once(':').map(|(_, p)| p).unwrap_or(a))
            .filter(|p| !p.is_empty());
        Ok(SentinelUrl {
            hosts,
            master,
            db,
            password,
        })
    }
}

/// `redis+sentinel://[:password@]host:port[,host:port…]/master_name[/db]`
pub(super) fn client(rest: &str) -> Result<redis::sentinel::SentinelClient, String> {
    let SentinelUrl {
        hosts,
        master,
        db,
        password,
    } = SentinelUrl::parse(rest)?;
    let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
    let mut info = redis::RedisConnectionInfo::default().set_db(db);
    if let Some(password) = password {
        info = info.set_password(password);
    }
    let node =
        redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
    redis::sentinel::SentinelClient::build(
        sentinels,
        master,
        Some(node),
        redis::sentinel::SentinelServerType::Master,
    )
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
                password: Some("s3cret"),
            })
        );
        let bare = SentinelUrl::parse("127.0.0.1:26379/m").unwrap();
        assert_eq!((bare.db, bare.password), (0, None));
        // a password containing '@' is split at the last one
        assert_eq!(
            SentinelUrl::parse("user:p@ss@h:1/m").unwrap().password,
            Some("p@ss")
        );
        for bad in ["h:1", "h:1/", "/m", "h:1/m/x"] {
            assert!(SentinelUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(client("h:1/m/2").is_ok());
    }
}
