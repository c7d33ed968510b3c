//! The shared cache's operations, and the one byte each is written as: the
//! Redis script's `ARGV[6]`, the first field of an invalidation event
//! (`p`, `d`, `g`) and the first byte of an outage-journal record (`d`,
//! `g`). Those bytes are on the wire between nodes of different versions
//! and on disk across restarts: never change one.

/// What one call of the cache's Redis script does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Read a value (and maybe take its fill lease).
    Fetch,
    /// Write a value (checking a lease when given).
    Put,
    /// Delete one key.
    Delete,
    /// Purge a namespace (a new generation).
    Purge,
    /// Nothing: the probe.
    Probe,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Operation::Fetch,
        Operation::Put,
        Operation::Delete,
        Operation::Purge,
        Operation::Probe,
    ];

    /// The operation's byte on the wire and on disk.
    pub fn byte(self) -> u8 {
        match self {
            Operation::Fetch => b'f',
            Operation::Put => b'p',
            Operation::Delete => b'd',
            Operation::Purge => b'g',
            Operation::Probe => b'n',
        }
    }

    /// The inverse of [`Operation::byte`]; `None` for any other byte.
    pub fn from_byte(b: u8) -> Option<Operation> {
        Operation::ALL.into_iter().find(|op| op.byte() == b)
    }

    /// Whether the operation names a key (a purge names only a namespace).
    pub fn names_key(self) -> bool {
        self != Operation::Purge
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_reads_back_as_its_operation() {
        for op in Operation::ALL {
            assert_eq!(Operation::from_byte(op.byte()), Some(op));
        }
        assert_eq!(Operation::from_byte(b'x'), None);
        // The formats on the wire and on disk.
        assert_eq!(
            Operation::ALL.map(Operation::byte),
            [b'f', b'p', b'd', b'g', b'n']
        );
    }
}
