//! HTTP: routing, the request envelope (admission, auth, body limits, timeouts,
//! metrics) and the JSON plumbing. Endpoint logic is in [`handlers`].

pub mod cache;
pub mod error;
pub mod handlers;
pub mod tokens;
pub mod trace;

use crate::admission::Admission;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::Limits;
use crate::store::Store;
use bytes::Bytes;
use error::ApiError;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{header, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub type Body = Full<Bytes>;

/// Everything a request needs, shared by all connections.
pub struct App {
    pub config: Config,
    pub limits: Limits,
    pub store: Store,
    /// The shared cache (`/api/cache`).
    pub cache: crate::cache::Cache,
    pub admission: Arc<Admission>,
    /// Per-client-IP limit (429), when configured.
    pub rate_limiter: Option<crate::admission::RateLimiter>,
    /// Per-client-address limit on the sessions `GET /api/session` creates
    /// (429), when configured (on by default).
    pub create_limiter: Option<crate::admission::RateLimiter>,
    /// The accepted API tokens (`api_token`, `api_token_file`), reloaded on
    /// SIGHUP.
    pub tokens: tokens::Tokens,
    /// Which requests get an access-log line.
    pub access_log: trace::AccessLogger,
    /// Set once the node has logged that it refuses management requests
    /// through a proxy for want of a token.
    pub warned_proxy_without_token: AtomicBool,
    pub metrics: Metrics,
    pub started: Instant,
    /// Up and not draining: what `/api/ready` reports.
    pub ready: AtomicBool,
}

/// Where a request goes. The template names label metrics.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Sessions,
    Session(&'a str),
    Rotate(&'a str),
    UserSessions(&'a str),
    BrowserSession,
    /// `/api/cache/{namespace}`
    CacheNamespace(&'a str),
    /// `/api/cache/{namespace}/{key}`
    CacheEntry(&'a str, &'a str),
    Health,
    Ready,
    Metrics,
    Unknown,
}

impl<'a> Route<'a> {
    pub fn parse(path: &'a str) -> Route<'a> {
        let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("api"), Some("sessions"), None, ..) => Route::Sessions,
            (Some("api"), Some("sessions"), Some(id), None, _) => Route::Session(id),
            (Some("api"), Some("sessions"), Some(id), Some("rotate"), None) => Route::Rotate(id),
            (Some("api"), Some("users"), Some(user), Some("sessions"), None) => {
                Route::UserSessions(user)
            }
            (Some("api"), Some("session"), None, ..) => Route::BrowserSession,
            (Some("api"), Some("cache"), Some(ns), None, _) => Route::CacheNamespace(ns),
            (Some("api"), Some("cache"), Some(ns), Some(key), None) => Route::CacheEntry(ns, key),
            (Some("api"), Some("health"), None, ..) => Route::Health,
            (Some("api"), Some("ready"), None, ..) => Route::Ready,
            (Some("metrics"), None, ..) => Route::Metrics,
            _ => Route::Unknown,
        }
    }

    pub fn template(&self) -> &'static str {
        match self {
            Route::Sessions => "/api/sessions",
            Route::Session(_) => "/api/sessions/:id",
            Route::Rotate(_) => "/api/sessions/:id/rotate",
            Route::UserSessions(_) => "/api/users/:user_id/sessions",
            Route::BrowserSession => "/api/session",
            Route::CacheNamespace(_) => "/api/cache/:namespace",
            Route::CacheEntry(..) => "/api/cache/:namespace/:key",
            Route::Health => "/api/health",
            Route::Ready => "/api/ready",
            Route::Metrics => "/metrics",
            Route::Unknown => "other",
        }
    }

    /// Routes for application back ends, behind the bearer token.
    fn needs_token(&self) -> bool {
        matches!(
            self,
            Route::Sessions
                | Route::Session(_)
                | Route::Rotate(_)
                | Route::UserSessions(_)
                | Route::CacheNamespace(_)
                | Route::CacheEntry(..)
                | Route::Metrics
        )
    }
}

/// Serves one request with its id known to the log (so every line logged
/// about it carries the id, see `logging`), and echoes the id in the answer. Never fails:
/// every error is a JSON response.
pub async fn serve(
    app: Arc<App>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, std::convert::Infallible> {
    let id = trace::request_id(req.headers());
    let mut resp = crate::logging::with_request_id(id.clone(), handle(app, req, peer)).await;
    resp.headers_mut().insert(&trace::HEADER, id);
    Ok(resp)
}

/// Admission, routing, auth, the handler under the request timeout, then
/// metrics and the access log.
async fn handle(app: Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let start = Instant::now();
    let path = req.uri().path().to_owned();
    let route = Route::parse(&path);
    let template = route.template();
    let access = app.access_log.pick();
    let method = access.then(|| req.method().clone());

    // Health and readiness must answer even when the node is saturated: the
    // balancer and the operator need them most then.
    let slot = if matches!(route, Route::Health | Route::Ready) {
        None
    } else {
        match app.admission.try_admit() {
            Some(slot) => Some(slot),
            None => {
                let resp = ApiError::unavailable(
                    "overloaded",
                    "too many requests in flight; retry shortly",
                )
                .into_response();
                app.metrics.observe(
                    template,
                    resp.status().as_u16(),
                    start.elapsed().as_secs_f64(),
                );
                if let Some(method) = method {
                    let client = client_ip(&app.config, peer, req.headers());
                    log_access(&method, template, &resp, start, client);
                }
                return resp;
            }
        }
    };

    // Only worked out when someone will read it.
    let client = (access || app.rate_limiter.is_some() || tracing::enabled!(tracing::Level::DEBUG))
        .then(|| client_ip(&app.config, peer, req.headers()));
    // Health and readiness (no slot) are never limited: balancers poll them.
    if let (Some(limiter), Some(ip), Some(_)) = (&app.rate_limiter, client, &slot) {
        if let Err(wait_secs) = limiter.check(ip, start) {
            let mut resp = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests from this client; slow down",
            )
            .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(wait_secs));
            app.metrics
                .observe(template, 429, start.elapsed().as_secs_f64());
            tracing::debug!(client = %ip, route = template, "rate limited");
            if let Some(method) = method {
                log_access(&method, template, &resp, start, ip);
            }
            return resp;
        }
    }
    let result = if route.needs_token() && !authorized(&app.tokens, &req) {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        ))
    } else if route.needs_token() && !app.tokens.required() && via_proxy(&app, &req, peer) {
        if !app.warned_proxy_without_token.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                route = template,
                "refusing management requests that come through a proxy: no api_token is set"
            );
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the management API is not served through a proxy without an api_token",
        ))
    } else {
        match tokio::time::timeout(
            app.config.request_timeout,
            handlers::dispatch(&app, route, req, peer),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ApiError::unavailable(
                "timeout",
                "the request took too long; retry shortly",
            )),
        }
    };
    let mut resp = result.unwrap_or_else(ApiError::into_response);
    if resp.status() == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    let status = resp.status().as_u16();
    app.metrics
        .observe(template, status, start.elapsed().as_secs_f64());
    if let (Some(client), true) = (client, status >= 400) {
        tracing::debug!(%client, route = template, status, "request refused");
    }
    if let (Some(method), Some(client)) = (method, client) {
        log_access(&method, template, &resp, start, client);
    }
    resp
}

