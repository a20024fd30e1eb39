//! The process backend, as the node sees it.

use std::path::PathBuf;

use flotilla_agent::AgentClient;
use flotilla_agent::http::{Endpoint, HttpClient};
use flotilla_api::{ApiError, BackendInfo, BackendKind, ErrorCode, Resources};
use flotilla_sandbox::egress::EgressPolicy;
use flotilla_sandbox::process::{UID_BASE, UID_RANGE};
use flotilla_sandbox::{BootError, Image, Limits, ProcessBackend, ProcessConfig, Running, SandboxSpec};

use crate::node::Backend;
use crate::store::SandboxRecord;

/// [`ProcessBackend`] plus the node's data directory.
#[derive(Debug)]
pub struct ProcessNodeBackend {
    inner: ProcessBackend,
    home: PathBuf,
    /// Why `outbound` cannot be had, when the egress policy is not in place.
    egress: Result<(), String>,
    /// Roots under which `dir:` images may be (canonical); none: no `dir:`.
    image_dirs: Vec<PathBuf>,
}

impl ProcessNodeBackend {
    /// Takes `dir:` images under these roots only (`--allow-image-dir`).
    pub fn allow_image_dirs(mut self, roots: &[PathBuf]) -> std::io::Result<Self> {
        self.image_dirs = roots.iter().map(|r| r.canonicalize()).collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// Sets up the backend under `home`: the sandboxes directory and the
    /// generated `/etc` of the host image. `agent_exe` is the binary that
    /// implements `agent --init`, `agent_args` the words before `--init`.
    /// `egress` is the node's egress policy as installed (or why it is
    /// not): outbound sandboxes exist only under it.
    pub fn new(
        home: PathBuf,
        agent_exe: PathBuf,
        agent_args: Vec<String>,
        egress: &Result<EgressPolicy, String>,
    ) -> Result<Self, ApiError> {
        // Beside the image store, not in it: every `host` sandbox binds it
        // by path, and the store is the node's alone (0700).
        let host_etc = home.join("host-image/etc");
        let io = |what: &str, e: std::io::Error| ApiError::internal(format!("{what}: {e}"));
        std::fs::create_dir_all(home.join("sandboxes")).map_err(|e| io("creating the sandboxes directory", e))?;
        std::fs::create_dir_all(home.join("host-image")).map_err(|e| io("creating the host image's directory", e))?;
        // What older nodes kept in the store: it would only go stale there.
        let _ = std::fs::remove_dir_all(home.join("images/host"));
        flotilla_sandbox::image::build_host_etc(std::path::Path::new("/etc"), &host_etc)
            .map_err(|e| io("generating the host image's /etc", e))?;
        let config = ProcessConfig {
            sandboxes_dir: home.join("sandboxes"),
            host_etc,
            agent_exe,
            agent_args,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_group: cgroup_group_for(&home),
            egress_gid: egress.as_ref().ok().map(|p| p.gid),
        };
        let inner =
            ProcessBackend::new(config).map_err(|e| ApiError::internal(flotilla_agent::http::error_chain(&e)))?;
        let egress = egress.as_ref().map(|_| ()).map_err(Clone::clone);
        Ok(ProcessNodeBackend { inner, home, egress, image_dirs: Vec::new() })
    }

    pub fn inner(&self) -> &ProcessBackend {
        &self.inner
    }
}

/// One cgroup group per data directory, so that two nodes on one machine
/// (tests run several) never see each other's sandboxes as orphans.
fn cgroup_group_for(home: &std::path::Path) -> String {
    format!("flotilla-{:08x}", flotilla_sandbox::home_hash(home) as u32)
}

/// Why `outbound` is refused on a node whose egress policy is not in place.
fn outbound_off(why: &str) -> String {
    format!("network `outbound` is off on this node: {why}")
}

fn boot_error(e: BootError) -> ApiError {
    let code = match &e {
        BootError::AgentTimeout(..) => ErrorCode::Timeout,
        BootError::NoNetworkHelper
        | BootError::TapUnsupported
        | BootError::AgentNeedsLoader(_)
        | BootError::DiskTooSmall(_) => ErrorCode::InvalidArgument,
        BootError::Dirs { .. }
        | BootError::Socket { .. }
        | BootError::AgentExe { .. }
        | BootError::Cgroup(_)
        | BootError::Spawn(_)
        | BootError::Network { .. }
        | BootError::Disk { .. }
        | BootError::AgentDied(_)
        | BootError::Seccomp(_) => ErrorCode::Internal,
    };
    let step = match &e {
        BootError::AgentTimeout(..) | BootError::AgentDied(_) => "agent_up",
        _ => "created",
    };
    ApiError::new(code, format!("create failed at step `{step}`: {}", flotilla_agent::http::error_chain(&e)))
        .with_details(serde_json::json!({ "step": step }))
}

fn limits(r: &Resources) -> Limits {
    Limits { memory_bytes: r.memory_bytes, pids: r.pids, cpus: r.cpus }
}

impl Backend for ProcessNodeBackend {
    type Handle = Running;

