//! One function per endpoint of the API (docs/api.md).

use super::error::ApiError;
use super::{json_response, method_not_allowed, read_json_body, App, Body, Route};
use crate::session::{encode_metadata, parse_session_id, validate_user_id, Patch};
use crate::store::Deleted;
use crate::store::PatchOutcome;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::io::Write;
use std::net::SocketAddr;

/// `POST /api/sessions` and `PATCH /api/sessions/{id}` bodies. Unknown fields
/// and wrong types are refused (400) rather than ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionBody {
    user_id: Option<String>,
    metadata: Option<Map<String, Value>>,
}

pub async fn dispatch(
    app: &App,
    route: Route<'_>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    match route {
        Route::Sessions => match method {
            Method::POST => create(app, req).await,
            _ => Err(method_not_allowed("POST")),
        },
        Route::Session(id) => {
            let id = session_id(id)?;
            match method {
                Method::GET => read(app, &id).await,
                Method::PATCH => patch(app, &id, req).await,
                Method::DELETE => delete(app, &id).await,
                _ => Err(method_not_allowed("GET, PATCH, DELETE")),
            }
        }
        Route::Rotate(id) => {
            let id = session_id(id)?;
            match method {
                Method::POST => rotate(app, &id).await,
                _ => Err(method_not_allowed("POST")),
            }
        }
        Route::UserSessions(user) => {
            validate_user_id(user)?;
            match method {
                Method::GET => list_user(app, user, req.uri().query()).await,
                Method::DELETE => delete_user(app, user).await,
                _ => Err(method_not_allowed("GET, DELETE")),
            }
        }
        Route::BrowserSession => match method {
            Method::GET => browser_session(app, &req, peer).await,
            _ => Err(method_not_allowed("GET")),
        },
        Route::CacheEntry(ns, key) => super::cache::entry(app, ns, key, req).await,
        Route::CacheNamespace(ns) => super::cache::namespace(app, ns, req).await,
        Route::Health => match method {
            Method::GET => Ok(health(app)),
            _ => Err(method_not_allowed("GET")),
        },
        Route::Ready => match method {
            Method::GET => ready(app),
            _ => Err(method_not_allowed("GET")),
        },
        Route::Metrics => match method {
            Method::GET => Ok(metrics(app)),
            _ => Err(method_not_allowed("GET")),
        },
        Route::Unknown => Err(ApiError::not_found("no such endpoint")),
    }
}

fn session_id(text: &str) -> Result<[u8; 16], ApiError> {
    parse_session_id(text)
        .ok_or_else(|| ApiError::bad_request("invalid_session_id", "session id must be a UUID"))
}

