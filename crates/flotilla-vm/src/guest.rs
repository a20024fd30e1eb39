//! The guest's PID 1: `flotilla agent --init --vm`, run by the kernel from
//! the initramfs the node built.
//!
//! In order: mount the kernel filesystems, load the modules the node listed
//! (virtio transport, block, console; the Debian kernel has them as
//! modules), read the sandbox's config from fw_cfg, mount the root disk
//! (`/dev/vda`, the image under a copy-on-write overlay) and the workspace
//! disk (`/dev/vdb`) on it, switch into it, and serve the agent's API on the
//! virtio-serial port. As init it reaps every orphan; halting syncs and
//! unmounts the disks, then resets the machine, which ends QEMU.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};

use crate::GuestConfig;

/// Where the node puts the ordered list of modules inside the initramfs.
pub const MODULE_LIST: &str = "/lib/modules/load.list";
/// ... and of those a guest with a NIC loads too.
pub const NET_MODULE_LIST: &str = "/lib/modules/net.list";
/// The fw_cfg file that carries [`GuestConfig`].
pub const CONFIG_FW_CFG: &str = "opt/flotilla/config";
/// The name of the agent's virtio-serial port.
pub const PORT_NAME: &str = "flotilla.agent";

/// Why the guest could not come up: printed on the console, which the node
/// keeps as `console.log` and quotes when a boot fails.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{step}: {source}")]
    Sys {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Missing(String),
}

fn sys<E: Into<std::io::Error>>(step: impl Into<String>) -> impl FnOnce(E) -> InitError {
    let step = step.into();
    move |e| InitError::Sys { step, source: e.into() }
}

fn nix_io(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), InitError> {
    let _ = std::fs::create_dir_all(target);
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|e| InitError::Sys { step: format!("mounting {fstype} {src} on {target}"), source: nix_io(e) })
}

