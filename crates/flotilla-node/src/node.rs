//! The node core: the sandbox registry and its locks.
//!
//! # Locks (DESIGN §5; lock order in ARCHITECTURE.md)
//!
//! Each sandbox has two async locks that are **never held together**:
//!
//! * `lifecycle`: held for state checks, store writes and the short
//!   lifecycle actions (boot, kill, cleanup). Stop, start, restart, set and
//!   delete take only this lock.
//! * `workspace`: held across guest I/O (tar import and export), which can
//!   take minutes. An import takes `lifecycle` just long enough to check the
//!   sandbox runs and copy its agent address, releases it, then takes
//!   `workspace`. So a 1 GB import never delays a stop; two imports into one
//!   sandbox are serialised; an export waits for an import in flight.
//!
//! Beside them: `create_lock` serialises name uniqueness and uid-range
//! allocation only; `entries` (a std mutex) guards the map itself and each
//! entry's `view` (a std mutex) holds the latest public snapshot, so `ls`
//! and `show` never wait for a booting sandbox. Both are leaves: nothing is
//! awaited while they are held.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use flotilla_agent::AgentClient;
use flotilla_agent::http::ClientError;
use flotilla_api::{
    ApiError, BackendInfo, CreateSandboxRequest, ErrorCode, EventBody, ImportSummary, NodeInfo, Operation,
    OperationKind, Page, PageQuery, Resources, Sandbox, SandboxState, Step, Timestamp, UpdateSandboxRequest,
    WorkspaceQuery,
};

use crate::events::EventBus;
use crate::images::Images;
use crate::metrics::Metrics;
use crate::ops::{OpHandle, Operations};
use crate::state::{self, Event};
use crate::store::{SandboxRecord, Store, StoreError};

/// What the node needs from a sandbox backend. The process backend
/// implements it for real; tests implement it with fakes.
pub trait Backend: Send + Sync + 'static {
    /// A running sandbox.
    type Handle: Clone + Send + Sync + 'static;

    /// Boots the sandbox described by `rec`; `step` hears progress.
    fn boot(
        &self,
        rec: &SandboxRecord,
        step: &(dyn Fn(&str, Option<String>) + Send + Sync),
    ) -> impl Future<Output = Result<Self::Handle, ApiError>> + Send;

    /// Re-adopts a sandbox that survived a node restart.
    fn adopt(&self, rec: &SandboxRecord) -> Option<Self::Handle>;

    /// `(pid, start_time)` to record for re-adoption.
    fn identity(&self, h: &Self::Handle) -> (i32, u64);

    /// Resolves when the sandbox's process is gone: whether it ended
    /// cleanly (the agent halted on request), and how, in words.
    fn exited(&self, h: &Self::Handle) -> impl Future<Output = (bool, String)> + Send;

    /// Releases node-wide resources at shutdown, after every sandbox stopped.
    fn shutdown(&self) {}

    /// Kills the sandbox and waits until it is gone. Idempotent.
    fn kill(&self, id: &str, h: &Self::Handle) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Releases host resources of a sandbox that is not running.
    fn cleanup(&self, id: &str) -> impl Future<Output = ()> + Send;

    /// Removes everything the sandbox has on disk.
    fn destroy(&self, id: &str) -> Result<(), ApiError>;

    /// Applies new limits to a running sandbox.
    fn set_limits(&self, id: &str, r: &Resources) -> Result<(), ApiError>;

    /// A client of the sandbox's agent.
    fn agent(&self, h: &Self::Handle) -> AgentClient;

    /// Streams a tarball into the workspace.
    fn import(
        &self,
        agent: AgentClient,
        body: Body,
        encoding: Option<String>,
        q: WorkspaceQuery,
    ) -> impl Future<Output = Result<ImportSummary, ClientError>> + Send {
        async move { agent.put_workspace(body, encoding.as_deref(), &q).await }
    }

    /// Streams the workspace out.
    fn export(&self, agent: AgentClient, q: WorkspaceQuery) -> impl Future<Output = Result<Body, ClientError>> + Send {
        async move { agent.get_workspace(&q).await.map(Body::new) }
    }

    /// What this backend can do on this host.
    fn info(&self) -> BackendInfo;

    /// Every backend behind this one (a node may run several kinds).
    fn backends(&self) -> Vec<BackendInfo> {
        vec![self.info()]
    }

    /// Warm pools of microVMs, where the backend has them.
    fn pools(&self) -> Vec<flotilla_api::VmPool> {
        Vec::new()
    }

    /// Sets a warm pool; `image` is already pinned.
    fn set_pool(&self, _image: String, _size: u32, _r: &Resources) -> Result<(), ApiError> {
        Err(ApiError::invalid("this node has no microVM backend"))
    }

    /// `v1`, `v2` or `none`.
    fn cgroup_version(&self) -> String;

    /// Network modes this backend can give a sandbox on this host.
    fn network_modes(&self) -> Vec<flotilla_api::NetworkMode>;

    /// Whether a sandbox of `kind` can have network `mode` here, and if not,
    /// why (with the fix).
    fn check_network(&self, kind: flotilla_api::BackendKind, mode: flotilla_api::NetworkMode) -> Result<(), String> {
        if self.network_modes().contains(&mode) {
            Ok(())
        } else {
            Err(format!("network `{}` is not available for {} sandboxes on this node", mode.as_str(), kind.as_str()))
        }
    }

    /// Images this backend can start from.
    fn images(&self) -> Vec<String>;

    /// Ids of every sandbox that has something on this host (a directory,
    /// a cgroup, a process), known to the registry or not: the janitor
    /// removes those the registry does not know.
    fn resident(&self) -> Vec<String> {
        Vec::new()
    }

    /// Validates an image reference, returning its canonical form.
    fn check_image(&self, image: &str) -> Result<String, ApiError>;
}

/// Guest memory of a microVM whose create call sets none.
pub const VM_DEFAULT_MEMORY: u64 = 512 << 20;

