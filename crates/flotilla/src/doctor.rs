//! `flotilla doctor`: can this machine run sandboxes, and if not, what to
//! do about it.
//!
//! Each check looks at one thing the process backend needs (DESIGN §7) and
//! says `ok`, `warn` (sandboxes run, but something optional is missing or a
//! limit is not enforced) or `fail` (sandboxes will not start, or will not
//! be isolated as promised), with a one-line finding and, for every
//! problem, the exact fix: the package to install, the sysctl to set, the
//! command to run.
//!
//! Most checks only read the host, through [`Host`] (the `/proc`, `/sys`
//! and `/dev` roots and `PATH`), so their verdicts are pure functions of
//! text that the tests feed in. Three act, because reading is not proof:
//! user namespaces are tried with `unshare`, cgroups by creating (and
//! removing) a probe group with limits, and disk space is asked of `df`.
//! Every command runs under [`PROBE_TIMEOUT`] and is killed past it.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_agent::http::error_chain;
use flotilla_api::units::format_size;
use flotilla_sandbox::cgroup::{CgroupManager, Controller, Hierarchy, Limits};
use serde::Serialize;

use crate::output;

/// How long a probe command may run. `unshare … true` and `df` take
/// milliseconds; one still running after seconds is stuck, and that is a
/// finding in itself, not something to wait on.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Free space under which the data directory is a warning: a few images
/// and workspaces of an ordinary build fill a few GiB.
const DISK_WARN_BELOW: u64 = 5 << 30;

/// Free space under which it is a failure: one import could fill the disk.
const DISK_FAIL_BELOW: u64 = 1 << 30;

/// The same on every Linux architecture.
const SIGKILL: i32 = 9;

/// How a check came out. Ordered: the worst status wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One check's result, as printed and as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub status: Status,
    /// One line saying what was found.
    pub detail: String,
    /// What to do, for every `warn` and `fail`.
    pub fix: Option<String>,
}

impl Check {
    fn ok(check: &'static str, detail: impl Into<String>) -> Check {
        Check { check, status: Status::Ok, detail: detail.into(), fix: None }
    }

    fn warn(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { check, status: Status::Warn, detail: detail.into(), fix: Some(fix.into()) }
    }

    fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { check, status: Status::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// Runs every check, prints them (a table, or a JSON array with `json`),
/// and returns the exit code: 1 if any check failed, else 0.
pub fn run(home: &Path, json: bool) -> anyhow::Result<i32> {
    let checks = all_checks(&Host::real(), home);
    if json {
        output::json(&checks)?;
    } else {
        let rows: Vec<Vec<String>> = checks
            .iter()
            .map(|c| {
                vec![
                    c.check.to_string(),
                    c.status.as_str().to_string(),
                    c.detail.clone(),
                    c.fix.clone().unwrap_or_default(),
                ]
            })
            .collect();
        output::table(&["CHECK", "STATUS", "FINDING", "FIX"], &rows);
        println!();
        println!("{}", summary(&checks));
    }
    Ok(exit_code(&checks))
}

fn all_checks(host: &Host, home: &Path) -> Vec<Check> {
    let root = flotilla_sandbox::sys::euid() == 0;
    vec![
        root_check(root),
        userns_check(host, root),
        cgroup_check(&host.sys.join("fs/cgroup")),
        overlay_check(host),
        seccomp_check(host),
        network_check(host),
        disk_check(host, home),
        kvm_check(host),
        git_check(host),
    ]
    .into_iter()
    .chain(vm_checks(home))
    .collect()
}

/// 1 if any check failed, else 0.
fn exit_code(checks: &[Check]) -> i32 {
    match checks.iter().map(|c| c.status).max() {
        Some(Status::Fail) => 1,
        Some(Status::Ok | Status::Warn) | None => 0,
    }
}

/// `7 ok, 1 warn, 1 fail: sandboxes will not run here until the failures are fixed`.
fn summary(checks: &[Check]) -> String {
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    let (ok, warn, fail) = (count(Status::Ok), count(Status::Warn), count(Status::Fail));
    let verdict = if fail > 0 {
        "sandboxes will not run (or not safely) until the failures are fixed"
    } else if warn > 0 {
        "sandboxes can run; the warnings say what is degraded"
    } else {
        "this machine can run sandboxes"
    };
    format!("{ok} ok, {warn} warn, {fail} fail: {verdict}")
}

/// Where the host's facts are read from: the real roots, or a temporary
/// tree in tests.
struct Host {
    proc: PathBuf,
    sys: PathBuf,
    dev: PathBuf,
    path: Option<OsString>,
}

impl Host {
    fn real() -> Host {
        Host {
            proc: PathBuf::from("/proc"),
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            path: std::env::var_os("PATH"),
        }
    }

    /// A `/proc` file's text, if it exists and is readable.
    fn proc(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.proc.join(rel)).ok()
    }

    /// A number in a `/proc/sys` file.
    fn sysctl(&self, rel: &str) -> Option<u64> {
        self.proc(rel)?.trim().parse().ok()
    }

    /// The first `name` on `PATH`.
    fn which(&self, name: &str) -> Option<PathBuf> {
        which_on(self.path.as_ref(), name)
    }
}

// ------------------------------------------------------------------ root

fn root_check(root: bool) -> Check {
    if root {
        Check::ok("root", "running as root")
    } else {
        Check::fail(
            "root",
            "not running as root: the process backend maps each sandbox to its own uid range and manages cgroups, \
             which needs root, and the checks below see less than the node would",
            "run the node as root (`sudo flotilla node`) and check again with `sudo flotilla doctor`",
        )
    }
}

// ------------------------------------------------------------------ user namespaces

/// What trying a command gave.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Probe {
    /// The program is not on `PATH`.
    Missing,
    Exited {
        success: bool,
        stdout: String,
        stderr: String,
    },
    TimedOut,
    /// It could not be started or waited for.
    Failed(String),
}

