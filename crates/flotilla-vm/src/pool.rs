//! Warm pools: booted microVMs waiting to become sandboxes.
//!
//! For each target (image version + memory + vCPUs + workspace size) the
//! backend keeps `size` guests booted. A create whose spec matches (no
//! network, no env of its own) claims one: under the pool's lock the
//! member's directory is renamed to the sandbox's id (QEMU keeps its open
//! disks and bound sockets; the janitor names QEMUs by their cwd, which
//! follows the rename), so a member is handed out once and is never both a
//! pool member and a sandbox. A refill task boots replacements one at a
//! time (under TCG a boot takes a core). Members are not in the node's
//! registry: after a node crash they are orphans and the janitor reaps
//! them; the targets themselves persist in `<home>/vm/pool.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use flotilla_sandbox::Image;
use serde::{Deserialize, Serialize};

use crate::{VmBackend, VmRunning, VmSpec};

/// What a member must match to serve a create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolKey {
    /// Canonical image reference (`name:tag@sha256:…` or `dir:/path`).
    pub image: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub workspace_bytes: u64,
    #[serde(default)]
    pub pids: Option<u64>,
}

impl PoolKey {
    pub fn of(spec: &VmSpec) -> PoolKey {
        PoolKey {
            image: spec.image.reference(),
            memory_bytes: spec.memory_bytes,
            vcpus: spec.vcpus.max(1),
            workspace_bytes: spec.workspace_bytes,
            pids: spec.pids,
        }
    }
}

/// One pool: keep `size` members of `key` ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolTarget {
    pub key: PoolKey,
    pub size: usize,
}

/// A pool as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    pub target: PoolTarget,
    pub ready: usize,
    pub booting: usize,
    /// How its last member came up, and how long that took.
    pub last: Option<Readied>,
}

/// How a member came up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readied {
    /// Restored from the pool's snapshot (else booted cold).
    pub from_snapshot: bool,
    pub millis: u64,
}

struct Member {
    id: String,
    key: PoolKey,
    running: VmRunning,
}

#[derive(Default)]
pub(crate) struct Pool {
    targets: Vec<PoolTarget>,
    ready: Vec<Member>,
    booting: BTreeMap<String, PoolKey>,
    draining: bool,
    last: Vec<(PoolKey, Readied)>,
    /// Keys whose snapshot failed to make or restore: cold boots only.
    no_snapshot: Vec<PoolKey>,
    /// Woken when a member is claimed, so the refill starts at once.
    wake: Arc<tokio::sync::Notify>,
}

impl Pool {
    /// Ids the pool owns (not sandboxes: the janitor must leave them be).
    pub(crate) fn owns(&self, id: &str) -> bool {
        self.booting.contains_key(id) || self.ready.iter().any(|m| m.id == id)
    }
}

fn pool_file(b: &VmBackend) -> PathBuf {
    b.assets_dir().join("pool.json")
}

pub(crate) fn load_targets(b: &VmBackend) -> Vec<PoolTarget> {
    std::fs::read(pool_file(b)).ok().and_then(|d| serde_json::from_slice(&d).ok()).unwrap_or_default()
}

