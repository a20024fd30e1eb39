//! The `process` backend: a sandbox is one `clone3` into new namespaces
//! with the agent as its init.
//!
//! Boot, in order (each a step the node reports):
//! 1. Directories: `<sandboxes>/<id>/{workspace,root,upper,work,lower}`;
//!    the workspace (and overlay upper layer) are owned by the sandbox's uid
//!    range so that inside they belong to root. An image's tree is mounted
//!    at `lower` through an idmapped mount in the sandbox's range, so root
//!    inside owns what the image's root owns, and files it changes are
//!    copied up into `upper`, in its range, never as host root.
//! 2. The agent's listening socket is bound here, by the node, at
//!    `<id>/agent.sock` (socket activation): the node can connect the moment
//!    the process exists, and the socket path never appears inside.
//! 3. `clone3` (see [`crate::sys`]); the node writes the id maps, joins the
//!    child to its cgroup and starts the network helper, then releases it.
//! 4. The child assembles its root, pivots, drops privileges, installs
//!    seccomp and execs `flotilla agent --init`.
//! 5. The agent writes one byte on the readiness pipe once it serves.
//!
//! Stop is `SIGKILL` to the sandbox's init through its pidfd: the kernel
//! then kills every process in the pid namespace, so nothing can linger, and
//! every mount dies with the mount namespace. The workspace directory stays.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::NetworkMode;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::cgroup::{CgroupManager, Limits};
use crate::image::{HOST_SYSTEM_DIRS, Image};
use crate::sys::{self, ChildOp, ChildPlan};

/// How many uids and gids each sandbox's user namespace maps.
pub const UID_RANGE: u32 = 65_536;

/// Where uid ranges start: far above the ranges `/etc/subuid` usually
/// hands out, so a sandbox never shares a uid with a host user.
pub const UID_BASE: u32 = 1 << 30;

/// The smallest disk a process sandbox may have (an ext4 of less is all
/// metadata).
pub const MIN_DISK_BYTES: u64 = 16 << 20;

/// Formatted disks of each size asked for, kept ready for the next creates.
const SPARE_DISKS: usize = 1;

/// Static configuration of the backend.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// `<home>/sandboxes`.
    pub sandboxes_dir: PathBuf,
    /// The generated `/etc` of `host` images.
    pub host_etc: PathBuf,
    /// The executable that implements `agent --init` (normally ourselves).
    pub agent_exe: PathBuf,
    /// Arguments before `--init` (normally `["agent"]`).
    pub agent_args: Vec<String>,
    /// Usually `/sys/fs/cgroup`.
    pub cgroup_root: PathBuf,
    /// Our group name under each hierarchy; unique per node.
    pub cgroup_group: String,
    /// The group network helpers run with, under the node's egress policy
    /// ([`crate::egress`]); `None` leaves them unfiltered.
    pub egress_gid: Option<u32>,
}

/// What one boot needs to know.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: String,
    pub hostname: String,
    pub image: Image,
    pub limits: Limits,
    pub network: NetworkMode,
    /// First host uid of this sandbox's range.
    pub uid_base: u32,
    /// What the sandbox may write, in bytes: its directory (workspace and
    /// copy-on-write layer) becomes a filesystem of this size, and each
    /// tmpfs (`/tmp`, `/root`, `/dev/shm`) is capped at it. `None`: no cap.
    pub disk_bytes: Option<u64>,
    /// Environment the agent (and so every exec) starts with.
    pub env: BTreeMap<String, String>,
}

/// Why a boot failed; each variant names its step.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("preparing directory {path}")]
    Dirs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("binding the agent socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening the agent executable {path}")]
    AgentExe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the cgroup")]
    Cgroup(#[source] crate::cgroup::CgroupError),
    #[error("starting the sandbox process")]
    Spawn(#[source] sys::SpawnError),
    #[error("starting {helper} for outbound networking")]
    Network {
        helper: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("outbound networking was asked for, but neither slirp4netns nor pasta is installed")]
    NoNetworkHelper,
    #[error("giving the sandbox its {bytes}-byte disk")]
    Disk {
        bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error("a process sandbox's disk needs at least 16 MiB (asked: {0} bytes)")]
    DiskTooSmall(u64),
    #[error("network `tap` is for microVMs; a process sandbox has `none` or `outbound`")]
    TapUnsupported,
    #[error("the agent did not report ready within {0:?}{1}")]
    AgentTimeout(Duration, String),
    #[error("the agent exited before it was ready{0}")]
    AgentDied(String),
    #[error("seccomp")]
    Seccomp(#[source] crate::seccomp::SeccompError),
    #[error(
        "the agent {0} is dynamically linked and the image has no loader for it; \
         run a static flotilla (RUSTFLAGS='-C target-feature=+crt-static' cargo build --release \
         --target x86_64-unknown-linux-gnu) or point FLOTILLA_GUEST_AGENT at one"
    )]
    AgentNeedsLoader(PathBuf),
}

