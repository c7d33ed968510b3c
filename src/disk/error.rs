//! The disk layer's own error: what can go wrong below the domains (the
//! session store, the shared cache), which each turn it into their own
//! error with a `From` impl.
//!
//! The messages are the ones the session store's error always printed for
//! the same faults, so logs read the same whichever layer reports them.

/// Why the node's database refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// sled itself failed (I/O, corruption, a sticky earlier write error).
    #[error("local store error: {0}")]
    Sled(#[from] sled::Error),
    /// The data directory's free space is at the reserve.
    #[error("disk almost full: {free} bytes free, {reserve} kept in reserve")]
    Full { free: u64, reserve: u64 },
    /// Writing to the local disk failed (EIO, read-only file system...).
    #[error("local disk fault: {0}")]
    Fault(String),
    /// The database is being closed: nobody will flush it any more.
    #[error("store unavailable: {0}")]
    Closed(String),
}

pub type Result<T> = std::result::Result<T, DiskError>;
