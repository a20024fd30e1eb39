//! The coordinator end to end, through the real binary: `flotilla dev`, a
//! local git repository with a `flotilla.toml` of two builders,
//! `project add`, commits that pass, fail, are canceled and retried, a
//! try of a patch, and a `kill -9` of the whole dev process mid-build after
//! which the build finishes once with a byte-identical log.

mod common;

use common::{CoordinatorProcess, build_of, cli_ok, commit, git, json};

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_testkit::{NodeProcess, wait_until};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");
const WAIT: Duration = Duration::from_secs(90);

fn cli(home: &Path, args: &[&str]) -> (i32, String, String) {
    common::cli(home, args)
}

/// The run of commit `rev`, once it reaches a final state.
fn finished_run(dev: &NodeProcess, rev: &str) -> Value {
    let home = dev.home();
    let wait = || {
        wait_until(WAIT, &format!("the run of {rev} to finish"), || {
            let runs = json(home, &["run", "ls", "--project", "demo", "--limit", "50"]);
            let run = runs.as_array()?.iter().find(|r| r["change"]["rev"] == rev)?.clone();
            matches!(run["state"].as_str(), Some("passed" | "failed" | "canceled")).then_some(run)
        })
    };
    std::panic::catch_unwind(wait).unwrap_or_else(|e| {
        eprintln!("DEVLOG {}", std::fs::read_to_string(home.join("node.log")).unwrap_or_default());
        eprintln!("RUNS {}", cli(home, &["run", "ls", "--project", "demo", "--json"]).1);
        eprintln!("QUEUE {}", cli(home, &["queue", "--json"]).1);
        std::panic::resume_unwind(e)
    })
}

fn log(home: &Path, build: &Value) -> String {
    cli_ok(home, &["build", "log", &build["id"].to_string()])
}

const CONFIG: &str = r#"
[triggers]
branches = ["main"]

[[builder]]
name = "linux-amd64"
timeout = "5m"
steps = [
  { name = "build", run = "sh build.sh" },
  { name = "test", run = "sh test.sh" },
]

[[builder]]
name = "linux-amd64-race"
env = { MODE = "race" }
steps = [{ name = "test", run = "sh test.sh" }]
"#;

#[test]
fn commits_become_builds_that_pass_fail_cancel_retry_and_survive_a_crash() {
    full_cycle(&[]);
}

/// The same on PostgreSQL (a throwaway cluster on loopback).
#[test]
fn the_same_on_postgresql() {
    let pg = flotilla_testkit::postgres::Postgres::start();
    let url = pg.create_database("coordinator");
    full_cycle(&["--database", &url]);
    drop(pg);
}