    async fn boot(
        &self,
        rec: &SandboxRecord,
        step: &(dyn Fn(&str, Option<String>) + Send + Sync),
    ) -> Result<Running, ApiError> {
        let s = &rec.sandbox;
        let image = Image::parse(&s.image, &self.home).map_err(|e| ApiError::invalid(e.to_string()))?;
        let spec = SandboxSpec {
            id: s.id.clone(),
            hostname: s.name.clone(),
            image,
            limits: limits(&s.resources),
            network: s.network,
            uid_base: UID_BASE + rec.uid_slot * UID_RANGE,
            disk_bytes: s.resources.disk_bytes,
            env: s.env.clone(),
        };
        self.inner.start(&spec, step).await.map_err(boot_error)
    }

    fn adopt(&self, rec: &SandboxRecord) -> Option<Running> {
        self.inner.adopt(&rec.sandbox.id, rec.pid?, rec.start_time?)
    }

    fn identity(&self, h: &Running) -> (i32, u64) {
        (h.pid, h.start_time)
    }

    async fn exited(&self, h: &Running) -> (bool, String) {
        let e = h.exited().await;
        (e == flotilla_sandbox::ExitInfo::Exited(0), e.to_string())
    }

    fn shutdown(&self) {
        self.inner.shutdown()
    }

    async fn kill(&self, id: &str, h: &Running) -> Result<(), ApiError> {
        self.inner.stop(id, h).await.map_err(|e| ApiError::internal(format!("stopping sandbox {id}: {e}")))
    }

    async fn cleanup(&self, id: &str) {
        self.inner.cleanup(id).await
    }

    fn destroy(&self, id: &str) -> Result<(), ApiError> {
        self.inner.destroy(id).map_err(|e| ApiError::internal(format!("removing the files of sandbox {id}: {e}")))
    }

    fn set_limits(&self, id: &str, r: &Resources) -> Result<(), ApiError> {
        self.inner.set_limits(id, &limits(r)).map_err(|e| ApiError::internal(flotilla_agent::http::error_chain(&e)))
    }

    fn agent(&self, h: &Running) -> AgentClient {
        AgentClient::direct(HttpClient::new(Endpoint::Unix(h.agent_socket.clone())))
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::Process,
            available: true,
            reason: None,
            accelerator: None,
            accelerator_reason: None,
            network_modes: self.network_modes(),
        }
    }

    fn cgroup_version(&self) -> String {
        self.inner.cgroups().version().to_string()
    }

    fn network_modes(&self) -> Vec<flotilla_api::NetworkMode> {
        let mut modes = vec![flotilla_api::NetworkMode::None];
        if ProcessBackend::network_helper().is_some() && self.egress.is_ok() {
            modes.push(flotilla_api::NetworkMode::Outbound);
        }
        modes
    }

