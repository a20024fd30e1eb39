//! A throwaway etcd on loopback, for tests and the bench.
//!
//! [`EtcdServer::start`] runs `etcd` on a fresh data directory and two
//! free loopback ports, with a 10 ms heartbeat so it elects itself in a
//! fraction of a second, and polls its `/health` with a deadline. The
//! guard kills the process and removes the directory on drop, so a failing
//! test leaks nothing. `kill` and `restart` (same data dir, same ports)
//! let tests take etcd away under a running client.
//!
//! A missing `etcd` binary is an error that says how to install it: tests
//! fail on it rather than skip, so a machine without etcd cannot pass them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd gets to answer `/health` (it needs ~120 ms here; a busy
/// machine running tests in parallel needs more).
pub const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a test etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EtcdServerError {
    #[error("etcd is not installed: run `apt-get install -y etcd-server` (and etcd-client for etcdctl)")]
    NotInstalled,
    #[error("{step}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd exited during start-up ({status}); its log:\n{log}")]
    Exited { status: std::process::ExitStatus, log: String },
    #[error("etcd was not healthy after {timeout:?}; its log:\n{log}")]
    NotReady { timeout: Duration, log: String },
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> EtcdServerError {
    move |source| EtcdServerError::Io { step, source }
}

/// A running etcd that is killed and removed on drop.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    /// The address it listens on (loopback unless [`EtcdServer::start_on`]).
    host: std::net::IpAddr,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Where `/health` is asked: plain HTTP even when clients need TLS.
    metrics_port: u16,
    tls: Option<EtcdServerTls>,
}

/// TLS for a test etcd: its certificate and key, and the CA whose client
/// certificates it takes (`--client-cert-auth`: no other client gets in).
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

fn free_port(host: std::net::IpAddr) -> Result<u16, EtcdServerError> {
    let l = TcpListener::bind((host, 0)).map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

impl EtcdServer {
    /// Starts etcd and waits until it is healthy. Blocks the calling
    /// thread while it waits (about 150 ms here).
    pub fn start() -> Result<EtcdServer, EtcdServerError> {
        EtcdServer::start_on(std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// Starts etcd listening on `host` (an address of this machine, e.g.
    /// a bridge that network namespaces reach).
    pub fn start_on(host: std::net::IpAddr) -> Result<EtcdServer, EtcdServerError> {
        EtcdServer::start_with(host, None)
    }

    /// Starts etcd on `host` taking clients over TLS only, and only those
    /// with a certificate `tls.client_ca` issued.
    pub fn start_tls_on(host: std::net::IpAddr, tls: EtcdServerTls) -> Result<EtcdServer, EtcdServerError> {
        EtcdServer::start_with(host, Some(tls))
    }

    fn start_with(host: std::net::IpAddr, tls: Option<EtcdServerTls>) -> Result<EtcdServer, EtcdServerError> {
        let dir = tempfile::Builder::new().prefix("flotilla-etcd-").tempdir().map_err(io("creating the data dir"))?;
        let (client_port, peer_port, metrics_port) = (free_port(host)?, free_port(host)?, free_port(host)?);
        let mut server = EtcdServer { child: None, host, dir, client_port, peer_port, metrics_port, tls };
        server.spawn()?;
        Ok(server)
    }

    /// The client URL, e.g. `http://127.0.0.1:40123` (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", SocketAddr::from((self.host, self.client_port)))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Everything etcd printed so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) -> Result<(), EtcdServerError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("opening the etcd log"))?;
        let err_log = log.try_clone().map_err(io("opening the etcd log"))?;
        let client = self.url();
        let peer = format!("http://{}", SocketAddr::from((self.host, self.peer_port)));
        let metrics = format!("http://{}", SocketAddr::from((self.host, self.metrics_port)));
        let mut cmd = Command::new("etcd");
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.cert).arg("--key-file").arg(&tls.key);
            cmd.arg("--client-cert-auth").arg("--trusted-ca-file").arg(&tls.client_ca);
        }
        let child = cmd
            .arg("--name")
            .arg("flotilla-test")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--listen-metrics-urls", &metrics])
            .arg("--initial-cluster")
            .arg(format!("flotilla-test={peer}"))
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => EtcdServerError::NotInstalled,
                _ => EtcdServerError::Io { step: "spawning etcd", source: e },
            })?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), EtcdServerError> {
        let addr = SocketAddr::from((self.host, self.metrics_port));
        let deadline = Instant::now() + ETCD_READY_TIMEOUT;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(EtcdServerError::Exited { status, log: self.log() });
            }
            if healthy(addr) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EtcdServerError::NotReady { timeout: ETCD_READY_TIMEOUT, log: self.log() });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Kills etcd with SIGKILL and reaps it; the data dir stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same data dir and ports (after `kill`, or
    /// killing it first).
    pub fn restart(&mut self) -> Result<(), EtcdServerError> {
        self.kill();
        self.spawn()
    }

    /// Whether `etcdctl` is installed (the bench uses it as a baseline).
    pub fn etcdctl_available() -> bool {
        Command::new("etcdctl").arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
    }

    /// The etcd data directory's parent (the guard's scratch directory).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `GET /health` over a fresh connection, with short timeouts.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}
