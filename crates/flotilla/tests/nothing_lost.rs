//! Nothing lost, through the real binary: every byte a fast-printing step
//! writes is stored (sha256 against the same bytes made here), with a
//! follower connected and with the coordinator killed mid-output; a step
//! that ended while its coordinator was down is judged by its real exit;
//! every commit of a push gets a run, in commit order; a dead
//! coordinator's build is adopted by a peer on the same PostgreSQL; and a
//! coordinator rides out its database connections cut and the database
//! crashed mid-build; and a try accepted by one coordinator is built by
//! another, which never saw its patch.

mod common;

use common::{CoordinatorProcess, build_of, cli_ok, commit, git, json};

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_testkit::{NodeProcess, wait_until};
use serde_json::Value;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");
const WAIT: Duration = Duration::from_secs(180);

/// The run of `rev` in `project`, once `done` says so of it.
fn run_of(home: &Path, rev: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_until(WAIT, what, || {
        let runs = json(home, &["run", "ls", "--project", "demo", "--limit", "100"]);
        let run = runs.as_array()?.iter().find(|r| r["change"]["rev"] == rev)?.clone();
        done(&run).then_some(run)
    })
}

fn finished(run: &Value) -> bool {
    matches!(run["state"].as_str(), Some("passed" | "failed" | "canceled"))
}

/// Length and sha256 of a build's stored log, read through the CLI.
fn stored_log(home: &Path, id: &Value) -> (u64, String) {
    let out = Command::new(BIN)
        .args(["build", "log", &id.to_string()])
        .env("FLOTILLA_HOME", home)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "build log {id} failed");
    (out.stdout.len() as u64, hex(&Sha256::digest(&out.stdout)))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Length and sha256 of the bytes `fill` writes (what a step prints).
fn expected(fill: impl FnOnce(&mut dyn FnMut(&[u8]))) -> (u64, String) {
    let mut h = Sha256::new();
    let mut n = 0u64;
    fill(&mut |b: &[u8]| {
        n += b.len() as u64;
        h.update(b);
    });
    (n, hex(&h.finalize()))
}

/// `yes | head -c N`.
fn yes(n: usize) -> (u64, String) {
    expected(|w| {
        let block = b"y\n".repeat(32 << 10);
        let mut left = n;
        while left > 0 {
            let k = left.min(block.len());
            w(&block[..k]);
            left -= k;
        }
    })
}

/// `seq 1 N`.
fn seq(n: u64) -> (u64, String) {
    expected(|w| {
        let mut buf = String::with_capacity(1 << 20);
        for i in 1..=n {
            buf.push_str(&i.to_string());
            buf.push('\n');
            if buf.len() > (1 << 20) - 32 {
                w(buf.as_bytes());
                buf.clear();
            }
        }
        w(buf.as_bytes());
    })
}

/// N bytes of `a` and no newline.
fn one_line(n: usize) -> (u64, String) {
    expected(|w| {
        let block = vec![b'a'; 1 << 20];
        let mut left = n;
        while left > 0 {
            let k = left.min(block.len());
            w(&block[..k]);
            left -= k;
        }
    })
}

const YES_BYTES: usize = 200_000_000;
const SEQ_TO: u64 = 23_000_000;
const LINE_BYTES: usize = 50_000_000;

/// A follower: `build log ID --follow`, hashed as it reads.
fn follower(home: &Path, id: &Value) -> std::thread::JoinHandle<(u64, String)> {
    let mut child = Command::new(BIN)
        .args(["build", "log", &id.to_string(), "--follow"])
        .env("FLOTILLA_HOME", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    std::thread::spawn(move || {
        let mut out = child.stdout.take().unwrap();
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let k = out.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            n += k as u64;
            h.update(&buf[..k]);
        }
        let _ = child.wait();
        (n, hex(&h.finalize()))
    })
}