/// A session as the API answers it, with its version as the entity tag
/// (what `If-Match` compares with).
fn session_response(status: StatusCode, s: &crate::session::Session) -> Response<Body> {
    let mut resp = json_response(status, s.to_json());
    // Versions 0 to 9, most sessions', as static values: no allocation.
    const SMALL: [&str; 10] = [
        "\"0\"", "\"1\"", "\"2\"", "\"3\"", "\"4\"", "\"5\"", "\"6\"", "\"7\"", "\"8\"", "\"9\"",
    ];
    let tag = match usize::try_from(s.version).ok().and_then(|v| SMALL.get(v)) {
        Some(t) => Some(header::HeaderValue::from_static(t)),
        None => header::HeaderValue::from_str(&format!("\"{}\"", s.version)).ok(),
    };
    if let Some(v) = tag {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// `If-Match`: the version a PATCH is conditional on. Entity tags are the
/// session's version (`"3"`, or a bare `3`); `*` is no condition; a weak tag
/// (`W/"3"`) never matches If-Match's strong comparison, so it answers 412.
enum IfMatch {
    None,
    Version(u64),
    NeverMatches,
}

fn parse_if_match(req: &Request<Incoming>) -> Result<IfMatch, ApiError> {
    let Some(v) = req.headers().get(header::IF_MATCH) else {
        return Ok(IfMatch::None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_if_match",
            "If-Match must be one session version (an entity tag such as \"3\") or *",
        )
    };
    let text = v.to_str().map_err(|_| bad())?.trim();
    if text == "*" {
        return Ok(IfMatch::None);
    }
    if text.contains(',') {
        return Err(bad());
    }
    if let Some(weak) = text.strip_prefix("W/") {
        weak.trim_matches('"').parse::<u64>().map_err(|_| bad())?;
        return Ok(IfMatch::NeverMatches);
    }
    text.trim_matches('"')
        .parse::<u64>()
        .map(IfMatch::Version)
        .map_err(|_| bad())
}

fn no_session() -> ApiError {
    ApiError::not_found("no such session, or it has expired")
}

async fn create(app: &App, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body: SessionBody =
        read_json_body(req, app.config.max_body_bytes, app.config.request_timeout).await?;
    let user_id = match body.user_id {
        Some(u) => {
            validate_user_id(&u)?;
            u
        }
        None => crate::session::ANONYMOUS.to_string(),
    };
    let metadata = encode_metadata(&body.metadata.unwrap_or_default(), &app.limits)?;
    let session = app.store.create(user_id, metadata, false).await?;
    Ok(session_response(StatusCode::CREATED, &session))
}

async fn read(app: &App, id: &[u8; 16]) -> Result<Response<Body>, ApiError> {
    match app.store.touch(id).await? {
        Some(s) => Ok(session_response(StatusCode::OK, &s)),
        None => Err(no_session()),
    }
}

async fn patch(
    app: &App,
    id: &[u8; 16],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let if_match = match parse_if_match(&req)? {
        IfMatch::None => None,
        IfMatch::Version(v) => Some(v),
        IfMatch::NeverMatches => {
            return Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "version_mismatch",
                "a weak entity tag never matches If-Match",
            ))
        }
    };
    let body: SessionBody =
        read_json_body(req, app.config.max_body_bytes, app.config.request_timeout).await?;
    if let Some(u) = &body.user_id {
        validate_user_id(u)?;
    }
    if let Some(m) = &body.metadata {
        // The patch itself must fit; the merged result is checked by the store.
        encode_metadata(m, &app.limits)?;
    }
    let patch = Patch {
        user_id: body.user_id,
        metadata: body.metadata,
    };
    match app.store.patch(id, &patch, if_match).await? {
        PatchOutcome::Updated(s) => Ok(session_response(StatusCode::OK, &s)),
        PatchOutcome::NotFound => Err(no_session()),
        PatchOutcome::VersionMismatch { current } => Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "version_mismatch",
            format!("session is at version {current}"),
        )),
    }
}

async fn delete(app: &App, id: &[u8; 16]) -> Result<Response<Body>, ApiError> {
    match app.store.delete(id).await? {
        Deleted::Now(0) => Err(no_session()),
        Deleted::Now(_) => {
            let mut resp = Response::new(Body::default());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            Ok(resp)
        }
        Deleted::Accepted { held } => Ok(accepted(held)),
    }
}

/// 202 for a logout made during an outage: done here (`deleted` counts the
/// sessions this node held), journaled, and applied everywhere once Redis
/// is back.
fn accepted(held: u64) -> Response<Body> {
    json_response(
        StatusCode::ACCEPTED,
        serde_json::json!({ "deleted": held, "pending_sync": true })
            .to_string()
            .into_bytes(),
    )
}

async fn rotate(app: &App, id: &[u8; 16]) -> Result<Response<Body>, ApiError> {
    match app.store.rotate(id).await? {
        Some(s) => Ok(session_response(StatusCode::OK, &s)),
        None => Err(no_session()),
    }
}

/// Largest page of a user listing.
const MAX_PAGE: u64 = 100;

