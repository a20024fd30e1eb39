//! Shared fixture: a real `flotilla node` on a throwaway data directory,
//! and helpers to run commands in its sandboxes.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use flotilla_agent::client::drain_exec;
use flotilla_agent::http::{Endpoint, HttpClient};
use flotilla_api::{CreateSandboxRequest, ExecRequest, ExitStatus, Sandbox};
use flotilla_node::NodeClient;
use flotilla_testkit::NodeProcess;

pub struct Env {
    pub node: NodeProcess,
    pub client: NodeClient,
    /// Which backend `sandbox()` creates on.
    pub kind: Kind,
    vm_image: tokio::sync::OnceCell<String>,
}

/// A sandbox backend the shared behavioural tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Process,
    /// A microVM (QEMU; TCG where KVM cannot boot a stock kernel).
    Vm,
}

/// A node whose `sandbox()` creates sandboxes of `kind`.
pub fn env_for(kind: Kind) -> Env {
    match kind {
        Kind::Process => env(),
        Kind::Vm => Env { kind, ..vm_env(VmKernel::Built) },
    }
}

/// Which kernel a microVM test's guests boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmKernel {
    /// The one Flotilla builds (`setup-vm --build-kernel`): what a node
    /// that has it boots, and what most tests use.
    Built,
    /// The distribution's cloud kernel, with modules: what a node without
    /// a built kernel boots.
    Distribution,
}

/// A node that boots microVMs with a static build of this tree as the
/// guest's init and `kernel` as its kernel.
pub fn vm_env(kernel: VmKernel) -> Env {
    vm_env_with(kernel, &[])
}

/// [`vm_env`] with extra `node` arguments.
pub fn vm_env_with(kernel: VmKernel, extra: &[&str]) -> Env {
    let agent = flotilla_testkit::static_flotilla(Path::new(BIN));
    let built = match kernel {
        VmKernel::Built => Some(flotilla_testkit::guest_kernel(Path::new(BIN))),
        VmKernel::Distribution => None,
    };
    let k = built.as_deref().map(|p| p.to_str().expect("utf-8 path"));
    let mut args = vec!["--guest-agent", agent.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    Env { kind: Kind::Vm, ..env_with_env(&args, &[("FLOTILLA_VM_KERNEL", k)]) }
}

/// Tools the shared tests run inside a microVM's image.
pub const VM_TOOLS: [&str; 16] = [
    "/bin/sh",
    "/bin/bash",
    "/bin/cat",
    "/bin/ls",
    "/bin/echo",
    "/bin/touch",
    "/bin/seq",
    "/bin/sleep",
    "/usr/bin/pgrep",
    "/bin/ps",
    "/bin/tty",
    "/bin/stty",
    "/bin/head",
    "/usr/bin/tail",
    "/bin/uname",
    "/bin/grep",
];

/// Runs each named `async fn NAME(kind: common::Kind)` as two tests,
/// `process::NAME` and `vm::NAME`: one behavioural suite for both backends.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod process {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::common::Kind::Process).await })*
        }
        mod vm {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::common::Kind::Vm).await })*
        }
    };
}

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

pub fn env() -> Env {
    env_with(&[])
}

/// A node started with extra `node` arguments.
pub fn env_with(args: &[&str]) -> Env {
    env_with_env(args, &[])
}

/// A node started with extra `node` arguments and environment variables
/// set (`Some`) or removed (`None`).
pub fn env_with_env(args: &[&str], env: &[(&str, Option<&str>)]) -> Env {
    assert!(
        flotilla_testkit::is_root(),
        "these tests drive a real node, which must run as root (it maps sandboxes to their own uid ranges); \
         run them as root, as .ci/run does"
    );
    let node = NodeProcess::start_with_env(Path::new(BIN), args, env);
    let client = NodeClient::new(HttpClient::new(Endpoint::Unix(node.socket())));
    Env { node, client, kind: Kind::Process, vm_image: Default::default() }
}

impl Env {
    pub async fn create(&self, req: CreateSandboxRequest) -> Sandbox {
        match self.client.create(&req).await {
            Ok(s) => s,
            Err(e) => panic!("create failed: {e:?}\nnode log:\n{}", self.node.log()),
        }
    }

    /// A sandbox of this env's kind with default settings (a microVM gets
    /// an image of the host's tools, imported once per node).
    pub async fn sandbox(&self) -> Sandbox {
        let req = self.request().await;
        self.create(req).await
    }

    /// The create request `sandbox()` sends; tests add their settings.
    pub async fn request(&self) -> CreateSandboxRequest {
        match self.kind {
            Kind::Process => CreateSandboxRequest::default(),
            Kind::Vm => CreateSandboxRequest {
                image: Some(self.vm_image().await),
                backend: flotilla_api::BackendKind::Vm,
                resources: flotilla_api::Resources { memory_bytes: Some(256 << 20), ..Default::default() },
                ..Default::default()
            },
        }
    }

    async fn vm_image(&self) -> String {
        self.vm_image
            .get_or_init(|| async {
                let dir = self.node.home().join("vm-rootfs-src");
                flotilla_testkit::minimal_rootfs(&dir, &VM_TOOLS, &[]);
                let req =
                    flotilla_api::ImportImageRequest { reference: "vmtools:1".into(), path: dir.display().to_string() };
                let op = self.client.import_image(&req).await.expect("image import accepted");
                let op = self.client.wait_operation(&op.id, Some(Duration::from_secs(120)), |_| {}).await.unwrap();
                assert_eq!(op.state, flotilla_api::OperationState::Succeeded, "{op:?}");
                "vmtools:1".to_string()
            })
            .await
            .clone()
    }

