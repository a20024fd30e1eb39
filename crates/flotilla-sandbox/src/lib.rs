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