    fn check_network(&self, _kind: BackendKind, mode: flotilla_api::NetworkMode) -> Result<(), String> {
        match mode {
            flotilla_api::NetworkMode::None => Ok(()),
            flotilla_api::NetworkMode::Outbound if let Err(why) = &self.egress => Err(outbound_off(why)),
            flotilla_api::NetworkMode::Outbound if ProcessBackend::network_helper().is_some() => Ok(()),
            flotilla_api::NetworkMode::Outbound => {
                Err("network `outbound` needs pasta or slirp4netns: apt-get install -y passt".into())
            }
            flotilla_api::NetworkMode::Tap => Err("network `tap` is for microVMs (`--backend vm`); a process \
                                                  sandbox has `none` or `outbound`"
                .into()),
        }
    }

    fn resident(&self) -> Vec<String> {
        self.inner.resident()
    }

    fn images(&self) -> Vec<String> {
        vec!["host".into()]
    }

    fn check_image(&self, image: &str) -> Result<String, ApiError> {
        let parsed = Image::parse(image, &self.home).map_err(|e| ApiError::invalid(e.to_string()))?;
        if let Image::Dir(dir) = &parsed
            && !self.image_dirs.iter().any(|root| dir.starts_with(root))
        {
            let d = dir.display();
            return Err(ApiError::invalid(format!(
                "image dir:{d}: this node takes directory images only under the roots it was started with \
                 (flotilla node --allow-image-dir ROOT), and none holds {d}; or import it as an image: \
                 flotilla image import NAME:TAG {d}"
            ))
            .with_details(serde_json::json!({"field": "image"})));
        }
        Ok(parsed.reference())
    }
}

// ------------------------------------------------------------------ microVMs

/// The microVM backend, as the node sees it.
#[derive(Debug)]
pub struct VmNodeBackend {
    inner: std::sync::Arc<flotilla_vm::VmBackend>,
    home: PathBuf,
    /// Why `outbound` cannot be had, when the egress policy is not in place.
    egress: Result<(), String>,
}

impl VmNodeBackend {
    /// Must be called inside a tokio runtime: it starts the pool refill.
    pub fn new(home: PathBuf, agent: Option<PathBuf>, egress: &Result<EgressPolicy, String>) -> VmNodeBackend {
        let gid = egress.as_ref().ok().map(|p| p.gid);
        let inner = std::sync::Arc::new(flotilla_vm::VmBackend::new(&home, agent).with_egress_gid(gid));
        inner.start_pool();
        VmNodeBackend { inner, home, egress: egress.as_ref().map(|_| ()).map_err(Clone::clone) }
    }

    fn network_unavailable(&self, mode: flotilla_api::NetworkMode) -> Option<String> {
        match (&self.egress, mode) {
            (Err(why), flotilla_api::NetworkMode::Outbound) => Some(outbound_off(why)),
            _ => self.inner.network_unavailable(mode),
        }
    }

    pub fn inner(&self) -> &flotilla_vm::VmBackend {
        &self.inner
    }

    fn spec(&self, rec: &SandboxRecord) -> Result<flotilla_vm::VmSpec, ApiError> {
        let s = &rec.sandbox;
        let image = Image::parse(&s.image, &self.home).map_err(|e| ApiError::invalid(e.to_string()))?;
        Ok(flotilla_vm::VmSpec {
            id: s.id.clone(),
            hostname: s.name.clone(),
            image,
            memory_bytes: s.resources.memory_bytes.unwrap_or(crate::node::VM_DEFAULT_MEMORY),
            vcpus: vcpus(&s.resources),
            workspace_bytes: s.resources.disk_bytes.unwrap_or(flotilla_vm::DEFAULT_WORKSPACE),
            pids: s.resources.pids,
            network: s.network,
            env: s.env.clone(),
        })
    }

