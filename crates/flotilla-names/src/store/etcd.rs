//! The mount table in etcd: one key per mount, TTLs as leases.
//!
//! Layout: the key of a mount is `<prefix><name>\0<server>` and its value a
//! small JSON record with the wall-clock expiry (for glob's
//! `expires_in_s`). `\0` cannot occur in a name, so the servers of one name
//! are exactly the keys that start with `<prefix><name>\0`, and because `\0`
//! sorts before every name character, a key-ordered range lists mounts in
//! name order, the same order the memory store uses.
//!
//! Leases are shared. A mount attaches its key to a lease granted for its
//! TTL plus a reuse window, and every mount with the same TTL (in whole
//! seconds) during that window reuses the lease: a steady-state mount is
//! one `put`, not `grant` + `put`, and etcd holds a handful of leases
//! rather than one per mount. The cost is precision: a key may live up to
//! the window (a tenth of the TTL, at least a second) beyond its TTL, never
//! less than its TTL. Kubernetes' apiserver shares leases for events the
//! same way. A lease etcd no longer knows (revoked, or expired while etcd
//! was down) is dropped from the cache and the mount retried once.
//!
//! Resolve is one transaction holding one range read per prefix of the
//! name, so it costs one round trip whatever the depth. Glob reads the
//! key range under the pattern's literal prefix in pages and filters.
//! Watch is an etcd watch on that same range: a put of a new key (version
//! 1) is a mount, a delete (by unmount or by lease expiry) an unmount.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use flotilla_api::Timestamp;
use flotilla_api::names::{MountEntry, MountedServer, Resolution};
use serde::{Deserialize, Serialize};

use tokio::sync::mpsc;

use super::{MountEvent, Store, StoreError, WATCH_BUFFER, Watch, ceil_secs, resolution};
use crate::name::{Name, Pattern, check_server};

/// Keys read per request when globbing: bounded so that a large table never
/// produces a response near gRPC's 4 MiB message limit.
const GLOB_PAGE_KEYS: i64 = 1000;

/// Where and how to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Every key starts with this, so several tables (or other tenants)
    /// share one etcd.
    pub prefix: String,
    /// Deadline of each request: a mount must fail, not hang, while etcd is
    /// down, so that publishers and callers carry on.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// TLS for `https://` endpoints: whom to trust, and the client
    /// certificate etcd's `--client-cert-auth` asks for.
    pub tls: EtcdTls,
}

/// TLS to etcd (used with `https://` endpoints).
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    /// The CA that issued etcd's certificate (PEM); the system's bundle
    /// when `None`.
    pub ca: Option<std::path::PathBuf>,
    /// A client certificate and its key (PEM).
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl EtcdTls {
    /// tonic's TLS settings for these files.
    fn options(&self) -> Result<etcd_client::TlsOptions, StoreError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| StoreError::TlsFile { path: path.to_path_buf(), source })
        };
        let ca = match &self.ca {
            Some(ca) => read(ca)?,
            None => read(&flotilla_agent::http::system_ca_bundle().ok_or_else(|| StoreError::TlsFile {
                path: "(system CA bundle)".into(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no system CA bundle: give --etcd-ca"),
            })?)?,
        };
        let mut options = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca));
        if let Some((cert, key)) = &self.identity {
            options = options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(options)
    }
}

impl EtcdConfig {
    /// The defaults for one endpoint: prefix `/flotilla/names/`, 5 s
    /// requests, 2 s connects.
    pub fn new(endpoint: impl Into<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![endpoint.into()],
            prefix: "/flotilla/names/".into(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            tls: EtcdTls::default(),
        }
    }

    pub fn with_prefix(mut self, prefix: impl Into<String>) -> EtcdConfig {
        self.prefix = prefix.into();
        self
    }
}

/// The value stored with each mount key.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// Wall-clock expiry the mounter asked for, milliseconds since the epoch.
    expires_at_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct CachedLease {
    id: i64,
    /// Mounts made before this instant still get at least their TTL.
    usable_until: Instant,
}