fn full_cycle(extra: &[&str]) {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let mut args = vec!["--coordinator-listen", "127.0.0.1:0", "--stop-apps"];
    args.extend_from_slice(extra);
    let dev = NodeProcess::start_dev(Path::new(BIN), &args);
    let home = dev.home().to_path_buf();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let good = commit(
        repo.path(),
        &[
            ("flotilla.toml", CONFIG),
            ("build.sh", "echo building in $(pwd)\nls flotilla.toml\n"),
            ("test.sh", "echo \"testing mode=${MODE:-plain}\"\ntest 2 -eq $((1 + 1))\n"),
        ],
        "a passing commit",
    );

    // project add: the branch head is built at once, by both builders.
    let out =
        cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    assert_eq!(out.trim(), "demo");
    let run = finished_run(&dev, &good);
    assert_eq!(run["state"], "passed", "{run:#}");
    let plain = build_of(&run, "linux-amd64");
    let race = build_of(&run, "linux-amd64-race");
    assert_eq!(plain["state"], "passed");
    assert_eq!(race["state"], "passed");
    assert_eq!(log(&home, &plain), "building in /workspace\nflotilla.toml\ntesting mode=plain\n");
    assert_eq!(log(&home, &race), "testing mode=race\n");
    // The timeline names every step, in order.
    let shown = json(&home, &["build", "show", &plain["id"].to_string()]);
    let events: Vec<&str> =
        shown["timeline"].as_array().unwrap().iter().map(|t| t["event"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        [
            "sandbox_create_requested",
            "sandbox_created",
            "agent_up",
            "start_write_tar",
            "end_write_tar",
            "start_step",
            "end_step",
            "start_step",
            "end_step",
            "sandbox_deleted"
        ],
        "{shown:#}"
    );
    let human = cli_ok(&home, &["build", "show", &plain["id"].to_string()]);
    assert!(human.contains("start_step") && human.contains("test exit 0"), "{human}");

    // A commit that breaks the test fails, naming the step and quoting it.
    let bad = commit(
        repo.path(),
        &[("test.sh", "echo on stderr >&2\necho FAIL: expected 4, got 5\nexit 3\n")],
        "a breaking commit",
    );
    let run = finished_run(&dev, &bad);
    assert_eq!(run["state"], "failed", "{run:#}");
    let b = build_of(&run, "linux-amd64");
    assert_eq!(b["failure"]["step"], "test", "{b:#}");
    assert!(b["failure"]["message"].as_str().unwrap().contains("exit 3"), "{b:#}");
    let last = b["failure"]["last_lines"].to_string();
    assert!(
        last.contains("FAIL: expected 4, got 5") && last.contains("on stderr"),
        "stdout and stderr are both kept: {b:#}"
    );
    let failed_run = run["id"].as_u64().unwrap();

    // Retry: a new attempt, visible as such (and failing again, the same way).
    let retried = json(&home, &["run", "retry", &failed_run.to_string()]);
    assert_eq!(retried["builds"].as_array().unwrap().len(), 2, "{retried}");
    let again = wait_until(WAIT, "the retried run to finish", || {
        let r = json(&home, &["run", "show", &failed_run.to_string()]);
        (r["state"] == "failed" && r["builds"].as_array()?.len() == 4).then_some(r)
    });
    let second: Vec<&Value> = again["builds"].as_array().unwrap().iter().filter(|b| b["attempt"] == 2).collect();
    assert_eq!(second.len(), 2, "{again:#}");
    for b in second {
        assert_eq!(b["retry_reason"], "retried by hand");
        assert!(b["retry_of"].as_u64().is_some());
    }

    // Cancel: a build stuck in a long step is stopped and its sandbox goes.
    let slow = commit(repo.path(), &[("test.sh", "echo waiting\nsleep 300\n")], "a slow commit");
    let (run_id, build_id) = wait_until(WAIT, "the slow build to start its step", || {
        let runs = json(&home, &["run", "ls", "--project", "demo"]);
        let run = runs.as_array()?.iter().find(|r| r["change"]["rev"] == slow.as_str())?.clone();
        let b = build_of(&run, "linux-amd64-race");
        let shown = json(&home, &["build", "show", &b["id"].to_string()]);
        shown["timeline"]
            .as_array()?
            .iter()
            .any(|t| t["event"] == "start_step")
            .then(|| (run["id"].as_u64().unwrap(), b["id"].as_u64().unwrap()))
    });
    cli_ok(&home, &["run", "cancel", &run_id.to_string()]);
    let run = finished_run(&dev, &slow);
    assert_eq!(run["state"], "canceled", "{run:#}");
    let b = json(&home, &["build", "show", &build_id.to_string()]);
    assert!(b["timeline"].as_array().unwrap().iter().any(|t| t["event"] == "canceled"), "{b:#}");
    wait_until(WAIT, "the canceled build's sandbox to be deleted", || {
        let list = json(&home, &["sandbox", "ls"]);
        (!list.as_array()?.iter().any(|s| s["name"] == format!("build-{build_id}"))).then_some(())
    });

    // kill -9 mid-build: the build goes on, is re-attached, finishes once,
    // and its log is exactly the step's output.
    let script = "for i in $(seq 1 30); do echo \"line $i\"; sleep 0.1; done\n";
    let crashy = commit(repo.path(), &[("test.sh", script)], "a commit the coordinator crashes under");
    let build = wait_until(WAIT, "the crashy build to print", || {
        let runs = json(&home, &["run", "ls", "--project", "demo"]);
        let run = runs.as_array()?.iter().find(|r| r["change"]["rev"] == crashy.as_str())?.clone();
        let b = build_of(&run, "linux-amd64-race");
        log(&home, &b).contains("line 3\n").then_some(b)
    });
    let mut dev = dev;
    dev.kill9();
    dev.start_again();
    let run = finished_run(&dev, &crashy);
    assert_eq!(run["state"], "passed", "{run:#}");
    let b = build_of(&run, "linux-amd64-race");
    assert_eq!(b["id"], build["id"], "the same build finished: not a retry");
    assert_eq!(b["attempt"], 1);
    let expected: String = (1..=30).map(|i| format!("line {i}\n")).collect();
    assert_eq!(log(&home, &b), expected, "the log has no gap and no repeat");
    let shown = json(&home, &["build", "show", &b["id"].to_string()]);
    let starts = shown["timeline"].as_array().unwrap().iter().filter(|t| t["event"] == "start_step").count();
    assert_eq!(starts, 1, "the step ran once: {shown:#}");
    assert!(shown["timeline"].as_array().unwrap().iter().any(|t| t["event"] == "reattached"), "{shown:#}");
}

#[test]
fn a_try_builds_a_patch_and_the_config_is_checked() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let dev = NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "127.0.0.1:0", "--stop-apps"]);
    let home = dev.home().to_path_buf();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let bad_config = "[[builder]]\nname = \"linux_amd64\"\nsteps = [{ name = \"t\", run = \"true\" }]\n";
    let head = commit(repo.path(), &[("flotilla.toml", bad_config), ("hello.txt", "hello\n")], "a bad config");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    // A config that does not parse fails the run, saying why.
    let run = finished_run(&dev, &head);
    assert_eq!(run["state"], "failed");
    assert!(run["error"].as_str().unwrap().contains("linux_amd64"), "{run:#}");
    let p = json(&home, &["project", "show", "demo"]);
    assert!(p["config_error"].as_str().unwrap_or_default().contains("linux_amd64"), "{p:#}");

    // A try of a patch that fixes it: built with the patched config.
    let fixed = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"cat\", run = \"cat hello.txt\" }]\n";
    std::fs::write(repo.path().join("flotilla.toml"), fixed).unwrap();
    std::fs::write(repo.path().join("hello.txt"), "patched\n").unwrap();
    let diff = git(repo.path(), &["diff"]);
    git(repo.path(), &["checkout", "--", "."]);
    let patch = repo.path().join("fix.patch");
    std::fs::write(&patch, format!("{diff}\n")).unwrap();
    let out = json(&home, &["try", "--project", "demo", "--patch", patch.to_str().unwrap()]);
    let run_id = out["run_id"].as_u64().unwrap_or_else(|| panic!("{out}"));
    let run = wait_until(WAIT, "the try run", || {
        let r = json(&home, &["run", "show", &run_id.to_string()]);
        matches!(r["state"].as_str(), Some("passed" | "failed")).then_some(r)
    });
    assert_eq!(run["state"], "passed", "{run:#}");
    assert_eq!(run["change"]["kind"], "try");
    assert_eq!(log(&home, &build_of(&run, "linux-amd64")), "patched\n");
    // A patch that does not apply is refused with git's reason.
    std::fs::write(&patch, "--- a/nope.txt\n+++ b/nope.txt\n@@ -1 +1 @@\n-x\n+y\n").unwrap();
    let (code, _, err) = cli(&home, &["try", "--project", "demo", "--patch", patch.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("nope.txt"), "{err}");
    // The project manager's log says what each step decided.
    let p = json(&home, &["project", "show", "demo", "--log", "20"]);
    let reasons = p["log"].to_string();
    assert!(reasons.contains("create run"), "{reasons}");

    // Removed, then added again: watched again, and nothing is built twice.
    cli_ok(&home, &["project", "rm", "demo"]);
    assert_eq!(json(&home, &["project", "show", "demo"])["status"], "removed");
    let (code, _, err) = cli(&home, &["project", "rm", "demo"]);
    assert_ne!(code, 0, "removing twice says so");
    assert!(err.contains("demo"), "{err}");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    let next = commit(repo.path(), &[("flotilla.toml", fixed), ("hello.txt", "again\n")], "after re-adding");
    let run = finished_run(&dev, &next);
    assert_eq!(run["state"], "passed", "{run:#}");
    let runs = json(&home, &["run", "ls", "--project", "demo", "--limit", "50"]);
    let of_head = runs.as_array().unwrap().iter().filter(|r| r["change"]["rev"] == head.as_str()).count();
    assert_eq!(of_head, 1, "the old head was not built again: {runs:#}");
}