    /// Runs `sh -c script` and returns (stdout, stderr, status).
    pub async fn sh(&self, id: &str, script: &str) -> (String, String, ExitStatus) {
        self.exec(id, ExecRequest { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() }).await
    }

    pub async fn exec(&self, id: &str, req: ExecRequest) -> (String, String, ExitStatus) {
        let mut stream = match self.client.sandbox(id).exec(&req).await {
            Ok(s) => s,
            Err(e) => panic!("exec in {id} refused: {e:?}\nnode log:\n{}", self.node.log()),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = drain_exec(&mut stream, &mut out, &mut err).await.expect("exec finished with a status");
        (String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned(), status)
    }

    /// Asserts `script` exits 0 and returns its stdout.
    pub async fn ok(&self, id: &str, script: &str) -> String {
        let (out, err, st) = self.sh(id, script).await;
        assert!(st.success(), "`{script}` failed: {st:?}\nstdout: {out}\nstderr: {err}");
        out
    }
}

/// A tar of regular files (mode 0644) with these names and contents.
pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A request body from fixed bytes.
pub fn body(b: Vec<u8>) -> http_body_util::Full<Bytes> {
    http_body_util::Full::new(Bytes::from(b))
}

/// Polls an async condition with a deadline.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
    }
}

/// The host pid of a sandbox's init (its agent), from the boot steps.
pub fn agent_pid(s: &Sandbox) -> i32 {
    s.steps
        .iter()
        .find(|st| st.name == "created")
        .and_then(|st| st.detail.as_deref()?.strip_prefix("pid ")?.parse().ok())
        .expect("created step names the pid")
}

/// Builds a minimal root filesystem from host binaries: a shell, a few
/// tools, their libraries, and the libraries the agent needs.
pub fn minimal_rootfs(dir: &std::path::Path) {
    flotilla_testkit::minimal_rootfs(dir, &["/bin/sh", "/bin/cat", "/bin/ls", "/bin/echo", "/bin/touch"], &[BIN]);
}

/// The node's event feed from the start (`GET /v1/events?after=0`) until
/// `needle` shows up (or 10 s pass).
pub async fn events_until(home: &Path, needle: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(home.join("node.sock")).await.unwrap();
    s.write_all(b"GET /v1/events?after=0 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&out).contains(needle) {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs the CLI, `flotilla ARGS`, against the node whose data directory is
/// `home` (`FLOTILLA_HOME`, so a `--` in ARGS stays the command's):
/// (exit code, stdout, stderr).
pub fn cli(home: &Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env("FLOTILLA_HOME", home)
        .env_remove("FLOTILLA_NODE")
        .output()
        .expect("run flotilla");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd`, failing the test with its output unless it succeeds; its
/// stdout, trimmed.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (is it installed? .ci/run installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `git ARGS` in `dir` as a test user on branch `main`; its stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    run(std::process::Command::new("git")
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir))
}

/// Writes `files` into `dir`, commits them; the new commit's id.
pub fn commit(dir: &Path, files: &[(&str, &str)], message: &str) -> String {
    for (name, body) in files {
        std::fs::write(dir.join(name), body).unwrap();
        git(dir, &["add", name]);
    }
    git(dir, &["commit", "-q", "-m", message]);
    git(dir, &["rev-parse", "HEAD"])
}

/// `flotilla ARGS` against `home`, which must succeed: its stdout.
pub fn cli_ok(home: &Path, args: &[&str]) -> String {
    let (code, out, err) = cli(home, args);
    assert_eq!(code, 0, "flotilla {args:?} failed: {err}{out}");
    out
}

/// `flotilla ARGS --json` against `home`, parsed.
pub fn json(home: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&cli_ok(home, &a)).unwrap_or_else(|e| panic!("flotilla {args:?} --json: {e}"))
}

/// The build of `builder` in a run as `run ls --json` shows it.
pub fn build_of(run: &serde_json::Value, builder: &str) -> serde_json::Value {
    run["builds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["builder"] == builder)
        .unwrap_or_else(|| panic!("no {builder} build in {run}"))
        .clone()
}

/// `flotilla coordinator` as a process of its own with HOME `home`, driving
/// the node of `node_home`; stopped on drop (killed with -9 by `kill9`).
pub struct CoordinatorProcess {
    child: std::process::Child,
    home: std::path::PathBuf,
}

impl CoordinatorProcess {
    pub fn start(home: &Path, node_home: &Path, extra: &[&str]) -> CoordinatorProcess {
        std::fs::create_dir_all(home).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(home.join("coordinator.log")).unwrap();
        let child = std::process::Command::new(BIN)
            .args(["coordinator", "--home"])
            .arg(home)
            .args(["--coordinator-listen", "none", "--node"])
            .arg(format!("unix://{}", node_home.join("node.sock").display()))
            .args(extra)
            .env("FLOTILLA_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let sock = home.join("coordinator.sock");
        flotilla_testkit::wait_until(Duration::from_secs(20), "the coordinator socket", || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok().then_some(())
        });
        CoordinatorProcess { child, home: home.to_path_buf() }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("coordinator.log")).unwrap_or_default()
    }

    /// `GET path` on its socket: the body of a 200 answer, else `None`.
    pub fn get(&self, path: &str) -> Option<String> {
        coordinator_get(&self.home, path)
    }
}

/// `GET path` on the coordinator socket of HOME `home`: the body of a 200
/// answer, else `None`.
pub fn coordinator_get(home: &Path, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(home.join("coordinator.sock")).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_string())
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        flotilla_testkit::stop_child(&mut self.child, Duration::from_secs(10));
    }
}
