//! Chaos: three coordinators on one PostgreSQL and two nodes, a project
//! receiving commits, while a seeded driver kill -9s coordinators (and
//! brings them back, or not for a while), freezes a node (SIGSTOP, shorter
//! and, at most twice a run, longer than `--node-lost-after`), crashes and
//! restarts PostgreSQL, and cuts a coordinator's database connections.
//! Then an invariant checker: every commit got exactly one run, which
//! passed; each build's log equals what its step printed, byte for byte;
//! no build is left running; no build sandbox is left on either node.
//!
//! `FLOTILLA_CHAOS_SEED` replays a run (the seed is printed first);
//! `FLOTILLA_CHAOS_ROUNDS` (default 12) makes a longer one.

mod common;

use common::{commit, git};

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use flotilla_testkit::{NodeProcess, wait_until};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");
const WAIT: Duration = Duration::from_secs(240);
/// The coordinators' `--node-lost-after`: short, so a freeze past it fits
/// in a round.
const NODE_LOST_AFTER: &str = "4s";

/// A small deterministic generator (xorshift64*), so a seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Coord {
    home: PathBuf,
    child: Option<Child>,
}

impl Coord {
    /// Starts it on the database at `db`, its connections named after it
    /// (so the driver can cut them), with the first node as `--node` and
    /// the others as `--fleet-node`.
    fn start(&mut self, nodes: &[PathBuf], db: &str) {
        let sock = |home: &PathBuf| format!("unix://{}", home.join("node.sock").display());
        let app = self.home.file_name().unwrap().to_str().unwrap().to_string();
        let db = format!("{db}?application_name={app}");
        std::fs::create_dir_all(&self.home).unwrap();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.home.join("coordinator.log")).unwrap();
        let _ = std::fs::remove_file(self.home.join("coordinator.sock"));
        let child = Command::new(BIN)
            .args(["coordinator", "--home"])
            .arg(&self.home)
            .args(["--coordinator-listen", "none", "--lease", "2s", "--max-log", "1G", "--database", &db])
            .args(["--node-lost-after", NODE_LOST_AFTER, "--node", &sock(&nodes[0])])
            .args(nodes[1..].iter().flat_map(|n| ["--fleet-node".to_string(), sock(n)]))
            .env("FLOTILLA_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let sock = self.home.join("coordinator.sock");
        wait_until(Duration::from_secs(30), "a coordinator's socket", || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok().then_some(())
        });
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            flotilla_testkit::stop_child(&mut c, Duration::from_secs(10));
        }
    }
}

fn json(home: &Path, args: &[&str]) -> Option<Value> {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, out, _) = common::cli(home, &a);
    if code != 0 {
        return None;
    }
    serde_json::from_str(&out).ok()
}

/// The script of commit `k`: `n` numbered lines, a little apart.
fn script(k: usize, n: u64) -> String {
    format!("i=1; while [ $i -le {n} ]; do echo \"c{k} line $i\"; i=$((i+1)); sleep 0.02; done\n")
}

fn expected(k: usize, n: u64) -> String {
    (1..=n).map(|i| format!("c{k} line {i}\n")).collect()
}

/// SIGSTOPs the node for `d`, then SIGCONTs it (even if the test fails
/// meanwhile: the guard continues it).
fn freeze(pid: u32, d: Duration) {
    struct Cont(u32);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
        }
    }
    let _ = Command::new("kill").args(["-STOP", &pid.to_string()]).status();
    let _cont = Cont(pid);
    let until = Instant::now() + d;
    wait_until(d + Duration::from_secs(5), "the freeze to last", || (Instant::now() >= until).then_some(()));
}

