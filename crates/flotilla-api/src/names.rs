//! Name table wire types (DESIGN §4, "Name table"): mounts, resolve, glob.
//!
//! A *name* is a `/`-separated path such as `nodes/n1`; a *server* is an
//! opaque address string (`http://10.0.0.7:7000`, `unix:///run/x.sock`).
//! A mount says "this server answers for this name until its TTL runs
//! out"; several servers may be mounted at one name (publishers on several
//! machines coexist). Resolving a name finds the longest mounted prefix and
//! returns its servers plus the rest of the name, which the caller hands to
//! the server it picks.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest name or pattern accepted, in bytes: far above any real
/// `apps/<app>/<installation>/<instance>` path, and small enough that a
/// key with its server stays well inside etcd's request limit.
pub const MAX_NAME_BYTES: usize = 512;

/// Most elements in a name or pattern; keeps resolve (one lookup per
/// prefix) and glob matching bounded.
pub const MAX_NAME_ELEMENTS: usize = 32;

/// Longest server address accepted, in bytes.
pub const MAX_SERVER_BYTES: usize = 1024;

/// Longest TTL a mount may ask for. Publishers refresh every period, so a
/// long TTL only keeps a dead server's name around after a crash; a day is
/// the most any caller has a reason for.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Body of `PUT /v1/mounts`. Mounting the same (name, server) again
/// replaces its TTL: that is how publishers refresh, and it makes the call
/// idempotent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    /// The name to mount at, e.g. `nodes/n1`.
    pub name: String,
    /// The address that answers for the name.
    pub server: String,
    /// Seconds until the mount expires unless mounted again. Fractions are
    /// kept by the in-memory table; the etcd table rounds up to whole seconds.
    pub ttl_s: f64,
}

/// Answer to `PUT /v1/mounts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MountResponse {
    pub name: String,
    pub server: String,
    /// The TTL the table applied: at least the one asked for (etcd rounds up
    /// to whole seconds).
    pub ttl_s: f64,
}

/// Body of `DELETE /v1/mounts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnmountRequest {
    pub name: String,
    pub server: String,
}

/// Answer to `DELETE /v1/mounts`. Unmounting what is not mounted succeeds
/// with `removed: false`, so retries are harmless.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UnmountResponse {
    pub removed: bool,
}

/// Answer to `GET /v1/resolve/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Resolution {
    /// The name that was resolved (normalised: no leading or trailing `/`).
    pub name: String,
    /// The longest prefix of `name` that has live mounts.
    pub mount_point: String,
    /// The servers mounted at `mount_point`, sorted.
    pub servers: Vec<String>,
    /// What is left of `name` after `mount_point` (empty when the name
    /// itself is mounted); the caller asks the server for this.
    pub suffix: String,
}

/// One server at a mount point, as glob lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MountedServer {
    pub server: String,
    /// Seconds left before the mount expires (by the table's clock; the etcd
    /// table may keep it up to a second or a tenth of the TTL longer).
    pub expires_in_s: f64,
}

/// One mounted name and its live servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MountEntry {
    pub name: String,
    pub servers: Vec<MountedServer>,
}

/// One page of `GET /v1/glob/{pattern}`, sorted by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GlobPage {
    pub entries: Vec<MountEntry>,
    /// Pass as `page_token` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_refuse_unknown_fields() {
        let ok: MountRequest = serde_json::from_str(r#"{"name":"a","server":"s","ttl_s":1.5}"#).unwrap();
        assert_eq!(ok.ttl_s, 1.5);
        assert!(serde_json::from_str::<MountRequest>(r#"{"name":"a","server":"s","ttl_s":1,"x":1}"#).is_err());
        assert!(serde_json::from_str::<UnmountRequest>(r#"{"name":"a","server":"s","ttl_s":1}"#).is_err());
    }

    #[test]
    fn last_glob_page_has_no_token() {
        let p = GlobPage { entries: vec![], next_page_token: None };
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"entries":[]}"#);
    }
}