#[test]
fn fast_output_is_stored_byte_for_byte_with_and_without_a_follower() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let dev =
        NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "none", "--stop-apps", "--max-log", "1G"]);
    let home = dev.home().to_path_buf();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config = format!(
        "[[builder]]\nname = \"linux-amd64-yes\"\nsteps = [{{ name = \"yes\", run = \"yes | head -c {YES_BYTES}\" }}]\n\
         [[builder]]\nname = \"linux-amd64-seq\"\nsteps = [{{ name = \"seq\", run = \"seq 1 {SEQ_TO}\" }}]\n\
         [[builder]]\nname = \"linux-amd64-line\"\n\
         steps = [{{ name = \"line\", run = \"head -c {LINE_BYTES} /dev/zero | tr '\\\\0' a\" }}]\n"
    );
    let rev = commit(repo.path(), &[("flotilla.toml", &config)], "loud");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    // A follower on the yes build from its start.
    let run = run_of(&home, &rev, "the run to start", |r| r["builds"].as_array().is_some_and(|b| b.len() == 3));
    let follow = follower(&home, &build_of(&run, "linux-amd64-yes")["id"]);
    let run = run_of(&home, &rev, "the run to finish", finished);
    assert_eq!(run["state"], "passed", "{run:#}");
    let want = [
        ("linux-amd64-yes", yes(YES_BYTES)),
        ("linux-amd64-seq", seq(SEQ_TO)),
        ("linux-amd64-line", one_line(LINE_BYTES)),
    ];
    for (builder, want) in &want {
        let b = build_of(&run, builder);
        let shown = json(&home, &["build", "show", &b["id"].to_string()]);
        assert_eq!(shown["log_bytes"].as_u64(), Some(want.0), "{builder}: {shown:#}");
        assert!(
            !shown["timeline"].as_array().unwrap().iter().any(|t| t["event"] == "log_gap"),
            "{builder}: a gap on the timeline: {shown:#}"
        );
        assert_eq!(&stored_log(&home, &b["id"]), want, "{builder}: the stored log differs from the step's output");
    }
    assert_eq!(follow.join().unwrap(), want[0].1, "the follower read other bytes than the step wrote");
}

/// The step-0 process of a build's sandbox, as the node lists it.
fn step_process(node_home: &Path, build: &Value) -> Option<Value> {
    let ps = json(node_home, &["sandbox", "ps", &format!("build-{build}")]);
    ps.as_array()?.iter().find(|p| p["id"] == "step-0").cloned()
}

#[test]
fn a_coordinator_killed_mid_output_holds_the_step_back_and_loses_nothing() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let node = NodeProcess::start_with(Path::new(BIN), &["--stop-apps"]);
    let home = node.home().to_path_buf();
    let mut coordinator = CoordinatorProcess::start(&home, &home, &["--max-log", "1G"]);
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config =
        format!("[[builder]]\nname = \"linux-amd64\"\nsteps = [{{ name = \"seq\", run = \"seq 1 {SEQ_TO}\" }}]\n");
    let rev = commit(repo.path(), &[("flotilla.toml", &config)], "seq");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    let build = wait_until(WAIT, "the build to store 10 MB", || {
        let run = run_of(&home, &rev, "the run", |_| true);
        let b = build_of(&run, "linux-amd64");
        let shown = json(&home, &["build", "show", &b["id"].to_string()]);
        (shown["log_bytes"].as_u64()? > 10 << 20).then_some(b["id"].clone())
    });
    coordinator.kill9();
    // With nobody storing its output the step is held back, not drained
    // into a ring that drops: it stops writing and does not end.
    // Stopped growing: the same end seen across 300 ms of polls.
    let mut since: Option<(u64, Instant)> = None;
    let held = wait_until(WAIT, "the step's output to stop growing", || {
        let p = step_process(&home, &build)?;
        let end = p["output_end"].as_u64()?;
        match since {
            Some((e, at)) if e == end => (at.elapsed() >= Duration::from_millis(300)).then_some(p),
            _ => {
                since = Some((end, Instant::now()));
                None
            }
        }
    });
    assert_eq!(held["state"], "running", "the step ended while its output was unread: {held:#}");
    // What it keeps is bounded (acknowledged bytes go first).
    let kept = held["output_end"].as_u64().unwrap() - held["output_start"].as_u64().unwrap();
    assert!(kept <= (8 << 20) + (64 << 10), "{held:#}");
    assert!(held["output_end"].as_u64().unwrap() < seq(SEQ_TO).0, "{held:#}");
    let _coordinator = CoordinatorProcess::start(&home, &home, &["--max-log", "1G"]);
    let run = run_of(&home, &rev, "the run to finish", finished);
    assert_eq!(run["state"], "passed", "{run:#}");
    let b = build_of(&run, "linux-amd64");
    assert_eq!(b["attempt"], 1, "{b:#}");
    assert_eq!(stored_log(&home, &b["id"]), seq(SEQ_TO));
}

