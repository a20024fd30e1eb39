//! The coordinator: projects, changes, the project manager, runs and builds
//! (DESIGN §2, §5 "Project manager", "Builds survive crashes").
//!
//! Data flows one way: a notifier (the poller, a webhook, `try`) appends
//! events to a project's event box and wakes its manager; the manager's pure
//! [`pm::step`] turns the box into a new state and actions; the [`driver`]
//! commits both in one transaction (checking the state's `eversion`) and
//! carries the actions out from the outbox; run creation makes one build per
//! builder; an executor per build drives its sandbox on a node and stores
//! its log in order with the offset it reached.
//!
//! It owns its store (SQLite or PostgreSQL) and never touches a sandbox but
//! through a node's API. It must never run a build twice unnoticed: a retry
//! is always a new attempt with a reason.
#![forbid(unsafe_code)]

pub mod api;
pub mod build;
pub mod client;
pub mod config;
pub mod driver;
pub mod git;
pub mod gomote;
pub mod metrics;
pub mod pm;
pub mod poller;
pub mod runtime;
pub mod sched;
pub mod secrets;
pub mod store;
pub mod webhook;

pub use runtime::{Coordinator, CoordinatorConfig};

/// An error and its causes on one line (for logs and failures).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    flotilla_agent::http::error_chain(e)
}
