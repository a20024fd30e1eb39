//! Nodes publish themselves in the name table and are found by id; the
//! `names` CLI mounts, lists, resolves and unmounts. Writes to the table
//! need its bearer token; reads do not.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_names::{MemoryStore, NamesClient, ServerHandle};

/// Variables that would point the CLI or a node elsewhere than the test says.
const AMBIENT: [&str; 6] = [
    "FLOTILLA_HOME",
    "FLOTILLA_NODE",
    "FLOTILLA_NAMES",
    "FLOTILLA_NAMES_TOKEN",
    "FLOTILLA_TOKEN",
    "FLOTILLA_NODE_TOKEN",
];

fn cli(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(common::BIN);
    for v in AMBIENT {
        cmd.env_remove(v);
    }
    cmd.args(args).output().unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_publish_themselves_and_are_found_by_id() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let table = ServerHandle::spawn(listener, Arc::new(MemoryStore::new())).unwrap();
    let url = table.url();
    let token = table.token().to_string();
    // The node takes the token from the environment; the CLI below from the flag.
    let mut env = common::env_with_env(&["--names", &url], &[("FLOTILLA_NAMES_TOKEN", Some(&token))]);
    let id = env.client.info().await.unwrap().node_id;
    let names = NamesClient::connect(&url).unwrap();
    let sock = format!("unix://{}", env.node.socket().display());
    common::eventually(Duration::from_secs(10), "the node to publish itself", || async {
        let r = names.resolve(&format!("nodes/{id}")).await.ok()?;
        r.servers.contains(&sock).then_some(())
    })
    .await;

    // The CLI finds the node by its id (a read: no token).
    let out = cli(&["sandbox", "ls", "--json", "--node-id", &id, "--names", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&["info", "--json", "--node-id", "nope", "--names", &url]);
    assert!(!out.status.success(), "an unknown node id is an error");

    // names ls / mount / resolve / unmount.
    let out = cli(&["names", "ls", "nodes/*", "--json", "--names", &url]);
    let listed: Vec<flotilla_api::names::MountEntry> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed.iter().any(|e| e.name == format!("nodes/{id}")), "{listed:?}");
    let out = cli(&["names", "mount", "apps/web", "http://127.0.0.1:9", "--ttl", "1m", "--names", &url]);
    assert!(!out.status.success(), "a mount without the token is refused");
    assert!(stderr(&out).contains("--names-token"), "the error says what to pass: {}", stderr(&out));
    assert!(names.resolve("apps/web").await.is_err(), "nothing was mounted");
    let with_token = ["--names", url.as_str(), "--names-token", token.as_str()];
    let out = cli(&[&["names", "mount", "apps/web", "http://127.0.0.1:9", "--ttl", "1m"], &with_token[..]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&["names", "resolve", "apps/web/index.html", "--names", &url]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "http://127.0.0.1:9 index.html\n");
    let out = cli(&["names", "unmount", "apps/web", "http://127.0.0.1:9", "--names", &url]);
    assert!(!out.status.success(), "an unmount without the token is refused");
    assert!(names.resolve("apps/web").await.is_ok(), "still mounted");
    let out = cli(&[&["names", "unmount", "apps/web", "http://127.0.0.1:9"], &with_token[..]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(names.resolve("apps/web").await.is_err(), "unmounted");

    // A node that stops unmounts itself.
    env.node.stop();
    common::eventually(Duration::from_secs(10), "the node's name to go", || async {
        names.resolve(&format!("nodes/{id}")).await.is_err().then_some(())
    })
    .await;
    table.shutdown().await.unwrap();
}

#[test]
fn a_node_given_names_without_its_token_refuses_to_start() {
    assert!(flotilla_testkit::is_root(), "the node must run as root");
    let home = tempfile::Builder::new().prefix("flotilla-test-").tempdir().unwrap();
    let log = home.path().join("node.log");
    let mut cmd = Command::new(common::BIN);
    for v in AMBIENT {
        cmd.env_remove(v);
    }
    let mut child = cmd
        .args(["node", "--names", "http://127.0.0.1:9", "--home"])
        .arg(home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("the node kept running without the names token: {err}"));
    assert!(!status.success(), "{err}");
    assert!(err.contains("--names-token"), "{err}");
}

/// A `flotilla dev` on a throwaway home, stopped (SIGTERM, then SIGKILL
/// after a deadline) when dropped.
struct Dev {
    child: Option<Child>,
    home: tempfile::TempDir,
}

impl Dev {
    fn start(args: &[&str]) -> Dev {
        assert!(flotilla_testkit::is_root(), "`flotilla dev` runs a node, which must run as root");
        let home = tempfile::Builder::new().prefix("flotilla-test-").tempdir().unwrap();
        let log = std::fs::File::create(home.path().join("dev.log")).unwrap();
        let mut cmd = Command::new(common::BIN);
        for v in AMBIENT {
            cmd.env_remove(v);
        }
        let child = cmd
            .args(["dev", "--home"])
            .arg(home.path())
            // No coordinator listener: tests in parallel would race for its default port.
            .args(["--coordinator-listen", "none"])
            .args(args)
            .env("FLOTILLA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut dev = Dev { child: Some(child), home };
        let sock = dev.home.path().join("node.sock");
        let child = dev.child.as_mut().unwrap();
        let log = dev.home.path().join("dev.log");
        flotilla_testkit::wait_until(Duration::from_secs(30), "flotilla dev to serve", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "flotilla dev exited early with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::os::unix::net::UnixStream::connect(&sock).is_ok().then_some(())
        });
        dev
    }

    fn home(&self) -> &Path {
        self.home.path()
    }

    /// `flotilla ARGS --home HOME`, with nothing else from the environment.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        let home = self.home().to_str().unwrap();
        cli(&[args, &["--home", home]].concat())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home().join("dev.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(c.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn dev_names_cli_works_without_flags() {
    let mut dev = Dev::start(&[]);
    let url = std::fs::read_to_string(dev.home().join("names.url")).unwrap().trim().to_string();
    let out = dev.cli(&["info", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = info["node_id"].as_str().unwrap().to_string();

    // The node publishes itself in dev's own table.
    let out = dev.cli(&["names", "ls", "nodes/*", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Vec<flotilla_api::names::MountEntry> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed.iter().any(|e| e.name == format!("nodes/{id}")), "{listed:?}\n{}", dev.log());

    // Writes find the token next to names.url.
    let out = dev.cli(&["names", "mount", "apps/web", "http://127.0.0.1:9", "--ttl", "1m"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), dev.log());
    let out = dev.cli(&["names", "resolve", "apps/web/x"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "http://127.0.0.1:9 x\n", "{}", stderr(&out));
    let out = dev.cli(&["names", "unmount", "apps/web", "http://127.0.0.1:9"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = dev.cli(&["names", "resolve", "apps/web"]);
    assert!(!out.status.success(), "unmounted");

    // The same table named by URL gets no token from HOME: writes are refused.
    let out = dev.cli(&["names", "mount", "apps/evil", "https://evil.example:1", "--names", &url]);
    assert!(!out.status.success(), "a write without the token is refused");
    assert!(stderr(&out).contains("unauthorized") || stderr(&out).contains("token"), "{}", stderr(&out));
    let out = dev.cli(&["names", "resolve", "apps/evil"]);
    assert!(!out.status.success(), "nothing was mounted");
    dev.stop();
    assert!(!dev.home().join("names.url").exists(), "dev removes names.url when it stops");
}

#[test]
fn node_db_is_private() {
    // --listen makes the node's TLS key and API token too.
    let dev = Dev::start(&["--listen", "127.0.0.1:0"]);
    let out = dev.cli(&["sandbox", "create", "--env", "SECRET=hunter2", "--ttl", "10m"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), dev.log());
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    for f in ["node.db", "node.db-wal", "node.db-shm", "names.token", "tls/token", "tls/key.pem"] {
        let meta = std::fs::metadata(dev.home().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f} is {:o}", meta.permissions().mode() & 0o777);
    }
    let out = dev.cli(&["sandbox", "rm", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A name table listening beyond loopback speaks TLS without being asked
/// (its write token never crosses a network in clear): it prints a pinned
/// `https://` address, the CLI mounts and resolves through it, and plain
/// HTTP gets no answer.
#[test]
fn names_serve_beyond_loopback_speaks_tls() {
    use std::io::{Read, Write};
    let home = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = home.path().join("names.log");
    let file = std::fs::File::create(&log).unwrap();
    let listen = format!("0.0.0.0:{port}");
    let mut cmd = Command::new(common::BIN);
    for v in AMBIENT {
        cmd.env_remove(v);
    }
    let child = cmd
        .args(["names", "serve", "--listen", &listen, "--names-token", "beyond-loopback-token-0123456789", "--home"])
        .arg(home.path())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    struct Stop(Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            flotilla_testkit::stop_child(&mut self.0, Duration::from_secs(10));
        }
    }
    let _child = Stop(child);
    let url = flotilla_testkit::wait_until(Duration::from_secs(30), "the name table's address", || {
        let text = std::fs::read_to_string(&log).ok()?;
        Some(text.split("name table on ").nth(1)?.split_whitespace().next()?.to_string())
    });
    assert!(url.starts_with(&format!("https://0.0.0.0:{port}#sha256=")), "{url}");
    let pinned = url.replace("0.0.0.0", "127.0.0.1");
    let token = "beyond-loopback-token-0123456789";
    let out = cli(&["--names", &pinned, "--names-token", token, "names", "mount", "svc/a", "tcp://10.0.0.1:1"]);
    assert!(out.status.success(), "mount over TLS: {}", stderr(&out));
    let out = cli(&["--names", &pinned, "names", "resolve", "svc/a"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("tcp://10.0.0.1:1"), "{}", stderr(&out));
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "plain HTTP was served");
}
