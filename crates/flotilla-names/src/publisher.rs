//! The publisher: keeps a process's (name, server) mounts alive in a name
//! table (seed 004).
//!
//! One tokio task owns all the state; the [`Publisher`] handle only sends it
//! commands over a channel and waits for each to be done, so no lock is
//! ever held across a call to the table. The task:
//!
//! 1. mounts every (name, server) pair when a name or server is added, with
//!    TTL = period + slack, so a mount outlives one missed refresh;
//! 2. every period, mounts every pair again (refreshing its TTL) and
//!    retries each unmount that failed: a pair whose unmount failed stays
//!    in the state, wanted unmounted, until the table says it is gone;
//! 3. keeps, per pair, when it was last mounted and unmounted and the error
//!    of each, for [`Publisher::debug_string`], [`Publisher::status`] and
//!    the counters of [`Publisher::metrics`];
//! 4. on [`Publisher::stop`] (or when every handle is dropped) acknowledges
//!    at once, stops taking commands, and unmounts everything, retrying
//!    each failed unmount until it succeeds or the mount's TTL has run out
//!    anyway; then [`Publisher::wait_for_stop`] returns.
//!
//! After `stop` every call is a no-op: the task has closed its channel, so
//! nothing queued behind the stop, and nothing sent later, is ever mounted.
//!
//! The table is reached through [`NameTable`], implemented by the HTTP
//! [`NamesClient`] and by [`StoreTable`] over any [`Store`], so a process
//! can publish to a remote table or to one it embeds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_agent::http::{ClientError, error_chain};
use flotilla_api::Timestamp;
use flotilla_api::names::Resolution;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::client::NamesClient;
use crate::name::{Name, NameError, check_server};
use crate::store::{Store, StoreError};

/// Added to the period to make each mount's TTL, so that a refresh that is
/// late or fails once does not let the name lapse.
pub const MOUNT_TTL_SLACK: Duration = Duration::from_secs(20);

/// Table calls in flight at once during a refresh: enough that a process
/// with many names refreshes in one round trip's time, few enough not to
/// flood the table.
const MAX_CONCURRENT_CALLS: usize = 16;

/// Commands waiting for the task; a full queue makes callers wait.
const COMMAND_QUEUE: usize = 64;

/// What the publisher needs from a name table.
#[async_trait]
pub trait NameTable: Send + Sync + 'static {
    async fn mount(&self, name: &str, server: &str, ttl: Duration) -> Result<(), TableError>;
    async fn unmount(&self, name: &str, server: &str) -> Result<(), TableError>;
    async fn resolve(&self, name: &str) -> Result<Resolution, TableError>;
    /// Where the table is (`http://host:port`, `memory`), to root the names
    /// [`Publisher::published`] returns.
    fn root(&self) -> String;
}

/// Why a name table call failed.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("the name table did not answer within {0:?}")]
    Timeout(Duration),
}

#[async_trait]
impl NameTable for NamesClient {
    async fn mount(&self, name: &str, server: &str, ttl: Duration) -> Result<(), TableError> {
        NamesClient::mount(self, name, server, ttl).await?;
        Ok(())
    }

    async fn unmount(&self, name: &str, server: &str) -> Result<(), TableError> {
        NamesClient::unmount(self, name, server).await?;
        Ok(())
    }

    async fn resolve(&self, name: &str) -> Result<Resolution, TableError> {
        Ok(NamesClient::resolve(self, name).await?)
    }

    fn root(&self) -> String {
        self.http().endpoint().to_string()
    }
}

/// A [`Store`] used directly as a publisher's name table (an embedded
/// table, or etcd without the HTTP hop).
#[derive(Clone)]
pub struct StoreTable {
    store: Arc<dyn Store>,
}

impl StoreTable {
    pub fn new(store: Arc<dyn Store>) -> StoreTable {
        StoreTable { store }
    }
}

impl std::fmt::Debug for StoreTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTable").field("kind", &self.store.kind()).finish()
    }
}

#[async_trait]
impl NameTable for StoreTable {
    async fn mount(&self, name: &str, server: &str, ttl: Duration) -> Result<(), TableError> {
        self.store.mount(&Name::parse(name)?, server, ttl).await?;
        Ok(())
    }