    async fn boot(
        &self,
        rec: &SandboxRecord,
        step: &(dyn Fn(&str, Option<String>) + Send + Sync),
    ) -> Result<flotilla_vm::VmRunning, ApiError> {
        let spec = self.spec(rec)?;
        if let Some(claimed) = self.inner.claim(&spec) {
            step("claimed", Some(format!("a booted microVM from the warm pool, pid {}", claimed.pid)));
            return Ok(claimed);
        }
        if let Some(restored) = self.inner.restore_pooled(&spec, step).await {
            return Ok(restored);
        }
        self.inner.start(&spec, step).await.map_err(|e| {
            let step = e.step();
            let code = match &e {
                flotilla_vm::VmError::Timeout(..) => ErrorCode::Timeout,
                flotilla_vm::VmError::Image(_) => ErrorCode::InvalidArgument,
                _ => ErrorCode::Internal,
            };
            ApiError::new(code, format!("create failed at step `{step}`: {}", flotilla_agent::http::error_chain(&e)))
                .with_details(serde_json::json!({ "step": step }))
        })
    }

    fn info(&self) -> BackendInfo {
        let (available, reason) = match self.inner.available() {
            Ok(version) => (true, Some(version)),
            Err(why) => (false, Some(why)),
        };
        let accel = self.inner.accel_cached();
        BackendInfo {
            kind: BackendKind::Vm,
            available,
            reason,
            accelerator: Some(accel.as_ref().map_or("not probed yet".into(), |a| a.accel.as_str().to_string())),
            accelerator_reason: accel.map(|a| a.reason),
            network_modes: self.inner.network_modes(),
        }
    }
}

/// vCPUs for a microVM: its CPU quota rounded up.
fn vcpus(r: &Resources) -> u32 {
    r.cpus.map(|c| c.ceil() as u32).unwrap_or(1).clamp(1, 64)
}

/// A running sandbox of either kind.
#[derive(Debug, Clone)]
pub enum Handle {
    Process(Running),
    Vm(flotilla_vm::VmRunning),
}

/// Every backend a node runs: process sandboxes always, microVMs beside
/// them (each sandbox's record says which it is).
#[derive(Debug)]
pub struct NodeBackend {
    pub process: ProcessNodeBackend,
    pub vm: VmNodeBackend,
}

impl NodeBackend {
    fn is_vm(&self, id: &str) -> bool {
        self.vm.inner.vm_dir(id).exists()
    }
}

impl Backend for NodeBackend {
    type Handle = Handle;

    async fn boot(
        &self,
        rec: &SandboxRecord,
        step: &(dyn Fn(&str, Option<String>) + Send + Sync),
    ) -> Result<Handle, ApiError> {
        match rec.sandbox.backend {
            BackendKind::Process => self.process.boot(rec, step).await.map(Handle::Process),
            BackendKind::Vm => self.vm.boot(rec, step).await.map(Handle::Vm),
        }
    }

    fn adopt(&self, rec: &SandboxRecord) -> Option<Handle> {
        match rec.sandbox.backend {
            BackendKind::Process => self.process.adopt(rec).map(Handle::Process),
            BackendKind::Vm => self.vm.inner.adopt(&rec.sandbox.id, rec.pid?, rec.start_time?).map(Handle::Vm),
        }
    }

    fn identity(&self, h: &Handle) -> (i32, u64) {
        match h {
            Handle::Process(h) => self.process.identity(h),
            Handle::Vm(h) => (h.pid, h.start_time),
        }
    }

    async fn exited(&self, h: &Handle) -> (bool, String) {
        match h {
            Handle::Process(h) => self.process.exited(h).await,
            Handle::Vm(h) => {
                let e = h.exited().await;
                let clean = h.halted_cleanly();
                let how = if clean {
                    "the guest halted".to_string()
                } else {
                    format!("QEMU {e} (console: {})", flotilla_vm::qemu::console_tail(&h.dir, 3))
                };
                (clean, how)
            }
        }
    }

    fn shutdown(&self) {
        self.vm.inner.drain_pool();
        self.process.shutdown()
    }

    async fn kill(&self, id: &str, h: &Handle) -> Result<(), ApiError> {
        match h {
            Handle::Process(h) => self.process.kill(id, h).await,
            Handle::Vm(h) => {
                self.vm.inner.kill(h).await.map_err(|e| ApiError::internal(format!("stopping microVM {id}: {e}")))
            }
        }
    }

