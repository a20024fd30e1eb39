//! The fleet across hosts: network namespaces stand in for machines, each
//! with its own address on one bridge, and every piece runs as its own
//! process, as in production.
//!
//! - The test's own namespace is the database host: etcd and PostgreSQL
//!   listen on the bridge address, over TLS only (etcd takes only clients
//!   with a certificate from the fleet's CA; the coordinator checks
//!   PostgreSQL's with `sslmode=verify-full`).
//! - Host `ctl` runs the name table (`names serve` on etcd) and the
//!   coordinator (on PostgreSQL), which knows no node: it finds them in the
//!   name table. The CLI reaches the coordinator over TLS (it listens
//!   beyond loopback), pinning the certificate it printed.
//! - Hosts `n1`..`n3` each run a node that serves its API over TLS only to
//!   the coordinator's client certificate (issued by a CA made here with
//!   `openssl`), and publishes itself with its certificate's fingerprint.
//!
//! Then: builds spread over the three; a node's link is cut mid-build and
//! its build finishes on another, marked retried; when the link comes back
//! the janitor reaps what still ran there; etcd is restarted mid-build and
//! the nodes' mounts are refreshed; a builder whose image only one node has
//! always goes there.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{commit, git, run};
use flotilla_testkit::{NodeProcess, wait_until};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");
const WAIT: Duration = Duration::from_secs(120);
const NAMES_TOKEN: &str = "multihost-names-token-0123456789";

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// A bridge in the test's namespace and a network namespace per host, each
/// joined to the bridge by a veth pair. Removed on drop (after the
/// processes in it, which are declared later and so dropped first).
struct Net {
    id: String,
    subnet: String,
    hosts: Vec<String>,
}

impl Net {
    fn new() -> Net {
        let n = std::process::id() % 200 + 20;
        let net =
            Net { id: format!("fm{}", std::process::id() % 100_000), subnet: format!("10.213.{n}"), hosts: vec![] };
        let br = net.bridge();
        ip(&["link", "add", &br, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}.1/24", net.subnet), "dev", &br]);
        ip(&["link", "set", &br, "up"]);
        net
    }

    fn bridge(&self) -> String {
        format!("{}br", self.id)
    }

    /// The test's own address on the bridge.
    fn gateway(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// Adds host `name` at `.octet`; returns its namespace.
    fn host(&mut self, name: &str, octet: u8) -> String {
        let ns = format!("{}{name}", self.id);
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        let (outer, inner) = (format!("{ns}o"), format!("{ns}i"));
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &ns]);
        ip(&["link", "set", &outer, "master", &self.bridge()]);
        ip(&["link", "set", &outer, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{}.{octet}/24", self.subnet), "dev", &inner]);
        ip(&["-n", &ns, "link", "set", &inner, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    fn addr(&self, octet: u8) -> String {
        format!("{}.{octet}", self.subnet)
    }

    /// Takes a host off the network (its link down: nothing is refused,
    /// nothing answers), or puts it back.
    fn link(&self, ns: &str, up: bool) {
        ip(&["link", "set", &format!("{ns}o"), if up { "up" } else { "down" }]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge()]).status();
    }
}

/// A process the test started, stopped (TERM, then KILL) on drop.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(ns: &str, args: &[&str], log: PathBuf) -> Proc {
        Proc::spawn_logging(ns, args, log, "info")
    }

    fn spawn_logging(ns: &str, args: &[&str], log: PathBuf, level: &str) -> Proc {
        let f = std::fs::File::create(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, BIN])
            .args(args)
            .env("FLOTILLA_LOG", level)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("spawning flotilla");
        Proc { child: Some(child), log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            flotilla_testkit::stop_child(&mut c, Duration::from_secs(15));
        }
    }
}

/// The CLI as a user on another machine runs it: the coordinator's TCP
/// address and its token.
struct Cli {
    url: String,
    token: String,
    home: tempfile::TempDir,
}

impl Cli {
    fn raw(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(BIN)
            .args(["--home", self.home.path().to_str().unwrap(), "--coordinator", &self.url])
            .args(["--coordinator-token", &self.token])
            .args(args)
            .output()
            .expect("running flotilla");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.raw(args);
        assert!(ok, "flotilla {args:?}: {err}{out}");
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap_or_else(|e| panic!("flotilla {args:?} --json: {e}"))
    }