/// Runs `program args…` with no input, capturing its output, and kills it
/// if it is still running after `timeout`.
fn run_probe(program: Option<PathBuf>, args: &[&str], timeout: Duration) -> Probe {
    let Some(program) = program else { return Probe::Missing };
    let mut child = match Command::new(&program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Probe::Failed(format!("starting {}: {e}", program.display())),
    };
    // A pidfd taken before anyone waits names this child and no other, even
    // if it exits and its pid is reused while we decide to kill it.
    let pidfd = i32::try_from(child.id()).ok().and_then(|pid| flotilla_sandbox::sys::pidfd_open(pid).ok());
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // The pipes end when the child (and anything it left holding them)
        // exits; our output is small, so reading one after the other cannot
        // deadlock on a full pipe.
        let mut out = String::new();
        let mut err = String::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_string(&mut err);
        }
        let _ = tx.send(child.wait().map(|st| (st.success(), out, err)));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok((success, stdout, stderr))) => Probe::Exited { success, stdout, stderr },
        Ok(Err(e)) => Probe::Failed(format!("waiting for {}: {e}", program.display())),
        Err(_) => {
            if let Some(fd) = &pidfd {
                let _ = flotilla_sandbox::sys::pidfd_send_signal(fd.as_fd(), SIGKILL);
            }
            Probe::TimedOut
        }
    }
}

/// The namespaces a sandbox is made with, as `unshare` flags.
const UNSHARE_ARGS: [&str; 9] =
    ["--user", "--map-root-user", "--mount", "--pid", "--fork", "--net", "--uts", "--ipc", "true"];

fn userns_check(host: &Host, root: bool) -> Check {
    let sysctls = UsernsSysctls {
        max_user_namespaces: host.sysctl("sys/user/max_user_namespaces"),
        unprivileged_userns_clone: host.sysctl("sys/kernel/unprivileged_userns_clone"),
        apparmor_restrict: host.sysctl("sys/kernel/apparmor_restrict_unprivileged_userns"),
    };
    let trial = run_probe(host.which("unshare"), &UNSHARE_ARGS, PROBE_TIMEOUT);
    userns_verdict(&sysctls, root, &trial)
}

#[derive(Debug, Clone, Default)]
struct UsernsSysctls {
    max_user_namespaces: Option<u64>,
    /// Debian's switch for unprivileged users (absent on most kernels).
    unprivileged_userns_clone: Option<u64>,
    /// Ubuntu's AppArmor switch for unprivileged users.
    apparmor_restrict: Option<u64>,
}