#[test]
fn a_step_that_ended_while_its_coordinator_was_down_is_judged_by_its_exit() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let node = NodeProcess::start_with(Path::new(BIN), &["--stop-apps"]);
    let home = node.home().to_path_buf();
    let mut coordinator = CoordinatorProcess::start(&home, &home, &[]);
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config = "[[builder]]\nname = \"linux-amd64\"\ntimeout = \"4s\"\n\
                  steps = [{ name = \"short\", run = \"echo start; sleep 1; echo done\" }]\n";
    let rev = commit(repo.path(), &[("flotilla.toml", config)], "short");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    let build = wait_until(WAIT, "the step to start", || {
        let run = run_of(&home, &rev, "the run", |_| true);
        let b = build_of(&run, "linux-amd64");
        step_process(&home, &b["id"]).map(|_| b["id"].clone())
    });
    let down = Instant::now();
    coordinator.kill9();
    wait_until(WAIT, "the step to end", || (step_process(&home, &build)?["state"] == "exited").then_some(()));
    // The outage outlasts the build's timeout.
    wait_until(WAIT, "the outage to outlast the timeout", || (down.elapsed() > Duration::from_secs(6)).then_some(()));
    let _coordinator = CoordinatorProcess::start(&home, &home, &[]);
    let run = run_of(&home, &rev, "the run to finish", finished);
    assert_eq!(run["state"], "passed", "{run:#}");
    let b = build_of(&run, "linux-amd64");
    assert_eq!(stored_log(&home, &b["id"]).0, "start\ndone\n".len() as u64);
}

#[test]
fn a_log_past_the_cap_says_where_it_was_cut_and_the_step_runs_on() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let dev =
        NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "none", "--stop-apps", "--max-log", "1M"]);
    let home = dev.home().to_path_buf();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config = "[[builder]]\nname = \"linux-amd64\"\n\
                  steps = [{ name = \"loud\", run = \"seq 1 3000000\" }, { name = \"after\", run = \"echo after\" }]\n";
    let rev = commit(repo.path(), &[("flotilla.toml", config)], "loud");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    let run = run_of(&home, &rev, "the run to finish", finished);
    assert_eq!(run["state"], "passed", "{run:#}");
    let b = build_of(&run, "linux-amd64");
    let shown = json(&home, &["build", "show", &b["id"].to_string()]);
    assert!(shown["timeline"].as_array().unwrap().iter().any(|t| t["event"] == "log_cut"), "{shown:#}");
    let out =
        Command::new(BIN).args(["build", "log", &b["id"].to_string()]).env("FLOTILLA_HOME", &home).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.len() < (1 << 20) + 200, "{} bytes stored", text.len());
    assert!(text.ends_with("the step's further output is not kept]\n"), "{}", &text[text.len() - 200..]);
    assert!(text.starts_with("1\n2\n3\n"));
}

#[test]
fn every_commit_of_a_push_gets_a_run_in_commit_order_unless_the_config_says_head() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let dev = NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "none", "--stop-apps"]);
    let home = dev.home().to_path_buf();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"t\", run = \"true\" }]\n";
    let first = commit(repo.path(), &[("flotilla.toml", config)], "first");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    run_of(&home, &first, "the first run", finished);
    // 30 commits in one push (the poller sees them at once).
    git(repo.path(), &["checkout", "-q", "-b", "work"]);
    let revs: Vec<String> =
        (0..30).map(|i| commit(repo.path(), &[("n.txt", &i.to_string())], &format!("commit {i}"))).collect();
    git(repo.path(), &["checkout", "-q", "main"]);
    git(repo.path(), &["merge", "-q", "--ff-only", "work"]);
    cli_ok(&home, &["project", "poll", "demo"]);
    let runs = wait_until(WAIT, "a run of each of the 30 commits", || {
        let runs = json(&home, &["run", "ls", "--project", "demo", "--limit", "100"]);
        let runs = runs.as_array()?.clone();
        (runs.len() == 31 && runs.iter().all(finished)).then_some(runs)
    });
    let mut by_id: Vec<(u64, String)> =
        runs.iter().map(|r| (r["id"].as_u64().unwrap(), r["change"]["rev"].as_str().unwrap().to_string())).collect();
    by_id.sort();
    let order: Vec<&str> = by_id.iter().skip(1).map(|(_, rev)| rev.as_str()).collect();
    assert_eq!(order, revs.iter().map(String::as_str).collect::<Vec<_>>(), "runs are numbered in commit order");

    // `commits = "head"`: a push of three builds its newest only, and the
    // project says so.
    let head_config = format!("[triggers]\ncommits = \"head\"\n{config}");
    commit(repo.path(), &[("flotilla.toml", &head_config)], "head only");
    commit(repo.path(), &[("n.txt", "a")], "a");
    let newest = commit(repo.path(), &[("n.txt", "b")], "b");
    cli_ok(&home, &["project", "poll", "demo"]);
    run_of(&home, &newest, "the newest commit's run", finished);
    let runs = json(&home, &["run", "ls", "--project", "demo", "--limit", "100"]);
    assert_eq!(runs.as_array().unwrap().len(), 32, "only the push's head gets a run: {runs:#}");
    assert_eq!(json(&home, &["project", "show", "demo"])["commits"], "head");
}

