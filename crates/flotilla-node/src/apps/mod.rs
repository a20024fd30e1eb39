//! Apps on a node (DESIGN §5 "Apps", seed 002): installations of
//! envelopes, and instances that run in sandboxes under supervision.
//!
//! The disk is the truth ([`disk`]): every state is a file whose name is
//! the state, changed by rename, so of two racing calls one wins and the
//! other gets `in_progress`, `invalid_transition` or `no_op`, and a crash at
//! any point leaves a state the next start-up knows how to finish.
//!
//! Operations only change states and wake the instance's supervisor
//! ([`supervise`]), a task that owns every side effect: it creates or
//! restarts the sandbox, starts the app as a detached process with an id
//! derived from its run number (so a crash between "exec" and "record"
//! never runs it twice), copies its output into stamped, rotated files
//! ([`logs`]), forwards host ports to it ([`forward`]), publishes its names
//! while it serves, and restarts it per its policy. Recovery after a crash
//! or a hand-over is the same code: a supervisor is started for every
//! instance and carries on from its state.

pub mod disk;
mod forward;
pub mod logs;
mod supervise;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use flotilla_api::app::{
    AppInstallation, AppInstance, Envelope, InstallRequest, InstallationState, InstanceState, PortForward,
    RestartHistory,
};
use flotilla_api::{ApiError, ErrorCode, EventBody, ExitStatus, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::node::{Backend, Node};
use disk::{Damaged, InstKey, InstanceKey, Layout};

/// How long an operation waits for an instance to leave a transitional
/// state before it answers with what it sees.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Label every instance's sandbox carries (its address): a node shutdown
/// leaves these running unless told to stop apps.
pub const INSTANCE_LABEL: &str = "flotilla.app.instance";

fn instance_states() -> [&'static str; 7] {
    InstanceState::FILES.map(InstanceState::as_str)
}

const INSTALLATION_STATES: [&str; 2] = ["active", "uninstalled"];

/// What a supervisor keeps on disk about an instance's runs (`run.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunRecord {
    /// Runs started so far; the current one's process id is `run-<run>`.
    #[serde(default)]
    pub run: u64,
    #[serde(default)]
    pub sandbox: Option<String>,
    /// The version the sandbox was made for.
    #[serde(default)]
    pub sandbox_version: Option<String>,
    /// The running process, if one was started and has not been seen to end.
    #[serde(default)]
    pub process: Option<String>,
    /// Output bytes of the process already in the log.
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub started_at: Option<Timestamp>,
    /// When a waiting instance starts again.
    #[serde(default)]
    pub retry_at: Option<Timestamp>,
    #[serde(default)]
    pub history: RestartHistory,
    #[serde(default)]
    pub last_exit: Option<ExitStatus>,
    #[serde(default)]
    pub reason: Option<String>,
    /// Instance port → host port, kept so addresses survive restarts.
    #[serde(default)]
    pub host_ports: BTreeMap<u16, u16>,
}

/// What only memory knows about an instance.
#[derive(Default)]
pub(crate) struct Live {
    pub pid: Option<i32>,
    pub ports: Vec<PortForward>,
    pub published: Vec<String>,
    pub publisher: Option<flotilla_names::Publisher>,
    pub forwards: Vec<tokio::task::JoinHandle<()>>,
    /// The forwarded ports' listeners, by address (kept for a hand-over).
    pub listeners: Vec<(String, Arc<tokio::net::TcpListener>)>,
    pub sandbox: Option<String>,
}

/// One instance in memory.
pub(crate) struct Instance {
    pub key: InstanceKey,
    pub dir: PathBuf,
    /// Held by operations and by the supervisor while they decide and
    /// change state; never across a wait for the app.
    pub lock: tokio::sync::Mutex<()>,
    /// Wakes the supervisor (a permit is kept if it is not waiting).
    pub wake: Notify,
    /// Bumped on every change, for callers waiting on a transition.
    pub changed: watch::Sender<u64>,
    pub live: Mutex<Live>,
    pub task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Instance {
    fn new(key: InstanceKey, dir: PathBuf) -> Arc<Instance> {
        Arc::new(Instance {
            key,
            dir,
            lock: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            changed: watch::channel(0).0,
            live: Mutex::new(Live::default()),
            task: Mutex::new(None),
        })
    }

    pub fn state(&self) -> Result<InstanceState, Damaged> {
        let s = disk::read_state(&self.dir, &instance_states())?;
        Ok(InstanceState::parse(s).expect("a known state"))
    }

    pub fn load(&self) -> Result<RunRecord, Damaged> {
        load_run(&self.dir)
    }

    pub fn save(&self, rec: &RunRecord) -> Result<(), ApiError> {
        let data = serde_json::to_vec_pretty(rec).expect("serialisable");
        disk::write_atomic(&self.dir.join("run.json"), &data).map_err(|e| io_err("saving run.json", &self.dir, e))
    }

    pub fn version(&self) -> String {
        std::fs::read_to_string(self.dir.join("version")).map(|s| s.trim().to_string()).unwrap_or_default()
    }

    pub fn set_version(&self, v: &str) -> Result<(), ApiError> {
        disk::write_atomic(&self.dir.join("version"), v.as_bytes()).map_err(|e| io_err("writing version", &self.dir, e))
    }

    /// Renames the state file; `Ok(false)` if `from` was not the state.
    pub fn transition(&self, from: InstanceState, to: InstanceState) -> Result<bool, ApiError> {
        let moved = disk::transition(&self.dir, from.as_str(), to.as_str())
            .map_err(|e| io_err("changing the instance state", &self.dir, e))?;
        if moved {
            self.changed.send_modify(|v| *v += 1);
        }
        Ok(moved)
    }

    pub fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }
}