/// `GET /api/users/{user}/sessions?cursor=&limit=`: one page, oldest first,
/// and the cursor of the next page (`null` at the end).
async fn list_user(app: &App, user: &str, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let (mut offset, mut limit) = (0u64, MAX_PAGE);
    for (k, v) in query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
    {
        match k {
            "cursor" if v.is_empty() => {}
            "cursor" => {
                offset = v.parse().map_err(|_| {
                    ApiError::bad_request("invalid_cursor", "cursor must come from next_cursor")
                })?
            }
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|l| (1..=MAX_PAGE).contains(l))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_limit",
                            format!("limit must be 1-{MAX_PAGE}"),
                        )
                    })?
            }
            _ => {}
        }
    }
    let (sessions, next) = app.store.list_user(user, offset, limit).await?;
    let mut out = Vec::with_capacity(48 + sessions.len() * 300);
    out.extend_from_slice(b"{\"sessions\":[");
    for (i, s) in sessions.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&s.to_json());
    }
    out.extend_from_slice(b"],\"next_cursor\":");
    match next {
        Some(n) => out.extend_from_slice(format!("\"{n}\"").as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    Ok(json_response(StatusCode::OK, out))
}

async fn delete_user(app: &App, user: &str) -> Result<Response<Body>, ApiError> {
    match app.store.delete_user(user).await? {
        Deleted::Now(n) => Ok(json_response(
            StatusCode::OK,
            serde_json::json!({ "deleted": n }).to_string().into_bytes(),
        )),
        Deleted::Accepted { held } => Ok(accepted(held)),
    }
}

static X_SESSION_ID: header::HeaderName = header::HeaderName::from_static("x-session-id");

/// `GET /api/session`: the caller's session by cookie or `X-Session-ID`; a
/// missing, malformed or expired one is replaced by a new session.
async fn browser_session(
    app: &App,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let presented = cookie_session_id(req).or_else(|| {
        req.headers()
            .get(&X_SESSION_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_session_id)
    });
    let existing = match presented {
        Some(id) => app.store.touch(&id).await?,
        None => None,
    };
    let session = match existing {
        Some(s) => s,
        None => {
            if let Some(limiter) = &app.create_limiter {
                let client = super::client_ip(&app.config, peer, req.headers());
                if let Err(wait) = limiter.check(client, std::time::Instant::now()) {
                    let mut resp = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_new_sessions",
                        "too many new sessions from this address; retry shortly",
                    )
                    .into_response();
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, header::HeaderValue::from(wait));
                    return Ok(resp);
                }
            }
            app.store
                .create(crate::session::ANONYMOUS.into(), "{}".into(), true)
                .await?
        }
    };
    let mut resp = session_response(StatusCode::OK, &session);
    // The cookie and the id are written on the stack: the cookie's header
    // value is its one allocation (this path runs on every use of a
    // browser). 128 bytes hold the longest cookie: 79, a Max-Age of up to
    // 30, "; Secure" 8.
    let mut text = [0u8; 45];
    let id = crate::session::id_text(&session.id, &mut text);
    let mut buf = [0u8; 128];
    let mut w = &mut buf[..];
    let mut written = write!(w, "session_id={id}; HttpOnly; SameSite=Lax; Path=/");
    if app.config.cookie_max_age_secs != 0 {
        written = written.and(write!(w, "; Max-Age={}", app.config.cookie_max_age_secs));
    }
    if app.config.cookie_secure {
        written = written.and(w.write_all(b"; Secure"));
    }
    let len = 128 - w.len();
    let headers = resp.headers_mut();
    if let (Ok(()), Ok(v)) = (written, header::HeaderValue::from_bytes(&buf[..len])) {
        headers.insert(header::SET_COOKIE, v);
    }
    if let Ok(v) = header::HeaderValue::from_str(id) {
        headers.insert(X_SESSION_ID.clone(), v);
    }
    Ok(resp)
}

/// The `session_id` cookie, if present and a well-formed id.
fn cookie_session_id(req: &Request<Incoming>) -> Option<[u8; 16]> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix("session_id="))
        .find_map(parse_session_id)
}

fn health(app: &App) -> Response<Body> {
    let status = crate::status::NodeStatus::read(&app.store, &app.admission, &app.cache);
    let mut body = status.to_json();
    body.insert("instance_id".into(), app.config.instance_id.clone().into());
    body.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    body.insert(
        "uptime_seconds".into(),
        app.started.elapsed().as_secs().into(),
    );
    json_response(StatusCode::OK, Value::Object(body).to_string().into_bytes())
}

fn ready(app: &App) -> Result<Response<Body>, ApiError> {
    if !app.is_ready() {
        return Err(ApiError::unavailable("not_ready", "starting or draining"));
    }
    if let Some(reason) = app.store.status().unready {
        return Err(ApiError::unavailable("degraded", reason));
    }
    Ok(json_response(StatusCode::OK, br#"{"ready":true}"#.to_vec()))
}

fn metrics(app: &App) -> Response<Body> {
    let mut resp = Response::new(Body::from(app.metrics.render()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    resp
}