    async fn unmount(&self, name: &str, server: &str) -> Result<(), TableError> {
        self.store.unmount(&Name::parse(name)?, server).await?;
        Ok(())
    }

    async fn resolve(&self, name: &str) -> Result<Resolution, TableError> {
        Ok(self.store.resolve(&Name::parse(name)?).await?)
    }

    fn root(&self) -> String {
        self.store.kind().to_string()
    }
}

/// How a publisher behaves.
#[derive(Debug, Clone, Copy)]
pub struct PublisherConfig {
    /// How often every mount is refreshed and failed unmounts retried.
    pub period: Duration,
    /// Added to `period` to make each mount's TTL.
    pub slack: Duration,
    /// Deadline of each table call, so a hung table delays a refresh by at
    /// most this (and never blocks `stop` for longer).
    pub call_timeout: Duration,
}

impl PublisherConfig {
    /// `period`, with [`MOUNT_TTL_SLACK`] and a call timeout of one period
    /// clamped to 1..=10 s: short enough that a hung table delays the next
    /// refresh by little, long enough that a busy etcd (a mount may need a
    /// lease grant and a put, each an fsync) is not cut off every time.
    pub fn new(period: Duration) -> PublisherConfig {
        let call_timeout = period.clamp(Duration::from_secs(1), Duration::from_secs(10));
        PublisherConfig { period, slack: MOUNT_TTL_SLACK, call_timeout }
    }

    pub fn with_slack(mut self, slack: Duration) -> PublisherConfig {
        self.slack = slack;
        self
    }

    pub fn with_call_timeout(mut self, timeout: Duration) -> PublisherConfig {
        self.call_timeout = timeout;
        self
    }

    /// The TTL of every mount.
    pub fn ttl(&self) -> Duration {
        self.period + self.slack
    }
}

/// Whether a pair should be in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Mounted,
    /// Removed by `remove_name`/`remove_server` or `stop`; kept until the
    /// unmount succeeds.
    Unmounted,
}

/// What the publisher knows about one (name, server) pair.
#[derive(Debug, Clone, PartialEq)]
pub struct MountStatus {
    pub name: String,
    pub server: String,
    pub want: Want,
    pub last_mount: Option<Timestamp>,
    pub last_mount_error: Option<String>,
    pub last_unmount: Option<Timestamp>,
    pub last_unmount_error: Option<String>,
}

/// Counters since the publisher started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublisherMetrics {
    pub mounts_ok: u64,
    pub mounts_failed: u64,
    pub unmounts_ok: u64,
    pub unmounts_failed: u64,
}

impl PublisherMetrics {
    /// The counters in the Prometheus text format, for a process's
    /// `/metrics`.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::from(
            "# HELP flotilla_publisher_calls_total Name table calls made by this process's publisher.\n\
             # TYPE flotilla_publisher_calls_total counter\n",
        );
        for (op, outcome, n) in [
            ("mount", "ok", self.mounts_ok),
            ("mount", "error", self.mounts_failed),
            ("unmount", "ok", self.unmounts_ok),
            ("unmount", "error", self.unmounts_failed),
        ] {
            out.push_str(&format!("flotilla_publisher_calls_total{{op=\"{op}\",outcome=\"{outcome}\"}} {n}\n"));
        }
        out
    }
}

#[derive(Debug, Default)]
struct Counters {
    mounts_ok: AtomicU64,
    mounts_failed: AtomicU64,
    unmounts_ok: AtomicU64,
    unmounts_failed: AtomicU64,
}

enum Cmd {
    AddServer(String, oneshot::Sender<()>),
    RemoveServer(String, oneshot::Sender<()>),
    AddName(String, oneshot::Sender<()>),
    RemoveName(String, oneshot::Sender<()>),
    /// The names and servers, for `published` to resolve outside the task.
    Snapshot(oneshot::Sender<(Vec<String>, Vec<String>)>),
    Debug(oneshot::Sender<String>),
    Status(oneshot::Sender<Vec<MountStatus>>),
    Stop(oneshot::Sender<()>),
}

