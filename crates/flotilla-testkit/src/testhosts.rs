//! Test hosts in a network namespace of the test's own, for egress tests.
//!
//! [`TestHosts::new`] makes a namespace joined to the host by a veth pair,
//! gives it one address for each pattern asked (with `{i}` replaced by
//! this fixture's index, so concurrent tests never share an address), a
//! host route to each, and a TCP listener on each address and `port` that
//! answers `HELLO <address>` and closes. Nothing leaves the machine: every
//! address lives in the namespace. Dropping it removes the namespace, the
//! veth pair and the routes.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// The port every test host listens on.
pub const PORT: u16 = 8089;

pub struct TestHosts {
    index: u32,
    /// The addresses made, in the order asked.
    pub addrs: Vec<String>,
    listener: Child,
    _lock: File,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip (apt-get install -y iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl TestHosts {
    /// `patterns` are IPv4 addresses, `{i}` standing for an index in 1..=250.
    pub fn new(patterns: &[&str]) -> TestHosts {
        let dir = std::env::temp_dir().join("flotilla-testhosts");
        std::fs::create_dir_all(&dir).unwrap();
        let (index, lock) = (1..=250u32)
            .find_map(|i| {
                let f = File::create(dir.join(format!("{i}.lock"))).ok()?;
                f.try_lock().ok().map(|()| (i, f))
            })
            .expect("a free test-host index");
        let hosts = TestHosts::names(index);
        // A namespace left by a killed run of this index goes first.
        let _ = Command::new("ip").args(["netns", "del", &hosts.0]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["link", "del", &hosts.1]).stderr(Stdio::null()).status();
        let (ns, host_end, ns_end) = hosts;
        let addrs: Vec<String> = patterns.iter().map(|p| p.replace("{i}", &index.to_string())).collect();
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &ns_end, "netns", &ns]);
        ip(&["link", "set", &host_end, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "set", &ns_end, "up"]);
        for a in &addrs {
            ip(&["-n", &ns, "addr", "add", &format!("{a}/32"), "dev", &ns_end]);
            ip(&["route", "replace", &format!("{a}/32"), "dev", &host_end]);
        }
        ip(&["-n", &ns, "route", "add", "default", "dev", &ns_end]);
        let script = format!(
            "import socket, threading, sys\n\
             def serve(a):\n    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n    \
             s.bind((a, {PORT})); s.listen(16); ready.release()\n    while True:\n        c, _ = s.accept()\n        \
             c.sendall(('HELLO ' + a + '\\n').encode()); c.close()\n\
             ready = threading.Semaphore(0)\n\
             addrs = sys.argv[1:]\n\
             for a in addrs: threading.Thread(target=serve, args=(a,), daemon=True).start()\n\
             for a in addrs: ready.acquire()\n\
             print('READY', flush=True)\n\
             sys.stdin.read()\n"
        );
        let mut listener = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c", &script])
            .args(&addrs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 for the test hosts' listeners");
        let mut line = String::new();
        BufReader::new(listener.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let hosts = TestHosts { index, addrs, listener, _lock: lock };
        assert_eq!(line.trim(), "READY", "the test hosts' listeners did not start");
        hosts
    }

    /// This fixture's index (what `{i}` stood for).
    pub fn index(&self) -> u32 {
        self.index
    }

    fn names(i: u32) -> (String, String, String) {
        (format!("flt-th-{i}"), format!("flth{i}"), format!("fltn{i}"))
    }
}

impl Drop for TestHosts {
    fn drop(&mut self) {
        let _ = self.listener.kill();
        let _ = self.listener.wait();
        let (ns, host_end, _) = TestHosts::names(self.index);
        for a in &self.addrs {
            let _ = Command::new("ip").args(["route", "del", &format!("{a}/32")]).stderr(Stdio::null()).status();
        }
        let _ = Command::new("ip").args(["link", "del", &host_end]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
    }
}