/// How a sandbox's init ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    Exited(i32),
    Signaled(i32),
    /// Gone, but not our child (re-adopted after a node restart).
    Unknown,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Exited(c) => write!(f, "exited with status {c}"),
            ExitInfo::Signaled(s) => write!(f, "killed by signal {s}"),
            ExitInfo::Unknown => write!(f, "exited"),
        }
    }
}

/// A booted sandbox.
#[derive(Debug, Clone)]
pub struct Running {
    pub pid: i32,
    pub start_time: u64,
    pub agent_socket: PathBuf,
    pidfd: Arc<OwnedFd>,
    exit: watch::Receiver<Option<ExitInfo>>,
    net_helper: Option<Arc<std::sync::Mutex<Option<tokio::process::Child>>>>,
}

impl Running {
    /// Waits until the sandbox's init has exited.
    pub async fn exited(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().unwrap_or(ExitInfo::Unknown);
            }
        }
    }

    /// The exit, if it has happened.
    pub fn exit_now(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }
}

/// The process backend.
#[derive(Debug)]
pub struct ProcessBackend {
    config: ProcessConfig,
    cgroups: CgroupManager,
    seccomp: Vec<Vec<libc::sock_filter>>,
}

impl ProcessBackend {
    pub fn new(config: ProcessConfig) -> Result<ProcessBackend, BootError> {
        let cgroups = CgroupManager::detect(&config.cgroup_root, &config.cgroup_group);
        let seccomp = crate::seccomp::sandbox_programs().map_err(BootError::Seccomp)?;
        Ok(ProcessBackend { config, cgroups, seccomp })
    }

    pub fn cgroups(&self) -> &CgroupManager {
        &self.cgroups
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.config.sandboxes_dir.join(id)
    }

    pub fn workspace_dir(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("workspace")
    }

