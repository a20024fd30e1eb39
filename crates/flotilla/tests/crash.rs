//! Crash recovery: the node is killed with -9 in the middle of a create, an
//! import and a delete, many times; after every restart no process, cgroup,
//! mount or directory has leaked, no operation is left running, and the
//! registry tells the truth about what exists.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use flotilla_api::{CreateSandboxRequest, NetworkMode, OperationState, Sandbox, SandboxState, WorkspaceQuery};
use flotilla_sandbox::process::ProcessBackend;

/// Where in the work the node dies: how long after the request was sent,
/// in microseconds, for (create, import, delete). Not waits for anything:
/// these are the crash points, spread over the tens of milliseconds a
/// create takes and the few a delete takes.
const CRASH_AFTER_US: &[(u64, u64, u64)] = &[
    (0, 0, 0),
    (5_000, 5_000, 30),
    (12_000, 20_000, 60),
    (20_000, 50_000, 100),
    (24_000, 100_000, 150),
    (28_000, 200_000, 400),
    (80_000, 400_000, 2_000),
];

/// Every cgroup directory of sandbox `id`, in any hierarchy.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let mut found = Vec::new();
    for root in roots {
        let Ok(rd) = std::fs::read_dir(&root) else { continue };
        for group in rd.flatten() {
            if group.file_name().to_string_lossy().starts_with("flotilla-") {
                let d = group.path().join(id);
                if d.is_dir() {
                    found.push(d);
                }
            }
        }
    }
    found
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Pids of live network helpers started for one of `pids`.
fn helpers_for(pids: &BTreeSet<i32>) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<String> = cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.first().is_some_and(|a| a.ends_with("slirp4netns") || a.ends_with("pasta"))
            && args.iter().any(|a| a.parse::<i32>().is_ok_and(|p| pids.contains(&p)))
            && alive(pid)
        {
            out.push(pid);
        }
    }
    out
}

struct Tracker {
    /// Every sandbox id this test ever asked for.
    ids: BTreeSet<String>,
    /// Every sandbox init pid the node ever reported.
    pids: BTreeSet<i32>,
}

impl Tracker {
    async fn learn(&mut self, env: &common::Env) {
        for op in env.client.operations().await.expect("operations") {
            self.ids.insert(op.target.clone());
            for st in &op.steps {
                if st.name == "created"
                    && let Some(pid) = st.detail.as_deref().and_then(|d| d.strip_prefix("pid ")?.parse().ok())
                {
                    self.pids.insert(pid);
                }
            }
        }
    }

    /// The invariants that must hold after every restart.
    async fn check(&mut self, env: &common::Env, when: &str) -> BTreeMap<String, Sandbox> {
        self.learn(env).await;
        let ctx = |what: String| format!("after {when}: {what}\nnode log:\n{}", env.node.log());
        let listed: BTreeMap<String, Sandbox> =
            env.client.list().await.expect("list").into_iter().map(|s| (s.id.clone(), s)).collect();

        // No operation is left hanging.
        for op in env.client.operations().await.unwrap() {
            assert_ne!(op.state, OperationState::Running, "{}", ctx(format!("operation still running: {op:?}")));
            if op.state == OperationState::Failed {
                let e = op.error.as_ref().expect("a failed operation says why");
                assert!(!e.message.is_empty());
            }
        }
        // Directories: only for sandboxes the registry knows.
        let home = env.node.home();
        for d in std::fs::read_dir(home.join("sandboxes")).unwrap().flatten() {
            let id = d.file_name().to_string_lossy().into_owned();
            assert!(listed.contains_key(&id), "{}", ctx(format!("leaked directory of sandbox {id}")));
        }
        // Cgroups (and so processes and helpers): exactly the running ones.
        let mut running_pids = BTreeSet::new();
        for id in &self.ids {
            let cgs = cgroup_dirs(id);
            match listed.get(id) {
                Some(s) if s.state == SandboxState::Running => {
                    assert!(!cgs.is_empty(), "{}", ctx(format!("running sandbox {id} has no cgroup")));
                    running_pids.insert(common::agent_pid(s));
                    let out = env.ok(id, "echo alive").await;
                    assert_eq!(out, "alive\n", "{}", ctx(format!("running sandbox {id} does not answer")));
                }
                Some(s) => {
                    assert!(cgs.is_empty(), "{}", ctx(format!("{} sandbox {id} left cgroups {cgs:?}", s.state)));
                    assert!(s.state != SandboxState::Creating, "{}", ctx(format!("{id} still creating")));
                }
                None => assert!(cgs.is_empty(), "{}", ctx(format!("deleted sandbox {id} left cgroups {cgs:?}"))),
            }
        }
        for pid in &self.pids {
            if alive(*pid) {
                assert!(
                    running_pids.contains(pid),
                    "{}",
                    ctx(format!("pid {pid} lives on but no running sandbox owns it"))
                );
            }
        }
        let dead: BTreeSet<i32> = self.pids.difference(&running_pids).copied().collect();
        let helpers = helpers_for(&dead);
        assert!(helpers.is_empty(), "{}", ctx(format!("network helpers of dead sandboxes live on: {helpers:?}")));
        // No half-spawned sandbox child (a fork of a node, stuck before its
        // exec) outlives the node that made it.
        let node_pid = env.node.pid().expect("node running") as i32;
        let home_s = home.to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if pid != node_pid && cmd.contains(" node --home ") && cmd.contains(&home_s) && alive(pid) {
                panic!("{}", ctx(format!("a fork of the node lives on: pid {pid} `{cmd}`")));
            }
        }
        // Mounts live in the sandboxes' own namespaces: none on the host.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.lines().any(|l| l.contains(home_s.as_str())),
            "{}",
            ctx("mounts under the node's home leaked onto the host".into())
        );
        listed
    }
}

