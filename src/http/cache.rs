//! The shared cache's endpoints (docs/api.md, "Shared cache"):
//! `GET`/`PUT`/`DELETE /api/cache/{namespace}/{key}` and
//! `DELETE /api/cache/{namespace}`. Input is checked here, strictly and
//! before anything changes; [`crate::cache`] does the rest.

use super::error::ApiError;
use super::{json_response, method_not_allowed, read_raw_body, App, Body};
use crate::cache::{
    now_ms, valid_name, CacheError, Entry, Lookup, Removed, Stored, Tier, MAX_CONTENT_TYPE_LEN,
    MAX_KEY_LEN, MAX_NAMESPACE_LEN,
};
use crate::config::MAX_CACHE_TTL_SECS;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{header, Method, Request, Response, StatusCode};

/// The lease token's header, on a granting GET's answer and on the PUT.
const LEASE: &str = "x-cache-lease";
/// What is stored for a PUT without a `Content-Type`.
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

pub async fn entry(
    app: &App,
    ns: &str,
    key: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    check_namespace(ns)?;
    if !valid_name(key, MAX_KEY_LEN) {
        return Err(ApiError::bad_request(
            "invalid_cache_key",
            format!("a key is 1-{MAX_KEY_LEN} characters of A-Z a-z 0-9 . _ ~ - (not . or ..)"),
        ));
    }
    match *req.method() {
        Method::GET => get(app, ns, key, &req).await,
        Method::PUT => put(app, ns, key, req).await,
        Method::DELETE => {
            query(&req, "")?;
            removed(app.cache.delete(ns, key).await, "no such cache key")
        }
        _ => Err(method_not_allowed("GET, PUT, DELETE")),
    }
}

/// `DELETE /api/cache/{namespace}`: the purge.
pub async fn namespace(
    app: &App,
    ns: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    check_namespace(ns)?;
    match *req.method() {
        Method::DELETE => {
            query(&req, "")?;
            removed(app.cache.purge(ns).await, "")
        }
        _ => Err(method_not_allowed("DELETE")),
    }
}

fn check_namespace(ns: &str) -> Result<(), ApiError> {
    if valid_name(ns, MAX_NAMESPACE_LEN) {
        return Ok(());
    }
    Err(ApiError::bad_request(
        "invalid_namespace",
        format!(
            "a namespace is 1-{MAX_NAMESPACE_LEN} characters of A-Z a-z 0-9 . _ ~ - (not . or ..)"
        ),
    ))
}

/// The value of the query's `allowed` parameter (the last one given), if
/// any; any other parameter is a 400: a misspelt `ttl` must not silently
/// become the default.
fn query<'r>(req: &'r Request<Incoming>, allowed: &str) -> Result<Option<&'r str>, ApiError> {
    let mut found = None;
    for p in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match p.split_once('=') {
            Some((k, v)) if k == allowed => found = Some(v),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    "unknown query parameter (GET takes lease, PUT takes ttl, DELETE none)",
                ))
            }
        }
    }
    Ok(found)
}

async fn get(
    app: &App,
    ns: &str,
    key: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let lease = match query(req, "lease")? {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_lease",
                "lease must be 1 or 0",
            ))
        }
    };
    match app.cache.get(ns, key, lease).await {
        Lookup::Hit(e, tier) => Ok(value_response(&e, tier, req.headers())),
        Lookup::Miss { waited: false } => Err(ApiError::not_found("no such cache key")),
        Lookup::Miss { waited: true } => Err(ApiError::not_found(
            "no such cache key: another client holds its fill lease and no value arrived within cache_lease_wait_ms; no lease granted",
        )),
        Lookup::Lease(token) => {
            let mut resp = ApiError::not_found(
                "no such cache key; lease granted: fill it with a PUT carrying the X-Cache-Lease header",
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&token) {
                resp.headers_mut().insert(LEASE, v);
            }
            Ok(resp)
        }
    }
}

/// 200 with the value, or 304 when `If-None-Match` names its tag.
fn value_response(e: &Entry, tier: Tier, req: &HeaderMap) -> Response<Body> {
    let etag = format!("\"{:016x}\"", e.etag);
    let not_modified = req
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag);
    let mut resp = if not_modified {
        let mut r = Response::new(Body::default());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Body::new(e.body.clone()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(&e.content_type)
                .unwrap_or(HeaderValue::from_static(DEFAULT_CONTENT_TYPE)),
        );
        r
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::AGE,
        HeaderValue::from(now_ms().saturating_sub(e.stored_at) / 1000),
    );
    h.insert("x-cache", HeaderValue::from_static(tier.as_str()));
    resp
}