fn new_id() -> String {
    let mut b = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl VmBackend {
    /// Takes the saved targets (at start-up; nothing is written).
    pub(crate) fn restore_pool(&self) {
        self.pool.lock().expect("pool lock").targets = load_targets(self);
    }

    /// Sets (or with `size` 0 removes) the pool for `key`; surplus members
    /// are stopped by the refill task.
    pub fn set_pool(&self, target: PoolTarget) -> std::io::Result<()> {
        let targets = {
            let mut p = self.pool.lock().expect("pool lock");
            p.targets.retain(|t| t.key != target.key);
            if target.size > 0 {
                p.targets.push(target);
            }
            p.targets.clone()
        };
        std::fs::create_dir_all(self.assets_dir())?;
        std::fs::write(pool_file(self), serde_json::to_vec_pretty(&targets).unwrap_or_default())
    }

    pub fn pools(&self) -> Vec<PoolStatus> {
        let p = self.pool.lock().expect("pool lock");
        p.targets
            .iter()
            .map(|t| PoolStatus {
                target: t.clone(),
                ready: p.ready.iter().filter(|m| m.key == t.key).count(),
                booting: p.booting.values().filter(|k| **k == t.key).count(),
                last: p.last.iter().find(|(k, _)| *k == t.key).map(|(_, r)| r.clone()),
            })
            .collect()
    }

    /// Whether a pool's guest can become `spec`: no network, no env of its
    /// own, and no disks yet (a start after a stop keeps its own).
    fn poolable(&self, spec: &VmSpec) -> bool {
        spec.network == flotilla_api::NetworkMode::None && spec.env.is_empty() && !self.vm_dir(&spec.id).exists()
    }

    /// A ready member for `spec`, now named `spec.id`; `None` when no pool
    /// matches or none is ready (then the caller boots cold).
    pub fn claim(&self, spec: &VmSpec) -> Option<VmRunning> {
        if !self.poolable(spec) {
            return None;
        }
        let key = PoolKey::of(spec);
        let mut p = self.pool.lock().expect("pool lock");
        loop {
            let i = p.ready.iter().position(|m| m.key == key)?;
            let m = p.ready.remove(i);
            if m.running.exit_now().is_some() {
                // Died while waiting: the refill task replaces it.
                crate::cleanup_vm(&self.vms_dir(), &m.id);
                let _ = std::fs::remove_dir_all(self.vm_dir(&m.id));
                continue;
            }
            let to = self.vm_dir(&spec.id);
            if let Err(e) = std::fs::rename(self.vm_dir(&m.id), &to) {
                tracing::warn!(member = %m.id, error = %e, "could not hand a pool member over; booting cold");
                p.ready.push(m);
                return None;
            }
            p.wake.notify_one();
            return Some(m.running.moved(&spec.id, to));
        }
    }

    /// When no member is ready but the pool for `spec` has a snapshot,
    /// restores `spec` from it (well under a cold boot). `None`: not
    /// eligible, no snapshot, or the restore failed (boot cold instead).
    pub async fn restore_pooled(
        &self,
        spec: &VmSpec,
        step: &(dyn Fn(&str, Option<String>) + Send + Sync),
    ) -> Option<VmRunning> {
        if !self.poolable(spec) {
            return None;
        }
        let key = PoolKey::of(spec);
        {
            let p = self.pool.lock().expect("pool lock");
            if !p.targets.iter().any(|t| t.key == key) || p.no_snapshot.contains(&key) {
                return None;
            }
        }
        let snap = self.snapshot_dir(&key).await.ok()?;
        if !snap.join(crate::snapshot::STATE).exists() {
            return None;
        }
        match self.restore(&snap, spec, step).await {
            Ok(r) => {
                step("restored", Some("from the warm pool's snapshot".into()));
                Some(r)
            }
            Err(e) => {
                tracing::warn!(sandbox = %spec.id, error = %e, "restoring from the pool's snapshot failed; booting cold");
                crate::cleanup_vm(&self.vms_dir(), &spec.id);
                let _ = std::fs::remove_dir_all(self.vm_dir(&spec.id));
                None
            }
        }
    }

    /// Stops every member (node shutdown). Blocking.
    pub fn drain_pool(&self) {
        let members: Vec<String> = {
            let mut p = self.pool.lock().expect("pool lock");
            p.draining = true;
            let booting: Vec<String> = p.booting.keys().cloned().collect();
            p.ready.drain(..).map(|m| m.id).chain(booting).collect()
        };
        for id in members {
            crate::cleanup_vm(&self.vms_dir(), &id);
            let _ = std::fs::remove_dir_all(self.vm_dir(&id));
        }
    }

    /// Brings up one member: restored from the key's snapshot (made first
    /// if there is none yet), or booted cold when snapshots fail for it.
    async fn boot_member(&self, key: &PoolKey, spec: &VmSpec) -> Result<(VmRunning, bool), crate::VmError> {
        let skip = self.pool.lock().expect("pool lock").no_snapshot.contains(key);
        if !skip {
            match self.snapshot_dir(key).await {
                Ok(snap) => {
                    let mut ready = snap.join(crate::snapshot::STATE).exists();
                    if !ready {
                        tracing::info!(image = %key.image, "making the pool's snapshot");
                        match self.make_snapshot(spec, &snap).await {
                            Ok(()) => ready = true,
                            Err(e) => tracing::warn!(error = %e, "could not make a snapshot; booting cold"),
                        }
                    }
                    if ready {
                        match self.restore(&snap, spec, &|_, _| {}).await {
                            Ok(r) => return Ok((r, true)),
                            Err(e) => {
                                tracing::warn!(error = %e, "restoring the snapshot failed; booting cold from now on");
                                crate::cleanup_vm(&self.vms_dir(), &spec.id);
                                let _ = std::fs::remove_dir_all(self.vm_dir(&spec.id));
                                let _ = std::fs::remove_dir_all(&snap);
                            }
                        }
                    }
                }
                Err(e) => return Err(e),
            }
            self.pool.lock().expect("pool lock").no_snapshot.push(key.clone());
        }
        self.start(spec, &|_, _| {}).await.map(|r| (r, false))
    }

    /// Removes snapshots that no pool target uses any more.
    async fn gc_unused_snapshots(&self, targets: &[PoolTarget]) {
        if targets.is_empty() && !self.snapshots_dir().exists() {
            return;
        }
        let mut keep = Vec::new();
        for t in targets {
            match self.snapshot_dir(&t.key).await {
                Ok(d) => keep.push(d),
                // Cannot tell which to keep: keep all.
                Err(_) => return,
            }
        }
        self.gc_snapshots(&keep);
    }

    /// Starts the refill task; it ends when the backend is dropped.
    pub fn start_pool(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move { refill(weak).await });
    }
}