fn userns_verdict(s: &UsernsSysctls, root: bool, trial: &Probe) -> Check {
    const NAME: &str = "user namespaces";
    if s.max_user_namespaces == Some(0) {
        return Check::fail(
            NAME,
            "user.max_user_namespaces is 0: no user namespace can be made",
            "sysctl -w user.max_user_namespaces=15000 && echo user.max_user_namespaces=15000 > /etc/sysctl.d/90-flotilla.conf",
        );
    }
    // These two only restrict unprivileged users; root is not affected.
    if !root && s.unprivileged_userns_clone == Some(0) {
        return Check::fail(
            NAME,
            "kernel.unprivileged_userns_clone is 0: only root may make user namespaces",
            "run as root, or: sysctl -w kernel.unprivileged_userns_clone=1",
        );
    }
    if !root && s.apparmor_restrict == Some(1) {
        return Check::fail(
            NAME,
            "kernel.apparmor_restrict_unprivileged_userns is 1: AppArmor keeps unprivileged users out of user namespaces",
            "run as root, or: sysctl -w kernel.apparmor_restrict_unprivileged_userns=0",
        );
    }
    let limit = s.max_user_namespaces.map(|m| format!(" (max_user_namespaces {m})")).unwrap_or_default();
    match trial {
        Probe::Exited { success: true, .. } => {
            Check::ok(NAME, format!("unshare --user --map-root-user with mount, pid, net, uts, ipc works{limit}"))
        }
        Probe::Exited { success: false, stderr, .. } => Check::fail(
            NAME,
            format!("`unshare --user --map-root-user …` failed: {}", first_line(stderr)),
            "inside a container, run it with --privileged or a seccomp/AppArmor profile that allows unshare(2); \
             otherwise check the user.* and kernel.*userns* sysctls",
        ),
        Probe::TimedOut => Check::fail(
            NAME,
            format!("`unshare --user …` did not finish within {PROBE_TIMEOUT:?}"),
            "see what blocks it: strace -f unshare --user --map-root-user true",
        ),
        Probe::Failed(e) => {
            Check::warn(NAME, format!("could not try unshare: {e}"), "run: unshare --user --map-root-user true")
        }
        Probe::Missing => Check::warn(
            NAME,
            format!("unshare is not on PATH, so user namespaces were not tried{limit}"),
            "apt-get install -y util-linux",
        ),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("(no message)")
}

// ------------------------------------------------------------------ cgroups

fn cgroup_check(cgroup_root: &Path) -> Check {
    // Our own parent group, apart from any node's, removed again below.
    let group = format!("flotilla-doctor-{}", std::process::id());
    let manager = CgroupManager::detect(cgroup_root, &group);
    let probe = match manager.hierarchy() {
        Hierarchy::None { .. } => Ok(()),
        Hierarchy::V2 { .. } | Hierarchy::V1 { .. } => {
            let limits = Limits { memory_bytes: Some(64 << 20), pids: Some(64), cpus: Some(0.5) };
            match manager.create("probe", &limits) {
                Ok(cg) => cg.remove().map_err(|e| error_chain(&e)),
                Err(e) => Err(error_chain(&e)),
            }
        }
    };
    manager.remove_group();
    cgroup_verdict(manager.hierarchy(), &manager.describe(), probe, cgroup_root)
}

/// The controllers a hierarchy enforces.
fn enforced(h: &Hierarchy) -> Vec<Controller> {
    match h {
        Hierarchy::V2 { controllers, .. } => controllers.clone(),
        Hierarchy::V1 { memory, pids, cpu, .. } => {
            [(memory, Controller::Memory), (pids, Controller::Pids), (cpu, Controller::Cpu)]
                .into_iter()
                .filter(|(dir, _)| dir.is_some())
                .map(|(_, c)| c)
                .collect()
        }
        Hierarchy::None { .. } => Vec::new(),
    }
}

fn cgroup_verdict(h: &Hierarchy, described: &str, probe: Result<(), String>, root: &Path) -> Check {
    const NAME: &str = "cgroups";
    if let Hierarchy::None { reason } = h {
        return Check::fail(
            NAME,
            format!("no usable cgroups ({reason}): memory, pids and cpu limits would not be enforced"),
            format!(
                "run as root with a writable cgroup filesystem at {0} (e.g. `mount -t cgroup2 none {0}`; in a \
                 container, give it its own cgroup namespace with delegation)",
                root.display()
            ),
        );
    }
    if let Err(e) = probe {
        return Check::fail(
            NAME,
            format!("{described}, but a probe group with limits failed: {e}"),
            format!("check that {} is mounted read-write and that no other manager owns it", root.display()),
        );
    }
    let have = enforced(h);
    let missing: Vec<Controller> = Controller::ALL.into_iter().filter(|c| !have.contains(c)).collect();
    if missing.is_empty() {
        return Check::ok(NAME, format!("{described}: memory, pids and cpu limits work"));
    }
    let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
    let fix = match h {
        Hierarchy::V2 { .. } => format!(
            "enable them for our groups: echo '{}' > {}/cgroup.subtree_control (under systemd: Delegate=yes in the \
             node's unit)",
            names.iter().map(|n| format!("+{n}")).collect::<Vec<_>>().join(" "),
            root.display()
        ),
        Hierarchy::V1 { .. } | Hierarchy::None { .. } => names
            .iter()
            .map(|n| format!("mkdir -p {0}/{n} && mount -t cgroup -o {n} none {0}/{n}", root.display()))
            .collect::<Vec<_>>()
            .join("; "),
    };
    // Without memory or pids limits one sandbox can take the whole host down
    // (a leak, a fork bomb); without cpu it can only slow the others.
    let detail = format!("{described}: no {} controller, so that limit is not enforced", names.join(", "));
    if missing.iter().any(|c| matches!(c, Controller::Memory | Controller::Pids)) {
        Check::fail(NAME, detail, fix)
    } else {
        Check::warn(NAME, detail, fix)
    }
}

// ------------------------------------------------------------------ overlayfs

fn overlay_check(host: &Host) -> Check {
    const NAME: &str = "overlayfs";
    let listed = host.proc("filesystems").is_some_and(|t| filesystem_listed(&t, "overlay"));
    if listed {
        return Check::ok(NAME, "overlay is in /proc/filesystems");
    }
    let release = flotilla_sandbox::sys::kernel_release();
    let module = Path::new("/lib/modules").join(&release).join("kernel/fs/overlayfs");
    if module.is_dir() {
        Check::warn(
            NAME,
            "overlay is a module that is not loaded yet (the first mount usually loads it)",
            "modprobe overlay && echo overlay > /etc/modules-load.d/flotilla.conf",
        )
    } else {
        Check::fail(
            NAME,
            format!("overlay is not in /proc/filesystems and kernel {release} has no overlay module"),
            "modprobe overlay; if that fails, boot a kernel with CONFIG_OVERLAY_FS (Debian's linux-image-amd64 has it)",
        )
    }
}

/// Whether `/proc/filesystems` text lists `fs` (lines are `[nodev]\tNAME`).
fn filesystem_listed(text: &str, fs: &str) -> bool {
    text.lines().any(|l| l.split_whitespace().last() == Some(fs))
}

// ------------------------------------------------------------------ seccomp

fn seccomp_check(host: &Host) -> Check {
    let status = host.proc("self/status").unwrap_or_default();
    let actions = host.proc("sys/kernel/seccomp/actions_avail");
    let compiled = flotilla_sandbox::seccomp::sandbox_programs().map(|_| ()).map_err(|e| e.to_string());
    seccomp_verdict(&status, actions.as_deref(), compiled)
}

/// `Seccomp:` and `Seccomp_filters:` from `/proc/<pid>/status`.
fn seccomp_mode(status: &str) -> Option<(u32, u32)> {
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u32>().ok());
    Some((field("Seccomp:")?, field("Seccomp_filters:").unwrap_or(0)))
}