/// simplejson's source as PyPI serves it (a project nobody here wrote),
/// pinned by its sha256.
const SIMPLEJSON: &str = "simplejson==3.19.3";
const SIMPLEJSON_SHA256: &str = "8e086896c36210ab6050f2f9f095a5f1e03c83fa0e7f296d6cba425411364680";

/// Downloads the sdist with pip (cached between runs, checked by hash).
fn simplejson_sdist() -> std::path::PathBuf {
    let cache = Path::new("/var/tmp/flotilla-test-cache/pypi");
    std::fs::create_dir_all(cache).unwrap();
    let file = cache.join("simplejson-3.19.3.tar.gz");
    let sha = |p: &Path| {
        let out = Command::new("sha256sum").arg(p).output().expect("sha256sum");
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
    };
    if file.exists() && sha(&file) == SIMPLEJSON_SHA256 {
        return file;
    }
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SIMPLEJSON, "-d"])
        .arg(cache)
        .output()
        .expect("running pip (apt-get install python3-pip)");
    assert!(out.status.success(), "pip download {SIMPLEJSON}: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha(&file), SIMPLEJSON_SHA256, "the sdist PyPI served is not the one pinned");
    file
}

/// A real open-source project built with its own test suite: simplejson's
/// sdist from PyPI, committed by the test into a throwaway repository with
/// a flotilla.toml of two builders.
#[test]
fn an_open_source_project_passes_its_own_test_suite() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let sdist = simplejson_sdist();
    let repo = tempfile::tempdir().unwrap();
    let status = Command::new("tar")
        .args(["xzf"])
        .arg(&sdist)
        .args(["--strip-components=1", "-C"])
        .arg(repo.path())
        .status()
        .unwrap();
    assert!(status.success());
    let config = r#"
[[builder]]
name = "linux-amd64"
timeout = "10m"
steps = [
  { name = "compile", run = "python3 -m compileall -q simplejson" },
  { name = "test", run = "python3 -m unittest simplejson.tests.all_tests_suite" },
]

