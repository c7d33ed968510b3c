//! systemd glue: readiness and status notifications, the watchdog, and socket
//! activation. Every call is a no-op when not run by systemd (no
//! `NOTIFY_SOCKET`, no `LISTEN_FDS`), so the same binary runs from a shell.

use sd_notify::NotifyState;
use std::net::TcpListener;
use std::os::fd::FromRawFd;
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

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Half of `WATCHDOG_USEC` when systemd wants watchdog pings.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog from a runtime task: if the runtime wedges, the pings
/// stop and systemd restarts the node.
pub async fn run_watchdog(every: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            _ = tick.tick() => send(&[NotifyState::Watchdog]),
            _ = shutdown.changed() => return,
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
