//! The disk layer's own error: what can go wrong below the domains (the
//! session store, the shared cache), which each turn it into their own
//! error with a `From` impl.
//!
//! The messages are the ones the session store's error always printed for
//! the same faults, so logs read the same whichever layer reports them.
//!
//! sled's I/O errors are sorted here, by [`std::io::ErrorKind`] (never by
//! the OS error number: sled's own error clone keeps only the kind): a full
//! disk is [`DiskError::NoSpace`] (507, like the reserve), any other I/O
//! error [`DiskError::Fault`] (503). Either way the database is dead until
//! it is reopened: the patched sled keeps the first failed write as a sticky
//! error (vendor/sled/EDGENODE-PATCH.md, section 8).

/// Why the node's database refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// sled itself failed, not its disk (corruption, a bug it reports).
    #[error("local store error: {0}")]
    Sled(sled::Error),
    /// The data directory's free space is at the reserve.
    #[error("disk almost full: {free} bytes free, {reserve} kept in reserve")]
    Full { free: u64, reserve: u64 },
    /// A write found the file system full (ENOSPC): the reserve did not
    /// hold, or something else filled the disk.
    #[error("disk full: {0}")]
    NoSpace(String),
    /// Writing to the local disk failed (EIO, read-only file system...), a
    /// read failed, or a flush did not finish within its deadline.
    #[error("local disk fault: {0}")]
    Fault(String),
    /// The database is being closed: nobody will flush it any more.
    #[error("store unavailable: {0}")]
    Closed(String),
}

impl From<sled::Error> for DiskError {
    fn from(e: sled::Error) -> DiskError {
        match e {
            sled::Error::Io(io) if io.kind() == storage_full() => {
                DiskError::NoSpace(io.to_string())
            }
            sled::Error::Io(io) => DiskError::Fault(io.to_string()),
            other => DiskError::Sled(other),
        }
    }
}

/// The kind of a full file system (`ErrorKind::StorageFull`, named here by
/// the kind the standard library gives ENOSPC: the variant's name is newer
/// than this crate's minimum Rust). The error compared is never asked for
/// its OS number: sled's error clone keeps only the kind.
fn storage_full() -> std::io::ErrorKind {
    std::io::Error::from_raw_os_error(libc::ENOSPC).kind()
}

impl DiskError {
    /// Whether this is the disk failing (full or faulty) rather than a
    /// refusal or sled's own trouble: the database is then dead until
    /// reopened.
    pub fn is_disk(&self) -> bool {
        matches!(self, DiskError::NoSpace(_) | DiskError::Fault(_))
    }
}

pub type Result<T> = std::result::Result<T, DiskError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_io_errors_are_sorted_by_kind_not_by_os_error_number() {
        let full = sled::Error::Io(std::io::Error::new(
            storage_full(),
            "sled blob write /d/blobs/7: no space",
        ));
        assert!(
            matches!(DiskError::from(full), DiskError::NoSpace(m) if m.contains("sled blob write"))
        );
        let ro = sled::Error::Io(std::io::Error::from_raw_os_error(libc::EROFS));
        assert!(matches!(DiskError::from(ro), DiskError::Fault(_)));
        let eio = sled::Error::Io(std::io::Error::from_raw_os_error(libc::EIO));
        assert!(DiskError::from(eio).is_disk());
        let bug = sled::Error::Unsupported("x".into());
        assert!(matches!(DiskError::from(bug), DiskError::Sled(_)));
    }
}
