//! The `vm` backend: every sandbox is a microVM, one QEMU process each.
//!
//! Boot, in order (each a step the node reports):
//! 1. `assets`: the guest kernel and initramfs, made once and cached
//!    ([`assets`]); the accelerator, probed once by booting a guest under
//!    KVM with a deadline and falling back to TCG ([`VmBackend::accel`]).
//! 2. `disks`: the image's read-only base disk (ext4 made by `mkfs.ext4 -d`
//!    from the image directory, cached per image version), a qcow2 overlay
//!    per sandbox for copy-on-write, and the sandbox's workspace disk.
//! 3. `created`: QEMU is started; its pid file, QMP socket, agent socket,
//!    console log and disks all live in `<home>/vms/<id>/`, so a node that
//!    crashed re-adopts the VM (pid + start time) or reaps it (pid file and
//!    command line) when it comes back.
//! 4. `agent_up`: the guest's init (our static binary, see [`guest`])
//!    answers on the virtio-serial channel ([`mux`]). A boot that hangs is
//!    cut off at its deadline and retried once.

pub mod assets;
pub mod guest;
pub mod kernel;
pub mod mux;
pub mod net;
pub mod pool;
pub mod qemu;
pub mod snapshot;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_agent::AgentClient;
use flotilla_agent::http::{Dialer, Endpoint, HttpClient};
use flotilla_sandbox::{ExitInfo, Image, sys};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use qemu::{Accel, Qemu, Vmm};

/// What the guest's init reads from fw_cfg.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GuestConfig {
    pub id: String,
    pub hostname: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The NIC's address plan; none: loopback only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<net::GuestNet>,
    /// `pids.max` of the guest's sandbox cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

/// What one boot needs to know.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    pub hostname: String,
    pub image: Image,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub workspace_bytes: u64,
    /// Most tasks the sandbox's commands may have (a cgroup in the guest).
    pub pids: Option<u64>,
    pub network: flotilla_api::NetworkMode,
    pub env: BTreeMap<String, String>,
}

/// Why a boot failed; each variant names its step.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("preparing the guest kernel and initramfs")]
    Assets(#[source] assets::AssetError),
    #[error("{0}")]
    Image(String),
    #[error("{step}")]
    Io {
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed: {stderr}")]
    Tool { tool: String, stderr: String },
    #[error("the guest agent did not answer within {0:?} (console: {1})")]
    Timeout(Duration, String),
    #[error("QEMU exited during boot: {0} (console: {1}; qemu: {2})")]
    Died(String, String, String),
}

impl VmError {
    /// The boot step it belongs to.
    pub fn step(&self) -> &'static str {
        match self {
            VmError::Assets(_) => "assets",
            VmError::Image(_) | VmError::Tool { .. } => "disks",
            VmError::Io { .. } => "created",
            VmError::Timeout(..) | VmError::Died(..) => "agent_up",
        }
    }
}

fn io_step(step: impl Into<String>) -> impl FnOnce(io::Error) -> VmError {
    let step = step.into();
    move |source| VmError::Io { step, source }
}

/// A running microVM.
#[derive(Clone)]
pub struct VmRunning {
    pub pid: i32,
    pub start_time: u64,
    pub dir: PathBuf,
    pidfd: Arc<OwnedFd>,
    exit: watch::Receiver<Option<ExitInfo>>,
    dialer: Arc<mux::HostDialer>,
    /// Set once the agent answered (at boot, or when re-adopted).
    booted: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for VmRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmRunning").field("pid", &self.pid).field("dir", &self.dir).finish()
    }
}