#[test]
fn a_dead_coordinators_build_is_adopted_by_a_peer_and_finishes_once() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let pg = flotilla_testkit::postgres::Postgres::start();
    let url = pg.create_database("adopt");
    let node = NodeProcess::start_with(Path::new(BIN), &["--stop-apps"]);
    let node_home = node.home().to_path_buf();
    let homes = tempfile::tempdir().unwrap();
    let (home_a, home_b) = (homes.path().join("a"), homes.path().join("b"));
    let lease = ["--database", url.as_str(), "--lease", "3s"];
    let mut a = CoordinatorProcess::start(&home_a, &node_home, &lease);
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let script = "for i in $(seq 1 60); do echo \"line $i\"; sleep 0.1; done\n";
    let config = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"count\", run = \"sh count.sh\" }]\n";
    let rev = commit(repo.path(), &[("flotilla.toml", config), ("count.sh", script)], "count");
    cli_ok(&home_a, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    wait_until(WAIT, "the build to print", || {
        let run = run_of(&home_a, &rev, "the run", |_| true);
        let b = build_of(&run, "linux-amd64");
        let log = Command::new(BIN).args(["build", "log", &b["id"].to_string()]).env("FLOTILLA_HOME", &home_a).output();
        String::from_utf8_lossy(&log.ok()?.stdout).contains("line 3\n").then_some(())
    });
    // B joins after the project was added through A, and A dies.
    let b = CoordinatorProcess::start(&home_b, &node_home, &lease);
    a.kill9();
    let run = run_of(&home_b, &rev, "the adopted build to finish", finished);
    assert_eq!(run["state"], "passed", "{run:#}\nA:\n{}\nB:\n{}", a.log(), b.log());
    let metrics = b.get("/metrics").expect("B's /metrics");
    for line in [
        "flotilla_coordinator_lease_adoptions_total 1\n",
        "flotilla_coordinator_builds_finished_total{state=\"passed\"} 1\n",
        "flotilla_coordinator_nodes{state=\"up\"} 1\n",
        "flotilla_coordinator_builds{state=\"running\",priority=\"post-submit\"} 0\n",
    ] {
        assert!(metrics.contains(line), "B's /metrics lacks {line:?}:\n{metrics}");
    }
    let build = build_of(&run, "linux-amd64");
    assert_eq!(build["attempt"], 1, "adopted, not retried: {build:#}");
    let shown = json(&home_b, &["build", "show", &build["id"].to_string()]);
    assert!(shown["timeline"].as_array().unwrap().iter().any(|t| t["event"] == "adopted"), "{shown:#}");
    let expected: String = (1..=60).map(|i| format!("line {i}\n")).collect();
    let (n, sha) = stored_log(&home_b, &build["id"]);
    assert_eq!((n, sha), (expected.len() as u64, hex(&Sha256::digest(expected.as_bytes()))));
    // B polls the project A added: a new commit is built with A gone.
    let next = commit(repo.path(), &[("count.sh", "echo next\n")], "next");
    let run = run_of(&home_b, &next, "the next commit's run", finished);
    assert_eq!(run["state"], "passed", "{run:#}");
    drop(b);
    drop(node);
    drop(pg);
}

