//! The mount table's storage, behind one trait with two implementations:
//! [`MemoryStore`] (embedded, for `flotilla dev` and tests) and
//! [`EtcdStore`] (shared, TTLs as etcd leases).
//!
//! Both keep the same model: a set of (name, server) mounts, each with an
//! expiry. Mounting an existing pair replaces its expiry. Resolve looks at
//! the prefixes of a name longest first and answers with the servers of
//! the first one that has live mounts; glob lists live mounts whose names
//! match a pattern, sorted by name then server; watch streams new and
//! removed (or expired) mounts. The shared suite in
//! `tests/store.rs` runs against both, so they cannot drift apart.

mod etcd;
mod memory;

use std::time::Duration;

use async_trait::async_trait;
use flotilla_agent::http::error_chain;
use flotilla_api::names::{MountEntry, Resolution};
use flotilla_api::{ApiError, ErrorCode};

use crate::name::{Name, NameError, Pattern};

pub use etcd::{EtcdConfig, EtcdStore, EtcdTls};
pub use memory::MemoryStore;

/// A mount table. Every method is safe to call concurrently; mount and
/// unmount are idempotent.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `memory` or `etcd`, for logs and metrics.
    fn kind(&self) -> &'static str;

    /// Mounts `server` at `name` until `ttl` has passed, replacing the
    /// expiry of an existing mount of the pair. Returns the TTL applied,
    /// which is at least `ttl` (etcd rounds up to whole seconds).
    async fn mount(&self, name: &Name, server: &str, ttl: Duration) -> Result<Duration, StoreError>;

    /// Removes the pair; `Ok(false)` if it was not mounted.
    async fn unmount(&self, name: &Name, server: &str) -> Result<bool, StoreError>;

    /// The servers at the longest prefix of `name` with live mounts.
    async fn resolve(&self, name: &Name) -> Result<Resolution, StoreError>;

    /// Every live mount whose name matches, sorted by name.
    async fn glob(&self, pattern: &Pattern) -> Result<Vec<MountEntry>, StoreError>;

    /// Whether the store can serve requests now (etcd reachable).
    async fn health(&self) -> Result<(), StoreError>;

    /// Changes to mounts whose names match `pattern`, from now on: a new
    /// (name, server) pair, and a pair unmounted or expired. Refreshes of a
    /// live mount are not changes. The watch is in place when this
    /// returns. The channel closes if the store falls too far behind the
    /// reader or loses its connection: re-list with `glob` and watch again.
    async fn watch(&self, pattern: &Pattern) -> Result<Watch, StoreError>;
}

/// Events of one [`Store::watch`].
pub type Watch = tokio::sync::mpsc::Receiver<MountEvent>;

/// Events buffered per watch before the watch is closed as too slow.
pub const WATCH_BUFFER: usize = 1024;

/// A change in the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountEvent {
    Mounted {
        name: String,
        server: String,
    },
    /// Unmounted, or expired.
    Unmounted {
        name: String,
        server: String,
    },
}

impl MountEvent {
    pub fn name(&self) -> &str {
        match self {
            MountEvent::Mounted { name, .. } | MountEvent::Unmounted { name, .. } => name,
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Invalid(#[from] NameError),
    #[error("nothing is mounted at {name:?} or any prefix of it")]
    NotFound { name: String },
    #[error("etcd {op} failed")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("stored entry {key:?} is not a mount record")]
    Corrupt { key: String },
    #[error("reading {path} for TLS to etcd")]
    TlsFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The table cannot be reached or refused for a reason of its own (also
    /// what test doubles return to inject failures).
    #[error("name table unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// The one place a store error becomes an error envelope.
    pub fn to_api(&self) -> ApiError {
        let code = match self {
            StoreError::Invalid(_) => ErrorCode::InvalidArgument,
            StoreError::NotFound { .. } => ErrorCode::NotFound,
            StoreError::Etcd { .. } | StoreError::Unavailable(_) | StoreError::TlsFile { .. } => ErrorCode::NotReady,
            StoreError::Corrupt { .. } => ErrorCode::Internal,
        };
        ApiError::new(code, error_chain(self))
    }
}

/// Builds a resolution from the prefix that matched.
fn resolution(name: &Name, mount_point: &str, suffix: &str, mut servers: Vec<String>) -> Resolution {
    servers.sort();
    servers.dedup();
    Resolution { name: name.as_str().into(), mount_point: mount_point.into(), servers, suffix: suffix.into() }
}

/// Whole seconds, rounded up, at least one (etcd's lease granularity).
fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_codes() {
        assert_eq!(StoreError::NotFound { name: "a".into() }.to_api().code, ErrorCode::NotFound);
        assert_eq!(StoreError::Invalid(NameError::Empty).to_api().code, ErrorCode::InvalidArgument);
        assert_eq!(StoreError::Unavailable("x".into()).to_api().code, ErrorCode::NotReady);
        assert_eq!(StoreError::Corrupt { key: "k".into() }.to_api().http_status(), 500);
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1000)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::ZERO), 1);
    }
}
