//! The VMM: what the backend needs from a virtual machine monitor, and
//! QEMU's `microvm` machine as the one we have. A Firecracker or Cloud
//! Hypervisor driver would implement [`Vmm`] with its own launch line and
//! control socket.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::guest::{CONFIG_FW_CFG, PORT_NAME};

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Everything one launch needs; paths are inside the sandbox's directory.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Whether the kernel finds its devices through ACPI ([`machine`]).
    pub acpi: bool,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Copy-on-write root disk (qcow2 over the image's base disk).
    pub root_disk: PathBuf,
    pub workspace_disk: PathBuf,
    /// The guest config file handed over through fw_cfg.
    pub config: PathBuf,
    /// The guest's NIC; its host side is handed over as fd [`NET_FD`].
    pub network: Option<crate::net::HostNet>,
    /// Restore from a snapshot instead of booting the kernel.
    pub incoming: Option<Incoming>,
    /// The unprivileged uid (and gid) QEMU drops to once it has opened its
    /// disks, sockets and devices ([`vmm_uid`]); none: stay as we are (a
    /// node that is not root cannot change uid anyway).
    pub runas: Option<u32>,
}

/// The first host uid QEMUs run as: above the sandboxes' ranges
/// (`2^30 + slot * 2^16`), so no process sandbox and no host user shares it.
pub const VMM_UID_BASE: u32 = 3 << 30;
/// How many uids QEMUs are spread over (2^24: two of a hundred VMs share a
/// uid with odds of about 1 in 3,000, and then could only signal each other).
pub const VMM_UID_SPAN: u32 = 1 << 24;

/// The uid (and gid) the QEMU of the VM with id `id` runs as: its own,
/// owning nothing on the host. QEMU opens everything it needs as root,
/// then drops to it (`-runas`): a guest that took over the emulator holds
/// no capabilities, cannot open the node's files or another VM's disks, and
/// cannot trace other QEMUs (a process whose uid changed is not dumpable).
pub fn vmm_uid(id: &str) -> u32 {
    use sha2::Digest;
    let h = sha2::Sha256::digest(id.as_bytes());
    VMM_UID_BASE + u32::from_le_bytes([h[0], h[1], h[2], h[3]]) % VMM_UID_SPAN
}

/// Where a restored VM's state comes from.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The saved state (a QEMU migration stream).
    pub state: PathBuf,
    /// The Unix socket QEMU waits on for it (`-incoming unix:`).
    pub socket: PathBuf,
    /// The VM's directory (its QMP socket resumes the guest).
    pub dir: PathBuf,
}

/// The fd number QEMU finds the host side of the guest's NIC at.
pub const NET_FD: i32 = 3;

/// Files of one VM under its directory.
pub fn qmp_socket(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}
pub fn agent_socket(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}
pub fn console_log(dir: &Path) -> PathBuf {
    dir.join("console.log")
}
pub fn pid_file(dir: &Path) -> PathBuf {
    dir.join("vmm.pid")
}

/// A virtual machine monitor.
pub trait Vmm: Send + Sync + 'static {
    /// A short name (`qemu`).
    fn name(&self) -> &'static str;
    /// The program and its arguments for `spec`.
    fn command(&self, spec: &LaunchSpec) -> std::process::Command;
    /// Asks the VMM, over its control socket, to end the VM now.
    fn quit(&self, dir: &Path) -> futures_util::future::BoxFuture<'static, std::io::Result<()>>;
}

/// The kernel command line. `quiet` and the i8042 switches skip probing
/// that costs hundreds of milliseconds under TCG; `panic=-1 reboot=t` turn
/// a dead guest into a reset, which ends QEMU (`-no-reboot`).
pub const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1 reboot=t i8042.noaux i8042.nomux i8042.nopnp \
                                  i8042.dumbkbd no_timer_check";

/// The kernel command line for `accel`. Under TCG the guest calibrates its
/// TSC against the emulated PIT, which fails when the host is busy ("tsc:
/// Unable to calibrate against PIT"), and the guest then hangs before init
/// (3 boots in 5 under load here). TCG's TSC runs at the host's rate, so
/// telling the guest that rate skips the calibration: 0 hangs in many
/// boots under the same load.
///
/// A kernel without ACPI ([`crate::kernel`]) also needs fw_cfg's ports; QEMU
/// adds the virtio-mmio devices itself.
pub fn cmdline(accel: Accel, acpi: bool) -> String {
    let mut c = KERNEL_CMDLINE.to_string();
    if let (Accel::Tcg, Some(khz)) = (accel, host_tsc_khz()) {
        c.push_str(&format!(" tsc_early_khz={khz}"));
    }
    if !acpi {
        c.push(' ');
        c.push_str(crate::kernel::FW_CFG_CMDLINE);
    }
    c
}