/// Node settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub home: PathBuf,
    /// Limits for sandboxes that do not set their own.
    pub default_resources: Resources,
    pub tar_max_bytes: u64,
    pub tar_max_entries: u64,
    /// How often the janitor looks for expired sandboxes.
    pub janitor_period: Duration,
    /// Stop app instances' sandboxes too at a graceful shutdown (by default
    /// they keep running and the next start re-adopts them).
    pub stop_apps: bool,
    /// Sandboxes (of any state) this node keeps at once; at most
    /// [`MAX_UID_SLOTS`].
    pub max_sandboxes: usize,
}

/// uid ranges a node hands out: from `UID_BASE`, `UID_RANGE` each, they
/// stay below the microVMs' QEMU uids (`3 << 30`) with room to spare.
pub const MAX_UID_SLOTS: u32 = 16_384;

impl NodeConfig {
    pub fn new(home: PathBuf) -> NodeConfig {
        NodeConfig {
            home,
            default_resources: Resources {
                cpus: None,
                memory_bytes: Some(4 << 30),
                pids: Some(8192),
                disk_bytes: None,
            },
            tar_max_bytes: flotilla_api::limits::DEFAULT_TAR_MAX_BYTES,
            tar_max_entries: flotilla_api::limits::DEFAULT_TAR_MAX_ENTRIES,
            janitor_period: Duration::from_secs(1),
            stop_apps: false,
            max_sandboxes: 4096,
        }
    }
}

struct Life<H> {
    rec: SandboxRecord,
    handle: Option<H>,
    /// Bumped whenever the node itself ends a run, so the exit watcher of
    /// that run knows the death was expected.
    generation: u64,
}

struct Entry<H> {
    id: String,
    name: String,
    uid_slot: u32,
    lifecycle: tokio::sync::Mutex<Life<H>>,
    workspace: Arc<tokio::sync::Mutex<()>>,
    view: Mutex<Sandbox>,
}

/// The node.
pub struct Node<B: Backend> {
    backend: B,
    store: Arc<Store>,
    events: Arc<EventBus>,
    metrics: Arc<Metrics>,
    ops: Arc<Operations>,
    images: Images,
    config: NodeConfig,
    node_id: String,
    entries: Mutex<BTreeMap<String, Arc<Entry<B::Handle>>>>,
    create_lock: tokio::sync::Mutex<()>,
    apps: std::sync::OnceLock<Arc<crate::apps::Apps<B>>>,
}

impl<B: Backend> std::fmt::Debug for Node<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

fn store_err(e: StoreError) -> ApiError {
    ApiError::internal(format!("writing node state: {}", flotilla_agent::http::error_chain(&e)))
}

/// A short random id: 12 hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
        && n.as_bytes()[0].is_ascii_alphanumeric()
}

