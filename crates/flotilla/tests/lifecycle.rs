//! The lifecycle through the real binary and API: create with its boot
//! steps, show, set, stop/start, rm, TTLs, and a node restart that
//! re-adopts running sandboxes.

mod common;

use std::process::Command;
use std::time::Duration;

use flotilla_api::{CreateSandboxRequest, SandboxState};

on_both_backends!(
    expired_sandboxes_are_reaped,
    a_crashed_node_re_adopts_its_running_sandboxes,
    the_node_shuts_down_promptly_with_streams_open,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_a_sandbox_from_create_to_rm() {
    let env = common::env();
    let (code, out, err) = common::cli(
        env.node.home(),
        &["sandbox", "create", "--name", "box", "--label", "team=ci", "--ttl", "1h", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let s: flotilla_api::Sandbox = serde_json::from_str(&out).unwrap();
    assert_eq!((s.name.as_str(), s.state), ("box", SandboxState::Running));
    let steps: Vec<&str> = s.steps.iter().map(|st| st.name.as_str()).collect();
    assert_eq!(steps, ["create_requested", "created", "agent_up"]);
    let delete_at = s.delete_at.expect("a deadline");
    let left = s.created_at.until(delete_at);
    assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600), "{left:?}");

    // Exit codes pass through; output streams.
    let (code, out, _) = common::cli(env.node.home(), &["sandbox", "exec", "box", "--", "sh", "-c", "echo hi; exit 9"]);
    assert_eq!((code, out.as_str()), (9, "hi\n"));
    // put a directory, get it back.
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir(src.path().join("d")).unwrap();
    std::fs::write(src.path().join("d/f.txt"), "payload").unwrap();
    let (code, _, err) =
        common::cli(env.node.home(), &["sandbox", "put", "box", "--dir", "in", &src.path().display().to_string()]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = common::cli(env.node.home(), &["sandbox", "exec", "box", "--", "cat", "/workspace/in/d/f.txt"]);
    assert_eq!(out, "payload");
    let tarfile = src.path().join("out.tar");
    let (code, _, err) =
        common::cli(env.node.home(), &["sandbox", "get", "box", "--dir", "in", "-o", &tarfile.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    let listing = Command::new("tar").arg("tf").arg(&tarfile).output().unwrap();
    assert!(String::from_utf8_lossy(&listing.stdout).contains("d/f.txt"));
    // ls, show, set.
    let (_, out, _) = common::cli(env.node.home(), &["sandbox", "ls"]);
    assert!(out.contains("box") && out.contains("running"), "{out}");
    let (code, out, _) =
        common::cli(env.node.home(), &["sandbox", "set", "box", "--ttl", "0", "--label", "team=", "--json"]);
    assert_eq!(code, 0);
    let s: flotilla_api::Sandbox = serde_json::from_str(&out).unwrap();
    assert!(s.delete_at.is_none() && s.labels.is_empty());
    // stop twice, start, rm; a wrong id is a clear error.
    assert_eq!(common::cli(env.node.home(), &["sandbox", "stop", "box"]).0, 0);
    assert_eq!(common::cli(env.node.home(), &["sandbox", "stop", "box"]).0, 0);
    let (code, _, err) = common::cli(env.node.home(), &["sandbox", "exec", "box", "--", "true"]);
    assert!(code != 0 && err.contains("stopped"), "{err}");
    assert_eq!(common::cli(env.node.home(), &["sandbox", "start", "box"]).0, 0);
    assert_eq!(common::cli(env.node.home(), &["sandbox", "rm", "box"]).0, 0);
    let (code, _, err) = common::cli(env.node.home(), &["sandbox", "show", "box"]);
    assert!(code != 0 && err.contains("no sandbox"), "{err}");
    let (code, out, _) = common::cli(env.node.home(), &["info", "--json"]);
    assert_eq!(code, 0);
    let info: flotilla_api::NodeInfo = serde_json::from_str(&out).unwrap();
    assert!(info.cpus >= 1 && !info.backends.is_empty());
}

async fn expired_sandboxes_are_reaped(kind: common::Kind) {
    let env = common::env_for(kind);
    let s = env.create(CreateSandboxRequest { ttl_s: Some(1), ..env.request().await }).await;
    let client = env.client.clone();
    let id = s.id.clone();
    common::eventually(Duration::from_secs(15), "the janitor to delete the sandbox", || {
        let c = client.clone();
        let id = id.clone();
        async move { c.get(&id).await.is_err().then_some(()) }
    })
    .await;
    assert!(!env.node.home().join("sandboxes").join(&s.id).exists(), "its files were left behind");
    assert!(!env.node.home().join("vms").join(&s.id).exists(), "its disks were left behind");
}

async fn a_crashed_node_re_adopts_its_running_sandboxes(kind: common::Kind) {
    let mut env = common::env_for(kind);
    let s = env.sandbox().await;
    env.ok(&s.id, "echo before > /workspace/f").await;
    env.node.kill9();
    env.node.start_again();
    let after = env.client.get(&s.id).await.unwrap();
    assert_eq!(after.state, SandboxState::Running, "{after:?}");
    assert_eq!(env.ok(&s.id, "cat /workspace/f").await, "before\n");
    // A graceful stop of the node stops its sandboxes, and a restart shows
    // them stopped, workspace intact.
    env.node.restart();
    let again = env.client.get(&s.id).await.unwrap();
    assert_eq!(again.state, SandboxState::Stopped);
    env.client.action(&s.id, "start").await.unwrap();
    assert_eq!(env.ok(&s.id, "cat /workspace/f").await, "before\n");
}

async fn the_node_shuts_down_promptly_with_streams_open(kind: common::Kind) {
    let mut env = common::env_for(kind);
    let s = env.sandbox().await;
    let mut stream = env
        .client
        .sandbox(&s.id)
        .exec(&flotilla_api::ExecRequest { argv: vec!["sleep".into(), "3600".into()], ..Default::default() })
        .await
        .unwrap();
    let started = std::time::Instant::now();
    env.node.stop();
    assert!(started.elapsed() < Duration::from_secs(10), "shutdown waited {:?} for an open stream", started.elapsed());
    // The stream has ended (with no exit frame: the sandbox was stopped).
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Ok(Some(f)) if f.kind == flotilla_api::FrameKind::Exit => return Some(f),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    })
    .await;
    assert!(matches!(end, Ok(None)), "the stream outlived its node: {end:?}");
}