/// A handle on a publisher task. Clones share the task; the task stops
/// (and unmounts everything) when `stop` is called or every handle is gone.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Cmd>,
    done: watch::Receiver<bool>,
    counters: Arc<Counters>,
    table: Arc<dyn NameTable>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("table", &self.table.root()).finish_non_exhaustive()
    }
}

impl Publisher {
    /// Starts a publisher task on the current tokio runtime.
    pub fn new(table: Arc<dyn NameTable>, config: PublisherConfig) -> Publisher {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (done_tx, done) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let state = PubState {
            table: table.clone(),
            config,
            deadline: Instant::now() + config.period,
            names: Vec::new(),
            servers: Vec::new(),
            mounts: BTreeMap::new(),
            counters: counters.clone(),
        };
        tokio::spawn(run(state, rx, done_tx));
        Publisher { tx, done, counters, table }
    }

    /// Sends a command and waits for its answer; `None` once stopped.
    async fn call<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(cmd(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Adds a server: every name is mounted to it. Returns once the mounts
    /// were tried (their errors are in `status`).
    pub async fn add_server(&self, server: &str) -> Result<(), NameError> {
        check_server(server)?;
        self.call(|tx| Cmd::AddServer(server.into(), tx)).await;
        Ok(())
    }

    /// Removes a server: its mounts are unmounted (and retried until gone).
    pub async fn remove_server(&self, server: &str) {
        self.call(|tx| Cmd::RemoveServer(server.into(), tx)).await;
    }

    /// Adds a name: it is mounted to every server.
    pub async fn add_name(&self, name: &str) -> Result<(), NameError> {
        let name = Name::parse(name)?;
        self.call(|tx| Cmd::AddName(name.to_string(), tx)).await;
        Ok(())
    }

    /// Removes a name: its mounts are unmounted (and retried until gone).
    pub async fn remove_name(&self, name: &str) {
        if let Ok(name) = Name::parse(name) {
            self.call(|tx| Cmd::RemoveName(name.to_string(), tx)).await;
        }
    }

    /// The names under which the table now returns at least one of this
    /// publisher's servers, rooted at the table (`http://host:port/name`).
    /// Names the table does not resolve to us (yet) are left out.
    pub async fn published(&self) -> Vec<String> {
        let Some((names, servers)) = self.call(Cmd::Snapshot).await else {
            return Vec::new();
        };
        let root = self.table.root();
        let mut out = Vec::new();
        for name in names {
            match self.table.resolve(&name).await {
                Ok(r) if r.suffix.is_empty() && r.servers.iter().any(|s| servers.contains(s)) => {
                    out.push(format!("{root}/{name}"));
                }
                Ok(_) => tracing::debug!(%name, "published: the table does not list our servers at the name"),
                Err(e) => tracing::warn!(%name, error = %error_chain(&e), "published: cannot resolve"),
            }
        }
        out
    }

    /// A multi-line description of the state, for people debugging;
    /// `stopped` once stopped.
    pub async fn debug_string(&self) -> String {
        self.call(Cmd::Debug).await.unwrap_or_else(|| "stopped".into())
    }

    /// Every pair the publisher tracks, sorted; empty once stopped.
    pub async fn status(&self) -> Vec<MountStatus> {
        self.call(Cmd::Status).await.unwrap_or_default()
    }

    /// Call counters (they keep counting through the final unmounts).
    pub fn metrics(&self) -> PublisherMetrics {
        let c = &self.counters;
        PublisherMetrics {
            mounts_ok: c.mounts_ok.load(Ordering::Relaxed),
            mounts_failed: c.mounts_failed.load(Ordering::Relaxed),
            unmounts_ok: c.unmounts_ok.load(Ordering::Relaxed),
            unmounts_failed: c.unmounts_failed.load(Ordering::Relaxed),
        }
    }

    /// Stops publishing: once this returns nothing new is ever mounted, and
    /// unmounting everything has begun. Irreversible; repeating it, or any
    /// other call afterwards, does nothing.
    pub async fn stop(&self) {
        self.call(Cmd::Stop).await;
    }

    /// Waits until the unmounting started by `stop` is finished. (Without a
    /// `stop`, it waits until every handle is dropped and the task ends.)
    pub async fn wait_for_stop(&self) {
        let mut done = self.done.clone();
        // An error means the task is gone, which also means it is done.
        let _ = done.wait_for(|d| *d).await;
    }
}

/// The task's loop: commands and the refresh timer until stopped.
async fn run(mut state: PubState, mut rx: mpsc::Receiver<Cmd>, done: watch::Sender<bool>) {
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Cmd::Stop(ack)) => {
                    // Closing drops whatever is queued behind the stop: those
                    // callers see a no-op, and nothing else gets in.
                    rx.close();
                    let _ = ack.send(());
                    break;
                }
                Some(cmd) => state.handle(cmd).await,
            },
            () = tokio::time::sleep_until(state.deadline) => state.sync().await,
        }
    }
    drop(rx);
    state.unmount_all().await;
    let _ = done.send(true);
}