    fn run_of(&self, rev: &str) -> Option<Value> {
        let runs = self.json(&["run", "ls", "--project", "demo", "--limit", "50"]);
        runs.as_array()?.iter().find(|r| r["change"]["rev"] == rev).cloned()
    }

    fn log(&self, build: &Value) -> String {
        self.ok(&["build", "log", &build["id"].to_string()])
    }

    fn finished(&self, rev: &str) -> Value {
        wait_until(WAIT, &format!("the run of {rev} to finish"), || {
            let run = self.run_of(rev)?;
            matches!(run["state"].as_str(), Some("passed" | "failed" | "canceled")).then_some(run)
        })
    }

    fn nodes_up(&self) -> Vec<String> {
        let q = self.json(&["queue"]);
        let nodes = q["nodes"].as_array().cloned().unwrap_or_default();
        nodes.iter().filter(|n| n["up"] == true).map(|n| n["name"].as_str().unwrap().to_string()).collect()
    }
}

fn build_of(run: &Value, builder: &str) -> Value {
    run["builds"].as_array().unwrap().iter().find(|b| b["builder"] == builder).expect("the builder's build").clone()
}

/// The sandboxes a node holds for build `id`, asked over its socket (the
/// test peeks at the host's filesystem; the coordinator cannot).
fn sandboxes_of_build(node: &NodeProcess, id: &Value) -> usize {
    let url = format!("unix://{}", node.socket().display());
    let out = run(Command::new(BIN).args(["--node", &url, "sandbox", "ls", "--json"]));
    let list: Value = serde_json::from_str(&out).expect("sandbox ls --json");
    let id = id.to_string();
    list.as_array().unwrap().iter().filter(|s| s["labels"]["flotilla.build"].as_str() == Some(id.as_str())).count()
}

fn tcp_up(addr: &str) -> bool {
    let a: SocketAddr = addr.parse().unwrap();
    std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok()
}

#[test]
fn three_hosts_over_tls_spread_builds_survive_a_cut_link_and_an_etcd_restart() {
    assert!(flotilla_testkit::is_root(), "network namespaces and nodes need root (as .ci/run has)");
    let mut net = Net::new();
    let ctl = net.host("c", 2);
    let hosts: Vec<(String, String)> =
        (1..=3u8).map(|i| (net.host(&format!("n{i}"), 10 + i), net.addr(10 + i))).collect();
    let gateway: IpAddr = net.gateway().parse::<Ipv4Addr>().unwrap().into();
    let pki = flotilla_testkit::pki::Pki::new();
    let etcd_cert = pki.server("etcd", &[&net.gateway()]);
    let etcd_tls =
        flotilla_names::testing::EtcdServerTls { cert: etcd_cert.cert, key: etcd_cert.key, client_ca: pki.ca() };
    let mut etcd = flotilla_names::testing::EtcdServer::start_tls_on(gateway, etcd_tls).expect("etcd");
    let pg = flotilla_testkit::postgres::Postgres::start_tls_on(&net.gateway(), &pki);
    pg.create_database("coordinator");
    let database = pg.url_verified("coordinator");
    let client = pki.client("client", "coordinator");
    let (client_pem, client_key) = (client.cert.display().to_string(), client.key.display().to_string());
    let ca = pki.ca().display().to_string();
    let scratch = tempfile::tempdir().unwrap();

    // The name table on etcd, on host ctl, over TLS: everyone pins the
    // certificate it prints.
    let names_addr = format!("{}:7700", net.addr(2));
    let home = scratch.path().to_str().unwrap();
    let names = Proc::spawn(
        &ctl,
        &["names", "serve", "--listen", &names_addr, "--etcd", &etcd.url(), "--names-token", NAMES_TOKEN]
            .into_iter()
            .chain(["--etcd-ca", &ca, "--etcd-cert", &client_pem, "--etcd-key", &client_key])
            .chain(["--tls", "--home", home])
            .collect::<Vec<_>>(),
        scratch.path().join("names.log"),
    );
    let names_url = wait_until(WAIT, "the name table's address", || {
        let log = names.log();
        let url = log.split("name table on ").nth(1)?.split_whitespace().next()?.to_string();
        (url.starts_with("https://") && url.contains("#sha256=") && tcp_up(&names_addr)).then_some(url)
    });

    // Three nodes, each its own host: TLS only, the coordinator's client
    // certificate in place of a token, published with their fingerprint.
    let nodes: Vec<NodeProcess> = hosts
        .iter()
        .map(|(ns, addr)| {
            let listen = format!("{addr}:7443");
            NodeProcess::start_wrapped(
                Path::new(BIN),
                &["ip", "netns", "exec", ns],
                &[
                    "--listen",
                    &listen,
                    "--client-ca",
                    &ca,
                    "--names",
                    &names_url,
                    "--names-token",
                    NAMES_TOKEN,
                    "--stop-apps",
                ],
            )
        })
        .collect();
    let node_url = |i: usize| format!("https://{}:7443", hosts[i].1);

    // The coordinator on host ctl knows the name table and its client
    // certificate, and no node.
    let chome = tempfile::tempdir().unwrap();
    let coordinator_addr = format!("{}:7780", net.addr(2));
    let coordinator = Proc::spawn_logging(
        &ctl,
        &[
            "coordinator",
            "--home",
            chome.path().to_str().unwrap(),
            "--database",
            &database,
            "--names",
            &names_url,
            "--client-cert",
            &client_pem,
            "--client-key",
            &client_key,
            "--coordinator-listen",
            &coordinator_addr,
            "--node-lost-after",
            "3s",
            "--max-builds",
            "8",
        ],
        scratch.path().join("coordinator.log"),
        "info,flotilla_coordinator=debug",
    );
    let token_file = chome.path().join("coordinator/token");
    // Beyond loopback it speaks TLS: the CLI pins the certificate it printed.
    let coordinator_url = wait_until(WAIT, "the coordinator", || {
        let log = coordinator.log();
        let url = log.split("coordinator on ").nth(1)?.split_whitespace().next()?.to_string();
        (url.starts_with("https://") && url.contains("#sha256=") && tcp_up(&coordinator_addr) && token_file.exists())
            .then_some(url)
    });
    let cli = Cli {
        url: coordinator_url.clone(),
        token: std::fs::read_to_string(&token_file).unwrap().trim().to_string(),
        home: tempfile::tempdir().unwrap(),
    };
    let dump = |what: &str| {
        eprintln!("== {what}\nCOORDINATOR {}\nNAMES {}", coordinator.log(), names.log());
        for (i, n) in nodes.iter().enumerate() {
            eprintln!("NODE {} {}", i + 1, n.log());
        }
        eprintln!("QUEUE {}", cli.raw(&["queue", "--json"]).1);
        eprintln!(
            "PG {}",
            pg.psql(
                "coordinator",
                "select pid, state, wait_event_type, wait_event, left(query, 100) from pg_stat_activity"
            )
        );
    };
    let guarded = |what: &str, f: &mut dyn FnMut()| {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            dump(what);
            std::panic::resume_unwind(e);
        }
    };
    guarded("the fleet's links are encrypted", &mut || {
        // No token crosses in clear: plain HTTP gets no answer, a client
        // pinning another certificate is refused before it sends one.
        let plain = Cli {
            url: format!("http://{coordinator_addr}"),
            token: cli.token.clone(),
            home: tempfile::tempdir().unwrap(),
        };
        let (ok, _, err) = plain.raw(&["project", "ls"]);
        assert!(!ok, "plain HTTP was served: {err}");
        let pin = coordinator_url.split("#sha256=").nth(1).unwrap();
        let wrong = Cli {
            url: coordinator_url.replace(pin, &"0".repeat(64)),
            token: cli.token.clone(),
            home: tempfile::tempdir().unwrap(),
        };
        let (ok, _, err) = wrong.raw(&["project", "ls"]);
        assert!(!ok && err.contains("certificate"), "a wrong pin: {err}");
        cli.ok(&["project", "ls"]);
        // The coordinator's sessions with PostgreSQL are TLS, none plain.
        let sessions = pg.psql(
            "coordinator",
            "select s.ssl, count(*) from pg_stat_activity a join pg_stat_ssl s using (pid) \
             where a.application_name = 'flotilla-coordinator' group by s.ssl",
        );
        assert_eq!(sessions.trim().lines().next().unwrap_or_default().split('|').next(), Some("t"), "{sessions}");
        assert!(!sessions.contains("f|"), "a plain session: {sessions}");
    });
    guarded("three nodes join", &mut || {
        wait_until(WAIT, "three nodes up in the coordinator's fleet", || (cli.nodes_up().len() == 3).then_some(()));
    });
    let mut up = cli.nodes_up();
    up.sort();
    assert_eq!(up, vec![node_url(0), node_url(1), node_url(2)], "nodes are reached over TLS at their own hosts");