impl<B: Backend> Node<B> {
    /// Opens the node's store and recovers the sandboxes it knew: running
    /// ones whose process survived are re-adopted, the rest are marked
    /// failed and their host resources released.
    pub async fn open(backend: B, config: NodeConfig) -> Result<Arc<Node<B>>, ApiError> {
        std::fs::create_dir_all(&config.home)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", config.home.display())))?;
        let store = Arc::new(Store::open(&config.home.join("node.db")).map_err(store_err)?);
        let events = Arc::new(EventBus::new());
        let metrics = Arc::new(Metrics::default());
        let ops = Arc::new(Operations::open(store.clone(), events.clone(), metrics.clone())?);
        let images = Images::open(&config.home)?;
        // Scratch space (git fetches) a crash may have left.
        let _ = std::fs::remove_dir_all(config.home.join("tmp"));
        let node_id = match store.meta("node_id").map_err(store_err)? {
            Some(id) => id,
            None => {
                let id = new_id();
                store.set_meta("node_id", &id).map_err(store_err)?;
                id
            }
        };
        let node = Arc::new(Node {
            backend,
            store,
            events,
            metrics,
            ops,
            images,
            config,
            node_id,
            entries: Mutex::new(BTreeMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
            apps: std::sync::OnceLock::new(),
        });
        node.recover().await?;
        node.reap_orphans().await;
        node.images.collect_unused(&node.store, &node.images_in_use()).await;
        // After the sandboxes: instances re-attach to the ones re-adopted.
        let _ = node.apps.set(crate::apps::Apps::open(&node));
        Ok(node)
    }

    /// The node's apps (installations and instances).
    pub fn apps(&self) -> &Arc<crate::apps::Apps<B>> {
        self.apps.get().expect("apps are opened with the node")
    }

    pub fn events(&self) -> &EventBus {
        &self.events
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn operations(&self) -> &Arc<Operations> {
        &self.ops
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    async fn recover(self: &Arc<Self>) -> Result<(), ApiError> {
        for mut rec in self.store.load_all().map_err(store_err)? {
            let id = rec.sandbox.id.clone();
            let mut handle = None;
            match rec.sandbox.state {
                SandboxState::Deleted => {
                    self.backend.cleanup(&id).await;
                    let _ = self.backend.destroy(&id);
                    self.store.delete(&id).map_err(store_err)?;
                    continue;
                }
                SandboxState::Running | SandboxState::Creating => match self.backend.adopt(&rec) {
                    Some(h) if rec.sandbox.state == SandboxState::Running => {
                        tracing::info!(sandbox = %id, "re-adopted after restart");
                        handle = Some(h);
                    }
                    other => {
                        if let Some(h) = other {
                            let _ = self.backend.kill(&id, &h).await;
                        }
                        self.backend.cleanup(&id).await;
                        rec.sandbox.state = SandboxState::Failed;
                        rec.sandbox.error = Some("the node restarted and the sandbox's process was gone".into());
                        rec.pid = None;
                        rec.start_time = None;
                        push_step(&mut rec.sandbox, "lost_on_restart", None);
                        self.store.put(&rec).map_err(store_err)?;
                    }
                },
                SandboxState::Stopped | SandboxState::Failed => self.backend.cleanup(&id).await,
            }
            let entry = Arc::new(Entry {
                id: id.clone(),
                name: rec.sandbox.name.clone(),
                uid_slot: rec.uid_slot,
                view: Mutex::new(rec.sandbox.clone()),
                lifecycle: tokio::sync::Mutex::new(Life { rec, handle: handle.clone(), generation: 0 }),
                workspace: Arc::new(tokio::sync::Mutex::new(())),
            });
            self.entries.lock().expect("entries").insert(id, entry.clone());
            if let Some(h) = handle {
                self.watch_exit(&entry, h, 0);
            }
        }
        Ok(())
    }

    fn find(&self, id_or_name: &str) -> Result<Arc<Entry<B::Handle>>, ApiError> {
        let entries = self.entries.lock().expect("entries");
        if let Some(e) = entries.get(id_or_name) {
            return Ok(e.clone());
        }
        entries
            .values()
            .find(|e| e.name == id_or_name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no sandbox {id_or_name:?}")))
    }

    /// Writes a record: store first, then the public view, then the event.
    fn commit(&self, entry: &Entry<B::Handle>, rec: &SandboxRecord) -> Result<(), ApiError> {
        self.store.put(rec).map_err(store_err)?;
        *entry.view.lock().expect("view") = rec.sandbox.clone();
        self.events.publish(EventBody::Sandbox { sandbox: Box::new(rec.sandbox.clone()) });
        Ok(())
    }

    // ------------------------------------------------------------ lifecycle

    /// Creates a sandbox and boots it; returns once its agent is up.
    pub async fn create(self: &Arc<Self>, req: CreateSandboxRequest) -> Result<Sandbox, ApiError> {
        let op = self.create_operation(req).await?;
        self.finished(op).await
    }

    /// Checks that an image reference names something this node can run.
    pub fn check_image_ref(&self, image: &str) -> Result<String, ApiError> {
        self.resolve_image(image)
    }

    /// `host`, `dir:/path` and canonical stored references go to the backend
    /// as they are; `name:tag` is pinned to its current version first.
    fn resolve_image(&self, image: &str) -> Result<String, ApiError> {
        if image == "host" || image.starts_with("dir:") || image.contains('@') {
            return self.backend.check_image(image);
        }
        let canonical = self.images.resolve(&self.store, image)?;
        self.backend.check_image(&canonical)
    }

    /// `(sandbox id, image digest)` of every sandbox made from a stored image.
    fn images_in_use(&self) -> Vec<(String, String)> {
        self.entries
            .lock()
            .expect("entries")
            .values()
            .filter_map(|e| {
                let image = e.view.lock().expect("view").image.clone();
                image.split_once('@').map(|(_, d)| (e.id.clone(), d.to_string()))
            })
            .collect()
    }

    // ------------------------------------------------------------ images

    /// Imports an image from a path on this host, as an operation.
    pub fn import_image_operation(
        self: &Arc<Self>,
        req: flotilla_api::ImportImageRequest,
    ) -> Result<Operation, ApiError> {
        crate::images::parse_reference(&req.reference)?;
        let op = self.ops.begin(OperationKind::ImportImage, &req.reference)?;
        op.step("import_requested", Some(req.path.clone()));
        let snapshot = op.snapshot();
        let node = self.clone();
        tokio::spawn(async move {
            let n = node.clone();
            // The handle travels with the blocking work and back; if the
            // task is lost, dropping the handle fails the operation.
            let joined = tokio::task::spawn_blocking(move || {
                let step = |name: &str, detail: Option<String>| op.step(name, detail);
                let result = n.images.import_blocking(&n.store, &req.reference, std::path::Path::new(&req.path), &step);
                (op, result)
            })
            .await;
            let Ok((op, result)) = joined else { return };
            match result {
                Ok(img) => {
                    tracing::info!(image = %img.reference, digest = %img.digest, format = %img.source_format, "image imported");
                    node.metrics.imported("image", img.size_bytes);
                    node.events.publish(EventBody::Image { action: "imported".into(), image: img.reference.clone() });
                    op.succeed(serde_json::to_value(&img).unwrap_or_default());
                }
                Err(e) => op.fail(e),
            }
        });
        Ok(snapshot)
    }

    /// Pulls an image from an OCI registry, as an operation: the download
    /// (async) and the layer application (blocking) share one staging
    /// directory, removed on any failure. The credentials stay in `req`
    /// and never reach the operation, the log or the events.
    pub fn pull_image_operation(self: &Arc<Self>, req: flotilla_api::PullImageRequest) -> Result<Operation, ApiError> {
        let (remote, reference) = crate::registry::check(&req)?;
        let op = self.ops.begin(OperationKind::PullImage, &reference)?;
        op.step("pull_requested", Some(remote.whole()));
        let snapshot = op.snapshot();
        let node = self.clone();
        tokio::spawn(async move {
            let step = |name: &str, detail: Option<String>| op.step(name, detail);
            let fetched = match node.images.stage() {
                Ok(staging) => {
                    crate::registry::fetch(&req, &remote, &staging, &step).await.map(|fetched| (staging, fetched))
                }
                Err(e) => Err(e),
            };
            drop(req);
            let (staging, fetched) = match fetched {
                Ok(v) => v,
                Err(e) => return op.fail(e),
            };
            tracing::info!(source = %fetched.source, digest = %fetched.digest, layers = fetched.layers, bytes = fetched.bytes, "image layers pulled");
            let n = node.clone();
            let joined = tokio::task::spawn_blocking(move || {
                let step = |name: &str, detail: Option<String>| op.step(name, detail);
                let result = n.images.apply_pulled_blocking(&n.store, staging, &reference, &fetched.source, &step);
                (op, result)
            })
            .await;
            let Ok((op, result)) = joined else { return };
            match result {
                Ok(img) => {
                    tracing::info!(image = %img.reference, digest = %img.digest, source = %img.source, "image pulled");
                    node.metrics.imported("image", img.size_bytes);
                    node.events.publish(EventBody::Image { action: "pulled".into(), image: img.reference.clone() });
                    op.succeed(serde_json::to_value(&img).unwrap_or_default());
                }
                Err(e) => op.fail(e),
            }
        });
        Ok(snapshot)
    }

    pub fn images(&self) -> Result<Vec<flotilla_api::Image>, ApiError> {
        self.images.list(&self.store, &self.images_in_use())
    }

    pub fn image(&self, reference: &str) -> Result<flotilla_api::Image, ApiError> {
        self.images()?
            .into_iter()
            .find(|i| i.reference == reference)
            .ok_or_else(|| ApiError::not_found(format!("no image {reference:?} (see `flotilla image ls`)")))
    }

    /// Points tag `to` at the version `from` names.
    pub async fn promote_image(&self, from: &str, to: &str) -> Result<flotilla_api::Image, ApiError> {
        let img = self.images.promote(&self.store, from, to, &self.images_in_use()).await?;
        self.events.publish(EventBody::Image { action: format!("promoted from {from}"), image: to.to_string() });
        self.image(&img.reference)
    }

    /// Deletes a tag (409 while a sandbox uses its version).
    pub async fn delete_image(&self, reference: &str) -> Result<(), ApiError> {
        self.images.delete(&self.store, reference, &self.images_in_use()).await?;
        self.events.publish(EventBody::Image { action: "deleted".into(), image: reference.to_string() });
        Ok(())
    }

    /// Waits for an operation that yields a sandbox and returns the sandbox.
    async fn finished(&self, op: Operation) -> Result<Sandbox, ApiError> {
        let op = self.ops.wait(&op.id, Duration::from_secs(3600)).await?;
        match (op.error, op.result) {
            (Some(e), _) => Err(e),
            (None, Some(v)) => serde_json::from_value(v).map_err(|e| ApiError::internal(e.to_string())),
            (None, None) => Err(ApiError::new(ErrorCode::Timeout, format!("operation {} did not finish", op.id))),
        }
    }

    /// Starts creating a sandbox and returns the operation at once. The
    /// request is checked (name, image, limits) before it returns, so a bad
    /// request is a plain error, not a failed operation.
    pub async fn create_operation(self: &Arc<Self>, req: CreateSandboxRequest) -> Result<Operation, ApiError> {
        let image = self.resolve_image(req.image.as_deref().unwrap_or("host"))?;
        if let Some(n) = &req.name
            && !valid_name(n)
        {
            return Err(ApiError::invalid(format!(
                "bad sandbox name {n:?}: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
            )));
        }
        req.validate()?;
        self.backend.check_network(req.backend, req.network).map_err(ApiError::invalid)?;
        if req.backend == flotilla_api::BackendKind::Vm && image == "host" {
            return Err(ApiError::invalid(flotilla_vm::HOST_IMAGE_REFUSED));
        }
        let now = Timestamp::now();
        let entry = {
            // Name uniqueness and uid-range allocation, nothing else.
            let _create = self.create_lock.lock().await;
            let id = new_id();
            let name = req.name.clone().unwrap_or_else(|| format!("sbx-{id}"));
            let used_slots: HashSet<u32> = {
                let entries = self.entries.lock().expect("entries");
                if let Some(e) = entries.values().find(|e| e.name == name) {
                    return Err(ApiError::conflict(format!("a sandbox named {name:?} exists ({})", e.id)));
                }
                entries.values().map(|e| e.uid_slot).collect()
            };
            // Slots are bounded: past MAX_SANDBOXES the uid ranges would
            // run into the microVMs' QEMU uids (VMM_UID_BASE).
            if used_slots.len() >= self.config.max_sandboxes {
                return Err(ApiError::new(
                    flotilla_api::ErrorCode::Conflict,
                    format!(
                        "this node holds {} sandboxes, the most it may (--max-sandboxes): delete some first",
                        used_slots.len()
                    ),
                ));
            }
            let uid_slot = (0..MAX_UID_SLOTS)
                .find(|s| !used_slots.contains(s))
                .ok_or_else(|| ApiError::new(flotilla_api::ErrorCode::Conflict, "no free uid range on this node"))?;
            let mut sandbox = Sandbox {
                id: id.clone(),
                name: name.clone(),
                image,
                backend: req.backend,
                state: SandboxState::Creating,
                resources: merge_resources(&self.defaults_for(req.backend), &req.resources),
                labels: req.labels.clone(),
                env: req.env.clone(),
                network: req.network,
                created_at: now,
                delete_at: deadline(now, req.ttl_s, req.idle_ttl_s),
                idle_ttl_s: req.idle_ttl_s,
                error: None,
                steps: vec![],
            };
            push_step(&mut sandbox, "create_requested", None);
            let rec = SandboxRecord { sandbox: sandbox.clone(), uid_slot, pid: None, start_time: None };
            self.store.put(&rec).map_err(store_err)?;
            let entry = Arc::new(Entry {
                id: id.clone(),
                name,
                uid_slot,
                view: Mutex::new(sandbox),
                lifecycle: tokio::sync::Mutex::new(Life { rec, handle: None, generation: 0 }),
                workspace: Arc::new(tokio::sync::Mutex::new(())),
            });
            self.entries.lock().expect("entries").insert(id, entry.clone());
            entry
        };
        let op = self.ops.begin(OperationKind::CreateSandbox, &entry.id)?;
        op.step("create_requested", None);
        let snapshot = op.snapshot();
        let node = self.clone();
        tokio::spawn(async move {
            let mut life = entry.lifecycle.lock().await;
            if life.rec.sandbox.state != SandboxState::Creating {
                // Deleted (or stopped) before the boot began.
                let s = life.rec.sandbox.state;
                op.fail(ApiError::conflict(format!("sandbox {} was {s} before it booted", entry.id)));
                return;
            }
            let result = node.boot_locked(&entry, &mut life, Some(&op)).await;
            drop(life);
            finish_op(op, result);
        });
        Ok(snapshot)
    }

    /// Starts a stopped or failed sandbox, as an operation.
    pub async fn start_operation(self: &Arc<Self>, id: &str) -> Result<Operation, ApiError> {
        self.boot_operation(id, OperationKind::StartSandbox).await
    }

    /// Stops (if running) and boots a sandbox again, as an operation.
    pub async fn restart_operation(self: &Arc<Self>, id: &str) -> Result<Operation, ApiError> {
        self.boot_operation(id, OperationKind::RestartSandbox).await
    }

    async fn boot_operation(self: &Arc<Self>, id: &str, kind: OperationKind) -> Result<Operation, ApiError> {
        let entry = self.find(id)?;
        if entry.view.lock().expect("view").state == SandboxState::Deleted {
            return Err(ApiError::not_found(format!("no sandbox {id:?}")));
        }
        let op = self.ops.begin(kind, &entry.id)?;
        let snapshot = op.snapshot();
        let node = self.clone();
        tokio::spawn(async move {
            let mut life = entry.lifecycle.lock().await;
            let result = async {
                if kind == OperationKind::StartSandbox && life.rec.sandbox.state == SandboxState::Running {
                    return Ok(life.rec.sandbox.clone());
                }
                if kind == OperationKind::RestartSandbox {
                    node.stop_locked(&entry, &mut life).await?;
                    op.step("stopped", None);
                }
                node.begin_boot(&entry, &mut life)?;
                op.step("start_requested", None);
                node.boot_locked(&entry, &mut life, Some(&op)).await
            }
            .await;
            drop(life);
            finish_op(op, result);
        });
        Ok(snapshot)
    }

    /// Boots with the lifecycle lock held; the record is already `creating`.
    async fn boot_locked(
        self: &Arc<Self>,
        entry: &Arc<Entry<B::Handle>>,
        life: &mut Life<B::Handle>,
        op: Option<&OpHandle>,
    ) -> Result<Sandbox, ApiError> {
        let steps: Arc<Mutex<Vec<Step>>> = Arc::new(Mutex::new(Vec::new()));
        let sink = steps.clone();
        let on_step = move |name: &str, detail: Option<String>| {
            if let Some(op) = op {
                op.step(name, detail.clone());
            }
            sink.lock().expect("steps").push(Step { name: name.into(), at: Timestamp::now(), detail });
        };
        let result = self.backend.boot(&life.rec, &on_step).await;
        life.rec.sandbox.steps.extend(steps.lock().expect("steps").drain(..));
        match result {
            Ok(h) => {
                let (pid, start_time) = self.backend.identity(&h);
                life.rec.sandbox.state = state::transition(life.rec.sandbox.state, Event::AgentUp).map_err(invalid)?;
                life.rec.sandbox.error = None;
                life.rec.pid = Some(pid);
                life.rec.start_time = Some(start_time);
                push_step(&mut life.rec.sandbox, "agent_up", None);
                if let Some(op) = op {
                    op.step("agent_up", None);
                }
                life.handle = Some(h.clone());
                life.generation += 1;
                self.commit(entry, &life.rec)?;
                self.watch_exit(entry, h, life.generation);
                Ok(life.rec.sandbox.clone())
            }
            Err(e) => {
                life.rec.sandbox.state =
                    state::transition(life.rec.sandbox.state, Event::BootFailed).map_err(invalid)?;
                life.rec.sandbox.error = Some(e.message.clone());
                push_step(&mut life.rec.sandbox, "boot_failed", Some(e.message.clone()));
                self.backend.cleanup(&entry.id).await;
                self.commit(entry, &life.rec)?;
                Err(e)
            }
        }
    }

    /// Marks the sandbox failed if its process dies while the node still
    /// thinks it runs.
    fn watch_exit(self: &Arc<Self>, entry: &Arc<Entry<B::Handle>>, h: B::Handle, generation: u64) {
        let node = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            let (clean, how) = node.backend.exited(&h).await;
            let mut life = entry.lifecycle.lock().await;
            if life.generation != generation || life.rec.sandbox.state != SandboxState::Running {
                return;
            }
            // A clean exit is the agent halting on request: a stop, not a
            // failure. Anything else is the sandbox dying under us.
            let event = if clean { Event::Stopped } else { Event::Died };
            let Ok(next) = state::transition(life.rec.sandbox.state, event) else { return };
            life.rec.sandbox.state = next;
            if clean {
                tracing::info!(sandbox = %entry.id, "sandbox halted");
                push_step(&mut life.rec.sandbox, "halted", None);
            } else {
                tracing::warn!(sandbox = %entry.id, "sandbox process {how}");
                life.rec.sandbox.error = Some(format!("the sandbox's init {how}"));
                push_step(&mut life.rec.sandbox, "died", Some(how));
            }
            life.rec.pid = None;
            life.rec.start_time = None;
            life.handle = None;
            node.backend.cleanup(&entry.id).await;
            let _ = node.commit(&entry, &life.rec);
        });
    }

    /// Kills the process if there is one, with the lifecycle lock held.
    async fn stop_locked(&self, entry: &Entry<B::Handle>, life: &mut Life<B::Handle>) -> Result<(), ApiError> {
        life.generation += 1;
        if let Some(h) = life.handle.take() {
            self.backend.kill(&entry.id, &h).await?;
        } else {
            self.backend.cleanup(&entry.id).await;
        }
        if life.rec.sandbox.state != SandboxState::Stopped {
            life.rec.sandbox.state = state::transition(life.rec.sandbox.state, Event::Stopped).map_err(invalid)?;
            push_step(&mut life.rec.sandbox, "stopped", None);
        }
        life.rec.pid = None;
        life.rec.start_time = None;
        self.commit(entry, &life.rec)
    }

    pub async fn stop(&self, id: &str) -> Result<Sandbox, ApiError> {
        let entry = self.find(id)?;
        let mut life = entry.lifecycle.lock().await;
        self.stop_locked(&entry, &mut life).await?;
        Ok(life.rec.sandbox.clone())
    }

    pub async fn start(self: &Arc<Self>, id: &str) -> Result<Sandbox, ApiError> {
        let op = self.start_operation(id).await?;
        self.finished(op).await
    }

    pub async fn restart(self: &Arc<Self>, id: &str) -> Result<Sandbox, ApiError> {
        let op = self.restart_operation(id).await?;
        self.finished(op).await
    }

    fn begin_boot(&self, entry: &Entry<B::Handle>, life: &mut Life<B::Handle>) -> Result<(), ApiError> {
        life.rec.sandbox.state = state::transition(life.rec.sandbox.state, Event::Boot).map_err(invalid)?;
        life.rec.sandbox.steps.clear();
        push_step(&mut life.rec.sandbox, "start_requested", None);
        self.commit(entry, &life.rec)
    }

    /// Deletes a sandbox: stops it, removes its files, forgets it.
    /// Deleting a sandbox that is already gone is not an error for the
    /// caller that raced with us: it gets 404, and nothing is left behind.
    pub async fn delete(&self, id: &str) -> Result<(), ApiError> {
        let entry = self.find(id)?;
        let mut life = entry.lifecycle.lock().await;
        if life.rec.sandbox.state != SandboxState::Deleted {
            // Recorded before anything is killed or removed, so a crash
            // mid-delete finishes the delete at the next start instead of
            // resurrecting (or failing) the sandbox.
            life.rec.sandbox.state = state::transition(life.rec.sandbox.state, Event::Delete).map_err(invalid)?;
            push_step(&mut life.rec.sandbox, "delete_requested", None);
            self.commit(&entry, &life.rec)?;
        }
        life.generation += 1;
        match life.handle.take() {
            Some(h) => self.backend.kill(&entry.id, &h).await?,
            None => self.backend.cleanup(&entry.id).await,
        }
        self.backend.destroy(&entry.id)?;
        self.store.delete(&entry.id).map_err(store_err)?;
        self.entries.lock().expect("entries").remove(&entry.id);
        self.events.publish(EventBody::SandboxDeleted { sandbox_id: entry.id.clone(), name: entry.name.clone() });
        Ok(())
    }

    /// Changes labels, deadline or limits.
    pub async fn update(&self, id: &str, req: UpdateSandboxRequest) -> Result<Sandbox, ApiError> {
        req.validate()?;
        let entry = self.find(id)?;
        let mut life = entry.lifecycle.lock().await;
        if life.rec.sandbox.state == SandboxState::Deleted {
            return Err(ApiError::not_found(format!("no sandbox {id:?}")));
        }
        for (k, v) in req.labels {
            if v.is_empty() {
                life.rec.sandbox.labels.remove(&k);
            } else {
                life.rec.sandbox.labels.insert(k, v);
            }
        }
        match req.idle_ttl_s {
            Some(0) => life.rec.sandbox.idle_ttl_s = None,
            Some(s) => {
                life.rec.sandbox.idle_ttl_s = Some(s);
                life.rec.sandbox.delete_at = Some(Timestamp::now().plus(Duration::from_secs(s)));
            }
            None => {}
        }
        match req.ttl_s {
            Some(0) => life.rec.sandbox.delete_at = None,
            Some(s) => life.rec.sandbox.delete_at = Some(Timestamp::now().plus(Duration::from_secs(s))),
            None => {}
        }
        if let Some(r) = req.resources {
            let merged = merge_resources(&life.rec.sandbox.resources, &r);
            if life.handle.is_some() {
                self.backend.set_limits(&entry.id, &merged)?;
            }
            life.rec.sandbox.resources = merged;
        }
        self.commit(&entry, &life.rec)?;
        Ok(life.rec.sandbox.clone())
    }

    pub fn get(&self, id: &str) -> Result<Sandbox, ApiError> {
        Ok(self.find(id)?.view.lock().expect("view").clone())
    }

    /// Lists sandboxes ordered by id, a page at a time.
    pub fn list(&self, q: &PageQuery) -> Page<Sandbox> {
        let limit =
            q.limit.unwrap_or(flotilla_api::limits::DEFAULT_PAGE_SIZE).clamp(1, flotilla_api::limits::MAX_PAGE_SIZE);
        let entries = self.entries.lock().expect("entries");
        let after = q.page_token.clone().unwrap_or_default();
        let mut items: Vec<Sandbox> = entries
            .range::<String, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .take(limit + 1)
            .map(|(_, e)| e.view.lock().expect("view").clone())
            .collect();
        let next_page_token = (items.len() > limit).then(|| {
            items.truncate(limit);
            items.last().map(|s| s.id.clone()).unwrap_or_default()
        });
        Page { items, next_page_token }
    }

    // ------------------------------------------------------------ workspace

    /// The agent of a running sandbox, checked under the lifecycle lock,
    /// which is released before the caller does any I/O.
    pub async fn agent(&self, id: &str) -> Result<AgentClient, ApiError> {
        let entry = self.find(id)?;
        self.working_agent(&entry, id).await
    }

    /// Work is about to start (exec, put, get, session, git): checks the
    /// sandbox runs and renews its idle deadline, under the lifecycle lock,
    /// which is released before the caller does any I/O.
    async fn working_agent(&self, entry: &Entry<B::Handle>, id: &str) -> Result<AgentClient, ApiError> {
        let mut life = entry.lifecycle.lock().await;
        let agent = self.agent_locked(&life, id)?;
        self.touch(entry, &mut life);
        Ok(agent)
    }

    /// The query of an import: the node's tar limits apply.
    fn import_query(&self, dir: Option<String>) -> WorkspaceQuery {
        WorkspaceQuery {
            dir,
            max_bytes: Some(self.config.tar_max_bytes),
            max_entries: Some(self.config.tar_max_entries),
        }
    }

    /// Activity: pushes `delete_at` out by the idle TTL, if the sandbox has
    /// one. Written at most once a second per sandbox.
    fn touch(&self, entry: &Entry<B::Handle>, life: &mut Life<B::Handle>) {
        let Some(idle) = life.rec.sandbox.idle_ttl_s else { return };
        let next = Timestamp::now().plus(Duration::from_secs(idle));
        if life.rec.sandbox.delete_at.is_some_and(|d| d.0 + 1000 > next.0) {
            return;
        }
        life.rec.sandbox.delete_at = Some(next);
        if let Err(e) = self.commit(entry, &life.rec) {
            tracing::warn!(sandbox = %entry.id, error = %e, "renewing the idle deadline failed");
        }
    }

    fn agent_locked(&self, life: &Life<B::Handle>, id: &str) -> Result<AgentClient, ApiError> {
        match (&life.handle, life.rec.sandbox.state) {
            (Some(h), s) if state::accepts_work(s) => Ok(self.backend.agent(h)),
            (_, s) => Err(ApiError::conflict(format!("sandbox {id:?} is {s}, not running"))
                .with_details(serde_json::json!({ "state": s.as_str() }))),
        }
    }

    /// Streams a tarball into the workspace (DESIGN §5: lifecycle lock for
    /// the check only, workspace lock across the I/O).
    pub async fn import(
        &self,
        id: &str,
        body: Body,
        encoding: Option<String>,
        dir: Option<String>,
    ) -> Result<ImportSummary, ApiError> {
        let entry = self.find(id)?;
        let agent = self.working_agent(&entry, id).await?;
        let _ws = entry.workspace.lock().await;
        let q = self.import_query(dir);
        let summary = self.backend.import(agent, body, encoding, q).await.map_err(|e| e.to_api())?;
        self.metrics.imported("workspace", summary.bytes);
        Ok(summary)
    }

    /// Exports a revision of a git repository into the workspace, as an
    /// operation, under the same locks as a tar import.
    pub async fn git_import_operation(
        self: &Arc<Self>,
        id: &str,
        req: flotilla_api::GitImportRequest,
    ) -> Result<Operation, ApiError> {
        let entry = self.find(id)?;
        self.working_agent(&entry, id).await?;
        let op = self.ops.begin(OperationKind::WorkspaceGit, &entry.id)?;
        let snapshot = op.snapshot();
        let node = self.clone();
        tokio::spawn(async move {
            let result = node.git_import(&entry, &req, &op).await;
            match result {
                Ok(summary) => op.succeed(serde_json::to_value(&summary).unwrap_or_default()),
                Err(e) => op.fail(e),
            }
        });
        Ok(snapshot)
    }

    async fn git_import(
        &self,
        entry: &Arc<Entry<B::Handle>>,
        req: &flotilla_api::GitImportRequest,
        op: &OpHandle,
    ) -> Result<flotilla_api::GitImportSummary, ApiError> {
        let rev = req.rev.as_deref().unwrap_or("HEAD");
        op.step("inspect_repo", Some(format!("{} {rev}", req.repo)));
        let revision = crate::git::inspect(&req.repo, rev, &self.config.home.join("tmp")).await?;
        op.step("resolved", Some(revision.commit.clone()));
        let _ws = entry.workspace.lock().await;
        // Checked again now that the lock is ours: the sandbox may have
        // stopped while the repository was fetched.
        let agent = {
            let life = entry.lifecycle.lock().await;
            self.agent_locked(&life, &entry.id)?
        };
        op.step("start_write_tar", None);
        let mut child = crate::git::archive(&revision)?;
        let stdout = child.stdout.take().expect("piped");
        let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(stdout, 256 << 10));
        let q = self.import_query(req.dir.clone());
        let imported = self.backend.import(agent, body, None, q).await.map_err(|e| e.to_api());
        let archived = crate::git::finish(child).await;
        let import = imported?;
        archived?;
        op.step("end_write_tar", Some(format!("{} entries, {} bytes", import.entries, import.bytes)));
        self.metrics.imported("git", import.bytes);
        Ok(flotilla_api::GitImportSummary { commit: revision.commit, import })
    }

    /// Streams the workspace out. Waits for an import in flight, so it never
    /// snapshots a half-written tree. The lock is held while the response
    /// streams: `Exported` releases it when dropped.
    pub async fn export(&self, id: &str, dir: Option<String>) -> Result<Exported, ApiError> {
        let entry = self.find(id)?;
        let agent = self.working_agent(&entry, id).await?;
        let lock = entry.workspace.clone().lock_owned().await;
        let q = WorkspaceQuery { dir, ..Default::default() };
        let body = self.backend.export(agent, q).await.map_err(|e| e.to_api())?;
        Ok(Exported { body, lock })
    }

    // ------------------------------------------------------------ janitor and node

    /// Deletes sandboxes whose `delete_at` has passed. Returns their ids.
    pub async fn reap_expired(&self) -> Vec<String> {
        let now = Timestamp::now();
        let expired: Vec<String> = self
            .entries
            .lock()
            .expect("entries")
            .values()
            .filter(|e| e.view.lock().expect("view").delete_at.is_some_and(|d| d <= now))
            .map(|e| e.id.clone())
            .collect();
        let mut reaped = Vec::new();
        for id in expired {
            match self.delete(&id).await {
                Ok(()) => {
                    tracing::info!(sandbox = %id, "janitor deleted sandbox: its delete_at passed");
                    self.metrics.reaped("expired");
                    self.events.publish(EventBody::Reaped {
                        what: "sandbox".into(),
                        target: id.clone(),
                        reason: "its delete_at passed".into(),
                    });
                    reaped.push(id);
                }
                Err(e) => tracing::warn!(sandbox = %id, error = %e, "janitor could not delete expired sandbox"),
            }
        }
        reaped
    }

    /// Removes what the backend has on this host for sandboxes the registry
    /// does not know (left by a crash between a sandbox's files appearing and
    /// its record, or by a record lost with a data directory). Returns their ids.
    pub async fn reap_orphans(&self) -> Vec<String> {
        let resident = self.backend.resident();
        let orphans: Vec<String> = {
            let entries = self.entries.lock().expect("entries");
            resident.into_iter().filter(|id| !entries.contains_key(id)).collect()
        };
        for id in &orphans {
            self.backend.cleanup(id).await;
            let how = match self.backend.destroy(id) {
                Ok(()) => "removed".to_string(),
                Err(e) => format!("not removed: {e}"),
            };
            tracing::warn!(sandbox = %id, outcome = %how, "janitor reaped an orphan: the registry does not know this sandbox");
            self.metrics.reaped("orphan");
            self.events.publish(EventBody::Reaped {
                what: "orphan".into(),
                target: id.clone(),
                reason: "on this host but not in the registry".into(),
            });
        }
        orphans
    }

    /// Sets a warm pool of microVMs of `req.image` (pinned to its current
    /// version) and shape; size 0 removes it.
    pub fn set_pool(&self, req: flotilla_api::VmPoolRequest) -> Result<Vec<flotilla_api::VmPool>, ApiError> {
        req.resources.validate()?;
        if req.size > 64 {
            return Err(ApiError::invalid(format!("a pool of {} is more than 64 microVMs", req.size)));
        }
        let image = self.resolve_image(&req.image)?;
        let r = merge_resources(&self.defaults_for(flotilla_api::BackendKind::Vm), &req.resources);
        self.backend.set_pool(image, req.size, &r)?;
        Ok(self.backend.pools())
    }

    pub fn pools(&self) -> Vec<flotilla_api::VmPool> {
        self.backend.pools()
    }

    /// Default limits for a backend: a microVM's memory is reserved for its
    /// guest, so it gets less than a process sandbox's ceiling.
    fn defaults_for(&self, backend: flotilla_api::BackendKind) -> Resources {
        let mut r = self.config.default_resources.clone();
        if backend == flotilla_api::BackendKind::Vm {
            r.memory_bytes = Some(VM_DEFAULT_MEMORY);
        }
        r
    }

    /// Runs the janitor until the node is dropped.
    pub fn spawn_janitor(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let period = self.config.janitor_period;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(node) = weak.upgrade() else { return };
                node.reap_expired().await;
                node.reap_orphans().await;
                node.ops.prune();
            }
        });
    }

    /// Graceful node shutdown (SIGTERM, Ctrl-C): stops every running
    /// sandbox, except those of app instances (label
    /// `flotilla.app.instance`) unless the node runs with `stop_apps`: an
    /// app outlives a restart of its node, which re-adopts it. (A hand-over
    /// to a new binary calls nothing here: every sandbox keeps running.)
    pub async fn shutdown(&self) {
        /// The label an app instance's sandbox carries.
        const APP_INSTANCE: &str = "flotilla.app.instance";
        let entries: Vec<_> = self.entries.lock().expect("entries").values().cloned().collect();
        for e in entries {
            let mut life = e.lifecycle.lock().await;
            if life.handle.is_none() {
                continue;
            }
            if !self.config.stop_apps && life.rec.sandbox.labels.contains_key(APP_INSTANCE) {
                tracing::info!(sandbox = %e.id, "app instance keeps running (--stop-apps stops it)");
                continue;
            }
            if let Err(err) = self.stop_locked(&e, &mut life).await {
                tracing::warn!(sandbox = %e.id, error = %err, "stopping at shutdown failed");
            }
        }
        // Releases the node's cgroup group; one that still holds an app's
        // sandbox stays.
        self.backend.shutdown();
    }

    /// Whether a sandbox with outbound network is running (after a
    /// shutdown: an app instance left running), so that the node's egress
    /// policy must stay in place.
    pub fn runs_outbound(&self) -> bool {
        self.entries.lock().expect("entries").values().any(|e| {
            let v = e.view.lock().expect("view");
            v.network == flotilla_api::NetworkMode::Outbound && v.state != SandboxState::Stopped
        })
    }

    /// How many sandboxes are in each state (what `/metrics` needs, without
    /// the rest of [`Node::info`]'s host probing and image listing).
    pub fn state_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for e in self.entries.lock().expect("entries").values() {
            *counts.entry(e.view.lock().expect("view").state.as_str().to_string()).or_insert(0) += 1;
        }
        counts
    }

    pub fn info(&self) -> NodeInfo {
        let counts = self.state_counts();
        let (mut millicpus, mut memory) = (0u64, 0u64);
        for e in self.entries.lock().expect("entries").values() {
            let v = e.view.lock().expect("view");
            if v.state == SandboxState::Running {
                millicpus += v.resources.cpus.map_or(0, |c| (c * 1000.0).ceil() as u64);
                memory += v.resources.memory_bytes.unwrap_or(0);
            }
        }
        NodeInfo {
            node_id: self.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            kernel: flotilla_sandbox::sys::kernel_release(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_bytes: mem_total(),
            backends: self.backend.backends(),
            images: {
                let mut v = self.backend.images();
                v.extend(self.images().unwrap_or_default().into_iter().map(|i| i.reference));
                v
            },
            network_modes: self.backend.network_modes(),
            cgroup: self.backend.cgroup_version(),
            sandboxes: counts,
            allocated_millicpus: millicpus,
            allocated_memory_bytes: memory,
            warm_pools: self.backend.pools().into_iter().filter(|p| p.ready > 0).map(|p| p.image).collect(),
        }
    }
}