[[builder]]
name = "linux-amd64-strict"
env = { PYTHONWARNINGS = "error::DeprecationWarning" }
steps = [{ name = "test", run = "python3 -bb -X dev -m unittest simplejson.tests.all_tests_suite" }]
"#;
    std::fs::write(repo.path().join("flotilla.toml"), config).unwrap();
    git(repo.path(), &["init", "-q"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-q", "-m", "simplejson 3.19.3 from PyPI"]);
    let rev = git(repo.path(), &["rev-parse", "HEAD"]);

    let dev = NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "none", "--stop-apps"]);
    let home = dev.home().to_path_buf();
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap()]);
    let run = finished_run(&dev, &rev);
    for builder in ["linux-amd64", "linux-amd64-strict"] {
        let b = build_of(&run, builder);
        let log = log(&home, &b);
        assert_eq!(b["state"], "passed", "{builder}: {b:#}\n{log}");
        assert!(log.contains("Ran 146 tests") && log.contains("\nOK"), "{builder}: {log}");
    }
}

/// A build whose sandbox is truly gone is retried once, visibly; the
/// janitor reaps a build sandbox the coordinator does not know.
#[test]
fn a_lost_sandbox_is_retried_once_and_strays_are_reaped() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let mut dev = NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "none", "--stop-apps"]);
    let home = dev.home().to_path_buf();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"slow\", run = \"echo started; sleep 3; echo finished\" }]\n";
    let rev = commit(repo.path(), &[("flotilla.toml", config)], "one slow step");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    let first = wait_until(WAIT, "the build to start its step", || {
        let runs = json(&home, &["run", "ls", "--project", "demo"]);
        let run = runs.as_array()?.iter().find(|r| r["change"]["rev"] == rev.as_str())?.clone();
        let b = build_of(&run, "linux-amd64");
        log(&home, &b).contains("started").then_some(b)
    });
    // Someone deletes the build's sandbox under it.
    cli_ok(&home, &["sandbox", "rm", &format!("build-{}", first["id"])]);
    let run = finished_run(&dev, &rev);
    assert_eq!(run["state"], "passed", "{run:#}");
    let shown = json(&home, &["run", "show", &run["id"].to_string()]);
    let builds = shown["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 2, "one retry, not more: {shown:#}");
    let lost = builds.iter().find(|b| b["attempt"] == 1).unwrap();
    let again = builds.iter().find(|b| b["attempt"] == 2).unwrap();
    assert_eq!(lost["state"], "failed");
    assert_eq!(lost["failure"]["step"], "sandbox");
    assert_eq!(again["retry_reason"], "sandbox lost");
    assert_eq!(again["retry_of"], lost["id"]);
    assert_eq!(log(&home, again), "started\nfinished\n");
    let t = json(&home, &["build", "show", &lost["id"].to_string()]);
    assert!(t["timeline"].to_string().contains("sandbox lost"), "{t:#}");

    // A build sandbox of a build the coordinator never made is reaped at
    // its next start (and every minute).
    let stray = cli_ok(&home, &["sandbox", "create", "--name", "stray", "--label", "flotilla.build=999999"]);
    assert!(!stray.trim().is_empty());
    dev.kill9();
    dev.start_again();
    wait_until(WAIT, "the janitor to reap the stray", || {
        let list = json(&home, &["sandbox", "ls"]);
        (!list.as_array()?.iter().any(|s| s["name"] == "stray")).then_some(())
    });
}

fn post(url: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = url.trim().trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out)
}