/// The actions our filter returns.
const SECCOMP_ACTIONS_NEEDED: [&str; 2] = ["allow", "errno"];

fn seccomp_verdict(status: &str, actions: Option<&str>, compiled: Result<(), String>) -> Check {
    const NAME: &str = "seccomp";
    let Some((mode, filters)) = seccomp_mode(status) else {
        return Check::fail(
            NAME,
            "the kernel has no seccomp (no Seccomp: line in /proc/self/status)",
            "boot a kernel with CONFIG_SECCOMP_FILTER (every Debian kernel has it)",
        );
    };
    if let Err(e) = compiled {
        return Check::fail(
            NAME,
            format!("the sandbox filter cannot be built for {}: {e}", std::env::consts::ARCH),
            "report this as a bug, with the architecture",
        );
    }
    let Some(actions) = actions else {
        return Check::warn(
            NAME,
            "seccomp is present but /proc/sys/kernel/seccomp/actions_avail is missing (kernel older than 4.14?)",
            "use a kernel from 4.14 on",
        );
    };
    let avail: Vec<&str> = actions.split_whitespace().collect();
    let missing: Vec<&str> = SECCOMP_ACTIONS_NEEDED.into_iter().filter(|a| !avail.contains(a)).collect();
    if !missing.is_empty() {
        return Check::fail(
            NAME,
            format!("seccomp lacks the {} action(s) the sandbox filter uses", missing.join(", ")),
            "use a kernel from 4.14 on",
        );
    }
    let outer = match (mode, filters) {
        (2, n) => format!("; this process already runs under {n} filter(s) (a container?), and sandboxes add theirs"),
        _ => String::new(),
    };
    Check::ok(NAME, format!("filters work (actions: {}){outer}", avail.join(" ")))
}