/// A workspace export in flight; holds the sandbox's workspace lock until
/// the body has been sent (or dropped).
pub struct Exported {
    pub body: Body,
    pub lock: tokio::sync::OwnedMutexGuard<()>,
}

/// Ends a sandbox operation with its result.
fn finish_op(op: OpHandle, result: Result<Sandbox, ApiError>) {
    match result {
        Ok(s) => op.succeed(serde_json::to_value(&s).unwrap_or_default()),
        Err(e) => op.fail(e),
    }
}

/// The first deadline of a new sandbox: the sooner of its TTL and idle TTL.
fn deadline(now: Timestamp, ttl_s: Option<u64>, idle_ttl_s: Option<u64>) -> Option<Timestamp> {
    let at = |s: u64| now.plus(Duration::from_secs(s));
    match (ttl_s.map(at), idle_ttl_s.map(at)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn invalid(e: state::InvalidTransition) -> ApiError {
    ApiError::new(ErrorCode::Conflict, e.to_string())
}

fn push_step(s: &mut Sandbox, name: &str, detail: Option<String>) {
    s.steps.push(Step { name: name.into(), at: Timestamp::now(), detail });
}

fn merge_resources(base: &Resources, over: &Resources) -> Resources {
    Resources {
        cpus: over.cpus.or(base.cpus),
        memory_bytes: over.memory_bytes.or(base.memory_bytes),
        pids: over.pids.or(base.pids),
        disk_bytes: over.disk_bytes.or(base.disk_bytes),
    }
}

fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
