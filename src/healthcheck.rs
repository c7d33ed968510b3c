//! `edgenode healthcheck`: asks the node on this machine whether it is ready
//! and says so in its exit status (0 ready, 1 not), for a container's
//! `HEALTHCHECK`.
//!
//! Why it exists: the container image is `FROM scratch` (the static binary
//! and nothing else), so there is no curl or wget to probe `/api/ready` with;
//! the binary probes itself. It is deliberately tiny: one `GET /api/ready`
//! over plain HTTP/1.1 on a `std::net::TcpStream`, a 2 s budget for the
//! whole exchange, no runtime and no dependency.
//!
//! The address is the node's own `listen`, resolved exactly as the node
//! resolves it (flags > `EDGENODE_*` environment > TOML file > defaults), so
//! the check run inside the container sees the container's
//! `EDGENODE_LISTEN`. A wildcard address (`0.0.0.0`, `::`) is probed on the
//! loopback address of its family. Under socket activation the listening
//! address is the socket unit's, which `listen` does not know: pass `--listen`.
//!
//! Exit status: 0 when the node answers 200, 1 otherwise (not ready, not
//! answering, or a configuration that does not resolve). Never 2, which
//! Docker reserves in `HEALTHCHECK`. One line is printed either way.

use crate::config::{Args, Config};
use clap::{CommandFactory, FromArgMatches};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The subcommand's name, the first argument: `edgenode healthcheck`.
pub const SUBCOMMAND: &str = "healthcheck";

/// The whole probe (connect, send, first line of the answer) gets this long.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// What `edgenode --help` says about the subcommand.
pub const HELP: &str =
    "Subcommand: `edgenode healthcheck [OPTIONS]` sends GET /api/ready to this node's \
     listen address (the same options, environment and file as the node; a wildcard address is \
     probed on loopback) and exits 0 on 200, 1 otherwise, printing one line. For container \
     HEALTHCHECKs: the image has no curl.";

/// The node's command line (`Args`) with `--help` also describing this
/// subcommand, after the text `Args` already has.
pub fn documented(command: clap::Command) -> clap::Command {
    let before = command
        .get_after_help()
        .map(|h| format!("{h}\n\n"))
        .unwrap_or_default();
    command.after_help(format!("{before}{HELP}"))
}

/// True when the command line asks for the subcommand (`argv[1]`).
pub fn requested(mut args: impl Iterator<Item = OsString>) -> bool {
    args.nth(1).is_some_and(|a| a == SUBCOMMAND)
}

/// `edgenode healthcheck [OPTIONS]`: `args` is the whole command line,
/// program name and subcommand included.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let mut args: Vec<OsString> = args.into_iter().collect();
    if args.len() > 1 && args[1] == SUBCOMMAND {
        args.remove(1);
    }
    let command = Args::command()
        .bin_name(format!("edgenode {SUBCOMMAND}"))
        .about(
            "Exits 0 when the node at this configuration's listen address answers \
             GET /api/ready with 200, 1 otherwise (for container HEALTHCHECKs).",
        )
        .after_help(
            "Takes the node's own options, environment and file; only --config and \
             --listen matter.",
        );
    let parsed = command
        .try_get_matches_from(args)
        .and_then(|m| Args::from_arg_matches(&m));
    let args = match parsed {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version: exit 0
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad arguments");
            eprintln!(
                "edgenode healthcheck: {}",
                first.trim_start_matches("error: ")
            );
            return ExitCode::FAILURE;
        }
    };
    let listen = match Config::resolve(args) {
        Ok(c) => c.listen,
        Err(e) => {
            eprintln!("edgenode healthcheck: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = probe_address(listen);
    match check(addr, TIMEOUT) {
        Ok(()) => {
            println!("edgenode healthcheck: ready (200 from http://{addr}/api/ready)");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("edgenode healthcheck: not ready: {why}");
            ExitCode::FAILURE
        }
    }
}

/// The address to probe for a `listen` address: a wildcard becomes the
/// loopback address of its family, anything else is used as it is.
pub fn probe_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `GET /api/ready` at `addr`: `Ok` when the status is 200, otherwise why
/// not (the status, or what failed), all within `timeout`.
pub fn check(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer from {addr} within {} ms", timeout.as_millis()))
    };
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET /api/ready HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: edgenode-healthcheck\r\n\
         Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("{addr}: sending the request: {e}"))?;
    // Only the status line matters: read until its end.
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 128];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 1024 {
        stream
            .set_read_timeout(Some(left()?))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(left().err().unwrap_or_else(|| format!("{addr}: {e}")));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{addr}: reading the answer: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().unwrap_or("");
    match line.split(' ').collect::<Vec<_>>()[..] {
        [version, "200", ..] if version.starts_with("HTTP/1.") => Ok(()),
        [version, status, ..] if version.starts_with("HTTP/1.") => {
            Err(format!("HTTP {status} from http://{addr}/api/ready"))
        }
        _ if buf.is_empty() => Err(format!("{addr} closed the connection without an answer")),
        _ => Err(format!("{addr} did not answer HTTP: {:?}", line)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-connection server that reads the request head and writes `answer`.
    fn serve_once(answer: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 256];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&b[..n]),
                }
            }
            assert!(head.starts_with(b"GET /api/ready HTTP/1.1\r\n"));
            let _ = s.write_all(answer);
        });
        addr
    }

    #[test]
    fn ready_only_on_200() {
        let ok = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 14\r\n\r\n{\"ready\":true}");
        assert_eq!(check(ok, TIMEOUT), Ok(()));
        let draining = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let e = check(draining, TIMEOUT).unwrap_err();
        assert!(e.starts_with("HTTP 503"), "{e}");
        let garbage = serve_once(b"SSH-2.0-OpenSSH\r\n");
        assert!(check(garbage, TIMEOUT).is_err());
        let closed = serve_once(b"");
        assert!(check(closed, TIMEOUT).is_err());
    }

    #[test]
    fn a_silent_server_costs_the_timeout_and_no_more() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let e = check(addr, Duration::from_millis(300)).unwrap_err();
        let took = started.elapsed();
        assert!(e.contains("no answer"), "{e}");
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        drop(listener);
    }

    #[test]
    fn a_wildcard_listen_address_is_probed_on_loopback() {
        let p = |s: &str| probe_address(s.parse().unwrap()).to_string();
        assert_eq!(p("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(p("[::]:8080"), "[::1]:8080");
        assert_eq!(p("10.0.0.11:8080"), "10.0.0.11:8080");
    }
}