/// The etcd-backed store.
pub struct EtcdStore {
    client: Client,
    prefix: String,
    /// Leases by TTL in whole seconds.
    leases: Mutex<HashMap<u64, CachedLease>>,
    /// Held while granting, so a burst of mounts grants one lease, not many.
    granting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> StoreError {
    move |source| StoreError::Etcd { op, source }
}

/// How long a lease is reused: a tenth of the TTL, at least a second.
fn reuse_window(ttl_secs: u64) -> u64 {
    (ttl_secs / 10).max(1)
}

fn lease_vanished(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease not found"))
}

impl EtcdStore {
    /// Connects (lazily: the first request dials, and a restarted etcd is
    /// dialled again by later requests).
    pub async fn connect(config: &EtcdConfig) -> Result<EtcdStore, StoreError> {
        let mut options = ConnectOptions::new()
            .with_timeout(config.request_timeout)
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        if config.endpoints.iter().any(|e| e.starts_with("https://")) {
            options = options.with_tls(config.tls.options()?);
        }
        let client = Client::connect(&config.endpoints, Some(options)).await.map_err(etcd("connect"))?;
        Ok(EtcdStore {
            client,
            prefix: config.prefix.clone(),
            leases: Mutex::new(HashMap::new()),
            granting: tokio::sync::Mutex::new(()),
        })
    }

    /// The raw client, for tools that read the keys directly (the bench).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn key(&self, name: &str, server: &str) -> String {
        format!("{}{name}\0{server}", self.prefix)
    }

    fn cached_lease(&self, ttl_secs: u64) -> Option<i64> {
        let leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        leases.get(&ttl_secs).filter(|l| Instant::now() < l.usable_until).map(|l| l.id)
    }

    /// A lease that keeps a key alive for at least `ttl_secs` from now.
    async fn lease(&self, ttl_secs: u64) -> Result<i64, StoreError> {
        if let Some(id) = self.cached_lease(ttl_secs) {
            return Ok(id);
        }
        let _granting = self.granting.lock().await;
        if let Some(id) = self.cached_lease(ttl_secs) {
            return Ok(id);
        }
        let window = reuse_window(ttl_secs);
        // Measured before the request: etcd starts the lease's clock later,
        // so the lease outlives `asked + window + ttl`.
        let asked = Instant::now();
        let granted =
            self.client.lease_client().grant((ttl_secs + window) as i64, None).await.map_err(etcd("lease grant"))?;
        let lease = CachedLease { id: granted.id(), usable_until: asked + Duration::from_secs(window) };
        self.leases.lock().unwrap_or_else(PoisonError::into_inner).insert(ttl_secs, lease);
        Ok(lease.id)
    }

    fn forget_lease(&self, ttl_secs: u64, id: i64) {
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        if leases.get(&ttl_secs).is_some_and(|l| l.id == id) {
            leases.remove(&ttl_secs);
        }
    }

    /// Splits a key of this store into (name, server).
    fn parse_key<'k>(&self, key: &'k [u8]) -> Result<(&'k str, &'k str), StoreError> {
        split_key(&self.prefix, key)
            .ok_or_else(|| StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned() })
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range runs to the end of the keyspace.
    vec![0]
}