/// A signed push webhook starts the build at once (the poller waits an
/// hour); unsigned or wrongly signed ones are refused, as are changes over
/// TCP.
#[test]
fn a_signed_push_webhook_starts_a_build() {
    use hmac::Mac;
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let dev = NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "127.0.0.1:0", "--stop-apps"]);
    let home = dev.home().to_path_buf();
    let url = std::fs::read_to_string(home.join("coordinator.url")).unwrap();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"hi\", run = \"cat msg\" }]\n";
    commit(repo.path(), &[("flotilla.toml", config), ("msg", "one\n")], "first");
    let repo_arg = repo.path().to_str().unwrap();
    let args = ["project", "add", "demo", "--repo", repo_arg, "--poll-interval", "1h", "--webhook-secret", "s3cret"];
    cli_ok(&home, &args);
    // Someone watching the coordinator's events as it happens.
    let mut watcher = Command::new(BIN)
        .args(["events", "--source", "coordinator"])
        .env("FLOTILLA_HOME", &home)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watcher.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let rev = commit(repo.path(), &[("msg", "two\n")], "second");
    let body =
        format!(r#"{{"ref":"refs/heads/main","before":"0","after":"{rev}","repository":{{"full_name":"t/demo"}}}}"#);
    let sign = |secret: &[u8]| {
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        m.update(body.as_bytes());
        let sig: String = m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256={sig}")
    };
    let path = "/v1/webhooks/github/demo";
    let ev = ("X-GitHub-Event", "push".to_string());
    let (code, out) = post(&url, path, std::slice::from_ref(&ev), body.as_bytes());
    assert_eq!(code, 401, "unsigned: {out}");
    let (code, out) = post(&url, path, &[ev.clone(), ("X-Hub-Signature-256", sign(b"wrong"))], body.as_bytes());
    assert_eq!(code, 401, "wrong secret: {out}");
    // A stranger's body is bounded before any signature is checked: one
    // said to be 25 MiB is refused unread, and one that trickles in is cut
    // off (a timeout, not a connection held for ever).
    let addr = url.trim().trim_start_matches("http://").trim_end_matches('/').to_string();
    let partial = |head: String, sent: &[u8]| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(sent).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let out = String::from_utf8_lossy(&out).into_owned();
        (out.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()).unwrap_or(0), out)
    };
    let head = |len: usize| {
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nContent-Length: {len}\r\n\r\n")
    };
    let (code, out) = partial(head(25 << 20), b"{");
    assert_eq!(code, 413, "a 25 MiB body: {out}");
    let started = Instant::now();
    let (code, out) = partial(head(100), b"{\"ref\":");
    assert_eq!(code, 408, "a body that never arrives: {out}");
    assert!(started.elapsed() < Duration::from_secs(30), "cut off after {:?}", started.elapsed());
    let (code, out) = post(&url, "/v1/projects/demo/poll", &[], b"");
    assert_eq!(code, 401, "changes over TCP need the token: {out}");
    let token = std::fs::read_to_string(home.join("coordinator/token")).unwrap();
    let bearer = ("Authorization", format!("Bearer {}", token.trim()));
    // The secrets' database and its directory are the coordinator's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(home.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode("coordinator"), mode("coordinator/coordinator.db")), (0o700, 0o600));
    let (code, out) = post(&url, "/v1/projects/demo/poll", std::slice::from_ref(&bearer), b"");
    assert_eq!(code, 200, "with the token: {out}");
    let (code, out) = post(&url, path, &[ev, ("X-Hub-Signature-256", sign(b"s3cret"))], body.as_bytes());
    assert_eq!(code, 202, "signed: {out}");
    let run = finished_run(&dev, &rev);
    assert_eq!(run["state"], "passed", "{run:#}");
    assert_eq!(log(&home, &build_of(&run, "linux-amd64")), "two\n");
    let id = build_of(&run, "linux-amd64")["id"].clone();
    // The end is recorded first, then the sandbox deleted: both reach the feed.
    wait_until(WAIT, "the build's end and its sandbox's delete on the event feed", || {
        let line = rx.recv_timeout(Duration::from_millis(200)).ok()?;
        (line.contains(&format!("build {id} demo linux-amd64 passed")) && line.contains("sandbox_deleted"))
            .then_some(line)
    });
    let _ = watcher.kill();
    let _ = watcher.wait();
}

#[test]
fn a_coordinator_of_its_own_is_killed_mid_build_and_the_build_finishes_once() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let node = NodeProcess::start_with(Path::new(BIN), &["--stop-apps"]);
    let home = node.home().to_path_buf();
    let mut coordinator = CoordinatorProcess::start(&home, &home, &[]);
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let script = "for i in $(seq 1 25); do echo \"out $i\"; echo \"err $i\" >&2; sleep 0.1; done\n";
    let config = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"count\", run = \"sh count.sh\" }]\n";
    let rev = commit(repo.path(), &[("flotilla.toml", config), ("count.sh", script)], "count");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    let build = wait_until(WAIT, "the build to print", || {
        let runs = json(&home, &["run", "ls", "--project", "demo"]);
        let run = runs.as_array()?.iter().find(|r| r["change"]["rev"] == rev.as_str())?.clone();
        let b = build_of(&run, "linux-amd64");
        log(&home, &b).contains("out 4\n").then_some(b)
    });
    let stored = json(&home, &["build", "show", &build["id"].to_string()])["log_bytes"].as_u64().unwrap();
    coordinator.kill9();
    // The build goes on without it: its step's output grows well past what
    // the coordinator had stored.
    let sandbox = format!("build-{}", build["id"]);
    wait_until(WAIT, "the step to go on without its coordinator", || {
        let ps = json(&home, &["sandbox", "ps", &sandbox]);
        let end = ps.as_array()?.iter().find(|p| p["id"] == "step-0")?["output_end"].as_u64()?;
        (end > stored + 100).then_some(())
    });
    let _coordinator = CoordinatorProcess::start(&home, &home, &[]);
    let run = wait_until(WAIT, "the run to finish", || {
        let runs = json(&home, &["run", "ls", "--project", "demo"]);
        let run = runs.as_array()?.iter().find(|r| r["change"]["rev"] == rev.as_str())?.clone();
        (run["state"] != "running" && run["state"] != "queued").then_some(run)
    });
    assert_eq!(run["state"], "passed", "{run:#}");
    let b = build_of(&run, "linux-amd64");
    assert_eq!(b["attempt"], 1);
    let got = log(&home, &b);
    // Both streams, every line once (their interleaving is the kernel's).
    for i in 1..=25 {
        for s in ["out", "err"] {
            assert_eq!(got.matches(&format!("{s} {i}\n")).count(), 1, "{s} {i} in:\n{got}");
        }
    }
    assert_eq!(got.len(), (1..=25).map(|i| format!("out {i}\nerr {i}\n").len()).sum::<usize>(), "{got}");
}

