//! Resource limits: a fork bomb and a memory hog are contained to their
//! sandbox, and the node and the sandbox itself stay usable.

mod common;

use flotilla_api::{CreateSandboxRequest, ExecRequest, Resources};

on_both_backends!(a_fork_bomb_is_contained, a_memory_hog_is_killed_and_the_sandbox_survives);

/// A process sandbox's task limit is its cgroup's; a microVM's is a cgroup
/// inside the guest that its init and every command live in.
async fn a_fork_bomb_is_contained(kind: common::Kind) {
    let env = common::env_for(kind);
    let req = env.request().await;
    let s = env
        .create(CreateSandboxRequest { resources: Resources { pids: Some(64), ..req.resources.clone() }, ..req })
        .await;
    let bomb = ExecRequest {
        argv: vec!["bash".into(), "-c".into(), "f() { f | f & }; f; sleep 3".into()],
        timeout_ms: Some(4000),
        ..Default::default()
    };
    let _ = env.exec(&s.id, bomb).await;
    // The node answers and the sandbox recovers once the bomb is gone.
    env.client.info().await.unwrap();
    let out = common::eventually(std::time::Duration::from_secs(20), "the sandbox to recover", || {
        let c = env.client.sandbox(&s.id);
        async move {
            let mut stream = c
                .exec(&ExecRequest { argv: vec!["sh".into(), "-c".into(), "echo alive".into()], ..Default::default() })
                .await
                .ok()?;
            let mut out = Vec::new();
            let st = flotilla_agent::client::drain_exec(&mut stream, &mut out, &mut std::io::sink()).await.ok()?;
            st.success().then_some(out)
        }
    })
    .await;
    assert_eq!(out, b"alive\n");
    // Other sandboxes never noticed.
    let other = env.sandbox().await;
    env.ok(&other.id, "true").await;
}

/// A process sandbox gets a 64 MiB cgroup limit; a microVM's memory is its
/// guest's (256 MiB: its kernel needs some), where the guest's OOM killer
/// picks the hog and never init (the agent).
async fn a_memory_hog_is_killed_and_the_sandbox_survives(kind: common::Kind) {
    let env = common::env_for(kind);
    let memory = if kind == common::Kind::Vm { 256 << 20 } else { 64 << 20 };
    let s = env
        .create(CreateSandboxRequest {
            resources: Resources { memory_bytes: Some(memory), ..Default::default() },
            ..env.request().await
        })
        .await;
    // The node's describe counts what its running sandboxes are limited to
    // (what a scheduler places by).
    assert!(env.client.info().await.unwrap().allocated_memory_bytes >= memory);
    // `tail` keeps its current line in memory; a newline-free stream makes
    // it grow without bound.
    let (_, _, st) = env.sh(&s.id, "head -c 1G /dev/zero | tail -n 1 >/dev/null").await;
    assert!(!st.success(), "the hog finished: {st:?}");
    assert_eq!(env.ok(&s.id, "echo alive").await, "alive\n");
    assert_eq!(env.client.get(&s.id).await.unwrap().state, flotilla_api::SandboxState::Running);
    // Limits change live.
    let upd = flotilla_api::UpdateSandboxRequest {
        resources: Some(Resources { pids: Some(100), ..Default::default() }),
        ..Default::default()
    };
    let after = env.client.update(&s.id, &upd).await.unwrap();
    assert_eq!(after.resources.pids, Some(100));
    assert_eq!(after.resources.memory_bytes, Some(memory));
}

/// A node keeps at most `--max-sandboxes` (each holds a uid range): past
/// it a create is refused, saying so, until one is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_per_node_are_capped() {
    let env = common::env_with(&["--max-sandboxes", "2"]);
    let a = env.sandbox().await;
    let _b = env.sandbox().await;
    let e = env.client.create(&CreateSandboxRequest::default()).await.unwrap_err();
    let shown = format!("{e:?}");
    assert!(shown.contains("2 sandboxes") && shown.contains("--max-sandboxes"), "{shown}");
    env.client.delete(&a.id).await.unwrap();
    env.sandbox().await;
}

/// A process sandbox with a disk limit writes until ENOSPC, in its
/// workspace and its tmpfs alike; the node and
/// other sandboxes are untouched, and deleting it gives everything back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_limit_ends_in_enospc_and_touches_nothing_else() {
    let env = common::env();
    let req = CreateSandboxRequest {
        resources: Resources { disk_bytes: Some(32 << 20), ..Default::default() },
        ..Default::default()
    };
    let s = env.create(req).await;
    let other = env.sandbox().await;
    // (An image sandbox's copy-on-write layer sits beside the workspace, on
    // the same filesystem; the host image's root is read-only.)
    for path in ["/workspace/big", "/tmp/big", "/dev/shm/big"] {
        let (out, err, st) = env.sh(&s.id, &format!("dd if=/dev/zero of={path} bs=1M count=64 2>&1")).await;
        assert!(!st.success(), "{path}: wrote 64 MiB on a 32 MiB disk: {out}{err}");
        assert!(out.contains("No space left on device"), "{path}: {out}{err}");
        env.ok(&s.id, &format!("rm {path}")).await;
    }
    // Room again once freed; the other sandbox writes as it likes.
    env.ok(&s.id, "dd if=/dev/zero of=/workspace/ok bs=1M count=8 2>/dev/null").await;
    env.ok(&other.id, "dd if=/dev/zero of=/workspace/big bs=1M count=64 2>/dev/null").await;
    let df = env.ok(&s.id, "df -k /workspace | tail -1").await;
    let size_k: u64 = df.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((20_000..=33_000).contains(&size_k), "the workspace is not 32 MiB: {df}");
    // Too small to be a filesystem: refused, saying so.
    let tiny = CreateSandboxRequest {
        resources: Resources { disk_bytes: Some(1 << 20), ..Default::default() },
        ..Default::default()
    };
    let e = env.client.create(&tiny).await.map(|s| s.error).unwrap_or_else(|e| Some(format!("{e:?}")));
    assert!(format!("{e:?}").contains("at least 16 MiB"), "{e:?}");
    // Deleted: its filesystem is unmounted and its image gone.
    env.client.delete(&s.id).await.unwrap();
    let image = env.node.home().join("disks").join(format!("{}.img", s.id));
    flotilla_testkit::wait_until(std::time::Duration::from_secs(10), "the disk to go", || {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        (!image.exists() && !mounts.contains(&s.id)).then_some(())
    });
}