fn load_run(dir: &Path) -> Result<RunRecord, Damaged> {
    match std::fs::read(dir.join("run.json")) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| Damaged(format!("run.json is damaged: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RunRecord::default()),
        Err(e) => Err(Damaged(format!("cannot read run.json: {e}"))),
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> ApiError {
    ApiError::internal(format!("{what} in {}: {e}", path.display()))
}

/// The error for an operation refused because of the state it found.
fn refused(address: &str, op: &str, state: InstanceState, target: InstanceState) -> ApiError {
    let (code, why) = if state.is_transitional() {
        (ErrorCode::InProgress, format!("it is {} (another operation is under way)", state.as_str()))
    } else if state == target {
        (ErrorCode::NoOp, format!("it is already {}", state.as_str()))
    } else {
        (ErrorCode::InvalidTransition, format!("it is {}", state.as_str()))
    };
    ApiError::new(code, format!("cannot {op} instance {address}: {why}"))
        .with_details(serde_json::json!({ "state": state.as_str() }))
}

/// The apps of a node.
pub struct Apps<B: Backend> {
    node: Weak<Node<B>>,
    layout: Layout,
    log_limits: logs::Limits,
    instances: Mutex<BTreeMap<InstanceKey, Arc<Instance>>>,
    quarantined: Mutex<BTreeMap<InstanceKey, String>>,
    inst_locks: Mutex<BTreeMap<InstKey, Arc<tokio::sync::Mutex<()>>>>,
    names: Mutex<Option<Arc<dyn flotilla_names::NameTable>>>,
    /// The address forwarded ports listen on and are published at.
    host: String,
    /// Forwarded connections open now (a hand-over lets them finish).
    pub(crate) open_connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Listening sockets the node this one replaced handed over
    /// (`HOST:PORT` → descriptor), taken as instances bind their ports.
    inherited: Mutex<BTreeMap<String, std::os::fd::RawFd>>,
}

/// How long a hand-over waits for forwarded connections in flight.
pub const HANDOVER_DRAIN: Duration = Duration::from_secs(2);

/// The environment variable a node hands its forwarded ports' listening
/// sockets to its successor in: `HOST:PORT=FD,...`.
pub const INHERITED_LISTENERS_ENV: &str = "FLOTILLA_INHERITED_LISTENERS";

impl<B: Backend> std::fmt::Debug for Apps<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apps").field("root", &self.layout.root()).finish_non_exhaustive()
    }
}

impl<B: Backend> Apps<B> {
    /// Opens the apps under the node's data dir, finishes what a crash
    /// interrupted and starts a supervisor for every live instance. A
    /// damaged instance is quarantined, never a reason not to start.
    pub(crate) fn open(node: &Arc<Node<B>>) -> Arc<Apps<B>> {
        let apps = Arc::new(Apps {
            node: Arc::downgrade(node),
            layout: Layout::new(&node.config().home),
            log_limits: logs::Limits::from_env(),
            instances: Mutex::new(BTreeMap::new()),
            quarantined: Mutex::new(BTreeMap::new()),
            inst_locks: Mutex::new(BTreeMap::new()),
            names: Mutex::new(None),
            host: std::env::var("FLOTILLA_APP_HOST").unwrap_or_else(|_| "127.0.0.1".into()),
            open_connections: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            inherited: Mutex::new(
                std::env::var(INHERITED_LISTENERS_ENV)
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|kv| {
                        let (addr, fd) = kv.split_once('=')?;
                        Some((addr.to_string(), fd.parse().ok()?))
                    })
                    .collect(),
            ),
        });
        apps.recover();
        apps
    }

    /// Where instances publish their names (the node's name table).
    pub fn set_name_table(&self, table: Arc<dyn flotilla_names::NameTable>) {
        *self.names.lock().expect("names") = Some(table);
        // Instances already serving publish now.
        for inst in self.instances.lock().expect("instances").values() {
            inst.wake.notify_one();
        }
    }

    /// For a hand-over by `execve`: stops accepting on the forwarded ports
    /// (the sockets stay open), lets the connections in flight finish
    /// (within [`HANDOVER_DRAIN`]), marks each listening socket to survive
    /// the exec and returns the variable to pass them in. Connections that
    /// arrive meanwhile wait in the sockets' backlogs, so no client is
    /// refused while the next node starts; one still open after the drain
    /// is cut.
    pub async fn handover_listeners(&self) -> (String, String) {
        for inst in self.instances.lock().expect("instances").values() {
            for t in &inst.live.lock().expect("live").forwards {
                t.abort();
            }
        }
        let deadline = tokio::time::Instant::now() + HANDOVER_DRAIN;
        while self.open_connections.load(std::sync::atomic::Ordering::SeqCst) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let left = self.open_connections.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            tracing::warn!(connections = left, "forwarded connections still open at the hand-over are cut");
        }
        let mut pairs = Vec::new();
        for inst in self.instances.lock().expect("instances").values() {
            for (addr, l) in &inst.live.lock().expect("live").listeners {
                use std::os::fd::{AsFd, AsRawFd};
                match flotilla_sandbox::sys::keep_across_exec(l.as_fd()) {
                    Ok(()) => pairs.push(format!("{addr}={}", l.as_raw_fd())),
                    Err(e) => tracing::warn!(address = %addr, error = %e, "cannot hand the listener over"),
                }
            }
        }
        (INHERITED_LISTENERS_ENV.to_string(), pairs.join(","))
    }

    /// A listener handed over for `addr` by the node this one replaced.
    pub(crate) fn take_inherited(&self, addr: &str) -> Option<tokio::net::TcpListener> {
        let fd = self.inherited.lock().expect("inherited").remove(addr)?;
        let owned = flotilla_sandbox::sys::take_inherited_fd(fd).ok()?;
        let std = std::net::TcpListener::from(owned);
        std.set_nonblocking(true).ok()?;
        match tokio::net::TcpListener::from_std(std) {
            Ok(l) if l.local_addr().is_ok_and(|a| a.to_string() == addr) => Some(l),
            _ => None,
        }
    }

    fn node(&self) -> Result<Arc<Node<B>>, ApiError> {
        self.node.upgrade().ok_or_else(|| ApiError::new(ErrorCode::NotReady, "the node is shutting down"))
    }

    fn recover(self: &Arc<Self>) {
        for (key, dir) in self.layout.installations() {
            if disk::read_state(&dir, &INSTALLATION_STATES).is_err() && disk::read_link(&dir, "current").is_none() {
                tracing::warn!(installation = %key.address(), "removing an install a crash interrupted");
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
            disk::remove_leftovers(&dir);
            for v in disk::incomplete_versions(&dir) {
                tracing::warn!(version = %v.display(), "removing a version a crash left half-written");
                let _ = std::fs::remove_dir_all(&v);
            }
            for (n, idir) in self.layout.instances(&key) {
                let ikey = key.instance(&n);
                if !idir.join("state").exists() {
                    tracing::warn!(instance = %ikey.address(), "removing an instance a crash left half-created");
                    let _ = std::fs::remove_dir_all(&idir);
                    continue;
                }
                disk::remove_leftovers(&idir);
                let inst = Instance::new(ikey.clone(), idir);
                let checked = inst.state().and_then(|s| inst.load().map(|_| s));
                match checked {
                    Err(Damaged(why)) => {
                        tracing::error!(instance = %ikey.address(), reason = %why, "quarantined: its state cannot be read; the others start");
                        self.quarantined.lock().expect("quarantine").insert(ikey, why);
                    }
                    Ok(state) => {
                        self.instances.lock().expect("instances").insert(ikey.clone(), inst.clone());
                        if state != InstanceState::NotRunning {
                            self.supervise(&inst);
                        }
                    }
                }
            }
            self.collect(&key);
        }
    }

    fn inst_lock(&self, k: &InstKey) -> Arc<tokio::sync::Mutex<()>> {
        self.inst_locks.lock().expect("inst locks").entry(k.clone()).or_default().clone()
    }

    fn installation_dir(&self, k: &InstKey) -> Result<PathBuf, ApiError> {
        let dir = self.layout.installation(k);
        if !dir.join("state").is_dir() {
            return Err(ApiError::not_found(format!("no app installation {}", k.address())));
        }
        Ok(dir)
    }

    fn installation_state(&self, k: &InstKey) -> Result<InstallationState, ApiError> {
        let dir = self.installation_dir(k)?;
        match disk::read_state(&dir, &INSTALLATION_STATES) {
            Ok("active") => Ok(InstallationState::Active),
            Ok(_) => Ok(InstallationState::Uninstalled),
            Err(Damaged(why)) => Err(ApiError::internal(format!("installation {}: {why}", k.address()))),
        }
    }

    fn instance(&self, k: &InstanceKey) -> Result<Arc<Instance>, ApiError> {
        if let Some(why) = self.quarantined.lock().expect("quarantine").get(k) {
            return Err(ApiError::conflict(format!("instance {} is quarantined: {why}", k.address())));
        }
        self.instances
            .lock()
            .expect("instances")
            .get(k)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no app instance {}", k.address())))
    }

    /// The envelope of a version of an installation.
    pub(crate) fn envelope(&self, k: &InstKey, version: &str) -> Result<Envelope, ApiError> {
        let path = self.layout.installation(k).join(version).join("envelope.json");
        let data = std::fs::read(&path).map_err(|e| io_err("reading the envelope", &path, e))?;
        serde_json::from_slice(&data).map_err(|e| ApiError::internal(format!("{} is damaged: {e}", path.display())))
    }

    fn current(&self, k: &InstKey) -> Result<String, ApiError> {
        disk::read_link(&self.layout.installation(k), "current")
            .ok_or_else(|| ApiError::internal(format!("installation {} has no current version", k.address())))
    }

    // ------------------------------------------------------------ installations

    /// Installs an envelope: a new installation with version `v1`.
    pub async fn install(self: &Arc<Self>, req: InstallRequest) -> Result<AppInstallation, ApiError> {
        self.check(&req.envelope)?;
        let title = req.envelope.title.clone();
        let app = self.layout.app(&title);
        std::fs::create_dir_all(&app).map_err(|e| io_err("creating the app directory", &app, e))?;
        if !app.join("title").exists() {
            disk::write_atomic(&app.join("title"), title.as_bytes()).map_err(|e| io_err("naming the app", &app, e))?;
        }
        let (inst, dir) =
            disk::create_numbered(&app, "installation-").map_err(|e| io_err("creating the installation", &app, e))?;
        let key = InstKey { title, inst };
        let lock = self.inst_lock(&key);
        let _g = lock.lock().await;
        // The state file is the commit: without it, start-up removes the rest.
        let made = async {
            let v = self.write_version(&dir, &req).await?;
            disk::swap_link(&dir, "current", &v).map_err(|e| io_err("linking current", &dir, e))?;
            disk::init_state(&dir, "active").map_err(|e| io_err("activating the installation", &dir, e))
        }
        .await;
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        tracing::info!(installation = %key.address(), "app installed");
        self.installation_event(&key, "installed");
        self.installation(&key)
    }

    /// Checks an envelope against this node: its fields, its image, its names.
    fn check(&self, e: &Envelope) -> Result<(), ApiError> {
        e.validate()?;
        let node = self.node()?;
        node.check_image_ref(e.image())
            .map_err(|err| flotilla_api::field_error("image", format!("{:?}: {}", e.image(), err.message)))?;
        for n in &e.publish {
            flotilla_names::Name::parse(n).map_err(|err| flotilla_api::field_error("publish", err))?;
        }
        Ok(())
    }

    /// Writes a new version dir; `envelope.json` last, so a crash leaves
    /// an incomplete dir that start-up removes.
    async fn write_version(&self, dir: &Path, req: &InstallRequest) -> Result<String, ApiError> {
        let (n, vdir) = disk::create_numbered(dir, "v").map_err(|e| io_err("creating a version", dir, e))?;
        let written = async {
            if let Some(b) = &req.envelope.binary {
                supervise::fetch_binary(b, &vdir.join("bin")).await?;
            }
            let origin = req.origin.clone().unwrap_or_else(|| "api".into());
            disk::write_atomic(&vdir.join("origin"), origin.as_bytes())
                .map_err(|e| io_err("writing origin", &vdir, e))?;
            let env = serde_json::to_vec_pretty(&req.envelope).expect("serialisable");
            disk::write_atomic(&vdir.join("envelope.json"), &env).map_err(|e| io_err("writing the envelope", &vdir, e))
        }
        .await;
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&vdir);
            return Err(e);
        }
        Ok(format!("v{n}"))
    }

    /// Updates an installation to a new envelope (same title): a new
    /// version, `previous` and `current` swapped, running instances moved
    /// onto it one by one.
    pub async fn update(self: &Arc<Self>, k: &InstKey, req: InstallRequest) -> Result<AppInstallation, ApiError> {
        let dir = self.installation_dir(k)?;
        if req.envelope.title != k.title {
            return Err(flotilla_api::field_error(
                "title",
                format!("is {:?}, but an update must keep the app's title {:?}", req.envelope.title, k.title),
            ));
        }
        self.check(&req.envelope)?;
        let lock = self.inst_lock(k);
        let _g = lock.lock().await;
        self.require_active(k, "update")?;
        let old = self.current(k)?;
        let new = self.write_version(&dir, &req).await?;
        disk::swap_link(&dir, "previous", &old).map_err(|e| io_err("linking previous", &dir, e))?;
        disk::swap_link(&dir, "current", &new).map_err(|e| io_err("linking current", &dir, e))?;
        tracing::info!(installation = %k.address(), from = %old, to = %new, "app updated");
        self.installation_event(k, "updated");
        self.roll(k).await;
        self.collect(k);
        self.installation(k)
    }

    /// Swaps `current` and `previous`, and moves running instances over.
    pub async fn revert(self: &Arc<Self>, k: &InstKey) -> Result<AppInstallation, ApiError> {
        let dir = self.installation_dir(k)?;
        let lock = self.inst_lock(k);
        let _g = lock.lock().await;
        self.require_active(k, "revert")?;
        let cur = self.current(k)?;
        let Some(prev) = disk::read_link(&dir, "previous") else {
            return Err(ApiError::new(
                ErrorCode::InvalidTransition,
                format!("cannot revert {}: it has no previous version", k.address()),
            ));
        };
        disk::swap_link(&dir, "current", &prev).map_err(|e| io_err("linking current", &dir, e))?;
        disk::swap_link(&dir, "previous", &cur).map_err(|e| io_err("linking previous", &dir, e))?;
        tracing::info!(installation = %k.address(), from = %cur, to = %prev, "app reverted");
        self.installation_event(k, "reverted");
        self.roll(k).await;
        self.installation(k)
    }

    fn require_active(&self, k: &InstKey, op: &str) -> Result<(), ApiError> {
        match self.installation_state(k)? {
            InstallationState::Active => Ok(()),
            InstallationState::Uninstalled => Err(ApiError::new(
                ErrorCode::InvalidTransition,
                format!("cannot {op} {}: it is uninstalled", k.address()),
            )),
        }
    }

    /// Moves every running or suspended instance onto the current version,
    /// one at a time, so an app with several instances keeps serving.
    async fn roll(self: &Arc<Self>, k: &InstKey) {
        for inst in self.instances_of(k) {
            let _g = inst.lock.lock().await;
            let moved = [InstanceState::Running, InstanceState::Suspended]
                .into_iter()
                .any(|from| inst.transition(from, InstanceState::Updating).unwrap_or(false));
            drop(_g);
            if moved {
                self.event(&inst);
                self.supervise(&inst);
                inst.wake.notify_one();
                self.settle(&inst).await;
                self.until_listening(&inst).await;
            }
        }
    }

    /// Waits (bounded) until a running instance's first port accepts a
    /// connection inside its sandbox, so a rolling update moves to the next
    /// instance only once this one serves again. No ports: returns at once.
    async fn until_listening(&self, inst: &Instance) {
        let Ok(env) = self.envelope(&inst.key.installation(), &inst.version()) else { return };
        let Some(port) = env.ports.first().copied() else { return };
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if inst.state() != Ok(InstanceState::Running) {
                return;
            }
            let rec = inst.load().unwrap_or_default();
            if let (Some(sandbox), Some(_)) = (&rec.sandbox, &rec.process)
                && let Ok(node) = self.node()
                && let Ok(agent) = node.agent(sandbox).await
                && agent.connect_tcp(port).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(instance = %inst.key.address(), port, "not listening after the update; moving on");
    }

    /// Uninstalls: every instance is stopped and deleted, then the
    /// installation is marked uninstalled.
    pub async fn uninstall(self: &Arc<Self>, k: &InstKey) -> Result<AppInstallation, ApiError> {
        let dir = self.installation_dir(k)?;
        let lock = self.inst_lock(k);
        let _g = lock.lock().await;
        if !disk::transition(&dir, "active", "uninstalled").map_err(|e| io_err("uninstalling", &dir, e))? {
            return Err(ApiError::new(ErrorCode::NoOp, format!("{} is already uninstalled", k.address())));
        }
        self.installation_event(k, "uninstalled");
        for inst in self.instances_of(k) {
            let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
            loop {
                let g = inst.lock.lock().await;
                match inst.state() {
                    Ok(InstanceState::Deleted) | Err(_) => break,
                    Ok(s) if s.is_transitional() && tokio::time::Instant::now() < deadline => {
                        drop(g);
                        self.settle(&inst).await;
                    }
                    Ok(s) => {
                        if inst.transition(s, InstanceState::Deleted)? {
                            drop(g);
                            self.event(&inst);
                            self.supervise(&inst);
                            inst.wake.notify_one();
                            break;
                        }
                    }
                }
            }
        }
        for inst in self.instances_of(k) {
            self.finished(&inst).await;
        }
        self.collect(k);
        self.installation(k)
    }

    /// Removes what nothing refers to any more: versions neither current,
    /// previous nor run by an instance, and deleted instances whose
    /// supervisor is done.
    fn collect(&self, k: &InstKey) {
        let dir = self.layout.installation(k);
        let mut keep: Vec<String> =
            ["current", "previous"].iter().filter_map(|l| disk::read_link(&dir, l)).collect::<Vec<_>>();
        for (n, idir) in self.layout.instances(k) {
            let ikey = k.instance(&n);
            let deleted = disk::read_state(&idir, &instance_states()) == Ok("deleted");
            let running_task = self
                .instances
                .lock()
                .expect("instances")
                .get(&ikey)
                .is_some_and(|i| i.task.lock().expect("task").as_ref().is_some_and(|t| !t.is_finished()));
            if deleted && !running_task {
                let _ = std::fs::remove_dir_all(&idir);
                self.instances.lock().expect("instances").remove(&ikey);
                continue;
            }
            if let Ok(v) = std::fs::read_to_string(idir.join("version")) {
                keep.push(v.trim().to_string());
            }
        }
        for v in disk::versions(&dir) {
            if !keep.contains(&v) {
                tracing::info!(installation = %k.address(), version = %v, "collecting an unused version");
                let _ = std::fs::remove_dir_all(dir.join(&v));
            }
        }
    }

    fn instances_of(&self, k: &InstKey) -> Vec<Arc<Instance>> {
        self.instances
            .lock()
            .expect("instances")
            .iter()
            .filter(|(ik, _)| ik.title == k.title && ik.inst == k.inst)
            .map(|(_, i)| i.clone())
            .collect()
    }

    // ------------------------------------------------------------ instances

    /// Starts a new instance of an installation on its current version.
    pub async fn start(self: &Arc<Self>, k: &InstKey) -> Result<AppInstance, ApiError> {
        let dir = self.installation_dir(k)?;
        let lock = self.inst_lock(k);
        let g = lock.lock().await;
        self.require_active(k, "start an instance of")?;
        let version = self.current(k)?;
        let parent = dir.join("instances");
        let (n, idir) =
            disk::create_numbered(&parent, "instance-").map_err(|e| io_err("creating the instance", &parent, e))?;
        let inst = Instance::new(k.instance(&n), idir.clone());
        // `state/` appears last: without it, start-up removes the rest.
        inst.set_version(&version)?;
        inst.save(&RunRecord::default())?;
        disk::init_state(&idir, InstanceState::Launching.as_str())
            .map_err(|e| io_err("creating the instance state", &idir, e))?;
        self.instances.lock().expect("instances").insert(inst.key.clone(), inst.clone());
        drop(g);
        tracing::info!(instance = %inst.key.address(), version = %version, "app instance starting");
        self.event(&inst);
        self.supervise(&inst);
        self.settle(&inst).await;
        self.instance_view(&inst)
    }

    /// Stops an instance: `SIGTERM`, then `SIGKILL` after its stop timeout;
    /// its sandbox is stopped (the workspace is kept). Stays stopped across
    /// node restarts.
    pub async fn stop(self: &Arc<Self>, k: &InstanceKey) -> Result<AppInstance, ApiError> {
        let inst = self.instance(k)?;
        self.change(&inst, "stop", &[InstanceState::Running, InstanceState::Suspended], InstanceState::Dying).await?;
        self.settle(&inst).await;
        self.instance_view(&inst)
    }

    /// Restarts an instance on the installation's current version (also
    /// one that is stopped), resetting its back-off.
    pub async fn restart(self: &Arc<Self>, k: &InstanceKey) -> Result<AppInstance, ApiError> {
        let inst = self.instance(k)?;
        self.require_active(&k.installation(), "restart an instance of")?;
        let from = [InstanceState::Running, InstanceState::Suspended, InstanceState::NotRunning];
        self.change(&inst, "restart", &from, InstanceState::Launching).await?;
        self.settle(&inst).await;
        self.instance_view(&inst)
    }

    /// Suspends a serving instance: its processes are stopped (`SIGSTOP`)
    /// where they are, with their memory; its names are unpublished.
    pub async fn suspend(self: &Arc<Self>, k: &InstanceKey) -> Result<AppInstance, ApiError> {
        let inst = self.instance(k)?;
        {
            let _g = inst.lock.lock().await;
            let state = inst.state().map_err(|d| ApiError::internal(d.0))?;
            if state != InstanceState::Running {
                return Err(refused(&k.address(), "suspend", state, InstanceState::Suspended));
            }
            let rec = inst.load().map_err(|d| ApiError::internal(d.0))?;
            let (Some(sandbox), Some(process)) = (&rec.sandbox, &rec.process) else {
                return Err(ApiError::new(
                    ErrorCode::InvalidTransition,
                    format!(
                        "cannot suspend instance {}: it is not serving ({})",
                        k.address(),
                        rec.reason.as_deref().unwrap_or("no process")
                    ),
                ));
            };
            let agent = self.node()?.agent(sandbox).await?;
            agent.signal(process, "STOP").await.map_err(|e| e.to_api())?;
            if !inst.transition(InstanceState::Running, InstanceState::Suspended)? {
                let _ = agent.signal(process, "CONT").await;
                return Err(ApiError::new(
                    ErrorCode::InProgress,
                    format!("instance {} changed meanwhile", k.address()),
                ));
            }
        }
        self.unpublish(&inst).await;
        inst.wake.notify_one();
        self.event(&inst);
        self.instance_view(&inst)
    }

    /// Resumes a suspended instance where it stopped.
    pub async fn resume(self: &Arc<Self>, k: &InstanceKey) -> Result<AppInstance, ApiError> {
        let inst = self.instance(k)?;
        {
            let _g = inst.lock.lock().await;
            let state = inst.state().map_err(|d| ApiError::internal(d.0))?;
            if state != InstanceState::Suspended {
                return Err(refused(&k.address(), "resume", state, InstanceState::Running));
            }
            let rec = inst.load().map_err(|d| ApiError::internal(d.0))?;
            if let (Some(sandbox), Some(process)) = (&rec.sandbox, &rec.process)
                && let Ok(agent) = self.node()?.agent(sandbox).await
            {
                // A process that died meanwhile is the supervisor's to handle.
                let _ = agent.signal(process, "CONT").await;
            }
            inst.transition(InstanceState::Suspended, InstanceState::Running)?;
        }
        self.supervise(&inst);
        inst.wake.notify_one();
        self.event(&inst);
        self.instance_view(&inst)
    }

    /// One state change by rename under the instance's lock, then the
    /// supervisor is woken to act on it.
    async fn change(
        self: &Arc<Self>,
        inst: &Arc<Instance>,
        op: &str,
        from: &[InstanceState],
        to: InstanceState,
    ) -> Result<(), ApiError> {
        {
            let _g = inst.lock.lock().await;
            let state = inst.state().map_err(|d| ApiError::internal(format!("{}: {}", inst.key.address(), d.0)))?;
            if !from.contains(&state) {
                // A stop's end is `not-running`: asked again, that is a no-op.
                let target = if to == InstanceState::Dying { InstanceState::NotRunning } else { to };
                return Err(refused(&inst.key.address(), op, state, target));
            }
            if !inst.transition(state, to)? {
                return Err(ApiError::new(
                    ErrorCode::InProgress,
                    format!("cannot {op} instance {}: it changed meanwhile", inst.key.address()),
                ));
            }
        }
        tracing::info!(instance = %inst.key.address(), op, "app instance {}", to.as_str());
        self.event(inst);
        self.supervise(inst);
        inst.wake.notify_one();
        Ok(())
    }

    /// Waits (bounded) until the instance is out of a transitional state.
    async fn settle(&self, inst: &Instance) {
        let mut rx = inst.changed.subscribe();
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        loop {
            rx.borrow_and_update();
            match inst.state() {
                Ok(s) if s.is_transitional() => {}
                _ => return,
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return;
            }
        }
    }

    /// Waits (bounded) for an instance's supervisor to finish.
    async fn finished(&self, inst: &Instance) {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        let mut rx = inst.changed.subscribe();
        loop {
            rx.borrow_and_update();
            let done = inst.task.lock().expect("task").as_ref().is_none_or(|t| t.is_finished());
            if done {
                return;
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return;
            }
        }
    }

    /// Starts the instance's supervisor unless one is running.
    fn supervise(self: &Arc<Self>, inst: &Arc<Instance>) {
        let mut task = inst.task.lock().expect("task");
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let apps = self.clone();
        let i = inst.clone();
        *task = Some(tokio::spawn(async move {
            apps.clone().run_supervisor(i.clone()).await;
            i.bump();
        }));
    }

    // ------------------------------------------------------------ views

    pub fn list(&self) -> Vec<AppInstallation> {
        self.layout.installations().into_iter().filter_map(|(k, _)| self.installation(&k).ok()).collect()
    }

    pub fn installation(&self, k: &InstKey) -> Result<AppInstallation, ApiError> {
        let dir = self.installation_dir(k)?;
        let state = self.installation_state(k)?;
        let current = self.current(k)?;
        let envelope = self.envelope(k, &current)?;
        let mut instances = Vec::new();
        for (n, _) in self.layout.instances(k) {
            let ikey = k.instance(&n);
            if let Some(why) = self.quarantined.lock().expect("quarantine").get(&ikey) {
                instances.push(quarantined_view(&ikey, why));
                continue;
            }
            let inst = self.instances.lock().expect("instances").get(&ikey).cloned();
            if let Some(inst) = inst
                && let Ok(v) = self.instance_view(&inst)
                && v.state != InstanceState::Deleted
            {
                instances.push(v);
            }
        }
        Ok(AppInstallation {
            address: k.address(),
            app: k.title.clone(),
            installation: k.inst.clone(),
            state,
            previous: disk::read_link(&dir, "previous"),
            versions: disk::versions(&dir),
            current,
            envelope,
            instances,
        })
    }

    pub fn get_instance(&self, k: &InstanceKey) -> Result<AppInstance, ApiError> {
        if let Some(why) = self.quarantined.lock().expect("quarantine").get(k) {
            return Ok(quarantined_view(k, why));
        }
        let inst = self.instance(k)?;
        self.instance_view(&inst)
    }

    fn instance_view(&self, inst: &Instance) -> Result<AppInstance, ApiError> {
        let state = inst.state().unwrap_or(InstanceState::Quarantined);
        let rec = inst.load().unwrap_or_default();
        let live = inst.live.lock().expect("live");
        let serving = matches!(state, InstanceState::Running | InstanceState::Suspended) && rec.process.is_some();
        Ok(AppInstance {
            address: inst.key.address(),
            app: inst.key.title.clone(),
            installation: inst.key.inst.clone(),
            instance: inst.key.n.clone(),
            state,
            version: inst.version(),
            sandbox: rec.sandbox.clone(),
            pid: if serving { live.pid } else { None },
            started_at: if serving { rec.started_at } else { None },
            ports: live.ports.clone(),
            published: live.published.clone(),
            restarts: rec.history.total,
            last_exit: rec.last_exit.clone(),
            reason: if serving { None } else { rec.reason.clone() },
            retry_at: if state == InstanceState::Running { rec.retry_at } else { None },
        })
    }

    fn event(&self, inst: &Instance) {
        if let (Ok(node), Ok(v)) = (self.node(), self.instance_view(inst)) {
            node.events().publish(EventBody::AppInstance { instance: Box::new(v) });
        }
    }

    fn installation_event(&self, k: &InstKey, action: &str) {
        if let Ok(node) = self.node() {
            node.events().publish(EventBody::AppInstallation {
                action: action.into(),
                installation: k.address(),
                version: self.current(k).unwrap_or_default(),
            });
        }
    }

    /// The instance's log, as text: the current run (or the one before),
    /// and with `follow` everything after it as it is written, across
    /// restarts, until the instance stops.
    pub fn logs(
        self: &Arc<Self>,
        k: &InstanceKey,
        q: &flotilla_api::app::AppLogsQuery,
    ) -> Result<tokio::sync::mpsc::Receiver<bytes::Bytes>, ApiError> {
        let inst = self.instance(k)?;
        let dir = inst.logs_dir();
        let runs = logs::runs(&dir);
        let run = if q.previous {
            let Some(prev) = runs.len().checked_sub(2).map(|i| runs[i]) else {
                return Err(ApiError::not_found(format!("instance {} has no previous run with output", k.address())));
            };
            prev
        } else {
            runs.last().copied().unwrap_or(0)
        };
        Ok(supervise::stream_logs(inst, dir, run, q.follow && !q.previous))
    }
}

fn quarantined_view(k: &InstanceKey, why: &str) -> AppInstance {
    AppInstance {
        address: k.address(),
        app: k.title.clone(),
        installation: k.inst.clone(),
        instance: k.n.clone(),
        state: InstanceState::Quarantined,
        version: String::new(),
        sandbox: None,
        pid: None,
        started_at: None,
        ports: Vec::new(),
        published: Vec::new(),
        restarts: 0,
        last_exit: None,
        reason: Some(why.to_string()),
        retry_at: None,
    }
}

/// Parses `APP/INST` or `APP/INST/INSTANCE` path parts into keys.
pub fn inst_key(app: &str, inst: &str) -> InstKey {
    InstKey { title: app.to_string(), inst: inst.to_string() }
}