#[async_trait]
impl Store for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn mount(&self, name: &Name, server: &str, ttl: Duration) -> Result<Duration, StoreError> {
        check_server(server)?;
        let ttl_secs = ceil_secs(ttl);
        let applied = Duration::from_secs(ttl_secs);
        let record = Record { expires_at_ms: Timestamp::now().plus(applied).millis() };
        let value = serde_json::to_vec(&record).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let key = self.key(name.as_str(), server);
        let mut kv = self.client.kv_client();
        for attempt in 0..2 {
            let lease = self.lease(ttl_secs).await?;
            match kv.put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease))).await {
                Ok(_) => return Ok(applied),
                Err(e) if attempt == 0 && lease_vanished(&e) => self.forget_lease(ttl_secs, lease),
                Err(e) => return Err(etcd("put")(e)),
            }
        }
        Err(StoreError::Unavailable("etcd lost the lease twice in a row".into()))
    }

    async fn unmount(&self, name: &Name, server: &str) -> Result<bool, StoreError> {
        check_server(server)?;
        let resp =
            self.client.kv_client().delete(self.key(name.as_str(), server), None).await.map_err(etcd("delete"))?;
        Ok(resp.deleted() > 0)
    }

    async fn resolve(&self, name: &Name) -> Result<Resolution, StoreError> {
        let prefixes: Vec<(&str, &str)> = name.prefixes().collect();
        let ops: Vec<TxnOp> = prefixes
            .iter()
            .map(|(p, _)| {
                TxnOp::get(format!("{}{p}\0", self.prefix), Some(GetOptions::new().with_prefix().with_keys_only()))
            })
            .collect();
        let resp = self.client.kv_client().txn(Txn::new().and_then(ops)).await.map_err(etcd("txn"))?;
        for ((prefix, suffix), op) in prefixes.iter().zip(resp.op_responses()) {
            let TxnOpResponse::Get(got) = op else {
                return Err(StoreError::Unavailable("etcd answered a range read with another kind of reply".into()));
            };
            if got.kvs().is_empty() {
                continue;
            }
            let servers = got
                .kvs()
                .iter()
                .map(|kv| self.parse_key(kv.key()).map(|(_, server)| server.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(resolution(name, prefix, suffix, servers));
        }
        Err(StoreError::NotFound { name: name.as_str().into() })
    }

    async fn glob(&self, pattern: &Pattern) -> Result<Vec<MountEntry>, StoreError> {
        let start = format!("{}{}", self.prefix, pattern.literal_prefix()).into_bytes();
        let end = prefix_end(&start);
        let now = Timestamp::now();
        let mut kv = self.client.kv_client();
        let mut out: Vec<MountEntry> = Vec::new();
        let mut from = start;
        loop {
            let opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(GLOB_PAGE_KEYS)
                .with_sort(SortTarget::Key, SortOrder::Ascend);
            let resp = kv.get(from.clone(), Some(opts)).await.map_err(etcd("range"))?;
            for item in resp.kvs() {
                let (name, server) = self.parse_key(item.key())?;
                if !pattern.matches(name) {
                    continue;
                }
                let record: Record = serde_json::from_slice(item.value())
                    .map_err(|_| StoreError::Corrupt { key: String::from_utf8_lossy(item.key()).into_owned() })?;
                let expires_in_s = now.until(Timestamp(record.expires_at_ms)).as_secs_f64();
                let mounted = MountedServer { server: server.to_string(), expires_in_s };
                match out.last_mut() {
                    Some(last) if last.name == name => last.servers.push(mounted),
                    _ => out.push(MountEntry { name: name.to_string(), servers: vec![mounted] }),
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.client.maintenance_client().status().await.map_err(etcd("status"))?;
        Ok(())
    }

    async fn watch(&self, pattern: &Pattern) -> Result<Watch, StoreError> {
        let start = format!("{}{}", self.prefix, pattern.literal_prefix()).into_bytes();
        let options = WatchOptions::new().with_range(prefix_end(&start));
        let mut stream = self.client.watch_client().watch(start, Some(options)).await.map_err(etcd("watch"))?;
        // The first answer says the watch exists: from then on no change is missed.
        match stream.message().await.map_err(etcd("watch"))? {
            Some(r) if r.created() => {}
            _ => return Err(StoreError::Unavailable("etcd did not create the watch".into())),
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let (pattern, prefix) = (pattern.clone(), self.prefix.clone());
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    () = tx.closed() => return,
                };
                // An error or the end of the stream (etcd gone, watch
                // cancelled or compacted): closing the channel says re-list.
                let Ok(Some(msg)) = msg else {
                    return;
                };
                if msg.canceled() {
                    return;
                }
                for event in msg.events() {
                    let Some(kv) = event.kv() else {
                        continue;
                    };
                    let Some((name, server)) = split_key(&prefix, kv.key()) else {
                        continue;
                    };
                    if !pattern.matches(name) {
                        continue;
                    }
                    let (name, server) = (name.to_string(), server.to_string());
                    let change = match event.event_type() {
                        // Version 1 is a new key; later puts are refreshes.
                        EventType::Put if kv.version() == 1 => MountEvent::Mounted { name, server },
                        EventType::Put => continue,
                        EventType::Delete => MountEvent::Unmounted { name, server },
                    };
                    if tx.send(change).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// Splits a key under `prefix` into (name, server).
fn split_key<'k>(prefix: &str, key: &'k [u8]) -> Option<(&'k str, &'k str)> {
    let rest = key.strip_prefix(prefix.as_bytes())?;
    std::str::from_utf8(rest).ok()?.split_once('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a/b"), b"a/c");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn windows() {
        assert_eq!(reuse_window(1), 1);
        assert_eq!(reuse_window(25), 2);
        assert_eq!(reuse_window(600), 60);
    }
}