/// One access-log line. The route is the template (`/api/sessions/:id`),
/// never the path, and no header is written: session ids stay out of logs.
/// The request id comes from the enclosing span.
fn log_access(
    method: &hyper::Method,
    route: &'static str,
    resp: &Response<Body>,
    start: Instant,
    client: std::net::IpAddr,
) {
    use hyper::body::Body as _;
    tracing::info!(
        method = %method.as_str(),
        route = %route,
        status = resp.status().as_u16(),
        duration_us = start.elapsed().as_micros() as u64,
        bytes = resp.body().size_hint().exact().unwrap_or(0),
        %client,
        "access"
    );
}

/// Whether a request came through a proxy (a balancer): its peer is a
/// trusted proxy, or it carries a forwarding header. Without a token, the
/// management API is only for callers on the node's own address space, never
/// for whoever reaches a balancer.
fn via_proxy(app: &App, req: &Request<Incoming>, peer: SocketAddr) -> bool {
    let h = req.headers();
    app.config.is_trusted_proxy(peer.ip())
        || h.contains_key("x-forwarded-for")
        || h.contains_key("forwarded")
        || h.contains_key("x-real-ip")
}

/// Whether the request carries an accepted bearer token (or none is
/// required). Every accepted token is compared in constant time.
fn authorized(tokens: &tokens::Tokens, req: &Request<Incoming>) -> bool {
    if !tokens.required() {
        return true;
    }
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|given| tokens.accepts(given))
}

