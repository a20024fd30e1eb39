//! The Flotilla name table: names → server addresses, with TTLs.
//!
//! This crate owns the *mount table* and everything that keeps it:
//!
//! - [`name`]: checked names (`nodes/n1`) and glob patterns (`nodes/*`,
//!   `apps/...`), the only way a string becomes a key.
//! - [`store`]: the [`Store`] trait with [`MemoryStore`] (embedded, for
//!   `flotilla dev`) and [`EtcdStore`] (shared; TTLs are etcd leases).
//!   Resolve answers with the servers at the longest mounted prefix of a
//!   name and the rest of the name; watch streams mounts coming and going.
//! - [`server`]: the HTTP API (`/v1/mounts`, `/v1/resolve/{name}`,
//!   `/v1/glob/{pattern}`, `/healthz`, `/metrics`, `/openapi.json`) over
//!   any store, reads open and writes behind a bearer token ([`auth`]);
//!   [`client`]: its typed client [`NamesClient`].
//! - [`publisher`]: the [`Publisher`] actor that keeps a process's
//!   (name, server) mounts alive, refreshing them every period and
//!   unmounting them on stop, through the [`NameTable`] trait (the HTTP
//!   client or a store directly).
//! - [`testing`]: a throwaway etcd on loopback for tests and the bench.
//!
//! It must never decide *what* a process publishes (nodes publish
//! `nodes/<id>`, apps their instances: that is their business), never hold
//! a lock across a call to a store, and never let a hung store hang its
//! callers: every etcd request and publisher call has a deadline. Wire
//! types live in `flotilla_api::names`.
#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod name;
pub mod publisher;
pub mod server;
pub mod store;
pub mod testing;

/// The etcd client this crate is built on, re-exported so that tools
/// talking to the same etcd (the bench, tests) use the same version.
pub use etcd_client;

pub use auth::{TokenError, WriteAuth};
pub use client::NamesClient;
pub use name::{Name, NameError, Pattern};
pub use publisher::{NameTable, Publisher, PublisherConfig, StoreTable, TableError};
pub use server::{ServerHandle, router, serve};
pub use store::{EtcdConfig, EtcdStore, EtcdTls, MemoryStore, MountEvent, Store, StoreError, Watch};