/// The init's arguments on the kernel command line. Not after `--`: with
/// ACPI off QEMU appends its `virtio_mmio.device=` parameters at the very
/// end, and after a `--` the kernel would hand them to init instead of
/// reading them. Words the kernel does not know and that have no `=` or
/// `.` go to init as arguments, so these still arrive.
pub const INIT_ARGS: &str = "agent --init --vm";

/// The `-M` argument: QEMU's microvm, with ACPI tables for kernels that find
/// their devices through them, else without (then QEMU lists the
/// virtio-mmio devices on the kernel command line).
pub fn machine(acpi: bool) -> &'static str {
    if acpi { "microvm" } else { "microvm,acpi=off" }
}

/// The host's TSC rate in kHz, from `/proc/cpuinfo`.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    (mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

/// QEMU's `microvm` machine.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu { binary: PathBuf::from(std::env::var_os("FLOTILLA_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into())) }
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn command(&self, s: &LaunchSpec) -> std::process::Command {
        let mut c = std::process::Command::new(&self.binary);
        let p = |p: &Path| p.display().to_string();
        c.args(["-M", machine(s.acpi), "-accel", s.accel.as_str()]);
        c.args(["-cpu", if s.accel == Accel::Kvm { "host" } else { "max" }]);
        c.args(["-m", &format!("{}M", s.memory_mib), "-smp", &s.vcpus.to_string()]);
        c.args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        c.args(["-kernel", &p(&s.kernel), "-initrd", &p(&s.initramfs)]);
        c.args(["-append", &format!("{} {INIT_ARGS}", cmdline(s.accel, s.acpi))]);
        c.args(["-serial", &format!("file:{}", p(&console_log(&s.dir)))]);
        c.args(["-qmp", &format!("unix:{},server=on,wait=off", p(&qmp_socket(&s.dir)))]);
        c.args(["-pidfile", &p(&pid_file(&s.dir))]);
        c.args(["-chardev", &format!("socket,id=agent,path={},server=on,wait=off", p(&agent_socket(&s.dir)))]);
        c.args([
            "-device",
            "virtio-serial-device",
            "-device",
            &format!("virtserialport,chardev=agent,name={PORT_NAME}"),
        ]);
        let disk = |c: &mut std::process::Command, id: &str, file: &Path, format: &str| {
            c.args(["-drive", &format!("id={id},file={},format={format},if=none,discard=unmap", p(file))]);
            c.args(["-device", &format!("virtio-blk-device,drive={id},serial=flotilla-{id}")]);
        };
        disk(&mut c, "root", &s.root_disk, "qcow2");
        disk(&mut c, "workspace", &s.workspace_disk, "raw");
        c.args(["-fw_cfg", &format!("name={CONFIG_FW_CFG},file={}", p(&s.config))]);
        if let Some(net) = &s.network {
            let netdev = match net {
                crate::net::HostNet::Passt { .. } => {
                    format!("stream,id=net0,server=off,addr.type=fd,addr.str={NET_FD}")
                }
                crate::net::HostNet::Tap { .. } => format!("tap,id=net0,fd={NET_FD}"),
            };
            let mac = net.mac().map(|m| format!(",mac={m}")).unwrap_or_default();
            c.args(["-netdev", &netdev, "-device", &format!("virtio-net-device,netdev=net0{mac}")]);
        }
        if let Some(inc) = &s.incoming {
            c.args(["-incoming", &format!("unix:{}", p(&inc.socket))]);
        }
        // QEMU's own seccomp filter: no exec, no obsolete syscalls, no
        // resource-control calls, should a guest ever take over the
        // emulator. `elevateprivileges=deny` would also forbid the setuid
        // of `-runas`; once QEMU has dropped to its uid it has no
        // capabilities to elevate with, and the filter sets no_new_privs.
        match s.runas {
            Some(uid) => {
                c.args(["-runas", &format!("{uid}:{uid}")]);
                c.args(["-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny"]);
            }
            None => {
                c.args(["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
            }
        }
        // Run in the VM's directory: the janitor names a QEMU by its cwd.
        c.current_dir(&s.dir);
        c.stdin(Stdio::null()).stdout(Stdio::null());
        c
    }

    fn quit(&self, dir: &Path) -> futures_util::future::BoxFuture<'static, std::io::Result<()>> {
        let sock = qmp_socket(dir);
        Box::pin(async move {
            let qmp = Qmp::connect(&sock, Duration::from_secs(2)).await?;
            qmp.quit().await
        })
    }
}

