//! The node replaces its own binary without bricking (DESIGN §5, "Apps"):
//! a candidate that fails its test changes nothing; one that fails after
//! the switch (it exits, or it hangs) is reverted by the watchdog with no
//! help; one that works takes over the same pid with every sandbox still
//! running, and `node revert` goes back the same way.
//!
//! Every process a test leads to is stopped at the end, also when it
//! fails: the node through its fixture, and [`Leftovers`] stops the
//! watchdog and a node the watchdog restarted (by their pid files, checked
//! against the processes' start times).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flotilla_api::{SandboxState, UpdateOutcome, UpdateResult};
use flotilla_node::selfupdate::{Layout, Link, alive};

/// Generous: waits end as soon as their condition holds.
const WAIT: Duration = Duration::from_secs(120);

/// A node for these tests: the watchdog restarts the old version itself
/// (no systemd above us, whatever the environment says).
fn env() -> common::Env {
    env_with(&[])
}

fn env_with(extra: &[(&str, Option<&str>)]) -> common::Env {
    let mut vars = vec![("INVOCATION_ID", None), ("FLOTILLA_SUPERVISOR", Some("none"))];
    vars.extend_from_slice(extra);
    common::env_with_env(&[], &vars)
}

/// Stops what outlives the node's fixture: the watchdog, and a node the
/// watchdog started (a new process; the fixture only knows its child).
struct Leftovers {
    home: PathBuf,
    child: Option<u32>,
}

impl Leftovers {
    fn of(env: &common::Env) -> Leftovers {
        Leftovers { home: env.node.home().to_path_buf(), child: env.node.pid() }
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let layout = Layout::new(&self.home);
        if let Some((pid, start)) = read_pid(&layout.watchdog_pid_path())
            && alive(pid, start)
        {
            let _ = flotilla_sandbox::sys::kill(pid, 9);
        }
        if let Some((pid, start)) = layout.node_pid()
            && Some(pid as u32) != self.child
            && alive(pid, start)
        {
            // Gracefully, so it stops its sandboxes; SIGKILL past the wait.
            let _ = flotilla_sandbox::sys::kill(pid, 15);
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while alive(pid, start) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if alive(pid, start) {
                let _ = flotilla_sandbox::sys::kill(pid, 9);
            }
        }
    }
}

fn read_pid(path: &Path) -> Option<(i32, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut w = text.split_whitespace();
    Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
}

/// The pid of the process serving the node's socket.
async fn serving_pid(home: &Path) -> Option<i32> {
    let s = tokio::net::UnixStream::connect(home.join("node.sock")).await.ok()?;
    s.peer_cred().ok()?.pid()
}