/// Reads a JSON body of at most `limit` bytes; an empty body reads as `{}`.
pub async fn read_json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<T, ApiError> {
    let bytes = read_raw_body(req, limit, timeout).await?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))
}

/// Reads a body of at most `limit` bytes, as sent.
///
/// An oversized body is answered 413, but first read and discarded up to
/// [`DRAIN_CAP`] so the client, still sending, gets to see the answer instead
/// of a connection reset. Anything larger is cut off at once.
pub async fn read_raw_body(
    req: Request<Incoming>,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body exceeds {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    if declared.is_some_and(|len| len > limit as u64) {
        if declared.is_some_and(|len| len <= DRAIN_CAP as u64) {
            drain(&mut body, DRAIN_CAP, timeout).await;
        }
        return Err(too_large());
    }
    let read = async {
        // Within the limit (checked above), so never a client's whim.
        let mut buf = Vec::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request("bad_body", format!("reading request body: {e}"))
            })?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    drain(&mut body, DRAIN_CAP, timeout).await;
                    return Err(too_large());
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf)
    };
    let bytes = tokio::time::timeout(timeout, read).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "request body was not received in time",
        )
    })??;
    // A body that came in several frames may have grown the buffer past
    // its length; a cached value keeps its allocation for its lifetime.
    let mut bytes = bytes;
    bytes.shrink_to_fit();
    Ok(Bytes::from(bytes))
}

/// Largest oversized body read (and thrown away) so its sender sees the 413.
const DRAIN_CAP: usize = 2 * 1024 * 1024;

async fn drain(body: &mut Incoming, cap: usize, timeout: std::time::Duration) {
    let mut seen = 0usize;
    let _ = tokio::time::timeout(timeout, async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len();
                if seen > cap {
                    break;
                }
            }
        }
    })
    .await;
}

pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn method_not_allowed(allow: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("allowed: {allow}"),
    )
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the
/// rightmost `X-Forwarded-For` hop that is not itself a trusted proxy (hops
/// to its left were written by the client and can be forged).
pub fn client_ip(
    config: &Config,
    peer: SocketAddr,
    headers: &hyper::HeaderMap,
) -> std::net::IpAddr {
    if !config.is_trusted_proxy(peer.ip()) {
        return peer.ip();
    }
    let hops: Vec<std::net::IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|h| h.trim().parse().ok())
        .collect();
    hops.into_iter()
        .rev()
        .find(|ip| !config.is_trusted_proxy(*ip))
        .unwrap_or(peer.ip())
}

impl App {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::{client_ip, Route};
    use crate::config::{Args, Config};
    use clap::Parser;

    #[test]
    fn client_ip_believes_only_trusted_proxies_and_skips_forged_hops() {
        let args = Args::try_parse_from([
            "edgenode",
            "--config",
            "/dev/null",
            "--trusted-proxies",
            "10.0.0.5,10.0.1.0/24",
        ])
        .unwrap();
        let config = Config::resolve(args).unwrap();
        let mut h = hyper::HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 203.0.113.9, 10.0.1.7".parse().unwrap(),
        );
        let balancer = "10.0.0.5:4000".parse().unwrap();
        let stranger = "198.51.100.1:4000".parse().unwrap();
        assert_eq!(client_ip(&config, balancer, &h).to_string(), "203.0.113.9");
        assert_eq!(client_ip(&config, stranger, &h).to_string(), "198.51.100.1");
        assert_eq!(
            client_ip(&config, balancer, &hyper::HeaderMap::new()).to_string(),
            "10.0.0.5"
        );
    }

    #[test]
    fn routes_parse_to_templates() {
        assert_eq!(Route::parse("/api/sessions"), Route::Sessions);
        assert_eq!(Route::parse("/api/sessions/abc"), Route::Session("abc"));
        assert_eq!(
            Route::parse("/api/sessions/abc/rotate"),
            Route::Rotate("abc")
        );
        assert_eq!(
            Route::parse("/api/users/u1/sessions"),
            Route::UserSessions("u1")
        );
        assert_eq!(
            Route::parse("/api/sessions/../../etc/passwd"),
            Route::Unknown
        );
        assert_eq!(Route::parse("/api/sessions/a/b"), Route::Unknown);
        assert_eq!(Route::parse("/metrics"), Route::Metrics);
        assert_eq!(Route::parse("/"), Route::Unknown);
    }
}