/// A build past its builder's timeout is stopped and fails, naming the
/// step it was in and quoting its output.
#[test]
fn a_build_past_its_timeout_fails_naming_the_step() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let dev = NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "none", "--stop-apps"]);
    let home = dev.home().to_path_buf();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config = "[[builder]]\nname = \"linux-amd64\"\ntimeout = \"2s\"\n\
                  steps = [{ name = \"quick\", run = \"true\" }, { name = \"hang\", run = \"echo hanging; sleep 300\" }]\n";
    let rev = commit(repo.path(), &[("flotilla.toml", config)], "hangs");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    let run = finished_run(&dev, &rev);
    assert_eq!(run["state"], "failed", "{run:#}");
    let b = build_of(&run, "linux-amd64");
    assert_eq!(b["failure"]["step"], "hang", "{b:#}");
    assert!(b["failure"]["message"].as_str().unwrap().contains("timed out after 2s"), "{b:#}");
    assert_eq!(b["failure"]["last_lines"][0], "hanging");
    wait_until(WAIT, "the timed-out build's sandbox to go", || {
        let list = json(&home, &["sandbox", "ls"]);
        (!list.as_array()?.iter().any(|s| s["name"] == format!("build-{}", b["id"]))).then_some(())
    });
}

#[test]
fn a_node_killed_mid_build_is_waited_for_and_the_build_finishes_once() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let mut node = NodeProcess::start_with(Path::new(BIN), &["--stop-apps"]);
    let home = node.home().to_path_buf();
    let _coordinator = CoordinatorProcess::start(&home, &home, &[]);
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let script = "for i in $(seq 1 30); do echo \"line $i\"; sleep 0.1; done\n";
    let config = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"count\", run = \"sh count.sh\" }]\n";
    let rev = commit(repo.path(), &[("flotilla.toml", config), ("count.sh", script)], "count");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    wait_until(WAIT, "the build to print", || {
        let runs = json(&home, &["run", "ls", "--project", "demo"]);
        let run = runs.as_array()?.iter().find(|r| r["change"]["rev"] == rev.as_str())?.clone();
        log(&home, &build_of(&run, "linux-amd64")).contains("line 3\n").then_some(())
    });
    node.kill9();
    node.start_again();
    let run = wait_until(WAIT, "the run to finish", || {
        let runs = json(&home, &["run", "ls", "--project", "demo"]);
        let run = runs.as_array()?.iter().find(|r| r["change"]["rev"] == rev.as_str())?.clone();
        (run["state"] != "running" && run["state"] != "queued").then_some(run)
    });
    assert_eq!(run["state"], "passed", "{run:#}");
    let b = build_of(&run, "linux-amd64");
    assert_eq!(b["attempt"], 1, "re-adopted, not retried: {b:#}");
    let expected: String = (1..=30).map(|i| format!("line {i}\n")).collect();
    assert_eq!(log(&home, &b), expected);
}

#[test]
fn a_build_no_node_can_run_waits_in_the_queue_saying_why() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let dev = NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "none", "--stop-apps"]);
    let home = dev.home().to_path_buf();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"ok\", run = \"true\" }]\n\n\
                  [[builder]]\nname = \"linux-amd64-custom\"\nimage = \"nosuch/toolchain:1\"\n\
                  steps = [{ name = \"ok\", run = \"true\" }]\n\n\
                  [[builder]]\nname = \"linux-s390x\"\nsteps = [{ name = \"ok\", run = \"true\" }]\n";
    let rev = commit(repo.path(), &[("flotilla.toml", config)], "three builders");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);

    // The builder the node can run passes; the other two wait, each saying
    // what no node has.
    let queue = wait_until(WAIT, "the runnable build to pass and the others to wait", || {
        let runs = json(&home, &["run", "ls", "--project", "demo"]);
        let run = runs.as_array()?.iter().find(|r| r["change"]["rev"] == rev)?.clone();
        (build_of(&run, "linux-amd64")["state"] == "passed").then_some(())?;
        let q = json(&home, &["queue"]);
        (q["waiting"].as_array()?.len() == 2).then_some(q)
    });
    let why = |builder: &str| {
        let w = queue["waiting"].as_array().unwrap().iter().find(|w| w["builder"] == builder).unwrap().clone();
        assert_eq!(w["project"], "demo");
        assert_eq!(w["priority"], "post_submit");
        w["reason"].as_str().unwrap().to_string()
    };
    let custom = why("linux-amd64-custom");
    assert!(custom.starts_with("no node can run linux-amd64 nosuch/toolchain:1"), "{custom}");
    assert!(custom.ends_with("1 node has no image nosuch/toolchain:1"), "{custom}");
    let s390 = why("linux-s390x");
    assert!(s390.ends_with("1 node is amd64, not s390x"), "{s390}");
    let nodes = queue["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{queue:#}");
    assert_eq!((nodes[0]["up"].as_bool(), nodes[0]["platform"].as_str()), (Some(true), Some("linux-amd64")));
    let table = cli_ok(&home, &["queue"]);
    assert!(table.contains("WHY IT WAITS") && table.contains("1 node has no image nosuch/toolchain:1"), "{table}");
    // Per builder, as Go's farmer page shows a host type's queue.
    let per: Vec<(&str, u64)> = queue["builders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["builder"].as_str().unwrap(), b["waiting"].as_u64().unwrap()))
        .collect();
    assert_eq!(per, vec![("linux-amd64-custom", 1), ("linux-s390x", 1)], "{queue:#}");
    assert!(table.contains("LAST STARTED"), "{table}");

    // Canceling the run empties the queue.
    let run_id = build_of(&json(&home, &["run", "ls", "--project", "demo"])[0], "linux-s390x")["run_id"].to_string();
    cli_ok(&home, &["run", "cancel", &run_id]);
    let run = finished_run(&dev, &rev);
    assert_eq!(run["state"], "canceled", "{run:#}");
    wait_until(WAIT, "the queue to empty", || json(&home, &["queue"])["waiting"].as_array()?.is_empty().then_some(()));
}

