//! edgenode: a low-footprint session server for small ARM boards.
//!
//! The library holds every concern in its own module; `main.rs` only wires
//! them together. Start with [`server`] for the request path and
//! [`store::route`] for the failure model.

#![recursion_limit = "256"]

pub mod admission;
pub mod cache;
pub mod config;
pub mod disk;
pub mod docs;
pub mod healthcheck;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod redis_link;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod systemd;

/// `edgenode --version`: the version, the target triple, the git commit and
/// the fingerprint of the source it was built from (see `build.rs`).
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("EDGENODE_TARGET"),
    ", commit ",
    env!("EDGENODE_COMMIT"),
    ", source ",
    env!("EDGENODE_SOURCE"),
    ")"
);