// ------------------------------------------------------------------ network helper

fn network_check(host: &Host) -> Check {
    const NAME: &str = "outbound network";
    let found: Vec<&str> = ["slirp4netns", "pasta"].into_iter().filter(|h| host.which(h).is_some()).collect();
    if found.is_empty() {
        Check::warn(
            NAME,
            "neither slirp4netns nor pasta is on PATH: `--network outbound` sandboxes cannot be made \
             (`--network none` works)",
            "apt-get install -y slirp4netns   (or: apt-get install -y passt, which provides pasta)",
        )
    } else if let Some(tool) = ["iptables-restore", "ip6tables-restore"].into_iter().find(|t| host.which(t).is_none()) {
        Check::warn(
            NAME,
            format!(
                "{} on PATH, but not {tool}: the egress policy (no host, LAN or metadata service for outbound \
                 sandboxes) cannot be put in place, so `--network outbound` is refused",
                found.join(" and ")
            ),
            "apt-get install -y iptables",
        )
    } else {
        Check::ok(NAME, format!("{} on PATH, for `--network outbound` under the egress policy", found.join(" and ")))
    }
}

// ------------------------------------------------------------------ disk

fn disk_check(host: &Host, home: &Path) -> Check {
    const NAME: &str = "disk space";
    // The data directory may not exist yet: ask about where it would be.
    let existing = home.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let Some(existing) = existing.to_str() else {
        return Check::warn(NAME, format!("cannot ask df about {}", home.display()), "check with: df -h");
    };
    match run_probe(host.which("df"), &["-P", "-k", "--", existing], PROBE_TIMEOUT) {
        Probe::Exited { success: true, stdout, .. } => match parse_df(&stdout) {
            Some(row) => disk_verdict(home, &row),
            None => {
                Check::warn(NAME, format!("could not read df's output: {}", first_line(&stdout)), "check with: df -h")
            }
        },
        Probe::Exited { success: false, stderr, .. } => {
            Check::warn(NAME, format!("df failed: {}", first_line(&stderr)), format!("check with: df -h {existing}"))
        }
        Probe::TimedOut => Check::warn(
            NAME,
            format!("df did not answer within {PROBE_TIMEOUT:?} (a hung network mount?)"),
            "check the mounts with: df -h",
        ),
        Probe::Failed(e) => Check::warn(NAME, format!("could not run df: {e}"), "check with: df -h"),
        Probe::Missing => Check::warn(NAME, "df is not on PATH", "apt-get install -y coreutils"),
    }
}

/// The first `name` in the directories of a `PATH` value.
fn which_on(path: Option<&OsString>, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// One filesystem from `df -P`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DfRow {
    available_bytes: u64,
    mount: String,
}

/// Reads `df -P` output: a header whose second column names the block size
/// (`1024-blocks`, `512-blocks`), then one line per filesystem. The
/// capacity column (`NN%`) anchors the parse, so a device or mount point
/// with spaces in its name still reads right.
fn parse_df(text: &str) -> Option<DfRow> {
    let mut lines = text.lines();
    let header = lines.next()?;
    let block: u64 = header.split_whitespace().find_map(|w| w.strip_suffix("-blocks"))?.parse().ok()?;
    let fields: Vec<&str> = lines.next()?.split_whitespace().collect();
    let numeric = |s: &str| s.parse::<u64>().is_ok();
    let cap = (4..fields.len())
        .find(|&i| (fields[i].ends_with('%') || fields[i] == "-") && fields[i - 3..i].iter().all(|f| numeric(f)))?;
    let available: u64 = fields[cap - 1].parse().ok()?;
    Some(DfRow { available_bytes: available.saturating_mul(block), mount: fields[cap + 1..].join(" ") })
}

