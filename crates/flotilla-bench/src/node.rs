//! A throwaway `flotilla node` for one bench run, stopped on drop.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_agent::http::{Endpoint, HttpClient};
use flotilla_node::NodeClient;

/// How long the node may take to answer on its socket.
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// How long the node may take to stop its sandboxes after SIGTERM before it
/// is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(20);

/// A running node in a private directory. Dropping it (also on error or
/// panic) sends SIGTERM, waits for the node to exit, then removes the
/// directory.
pub struct Node {
    child: Child,
    client: NodeClient,
    home: PathBuf,
    log: PathBuf,
    /// Holds the node home and the baseline's scratch directories, so both
    /// are on one filesystem. Removed after the node has exited.
    root: tempfile::TempDir,
}

impl Node {
    /// The `flotilla` binary: `$FLOTILLA_BIN`, else next to this executable.
    pub fn binary() -> anyhow::Result<PathBuf> {
        if let Some(p) = std::env::var_os("FLOTILLA_BIN") {
            return Ok(PathBuf::from(p));
        }
        let exe = std::env::current_exe().context("finding our own executable")?;
        let bin = exe.parent().context("our executable has no directory")?.join("flotilla");
        if !bin.exists() {
            bail!(
                "no flotilla binary at {} (build it: cargo build --release -p flotilla -p flotilla-bench, \
                 or set FLOTILLA_BIN)",
                bin.display()
            );
        }
        Ok(bin)
    }

    /// Starts `flotilla node --home <tmp>/home` under `parent` and waits
    /// until it answers.
    pub async fn start(bin: &Path, parent: &Path) -> anyhow::Result<Node> {
        let root = tempfile::Builder::new()
            .prefix("flotilla-bench.")
            .tempdir_in(parent)
            .with_context(|| format!("making a scratch directory in {}", parent.display()))?;
        // Each sandbox's unprivileged uid must traverse to its mount points
        // under the node home (the node sets 0711 on the home itself).
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o711))?;
        let home = root.path().join("home");
        let log = root.path().join("node.log");
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(bin)
            .arg("node")
            .arg("--home")
            .arg(&home)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {} node", bin.display()))?;
        let client = NodeClient::new(HttpClient::new(Endpoint::Unix(home.join("node.sock"))));
        let mut node = Node { child, client, home, log, root };
        node.wait_ready().await?;
        Ok(node)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let socket = self.home.join("node.sock");
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the node exited during start-up ({status}); its log:\n{}", self.log_tail());
            }
            if socket.exists() && self.client.info().await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let tail = self.log_tail();
                bail!("the node did not answer on {} within {READY_DEADLINE:?}; its log:\n{tail}", socket.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills the node with SIGKILL (its sandboxes keep running), starts it
    /// again on the same home and returns how long until it answered and
    /// listed `expect_running` running sandboxes.
    pub async fn crash_and_restart(&mut self, bin: &Path, expect_running: usize) -> anyhow::Result<Duration> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let out = std::fs::OpenOptions::new().append(true).open(&self.log)?;
        let t = Instant::now();
        self.child = Command::new(bin)
            .arg("node")
            .arg("--home")
            .arg(&self.home)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {} node again", bin.display()))?;
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the node exited during restart ({status}); its log:\n{}", self.log_tail());
            }
            if let Ok(list) = self.client.list().await {
                let running = list.iter().filter(|s| s.state == flotilla_api::SandboxState::Running).count();
                if running == expect_running {
                    return Ok(t.elapsed());
                }
                bail!("after the restart {running} sandboxes run, expected {expect_running}");
            }
            if Instant::now() > deadline {
                bail!("the node did not answer within {READY_DEADLINE:?} of a restart; its log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    pub fn client(&self) -> &NodeClient {
        &self.client
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// A fresh, not yet existing path beside the node home (same filesystem).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGTERM lets the node stop its sandboxes; std only sends SIGKILL
            // and this crate has no unsafe, so ask kill(1).
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + STOP_DEADLINE;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Ok(None) = self.child.try_wait() {
                eprintln!("flotilla-bench: the node ignored SIGTERM for {STOP_DEADLINE:?}; killing it");
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        // `root` is removed when the fields drop, after this.
    }
}