    // An image only the third node has.
    let rootfs = scratch.path().join("rootfs");
    flotilla_testkit::minimal_rootfs(&rootfs, &["/bin/sh", "/bin/echo", "/bin/sleep", "/bin/cat"], &[BIN]);
    let third = format!("unix://{}", nodes[2].socket().display());
    run(Command::new(BIN).args(["--node", &third, "image", "import", "only-here:1", rootfs.to_str().unwrap()]));

    // Three builders that each need a whole host: one build per node.
    let cpus = std::thread::available_parallelism().unwrap().get();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    // Each takes a whole host, so three at once use all three; the one to
    // lose runs longest, so the others' hosts are free for its retry.
    let whole = |name: &str, secs: u32| {
        format!(
            "[[builder]]\nname = \"{name}\"\ncpus = {cpus}\nenv = {{ SECS = \"{secs}\" }}\n\
             steps = [{{ name = \"work\", run = \"sh work.sh\" }}]\n\n"
        )
    };
    let special = "[[builder]]\nname = \"linux-amd64-special\"\nimage = \"only-here:1\"\nmemory = \"64MiB\"\n\
                   steps = [{ name = \"work\", run = \"sh work.sh\" }]\n";
    let config = format!("{}{}{}", whole("linux-amd64", 2), whole("linux-amd64-b", 10), whole("linux-amd64-c", 2));
    let script = "echo started; sleep ${SECS:-1}; echo done\n";
    let rev = commit(repo.path(), &[("flotilla.toml", &config), ("work.sh", script)], "three builders");
    let t0 = Instant::now();
    cli.ok(&["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1h"]);
    let mut run1 = Value::Null;
    guarded("builds spread", &mut || {
        run1 = wait_until(WAIT, "three builds running, one on each node", || {
            let run = cli.run_of(&rev)?;
            let builds = run["builds"].as_array()?;
            (builds.len() == 3 && builds.iter().all(|b| cli.log(b).starts_with("started"))).then_some(run)
        });
    });
    let commit_to_running = t0.elapsed();
    eprintln!("MULTIHOST commit (project add) to 3 builds running on 3 hosts: {} ms", commit_to_running.as_millis());
    let placed: std::collections::BTreeSet<String> =
        run1["builds"].as_array().unwrap().iter().map(|b| b["node"].as_str().unwrap().to_string()).collect();
    assert_eq!(placed.len(), 3, "builds spread over all three nodes: {run1:#}");