fn wait_for(path: &Path, within: Duration) -> Result<(), InitError> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > within {
            return Err(InitError::Missing(format!("{} did not appear within {within:?}", path.display())));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// `--probe`: prove the kernel reached our init, then power off. The node
/// boots this under KVM to learn whether KVM works here.
pub fn probe() -> ! {
    println!("{}", crate::PROBE_LINE);
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    std::process::exit(0)
}

/// Runs the guest init. Returns only on failure (the caller prints it and
/// powers off).
pub fn run() -> InitError {
    match setup() {
        Ok(port) => match serve(port) {
            Ok(()) => InitError::Missing("the agent stopped serving".into()),
            Err(e) => e,
        },
        Err(e) => e,
    }
}

/// Prints a boot stage with the guest's uptime on the console (the node
/// keeps it as `console.log`: where a slow or failed boot spent its time).
fn stage(what: &str) {
    let up = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    println!("flotilla: {what} at {}s", up.split_whitespace().next().unwrap_or("?"));
}

fn setup() -> Result<PathBuf, InitError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None)?;
    mount_fs("proc", "/proc", "proc", nosuid, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None)?;
    stage("init");
    load_modules(MODULE_LIST)?;
    stage("modules loaded");
    let config = read_config()?;
    crate::net::loopback_up().map_err(sys("bringing the loopback up"))?;
    if let Some(net) = &config.net {
        load_modules(NET_MODULE_LIST)?;
        crate::net::configure_guest(net).map_err(sys("configuring the network"))?;
        stage(&format!("network up as {}/{}", net.address, net.prefix));
    }

    let root = find_disk("flotilla-root")?;
    let workspace = find_disk("flotilla-workspace")?;
    mount_fs(&root, "/newroot", "ext4", MsFlags::empty(), None)?;
    for d in ["proc", "sys", "dev", "workspace", "tmp", "run"] {
        let _ = std::fs::create_dir_all(Path::new("/newroot").join(d));
    }
    mount_fs(&workspace, "/newroot/workspace", "ext4", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None)?;
    // mkfs made it; a workspace starts empty, as a process sandbox's does.
    let _ = std::fs::remove_dir("/newroot/workspace/lost+found");
    for d in ["dev", "proc", "sys"] {
        let to = format!("/newroot/{d}");
        mount(Some(Path::new("/").join(d).as_path()), to.as_str(), None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(|e| InitError::Sys { step: format!("moving /{d} into the root disk"), source: nix_io(e) })?;
    }
    nix::unistd::chdir("/newroot").map_err(|e| sys("entering the root disk")(nix_io(e)))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| sys("moving the root disk to /")(nix_io(e)))?;
    nix::unistd::chroot(".").map_err(|e| sys("chroot into the root disk")(nix_io(e)))?;
    nix::unistd::chdir("/").map_err(|e| sys("chdir /")(nix_io(e)))?;
    mount_fs("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("ptmxmode=0666,mode=620"))?;
    mount_fs("tmpfs", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None)?;
    mount_fs("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    // A fresh /tmp at every boot, as a process sandbox has.
    mount_fs("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?;
    let _ = nix::unistd::sethostname(&config.hostname);
    limit_tasks(config.pids)?;
    if let Some(net) = &config.net {
        crate::net::write_resolv_conf(net).map_err(sys("writing /etc/resolv.conf"))?;
    }
    stage("disks mounted");

    for (k, v) in &config.env {
        // SAFETY: no other thread exists yet: the runtime starts after this.
        unsafe { std::env::set_var(k, v) };
    }
    if std::env::var_os("PATH").is_none() {
        // SAFETY: as above, single-threaded.
        unsafe { std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") };
    }
    find_port()
}

/// Puts init, and so every command it starts, into a cgroup whose
/// `pids.max` is the sandbox's task limit: a fork bomb then fails to fork
/// inside the guest instead of taking all of its memory. The guest's
/// kernel threads stay outside.
fn limit_tasks(pids: Option<u64>) -> Result<(), InitError> {
    let Some(max) = pids else { return Ok(()) };
    mount_fs(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV,
        None,
    )?;
    let root = Path::new("/sys/fs/cgroup");
    std::fs::write(root.join("cgroup.subtree_control"), "+pids").map_err(sys("enabling the pids controller"))?;
    let cg = root.join("sandbox");
    std::fs::create_dir_all(&cg).map_err(sys("creating the sandbox cgroup"))?;
    std::fs::write(cg.join("pids.max"), max.to_string()).map_err(sys("setting pids.max"))?;
    std::fs::write(cg.join("cgroup.procs"), "0").map_err(sys("moving init into the sandbox cgroup"))
}

fn load_modules(list: &str) -> Result<(), InitError> {
    let list = match std::fs::read_to_string(list) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(sys(format!("reading {list}"))(e)),
    };
    for m in list.lines().filter(|l| !l.trim().is_empty()) {
        let f = std::fs::File::open(m).map_err(sys(format!("opening module {m}")))?;
        match nix::kmod::finit_module(&f, &CString::default(), nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(e) => return Err(sys(format!("loading module {m}"))(nix_io(e))),
        }
    }
    Ok(())
}

fn read_config() -> Result<GuestConfig, InitError> {
    let path = PathBuf::from("/sys/firmware/qemu_fw_cfg/by_name").join(CONFIG_FW_CFG).join("raw");
    wait_for(&path, Duration::from_secs(5))?;
    let raw = std::fs::read(&path).map_err(sys("reading the sandbox config from fw_cfg"))?;
    serde_json::from_slice(&raw)
        .map_err(|e| sys("parsing the sandbox config")(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// The `/dev/vdX` whose virtio serial is `serial` (virtio-mmio devices are
/// not numbered in the order QEMU was given them).
fn find_disk(serial: &str) -> Result<String, InitError> {
    let start = Instant::now();
    loop {
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                if std::fs::read_to_string(e.path().join("serial")).is_ok_and(|s| s.trim() == serial) {
                    let dev = Path::new("/dev").join(e.file_name());
                    if dev.exists() {
                        return Ok(dev.display().to_string());
                    }
                }
            }
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(InitError::Missing(format!("no disk with serial {serial} appeared within 10s")));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The `/dev/vportNpM` whose name is [`PORT_NAME`].
fn find_port() -> Result<PathBuf, InitError> {
    let start = Instant::now();
    loop {
        if let Ok(rd) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in rd.flatten() {
                if std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == PORT_NAME) {
                    return Ok(Path::new("/dev").join(e.file_name()));
                }
            }
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(InitError::Missing(format!("no virtio-serial port named {PORT_NAME}")));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Syncs and unmounts the disks, then resets the machine (QEMU runs with
/// `-no-reboot`, so a reset ends it).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::mount::umount2("/workspace", nix::mount::MntFlags::MNT_DETACH);
    let _ = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None::<&str>);
    nix::unistd::sync();
    println!("{}", crate::HALTED_LINE);
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    std::process::exit(1)
}

fn serve(port: PathBuf) -> Result<(), InitError> {
    flotilla_agent::server::set_halt(power_off);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(sys("starting the agent's runtime"))?;
    rt.block_on(async move {
        let agent = flotilla_agent::Agent::new(PathBuf::from("/workspace"), true);
        let app = flotilla_agent::router(agent);
        stage(&format!("agent serving on {}", port.display()));
        crate::mux::serve_port(port, move |stream| {
            let app = app.clone();
            Box::pin(flotilla_agent::serve_connection(app, stream))
        })
        .await
        .map_err(sys("serving the agent port"))
    })
}
