//! The accept loop and each connection's life, including the shutdown story:
//! when `shutdown` fires the listener closes, every connection is told to
//! finish its current request and close, and `run` returns once they have (or
//! once the grace period is over, when the rest are stopped).

use crate::admission::ConnectionSlot;
use crate::http::{self, App};
use crate::shutdown::Shutdown;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

/// What an over-limit connection gets before it is closed.
const CONNECTION_REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 84\r\n\r\n{\"error\":{\"code\":\"overloaded\",\"message\":\"too many open connections; retry shortly\"}}";

/// How long a connection accepted just before shutdown gets to start its
/// request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(100);

/// Counts one accepted connection in `waiting` until its first request head
/// has been read, or until the connection ends without one.
struct AwaitingFirstRequest {
    waiting: Arc<AtomicUsize>,
    done: AtomicBool,
}

impl AwaitingFirstRequest {
    fn new(waiting: &Arc<AtomicUsize>) -> AwaitingFirstRequest {
        waiting.fetch_add(1, Ordering::AcqRel);
        AwaitingFirstRequest {
            waiting: waiting.clone(),
            done: AtomicBool::new(false),
        }
    }

    fn started(&self) {
        if !self.done.load(Ordering::Relaxed) && !self.done.swap(true, Ordering::AcqRel) {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for AwaitingFirstRequest {
    fn drop(&mut self) {
        self.started();
    }
}

/// Largest request head (request line and headers) accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

pub async fn run(app: Arc<App>, listener: TcpListener, mut shutdown: Shutdown) {
    let graceful = GracefulShutdown::new();
    let awaiting_first_request = Arc::new(AtomicUsize::new(0));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.header_timeout)
        .keep_alive(true)
        // The read buffer bounds what one connection can hold: request
        // headers beyond it get 431 (bodies stream through it in frames), so
        // max_connections x this stays within the memory budget.
        .max_buf_size(MAX_HEADER_BYTES);
    // Every connection's task, so that those still open when the grace
    // period ends are stopped before the store closes (finished ones are
    // reaped as the loop goes).
    let mut connections = tokio::task::JoinSet::new();

    loop {
        let (stream, peer) = tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shutdown.recv() => break,
        };
        let Some(slot) = app.admission.try_connect() else {
            tokio::spawn(refuse(stream).instrument(tracing::Span::current()));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app_for_conn = app.clone();
        // hyper keeps a `Box<Option<handler future>>` per connection for its
        // whole life; our handler future is ~5.6 KB (every store path inlined).
        // Boxing it per request keeps an idle keep-alive connection ~5 KB
        // smaller for one allocation per request.
        let first = AwaitingFirstRequest::new(&awaiting_first_request);
        let service = service_fn(move |req| {
            first.started();
            Box::pin(http::serve(app_for_conn.clone(), req, peer))
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        // Each connection's requests log inside the node's span (tokio does
        // not pass a span on to the tasks it spawns).
        connections.spawn(serve_connection(conn, slot).instrument(tracing::Span::current()));
    }
    drop(listener);
    // A connection accepted a moment ago may not have had its request read
    // yet, and hyper's graceful shutdown closes such a connection without an
    // answer. Under socket activation that client did nothing wrong (the
    // socket stayed open across the restart): give just-accepted connections
    // a moment to start their request, which then finishes normally. With
    // none waiting for theirs, there is nothing to wait for.
    let deadline = tokio::time::Instant::now() + FIRST_REQUEST_GRACE;
    while awaiting_first_request.load(Ordering::Acquire) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tracing::info!("listener closed; waiting for in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(app.config.shutdown_grace) => {
            tracing::warn!(grace_ms = app.config.shutdown_grace.as_millis() as u64, "grace period over; closing remaining connections");
        }
    }
    // Nothing outlives `run`: a request still running is stopped here, so
    // none writes to the store after it is closed.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

async fn serve_connection<F>(conn: F, _slot: ConnectionSlot)
where
    F: std::future::Future<Output = Result<(), hyper::Error>>,
{
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Answers an over-limit connection with a canned 503 and closes it, spending
/// at most a few milliseconds on it.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_millis(50), async {
        let _ = stream.write_all(CONNECTION_REFUSED).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