    async fn cleanup(&self, id: &str) {
        self.process.cleanup(id).await;
        // Scans /proc and may wait for a QEMU to die: off the async workers.
        let vms = self.vm.inner.vms_dir();
        let id = id.to_string();
        let _ = tokio::task::spawn_blocking(move || flotilla_vm::cleanup_vm(&vms, &id)).await;
    }

    fn destroy(&self, id: &str) -> Result<(), ApiError> {
        self.process.destroy(id)?;
        self.vm.inner.destroy(id).map_err(|e| ApiError::internal(format!("removing the disks of microVM {id}: {e}")))
    }

    fn set_limits(&self, id: &str, r: &Resources) -> Result<(), ApiError> {
        if self.is_vm(id) {
            // A microVM's memory, vcpus and disk are fixed at boot: the new
            // values are recorded and apply at its next restart.
            tracing::info!(sandbox = id, "microVM limits recorded; they apply at the next restart");
            return Ok(());
        }
        self.process.set_limits(id, r)
    }

    fn agent(&self, h: &Handle) -> AgentClient {
        match h {
            Handle::Process(h) => self.process.agent(h),
            Handle::Vm(h) => h.agent(),
        }
    }

    fn info(&self) -> BackendInfo {
        self.process.info()
    }

    fn backends(&self) -> Vec<BackendInfo> {
        vec![self.process.info(), self.vm.info()]
    }

    fn pools(&self) -> Vec<flotilla_api::VmPool> {
        self.vm
            .inner
            .pools()
            .into_iter()
            .map(|p| flotilla_api::VmPool {
                image: p.target.key.image,
                size: p.target.size as u32,
                memory_bytes: p.target.key.memory_bytes,
                vcpus: p.target.key.vcpus,
                disk_bytes: p.target.key.workspace_bytes,
                ready: p.ready as u32,
                booting: p.booting as u32,
                last_from: p.last.as_ref().map(|l| if l.from_snapshot { "snapshot" } else { "cold" }.to_string()),
                last_ms: p.last.map(|l| l.millis),
            })
            .collect()
    }

    fn set_pool(&self, image: String, size: u32, r: &Resources) -> Result<(), ApiError> {
        let rec_like = flotilla_vm::pool::PoolKey {
            image,
            memory_bytes: r.memory_bytes.unwrap_or(crate::node::VM_DEFAULT_MEMORY),
            vcpus: vcpus(r),
            workspace_bytes: r.disk_bytes.unwrap_or(flotilla_vm::DEFAULT_WORKSPACE),
            pids: r.pids,
        };
        self.vm
            .inner
            .set_pool(flotilla_vm::pool::PoolTarget { key: rec_like, size: size as usize })
            .map_err(|e| ApiError::internal(format!("saving the pool settings: {e}")))
    }

    fn cgroup_version(&self) -> String {
        self.process.cgroup_version()
    }

    fn network_modes(&self) -> Vec<flotilla_api::NetworkMode> {
        let mut modes = self.process.network_modes();
        let vm = self.vm.inner.network_modes().into_iter().filter(|m| self.vm.network_unavailable(*m).is_none());
        modes.extend(vm.filter(|m| !modes.contains(m)).collect::<Vec<_>>());
        modes
    }

    fn check_network(&self, kind: BackendKind, mode: flotilla_api::NetworkMode) -> Result<(), String> {
        match kind {
            BackendKind::Process => self.process.check_network(kind, mode),
            BackendKind::Vm => self.vm.network_unavailable(mode).map_or(Ok(()), Err),
        }
    }

    fn resident(&self) -> Vec<String> {
        let mut ids = self.process.resident();
        ids.extend(self.vm.inner.resident());
        ids.sort();
        ids.dedup();
        ids
    }

    fn images(&self) -> Vec<String> {
        self.process.images()
    }

    fn check_image(&self, image: &str) -> Result<String, ApiError> {
        self.process.check_image(image)
    }
}