impl VmRunning {
    pub async fn exited(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return ExitInfo::Unknown;
            }
        }
    }

    pub fn exit_now(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// A client of the guest's agent.
    pub fn agent(&self) -> AgentClient {
        AgentClient::direct(HttpClient::new(Endpoint::Dial(Dialer(self.dialer.clone()))))
    }

    /// The same VM after its directory was renamed to `id`'s (a pool
    /// member handed to a sandbox): the agent session carries on.
    fn moved(self, id: &str, dir: PathBuf) -> VmRunning {
        self.dialer.moved(format!("vm:{id}"), qemu::agent_socket(&dir));
        VmRunning { dir, ..self }
    }

    /// Whether the guest powered itself off after a halt (rather than
    /// crashing or being killed).
    pub fn halted_cleanly(&self) -> bool {
        qemu::console_tail(&self.dir, 3).contains(HALTED_LINE)
    }
}

/// What the guest prints when `--probe` reached init.
pub const PROBE_LINE: &str = "flotilla: probe reached init";

/// What the guest prints just before it powers off on request.
pub const HALTED_LINE: &str = "flotilla: halted";

/// The accelerator decision and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// The microVM backend.
pub struct VmBackend {
    home: PathBuf,
    agent: Option<PathBuf>,
    vmm: Arc<dyn Vmm>,
    qemu: Qemu,
    assets: tokio::sync::Mutex<Option<assets::GuestAssets>>,
    accel: tokio::sync::Mutex<Option<AccelChoice>>,
    base_lock: tokio::sync::Mutex<()>,
    /// Held while a `tap` address is leased.
    net_lock: std::sync::Mutex<()>,
    boot_timeout: Duration,
    pool: std::sync::Mutex<pool::Pool>,
    /// The group passt runs with, under the node's egress policy.
    egress_gid: Option<u32>,
}

impl std::fmt::Debug for VmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBackend").field("home", &self.home).finish()
    }
}

/// Why a microVM cannot start from the `host` image, with the fix.
pub const HOST_IMAGE_REFUSED: &str = "a microVM needs an image with its own root filesystem, not `host`: import \
                                      one (`flotilla image import NAME:TAG ./rootfs.tar.gz`) and pass `--image \
                                      NAME:TAG`";

/// Default guest memory when the create call sets none.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Default workspace disk size (sparse: costs only what is written).
pub const DEFAULT_WORKSPACE: u64 = 4 << 30;

impl VmBackend {
    /// `home` is the node's data directory; `agent` the static `flotilla`
    /// binary that becomes the guest's init (None: find one, see
    /// [`find_agent`]).
    pub fn new(home: &Path, agent: Option<PathBuf>) -> VmBackend {
        let qemu = Qemu::default();
        let boot_timeout = std::env::var("FLOTILLA_VM_BOOT_TIMEOUT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(40));
        let b = VmBackend {
            home: home.to_path_buf(),
            agent: agent.or_else(find_agent),
            vmm: Arc::new(qemu.clone()),
            qemu,
            assets: Default::default(),
            accel: Default::default(),
            base_lock: Default::default(),
            net_lock: Default::default(),
            boot_timeout,
            pool: Default::default(),
            egress_gid: None,
        };
        b.restore_pool();
        b
    }

    /// Runs every `outbound` guest's passt in the egress group `gid`
    /// (`flotilla_sandbox::egress::EgressPolicy::gid`).
    pub fn with_egress_gid(mut self, gid: Option<u32>) -> VmBackend {
        self.egress_gid = gid;
        self
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.home.join("vms")
    }

    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.vms_dir().join(id)
    }

    /// `<home>/vm`: kernels, initramfs, accelerator decision, base disks.
    pub fn assets_dir(&self) -> PathBuf {
        self.home.join("vm")
    }

    /// Whether this host can run microVMs, and if not, why (with the fix).
    /// Network modes a microVM can have on this host.
    pub fn network_modes(&self) -> Vec<flotilla_api::NetworkMode> {
        use flotilla_api::NetworkMode as N;
        [N::None, N::Outbound, N::Tap].into_iter().filter(|m| self.network_unavailable(*m).is_none()).collect()
    }

