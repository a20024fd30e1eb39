//! The embedded mount table: a sorted map under one reader-writer lock.
//!
//! Time comes from `tokio::time::Instant`, so a test on a paused runtime
//! can expire mounts without waiting. Expired mounts are invisible at once
//! (every read compares expiries). An index of mounts by expiry lets every
//! write first drop what has expired, in O(log n) per dropped mount, so
//! memory never holds more than the live mounts plus those expired since
//! the last write. Once someone watches, a reaper task does the same at
//! each expiry, so `Unmounted` events for expiries arrive on time.
//!
//! The lock is a `std` lock, never held across an await: each operation is
//! a few map lookups, far cheaper than a hand-off to an actor would be.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_api::names::{MountEntry, MountedServer, Resolution};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::time::Instant;

use super::{MountEvent, Store, StoreError, WATCH_BUFFER, Watch, resolution};
use crate::name::{Name, Pattern, check_server};

/// Longest the reaper sleeps with nothing due, so that it notices a
/// dropped store within a second.
const REAPER_IDLE: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Slot {
    server: String,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Table {
    names: BTreeMap<String, Vec<Slot>>,
    /// (expiry, name, server) of every mount in `names`.
    expiries: BTreeSet<(Instant, String, String)>,
}

impl Table {
    /// Drops every mount that has expired by `now`, telling watchers.
    fn expire(&mut self, now: Instant, events: &broadcast::Sender<MountEvent>) {
        while self.expiries.first().is_some_and(|(at, _, _)| *at <= now) {
            let Some((_, name, server)) = self.expiries.pop_first() else {
                break;
            };
            if let Some(slots) = self.names.get_mut(&name) {
                slots.retain(|s| s.server != server);
                if slots.is_empty() {
                    self.names.remove(&name);
                }
            }
            if events.receiver_count() > 0 {
                let _ = events.send(MountEvent::Unmounted { name, server });
            }
        }
    }
}

#[derive(Debug)]
struct Inner {
    table: RwLock<Table>,
    events: broadcast::Sender<MountEvent>,
    reaper_started: AtomicBool,
    /// Wakes the reaper when a mount expires sooner than any before it.
    wake: Notify,
}

impl Inner {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: impl FnOnce() -> MountEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event());
        }
    }
}

/// The in-memory store. Cheap to create; share it as `Arc<dyn Store>`.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        MemoryStore {
            inner: Arc::new(Inner {
                table: RwLock::new(Table::default()),
                events,
                reaper_started: AtomicBool::new(false),
                wake: Notify::new(),
            }),
        }
    }
}

