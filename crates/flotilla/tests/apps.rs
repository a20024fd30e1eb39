//! Apps on a real node: envelopes installed, instances in sandboxes,
//! forwarded ports and published names, races between operations, restart
//! policies with a crashing app, and recovery after `kill -9` (instances
//! running exactly once, stopped ones never re-run, a damaged one
//! quarantined while the others come back).

mod common;

use std::sync::Arc;
use std::time::Duration;

use flotilla_agent::http::ClientError;
use flotilla_api::app::{AppInstallation, AppInstance, AppLogsQuery, Envelope, InstallRequest, InstanceState};
use flotilla_api::{ErrorCode, Timestamp};
use flotilla_node::NodeClient;
use http_body_util::BodyExt;

const WAIT: Duration = Duration::from_secs(30);

/// A node that stops its apps' sandboxes when it stops (the test's end),
/// as `--stop-apps` asks; without it they would outlive the test.
fn stop_apps_env() -> common::Env {
    common::env_with(&["--stop-apps"])
}

fn envelope(v: serde_json::Value) -> InstallRequest {
    InstallRequest { envelope: serde_json::from_value::<Envelope>(v).expect("an envelope"), origin: None }
}

/// A web server that says which version it is.
fn web(title: &str, version: &str) -> InstallRequest {
    let script = format!(
        "mkdir -p /workspace/www && echo {version} > /workspace/www/version && \
         exec python3 -m http.server 8080 --bind 127.0.0.1 --directory /workspace/www"
    );
    envelope(serde_json::json!({
        "title": title,
        "command": ["sh", "-c", script],
        "env": {"PYTHONUNBUFFERED": "1"},
        "ports": [8080],
        "publish": [format!("apps/{title}")],
        "restart": {"policy": "on-failure", "initial_delay": "100ms"},
    }))
}

/// A long sleeper whose process is easy to count (`sleep 100001`).
fn sleeper(title: &str, policy: &str) -> InstallRequest {
    envelope(serde_json::json!({
        "title": title,
        "command": ["sh", "-c", "echo started; exec sleep 100001"],
        "restart": {"policy": policy, "initial_delay": "0s"},
    }))
}

async fn install(c: &NodeClient, req: &InstallRequest) -> AppInstallation {
    c.install_app(req).await.expect("installed")
}

async fn start(c: &NodeClient, inst: &str) -> AppInstance {
    c.app_action(inst, "start", None).await.expect("started")
}

async fn show(c: &NodeClient, addr: &str) -> AppInstance {
    c.app(addr).await.expect("shown")
}

/// Waits until the instance is `state` and `more` holds.
async fn until(c: &NodeClient, addr: &str, state: InstanceState, more: impl Fn(&AppInstance) -> bool) -> AppInstance {
    common::eventually(WAIT, &format!("{addr} to be {}", state.as_str()), || async {
        let i = show(c, addr).await;
        (i.state == state && more(&i)).then_some(i)
    })
    .await
}

async fn serving(c: &NodeClient, addr: &str) -> AppInstance {
    until(c, addr, InstanceState::Running, |i| i.pid.is_some()).await
}

/// `GET /version` through a forwarded address; `None` until it answers.
async fn get_version(address: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(address)).await.ok()?.ok()?;
    s.write_all(b"GET /version HTTP/1.0\r\nHost: x\r\n\r\n").await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    if text.split(' ').nth(1) != Some("200") {
        return None;
    }
    text.split("\r\n\r\n").nth(1).map(|b| b.trim().to_string())
}

async fn answers(address: &str, version: &str) {
    common::eventually(WAIT, &format!("{address} to answer {version}"), || async {
        (get_version(address).await.as_deref() == Some(version)).then_some(())
    })
    .await;
}