/// A QMP session (the `qapi` crate's typed client).
pub struct Qmp {
    inner: qapi::futures::QapiService<qapi::futures::QmpStreamTokio<tokio::io::WriteHalf<tokio::net::UnixStream>>>,
}

impl Qmp {
    /// Connects and negotiates capabilities, within `within`.
    pub async fn connect(sock: &Path, within: Duration) -> std::io::Result<Qmp> {
        let fut = async {
            let stream = qapi::futures::QmpStreamTokio::open_uds(sock).await?;
            let stream = stream.negotiate().await?;
            let (inner, _events) = stream.spawn_tokio();
            Ok::<_, std::io::Error>(Qmp { inner })
        };
        tokio::time::timeout(within, fut).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("QMP on {} did not answer", sock.display()))
        })?
    }

    /// `query-status`: whether the VM's CPUs run.
    pub async fn running(&self) -> std::io::Result<bool> {
        let s = self.inner.execute(qapi::qmp::query_status {}).await.map_err(qmp_err)?;
        Ok(s.running)
    }

    /// `stop`: pauses the vCPUs.
    pub async fn stop(&self) -> std::io::Result<()> {
        self.inner.execute(qapi::qmp::stop {}).await.map_err(qmp_err).map(drop)
    }

    /// Saves the (stopped) VM's state to `uri` and waits until that is
    /// done. Bandwidth is not capped: the state goes to a local file.
    pub async fn save(&self, uri: &str, within: Duration) -> std::io::Result<()> {
        let params = qapi::qmp::MigrateSetParameters { max_bandwidth: Some(i64::MAX as u64 / 2), ..Default::default() };
        self.inner.execute(qapi::qmp::migrate_set_parameters(params)).await.map_err(qmp_err)?;
        let cmd = qapi::qmp::migrate { uri: Some(uri.into()), channels: None, detach: None, resume: None };
        self.inner.execute(cmd).await.map_err(qmp_err)?;
        self.wait_migration("saving the VM", within, Duration::from_millis(10)).await
    }

    /// Waits until an incoming state has been loaded, then runs the vCPUs
    /// (the state was saved paused, so QEMU would leave them paused).
    pub async fn cont_after_incoming(&self, within: Duration) -> std::io::Result<()> {
        self.wait_migration("loading the snapshot", within, Duration::from_millis(5)).await?;
        self.inner.execute(qapi::qmp::cont {}).await.map_err(qmp_err).map(drop)
    }

    /// Polls `query-migrate` every `every` until the migration (either
    /// way) completed, failed, or `within` passed; `what` names it in errors.
    async fn wait_migration(&self, what: &str, within: Duration, every: Duration) -> std::io::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let info = self.inner.execute(qapi::qmp::query_migrate {}).await.map_err(qmp_err)?;
            match info.status {
                Some(qapi::qmp::MigrationStatus::completed) => return Ok(()),
                Some(qapi::qmp::MigrationStatus::failed | qapi::qmp::MigrationStatus::cancelled) => {
                    return Err(std::io::Error::other(format!(
                        "{what} failed: {}",
                        info.error_desc.unwrap_or_default()
                    )));
                }
                _ => {}
            }
            if tokio::time::Instant::now() > deadline {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} took too long")));
            }
            tokio::time::sleep(every).await;
        }
    }

    /// `quit`: QEMU exits at once.
    pub async fn quit(&self) -> std::io::Result<()> {
        match self.inner.execute(qapi::qmp::quit {}).await {
            Ok(_) => Ok(()),
            // QEMU may close the socket before it answers.
            Err(e) if matches!(&e, qapi::ExecuteError::Io(_)) => Ok(()),
            Err(e) => Err(qmp_err(e)),
        }
    }
}

fn qmp_err(e: qapi::ExecuteError) -> std::io::Error {
    std::io::Error::other(format!("QMP: {e}"))
}

/// QEMU's version line, or why it cannot run.
pub fn version(qemu: &Qemu) -> Result<String, String> {
    match std::process::Command::new(&qemu.binary).arg("--version").output() {
        Ok(o) if o.status.success() => {
            Ok(String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_string())
        }
        Ok(o) => Err(format!("{} --version failed: {}", qemu.binary.display(), String::from_utf8_lossy(&o.stderr))),
        Err(e) => Err(format!(
            "{} not found ({e}): install QEMU (apt-get install -y qemu-system-x86 qemu-utils)",
            qemu.binary.display()
        )),
    }
}

/// The last `n` lines of a VM's console, for error messages.
pub fn console_tail(dir: &Path, n: usize) -> String {
    let text = std::fs::read(console_log(dir)).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