/// Drops mounts as they expire, for as long as the store lives.
async fn reap(inner: Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        inner.write().expire(now, &inner.events);
        let next = inner.read().expiries.first().map(|(at, _, _)| *at);
        let deadline = next.map_or(now + REAPER_IDLE, |at| at.min(now + REAPER_IDLE));
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {}
            () = inner.wake.notified() => {}
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn mount(&self, name: &Name, server: &str, ttl: Duration) -> Result<Duration, StoreError> {
        check_server(server)?;
        let now = Instant::now();
        let expires = now + ttl;
        let inner = &*self.inner;
        let mut t = inner.write();
        t.expire(now, &inner.events);
        let slots = match t.names.get_mut(name.as_str()) {
            Some(s) => s,
            None => t.names.entry(name.as_str().to_string()).or_default(),
        };
        let previous = match slots.iter_mut().find(|s| s.server == server) {
            Some(slot) => Some(std::mem::replace(&mut slot.expires, expires)),
            None => {
                slots.push(Slot { server: server.to_string(), expires });
                None
            }
        };
        if let Some(old) = previous {
            t.expiries.remove(&(old, name.as_str().to_string(), server.to_string()));
        }
        t.expiries.insert((expires, name.as_str().to_string(), server.to_string()));
        let soonest = t.expiries.first().is_some_and(|(at, _, _)| *at == expires);
        drop(t);
        if previous.is_none() {
            inner.emit(|| MountEvent::Mounted { name: name.to_string(), server: server.to_string() });
        }
        if soonest {
            inner.wake.notify_one();
        }
        Ok(ttl)
    }

    async fn unmount(&self, name: &Name, server: &str) -> Result<bool, StoreError> {
        check_server(server)?;
        let now = Instant::now();
        let inner = &*self.inner;
        let mut t = inner.write();
        t.expire(now, &inner.events);
        let mut removed = None;
        if let Some(slots) = t.names.get_mut(name.as_str()) {
            if let Some(i) = slots.iter().position(|s| s.server == server) {
                removed = Some(slots.swap_remove(i).expires);
            }
            if slots.is_empty() {
                t.names.remove(name.as_str());
            }
        }
        let Some(expires) = removed else {
            return Ok(false);
        };
        t.expiries.remove(&(expires, name.as_str().to_string(), server.to_string()));
        drop(t);
        inner.emit(|| MountEvent::Unmounted { name: name.to_string(), server: server.to_string() });
        Ok(true)
    }

    async fn resolve(&self, name: &Name) -> Result<Resolution, StoreError> {
        let now = Instant::now();
        let t = self.inner.read();
        for (prefix, suffix) in name.prefixes() {
            if let Some(slots) = t.names.get(prefix) {
                let live: Vec<String> = slots.iter().filter(|s| s.expires > now).map(|s| s.server.clone()).collect();
                if !live.is_empty() {
                    return Ok(resolution(name, prefix, suffix, live));
                }
            }
        }
        Err(StoreError::NotFound { name: name.as_str().into() })
    }

    async fn glob(&self, pattern: &Pattern) -> Result<Vec<MountEntry>, StoreError> {
        let now = Instant::now();
        let prefix = pattern.literal_prefix();
        let t = self.inner.read();
        let mut out = Vec::new();
        let range = t.names.range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded));
        for (name, slots) in range.take_while(|(n, _)| n.starts_with(&prefix)) {
            if !pattern.matches(name) {
                continue;
            }
            let mut servers: Vec<MountedServer> = slots
                .iter()
                .filter(|s| s.expires > now)
                .map(|s| MountedServer {
                    server: s.server.clone(),
                    expires_in_s: s.expires.duration_since(now).as_secs_f64(),
                })
                .collect();
            if servers.is_empty() {
                continue;
            }
            servers.sort_by(|a, b| a.server.cmp(&b.server));
            out.push(MountEntry { name: name.clone(), servers });
        }
        Ok(out)
    }

    async fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn watch(&self, pattern: &Pattern) -> Result<Watch, StoreError> {
        let mut events = self.inner.events.subscribe();
        if !self.inner.reaper_started.swap(true, Ordering::SeqCst) {
            tokio::spawn(reap(Arc::downgrade(&self.inner)));
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let pattern = pattern.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    () = tx.closed() => return,
                };
                // Lagged: this watcher missed events and must re-list;
                // closing its channel tells it so.
                let Ok(event) = event else {
                    return;
                };
                if pattern.matches(event.name()) && tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MountEvent;

    fn n(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn mounts_expire_on_the_tokio_clock() {
        let s = MemoryStore::new();
        s.mount(&n("a/b"), "s1", Duration::from_secs(10)).await.unwrap();
        s.mount(&n("a"), "s0", Duration::from_secs(30)).await.unwrap();
        assert_eq!(s.resolve(&n("a/b/c")).await.unwrap().mount_point, "a/b");
        tokio::time::advance(Duration::from_secs(11)).await;
        let r = s.resolve(&n("a/b/c")).await.unwrap();
        assert_eq!((r.mount_point.as_str(), r.suffix.as_str(), r.servers), ("a", "b/c", vec!["s0".to_string()]));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(matches!(s.resolve(&n("a")).await, Err(StoreError::NotFound { .. })));
        assert!(!s.unmount(&n("a"), "s0").await.unwrap(), "an expired mount is not there to remove");
    }

    #[tokio::test(start_paused = true)]
    async fn writes_forget_expired_mounts() {
        let s = MemoryStore::new();
        for i in 0..100 {
            s.mount(&n(&format!("x/{i}")), "s", Duration::from_secs(1)).await.unwrap();
        }
        s.mount(&n("y"), "s", Duration::from_secs(60)).await.unwrap();
        s.mount(&n("y"), "s", Duration::from_secs(60)).await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        s.mount(&n("z"), "s", Duration::from_secs(60)).await.unwrap();
        let t = s.inner.read();
        assert_eq!(t.names.keys().collect::<Vec<_>>(), ["y", "z"], "the expired x/* mounts are gone");
        assert_eq!(t.expiries.len(), 2, "a refresh replaces its index entry");
    }

    #[tokio::test(start_paused = true)]
    async fn watchers_hear_of_expiries_on_time() {
        let s = MemoryStore::new();
        let mut w = s.watch(&Pattern::parse("...").unwrap()).await.unwrap();
        s.mount(&n("a"), "s", Duration::from_secs(5)).await.unwrap();
        assert_eq!(w.recv().await.unwrap(), MountEvent::Mounted { name: "a".into(), server: "s".into() });
        let started = Instant::now();
        assert_eq!(w.recv().await.unwrap(), MountEvent::Unmounted { name: "a".into(), server: "s".into() });
        assert_eq!(started.elapsed(), Duration::from_secs(5), "the reaper woke at the expiry");
    }
}