fn disk_verdict(home: &Path, row: &DfRow) -> Check {
    const NAME: &str = "disk space";
    let free = format_size(row.available_bytes);
    let detail = format!("{free} free on {} (data directory {})", row.mount, home.display());
    let fix =
        || format!("free space on {}, or put the data directory on a larger filesystem with --home DIR", row.mount);
    if row.available_bytes < DISK_FAIL_BELOW {
        Check::fail(NAME, format!("{detail}: under {}", format_size(DISK_FAIL_BELOW)), fix())
    } else if row.available_bytes < DISK_WARN_BELOW {
        Check::warn(NAME, format!("{detail}: under {}", format_size(DISK_WARN_BELOW)), fix())
    } else {
        Check::ok(NAME, detail)
    }
}

// ------------------------------------------------------------------ kvm, git

fn kvm_check(host: &Host) -> Check {
    const NAME: &str = "kvm";
    let present = host.dev.join("kvm").exists();
    let pvm = host.sys.join("module/kvm_pvm").exists();
    let detail = match (present, pvm) {
        (true, true) => "/dev/kvm present, provided by PVM (runs only PVM-enabled guest kernels)",
        (true, false) => "/dev/kvm present",
        (false, _) => "no /dev/kvm",
    };
    Check::ok(NAME, format!("{detail}; the vm backend probes whether a guest boots under it (see `accelerator`)"))
}

/// QEMU, the guest kernel and the static guest agent: what `--backend vm`
/// needs. Warnings only: process sandboxes work without them.
fn vm_checks(home: &Path) -> Vec<Check> {
    let vm = flotilla_vm::VmBackend::new(home, None);
    let mut checks = Vec::new();
    checks.push(match flotilla_vm::qemu::version(&flotilla_vm::Qemu::default()) {
        Ok(v) => Check::ok("qemu", v),
        Err(why) => Check::warn("qemu", why, "apt-get install -y qemu-system-x86 qemu-utils"),
    });
    checks.push(match flotilla_vm::assets::find_kernel(&vm.assets_dir()) {
        Ok(k) if !k.acpi => {
            Check::ok("guest kernel", format!("{} ({}, built by flotilla)", k.image.display(), k.release))
        }
        Ok(k) => Check::ok(
            "guest kernel",
            format!(
                "{} (modules: {}; `flotilla node setup-vm --build-kernel` makes one that boots ~2x faster)",
                k.image.display(),
                k.modules.as_ref().map_or("none".into(), |m| m.display().to_string())
            ),
        ),
        Err(e) => Check::warn("guest kernel", e.to_string(), "apt-get install -y linux-image-cloud-amd64"),
    });
    checks.push(match vm.available() {
        Ok(_) => Check::ok("guest agent", "a static flotilla build is available for the guest's init"),
        Err(why) if why.contains("static") => Check::warn(
            "guest agent",
            "no static flotilla build for the guest's init",
            "RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu -p flotilla",
        ),
        Err(_) => Check::ok("guest agent", "not checked (QEMU or the kernel is missing)"),
    });
    checks.push(match vm.accel_cached() {
        Some(a) if a.accel == flotilla_vm::Accel::Kvm => Check::ok("accelerator", format!("kvm: {}", a.reason)),
        Some(a) => Check::warn(
            "accelerator",
            format!("tcg (software): microVMs boot in seconds, not milliseconds: {}", a.reason),
            "run on a host with hardware virtualisation (vmx/svm) and a usable /dev/kvm",
        ),
        None => Check::warn(
            "accelerator",
            "not probed yet in this data directory",
            "flotilla node setup-vm (or create a --backend vm sandbox once)",
        ),
    });
    checks
}