#[test]
fn build_sandbox_sets_up_a_builder_to_debug_by_hand() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let dev = NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "none", "--stop-apps"]);
    let home = dev.home().to_path_buf();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config = "[[builder]]\nname = \"linux-amd64-debug\"\ncpus = 1\nenv = { MODE = \"dbg\" }\n\
                  steps = [{ name = \"test\", run = \"exit 1\" }]\n";
    let old = commit(repo.path(), &[("flotilla.toml", config), ("hello.txt", "old\n")], "first");
    let head = commit(repo.path(), &[("hello.txt", "new\n")], "second");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1h"]);

    let s = json(&home, &["build", "sandbox", "demo", "linux-amd64-debug", "--idle-ttl", "10m"]);
    assert_eq!(s["rev"], head, "{s:#}");
    let id = s["sandbox_id"].as_str().unwrap().to_string();
    let out =
        cli_ok(&home, &["sandbox", "exec", &id, "--cwd", "/workspace", "--", "sh", "-c", "cat hello.txt; echo $MODE"]);
    assert_eq!(out, "new\ndbg\n");
    let sb = json(&home, &["sandbox", "show", &id]);
    assert_eq!(sb["resources"]["cpus"], 1.0, "{sb:#}");
    assert_eq!(sb["labels"]["flotilla.builder"], "linux-amd64-debug");
    assert!(sb["delete_at"].is_number() || sb["delete_at"].is_string(), "it is reaped unless used: {sb:#}");

    // At an older revision; the table names the commands to use.
    let (code, out, err) = cli(&home, &["build", "sandbox", "demo", "linux-amd64-debug", "--rev", &old]);
    assert_eq!(code, 0, "{err}");
    let old_id = out.trim().to_string();
    assert!(err.contains(&format!("flotilla sandbox shell {old_id}")), "{err}");
    let out = cli_ok(&home, &["sandbox", "exec", &old_id, "--cwd", "/workspace", "--", "cat", "hello.txt"]);
    assert_eq!(out, "old\n");

    // A builder the config does not have is refused, naming those it has.
    let (code, _, err) = cli(&home, &["build", "sandbox", "demo", "linux-arm64"]);
    assert_ne!(code, 0);
    assert!(err.contains("no builder \"linux-arm64\"") && err.contains("linux-amd64-debug"), "{err}");
    for sb in [id, old_id] {
        cli_ok(&home, &["sandbox", "rm", &sb]);
    }
}

#[test]
fn builds_spread_over_two_nodes_and_a_lost_nodes_build_finishes_on_the_other() {
    two_nodes(false);
}

#[test]
fn a_node_that_publishes_itself_in_the_name_table_joins_the_fleet() {
    two_nodes(true);
}