async fn crash_and_restart(env: &mut common::Env) {
    env.node.kill9();
    env.node.start_again();
}

/// A request body that sends a tar stream forever, a file at a time.
type FrameStream = futures_util::stream::BoxStream<'static, Result<hyper::body::Frame<Bytes>, std::io::Error>>;

fn endless_tar() -> (http_body_util::StreamBody<FrameStream>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(4);
    let feeder = tokio::spawn(async move {
        for n in 0.. {
            let data = vec![b'x'; 64 << 10];
            let mut h = tar::Header::new_gnu();
            h.set_path(format!("f/{n}.bin")).unwrap();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            let mut chunk = h.as_bytes().to_vec();
            chunk.extend_from_slice(&data);
            if tx.send(Ok(hyper::body::Frame::data(Bytes::from(chunk)))).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    (http_body_util::StreamBody::new(futures_util::StreamExt::boxed(stream)), feeder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_create_import_and_delete_leaks_nothing() {
    let mut env = common::env();
    let mut t = Tracker { ids: BTreeSet::new(), pids: BTreeSet::new() };
    let outbound = ProcessBackend::network_helper().is_some();

    // A long-lived sandbox that every import goes into, re-adopted each time.
    let victim = env.sandbox().await;

    for (round, &(create_us, import_us, delete_us)) in CRASH_AFTER_US.iter().enumerate() {
        // 1. Mid create (every other one with a network helper).
        let net = if outbound && round % 2 == 1 { NetworkMode::Outbound } else { NetworkMode::None };
        let op = env
            .client
            .create_operation(&CreateSandboxRequest { network: net, ..Default::default() })
            .await
            .expect("create accepted");
        t.ids.insert(op.target.clone());
        tokio::time::sleep(Duration::from_micros(create_us)).await;
        crash_and_restart(&mut env).await;
        let listed = t.check(&env, &format!("a crash {create_us}us into create (round {round})")).await;
        let after = env.client.operation(&op.id).await.expect("the operation survives the restart");
        assert!(after.state.is_done(), "{after:?}");
        eprintln!(
            "round {round}: create crashed after {create_us}us: operation {} after steps {:?}, sandbox {:?}",
            after.state,
            after.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            listed.get(&op.target).map(|s| s.state)
        );
        if let Some(s) = listed.get(&op.target) {
            // Whatever it became, it is usable: a failed one starts again.
            if s.state == SandboxState::Failed {
                assert!(s.error.is_some(), "a failed sandbox says why: {s:?}");
                let s = env.client.action(&s.id, "start").await.expect("a sandbox failed by a crash starts again");
                assert_eq!(s.state, SandboxState::Running);
            }
        }

        // 2. Mid import into a running sandbox.
        let (body, feeder) = endless_tar();
        let agent = env.client.sandbox(&victim.id);
        let import = tokio::spawn(async move { agent.put_workspace(body, None, &WorkspaceQuery::default()).await });
        tokio::time::sleep(Duration::from_micros(import_us)).await;
        crash_and_restart(&mut env).await;
        let r = tokio::time::timeout(Duration::from_secs(20), import).await.expect("the import ended").unwrap();
        assert!(r.is_err(), "an import cut by a crash cannot report success");
        feeder.abort();
        let listed = t.check(&env, &format!("a crash {import_us}us into an import (round {round})")).await;
        assert_eq!(listed[&victim.id].state, SandboxState::Running, "the victim was re-adopted");

        // 3. Mid delete.
        let doomed = env.sandbox().await;
        t.ids.insert(doomed.id.clone());
        let client = env.client.clone();
        let id = doomed.id.clone();
        let delete = tokio::spawn(async move { client.delete(&id).await });
        tokio::time::sleep(Duration::from_micros(delete_us)).await;
        crash_and_restart(&mut env).await;
        let _ = delete.await;
        let listed = t.check(&env, &format!("a crash {delete_us}us into delete (round {round})")).await;
        eprintln!(
            "round {round}: delete crashed after {delete_us}us: sandbox {:?}",
            listed.get(&doomed.id).map(|s| s.state)
        );
        if let Some(s) = listed.get(&doomed.id) {
            // The delete never reached the node: the sandbox is intact, and
            // deleting it now works.
            assert_eq!(s.state, SandboxState::Running, "{s:?}");
            env.client.delete(&doomed.id).await.expect("delete after the crash");
        }
    }

    // Finally everything can be removed, also the sandboxes a crash failed.
    for s in env.client.list().await.unwrap() {
        env.client.delete(&s.id).await.unwrap_or_else(|e| panic!("rm {}: {e:?}", s.id));
    }
    t.check(&env, "removing everything").await;
    let left: Vec<PathBuf> =
        std::fs::read_dir(env.node.home().join("sandboxes")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_the_registry_does_not_know_are_reaped_at_start() {
    let mut env = common::env();
    let s = env.sandbox().await;
    let pid = common::agent_pid(&s);
    // Lose the registry's memory of a running sandbox: what is left on the
    // host is an orphan (a process, a cgroup, a directory).
    env.node.kill9();
    for f in ["node.db", "node.db-wal", "node.db-shm"] {
        let _ = std::fs::remove_file(env.node.home().join(f));
    }
    // An orphan directory too, as a crash between mkdir and record would leave.
    let stray = env.node.home().join("sandboxes/000000stray0");
    std::fs::create_dir_all(stray.join("workspace")).unwrap();
    env.node.start_again();
    assert!(env.client.get(&s.id).await.is_err(), "the registry forgot it");
    common::eventually(Duration::from_secs(10), "the orphan's process to be killed", || async {
        (!alive(pid)).then_some(())
    })
    .await;
    assert!(cgroup_dirs(&s.id).is_empty(), "orphan cgroup left");
    assert!(!env.node.home().join("sandboxes").join(&s.id).exists(), "orphan directory left");
    assert!(!stray.exists(), "stray directory left");
    assert!(env.node.log().contains("orphan"), "the janitor logs what it reaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_rm_work_on_broken_sandboxes_and_twice() {
    let env = common::env();
    // A hung agent: stopped with SIGSTOP, it answers nothing.
    let hung = env.sandbox().await;
    let pid = common::agent_pid(&hung);
    assert!(std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
    for _ in 0..2 {
        let s = env.client.action(&hung.id, "stop").await.expect("stop of a hung sandbox");
        assert_eq!(s.state, SandboxState::Stopped);
    }
    // Half its files gone.
    let dir = env.node.home().join("sandboxes").join(&hung.id);
    std::fs::remove_dir_all(dir.join("workspace")).unwrap();
    env.client.delete(&hung.id).await.expect("rm with files half gone");
    let again = env.client.delete(&hung.id).await.unwrap_err();
    assert_eq!(again.to_api().code, flotilla_api::ErrorCode::NotFound);
    // The CLI treats a repeated rm as done.
    let out = std::process::Command::new(common::BIN)
        .args(["sandbox", "rm", &hung.id, "--home"])
        .arg(env.node.home())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A dead init: killed behind the node's back.
    let dead = env.sandbox().await;
    let pid = common::agent_pid(&dead);
    assert!(std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    common::eventually(Duration::from_secs(10), "the node to notice", || async {
        (env.client.get(&dead.id).await.ok()?.state == SandboxState::Failed).then_some(())
    })
    .await;
    env.client.action(&dead.id, "stop").await.expect("stop of a dead sandbox");
    env.client.action(&dead.id, "stop").await.expect("stop again");
    env.client.delete(&dead.id).await.expect("rm of a dead sandbox");
    assert!(!Path::new(&env.node.home().join("sandboxes").join(&dead.id)).exists());
}