#[test]
fn a_coordinator_rides_out_cut_database_connections_and_a_database_crash() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let pg = flotilla_testkit::postgres::Postgres::start();
    // Its connections are named, so the test can cut this coordinator's.
    let url = format!("{}?application_name=rider", pg.create_database("ride"));
    let node = NodeProcess::start_with(Path::new(BIN), &["--stop-apps"]);
    let node_home = node.home().to_path_buf();
    let home = tempfile::tempdir().unwrap();
    let a = CoordinatorProcess::start(home.path(), &node_home, &["--database", url.as_str(), "--lease", "3s"]);
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let script = "for i in $(seq 1 100); do echo \"line $i\"; sleep 0.1; done\n";
    let config = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"count\", run = \"sh count.sh\" }]\n";
    let rev = commit(repo.path(), &[("flotilla.toml", config), ("count.sh", script)], "count");
    cli_ok(home.path(), &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    let log_has = |line: &str| {
        let run = run_of(home.path(), &rev, "the run", |_| true);
        let b = build_of(&run, "linux-amd64");
        let log =
            Command::new(BIN).args(["build", "log", &b["id"].to_string()]).env("FLOTILLA_HOME", home.path()).output();
        String::from_utf8_lossy(&log.ok()?.stdout).contains(line).then_some(())
    };
    wait_until(WAIT, "the build to print", || log_has("line 3\n"));
    // Its connections cut, twice, while the step prints.
    for _ in 0..2 {
        let cut = pg.cut_connections("rider");
        assert!(cut > 0, "the coordinator holds connections to cut");
        let more = Instant::now() + Duration::from_millis(700);
        wait_until(WAIT, "a moment of output", || (Instant::now() >= more).then_some(()));
    }
    // The database crashes and is down for 4 s (past the lease) mid-step.
    pg.crash();
    let back = Instant::now() + Duration::from_secs(4);
    wait_until(WAIT, "the outage to last", || (Instant::now() >= back).then_some(()));
    pg.start_again();
    let run = run_of(home.path(), &rev, "the build to finish", finished);
    assert_eq!(run["state"], "passed", "{run:#}\n{}", a.log());
    let build = build_of(&run, "linux-amd64");
    assert_eq!(build["attempt"], 1, "resumed, not retried: {build:#}");
    let expected: String = (1..=100).map(|i| format!("line {i}\n")).collect();
    let (n, sha) = stored_log(home.path(), &build["id"]);
    assert_eq!((n, sha), (expected.len() as u64, hex(&Sha256::digest(expected.as_bytes()))), "{}", a.log());
    let metrics = a.get("/metrics").expect("/metrics");
    assert!(metrics.contains("flotilla_coordinator_store_retries_total{task="), "no store retry counted:\n{metrics}");
    drop(a);
    drop(node);
    drop(pg);
}

#[test]
fn a_try_accepted_by_one_coordinator_is_built_by_another() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let pg = flotilla_testkit::postgres::Postgres::start();
    let url = pg.create_database("trypeer");
    let node = NodeProcess::start_with(Path::new(BIN), &["--stop-apps"]);
    let homes = tempfile::tempdir().unwrap();
    let (home_a, home_b) = (homes.path().join("a"), homes.path().join("b"));
    // A's only node does not exist: A accepts the try, B (with the real
    // node) is the one that can build it.
    let nowhere = homes.path().join("nowhere");
    let a = CoordinatorProcess::start(&home_a, &nowhere, &["--database", url.as_str()]);
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"cat\", run = \"cat hello.txt\" }]\n";
    commit(repo.path(), &[("flotilla.toml", config), ("hello.txt", "base\n")], "base");
    cli_ok(&home_a, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    let b = CoordinatorProcess::start(&home_b, node.home(), &["--database", url.as_str()]);
    std::fs::write(repo.path().join("hello.txt"), "patched\n").unwrap();
    let diff = git(repo.path(), &["diff"]);
    git(repo.path(), &["checkout", "--", "."]);
    let patch = repo.path().join("fix.patch");
    std::fs::write(&patch, format!("{diff}\n")).unwrap();
    let out = json(&home_a, &["try", "--project", "demo", "--patch", patch.to_str().unwrap()]);
    let run_id = out["run_id"].as_u64().unwrap_or_else(|| panic!("{out}"));
    let run = wait_until(WAIT, "the try run", || {
        let r = json(&home_b, &["run", "show", &run_id.to_string()]);
        finished(&r).then_some(r)
    });
    assert_eq!(run["state"], "passed", "{run:#}\nA:\n{}\nB:\n{}", a.log(), b.log());
    let build = build_of(&run, "linux-amd64");
    let (_, sha) = stored_log(&home_b, &build["id"]);
    assert_eq!(sha, hex(&Sha256::digest(b"patched\n")));
    drop(a);
    drop(b);
    drop(node);
    drop(pg);
}