/// A coordinator (in `flotilla dev`) and a second node, given with
/// `--fleet-node` or found in dev's name table, where the second node
/// publishes itself.
fn two_nodes(discover: bool) {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let lost = ["--coordinator-listen", "none", "--stop-apps", "--node-lost-after", "3s"];
    let (dev, mut second) = if discover {
        let dev = NodeProcess::start_dev(Path::new(BIN), &lost);
        let read = |f: &str| std::fs::read_to_string(dev.home().join(f)).unwrap().trim().to_string();
        let (url, token) = (read("names.url"), read("names.token"));
        let second =
            NodeProcess::start_with(Path::new(BIN), &["--stop-apps", "--names", &url, "--names-token", &token]);
        (dev, second)
    } else {
        let second = NodeProcess::start_with(Path::new(BIN), &["--stop-apps"]);
        let url = format!("unix://{}", second.socket().display());
        let dev = NodeProcess::start_dev(Path::new(BIN), &[&lost[..], &["--fleet-node", &url]].concat());
        (dev, second)
    };
    let second_url = format!("unix://{}", second.socket().display());
    let home = dev.home().to_path_buf();
    wait_until(WAIT, "both nodes in the fleet", || {
        let q = json(&home, &["queue"]);
        (q["nodes"].as_array()?.iter().filter(|n| n["up"] == true).count() == 2).then_some(())
    });
    // Each build takes a whole node, so two at once must use both.
    let cpus = std::thread::available_parallelism().unwrap().get();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let config = format!(
        "[[builder]]\nname = \"linux-amd64\"\ncpus = {cpus}\nsteps = [{{ name = \"work\", run = \"sh work.sh\" }}]\n\n\
         [[builder]]\nname = \"linux-amd64-b\"\ncpus = {cpus}\nsteps = [{{ name = \"work\", run = \"sh work.sh\" }}]\n"
    );
    let script = "echo started; sleep 6; echo done\n";
    let rev = commit(repo.path(), &[("flotilla.toml", &config), ("work.sh", script)], "two builders");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1h"]);

    let run = wait_until(WAIT, "both builds to start, one on each node", || {
        let runs = json(&home, &["run", "ls", "--project", "demo"]);
        let run = runs.as_array()?.iter().find(|r| r["change"]["rev"] == rev)?.clone();
        let started = run["builds"].as_array()?.iter().all(|b| log(&home, b).starts_with("started"));
        started.then_some(run)
    });
    let builds = run["builds"].as_array().unwrap();
    let nodes: std::collections::BTreeSet<&str> = builds.iter().map(|b| b["node"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 2, "the builds share a node: {run:#}");
    let on_second = builds.iter().find(|b| b["node"] == second_url).expect("a build on the second node").clone();

    // The second node is lost mid-build: its build is retried on the first,
    // marked, and passes there.
    second.kill9();
    let run = finished_run(&dev, &rev);
    assert_eq!(run["state"], "passed", "{run:#}");
    let again = build_of(&run, on_second["builder"].as_str().unwrap());
    assert_eq!(again["attempt"], 2, "{again:#}");
    assert_eq!(again["retry_reason"], "node lost", "{again:#}");
    assert_ne!(again["node"], second_url);
    assert_eq!(log(&home, &again), "started\ndone\n");
    let shown = json(&home, &["build", "show", &again["id"].to_string()]);
    let events: Vec<&str> =
        shown["timeline"].as_array().unwrap().iter().map(|t| t["event"].as_str().unwrap()).collect();
    assert!(events.contains(&"retried: node lost"), "{events:?}");
    let old = json(&home, &["build", "show", &on_second["id"].to_string()]);
    assert_eq!(old["failure"]["step"], "node", "{old:#}");
    assert!(old["failure"]["message"].as_str().unwrap().contains("lost"), "{old:#}");
    let q = json(&home, &["queue"]);
    let down = q["nodes"].as_array().unwrap().iter().find(|n| n["name"] == second_url).expect("listed").clone();
    assert_eq!(down["up"], false, "{q:#}");
}

/// The coordinator's TCP port meets strangers with the node's limits: 600
/// connections that never finish their headers hold at most 512 open (the
/// rest wait in the backlog), each is cut off at the (here shortened)
/// header timeout, an idle keep-alive connection is closed the same way,
/// and an ordinary request is served throughout.
#[test]
fn slow_and_idle_connections_to_the_coordinators_port_are_bounded() {
    use std::io::{Read, Write};
    let home = tempfile::tempdir().unwrap();
    let nowhere = home.path().join("no-node");
    let log = std::fs::File::create(home.path().join("coordinator.log")).unwrap();
    let child = Command::new(BIN)
        .args(["coordinator", "--home"])
        .arg(home.path())
        .args(["--coordinator-listen", "127.0.0.1:0", "--node"])
        .arg(format!("unix://{}", nowhere.join("node.sock").display()))
        .env("FLOTILLA_HEADER_TIMEOUT_MS", "1500")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            flotilla_testkit::stop_child(&mut self.0, Duration::from_secs(10));
        }
    }
    let child = Stop(child);
    let url_file = home.path().join("coordinator.url");
    let url = wait_until(Duration::from_secs(20), "the coordinator's URL", || std::fs::read_to_string(&url_file).ok());
    let addr = url.trim().trim_start_matches("http://").to_string();
    let healthz = || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(healthz().starts_with("HTTP/1.1 200"));

    let slow: Vec<std::net::TcpStream> = (0..600)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /v1/projects HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", child.0.id())).map(|d| d.count()).unwrap_or(0);
    let most = (0..20).map(|_| {
        let n = fds();
        std::thread::yield_now();
        n
    });
    let most = most.max().unwrap();
    assert!(most < 512 + 100, "{most} descriptors open with 600 slow clients");
    let started = Instant::now();
    assert!(healthz().starts_with("HTTP/1.1 200"), "served while 600 clients dribble");
    assert!(started.elapsed() < Duration::from_secs(15), "served after {:?}", started.elapsed());
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut out = Vec::new();
        assert!(s.read_to_end(&mut out).is_ok(), "a slow client's connection was closed, not left open");
    }
    // An idle keep-alive connection goes the same way.
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    assert!(idle.read_to_end(&mut out).is_ok(), "the idle connection was closed");
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    assert!(started.elapsed() < Duration::from_secs(20), "closed after {:?}", started.elapsed());
}
