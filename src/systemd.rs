//! systemd glue: readiness and status notifications, the watchdog, and socket
//! activation. Every call is a no-op when not run by systemd (no
//! `NOTIFY_SOCKET`, no `LISTEN_FDS`), so the same binary runs from a shell.

use sd_notify::NotifyState;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::os::fd::FromRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// READY=1 plus a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// Sends a notification without ever blocking: the socket is non-blocking,
/// so a service manager that stopped reading (its queue full) costs a
/// dropped message, never a runtime worker. (`sd_notify::notify` sends on a
/// blocking socket made anew for every call.)
fn send(states: &[NotifyState]) {
    static SOCKET: std::sync::OnceLock<Option<UnixDatagram>> = std::sync::OnceLock::new();
    static DROPPED: AtomicU64 = AtomicU64::new(0);
    let Some(sock) = SOCKET.get_or_init(notify_socket) else {
        return;
    };
    let mut msg = String::new();
    for s in states {
        let _ = writeln!(msg, "{s}");
    }
    match sock.send(msg.as_bytes()) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            let n = DROPPED.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "the service manager is not reading notifications; dropped"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "sd_notify failed"),
    }
}

/// The connected, non-blocking notification socket (`NOTIFY_SOCKET`; a name
/// starting with `@` is in the abstract namespace), or `None` without one.
fn notify_socket() -> Option<UnixDatagram> {
    let path = std::env::var_os("NOTIFY_SOCKET")?;
    let sock = UnixDatagram::unbound().ok()?;
    let connected = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.connect_addr(&addr)),
        None => sock.connect(&path),
    };
    if let Err(e) = connected.and_then(|_| sock.set_nonblocking(true)) {
        tracing::warn!(error = %e, "cannot reach NOTIFY_SOCKET");
        return None;
    }
    Some(sock)
}

/// Half of `WATCHDOG_USEC` when systemd wants watchdog pings.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog from a runtime task: if the runtime wedges, the pings
/// stop and systemd restarts the node.
pub async fn run_watchdog(every: Duration, mut shutdown: crate::shutdown::Shutdown) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            _ = tick.tick() => send(&[NotifyState::Watchdog]),
            _ = shutdown.recv() => return,
        }
    }
}

/// The first socket passed by systemd socket activation, if any. Checks
/// `LISTEN_PID`, so a stray environment does not hijack a child process.
pub fn activated_listener() -> std::io::Result<Option<TcpListener>> {
    let Some(fd) = sd_notify::listen_fds()?.next() else {
        return Ok(None);
    };
    // SAFETY: systemd passed this descriptor to us (LISTEN_PID matched) and
    // nothing else in the process owns it.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}