    // Cut the link of the node running linux-amd64-b.
    let cut_build = build_of(&run1, "linux-amd64-b");
    let cut = (0..3).find(|&i| cut_build["node"] == node_url(i)).expect("placed on a fleet node");
    net.link(&hosts[cut].0, false);
    let cut_at = Instant::now();
    guarded("the retry starts", &mut || {
        wait_until(WAIT, "the lost build's retry running on another node", || {
            let again = build_of(&cli.run_of(&rev)?, "linux-amd64-b");
            (again["attempt"] == 2 && cli.log(&again).starts_with("started")).then_some(())
        });
    });
    eprintln!(
        "MULTIHOST link cut to its build running on another host: {} ms (--node-lost-after 3s)",
        cut_at.elapsed().as_millis()
    );
    let mut done = Value::Null;
    guarded("a cut link", &mut || done = cli.finished(&rev));
    assert_eq!(done["state"], "passed", "{done:#}");
    let again = build_of(&done, "linux-amd64-b");
    assert_eq!(again["attempt"], 2, "{again:#}");
    assert_eq!(again["retry_reason"], "node lost", "{again:#}");
    assert_ne!(again["node"], node_url(cut), "{again:#}");
    assert_eq!(cli.log(&again), "started\ndone\n");
    let shown = cli.json(&["build", "show", &again["id"].to_string()]);
    let events: Vec<&str> =
        shown["timeline"].as_array().unwrap().iter().map(|t| t["event"].as_str().unwrap()).collect();
    assert!(events.contains(&"retried: node lost"), "{events:?}");
    // The cut node's sandbox for the lost attempt still exists (nothing
    // could tell it otherwise) until the link is back.
    assert_eq!(sandboxes_of_build(&nodes[cut], &cut_build["id"]), 1, "the lost attempt's sandbox ran on, cut off");