    /// The helper outbound networking would use, if any is installed.
    pub fn network_helper() -> Option<&'static str> {
        ["slirp4netns", "pasta"].into_iter().find(|h| which(h).is_some())
    }

    /// Boots a sandbox. `on_step` hears `created` once the process exists.
    pub async fn start(
        &self,
        spec: &SandboxSpec,
        on_step: impl Fn(&str, Option<String>),
    ) -> Result<Running, BootError> {
        if spec.network == NetworkMode::Tap {
            return Err(BootError::TapUnsupported);
        }
        let dir = self.sandbox_dir(&spec.id);
        let dirs_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BootError::Dirs { path, source }
        };
        if let Some(bytes) = spec.disk_bytes {
            self.mount_disk(&spec.id, bytes).await?;
            on_step("disk_mounted", Some(flotilla_api::units::format_size(bytes)));
        }
        for sub in ["workspace", "root", "upper", "work", "lower"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(dirs_err(&p))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).map_err(dirs_err(&dir))?;
        for sub in ["workspace", "upper", "work"] {
            let p = dir.join(sub);
            let c = cstr(&p);
            sys::lchown(&c, spec.uid_base, spec.uid_base).map_err(dirs_err(&p))?;
        }

        // Socket activation: bind here, hand the fd over.
        let sock_path = dir.join("agent.sock");
        let _ = std::fs::remove_file(&sock_path);
        let listener = std::os::unix::net::UnixListener::bind(&sock_path)
            .map_err(|source| BootError::Socket { path: sock_path.clone(), source })?;
        std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| BootError::Socket { path: sock_path.clone(), source })?;
        let (ready_r, ready_w) = sys::pipe().map_err(|source| BootError::Socket { path: sock_path.clone(), source })?;

        let log_path = dir.join("agent.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(dirs_err(&log_path))?;
        let devnull = File::open("/dev/null").map_err(dirs_err(Path::new("/dev/null")))?;
        let exe = File::open(&self.config.agent_exe)
            .map_err(|source| BootError::AgentExe { path: self.config.agent_exe.clone(), source })?;

        // Every fd the child rearranges must sit above 4, or dup2 into 0..4
        // could clobber one before it is moved.
        let high = |fd: std::os::fd::BorrowedFd<'_>| sys::dup_at_least(fd, 10);
        let io_err = |source| BootError::Socket { path: sock_path.clone(), source };
        let plan = ChildPlan {
            root: cstr(&dir.join("root")),
            ops: self.root_ops(spec, &dir),
            readonly_root: spec.image == Image::Host,
            cwd: c"/workspace".to_owned(),
            hostname: CString::new(spec.hostname.as_bytes()).unwrap_or_else(|_| c"sandbox".to_owned()),
            exe: OwnedFd::from(exe),
            argv: self.agent_argv(),
            envp: agent_env(&spec.env),
            stdin: high(devnull.as_fd()).map_err(io_err)?,
            stdout: high(log.as_fd()).map_err(io_err)?,
            listener: high(listener.as_fd()).map_err(io_err)?,
            ready: high(ready_w.as_fd()).map_err(io_err)?,
            seccomp: self.seccomp.clone(),
        };
        drop(ready_w);

        let cgroup = self.cgroups.create(&spec.id, &spec.limits).map_err(BootError::Cgroup)?;
        let pending = sys::spawn_sandbox(&plan).map_err(BootError::Spawn)?;
        drop(plan);
        let pid = pending.pid;
        if let Err(e) = pending.write_id_maps(spec.uid_base, UID_RANGE) {
            pending.abort();
            let _ = cgroup.remove();
            return Err(BootError::Spawn(e));
        }
        if let Err(e) = cgroup.add_pid(pid) {
            pending.abort();
            let _ = cgroup.remove();
            return Err(BootError::Cgroup(e));
        }
        let net_helper = match spec.network {
            NetworkMode::None | NetworkMode::Tap => None,
            NetworkMode::Outbound => match start_network_helper(pid, self.config.egress_gid).await {
                Ok(child) => {
                    // The helper joins the sandbox's cgroup: killing the
                    // cgroup then takes it along, also when a crashed node
                    // restarts and no longer holds its handle.
                    if let Some(hpid) = child.as_ref().and_then(|c| c.id())
                        && let Err(e) = cgroup.add_pid(hpid as i32)
                    {
                        tracing::warn!(sandbox = %spec.id, error = %e, "network helper not moved into the cgroup");
                    }
                    child
                }
                Err(e) => {
                    pending.abort();
                    let _ = cgroup.remove();
                    return Err(e);
                }
            },
        };
        // The child is ours and unreaped, so its pid cannot be reused: if it
        // never reports (it should take milliseconds), kill it, which ends
        // the blocking read in `release` with an error.
        // The image's root owns its files: its tree is attached through the
        // sandbox's own id mapping (see `sys::image_tree`). Where the kernel
        // or the image's filesystem cannot, the plain tree (files owned by
        // host ids outside the range then show as nobody and cannot be
        // changed). Either way the node opens it: the child never walks the
        // image store's path (0700). Only a kernel without `open_tree`
        // (before 5.2) leaves the child to bind it by path.
        let lower_mount = spec.image.lower_dir().and_then(|lower| match sys::image_tree(&cstr(lower), pid) {
            Ok((fd, None)) => Some(fd),
            Ok((fd, Some(e))) => {
                tracing::warn!(sandbox = %spec.id, error = %e, image = %lower.display(),
                    "no idmapped mount for the image; root inside will not own its files");
                Some(fd)
            }
            Err(e) => {
                tracing::warn!(sandbox = %spec.id, error = %e, image = %lower.display(),
                    "could not open the image's tree; the sandbox binds it by path");
                None
            }
        });
        let child_pid = pending.pid;
        let mut releasing = tokio::task::spawn_blocking(move || pending.release_with(lower_mount));
        let released = match tokio::time::timeout(flotilla_api::limits::AGENT_READY_TIMEOUT, &mut releasing).await {
            Ok(r) => r.expect("release does not panic"),
            Err(_) => {
                tracing::error!(sandbox = %spec.id, pid = child_pid, "the sandbox child hung before exec; killing it");
                let _ = sys::kill(child_pid, libc::SIGKILL);
                releasing.await.expect("release does not panic")
            }
        };
        let (pid, pidfd) = match released {
            Ok(v) => v,
            Err(e) => {
                kill_helper(net_helper);
                let _ = cgroup.remove();
                // execveat of a dynamic binary whose interpreter is not in
                // the image's root fails with ENOENT.
                if let sys::SpawnError::Child { step: sys::ChildStep::Exec, source, .. } = &e
                    && source.raw_os_error() == Some(libc::ENOENT)
                    && spec.image != Image::Host
                {
                    return Err(BootError::AgentNeedsLoader(self.config.agent_exe.clone()));
                }
                return Err(BootError::Spawn(e));
            }
        };
        drop(listener);
        let start_time = sys::process_start_time(pid).unwrap_or(0);
        on_step("created", Some(format!("pid {pid}")));
        let running = self.watch(pid, start_time, pidfd, sock_path, net_helper);

        // Wait for the readiness byte (or the pipe closing: the agent died).
        let mut ready = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_r)
            .map_err(|source| BootError::Socket { path: dir.join("ready"), source })?;
        let mut b = [0u8; 1];
        let timeout = flotilla_api::limits::AGENT_READY_TIMEOUT;
        let outcome = tokio::time::timeout(timeout, ready.read(&mut b)).await;
        let fail = match outcome {
            Ok(Ok(1)) => None,
            Ok(_) => Some(BootError::AgentDied(log_tail(&log_path))),
            Err(_) => Some(BootError::AgentTimeout(timeout, log_tail(&log_path))),
        };
        if let Some(err) = fail {
            let _ = self.stop(&spec.id, &running).await;
            return Err(err);
        }
        Ok(running)
    }

    /// Re-adopts a sandbox whose init survived a node restart: same pid and
    /// same start time, so it is not a stranger that reused the pid.
    pub fn adopt(&self, id: &str, pid: i32, start_time: u64) -> Option<Running> {
        if pid <= 0 || sys::process_start_time(pid)? != start_time {
            return None;
        }
        let pidfd = sys::pidfd_open(pid).ok()?;
        let sock = self.sandbox_dir(id).join("agent.sock");
        sock.exists().then(|| self.watch(pid, start_time, pidfd, sock, None))
    }

    fn watch(
        &self,
        pid: i32,
        start_time: u64,
        pidfd: OwnedFd,
        agent_socket: PathBuf,
        net_helper: Option<tokio::process::Child>,
    ) -> Running {
        let pidfd = Arc::new(pidfd);
        let (tx, rx) = watch::channel(None);
        let fd = pidfd.clone();
        tokio::spawn(async move {
            let exit = wait_pidfd(fd).await;
            let _ = tx.send(Some(exit));
        });
        Running {
            pid,
            start_time,
            agent_socket,
            pidfd,
            exit: rx,
            net_helper: net_helper.map(|c| Arc::new(std::sync::Mutex::new(Some(c)))),
        }
    }

    /// Kills the sandbox (every process in it) and waits until it is gone,
    /// then releases its cgroup. Idempotent.
    pub async fn stop(&self, id: &str, running: &Running) -> io::Result<()> {
        if running.exit_now().is_none() {
            kill_and_wait(&running.pidfd, running.pid, running.exited()).await?;
        }
        if let Some(h) = &running.net_helper {
            kill_helper(h.lock().expect("helper lock").take());
        }
        self.cleanup(id).await;
        Ok(())
    }

    /// Releases what a stopped sandbox holds on the host (cgroup, socket).
    /// Safe to call for a sandbox that never ran or already was cleaned.
    pub async fn cleanup(&self, id: &str) {
        let cg = self.cgroups.open(id);
        // Members can only be left over if a re-adopted init's namespace
        // somehow outlived it (pid namespaces die with their init), so this
        // kill is belt and braces. Both calls poll with deadlines: keep them
        // off the async workers.
        let sid = id.to_string();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = cg.kill(|pid| {
                let _ = sys::kill(pid, libc::SIGKILL);
            });
            if let Err(e) = cg.remove() {
                tracing::warn!(sandbox = sid, error = %e, "cgroup not removed");
            }
        })
        .await;
        let _ = std::fs::remove_file(self.sandbox_dir(id).join("agent.sock"));
    }

    /// Releases what the backend holds for the node as a whole (its cgroup
    /// parent group). Call after every sandbox is stopped.
    pub fn shutdown(&self) {
        self.cgroups.remove_group();
    }

    /// Ids of every sandbox with a directory or a cgroup on this host.
    pub fn resident(&self) -> Vec<String> {
        let mut ids: std::collections::BTreeSet<String> = self.cgroups.list().into_iter().collect();
        if let Ok(rd) = std::fs::read_dir(&self.config.sandboxes_dir) {
            ids.extend(rd.flatten().filter_map(|e| e.file_name().to_str().map(str::to_owned)));
        }
        ids.into_iter().collect()
    }

    /// Deletes everything the sandbox has on disk (its own filesystem
    /// too, when it has one). The sandbox must be stopped.
    pub fn destroy(&self, id: &str) -> io::Result<()> {
        let dir = self.sandbox_dir(id);
        if is_mountpoint(&dir) {
            // Lazy: whatever still holds a file open keeps it until it
            // closes; the directory is free at once. The loop device goes
            // with the last user.
            sys::umount_detach(&cstr(&dir))?;
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            r => r?,
        }
        match std::fs::remove_file(self.disk_image(id)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// Where a sandbox's disk image lives: beside the sandboxes, never in
    /// the directory it becomes.
    fn disk_image(&self, id: &str) -> PathBuf {
        self.config.sandboxes_dir.with_file_name("disks").join(format!("{id}.img"))
    }

    /// Puts the sandbox's directory on an ext4 of its own of `bytes` (a
    /// sparse image, loop-mounted `nosuid,nodev`), so that its workspace and
    /// copy-on-write layer end at its disk limit with ENOSPC, and the host's
    /// disk and other sandboxes are untouched. Made once; a restart, or a
    /// sandbox adopted after a node restart, finds it mounted.
    async fn mount_disk(&self, id: &str, bytes: u64) -> Result<(), BootError> {
        if bytes < MIN_DISK_BYTES {
            return Err(BootError::DiskTooSmall(bytes));
        }
        let err = |source| BootError::Disk { bytes, source };
        let dir = self.sandbox_dir(id);
        std::fs::create_dir_all(&dir).map_err(err)?;
        if is_mountpoint(&dir) {
            return Ok(());
        }
        let image = self.disk_image(id);
        let disks = image.parent().expect("a parent");
        std::fs::create_dir_all(disks).map_err(err)?;
        std::fs::set_permissions(disks, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        // Spares of this size, formatted after the last create that asked
        // for one, save the mkfs; creates racing for one: one wins the
        // rename, the other tries the next or formats its own. (Two spares
        // measured no faster on 2 cores: their mkfs competes with creates.)
        let spares: Vec<PathBuf> = (0..SPARE_DISKS).map(|i| disks.join(format!("spare-{bytes}-{i}.img"))).collect();
        if !image.exists() && !spares.iter().any(|s| std::fs::rename(s, &image).is_ok()) {
            format_disk(&image, bytes).await.map_err(err)?;
        }
        tokio::spawn(async move {
            for spare in spares {
                if !spare.exists()
                    && let Err(e) = format_disk(&spare, bytes).await
                {
                    tracing::warn!(error = %e, "formatting a spare disk failed");
                }
            }
        });
        // In-process (LOOP_CONFIGURE + mount(2)); `mount -o loop` where the
        // kernel is older than 5.8.
        let (img, target) = (image.clone(), dir.clone());
        let direct =
            tokio::task::spawn_blocking(move || sys::loop_mount(&img, &target, libc::MS_NOSUID | libc::MS_NODEV))
                .await
                .expect("loop_mount does not panic");
        match direct {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
                let mut args = vec!["-t".into(), "ext4".into(), "-o".into(), "loop,nosuid,nodev,noinit_itable".into()];
                args.push(image.into_os_string());
                args.push(dir.clone().into_os_string());
                run_tool_args("mount", &args).await.map_err(err)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Applies new limits to a running sandbox.
    pub fn set_limits(&self, id: &str, limits: &Limits) -> Result<(), crate::cgroup::CgroupError> {
        self.cgroups.open(id).set_limits(limits)
    }

    fn agent_argv(&self) -> Vec<CString> {
        let mut v = vec![c"flotilla-agent".to_owned()];
        v.extend(self.config.agent_args.iter().map(|a| CString::new(a.as_bytes()).expect("no NUL in args")));
        for a in ["--init", "--listen-fd", "3", "--ready-fd", "4", "--workspace", "/workspace"] {
            v.push(CString::new(a).expect("static"));
        }
        v
    }

    /// The filesystem the sandbox sees, as mount operations.
    fn root_ops(&self, spec: &SandboxSpec, dir: &Path) -> Vec<ChildOp> {
        let root = dir.join("root");
        let at = |rel: &str| cstr(&root.join(rel));
        let mut ops = Vec::new();
        let mount = |source: &str, target: CString, fstype: &str, flags: libc::c_ulong, data: &str| ChildOp::Mount {
            source: Some(CString::new(source).expect("static")),
            target,
            fstype: Some(CString::new(fstype).expect("static")),
            flags,
            data: (!data.is_empty()).then(|| CString::new(data).expect("static")),
        };
        let mkdir = |rel: &str, mode| ChildOp::Mkdir { path: at(rel), mode };
        match &spec.image {
            Image::Host => {
                ops.push(mount("tmpfs", cstr(&root), "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755,size=1m"));
                for d in HOST_SYSTEM_DIRS {
                    let host = Path::new("/").join(d);
                    match std::fs::symlink_metadata(&host) {
                        Ok(m) if m.file_type().is_symlink() => {
                            if let Ok(t) = std::fs::read_link(&host) {
                                ops.push(ChildOp::Symlink { target: cstr(&t), path: at(d) });
                            }
                        }
                        Ok(m) if m.is_dir() => {
                            ops.push(mkdir(d, 0o755));
                            ops.push(ChildOp::Bind {
                                source: cstr(&host),
                                target: at(d),
                                readonly: true,
                                recursive: true,
                            });
                        }
                        _ => {}
                    }
                }
                ops.push(mkdir("etc", 0o755));
                ops.push(ChildOp::Bind {
                    source: cstr(&self.config.host_etc),
                    target: at("etc"),
                    readonly: true,
                    recursive: false,
                });
            }
            Image::Dir(lower) | Image::Stored { rootfs: lower, .. } => {
                // The node sends the image's tree, idmapped into the
                // sandbox's range, with the release (plain if it cannot).
                ops.push(ChildOp::AttachMount { target: cstr(&dir.join("lower")), fallback: Some(cstr(lower)) });
                let data = format!(
                    "lowerdir={},upperdir={},workdir={},userxattr",
                    dir.join("lower").display(),
                    dir.join("upper").display(),
                    dir.join("work").display()
                );
                ops.push(ChildOp::Mount {
                    source: Some(c"overlay".to_owned()),
                    target: cstr(&root),
                    fstype: Some(c"overlay".to_owned()),
                    flags: libc::MS_NOSUID | libc::MS_NODEV,
                    data: Some(CString::new(data).expect("paths have no NUL")),
                });
            }
        }
        ops.push(mkdir("workspace", 0o755));
        ops.push(ChildOp::Bind {
            source: cstr(&dir.join("workspace")),
            target: at("workspace"),
            readonly: false,
            recursive: false,
        });
        let nsd = libc::MS_NOSUID | libc::MS_NODEV;
        // With a disk limit, each tmpfs is capped at it too (their pages
        // count against the memory limit as well).
        let size = spec.disk_bytes.map(|b| format!(",size={b}")).unwrap_or_default();
        ops.push(mkdir("tmp", 0o1777));
        ops.push(mount("tmpfs", at("tmp"), "tmpfs", nsd, &format!("mode=1777{size}")));
        ops.push(mkdir("root", 0o700));
        ops.push(mount("tmpfs", at("root"), "tmpfs", nsd, &format!("mode=0700{size}")));
        ops.push(mkdir("proc", 0o555));
        ops.push(mount("proc", at("proc"), "proc", nsd | libc::MS_NOEXEC, ""));
        // `ping` without CAP_NET_RAW: ICMP echo sockets for every group of
        // the sandbox, in its own network namespace.
        ops.push(ChildOp::Write {
            path: at("proc/sys/net/ipv4/ping_group_range"),
            data: CString::new(format!("0 {}", UID_RANGE - 1)).expect("digits"),
        });
        ops.push(mkdir("dev", 0o755));
        ops.push(mount("tmpfs", at("dev"), "tmpfs", libc::MS_NOSUID | libc::MS_NOEXEC, "mode=0755,size=64k"));
        for node in ["null", "zero", "full", "random", "urandom", "tty"] {
            let target = at(&format!("dev/{node}"));
            ops.push(ChildOp::Touch { path: target.clone() });
            ops.push(ChildOp::Bind {
                source: CString::new(format!("/dev/{node}")).expect("static"),
                target,
                readonly: false,
                recursive: false,
            });
        }
        ops.push(mkdir("dev/pts", 0o755));
        ops.push(mount(
            "devpts",
            at("dev/pts"),
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ));
        ops.push(ChildOp::Symlink { target: c"pts/ptmx".to_owned(), path: at("dev/ptmx") });
        ops.push(mkdir("dev/shm", 0o1777));
        ops.push(mount("tmpfs", at("dev/shm"), "tmpfs", nsd, &format!("mode=1777{size}")));
        for (name, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            ops.push(ChildOp::Symlink {
                target: CString::new(target).expect("static"),
                path: at(&format!("dev/{name}")),
            });
        }
        ops
    }
}

/// The base environment of the agent and every process it starts.
fn agent_env(extra: &BTreeMap<String, String>) -> Vec<CString> {
    let mut env: BTreeMap<String, String> = [
        ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        ("HOME", "/root"),
        ("LANG", "C.UTF-8"),
        ("TERM", "xterm-256color"),
        ("FLOTILLA_SANDBOX", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.into_iter().filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok()).collect()
}

/// Sends SIGKILL through `pidfd` and waits (up to
/// [`STOP_TIMEOUT`](flotilla_api::limits::STOP_TIMEOUT)) for `exited`, the
/// process's exit watch, to resolve. A process already gone is fine.
pub async fn kill_and_wait(pidfd: &OwnedFd, pid: i32, exited: impl std::future::Future) -> io::Result<()> {
    match sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
        Err(e) => return Err(e),
    }
    let t = flotilla_api::limits::STOP_TIMEOUT;
    if tokio::time::timeout(t, exited).await.is_err() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, format!("pid {pid} still alive after {t:?}")));
    }
    Ok(())
}

/// Waits until the process behind `fd` has exited (reaping it when it is our
/// child) and says how it ended.
pub async fn wait_pidfd(fd: Arc<OwnedFd>) -> ExitInfo {
    let reap = |fd: &OwnedFd| match sys::pidfd_try_reap(fd.as_fd()) {
        Ok(Some(Some(sys::WaitStatus::Exited(c)))) => Some(ExitInfo::Exited(c)),
        Ok(Some(Some(sys::WaitStatus::Signaled(s)))) => Some(ExitInfo::Signaled(s)),
        Ok(Some(None)) => Some(ExitInfo::Unknown),
        Ok(None) => None,
        Err(_) => Some(ExitInfo::Unknown),
    };
    // A pidfd polls readable once the process has exited.
    let Ok(afd) = sys::async_fd(sys::SharedFd(fd.clone()), tokio::io::Interest::READABLE) else {
        // Fallback: poll (should not happen: pidfds support epoll).
        loop {
            if let Some(e) = reap(&fd) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    loop {
        match afd.readable().await {
            Ok(mut guard) => {
                if let Some(e) = reap(&fd) {
                    return e;
                }
                // For a non-child, readable means exited.
                if !sys::process_alive_fd(&fd) {
                    return ExitInfo::Unknown;
                }
                guard.clear_ready();
            }
            Err(_) => return ExitInfo::Unknown,
        }
    }
}

/// Starts slirp4netns or pasta for the sandbox whose init is `pid`. Its
/// sockets carry the node's egress group `egress_gid`, which the host's
/// netfilter holds to the egress policy.
async fn start_network_helper(pid: i32, egress_gid: Option<u32>) -> Result<Option<tokio::process::Child>, BootError> {
    use std::os::unix::process::CommandExt as _;
    let helper = ProcessBackend::network_helper().ok_or(BootError::NoNetworkHelper)?;
    let net_err = |source| BootError::Network { helper, source };
    let mut cmd = std::process::Command::new(helper);
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    if helper == "pasta" {
        // pasta configures the namespace, then daemonises: its first
        // process exiting with 0 means ready. It exits by itself when the
        // namespace goes away. --no-map-gw keeps the host's loopback out,
        // and no port is forwarded either way (pasta's default maps the
        // host's bound ports into the namespace: -T/-U auto). It stays
        // root (it must join the sandbox's user namespace) in the egress
        // group.
        cmd.args(["--config-net", "--no-map-gw", "--quiet"]);
        cmd.args(["-t", "none", "-u", "none", "-T", "none", "-U", "none"]);
        if let Some(gid) = egress_gid {
            cmd.args(["--runas", &format!("0:{gid}")]);
        }
        cmd.arg(pid.to_string());
        let status = tokio::process::Command::from(cmd).status().await.map_err(net_err)?;
        return if status.success() {
            Ok(None)
        } else {
            Err(net_err(io::Error::other(format!("pasta exited with {status}"))))
        };
    }
    let (ready_r, ready_w) = sys::pipe().map_err(net_err)?;
    // slirp4netns confines itself (its own mount namespace and an empty
    // root, capabilities dropped, a seccomp filter) once the TAP exists.
    cmd.args(["--configure", "--mtu=65520", "--disable-host-loopback", "--enable-sandbox", "--enable-seccomp"])
        .arg("--ready-fd=3")
        .arg(pid.to_string())
        .arg("tap0");
    sys::command_pass_fd(&mut cmd, ready_w.as_raw_fd(), 3);
    if let Some(gid) = egress_gid {
        cmd.gid(gid);
    }
    let mut tcmd = tokio::process::Command::from(cmd);
    tcmd.kill_on_drop(true);
    let child = tcmd.spawn().map_err(net_err)?;
    drop(ready_w);
    let mut r = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_r).map_err(net_err)?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), r.read(&mut b)).await {
        Ok(Ok(1)) => Ok(Some(child)),
        _ => Err(net_err(io::Error::other("did not report ready within 5s"))),
    }
}

