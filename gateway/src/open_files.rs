//! The process's open-file limit, which bounds transparent mode: every device holds its
//! own TCP connection to the broker, and each connection is an open file.
//!
//! At start the gateway raises its soft limit to the hard one (systemd's default soft
//! limit is 1,024 whatever the hard limit is), keeps [`RESERVED`] files for everything
//! else, and allows the rest as broker connections unless `broker.max_connections` says
//! otherwise.

use rlimit::Resource;

/// Files kept for everything but broker connections: listeners, serial ports, the
/// metrics endpoint and its clients, the broker probe, configuration and TLS files, the
/// runtime's own descriptors.
pub const RESERVED: u64 = 64;

/// The open-file limit after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// The soft limit in force.
    pub soft: u64,
    /// The hard limit (the most the soft one can be raised to).
    pub hard: u64,
    /// The soft limit before [`raise`].
    pub was: u64,
}

impl OpenFileLimit {
    /// Broker connections this limit allows: the soft limit less [`RESERVED`].
    pub fn connections(&self) -> usize {
        usize::try_from(self.soft.saturating_sub(RESERVED)).unwrap_or(usize::MAX)
    }
}

/// Raises the soft open-file limit to the hard one, and reports both. `None` when the
/// limit cannot be read; a failed raise keeps the old soft limit.
pub fn raise() -> Option<OpenFileLimit> {
    let (soft, hard) = Resource::NOFILE.get().ok()?;
    let raised = rlimit::increase_nofile_limit(hard).unwrap_or(soft);
    Some(OpenFileLimit {
        soft: raised.max(soft),
        hard,
        was: soft,
    })
}

/// The broker connection limit: `configured`, or what `limit` allows (unbounded when
/// the open-file limit is unknown).
pub fn max_connections(configured: Option<usize>, limit: Option<OpenFileLimit>) -> usize {
    match (configured, limit) {
        (Some(n), _) => n,
        (None, Some(l)) => l.connections(),
        (None, None) => usize::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_less_the_reserve_unless_configured() {
        let l = OpenFileLimit {
            soft: 20_000,
            hard: 20_000,
            was: 1_024,
        };
        assert_eq!(l.connections(), 19_936);
        assert_eq!(max_connections(None, Some(l)), 19_936);
        assert_eq!(max_connections(Some(5), Some(l)), 5);
        assert_eq!(max_connections(None, None), usize::MAX);
        let tiny = OpenFileLimit {
            soft: 10,
            hard: 10,
            was: 10,
        };
        assert_eq!(tiny.connections(), 0);
    }

    #[test]
    fn raise_reads_this_process_limit_and_never_lowers_it() {
        let l = raise().expect("Linux has RLIMIT_NOFILE");
        assert!(l.soft >= l.was);
        assert!(l.soft <= l.hard);
        let (soft, _) = Resource::NOFILE.get().expect("readable");
        assert_eq!(soft, l.soft);
    }
}
