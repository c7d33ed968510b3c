//! The log lines: plain without colours or timestamps under journald (it
//! adds its own), JSON lines on request, and the id of the request a line is
//! about on every such line.
//!
//! Why the request id is not a tracing span: a span per request cost about
//! a tenth of a hot touch (measured: 26.2k against 23.5k req/s with the span
//! disabled by `--log-level warn`): the registry's slot, the span's fields
//! formatted into a string, an enter and an exit on every poll, all for
//! lines that are almost never written. So the id rides in a task-local
//! ([`with_request_id`], a few nanoseconds), and the formatter adds it only
//! to the lines that are written, whatever part of the node writes them
//! while it serves that request (the store's warnings included).

use crate::config::{Config, LogFormat};
use hyper::header::HeaderValue;
use std::fmt;
use std::future::Future;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

tokio::task_local! {
    static REQUEST_ID: HeaderValue;
}

/// Runs a request's work with its id known to every line it logs.
pub async fn with_request_id<F: Future>(id: HeaderValue, work: F) -> F::Output {
    REQUEST_ID.scope(id, work).await
}

/// Installs the global subscriber for the node's configuration.
pub fn init(config: &Config) {
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(config.log_level)
        .with_target(false);
    match (config.log_format, journald) {
        (LogFormat::Json, _) => {
            let json = builder.json();
            let format =
                WithRequestId::json(tracing_subscriber::fmt::format().json().with_target(false));
            json.event_format(format).init()
        }
        (LogFormat::Plain, true) => builder
            .without_time()
            .with_ansi(false)
            .event_format(WithRequestId::plain(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_ansi(false)
                    .with_target(false),
            ))
            .init(),
        (LogFormat::Plain, false) => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            builder
                .with_ansi(ansi)
                .event_format(WithRequestId::plain(
                    tracing_subscriber::fmt::format()
                        .with_ansi(ansi)
                        .with_target(false),
                ))
                .init()
        }
    }
}

/// A line format with the current request's id added: ` request_id=<id>`
/// at the end of a plain line, a `"request_id"` member of a JSON object.
/// The id is safe to write as is: only short ids of `[A-Za-z0-9._-]` are
/// taken from a client (see `http::trace`).
struct WithRequestId<F> {
    inner: F,
    json: bool,
}

impl<F> WithRequestId<F> {
    fn plain(inner: F) -> Self {
        WithRequestId { inner, json: false }
    }

    fn json(inner: F) -> Self {
        WithRequestId { inner, json: true }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithRequestId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Ok(id) = REQUEST_ID.try_with(|id| id.clone()) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let id = id.to_str().unwrap_or("-");
        if writer.has_ansi_escapes() {
            // A terminal: the id first, the coloured line as it is.
            write!(writer, "request_id={id} ")?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(&add_request_id(&line, id, self.json))
    }
}

/// `line` (one formatted event, ending in a newline) with the id added.
fn add_request_id(line: &str, id: &str, json: bool) -> String {
    let body = line.trim_end_matches('\n');
    match (json, body.strip_suffix('}')) {
        (true, Some(open)) => format!("{open},\"request_id\":\"{id}\"}}\n"),
        _ => format!("{body} request_id={id}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_ends_a_plain_line_and_joins_a_json_object() {
        assert_eq!(
            add_request_id("WARN node{instance_id=a}: slow\n", "r-1", false),
            "WARN node{instance_id=a}: slow request_id=r-1\n"
        );
        let json = add_request_id("{\"level\":\"WARN\",\"x\":1}\n", "r-1", true);
        assert_eq!(
            json,
            "{\"level\":\"WARN\",\"x\":1,\"request_id\":\"r-1\"}\n"
        );
        let v: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
        assert_eq!(v["request_id"], "r-1");
    }
}
