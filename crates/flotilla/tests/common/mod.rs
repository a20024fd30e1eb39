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
}

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

pub fn env() -> Env {
    env_with(&[])
}

/// A node started with extra `node` arguments.
pub fn env_with(args: &[&str]) -> Env {
    assert!(
        flotilla_testkit::is_root(),
        "these tests drive a real node, which must run as root (it maps sandboxes to their own uid ranges); \
         run them as root, as .ci/run does"
    );
    let node = NodeProcess::start_with(Path::new(BIN), args);
    let client = NodeClient::new(HttpClient::new(Endpoint::Unix(node.socket())));
    Env { node, client }
}

impl Env {
    pub async fn create(&self, req: CreateSandboxRequest) -> Sandbox {
        match self.client.create(&req).await {
            Ok(s) => s,
            Err(e) => panic!("create failed: {e:?}\nnode log:\n{}", self.node.log()),
        }
    }

    pub async fn sandbox(&self) -> Sandbox {
        self.create(CreateSandboxRequest::default()).await
    }

    /// Runs `sh -c script` and returns (stdout, stderr, status).
    pub async fn sh(&self, id: &str, script: &str) -> (String, String, ExitStatus) {
        self.exec(id, ExecRequest { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() }).await
    }

    pub async fn exec(&self, id: &str, req: ExecRequest) -> (String, String, ExitStatus) {
        let mut stream = self.client.sandbox(id).exec(&req).await.expect("exec accepted");
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