fn code(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Api(a) => a.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn logs(c: &NodeClient, addr: &str, previous: bool) -> String {
    let body = c.app_logs(addr, &AppLogsQuery { follow: false, previous }).await.expect("logs");
    String::from_utf8_lossy(&body.collect().await.expect("log body").to_bytes()).into_owned()
}

/// Lines of `sleep 100001` processes in a sandbox.
async fn sleepers(env: &common::Env, sandbox: &str) -> usize {
    let script =
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^sleep 100001' || true";
    env.ok(sandbox, script).await.trim().parse().expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_serves_publishes_updates_reverts_and_uninstalls() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let table = flotilla_names::ServerHandle::spawn(listener, Arc::new(flotilla_names::MemoryStore::new())).unwrap();
    let url = table.url();
    let token = table.token().to_string();
    let env = common::env_with_env(&["--names", &url, "--stop-apps"], &[("FLOTILLA_NAMES_TOKEN", Some(&token))]);
    let c = &env.client;
    let a = install(c, &web("hello-web", "one")).await;
    assert_eq!((a.address.as_str(), a.current.as_str()), ("hello-web/1", "v1"));
    let i1 = start(c, "hello-web/1").await;
    let i2 = start(c, "hello-web/1").await;
    assert_eq!((i1.address.as_str(), i2.address.as_str()), ("hello-web/1/1", "hello-web/1/2"));
    let (i1, i2) = (serving(c, &i1.address).await, serving(c, &i2.address).await);
    assert_ne!(i1.sandbox, i2.sandbox, "each instance has its own sandbox");
    let a1 = i1.ports[0].address.clone();
    let a2 = i2.ports[0].address.clone();
    answers(&a1, "one").await;
    answers(&a2, "one").await;

    // Both are reachable through their published name, while they run.
    let names = flotilla_names::NamesClient::connect(&url).unwrap();
    common::eventually(WAIT, "both instances to be published", || async {
        let mut got = names.resolve("apps/hello-web").await.ok()?.servers;
        got.sort();
        let mut want = vec![a1.clone(), a2.clone()];
        want.sort();
        (got == want).then_some(())
    })
    .await;
    for server in names.resolve("apps/hello-web").await.unwrap().servers {
        answers(&server, "one").await;
    }

    // A stopped instance is unpublished and stays stopped; its address is kept for its restart.
    let stopped: AppInstance = c.app_action("hello-web/1/2", "stop", None).await.unwrap();
    assert_eq!(stopped.state, InstanceState::NotRunning);
    common::eventually(WAIT, "the stopped instance to be unpublished", || async {
        let got = names.resolve("apps/hello-web").await.ok()?.servers;
        (got == vec![a1.clone()]).then_some(())
    })
    .await;
    assert_eq!(code(c.app_action::<AppInstance>("hello-web/1/2", "stop", None).await.unwrap_err()), ErrorCode::NoOp);

    // Update: a new version; the running instance moves onto it at the same address,
    // the stopped one stays pinned to v1.
    let up: AppInstallation = c.app_action("hello-web/1", "update", Some(&web("hello-web", "two"))).await.unwrap();
    assert_eq!((up.current.as_str(), up.previous.as_deref()), ("v2", Some("v1")));
    // The update answers once each moved instance listens again.
    assert_eq!(get_version(&a1).await.as_deref(), Some("two"), "serving the new version when update returns");
    assert_eq!(show(c, "hello-web/1/1").await.version, "v2");
    assert_eq!(show(c, "hello-web/1/2").await.version, "v1");
    let wrong = c.app_action::<AppInstallation>("hello-web/1", "update", Some(&web("other", "x"))).await;
    assert_eq!(code(wrong.unwrap_err()), ErrorCode::InvalidArgument, "an update must keep the title");

    // Revert swaps back; a restart of the stopped instance takes the current version.
    let back: AppInstallation = c.app_action("hello-web/1", "revert", None).await.unwrap();
    assert_eq!((back.current.as_str(), back.previous.as_deref()), ("v1", Some("v2")));
    assert_eq!(get_version(&a1).await.as_deref(), Some("one"), "serving the old version when revert returns");
    let r: AppInstance = c.app_action("hello-web/1/2", "restart", None).await.unwrap();
    assert_eq!(r.version, "v1");
    serving(c, "hello-web/1/2").await;
    answers(&a2, "one").await;

    // Suspend keeps the process where it is, unpublished; resume brings it back.
    let s: AppInstance = c.app_action("hello-web/1/1", "suspend", None).await.unwrap();
    assert_eq!(s.state, InstanceState::Suspended);
    assert!(s.published.is_empty());
    let pid = s.pid;
    let resumed: AppInstance = c.app_action("hello-web/1/1", "resume", None).await.unwrap();
    assert_eq!((resumed.state, resumed.pid), (InstanceState::Running, pid), "the same process carries on");
    answers(&a1, "one").await;

    // The log has stamped lines and the node's notes.
    let log = logs(c, "hello-web/1/1", false).await;
    assert!(log.lines().all(|l| Timestamp::parse(l.split(' ').next().unwrap_or("")).is_some()), "{log}");
    assert!(log.contains(" --- run "), "{log}");
    assert!(log.contains(" err ") && log.contains("GET /version"), "{log}");

    // Uninstall stops and deletes every instance, and their sandboxes.
    let sandboxes = [i1.sandbox.clone().unwrap(), i2.sandbox.clone().unwrap()];
    let gone: AppInstallation = c.app_action("hello-web/1", "uninstall", None).await.unwrap();
    assert_eq!(gone.state, flotilla_api::app::InstallationState::Uninstalled);
    assert!(gone.instances.is_empty(), "{:?}", gone.instances);
    for s in sandboxes {
        let e = c.get(&s).await.unwrap_err();
        assert_eq!(code(e), ErrorCode::NotFound, "sandbox {s} deleted");
    }
    assert_eq!(
        code(c.app_action::<AppInstallation>("hello-web/1", "uninstall", None).await.unwrap_err()),
        ErrorCode::NoOp
    );
    assert_eq!(
        code(c.app_action::<AppInstance>("hello-web/1", "start", None).await.unwrap_err()),
        ErrorCode::InvalidTransition
    );
    // The node first: it unmounts its names from the table as it stops.
    drop(env);
    let _ = table.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_twenty_racing_calls_exactly_one_wins() {
    let env = stop_apps_env();
    let c = &env.client;
    // It takes a second to stop, so every racing call lands while the winner works.
    let slow = envelope(serde_json::json!({
        "title": "racer",
        "command": ["sh", "-c", "trap 'sleep 1; exit 0' TERM; sleep 100001 & wait"],
        "restart": {"policy": "on-failure", "initial_delay": "0s"},
    }));
    install(c, &slow).await;
    start(c, "racer/1").await;
    serving(c, "racer/1/1").await;
    for (op, settled) in [
        ("suspend", InstanceState::Suspended),
        ("resume", InstanceState::Running),
        // Both take a second while the app handles its SIGTERM (a restart
        // from not-running would take milliseconds, and then a later call
        // could rightly win a second, sequential restart).
        ("restart", InstanceState::Running),
        ("stop", InstanceState::NotRunning),
    ] {
        let calls = (0..20).map(|_| {
            let c = c.clone();
            async move { c.app_action::<AppInstance>("racer/1/1", op, None).await }
        });
        let results = futures_util::future::join_all(calls).await;
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "{op}: {results:?}");
        for r in results.into_iter().filter_map(Result::err) {
            let code = code(r);
            assert!(
                matches!(code, ErrorCode::InProgress | ErrorCode::NoOp | ErrorCode::InvalidTransition),
                "{op}: a loser gets a stable code, not {code:?}"
            );
        }
        let i = until(c, "racer/1/1", settled, |i| settled != InstanceState::Running || i.pid.is_some()).await;
        let sandbox = i.sandbox.clone().unwrap();
        if settled == InstanceState::Running {
            assert_eq!(sleepers(&env, &sandbox).await, 1, "{op}: one process, never two");
        }
    }
    // Twenty uninstalls: one wins, the rest are no-ops.
    let calls = (0..20).map(|_| {
        let c = c.clone();
        async move { c.app_action::<AppInstallation>("racer/1", "uninstall", None).await }
    });
    let results = futures_util::future::join_all(calls).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_each_instance_runs_exactly_once_and_stopped_ones_stay_stopped() {
    let mut env = stop_apps_env();
    let c = env.client.clone();
    install(&c, &sleeper("keep", "always")).await;
    install(
        &c,
        &envelope(serde_json::json!({
            "title": "once", "command": ["sh", "-c", "echo done"], "restart": {"policy": "on-failure"},
        })),
    )
    .await;
    for _ in 0..3 {
        start(&c, "keep/1").await;
    }
    start(&c, "once/1").await;
    let before: Vec<AppInstance> =
        futures_util::future::join_all(["keep/1/1", "keep/1/2"].map(|a| serving(&c, a))).await;
    let stopped: AppInstance = c.app_action("keep/1/3", "stop", None).await.unwrap();
    assert_eq!(stopped.state, InstanceState::NotRunning);
    let finished = until(&c, "once/1/1", InstanceState::NotRunning, |_| true).await;
    assert!(finished.reason.as_deref().unwrap_or("").contains("status 0"), "{finished:?}");

    for round in 0..2 {
        env.node.kill9();
        env.node.start_again();
        for b in &before {
            let after = serving(&c, &b.address).await;
            assert_eq!(
                (after.pid, &after.sandbox, after.restarts),
                (b.pid, &b.sandbox, 0),
                "round {round}: re-adopted"
            );
            assert_eq!(sleepers(&env, after.sandbox.as_deref().unwrap()).await, 1, "round {round}: exactly once");
        }
        assert_eq!(show(&c, "keep/1/3").await.state, InstanceState::NotRunning, "a stopped instance stays stopped");
        let once = show(&c, "once/1/1").await;
        assert_eq!((once.state, once.restarts), (InstanceState::NotRunning, 0), "a finished instance never re-runs");
        assert_eq!(logs(&c, "once/1/1", false).await.matches(" out done").count(), 1);
    }

    // An instance whose process died while the node was down is restarted per its policy.
    let victim = show(&c, "keep/1/1").await;
    let sandbox = c.get(victim.sandbox.as_deref().unwrap()).await.unwrap();
    env.node.kill9();
    let _ = std::process::Command::new("kill").args(["-9", &common::agent_pid(&sandbox).to_string()]).status();
    env.node.start_again();
    let back = until(&c, "keep/1/1", InstanceState::Running, |i| i.pid.is_some() && i.restarts == 1).await;
    assert_eq!(sleepers(&env, back.sandbox.as_deref().unwrap()).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policies_back_off_and_give_up() {
    let env = stop_apps_env();
    let c = &env.client;
    // on-failure, doubling from 200 ms to 800 ms, at most 4 restarts a minute.
    install(
        c,
        &envelope(serde_json::json!({
            "title": "crash", "command": ["sh", "-c", "echo crashing; exit 3"],
            "restart": {"policy": "on-failure", "initial_delay": "200ms", "factor": 2.0, "max_delay": "800ms",
                        "max_attempts": 4, "window": "1m", "jitter": 0.0},
        })),
    )
    .await;
    start(c, "crash/1").await;
    let done = until(c, "crash/1/1", InstanceState::NotRunning, |_| true).await;
    assert_eq!(done.restarts, 4, "{done:?}");
    assert_eq!(done.last_exit.as_ref().and_then(|e| e.code), Some(3));
    assert!(done.reason.as_deref().unwrap_or("").contains("giving up"), "{done:?}");
    // The log: five runs, each started no sooner than its back-off after the last exit.
    let mut text = String::new();
    let body = c.app_logs("crash/1/1", &AppLogsQuery::default()).await.unwrap();
    text.push_str(&String::from_utf8_lossy(&body.collect().await.unwrap().to_bytes()));
    let dir = std::fs::read_dir(env.node.home().join("apps")).unwrap().next().unwrap().unwrap().path();
    let logs_dir = dir.join("installation-1/instances/instance-1/logs");
    let mut all = String::new();
    let mut files: Vec<_> = std::fs::read_dir(&logs_dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files {
        all.push_str(&std::fs::read_to_string(f).unwrap());
    }
    let stamp = |l: &str| Timestamp::parse(l.split(' ').next().unwrap()).unwrap().0;
    let starts: Vec<u64> = all.lines().filter(|l| l.contains(" --- run ")).map(stamp).collect();
    let exits: Vec<u64> = all.lines().filter(|l| l.contains(" --- exited with status 3")).map(stamp).collect();
    assert_eq!((starts.len(), exits.len()), (5, 5), "{all}");
    for (i, want) in [200u64, 400, 800, 800].iter().enumerate() {
        let gap = starts[i + 1] - exits[i];
        assert!(gap >= *want, "restart {} came {gap} ms after the exit, before its {want} ms back-off\n{all}", i + 1);
    }
    assert!(text.contains("out crashing"), "{text}");

    // never: one run, no restart. always: a clean exit restarts too.
    install(
        c,
        &envelope(serde_json::json!({
            "title": "never", "command": ["false"], "restart": {"policy": "never"},
        })),
    )
    .await;
    start(c, "never/1").await;
    let n = until(c, "never/1/1", InstanceState::NotRunning, |_| true).await;
    assert_eq!(n.restarts, 0);
    assert!(n.reason.unwrap().contains("never"));
    install(c, &envelope(serde_json::json!({
        "title": "always", "command": ["true"], "restart": {"policy": "always", "initial_delay": "50ms", "max_attempts": 2},
    })))
    .await;
    start(c, "always/1").await;
    let a = until(c, "always/1/1", InstanceState::NotRunning, |_| true).await;
    assert_eq!(a.restarts, 2, "{a:?}");
    // --previous is the run before the last.
    let prev = logs(c, "crash/1/1", true).await;
    assert!(prev.contains(" --- run 4 "), "{prev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_instance_is_quarantined_and_the_others_come_back() {
    let mut env = stop_apps_env();
    let c = env.client.clone();
    install(&c, &sleeper("q", "always")).await;
    start(&c, "q/1").await;
    start(&c, "q/1").await;
    let good = serving(&c, "q/1/2").await;
    serving(&c, "q/1/1").await;
    env.node.kill9();
    let app = std::fs::read_dir(env.node.home().join("apps")).unwrap().next().unwrap().unwrap().path();
    let bad = app.join("installation-1/instances/instance-1");
    std::fs::write(bad.join("state/not-running"), "").unwrap();
    std::fs::write(app.join("installation-1/instances/instance-2/garbage"), "ignored").unwrap();
    env.node.start_again();
    let after = serving(&c, "q/1/2").await;
    assert_eq!(after.pid, good.pid);
    let q = show(&c, "q/1/1").await;
    assert_eq!(q.state, InstanceState::Quarantined);
    assert!(q.reason.unwrap().contains("2 state files"));
    let e = c.app_action::<AppInstance>("q/1/1", "stop", None).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::Conflict, "a quarantined instance is left alone");
    // A damaged run record too.
    env.node.kill9();
    std::fs::write(app.join("installation-1/instances/instance-2/run.json"), "{not json").unwrap();
    env.node.start_again();
    let q2 = show(&c, "q/1/2").await;
    assert_eq!(q2.state, InstanceState::Quarantined);
    assert!(q2.reason.unwrap().contains("run.json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_update_leaves_a_consistent_version() {
    let mut env = stop_apps_env();
    let c = env.client.clone();
    install(&c, &sleeper("upd", "always")).await;
    start(&c, "upd/1").await;
    serving(&c, "upd/1/1").await;
    let app = std::fs::read_dir(env.node.home().join("apps")).unwrap().next().unwrap().unwrap().path();
    let inst = app.join("installation-1");
    for (round, delay_ms) in [0u64, 1, 3, 10, 30, 100].into_iter().enumerate() {
        let c2 = c.clone();
        let req = envelope(serde_json::json!({
            "title": "upd", "command": ["sh", "-c", format!("echo v{round}; exec sleep 100001")],
            "restart": {"policy": "always", "initial_delay": "0s"},
        }));
        let update = tokio::spawn(async move { c2.app_action::<AppInstallation>("upd/1", "update", Some(&req)).await });
        // Not a wait for anything: the crash point, spread over the update's
        // stages (stage, version dir, links, rolling the instance), as
        // crash.rs spreads its kills over a create.
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        env.node.kill9();
        let _ = update.await;
        env.node.start_again();
        // current names a complete version, the instance runs once on a version that exists.
        let a: AppInstallation = c.app("upd/1").await.unwrap();
        assert!(inst.join(&a.current).join("envelope.json").is_file(), "round {round}: {a:?}");
        assert!(a.versions.iter().all(|v| inst.join(v).join("envelope.json").is_file()));
        let i = serving(&c, "upd/1/1").await;
        assert!(a.versions.contains(&i.version), "round {round}: {i:?} on a version that exists: {a:?}");
        assert_eq!(sleepers(&env, i.sandbox.as_deref().unwrap()).await, 1, "round {round}");
        for e in std::fs::read_dir(&inst).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.ends_with(".new"), "round {round}: a half-swapped link {name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_is_checked_before_use_and_logs_follow_across_restarts() {
    let env = stop_apps_env();
    let c = &env.client;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("tick.sh");
    std::fs::write(&bin, "#!/bin/sh\necho tick $1\nsleep 0.3\nexit 1\n").unwrap();
    let sha = {
        use sha2::Digest;
        sha2::Sha256::digest(std::fs::read(&bin).unwrap()).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let mut req = envelope(serde_json::json!({
        "title": "tick", "binary": {"path": bin.display().to_string(), "sha256": "0".repeat(64)}, "args": ["hi"],
        "restart": {"policy": "on-failure", "initial_delay": "0s", "max_attempts": 3},
    }));
    let e = c.install_app(&req).await.unwrap_err();
    let ClientError::Api(api) = e else { panic!("an API error") };
    assert_eq!(api.details.unwrap()["field"], "binary.sha256", "{}", api.message);
    assert!(api.message.contains(&sha), "the error names the real digest: {}", api.message);
    req.envelope.binary.as_mut().unwrap().sha256 = sha;
    install(c, &req).await;
    start(c, "tick/1").await;
    let follow = c.app_logs("tick/1/1", &AppLogsQuery { follow: true, previous: false }).await.unwrap();
    let text = tokio::time::timeout(WAIT, follow.collect()).await.expect("follow ends when the instance stops");
    let text = String::from_utf8_lossy(&text.unwrap().to_bytes()).into_owned();
    assert_eq!(text.matches(" out tick hi").count(), 4, "four runs, followed across restarts:\n{text}");
    assert_eq!(show(c, "tick/1/1").await.state, InstanceState::NotRunning);
}

/// An app from a real image (a busybox-only root: only the static agent
/// runs there) on both backends: a process sandbox and a microVM, each
/// serving through its forwarded port and restarted after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_run_from_an_image_in_process_sandboxes_and_microvms() {
    let env = common::vm_env_with(common::VmKernel::Built, &["--stop-apps"]);
    let c = &env.client;
    let root = flotilla_testkit::images::busybox_root();
    let req = flotilla_api::ImportImageRequest { reference: "bb:1".into(), path: root.display().to_string() };
    let op = c.import_image(&req).await.unwrap();
    let op = c.wait_operation(&op.id, Some(WAIT), |_| {}).await.unwrap();
    assert_eq!(op.state, flotilla_api::OperationState::Succeeded, "{op:?}");
    for backend in ["process", "vm"] {
        let title = format!("bb-{backend}");
        let mut e = serde_json::json!({
            "title": title, "image": "bb:1", "backend": backend,
            "command": ["sh", "-c", format!("echo {backend} > /workspace/version; exec httpd -f -p 127.0.0.1:8080 -h /workspace")],
            "ports": [8080],
            "restart": {"policy": "always", "initial_delay": "0s"},
        });
        if backend == "vm" {
            e["resources"] = serde_json::json!({"memory": "256M"});
        }
        install(c, &envelope(e)).await;
        let i = start(c, &format!("{title}/1")).await;
        let i = serving(c, &i.address).await;
        answers(&i.ports[0].address, backend).await;
        let sandbox = c.get(i.sandbox.as_deref().unwrap()).await.unwrap();
        assert_eq!(sandbox.backend.as_str(), backend);
        // Kill the server inside: the instance comes back in the same sandbox, same address.
        env.ok(&sandbox.id, "kill -9 $(pidof httpd)").await;
        let back = until(c, &i.address, InstanceState::Running, |x| x.restarts == 1 && x.pid.is_some()).await;
        assert_eq!((back.sandbox, back.ports), (i.sandbox.clone(), i.ports.clone()));
        answers(&i.ports[0].address, backend).await;
        let _: AppInstallation = c.app_action(&format!("{title}/1"), "uninstall", None).await.unwrap();
    }
}

/// The CLI end to end with a TOML envelope as a person writes it: units,
/// tables, a relative binary path; `--json` on what prints objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_installs_a_toml_envelope_and_shows_its_instances() {
    let env = stop_apps_env();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("greet.sh"), "#!/bin/sh\necho \"hello $1 from $GREETER\"\nexec sleep 100001\n")
        .unwrap();
    let sha = {
        use sha2::Digest;
        let data = std::fs::read(dir.path().join("greet.sh")).unwrap();
        sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let toml = format!(
        r#"title = "greeter"
binary = {{ path = "greet.sh", sha256 = "{sha}" }}
args = ["world"]
env = {{ GREETER = "flotilla" }}
stop_timeout = "2s"
[resources]
memory = "128M"
pids = 64
[restart]
policy = "always"
initial_delay = "500ms"
max_delay = "1m"
"#
    );
    let file = dir.path().join("greeter.toml");
    std::fs::write(&file, toml).unwrap();
    let cli = |args: &[&str]| {
        let (code, out, err) = common::cli(env.node.home(), args);
        assert_eq!(code, 0, "flotilla {args:?}: {err}");
        out.trim().to_string()
    };
    assert_eq!(cli(&["app", "install", file.to_str().unwrap()]), "greeter/1");
    assert_eq!(cli(&["app", "start", "greeter/1"]), "greeter/1/1");
    common::eventually(WAIT, "the greeting in the log", || async {
        let log = cli(&["app", "logs", "greeter/1/1"]);
        log.contains(" out hello world from flotilla").then_some(())
    })
    .await;
    let list: Vec<AppInstallation> = serde_json::from_str(&cli(&["app", "ls", "--json"])).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].instances[0].state, InstanceState::Running);
    assert_eq!(list[0].envelope.restart.initial_delay, "500ms");
    let shown: AppInstance = serde_json::from_str(&cli(&["app", "show", "greeter/1/1", "--json"])).unwrap();
    let sandbox = c_sandbox(&env, &shown).await;
    assert_eq!(sandbox.resources.memory_bytes, Some(128 << 20), "the envelope's limits reach the sandbox");
    assert_eq!(sandbox.labels.get(flotilla_node::apps::INSTANCE_LABEL).map(String::as_str), Some("greeter/1/1"));
    let table = cli(&["app", "ls"]);
    assert!(table.starts_with("ADDRESS") && table.contains("greeter/1/1  running"), "{table}");
    let stopped: AppInstance = serde_json::from_str(&cli(&["app", "stop", "greeter/1/1", "--json"])).unwrap();
    assert_eq!(stopped.state, InstanceState::NotRunning);
    // Every transition is on the event feed.
    let feed = common::events_until(env.node.home(), "\"state\":\"not-running\"").await;
    assert!(feed.contains("event: app_installation") && feed.contains("\"action\":\"installed\""), "{feed}");
    for state in ["launching", "running", "dying", "not-running"] {
        assert!(feed.contains(&format!("\"state\":\"{state}\"")), "no {state} event in {feed}");
    }
    // A bad envelope is refused by the CLI before it is sent, naming the field.
    std::fs::write(&file, "title = \"x\"\ncommand = [\"true\"]\n[restart]\nfactor = 0.1\n").unwrap();
    let (code, _, err) = common::cli(env.node.home(), &["app", "install", file.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("restart.factor"), "{err}");
}

async fn c_sandbox(env: &common::Env, i: &AppInstance) -> flotilla_api::Sandbox {
    env.client.get(i.sandbox.as_deref().expect("a sandbox")).await.expect("the sandbox")
}

/// A normal shutdown leaves instances running (unless `--stop-apps`): the
/// next node re-adopts the same processes, and the forwarded address
/// answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shutdown_leaves_instances_running_for_the_next_node() {
    let mut env = common::env();
    let c = env.client.clone();
    install(&c, &web("stay", "same")).await;
    let i = start(&c, "stay/1").await;
    let i = serving(&c, &i.address).await;
    answers(&i.ports[0].address, "same").await;
    env.node.restart();
    let after = serving(&c, &i.address).await;
    assert_eq!((after.pid, after.restarts, &after.ports), (i.pid, 0, &i.ports), "the same process, re-adopted");
    answers(&i.ports[0].address, "same").await;
    // Clean up: this node keeps apps at shutdown.
    let _: AppInstallation = c.app_action("stay/1", "uninstall", None).await.unwrap();
}

/// A self-update with instances serving: the same processes carry on
/// after the hand-over, at the same forwarded addresses, and no request
/// sent to them meanwhile fails (their listening sockets go to the next
/// image; connections wait in the backlog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_keep_serving_through_a_self_update() {
    let env = stop_apps_env();
    let c = env.client.clone();
    install(&c, &web("through", "v")).await;
    let mut before = Vec::new();
    for _ in 0..3 {
        let i = start(&c, "through/1").await;
        before.push(serving(&c, &i.address).await);
    }
    for i in &before {
        answers(&i.ports[0].address, "v").await;
    }
    let dir = tempfile::tempdir().unwrap();
    let candidate = dir.path().join("flotilla");
    let mut bytes = std::fs::read(common::BIN).unwrap();
    bytes.extend_from_slice(b"\nanother build\n");
    std::fs::write(&candidate, bytes).unwrap();
    std::fs::set_permissions(&candidate, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let addresses: Vec<String> = before.iter().map(|i| i.ports[0].address.clone()).collect();
    let traffic = tokio::spawn({
        let running = running.clone();
        async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut n = 0;
            while running.load(std::sync::atomic::Ordering::SeqCst) {
                let a = &addresses[n % addresses.len()];
                match get_version(a).await {
                    Some(v) if v == "v" => ok += 1,
                    other => failed.push(format!("{a}: {other:?}")),
                }
                n += 1;
            }
            (ok, failed)
        }
    });
    let req = flotilla_api::NodeUpdateRequest { binary: candidate.display().to_string(), sha256: None };
    let u: flotilla_api::NodeUpdate =
        c.http().json(http::Method::POST, "/v1/node/update", Some(&req)).await.expect("the update is accepted");
    let home = env.node.home().to_path_buf();
    common::eventually(WAIT, "the new version to commit", || async {
        let done = !home.join("update.pending").exists()
            && std::fs::read(home.join("update.last"))
                .ok()
                .and_then(|b| serde_json::from_slice::<flotilla_api::UpdateOutcome>(&b).ok())
                .is_some_and(|o| o.to == u.to.id && o.result == flotilla_api::UpdateResult::Committed);
        done.then_some(())
    })
    .await;
    for b in &before {
        let after = serving(&c, &b.address).await;
        assert_eq!((after.pid, &after.ports, after.restarts), (b.pid, &b.ports, 0), "the same process, re-adopted");
    }
    // Some requests after the switch, then stop the traffic.
    for b in &before {
        answers(&b.ports[0].address, "v").await;
    }
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = traffic.await.unwrap();
    assert!(ok > 0);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the hand-over: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
}
