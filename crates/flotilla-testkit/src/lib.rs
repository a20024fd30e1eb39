//! Test support for Flotilla: waiting with deadlines, and a real node
//! process that is always cleaned up.
//!
//! Tests never sleep to wait for something: they poll a condition with a
//! deadline ([`wait_until`]). Every process a test starts is owned by a
//! guard whose `Drop` stops it, so a failing test leaks nothing.
#![forbid(unsafe_code)]

pub mod images;
pub mod pki;
pub mod postgres;
pub mod testhosts;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Polls `f` every few milliseconds until it returns `Some`, or panics
/// with `what` once `timeout` has passed.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`),
/// 0 if it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A `flotilla node` process on a throwaway data directory.
pub struct NodeProcess {
    child: Option<Child>,
    /// Killed with -9 and not started again: its sandboxes still run.
    crashed: bool,
    home: tempfile::TempDir,
    bin: PathBuf,
    /// Extra arguments to `node` (e.g. `--listen`).
    args: Vec<String>,
    /// Environment for the node: set (`Some`) or removed (`None`).
    env: Vec<(String, Option<String>)>,
    /// The role started: `node`, or `dev` (node, name table, coordinator).
    role: &'static str,
    /// A command the node runs under, e.g. `ip netns exec HOST` (it must
    /// exec the node, so the child's pid is the node's).
    wrap: Vec<String>,
}

impl NodeProcess {
    /// Starts `bin node --home <tmp>` and waits for its socket.
    pub fn start(bin: &Path) -> NodeProcess {
        NodeProcess::start_with(bin, &[])
    }

    /// Starts `bin node --home <tmp> ARGS...`.
    pub fn start_with(bin: &Path, args: &[&str]) -> NodeProcess {
        NodeProcess::start_with_env(bin, args, &[])
    }

    /// Starts `bin node --home <tmp> ARGS...` with environment variables
    /// set (`Some`) or removed (`None`).
    pub fn start_with_env(bin: &Path, args: &[&str], env: &[(&str, Option<&str>)]) -> NodeProcess {
        NodeProcess::launch(bin, "node", &[], args, env)
    }

    /// Starts `WRAP... bin node --home <tmp> ARGS...`: the node under a
    /// command that execs it, e.g. `ip netns exec HOST` for a node in its
    /// own network namespace.
    pub fn start_wrapped(bin: &Path, wrap: &[&str], args: &[&str]) -> NodeProcess {
        NodeProcess::launch(bin, "node", wrap, args, &[])
    }

    /// Starts `bin dev --home <tmp> ARGS...`: the node, its name table and
    /// a coordinator in one process. Waits for the node's socket and the
    /// coordinator's.
    pub fn start_dev(bin: &Path, args: &[&str]) -> NodeProcess {
        NodeProcess::launch(bin, "dev", &[], args, &[])
    }

    fn launch(
        bin: &Path,
        role: &'static str,
        wrap: &[&str],
        args: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> NodeProcess {
        let home = tempfile::Builder::new().prefix("flotilla-test-").tempdir().expect("tempdir");
        let mut n = NodeProcess {
            child: None,
            crashed: false,
            home,
            bin: bin.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.map(str::to_string))).collect(),
            role,
            wrap: wrap.iter().map(|a| a.to_string()).collect(),
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        // Append: after a restart the log still holds what the last node said.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.path().join("node.log"))
            .expect("log file");
        let mut cmd = match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let child = cmd
            .args([self.role, "--home"])
            .arg(self.home.path())
            .args(&self.args)
            .env("FLOTILLA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning flotilla node");
        self.child = Some(child);
        self.crashed = false;
        let sock = self.socket();
        let child = self.child.as_mut().expect("child");
        wait_until(Duration::from_secs(20), "the node socket", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("flotilla node exited early with {status}");
            }
            // Connect, not just look for the file: the node must answer.
            std::os::unix::net::UnixStream::connect(&sock).is_ok().then_some(())
        });
        if self.role == "dev" {
            let csock = self.home.path().join("coordinator.sock");
            let child = self.child.as_mut().expect("child");
            wait_until(Duration::from_secs(20), "the coordinator socket", || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("flotilla dev exited early with {status}");
                }
                std::os::unix::net::UnixStream::connect(&csock).is_ok().then_some(())
            });
        }
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.home.path().join("node.sock")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The node's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("node.log")).unwrap_or_default()
    }

    /// Stops the node gracefully (it stops its sandboxes) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, Duration::from_secs(20));
        }
    }

    /// Kills the node with SIGKILL (its sandboxes survive, as after a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.crashed = true;
        }
    }

    /// Starts the node again on the same data directory.
    pub fn restart(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(self.socket());
        self.spawn();
    }

    /// Starts the node again after a `kill9`.
    pub fn start_again(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        self.spawn();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if self.crashed {
            // Killed with -9 and not restarted: its sandboxes are still
            // running. Bring the node back once so it stops them.
            let _ = std::fs::remove_file(self.socket());
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.spawn())).is_err() {
                return;
            }
        }
        self.stop();
    }
}