fn git_check(host: &Host) -> Check {
    const NAME: &str = "git";
    match host.which("git") {
        Some(p) => Check::ok(NAME, format!("{} on PATH, for `sandbox put --git`", p.display())),
        None => Check::warn(
            NAME,
            "git is not on PATH: `flotilla sandbox put --git` cannot import repositories",
            "apt-get install -y git",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: Status) -> Check {
        Check { check: "x", status, detail: String::new(), fix: None }
    }

    #[test]
    fn any_failure_fails_the_run() {
        assert_eq!(exit_code(&[]), 0);
        assert_eq!(exit_code(&[check(Status::Ok), check(Status::Warn)]), 0);
        assert_eq!(exit_code(&[check(Status::Ok), check(Status::Fail), check(Status::Warn)]), 1);
        assert!(summary(&[check(Status::Ok), check(Status::Fail)]).starts_with("1 ok, 0 warn, 1 fail"));
    }

    #[test]
    fn every_problem_carries_a_fix() {
        let home = Path::new("/nonexistent/flotilla-home");
        for c in all_checks(&Host::real(), home) {
            assert_eq!(c.fix.is_some(), c.status != Status::Ok, "{c:?}");
            assert!(!c.detail.is_empty(), "{c:?}");
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        let v = serde_json::to_value(Check::warn("git", "missing", "apt-get install -y git")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"check": "git", "status": "warn", "detail": "missing", "fix": "apt-get install -y git"})
        );
    }

    #[test]
    fn proc_filesystems_is_read_by_name() {
        let text = "nodev\tsysfs\nnodev\tcgroup2\n\text4\nnodev\toverlay\n";
        assert!(filesystem_listed(text, "overlay"));
        assert!(filesystem_listed(text, "ext4"));
        assert!(!filesystem_listed("nodev\toverlayfs\n", "overlay"));
        assert!(!filesystem_listed("", "overlay"));
    }

    #[test]
    fn df_output_parses() {
        let gnu = "Filesystem     1024-blocks     Used Available Capacity Mounted on\n\
                   /dev/vda         264212084 20398632  74887256      22% /\n";
        assert_eq!(parse_df(gnu), Some(DfRow { available_bytes: 74887256 * 1024, mount: "/".into() }));
        let posix = "Filesystem 512-blocks Used Available Capacity Mounted on\n\
                     tmpfs 2048 0 2048 0% /mnt/my disk\n";
        assert_eq!(parse_df(posix), Some(DfRow { available_bytes: 2048 * 512, mount: "/mnt/my disk".into() }));
        let spaced_device = "Filesystem 1024-blocks Used Available Capacity Mounted on\n\
                             my share 100 40 60 40% /srv\n";
        assert_eq!(parse_df(spaced_device).unwrap().available_bytes, 60 * 1024);
        assert_eq!(parse_df(""), None);
        assert_eq!(parse_df("Filesystem 1024-blocks\n"), None);
        assert_eq!(parse_df("garbage\nmore garbage here now 5%\n"), None);
    }

    #[test]
    fn disk_thresholds() {
        let row = |gib: u64| DfRow { available_bytes: gib << 30, mount: "/".into() };
        let home = Path::new("/h");
        assert_eq!(disk_verdict(home, &row(100)).status, Status::Ok);
        assert_eq!(disk_verdict(home, &row(4)).status, Status::Warn);
        assert_eq!(disk_verdict(home, &DfRow { available_bytes: 512 << 20, mount: "/".into() }).status, Status::Fail);
    }

    #[test]
    fn seccomp_status_is_read() {
        let status = "Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t3\n";
        assert_eq!(seccomp_mode(status), Some((2, 3)));
        assert_eq!(seccomp_mode("Name:\tx\n"), None);
        let all = Some("kill_process kill_thread trap errno user_notif trace log allow");
        assert_eq!(seccomp_verdict("Seccomp:\t0\n", all, Ok(())).status, Status::Ok);
        assert!(seccomp_verdict(status, all, Ok(())).detail.contains("3 filter"));
        assert_eq!(seccomp_verdict("", all, Ok(())).status, Status::Fail);
        assert_eq!(seccomp_verdict("Seccomp:\t0\n", Some("kill_process allow"), Ok(())).status, Status::Fail);
        assert_eq!(seccomp_verdict("Seccomp:\t0\n", None, Ok(())).status, Status::Warn);
        assert_eq!(seccomp_verdict("Seccomp:\t0\n", all, Err("no".into())).status, Status::Fail);
    }

    #[test]
    fn user_namespace_verdicts() {
        let ok = Probe::Exited { success: true, stdout: String::new(), stderr: String::new() };
        let denied = Probe::Exited {
            success: false,
            stdout: String::new(),
            stderr: "unshare: unshare failed: Operation not permitted\n".into(),
        };
        let open = UsernsSysctls { max_user_namespaces: Some(1000), ..Default::default() };
        assert_eq!(userns_verdict(&open, true, &ok).status, Status::Ok);
        let v = userns_verdict(&open, true, &denied);
        assert_eq!(v.status, Status::Fail);
        assert!(v.detail.contains("Operation not permitted"), "{v:?}");
        let zero = UsernsSysctls { max_user_namespaces: Some(0), ..Default::default() };
        assert!(userns_verdict(&zero, true, &ok).fix.unwrap().contains("user.max_user_namespaces"));
        let debian = UsernsSysctls { unprivileged_userns_clone: Some(0), ..open.clone() };
        assert_eq!(userns_verdict(&debian, true, &ok).status, Status::Ok);
        assert!(userns_verdict(&debian, false, &ok).fix.unwrap().contains("kernel.unprivileged_userns_clone=1"));
        assert_eq!(userns_verdict(&open, true, &Probe::Missing).status, Status::Warn);
    }

    #[test]
    fn cgroup_verdicts() {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = |controllers: Vec<Controller>| Hierarchy::V2 { group_dir: root.join("g"), controllers, kill: true };
        assert_eq!(cgroup_verdict(&v2(Controller::ALL.to_vec()), "v2", Ok(()), root).status, Status::Ok);
        let no_cpu = cgroup_verdict(&v2(vec![Controller::Memory, Controller::Pids]), "v2", Ok(()), root);
        assert_eq!(no_cpu.status, Status::Warn);
        assert!(no_cpu.fix.unwrap().contains("+cpu"));
        let no_pids = cgroup_verdict(&v2(vec![Controller::Memory, Controller::Cpu]), "v2", Ok(()), root);
        assert_eq!(no_pids.status, Status::Fail);
        let v1 = Hierarchy::V1 { memory: Some(root.join("memory/g")), pids: None, cpu: None, unified: None };
        let v1_check = cgroup_verdict(&v1, "v1", Ok(()), root);
        assert_eq!(v1_check.status, Status::Fail);
        assert!(v1_check.fix.unwrap().contains("mount -t cgroup -o pids"));
        let none = Hierarchy::None { reason: "read-only".into() };
        assert_eq!(cgroup_verdict(&none, "none", Ok(()), root).status, Status::Fail);
        assert_eq!(
            cgroup_verdict(&v2(Controller::ALL.to_vec()), "v2", Err("EACCES".into()), root).status,
            Status::Fail
        );
    }

    #[test]
    fn programs_are_found_on_the_given_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pasta"), "").unwrap();
        let host = Host {
            proc: dir.path().join("proc"),
            sys: dir.path().join("sys"),
            dev: dir.path().join("dev"),
            path: Some(dir.path().as_os_str().to_owned()),
        };
        assert_eq!(host.which("pasta"), Some(dir.path().join("pasta")));
        assert_eq!(host.which("slirp4netns"), None);
        // A helper without iptables: no egress policy, so a warning.
        assert_eq!(network_check(&host).status, Status::Warn);
        std::fs::write(dir.path().join("iptables-restore"), "").unwrap();
        std::fs::write(dir.path().join("ip6tables-restore"), "").unwrap();
        assert_eq!(network_check(&host).status, Status::Ok);
        assert_eq!(git_check(&host).status, Status::Warn);
        assert!(kvm_check(&host).detail.starts_with("no /dev/kvm"));
    }

    #[test]
    fn probes_report_exit_and_are_killed_past_their_deadline() {
        let path = std::env::var_os("PATH");
        let find = |n: &str| which_on(path.as_ref(), n);
        assert!(matches!(run_probe(find("true"), &[], PROBE_TIMEOUT), Probe::Exited { success: true, .. }));
        assert!(matches!(run_probe(find("false"), &[], PROBE_TIMEOUT), Probe::Exited { success: false, .. }));
        assert_eq!(run_probe(None, &[], PROBE_TIMEOUT), Probe::Missing);
        let started = std::time::Instant::now();
        assert_eq!(run_probe(find("sleep"), &["30"], Duration::from_millis(100)), Probe::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