async fn put(
    app: &App,
    ns: &str,
    key: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let ttl = query(&req, "ttl")?.map(parse_ttl).transpose()?;
    let headers = req.headers();
    let ttl = match ttl {
        Some(t) => t,
        None => max_age(headers)?.unwrap_or(app.config.cache_ttl_secs),
    };
    let content_type = content_type(headers)?.to_string();
    let lease = match headers.get(LEASE) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|t| {
                    t.len() == 33
                        && matches!(t.as_bytes()[0], b'r' | b'l')
                        && t[1..].bytes().all(|b| b.is_ascii_hexdigit())
                })
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_lease",
                        "X-Cache-Lease must be a token a lease GET answered with",
                    )
                })?
                .to_string(),
        ),
        None => None,
    };
    let body = read_raw_body(
        req,
        app.config.max_cache_value_bytes,
        app.config.request_timeout,
    )
    .await?;
    let (entry, stored) = app
        .cache
        .put(ns, key, &content_type, body, ttl, lease.as_deref())
        .await
        .map_err(api_error)?;
    let mut resp = match stored {
        Stored::Shared => {
            let mut r = Response::new(Body::default());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Stored::Local => json_response(
            StatusCode::ACCEPTED,
            br#"{"stored":"local","pending_sync":false}"#.to_vec(),
        ),
    };
    if let Ok(v) = HeaderValue::from_str(&format!("\"{:016x}\"", entry.etag)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

fn parse_ttl(v: &str) -> Result<u64, ApiError> {
    v.parse::<u64>()
        .ok()
        .filter(|t| (1..=MAX_CACHE_TTL_SECS).contains(t))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_ttl",
                format!("a TTL is a whole number of seconds from 1 to {MAX_CACHE_TTL_SECS}"),
            )
        })
}

/// `Cache-Control: max-age=N`, if given. Other directives are ignored.
fn max_age(h: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let mut found = None;
    for v in h.get_all(header::CACHE_CONTROL) {
        let v = v.to_str().map_err(|_| {
            ApiError::bad_request("invalid_ttl", "Cache-Control is not visible ASCII")
        })?;
        for d in v.split(',').map(str::trim) {
            if d.len() > 8 && d[..8].eq_ignore_ascii_case("max-age=") {
                found = Some(parse_ttl(d[8..].trim_matches('"'))?);
            }
        }
    }
    Ok(found)
}

/// The `Content-Type` to store: as given (one header, visible ASCII, at
/// most [`MAX_CONTENT_TYPE_LEN`] bytes), or octet-stream when absent.
fn content_type(h: &HeaderMap) -> Result<&str, ApiError> {
    let mut all = h.get_all(header::CONTENT_TYPE).iter();
    let (Some(v), None) = (all.next(), all.next()) else {
        return match h.contains_key(header::CONTENT_TYPE) {
            true => Err(bad_content_type()),
            false => Ok(DEFAULT_CONTENT_TYPE),
        };
    };
    v.to_str()
        .ok()
        .filter(|t| !t.trim().is_empty() && t.len() <= MAX_CONTENT_TYPE_LEN)
        .ok_or_else(bad_content_type)
}

fn bad_content_type() -> ApiError {
    ApiError::bad_request(
        "invalid_content_type",
        format!(
            "Content-Type must be one header of 1-{MAX_CONTENT_TYPE_LEN} visible ASCII characters"
        ),
    )
}

/// A DELETE's or purge's answer: 204, 404 (nothing there) or, during an
/// outage, 202 (journaled).
fn removed(
    r: Result<Removed, CacheError>,
    missing: &'static str,
) -> Result<Response<Body>, ApiError> {
    match r.map_err(api_error)? {
        Removed::Done(false) if !missing.is_empty() => Err(ApiError::not_found(missing)),
        Removed::Done(_) => {
            let mut resp = Response::new(Body::default());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            Ok(resp)
        }
        Removed::Journaled => Ok(json_response(
            StatusCode::ACCEPTED,
            br#"{"pending_sync":true}"#.to_vec(),
        )),
    }
}

fn api_error(e: CacheError) -> ApiError {
    match e {
        CacheError::LeaseMismatch(why) => {
            ApiError::new(StatusCode::CONFLICT, "lease_mismatch", why)
        }
        CacheError::JournalFull(_) => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "journal_full",
            "the cache's outage journal is full; deletions are refused until redis returns",
        ),
        CacheError::Disk(e) => crate::store::StoreError::from(e).into(),
    }
}