#[test]
fn coordinators_nodes_and_the_database_fail_yet_every_commit_is_built_once_with_its_exact_log() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let seed: u64 = std::env::var("FLOTILLA_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    let rounds: usize = std::env::var("FLOTILLA_CHAOS_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    eprintln!("chaos seed {seed} ({rounds} rounds): replay with FLOTILLA_CHAOS_SEED={seed}");
    let mut rng = Rng(seed);

    let pg = flotilla_testkit::postgres::Postgres::start();
    let db = pg.create_database("chaos");
    let nodes: Vec<NodeProcess> = (0..2).map(|_| NodeProcess::start_with(Path::new(BIN), &["--stop-apps"])).collect();
    let node_homes: Vec<PathBuf> = nodes.iter().map(|n| n.home().to_path_buf()).collect();
    let node_pids: Vec<u32> = nodes.iter().map(|n| n.pid().expect("the node runs")).collect();
    // Each long freeze may cost a build an attempt: two at most, so no
    // build runs out of them (NODE_LOST_ATTEMPTS is 3).
    let mut long_freezes = 0;
    let homes = tempfile::tempdir().unwrap();
    let mut coords: Vec<Coord> =
        (0..3).map(|i| Coord { home: homes.path().join(format!("c{i}")), child: None }).collect();
    for c in &mut coords {
        c.start(&node_homes, &db);
    }

    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"count\", run = \"sh count.sh\" }]\n";
    let mut commits: Vec<(String, String)> = Vec::new();
    let n0 = 10 + rng.below(30);
    let rev = commit(repo.path(), &[("flotilla.toml", config), ("count.sh", &script(0, n0))], "c0");
    commits.push((rev, expected(0, n0)));
    let (code, out, err) = common::cli(
        &coords[0].home,
        &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"],
    );
    assert_eq!(code, 0, "{out}{err}");
    // Adding a project builds its head only (not its history): the chaos
    // starts once that run exists, so every later commit is a push.
    let first = commits[0].0.clone();
    wait_until(WAIT, "the run of the project's head", || {
        let runs = json(&coords[0].home, &["run", "ls", "--project", "demo"])?;
        runs.as_array()?.iter().any(|r| r["change"]["rev"] == first.as_str()).then_some(())
    });

    for round in 0..rounds {
        for _ in 0..1 + rng.below(2) {
            let k = commits.len();
            let n = 10 + rng.below(40);
            let rev = commit(repo.path(), &[("count.sh", &script(k, n))], &format!("c{k}"));
            commits.push((rev, expected(k, n)));
        }
        let action = rng.below(10);
        let who = rng.below(3) as usize;
        match action {
            // Kill a coordinator; it comes back at once or in a later round.
            0..=4 => {
                if coords.iter().filter(|c| c.alive()).count() > 1 || !coords[who].alive() {
                    eprintln!("round {round}: kill -9 coordinator {who}");
                    coords[who].kill9();
                    if rng.below(2) == 0 {
                        coords[who].start(&node_homes, &db);
                    }
                }
            }
            // Bring every dead coordinator back.
            5..=6 => {
                for (i, c) in coords.iter_mut().enumerate() {
                    if !c.alive() {
                        eprintln!("round {round}: restart coordinator {i}");
                        c.start(&node_homes, &db);
                    }
                }
            }
            // Freeze a node, under --node-lost-after, or (twice at most)
            // past it: its builds are retried on the other node.
            7 => {
                let n = rng.below(2) as usize;
                let long = rng.below(2) == 0 && long_freezes < 2;
                let ms = if long { 5000 + rng.below(2000) } else { 300 + rng.below(1500) };
                long_freezes += usize::from(long);
                eprintln!("round {round}: SIGSTOP node {n} for {ms} ms");
                freeze(node_pids[n], Duration::from_millis(ms));
            }
            // Crash PostgreSQL; it is back after up to 3 s.
            8 => {
                let ms = rng.below(3000);
                eprintln!("round {round}: PostgreSQL crashes, back in {ms} ms");
                pg.crash();
                let back = Instant::now() + Duration::from_millis(ms);
                wait_until(WAIT, "the outage to last", || (Instant::now() >= back).then_some(()));
                pg.start_again();
            }
            // Cut a coordinator's database connections.
            9 => {
                let cut = pg.cut_connections(&format!("c{who}"));
                eprintln!("round {round}: cut {cut} database connections of coordinator {who}");
            }
            _ => eprintln!("round {round}: nothing"),
        }
        // Some time for things to happen, at the seed's pace.
        let pause = Duration::from_millis(200 + rng.below(1500));
        let until = Instant::now() + pause;
        wait_until(pause + Duration::from_secs(5), "the round's pause", || (Instant::now() >= until).then_some(()));
    }
    for c in coords.iter_mut() {
        if !c.alive() {
            c.start(&node_homes, &db);
        }
    }
    let home = coords[0].home.clone();
    let _ = common::cli(&home, &["project", "poll", "demo"]);

    let report = |why: &str| {
        let logs: String = coords
            .iter()
            .map(|c| {
                format!(
                    "--- {}\n{}",
                    c.home.display(),
                    std::fs::read_to_string(c.home.join("coordinator.log")).unwrap_or_default()
                )
            })
            .collect();
        format!("seed {seed}: {why}\n{logs}")
    };
    // Every commit: exactly one run, finished.
    let wait = || {
        wait_until(WAIT, "a finished run of every commit", || {
            let runs = json(&home, &["run", "ls", "--project", "demo", "--limit", "200"])?;
            let runs = runs.as_array()?.clone();
            let done = commits.iter().all(|(rev, _)| {
                runs.iter().any(|r| {
                    r["change"]["rev"] == rev.as_str()
                        && matches!(r["state"].as_str(), Some("passed" | "failed" | "canceled"))
                })
            });
            done.then_some(runs)
        })
    };
    let runs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(wait)).unwrap_or_else(|e| {
        let runs = json(&home, &["run", "ls", "--project", "demo", "--limit", "200"]);
        let missing: Vec<String> = commits
            .iter()
            .enumerate()
            .filter(|(_, (rev, _))| {
                !runs
                    .as_ref()
                    .and_then(|r| r.as_array())
                    .is_some_and(|r| r.iter().any(|r| r["change"]["rev"] == rev.as_str()))
            })
            .map(|(k, _)| format!("c{k}"))
            .collect();
        eprintln!("{}", report(&format!("commits without a run: {missing:?}\nruns: {runs:#?}")));
        eprintln!("PROJECT {:#?}", json(&home, &["project", "show", "demo", "--log", "30"]));
        std::panic::resume_unwind(e)
    });
    for (k, (rev, want)) in commits.iter().enumerate() {
        let mine: Vec<&Value> = runs.iter().filter(|r| r["change"]["rev"] == rev.as_str()).collect();
        assert_eq!(mine.len(), 1, "{}", report(&format!("commit c{k} has {} runs", mine.len())));
        let run = mine[0];
        assert_eq!(run["state"], "passed", "{}", report(&format!("commit c{k}: {run:#}")));
        let b = &run["builds"][0];
        let out = Command::new(BIN)
            .args(["build", "log", &b["id"].to_string()])
            .env("FLOTILLA_HOME", &home)
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(&got, want, "{}", report(&format!("commit c{k}: build {} log differs", b["id"])));
    }
    // Nothing left running, no sandbox left behind.
    wait_until(WAIT, "every build sandbox to be gone", || {
        node_homes
            .iter()
            .all(|h| {
                json(h, &["sandbox", "ls"]).is_some_and(|l| {
                    !l.as_array()
                        .is_some_and(|l| l.iter().any(|s| s["name"].as_str().is_some_and(|n| n.starts_with("build-"))))
                })
            })
            .then_some(())
    });
    let queue = json(&home, &["run", "ls", "--project", "demo", "--limit", "200"]).unwrap();
    assert!(!queue.as_array().unwrap().iter().any(|r| r["state"] == "running"), "{}", report("a run still running"));
    eprintln!("chaos seed {seed}: {} commits, every one built once with its exact log", commits.len());
    drop(coords);
    drop(nodes);
    drop(pg);
}