    /// Why `mode` cannot be given to a microVM here, if it cannot.
    pub fn network_unavailable(&self, mode: flotilla_api::NetworkMode) -> Option<String> {
        match mode {
            flotilla_api::NetworkMode::None => None,
            flotilla_api::NetworkMode::Outbound => net::passt()
                .is_none()
                .then(|| "network `outbound` for microVMs needs passt (apt-get install -y passt)".to_string()),
            flotilla_api::NetworkMode::Tap => net::tap_unavailable(),
        }
    }

    pub fn available(&self) -> Result<String, String> {
        let v = qemu::version(&self.qemu)?;
        assets::find_kernel(&self.assets_dir()).map_err(|e| e.to_string())?;
        match &self.agent {
            None => return Err(assets::AssetError::DynamicAgent(PathBuf::from("(this binary)")).to_string()),
            Some(a) if !assets::is_static(a).unwrap_or(false) => {
                return Err(assets::AssetError::DynamicAgent(a.clone()).to_string());
            }
            Some(_) => {}
        }
        Ok(v)
    }

    /// The guest kernel and initramfs, made on first use.
    pub async fn assets(&self) -> Result<assets::GuestAssets, VmError> {
        let mut cached = self.assets.lock().await;
        if let Some(a) = cached.as_ref() {
            return Ok(a.clone());
        }
        let agent = self.agent.clone().ok_or_else(|| {
            VmError::Assets(assets::AssetError::DynamicAgent(std::env::current_exe().unwrap_or_default()))
        })?;
        let dir = self.assets_dir();
        let made = tokio::task::spawn_blocking(move || {
            let kernel = assets::find_kernel(&dir)?;
            assets::prepare(&dir, &kernel, &agent)
        })
        .await
        .map_err(|e| VmError::Io { step: "preparing assets".into(), source: io::Error::other(e) })?
        .map_err(VmError::Assets)?;
        *cached = Some(made.clone());
        Ok(made)
    }

    /// The accelerator: KVM when a guest boots under it within a deadline,
    /// else TCG. Probed once per node home and kernel, cached on disk.
    pub async fn accel(&self) -> Result<AccelChoice, VmError> {
        let mut cached = self.accel.lock().await;
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let assets = self.assets().await?;
        let cache = self.assets_dir().join(format!("accel-{}.json", assets.release));
        let choice = match std::fs::read(&cache).ok().and_then(|b| serde_json::from_slice::<AccelChoice>(&b).ok()) {
            Some(c) => c,
            None => {
                let c = self.probe(&assets).await;
                if let Ok(json) = serde_json::to_vec(&c) {
                    let _ = std::fs::write(&cache, json);
                }
                c
            }
        };
        if choice.accel == Accel::Tcg {
            tracing::warn!(reason = %choice.reason, "microVMs run on QEMU's software accelerator (TCG): slow boots");
        }
        *cached = Some(choice.clone());
        Ok(choice)
    }