/// Stops `child` as a service manager would: SIGTERM, then SIGKILL if it
/// has not exited within `grace`; reaps it either way.
pub fn stop_child(child: &mut Child, grace: Duration) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + grace;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Raises this process's open-file limit to at least `n` (up to the hard
/// limit), for tests that hold thousands of connections; returns the limit
/// now in force.
pub fn raise_fd_limit(n: u64) -> u64 {
    // util-linux's prlimit, on this process (the crate has no unsafe code).
    let limits = || {
        let text = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let line = text.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default().to_string();
        let mut f = line.split_whitespace().skip(3).map(|v| v.parse::<u64>().unwrap_or(u64::MAX));
        (f.next().unwrap_or(0), f.next().unwrap_or(0))
    };
    let (soft, hard) = limits();
    if soft < n {
        let want = n.min(hard);
        let _ = Command::new("prlimit")
            .args(["--pid", &std::process::id().to_string(), &format!("--nofile={want}:{hard}")])
            .status();
    }
    limits().0
}

/// Whether this process runs as root (the node needs it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// The static `flotilla` a microVM boots as its init, built on first use
/// (`cargo build --release --target x86_64-unknown-linux-gnu` with
/// `+crt-static`) into this workspace's target directory; later calls find
/// it up to date in a second. `bin` is the test's own `flotilla`
/// (`target/debug/flotilla`), which locates the target directory.
/// `FLOTILLA_GUEST_AGENT` names a prebuilt one instead (`.ci/run` builds it
/// before the tests).
pub fn static_flotilla(bin: &Path) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("FLOTILLA_GUEST_AGENT") {
                return PathBuf::from(p);
            }
            let target = bin.parent().and_then(Path::parent).expect("the binary is in target/<profile>/");
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
            let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "build",
                    "--release",
                    "--target",
                    "x86_64-unknown-linux-gnu",
                    "-p",
                    "flotilla",
                    "--manifest-path",
                ])
                .arg(&manifest)
                .env("CARGO_TARGET_DIR", target)
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .status()
                .expect("running cargo to build the static guest agent");
            assert!(status.success(), "building the static guest agent failed");
            target.join("x86_64-unknown-linux-gnu/release/flotilla")
        })
        .clone()
}

/// The guest kernel Flotilla builds (`flotilla node setup-vm
/// --build-kernel`): `$FLOTILLA_VM_KERNEL` when set (.ci/run builds it once
/// and sets it), else built here once into `target/guest-kernel/` by the
/// static build of `bin` (about 5 minutes on 2 cores).
pub fn guest_kernel(bin: &Path) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("FLOTILLA_VM_KERNEL") {
                return PathBuf::from(p);
            }
            let target = bin.parent().and_then(Path::parent).expect("the binary is in target/<profile>/");
            let home = target.join("guest-kernel");
            let image = home.join("vm/kernel/vmlinux");
            if !image.exists() {
                // The static build: setup-vm also makes the initramfs from it.
                let status = Command::new(static_flotilla(bin))
                    .args(["node", "setup-vm", "--build-kernel", "--home"])
                    .arg(&home)
                    .status()
                    .expect("running flotilla node setup-vm --build-kernel");
                assert!(status.success(), "building the guest kernel failed (apt-get install -y linux-source-6.1 bc bison flex libelf-dev build-essential)");
            }
            image
        })
        .clone()
}

/// Builds a minimal root filesystem in `dir` from host binaries: `bins`
/// copied into `/bin`, and the shared libraries of `bins` and of `libs_of`
/// (programs that run in the sandbox from outside it, like a dynamically
/// linked agent) at their host paths.
pub fn minimal_rootfs(dir: &Path, bins: &[&str], libs_of: &[&str]) {
    for d in ["bin", "etc", "proc", "dev", "tmp", "workspace", "root"] {
        std::fs::create_dir_all(dir.join(d)).expect("creating rootfs directories");
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").expect("writing /etc/passwd");
    for b in bins.iter().chain(libs_of) {
        let real = std::fs::canonicalize(b).unwrap_or_else(|e| panic!("{b}: {e}"));
        if bins.contains(b) {
            let name = Path::new(b).file_name().expect("a file name");
            std::fs::copy(&real, dir.join("bin").join(name)).unwrap_or_else(|e| panic!("copying {b}: {e}"));
        }
        let out = std::process::Command::new("ldd").arg(&real).output().expect("running ldd");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
                let dst = dir.join(p.trim_start_matches('/'));
                std::fs::create_dir_all(dst.parent().expect("a parent")).expect("creating a library directory");
                if !dst.exists() {
                    std::fs::copy(p, &dst).unwrap_or_else(|e| panic!("copying {p}: {e}"));
                }
            }
        }
    }
}