/// Makes `path`: a sparse ext4 image of `bytes`, written under a temporary
/// name and renamed into place, so that `path` is always whole.
async fn format_disk(path: &Path, bytes: u64) -> io::Result<()> {
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    std::fs::File::create(&tmp).and_then(|f| f.set_len(bytes))?;
    // No journal: a sandbox's scratch space is not worth the writes, and
    // lazy init keeps mkfs to metadata of a few block groups.
    let mkfs = ["-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "lazy_itable_init=1,lazy_journal_init=1"];
    let made = run_tool("mkfs.ext4", &mkfs, &tmp).await;
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made?;
    std::fs::rename(&tmp, path)
}

/// Whether `path` is the root of a mount (its device differs from its
/// parent's).
fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(path), path.parent().map(std::fs::metadata)) {
        (Ok(m), Some(Ok(p))) => m.dev() != p.dev(),
        _ => false,
    }
}

async fn run_tool(tool: &str, args: &[&str], target: &Path) -> io::Result<()> {
    let mut all: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    all.push(target.into());
    run_tool_args(tool, &all).await
}

/// Runs a host tool, its stderr the error when it fails.
async fn run_tool_args(tool: &str, args: &[std::ffi::OsString]) -> io::Result<()> {
    let out = tokio::process::Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("running {tool}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("{tool}: {} ({})", String::from_utf8_lossy(&out.stderr).trim(), out.status)))
    }
}

fn kill_helper(h: Option<tokio::process::Child>) {
    if let Some(mut c) = h {
        let _ = c.start_kill();
        tokio::spawn(async move {
            let _ = c.wait().await;
        });
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths have no NUL")
}

/// The last lines the agent logged, to explain a failed boot.
fn log_tail(path: &Path) -> String {
    let Ok(s) = std::fs::read_to_string(path) else { return String::new() };
    let tail: Vec<&str> = s.lines().rev().take(5).collect();
    if tail.is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = tail.into_iter().rev().collect();
    format!("; agent log: {}", lines.join(" | "))
}
