//! The Flotilla wire contract.
//!
//! This crate owns every type that crosses a wire between Flotilla processes:
//! the node API, the agent API and the CLI all speak through it, so a type
//! changes in exactly one place. It holds the error envelope with its stable
//! codes ([`error`]), the exec stream framing ([`frame`]), timestamps and the
//! unit parsers the CLI and config share ([`units`]).
//!
//! It must never do I/O, spawn tasks or depend on a runtime: it is pure data
//! and pure functions, so that it can be fuzzed and used from anywhere.
#![forbid(unsafe_code)]

pub mod app;
pub mod coordinator;
pub mod error;
pub mod frame;
pub mod limits;
pub mod names;
pub mod time;
pub mod types;
pub mod units;
pub mod update;

pub use error::{ApiError, ErrorCode};
pub use frame::{ExitStatus, Frame, FrameDecoder, FrameError, FrameKind};
pub use time::Timestamp;
pub use types::*;
pub use update::{
    NodeUpdate, NodeUpdateRequest, NodeUpdateStatus, NodeVersion, SelfCheck, SelfTest, TestModeInfo, UpdateKind,
    UpdateOutcome, UpdateResult,
};