    // The link comes back: the node rejoins and the janitor reaps the lost
    // attempt's sandbox at once.
    net.link(&hosts[cut].0, true);
    guarded("the node comes back", &mut || {
        wait_until(WAIT, "the cut node up again", || cli.nodes_up().contains(&node_url(cut)).then_some(()));
        wait_until(Duration::from_secs(30), "the lost attempt's sandbox reaped", || {
            (sandboxes_of_build(&nodes[cut], &cut_build["id"]) == 0).then_some(())
        });
    });

    // A builder whose image only the third node has, twice, with etcd
    // restarted while the first runs.
    let config2 = format!("{config}{special}");
    let rev2 = commit(repo.path(), &[("flotilla.toml", &config2)], "a builder on one node's image");
    cli.ok(&["project", "poll", "demo"]);
    guarded("the special build starts", &mut || {
        wait_until(WAIT, "the special build running", || {
            let run = cli.run_of(&rev2)?;
            cli.log(&build_of(&run, "linux-amd64-special")).starts_with("started").then_some(())
        });
    });
    etcd.restart().expect("etcd starts again");
    let restarted = Instant::now();
    let names_ls = || -> Vec<Value> {
        let out = run(Command::new(BIN).args(["--names", &names_url, "names", "ls", "nodes/*", "--json"]));
        serde_json::from_str::<Vec<Value>>(&out).unwrap()
    };
    // A mount lives 30 s and is refreshed every 10 s: 11 s after the
    // restart, every one above 20 s left was written after it.
    guarded("mounts after the etcd restart", &mut || {
        wait_until(WAIT, "all three node mounts refreshed after the etcd restart", || {
            let entries = names_ls();
            let fresh = entries.iter().filter(|e| e["servers"][0]["expires_in_s"].as_f64().unwrap_or(0.0) > 20.0);
            (restarted.elapsed() > Duration::from_secs(11) && entries.len() == 3 && fresh.count() == 3).then_some(())
        });
    });
    let mut run2 = Value::Null;
    guarded("the run across the etcd restart", &mut || run2 = cli.finished(&rev2));
    assert_eq!(run2["state"], "passed", "{run2:#}");
    for b in run2["builds"].as_array().unwrap() {
        assert_eq!(b["attempt"], 1, "etcd's restart lost no build: {b:#}");
    }
    assert_eq!(build_of(&run2, "linux-amd64-special")["node"], node_url(2));
    assert_eq!(cli.nodes_up().len(), 3);

    // Once more, after the restart.
    let rev3 = commit(repo.path(), &[("work.sh", "echo started; echo done\n")], "again");
    cli.ok(&["project", "poll", "demo"]);
    let mut run3 = Value::Null;
    guarded("the run after the etcd restart", &mut || run3 = cli.finished(&rev3));
    assert_eq!(run3["state"], "passed", "{run3:#}");
    assert_eq!(build_of(&run3, "linux-amd64-special")["node"], node_url(2));
    drop(coordinator);
    drop(nodes);
    drop(names);
}