async fn refill(weak: Weak<VmBackend>) {
    let wake = match weak.upgrade() {
        Some(b) => b.pool.lock().expect("pool lock").wake.clone(),
        None => return,
    };
    // Snapshots are collected when the targets change (and once at start),
    // not on every round.
    let mut collected_for: Option<Vec<PoolTarget>> = None;
    loop {
        let _ = tokio::time::timeout(Duration::from_millis(200), wake.notified()).await;
        let Some(b) = weak.upgrade() else { return };
        let targets = b.pool.lock().expect("pool lock").targets.clone();
        if collected_for.as_ref() != Some(&targets) {
            b.gc_unused_snapshots(&targets).await;
            collected_for = Some(targets);
        }
        // What to do this round: one boot at a time, surplus stopped.
        let (boot, surplus) = {
            let mut p = b.pool.lock().expect("pool lock");
            if p.draining {
                return;
            }
            let mut surplus = Vec::new();
            let targets = p.targets.clone();
            let mut i = 0;
            while i < p.ready.len() {
                let want = targets.iter().find(|t| t.key == p.ready[i].key).map_or(0, |t| t.size);
                let have = p.ready[..=i].iter().filter(|m| m.key == p.ready[i].key).count();
                if have > want {
                    surplus.push(p.ready.remove(i).id);
                } else {
                    i += 1;
                }
            }
            let boot = if p.booting.is_empty() {
                targets
                    .iter()
                    .find(|t| p.ready.iter().filter(|m| m.key == t.key).count() < t.size)
                    .map(|t| t.key.clone())
            } else {
                None
            };
            let boot = boot.map(|k| {
                let id = new_id();
                p.booting.insert(id.clone(), k.clone());
                (id, k)
            });
            (boot, surplus)
        };
        for id in surplus {
            crate::cleanup_vm(&b.vms_dir(), &id);
            let _ = std::fs::remove_dir_all(b.vm_dir(&id));
        }
        if let Some((id, key)) = boot {
            let spec = match Image::parse(&key.image, &b.home) {
                Ok(image) => VmSpec {
                    id: id.clone(),
                    hostname: format!("sbx-{id}"),
                    image,
                    memory_bytes: key.memory_bytes,
                    vcpus: key.vcpus,
                    workspace_bytes: key.workspace_bytes,
                    pids: key.pids,
                    network: flotilla_api::NetworkMode::None,
                    env: BTreeMap::new(),
                },
                Err(e) => {
                    tracing::warn!(image = %key.image, error = %e, "pool image is gone; dropping the pool");
                    let mut p = b.pool.lock().expect("pool lock");
                    p.booting.remove(&id);
                    p.targets.retain(|t| t.key != key);
                    continue;
                }
            };
            let started = std::time::Instant::now();
            let booted = b.boot_member(&key, &spec).await;
            let readied = booted.as_ref().ok().map(|(_, from_snapshot)| Readied {
                from_snapshot: *from_snapshot,
                millis: started.elapsed().as_millis() as u64,
            });
            let booted = booted.map(|(r, _)| r);
            if let Some(r) = readied {
                let mut p = b.pool.lock().expect("pool lock");
                p.last.retain(|(k, _)| *k != key);
                p.last.push((key.clone(), r));
            }
            let failed = {
                let mut p = b.pool.lock().expect("pool lock");
                p.booting.remove(&id);
                match booted {
                    Ok(running) if !p.draining => {
                        tracing::info!(member = %id, image = %key.image, "pool member ready");
                        p.ready.push(Member { id: id.clone(), key, running });
                        None
                    }
                    Ok(_) => Some(None),
                    Err(e) => Some(Some(e)),
                }
            };
            if let Some(err) = failed {
                crate::cleanup_vm(&b.vms_dir(), &id);
                let _ = std::fs::remove_dir_all(b.vm_dir(&id));
                if let Some(e) = err {
                    tracing::warn!(member = %id, error = %e, "pool member failed to boot");
                    // Do not spin on a pool that cannot boot.
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }
}