    /// The cached accelerator decision, if one was made.
    pub fn accel_cached(&self) -> Option<AccelChoice> {
        self.accel.try_lock().ok().and_then(|g| g.clone()).or_else(|| {
            let rd = std::fs::read_dir(self.assets_dir()).ok()?;
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("accel-"))
                .find_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        })
    }

    async fn probe(&self, assets: &assets::GuestAssets) -> AccelChoice {
        let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
        if let Err(e) = kvm {
            return AccelChoice { accel: Accel::Tcg, reason: format!("/dev/kvm cannot be opened ({e})") };
        }
        let dir = self.assets_dir().join(format!("probe-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let log = qemu::console_log(&dir);
        let mut cmd = std::process::Command::new(&self.qemu.binary);
        cmd.args(["-M", qemu::machine(assets.acpi), "-accel", "kvm", "-cpu", "host", "-m", "128M", "-smp", "1"]);
        cmd.args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        cmd.arg("-kernel").arg(&assets.vmlinux).arg("-initrd").arg(&assets.initramfs);
        cmd.args(["-append", &format!("{} {} --probe", qemu::cmdline(Accel::Kvm, assets.acpi), qemu::INIT_ARGS)]);
        cmd.args(["-serial", &format!("file:{}", log.display())]);
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        let deadline = Duration::from_secs(10);
        let mut child = match tokio::process::Command::from(cmd).kill_on_drop(true).spawn() {
            Ok(c) => c,
            Err(e) => return AccelChoice { accel: Accel::Tcg, reason: format!("starting QEMU under KVM: {e}") },
        };
        let start = Instant::now();
        let ended = tokio::time::timeout(deadline, child.wait()).await;
        let booted = std::fs::read_to_string(&log).unwrap_or_default().contains(PROBE_LINE);
        let _ = child.kill().await;
        let _ = std::fs::remove_dir_all(&dir);
        match (booted, ended) {
            (true, _) => AccelChoice {
                accel: Accel::Kvm,
                reason: format!("a guest booted under KVM in {} ms", start.elapsed().as_millis()),
            },
            (false, Err(_)) => AccelChoice {
                accel: Accel::Tcg,
                reason: format!(
                    "/dev/kvm exists but a guest did not boot under it within {deadline:?} \
                     (a PVM or nested host that runs only its own guest kernels?)"
                ),
            },
            (false, Ok(_)) => AccelChoice {
                accel: Accel::Tcg,
                reason: "/dev/kvm exists but QEMU could not run a guest under it".into(),
            },
        }
    }

    /// Boots the VM, retrying once when a boot hangs past its deadline.
    pub async fn start(
        &self,
        spec: &VmSpec,
        step: &(dyn Fn(&str, Option<String>) + Send + Sync),
    ) -> Result<VmRunning, VmError> {
        let assets = self.assets().await?;
        let accel = self.accel().await?;
        step("assets", Some(format!("kernel {}, {}: {}", assets.release, accel.accel.as_str(), accel.reason)));
        let launch = self.prepare_disks(spec, &assets, accel.accel).await?;
        step("disks", None);
        let mut last = None;
        for attempt in 1..=2 {
            match self.launch(spec, &launch, step).await {
                Ok(r) => return Ok(r),
                Err(e @ VmError::Timeout(..)) if attempt == 1 => {
                    tracing::warn!(sandbox = %spec.id, error = %e, "microVM boot hung; retrying once");
                    step("boot_retry", Some(e.to_string()));
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("two attempts"))
    }

    async fn launch(
        &self,
        spec: &VmSpec,
        launch: &qemu::LaunchSpec,
        step: &(dyn Fn(&str, Option<String>) + Send + Sync),
    ) -> Result<VmRunning, VmError> {
        let running = self.spawn_vmm(&spec.id, launch, step).await?;
        let dir = &launch.dir;
        let qemu_log = dir.join("vmm.log");
        let deadline = Instant::now() + self.boot_timeout;
        let agent = running.agent();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(e) = running.exit_now() {
                let vmm_log = std::fs::read_to_string(&qemu_log).unwrap_or_default();
                return Err(VmError::Died(e.to_string(), qemu::console_tail(dir, 5), vmm_log.trim().to_string()));
            }
            if left.is_zero() {
                let tail = qemu::console_tail(dir, 5);
                let _ = self.kill(&running).await;
                return Err(VmError::Timeout(self.boot_timeout, tail));
            }
            // One attach that waits for the guest's answer, then a health
            // check through it; QEMU's exit ends the wait at once. Both under
            // the deadline: a guest that attaches but never answers (its
            // agent blocked) must not hold the boot past it.
            let ready = async {
                let attached = async {
                    running.dialer.attach_within(left).await?;
                    tracing::debug!(sandbox = %spec.id, "guest attached");
                    agent.health().await.map_err(|e| io::Error::other(e.to_string()))
                };
                tokio::time::timeout(left, attached)
                    .await
                    .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "the guest agent did not answer")))
            };
            tokio::select! {
                r = ready => match r {
                    Ok(_) => {
                        running.booted.store(true, std::sync::atomic::Ordering::Release);
                        return Ok(running);
                    }
                    Err(e) => tracing::debug!(sandbox = %spec.id, error = %e, "guest agent not ready yet"),
                },
                _ = running.exited() => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the VMM for `launch` (feeding it the saved state when it
    /// restores a snapshot) without waiting for the guest.
    async fn spawn_vmm(
        &self,
        id: &str,
        launch: &qemu::LaunchSpec,
        step: &(dyn Fn(&str, Option<String>) + Send + Sync),
    ) -> Result<VmRunning, VmError> {
        let dir = &launch.dir;
        let mut stale =
            vec![qemu::qmp_socket(dir), qemu::agent_socket(dir), qemu::console_log(dir), qemu::pid_file(dir)];
        stale.extend(launch.incoming.as_ref().map(|i| i.socket.clone()));
        for f in stale {
            let _ = std::fs::remove_file(f);
        }
        if let Some(uid) = launch.runas {
            // QEMU reopens its disks by name after it has dropped to its uid
            // (a restored guest's disks are activated only then), so they are
            // its own, and no one else's to read: 0600.
            for disk in [&launch.root_disk, &launch.workspace_disk] {
                std::os::unix::fs::chown(disk, Some(uid), Some(uid))
                    .and_then(|()| std::fs::set_permissions(disk, std::fs::Permissions::from_mode(0o600)))
                    .map_err(io_step(format!("handing {} to QEMU's uid", disk.display())))?;
            }
        }
        let mut cmd = self.vmm.command(launch);
        // The host side of the NIC, new for every launch; QEMU holds the
        // only copy once it runs, so it goes when QEMU does.
        let net_fd = match &launch.network {
            Some(n) => Some(n.open(&dir.join("net.log")).await.map_err(io_step("opening the guest's network"))?),
            None => None,
        };
        if let Some(fd) = &net_fd {
            sys::command_pass_fd(&mut cmd, std::os::fd::AsRawFd::as_raw_fd(fd), qemu::NET_FD);
        }
        let qemu_log = dir.join("vmm.log");
        let log = std::fs::File::create(&qemu_log).map_err(io_step("creating vmm.log"))?;
        cmd.stderr(log);
        sys::command_new_session(&mut cmd, false);
        let child = cmd.spawn().map_err(io_step(format!("starting {}", self.vmm.name())))?;
        drop(net_fd);
        let pid = child.id() as i32;
        // The std Child is dropped without waiting: the pidfd below reaps.
        drop(child);
        let pidfd = sys::pidfd_open(pid).map_err(io_step("opening a pidfd for QEMU"))?;
        let start_time = sys::process_start_time(pid).unwrap_or(0);
        let running = self.watch(pid, start_time, pidfd, dir.clone(), id);
        step("created", Some(format!("{} pid {pid}", self.vmm.name())));
        if let Some(inc) = &launch.incoming {
            // Feed the saved state; the guest then runs on from where it
            // was saved and answers the first hello.
            let inc = inc.clone();
            let deadline = Instant::now() + self.boot_timeout;
            let vm = running.clone();
            tokio::spawn(async move {
                if let Err(e) = snapshot::feed(&inc, deadline).await {
                    // Ends QEMU, so the boot fails now with this reason
                    // in vmm.log rather than at its deadline.
                    use std::io::Write;
                    let log = std::fs::OpenOptions::new().append(true).create(true).open(inc.dir.join("vmm.log"));
                    let _ = log.and_then(|mut f| writeln!(f, "flotilla: restoring failed: {e}"));
                    let _ = flotilla_sandbox::process::kill_and_wait(&vm.pidfd, vm.pid, vm.exited()).await;
                }
            });
        }

        Ok(running)
    }

    fn watch(&self, pid: i32, start_time: u64, pidfd: OwnedFd, dir: PathBuf, id: &str) -> VmRunning {
        let pidfd = Arc::new(pidfd);
        let (tx, rx) = watch::channel(None);
        let fd = pidfd.clone();
        tokio::spawn(async move {
            let e = flotilla_sandbox::process::wait_pidfd(fd).await;
            let _ = tx.send(Some(e));
        });
        // How long a dial may wait for the guest to answer a hello. A boot
        // waits with its own deadline; this is for a guest that runs: one
        // re-attached after a node restart first ends its old session,
        // which under TCG on a loaded host took over 1.5 s (a test saw it).
        // Callers that must not wait (halt) have their own, shorter bound.
        let dialer = mux::HostDialer::new(format!("vm:{id}"), qemu::agent_socket(&dir), Duration::from_secs(10));
        VmRunning { pid, start_time, dir, pidfd, exit: rx, dialer, booted: Default::default() }
    }

    /// Re-adopts a VM that survived a node restart: same pid, same start
    /// time, and its agent socket still there.
    pub fn adopt(&self, id: &str, pid: i32, start_time: u64) -> Option<VmRunning> {
        if pid <= 0 || sys::process_start_time(pid)? != start_time {
            return None;
        }
        let dir = self.vm_dir(id);
        if !qemu::agent_socket(&dir).exists() {
            return None;
        }
        let pidfd = sys::pidfd_open(pid).ok()?;
        let running = self.watch(pid, start_time, pidfd, dir, id);
        running.booted.store(true, std::sync::atomic::Ordering::Release);
        Some(running)
    }

    /// Ends the VM and waits until QEMU is gone. Idempotent. A guest that
    /// answers is asked to halt first (it syncs its disks: the workspace
    /// lives in the guest's page cache until then); one that does not
    /// within a few seconds is killed.
    pub async fn kill(&self, running: &VmRunning) -> io::Result<()> {
        if running.exit_now().is_none() {
            let halted = async {
                let agent = running.agent();
                if tokio::time::timeout(Duration::from_secs(2), agent.halt()).await.is_ok_and(|r| r.is_ok()) {
                    let _ = tokio::time::timeout(Duration::from_secs(5), running.exited()).await;
                }
            };
            // Only a guest that finished booting is asked: one still
            // booting has nothing to lose and would cost an attach timeout.
            if running.booted.load(std::sync::atomic::Ordering::Acquire) {
                halted.await;
            }
        }
        if running.exit_now().is_none() {
            flotilla_sandbox::process::kill_and_wait(&running.pidfd, running.pid, running.exited()).await?;
        }
        self.cleanup(running.dir.file_name().and_then(|n| n.to_str()).unwrap_or_default());
        Ok(())
    }

    /// Kills a QEMU left for `id` (a crash between launch and record, or a
    /// delete during boot) and removes its sockets. Keeps the disks.
    pub fn cleanup(&self, id: &str) {
        cleanup_vm(&self.vms_dir(), id)
    }

    /// Removes the VM's directory (disks included). It must be stopped.
    pub fn destroy(&self, id: &str) -> io::Result<()> {
        match std::fs::remove_dir_all(self.vm_dir(id)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// Ids with a directory or a QEMU process on this host.
    pub fn resident(&self) -> Vec<String> {
        let mut ids = std::collections::BTreeSet::new();
        if let Ok(rd) = std::fs::read_dir(self.vms_dir()) {
            ids.extend(rd.flatten().filter_map(|e| e.file_name().to_str().map(str::to_owned)));
        }
        ids.extend(scan_qemus(&self.vms_dir()).into_iter().map(|(_, id)| id));
        let pool = self.pool.lock().expect("pool lock");
        ids.into_iter().filter(|id| !pool.owns(id)).collect()
    }

    async fn prepare_disks(
        &self,
        spec: &VmSpec,
        assets: &assets::GuestAssets,
        accel: Accel,
    ) -> Result<qemu::LaunchSpec, VmError> {
        if let Some(why) = self.network_unavailable(spec.network) {
            return Err(VmError::Image(why));
        }
        let dir = self.vm_dir(&spec.id);
        std::fs::create_dir_all(&dir).map_err(io_step(format!("creating {}", dir.display())))?;
        let base = self.base_disk(&spec.image).await?;
        let root = dir.join("root.qcow2");
        if !root.exists() {
            let tmp = dir.join("root.qcow2.tmp");
            run_tool(
                std::process::Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                    .arg(&base)
                    .arg(&tmp),
            )
            .await?;
            std::fs::rename(&tmp, &root).map_err(io_step("moving the root overlay into place"))?;
        }
        let ws = dir.join("workspace.ext4");
        if !ws.exists() {
            let tmp = dir.join("workspace.ext4.tmp");
            let f = std::fs::File::create(&tmp).map_err(io_step("creating the workspace disk"))?;
            f.set_len(spec.workspace_bytes).map_err(io_step("sizing the workspace disk"))?;
            drop(f);
            run_tool(
                std::process::Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
                    .arg(&tmp),
            )
            .await?;
            std::fs::rename(&tmp, &ws).map_err(io_step("moving the workspace disk into place"))?;
        }
        let config = dir.join("config.json");
        let (guest_net, host_net) = match spec.network {
            flotilla_api::NetworkMode::None => (None, None),
            flotilla_api::NetworkMode::Outbound => {
                (Some(net::outbound_guest()), Some(net::HostNet::Passt { egress_gid: self.egress_gid }))
            }
            flotilla_api::NetworkMode::Tap => {
                let _leasing = self.net_lock.lock().expect("net lock");
                let (g, h) = net::lease(&self.vms_dir(), &spec.id).map_err(io_step("leasing a tap address"))?;
                (Some(g), Some(h))
            }
        };
        let gc = GuestConfig {
            id: spec.id.clone(),
            hostname: spec.hostname.clone(),
            env: spec.env.clone(),
            net: guest_net,
            pids: spec.pids,
        };
        // It holds the sandbox's env: readable by the node alone.
        write_private(&config, &serde_json::to_vec(&gc).unwrap_or_default()).map_err(io_step("writing config.json"))?;
        Ok(qemu::LaunchSpec { network: host_net, ..launch_spec(spec, dir, assets, accel) })
    }

    /// The image's read-only ext4 base disk, made once per image version.
    async fn base_disk(&self, image: &Image) -> Result<PathBuf, VmError> {
        let (rootfs, key) = match image {
            Image::Stored { rootfs, .. } => {
                let hex = rootfs.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).unwrap_or("unknown");
                (rootfs.clone(), hex.to_string())
            }
            Image::Dir(d) => {
                use sha2::Digest;
                let h = sha2::Sha256::digest(d.as_os_str().as_encoded_bytes());
                (d.clone(), format!("dir-{}", h.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>()))
            }
            Image::Host => {
                return Err(VmError::Image(HOST_IMAGE_REFUSED.into()));
            }
        };
        let dir = self.assets_dir().join("base");
        let disk = dir.join(format!("{key}.ext4"));
        let _guard = self.base_lock.lock().await;
        if disk.exists() {
            return Ok(disk);
        }
        std::fs::create_dir_all(&dir).map_err(io_step("creating the base disk directory"))?;
        let (bytes, inodes) = tokio::task::spawn_blocking({
            let r = rootfs.clone();
            move || tree_size(&r)
        })
        .await
        .unwrap_or((0, 0));
        // Room for ext4's own metadata and for small files' block rounding.
        let size = (bytes + bytes / 4 + inodes * 4096 + (64 << 20)).div_ceil(1 << 20);
        let tmp = dir.join(format!("{key}.ext4.tmp"));
        let _ = std::fs::remove_file(&tmp);
        run_tool(
            std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-N", &(inodes + inodes / 4 + 1024).to_string(), "-d"])
                .arg(&rootfs)
                .arg(&tmp)
                .arg(format!("{size}M")),
        )
        .await?;
        std::fs::rename(&tmp, &disk).map_err(io_step("moving the base disk into place"))?;
        Ok(disk)
    }
}

/// Kills any QEMU left for `id` under `vms` (a crash between launch and
/// record, or a delete during boot) and removes its sockets; keeps the
/// disks. Blocking: it waits (briefly) for the process to die.
pub fn cleanup_vm(vms: &Path, id: &str) {
    if id.is_empty() || id.contains('/') {
        return;
    }
    let dir = vms.join(id);
    for (pid, _) in scan_qemus(vms).into_iter().filter(|(_, of)| of == id) {
        let _ = sys::kill(pid, libc::SIGKILL);
        let start = Instant::now();
        while sys::process_alive(pid) && start.elapsed() < Duration::from_secs(5) {
            let _ = sys::wait4_nohang(pid);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for f in [qemu::qmp_socket(&dir), qemu::agent_socket(&dir), qemu::pid_file(&dir)] {
        let _ = std::fs::remove_file(f);
    }
}

/// Bytes and entries under a directory (not following symlinks).
fn tree_size(root: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            n += 1;
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                bytes += m.len();
            }
        }
    }
    (bytes, n)
}

/// The launch of `spec` from the disks in `dir` (no NIC, a cold boot).
fn launch_spec(spec: &VmSpec, dir: PathBuf, assets: &assets::GuestAssets, accel: Accel) -> qemu::LaunchSpec {
    qemu::LaunchSpec {
        kernel: assets.vmlinux.clone(),
        initramfs: assets.initramfs.clone(),
        acpi: assets.acpi,
        accel,
        vcpus: spec.vcpus.max(1),
        memory_mib: (spec.memory_bytes >> 20).max(64),
        root_disk: dir.join("root.qcow2"),
        workspace_disk: dir.join("workspace.ext4"),
        config: dir.join("config.json"),
        network: None,
        incoming: None,
        runas: (flotilla_sandbox::sys::euid() == 0).then(|| qemu::vmm_uid(&spec.id)),
        dir,
    }
}

async fn run_tool(cmd: &mut std::process::Command) -> Result<(), VmError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = tokio::process::Command::from(std::mem::replace(cmd, std::process::Command::new("true")))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| VmError::Tool { tool: tool.clone(), stderr: e.to_string() })?;
    if !out.status.success() {
        return Err(VmError::Tool { tool, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(())
}

/// `(pid, id)` of every QEMU of ours under `vms`: a process whose
/// `-pidfile` lies under `vms`, named by the directory it runs in (QEMU is
/// started in its VM's directory, and a process's cwd follows a rename, so
/// a pool member handed to a sandbox is found under its new id).
fn scan_qemus(vms: &Path) -> Vec<(i32, String)> {
    let prefix = format!("{}/", vms.display());
    let id_of = |p: &str| p.strip_prefix(&prefix).and_then(|r| r.split('/').next()).map(str::to_owned);
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let mut args = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned());
        let Some(pidfile) = args.by_ref().skip_while(|a| a != "-pidfile").nth(1) else { continue };
        if !pidfile.starts_with(&prefix) {
            continue;
        }
        let cwd = std::fs::read_link(e.path().join("cwd")).ok().map(|c| format!("{}/", c.display()));
        if let Some(id) = cwd.as_deref().and_then(id_of).or_else(|| id_of(&pidfile)) {
            out.push((pid, id));
        }
    }
    out
}

/// Writes `data` to `path` as a file only its owner can read (created 0600,
/// and narrowed to 0600 if it existed).
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(data)
}

/// The static `flotilla` that becomes a guest's init: `FLOTILLA_GUEST_AGENT`,
/// else this binary when it is static, else a static build next to it in
/// the cargo target directory (`target/x86_64-unknown-linux-gnu/<profile>/flotilla`).
pub fn find_agent() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLOTILLA_GUEST_AGENT") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    if assets::is_static(&exe).unwrap_or(false) {
        return Some(exe);
    }
    // target/debug/flotilla -> target/x86_64-unknown-linux-gnu/{release,debug}/flotilla
    let target = exe.parent()?.parent()?;
    ["release", "debug"]
        .iter()
        .map(|p| target.join("x86_64-unknown-linux-gnu").join(p).join("flotilla"))
        .find(|p| assets::is_static(p).unwrap_or(false))
}