/// A working new version: this build with bytes appended (an ELF file
/// runs the same with a tail), so its digest differs.
fn new_build(dir: &Path, tag: &str) -> PathBuf {
    let path = dir.join(format!("flotilla-{tag}"));
    std::fs::copy(common::BIN, &path).expect("copying the binary");
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, format!("\0flotilla-test-build {tag}\n").as_bytes()).unwrap();
    path
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// A candidate that passes its test (it runs this build in test mode) and
/// then does `after` instead of being a node.
fn fails_after_switch(dir: &Path, name: &str, after: &str) -> PathBuf {
    let body = format!("case \" $* \" in *\" --test-mode \"*) exec {} \"$@\";; esac\n{after}", common::BIN);
    script(dir, name, &body)
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// The version the node records for its own binary when its first update
/// begins: the first 12 hex digits of the binary's SHA-256.
async fn first_version(home: &Path) -> String {
    assert!(Layout::new(home).read_link(Link::Current).is_none(), "a fresh node has no `current` yet");
    sha256(Path::new(common::BIN))[..12].to_string()
}

fn exe_of(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

fn log_of(home: &Path) -> String {
    let read = |n: &str| std::fs::read_to_string(home.join(n)).unwrap_or_default();
    format!("--- update.log\n{}\n--- node.log\n{}", read("update.log"), read("node.log"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_fails_its_test_leaves_the_node_untouched() {
    let env = env();
    let _left = Leftovers::of(&env);
    let home = env.node.home().to_path_buf();
    let s = env.sandbox().await;
    let v0 = first_version(&home).await;
    let pid = serving_pid(&home).await.expect("the node serves");
    let bins = tempfile::tempdir().unwrap();

    // A binary that cannot even start in test mode.
    let broken = script(bins.path(), "broken", "echo 'candidate: cannot start' >&2\nexit 3");
    let (code, _, err) = common::cli(&home, &["node", "update", "--binary", broken.to_str().unwrap()]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("test_mode failed") && err.contains("exited"), "the step and what happened: {err}");
    assert!(err.contains("candidate: cannot start"), "the candidate's own output: {err}");

    // A working binary whose digest is not the one asked for: refused with
    // a 400 naming both, before it ever runs.
    let good = new_build(bins.path(), "good");
    let wrong = "0".repeat(64);
    let req = flotilla_api::NodeUpdateRequest { binary: good.display().to_string(), sha256: Some(wrong.clone()) };
    let refused = env
        .client
        .http()
        .json::<flotilla_api::NodeUpdate>(http::Method::POST, "/v1/node/update", Some(&req))
        .await
        .unwrap_err();
    let flotilla_agent::http::ClientError::Api(e) = refused else { panic!("not an API error: {refused:?}") };
    assert_eq!(e.http_status(), 400, "{e:?}");
    assert!(e.message.contains(&wrong) && e.message.contains(&sha256(&good)), "both digests: {e:?}");
    assert_eq!(e.details.as_ref().unwrap()["step"], "verify");
    let (code, _, err) = common::cli(
        &home,
        &["node", "update", "--binary", good.to_str().unwrap(), "--sha256", &format!("sha256:{wrong}")],
    );
    assert_ne!(code, 0);
    assert!(err.contains("sha256 mismatch"), "{err}");

    // Same process, same version, nothing pending, the sandbox untouched.
    assert_eq!(serving_pid(&home).await, Some(pid));
    assert_eq!(Layout::new(&home).read_link(Link::Current), Some(v0.clone()));
    assert!(!home.join("update.pending").exists());
    assert_eq!(exe_of(pid), std::fs::canonicalize(common::BIN).unwrap(), "still the binary it started as");
    let out = env.ok(&s.id, "echo alive").await;
    assert_eq!(out, "alive\n");
    assert_eq!(common::agent_pid(&env.client.get(&s.id).await.unwrap()), common::agent_pid(&s));
}

/// Waits for the outcome of the last hand-over and a node serving again.
async fn reverted_and_serving(home: &Path, old_pid: i32) -> (UpdateOutcome, i32) {
    let layout = Layout::new(home);
    let outcome = common::eventually(WAIT, "the hand-over to be reverted", || {
        let o = layout.read_last().ok().flatten().filter(|_| !home.join("update.pending").exists());
        async move { o }
    })
    .await;
    let pid = common::eventually(WAIT, "a node to serve again", || async move {
        serving_pid(home).await.filter(|p| *p != old_pid)
    })
    .await;
    (outcome, pid)
}

async fn reverts_by_itself(after: &str, env: common::Env) {
    let _left = Leftovers::of(&env);
    let home = env.node.home().to_path_buf();
    let s = env.sandbox().await;
    let v0 = first_version(&home).await;
    let pid = serving_pid(&home).await.expect("the node serves");
    let bins = tempfile::tempdir().unwrap();
    let bad = fails_after_switch(bins.path(), "fails-after-switch", after);

    let (code, _, err) = common::cli(&home, &["node", "update", "--binary", bad.to_str().unwrap()]);
    assert_ne!(code, 0, "the CLI reports the revert:\n{err}\n{}", log_of(&home));
    assert!(err.contains("test_answered") && err.contains("switched"), "it passed its test: {err}");
    assert!(err.contains("was reverted"), "{err}");

    let (outcome, new_pid) = reverted_and_serving(&home, pid).await;
    assert_eq!(outcome.result, UpdateResult::Reverted, "{outcome:?}");
    assert_eq!(outcome.from, v0);
    let layout = Layout::new(&home);
    assert_eq!(layout.read_link(Link::Current), Some(v0.clone()), "{}", log_of(&home));
    assert_eq!(exe_of(new_pid), std::fs::canonicalize(layout.binary(&v0)).unwrap(), "the old version runs");
    // The sandbox made before the update never stopped: same init, still running.
    let now = env.client.get(&s.id).await.unwrap();
    assert_eq!(now.state, SandboxState::Running, "{now:?}\n{}", log_of(&home));
    assert_eq!(common::agent_pid(&now), common::agent_pid(&s));
    assert_eq!(env.ok(&s.id, "echo still-here").await, "still-here\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_that_exits_after_the_switch_is_reverted_by_itself() {
    reverts_by_itself("echo 'new version: broken' >&2\nexit 1", env()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_that_hangs_after_the_switch_is_killed_and_reverted() {
    // It keeps the pid and never serves: only the deadline finds it out.
    reverts_by_itself("exec sleep 600", env_with(&[("FLOTILLA_UPDATE_CHECK_MS", Some("1000"))])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_hands_over_with_sandboxes_running_and_reverts_by_hand() {
    let env = env();
    let _left = Leftovers::of(&env);
    let home = env.node.home().to_path_buf();
    let layout = Layout::new(&home);
    let s = env.sandbox().await;
    env.ok(&s.id, "echo before > mark").await;
    let v0 = first_version(&home).await;
    let pid = serving_pid(&home).await.expect("the node serves");
    assert_eq!(Some(pid as u32), env.node.pid());
    let bins = tempfile::tempdir().unwrap();
    let new = new_build(bins.path(), "next");

    let (code, out, err) =
        common::cli(&home, &["node", "update", "--binary", new.to_str().unwrap(), "--sha256", &sha256(&new), "--json"]);
    assert_eq!(code, 0, "{err}\n{}", log_of(&home));
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    let outcome: UpdateOutcome = serde_json::from_value(answer["outcome"].clone()).unwrap();
    assert_eq!(outcome.result, UpdateResult::Committed);
    let v1 = outcome.to.clone();
    assert_eq!(v1, sha256(&new)[..12]);
    assert_eq!(answer["update"]["pid"], pid, "re-executed in place");

    // Same pid, now running the new version through `current`.
    assert_eq!(serving_pid(&home).await, Some(pid));
    assert_eq!(layout.read_link(Link::Current), Some(v1.clone()));
    assert_eq!(layout.read_link(Link::Previous), Some(v0.clone()));
    assert_eq!(exe_of(pid), std::fs::canonicalize(layout.binary(&v1)).unwrap());
    assert!(!home.join("update.pending").exists());
    // The sandbox was never stopped: same init, same files, and it execs.
    let now = env.client.get(&s.id).await.unwrap();
    assert_eq!(now.state, SandboxState::Running);
    assert_eq!(common::agent_pid(&now), common::agent_pid(&s));
    assert_eq!(env.ok(&s.id, "cat mark").await, "before\n");

    // Back by hand, the same way.
    let (code, out, err) = common::cli(&home, &["node", "revert", "--json"]);
    assert_eq!(code, 0, "{err}\n{}", log_of(&home));
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["outcome"]["result"], "committed");
    assert_eq!(serving_pid(&home).await, Some(pid));
    assert_eq!(layout.read_link(Link::Current), Some(v0.clone()));
    assert_eq!(layout.read_link(Link::Previous), Some(v1));
    assert_eq!(exe_of(pid), std::fs::canonicalize(layout.binary(&v0)).unwrap());
    let now = env.client.get(&s.id).await.unwrap();
    assert_eq!((now.state, common::agent_pid(&now)), (SandboxState::Running, common::agent_pid(&s)));
    // A remote client learns the outcome from the node itself.
    let st: flotilla_api::NodeUpdateStatus =
        env.client.http().json(http::Method::GET, "/v1/node/update", None::<&()>).await.unwrap();
    assert_eq!(
        (st.pending, st.last.map(|o| (o.kind, o.result))),
        (None, Some((flotilla_api::UpdateKind::Revert, flotilla_api::UpdateResult::Committed)))
    );
    // Each committed hand-over is on the event feed.
    let feed = common::events_until(&home, "\"kind\":\"revert\"").await;
    assert!(feed.contains("event: node_update") && feed.contains("\"result\":\"committed\""), "{feed}");
    assert_eq!(env.ok(&s.id, "cat mark").await, "before\n");
}