#[derive(Debug)]
struct Pair {
    want: Want,
    last_mount: Option<Timestamp>,
    /// When the last mount was attempted: the table may hold the mount until
    /// this plus the TTL, whatever the answer was.
    last_mount_attempt: Option<Instant>,
    last_mount_error: Option<String>,
    last_unmount: Option<Timestamp>,
    last_unmount_error: Option<String>,
}

impl Pair {
    fn new() -> Pair {
        Pair {
            want: Want::Mounted,
            last_mount: None,
            last_mount_attempt: None,
            last_mount_error: None,
            last_unmount: None,
            last_unmount_error: None,
        }
    }
}

type Key = (String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Mount,
    Unmount,
}

/// The task's state. Not shared: only `run` touches it.
struct PubState {
    table: Arc<dyn NameTable>,
    config: PublisherConfig,
    /// When the next refresh is due.
    deadline: Instant,
    /// In the order added.
    names: Vec<String>,
    servers: Vec<String>,
    mounts: BTreeMap<Key, Pair>,
    counters: Arc<Counters>,
}

impl PubState {
    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::AddServer(server, done) => {
                if !self.servers.contains(&server) {
                    self.servers.push(server.clone());
                    let keys: Vec<Key> = self.names.iter().map(|n| (n.clone(), server.clone())).collect();
                    self.want(keys, Want::Mounted).await;
                }
                let _ = done.send(());
            }
            Cmd::RemoveServer(server, done) => {
                if let Some(i) = self.servers.iter().position(|s| *s == server) {
                    self.servers.remove(i);
                    let keys: Vec<Key> = self.names.iter().map(|n| (n.clone(), server.clone())).collect();
                    self.want(keys, Want::Unmounted).await;
                }
                let _ = done.send(());
            }
            Cmd::AddName(name, done) => {
                if !self.names.contains(&name) {
                    self.names.push(name.clone());
                    let keys: Vec<Key> = self.servers.iter().map(|s| (name.clone(), s.clone())).collect();
                    self.want(keys, Want::Mounted).await;
                }
                let _ = done.send(());
            }
            Cmd::RemoveName(name, done) => {
                if let Some(i) = self.names.iter().position(|n| *n == name) {
                    self.names.remove(i);
                    let keys: Vec<Key> = self.servers.iter().map(|s| (name.clone(), s.clone())).collect();
                    self.want(keys, Want::Unmounted).await;
                }
                let _ = done.send(());
            }
            Cmd::Snapshot(tx) => {
                let _ = tx.send((self.names.clone(), self.servers.clone()));
            }
            Cmd::Debug(tx) => {
                let _ = tx.send(self.debug_string());
            }
            Cmd::Status(tx) => {
                let _ = tx.send(self.status());
            }
            Cmd::Stop(tx) => {
                // `run` handles Stop itself; answering keeps this total.
                let _ = tx.send(());
            }
        }
    }

    /// Sets what is wanted for `keys` and acts on it now.
    async fn want(&mut self, keys: Vec<Key>, want: Want) {
        let mut calls = Vec::new();
        for key in keys {
            match want {
                Want::Mounted => {
                    self.mounts.entry(key.clone()).or_insert_with(Pair::new).want = Want::Mounted;
                    calls.push((key, Call::Mount));
                }
                Want::Unmounted => {
                    if let Some(p) = self.mounts.get_mut(&key) {
                        p.want = Want::Unmounted;
                        calls.push((key, Call::Unmount));
                    }
                }
            }
        }
        self.perform(calls).await;
    }

    /// Refreshes every wanted mount and retries every pending unmount.
    async fn sync(&mut self) {
        self.deadline = Instant::now() + self.config.period;
        let calls: Vec<(Key, Call)> = self
            .mounts
            .iter()
            .map(|(k, p)| {
                let call = match p.want {
                    Want::Mounted => Call::Mount,
                    Want::Unmounted => Call::Unmount,
                };
                (k.clone(), call)
            })
            .collect();
        self.perform(calls).await;
    }

    /// Unmounts everything, retrying failures until each succeeds or its
    /// mount has expired by itself.
    async fn unmount_all(&mut self) {
        for p in self.mounts.values_mut() {
            p.want = Want::Unmounted;
        }
        let ttl = self.config.ttl();
        // Between retries: short enough to finish promptly once the table is
        // back, long enough not to spin against a table that is down.
        let pause = (self.config.period / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            let now = Instant::now();
            // A pair never mounted, or whose TTL has run out, is gone already.
            self.mounts.retain(|_, p| p.last_mount_attempt.is_some_and(|at| at + ttl > now));
            if self.mounts.is_empty() {
                return;
            }
            let calls: Vec<(Key, Call)> = self.mounts.keys().map(|k| (k.clone(), Call::Unmount)).collect();
            self.perform(calls).await;
            if self.mounts.is_empty() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Makes the calls, a bounded number at a time, each with the call
    /// timeout, and records the outcomes.
    async fn perform(&mut self, calls: Vec<(Key, Call)>) {
        if calls.is_empty() {
            return;
        }
        let ttl = self.config.ttl();
        let timeout = self.config.call_timeout;
        let table = self.table.clone();
        let results: Vec<(Key, Call, Instant, Result<(), TableError>)> = futures_util::stream::iter(calls)
            .map(|(key, call)| {
                let table = table.clone();
                async move {
                    let started = Instant::now();
                    let fut = async {
                        match call {
                            Call::Mount => table.mount(&key.0, &key.1, ttl).await,
                            Call::Unmount => table.unmount(&key.0, &key.1).await,
                        }
                    };
                    let r = tokio::time::timeout(timeout, fut).await.unwrap_or(Err(TableError::Timeout(timeout)));
                    (key, call, started, r)
                }
            })
            .buffer_unordered(MAX_CONCURRENT_CALLS)
            .collect()
            .await;
        for (key, call, started, result) in results {
            self.record(key, call, started, result);
        }
    }

    fn record(&mut self, key: Key, call: Call, started: Instant, result: Result<(), TableError>) {
        let err = result.as_ref().err().map(|e| error_chain(e));
        let c = &self.counters;
        match (call, &err) {
            (Call::Mount, None) => c.mounts_ok.fetch_add(1, Ordering::Relaxed),
            (Call::Mount, Some(_)) => c.mounts_failed.fetch_add(1, Ordering::Relaxed),
            (Call::Unmount, None) => c.unmounts_ok.fetch_add(1, Ordering::Relaxed),
            (Call::Unmount, Some(_)) => c.unmounts_failed.fetch_add(1, Ordering::Relaxed),
        };
        if let Some(e) = &err {
            let verb = match call {
                Call::Mount => "mount",
                Call::Unmount => "unmount",
            };
            tracing::warn!(name = %key.0, server = %key.1, error = %e, "publisher: {verb} failed");
        }
        let Some(pair) = self.mounts.get_mut(&key) else {
            return;
        };
        match call {
            Call::Mount => {
                pair.last_mount = Some(Timestamp::now());
                pair.last_mount_attempt = Some(started);
                pair.last_mount_error = err;
            }
            Call::Unmount => {
                pair.last_unmount = Some(Timestamp::now());
                let gone = err.is_none();
                pair.last_unmount_error = err;
                // Only a pair still wanted unmounted is forgotten: one added
                // back while its unmount was in flight stays.
                if gone && pair.want == Want::Unmounted {
                    self.mounts.remove(&key);
                }
            }
        }
    }

    fn status(&self) -> Vec<MountStatus> {
        self.mounts
            .iter()
            .map(|((name, server), p)| MountStatus {
                name: name.clone(),
                server: server.clone(),
                want: p.want,
                last_mount: p.last_mount,
                last_mount_error: p.last_mount_error.clone(),
                last_unmount: p.last_unmount,
                last_unmount_error: p.last_unmount_error.clone(),
            })
            .collect()
    }

    fn debug_string(&self) -> String {
        let next = self.deadline.saturating_duration_since(Instant::now());
        let mut lines = vec![
            format!(
                "Publisher table:{} period:{:?} ttl:{:?} next refresh in:{:?}",
                self.table.root(),
                self.config.period,
                self.config.ttl(),
                next
            ),
            format!("names: {:?}", self.names),
            format!("servers: {:?}", self.servers),
            "mounts:".to_string(),
        ];
        let show = |t: Option<Timestamp>, e: &Option<String>| {
            let t = t.map_or("never".to_string(), |t| t.to_string());
            match e {
                Some(e) => format!("{t}, error: {e}"),
                None => t,
            }
        };
        for ((name, server), p) in &self.mounts {
            lines.push(format!(
                "  [{name}, {server}] want:{:?} mount({}) unmount({})",
                p.want,
                show(p.last_mount, &p.last_mount_error),
                show(p.last_unmount, &p.last_unmount_error)
            ));
        }
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn table() -> (Arc<dyn Store>, Arc<dyn NameTable>) {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        (store.clone(), Arc::new(StoreTable::new(store)))
    }

    #[tokio::test(start_paused = true)]
    async fn mounts_every_pair_and_refreshes_on_the_period() {
        let (store, t) = table();
        let config = PublisherConfig::new(Duration::from_secs(10)).with_slack(Duration::from_secs(5));
        let p = Publisher::new(t, config);
        p.add_name("a").await.unwrap();
        p.add_server("s1").await.unwrap();
        p.add_server("s2").await.unwrap();
        p.add_name("b").await.unwrap();
        let n = |s: &str| Name::parse(s).unwrap();
        assert_eq!(store.resolve(&n("a")).await.unwrap().servers, ["s1", "s2"]);
        assert_eq!(store.resolve(&n("b/x")).await.unwrap().servers, ["s1", "s2"]);
        // Far past one TTL: only refreshes keep the names.
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert_eq!(store.resolve(&n("b")).await.unwrap().servers, ["s1", "s2"]);
        assert_eq!(p.published().await, ["memory/a", "memory/b"]);
        assert!(p.metrics().mounts_ok >= 4 * 10, "{:?}", p.metrics());
        p.remove_server("s1").await;
        assert_eq!(store.resolve(&n("a")).await.unwrap().servers, ["s2"]);
        p.remove_name("a").await;
        assert!(store.resolve(&n("a")).await.is_err());
        let dbg = p.debug_string().await;
        assert!(dbg.contains("[b, s2] want:Mounted"), "{dbg}");
        p.stop().await;
        p.wait_for_stop().await;
        assert!(store.resolve(&n("b")).await.is_err());
        assert_eq!(p.debug_string().await, "stopped");
        p.add_name("c").await.unwrap();
        assert!(store.resolve(&n("c")).await.is_err(), "after stop nothing is mounted");
        assert!(p.status().await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_every_handle_unmounts() {
        let (store, t) = table();
        let p = Publisher::new(t, PublisherConfig::new(Duration::from_secs(1)));
        p.add_server("s").await.unwrap();
        p.add_name("x").await.unwrap();
        let waiter = p.clone();
        drop(p);
        // `waiter` still holds the channel: the task keeps running.
        assert!(store.resolve(&Name::parse("x").unwrap()).await.is_ok());
        let done = waiter.done.clone();
        drop(waiter);
        let mut done = done;
        let _ = done.wait_for(|d| *d).await;
        assert!(store.resolve(&Name::parse("x").unwrap()).await.is_err());
    }

    #[test]
    fn metrics_render() {
        let m = PublisherMetrics { mounts_ok: 3, ..Default::default() };
        assert!(m.to_prometheus().contains("flotilla_publisher_calls_total{op=\"mount\",outcome=\"ok\"} 3\n"));
    }
}
