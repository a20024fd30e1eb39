//! Flotilla's sandbox backends.
//!
//! This crate owns how a sandbox is made and unmade on a host: Linux
//! namespaces and mounts ([`process`]), cgroup limits for v1 and v2 behind
//! one manager ([`cgroup`]), the seccomp policy ([`seccomp`]), the egress policy of outbound
//! sandboxes ([`egress`]) and the root
//! filesystems sandboxes start from ([`image`]).
//!
//! It is the only crate in the workspace allowed `unsafe` code, and all of
//! it lives in [`sys`], each block with a `SAFETY:` comment. It must never
//! keep sandbox state of its own beyond a running handle: the registry, the
//! store and the locks belong to `flotilla-node`.

pub mod cgroup;
pub mod egress;
pub mod image;
pub mod process;
pub mod seccomp;
pub mod sys;

pub use cgroup::{CgroupManager, Limits};
pub use image::Image;
pub use process::{BootError, ExitInfo, ProcessBackend, ProcessConfig, Running, SandboxSpec};

/// A stable hash of a node's data directory (FNV-1a of its canonical path:
/// the same across runs and Rust versions, unlike `DefaultHasher`), from
/// which each node's cgroup group and egress group are named, so that two
/// nodes on one machine keep apart.
pub fn home_hash(home: &std::path::Path) -> u64 {
    let canon = home.canonicalize().unwrap_or_else(|_| home.to_path_buf());
    canon
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}
