//! MicroVM sandboxes (`--backend vm`) through the real node: QEMU on the
//! accelerator the node probes (TCG on hosts whose /dev/kvm cannot boot a
//! stock kernel), the Debian cloud kernel, the static `flotilla` as the
//! guest's init, the agent over virtio-serial.
//!
//! Each test boots its own VMs; a boot that hangs is cut off by the node's
//! deadline and retried, so a test sees a slow create, never a stuck one.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use flotilla_api::{
    BackendKind, CreateSandboxRequest, ImportImageRequest, NetworkMode, OperationState, Resources, SandboxState,
    UpdateSandboxRequest, VmPoolRequest, WorkspaceQuery,
};

/// Starts a node that boots microVMs with a static build of this tree, on
/// the kernel Flotilla builds.
fn vm_env() -> common::Env {
    common::vm_env(common::VmKernel::Built)
}

/// Imports a minimal root filesystem (a shell and a few tools from the
/// host) as `vmtest:1`.
async fn image(env: &common::Env) -> String {
    let dir = env.node.home().join("rootfs-src");
    let bins = [
        "/bin/sh",
        "/bin/cat",
        "/bin/ls",
        "/bin/echo",
        "/bin/uname",
        "/bin/grep",
        "/bin/tr",
        "/usr/bin/cut",
        "/bin/date",
        "/usr/bin/od",
    ];
    flotilla_testkit::minimal_rootfs(&dir, &bins, &[]);
    let req = ImportImageRequest { reference: "vmtest:1".into(), path: dir.display().to_string() };
    let op = env.client.import_image(&req).await.unwrap();
    let op = env.client.wait_operation(&op.id, Some(Duration::from_secs(120)), |_| {}).await.unwrap();
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    "vmtest:1".into()
}

fn vm(image: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        image: Some(image.into()),
        backend: BackendKind::Vm,
        resources: Resources { memory_bytes: Some(256 << 20), ..Default::default() },
        ..Default::default()
    }
}

/// QEMU processes started for this node's data directory.
fn qemus(home: &Path) -> Vec<i32> {
    let needle = format!("{}/vms/", home.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            (String::from_utf8_lossy(&cmd).contains(&needle)
                && std::fs::read_to_string(e.path().join("stat")).ok()?.split_whitespace().nth(2)? != "Z")
                .then_some(pid)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_lifecycle_workspace_and_exec() {
    // The distribution's kernel (modules, ACPI): the rest of the suite
    // boots the kernel Flotilla builds.
    let env = common::vm_env(common::VmKernel::Distribution);
    let img = image(&env).await;
    let s = env.create(vm(&img)).await;
    assert_eq!(s.backend, BackendKind::Vm);
    assert_eq!(s.state, SandboxState::Running);
    let steps: Vec<_> = s.steps.iter().map(|s| s.name.as_str()).collect();
    for want in ["assets", "disks", "created", "agent_up"] {
        assert!(steps.contains(&want), "step {want} missing from {steps:?}");
    }

    // Its own kernel: the guest's release is the cloud kernel's, not the host's.
    let guest = env.ok(&s.id, "uname -r").await;
    assert!(guest.trim().ends_with("cloud-amd64"), "guest kernel {guest:?}");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(guest.trim(), host.trim());

    // The emulator itself holds nothing worth taking over: once set up, it
    // runs as a uid of its own with no capabilities, under its seccomp
    // filter and no_new_privs.
    let pids = qemus(env.node.home());
    assert_eq!(pids.len(), 1, "one QEMU per VM: {pids:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.split_whitespace().collect::<Vec<_>>()).unwrap()
    };
    let uids = field("Uid:");
    assert!(uids.iter().all(|u| u.parse::<u32>().unwrap() >= 3 << 30), "QEMU runs as {uids:?}");
    assert!(field("Gid:").iter().all(|g| *g != "0"), "QEMU keeps gid 0: {status}");
    assert_eq!(field("CapEff:"), ["0000000000000000"], "QEMU kept capabilities");
    assert_eq!(field("NoNewPrivs:"), ["1"]);
    assert_eq!(field("Seccomp:"), ["2"]);

    // Exec: stdout, stderr and exit codes come back as from a process sandbox.
    let (out, err, st) = env.sh(&s.id, "echo out; echo err >&2; exit 7").await;
    assert_eq!((out.as_str(), err.as_str(), st.code), ("out\n", "err\n", Some(7)));

    // Workspace in and out, through the serial channel.
    let agent = env.client.sandbox(&s.id);
    let big = vec![b'x'; 3 << 20];
    let tar = common::tar_of(&[("a.txt", b"hello vm\n"), ("dir/big.bin", &big)]);
    let sum = agent.put_workspace(common::body(tar), None, &WorkspaceQuery::default()).await.unwrap();
    assert_eq!(sum.entries, 2);
    assert_eq!(env.ok(&s.id, "cat /workspace/a.txt").await, "hello vm\n");
    assert_eq!(env.ok(&s.id, "ls -l /workspace/dir/big.bin | tr -s ' ' | cut -d' ' -f5").await.trim(), "3145728");

    // Hostile input is refused inside the guest too, and nothing is written.
    let mut evil = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.set_cksum();
    evil.append_data(&mut h, "ok.txt", &b"fine"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"../../escape");
    h.set_cksum();
    evil.append(&h, &b"evil"[..]).unwrap();
    let err = agent.put_workspace(common::body(evil.into_inner().unwrap()), None, &WorkspaceQuery::default()).await;
    assert!(err.is_err(), "a tar climbing out must be refused");
    // Entries before the hostile one land (the stream is not buffered);
    // nothing lands outside the workspace.
    assert_eq!(env.ok(&s.id, "ls /workspace; ls / | grep -c escape || true").await, "a.txt\ndir\nok.txt\n0\n");

    // Stop and start: a new boot, the workspace disk kept.
    let stopped = env.client.action(&s.id, "stop").await.unwrap();
    assert_eq!(stopped.state, SandboxState::Stopped);
    assert!(qemus(env.node.home()).is_empty(), "QEMU left after stop");
    let started = env.client.action(&s.id, "start").await.unwrap();
    assert_eq!(started.state, SandboxState::Running);
    assert_eq!(env.ok(&s.id, "cat /workspace/a.txt").await, "hello vm\n");

    // `set` of limits is accepted (recorded for the next boot).
    let upd = UpdateSandboxRequest {
        resources: Some(Resources { memory_bytes: Some(300 << 20), ..Default::default() }),
        ..Default::default()
    };
    let updated = env.client.update(&s.id, &upd).await.unwrap();
    assert_eq!(updated.resources.memory_bytes, Some(300 << 20));

    env.client.delete(&s.id).await.unwrap();
    assert!(qemus(env.node.home()).is_empty(), "QEMU left after rm");
    assert!(!env.node.home().join("vms").join(&s.id).exists(), "disks left after rm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_survives_a_node_crash_and_rm_mid_boot_leaks_nothing() {
    let mut env = vm_env();
    let img = image(&env).await;
    let s = env.create(vm(&img)).await;
    env.ok(&s.id, "echo before > /workspace/mark").await;

    // kill -9 of the node: the VM keeps running and is re-adopted.
    let before = qemus(env.node.home());
    assert_eq!(before.len(), 1);
    env.node.kill9();
    env.node.start_again();
    let again = env.client.get(&s.id).await.unwrap();
    assert_eq!(again.state, SandboxState::Running, "{again:?}");
    assert_eq!(qemus(env.node.home()), before, "the same QEMU must be re-adopted");
    assert_eq!(env.ok(&s.id, "cat /workspace/mark").await, "before\n");

    // rm while a second VM is still booting: no QEMU, disk or socket left.
    let op = env.client.create_operation(&vm(&img)).await.unwrap();
    let id = op.target.clone();
    common::eventually(Duration::from_secs(60), "the second VM's QEMU to start", || async {
        (qemus(env.node.home()).len() == 2).then_some(())
    })
    .await;
    env.client.delete(&id).await.unwrap();
    common::eventually(Duration::from_secs(30), "the mid-boot VM to be gone", || async {
        (qemus(env.node.home()).len() == 1 && !env.node.home().join("vms").join(&id).exists()).then_some(())
    })
    .await;

    env.client.delete(&s.id).await.unwrap();
    assert!(qemus(env.node.home()).is_empty());
    let left: Vec<_> =
        std::fs::read_dir(env.node.home().join("vms")).map(|rd| rd.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "VM directories left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_reports_the_vm_backend_and_its_accelerator() {
    let env = vm_env();
    let img = image(&env).await;
    // A VM from `host` is refused with the fix, before anything boots.
    let err = env.client.create(&CreateSandboxRequest { backend: BackendKind::Vm, ..Default::default() }).await;
    let msg = format!("{:?}", err.unwrap_err().to_api());
    assert!(msg.contains("flotilla image import"), "{msg}");

    // So is `tap` for a process sandbox.
    let err = env.client.create(&CreateSandboxRequest { network: NetworkMode::Tap, ..Default::default() }).await;
    let msg = format!("{:?}", err.unwrap_err().to_api());
    assert!(msg.contains("InvalidArgument") && msg.contains("for microVMs"), "{msg}");

    let s = env.create(vm(&img)).await;
    // The kernel Flotilla builds: its own release, no modules, no ACPI.
    let guest = env.ok(&s.id, "uname -r; ls /proc/sys/kernel/modprobe 2>/dev/null; ls /sys/firmware").await;
    assert!(guest.lines().next().unwrap_or_default().ends_with("-flotilla"), "guest kernel {guest:?}");
    assert!(!guest.contains("modprobe") && !guest.contains("acpi"), "{guest:?}");
    let info = env.client.info().await.unwrap();
    let vmb = info.backends.iter().find(|b| b.kind == BackendKind::Vm).expect("vm backend listed");
    assert!(vmb.available, "{vmb:?}");
    // .ci/run installs passt, and the tests run as root.
    assert_eq!(vmb.network_modes, [NetworkMode::None, NetworkMode::Outbound, NetworkMode::Tap], "{vmb:?}");
    let accel = vmb.accelerator.as_deref().unwrap();
    assert!(accel == "kvm" || accel == "tcg", "{vmb:?}");
    assert!(vmb.accelerator_reason.is_some());
    env.client.delete(&s.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_hands_each_booted_vm_out_once() {
    let mut env = vm_env();
    let img = image(&env).await;
    let req = VmPoolRequest {
        image: img.clone(),
        size: 1,
        resources: Resources { memory_bytes: Some(256 << 20), ..Default::default() },
    };
    let pools = env.client.set_pool(&req).await.unwrap();
    assert_eq!(pools.len(), 1);
    assert!(pools[0].image.starts_with("vmtest:1@sha256:"), "pinned: {pools:?}");
    let ready = || async { env.client.pools().await.ok().filter(|p| p.len() == 1 && p[0].ready == 1).map(|_| ()) };
    common::eventually(Duration::from_secs(120), "a pool member to boot", ready).await;
    // The first member made the pool's snapshot and was restored from it.
    let pools = env.client.pools().await.unwrap();
    assert_eq!(pools[0].last_from.as_deref(), Some("snapshot"), "{pools:?}\nnode log:\n{}", env.node.log());
    let snapshots = env.node.home().join("vm/snapshots");
    assert_eq!(std::fs::read_dir(&snapshots).unwrap().count(), 1);

    // Two creates at once: exactly one gets the booted member.
    let (a, b) = tokio::join!(env.create(vm(&img)), env.create(vm(&img)));
    let claimed = |s: &flotilla_api::Sandbox| s.steps.iter().any(|st| st.name == "claimed");
    assert_eq!([claimed(&a), claimed(&b)].iter().filter(|c| **c).count(), 1, "{:?}\n{:?}", a.steps, b.steps);
    // The other found no member ready and was restored from the snapshot.
    let restored = |s: &flotilla_api::Sandbox| s.steps.iter().any(|st| st.name == "restored");
    assert!(restored(if claimed(&a) { &b } else { &a }), "{:?}\n{:?}", a.steps, b.steps);
    for s in [&a, &b] {
        assert_eq!(s.state, SandboxState::Running);
        assert_eq!(env.ok(&s.id, "echo $((6*7))").await, "42\n");
    }
    // The claimed one is its own sandbox: directory renamed, agent reachable
    // after a node restart under its new id.
    let c = if claimed(&a) { &a } else { &b };
    assert!(env.node.home().join("vms").join(&c.id).join("root.qcow2").exists());
    // A restored guest lives in the present, not at the snapshot's moment.
    let guest_now: i64 = env.ok(&c.id, "date +%s").await.trim().parse().unwrap();
    let host_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((guest_now - host_now).abs() <= 5, "guest clock {guest_now}, host {host_now}");
    let random = "od -An -N16 -tx1 /dev/urandom";
    let c_random = env.ok(&c.id, random).await;
    env.node.kill9();
    env.node.start_again();
    assert_eq!(env.ok(&c.id, "echo still").await, "still\n");

    // A second guest restored from the same snapshot draws other random
    // numbers (the host reseeds each one).
    common::eventually(Duration::from_secs(120), "the pool to refill", ready).await;
    let e = env.create(vm(&img)).await;
    assert!(claimed(&e), "{:?}", e.steps);
    let e_random = env.ok(&e.id, random).await;
    assert_ne!(c_random, e_random, "two restored guests share their RNG state");
    // Stop and start: it boots cold from its own disks, workspace kept.
    env.ok(&e.id, "echo kept > /workspace/f").await;
    env.client.action(&e.id, "stop").await.unwrap();
    let started = env.client.action(&e.id, "start").await.unwrap();
    assert_eq!(started.state, SandboxState::Running, "{started:?}");
    assert_eq!(env.ok(&e.id, "cat /workspace/f").await, "kept\n");

    // A create with its own env is not served from the pool.
    let mut with_env = vm(&img);
    with_env.env.insert("K".into(), "v".into());
    common::eventually(Duration::from_secs(120), "the pool to refill", ready).await;
    let d = env.create(with_env).await;
    assert!(!claimed(&d), "{:?}", d.steps);
    assert_eq!(env.ok(&d.id, "echo $K").await, "v\n");

    // Size 0 removes the pool and stops its member; nothing leaks.
    let pools = env.client.set_pool(&VmPoolRequest { size: 0, ..req }).await.unwrap();
    assert!(pools.is_empty());
    let home = env.node.home().to_path_buf();
    common::eventually(Duration::from_secs(30), "the pool member to stop", || async {
        (qemus(&home).len() == 4).then_some(())
    })
    .await;
    for s in [&a, &b, &d, &e] {
        env.client.delete(&s.id).await.unwrap();
    }
    assert!(qemus(&home).is_empty());
    // ... and no pool means no snapshot kept.
    common::eventually(Duration::from_secs(10), "the snapshot to go", || async {
        (std::fs::read_dir(&snapshots).unwrap().count() == 0).then_some(())
    })
    .await;
}

/// TAP devices on this host (the node names them `fltapN`).
fn taps() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("fltap"))
        .collect();
    v.sort();
    v
}

/// Connects from sandbox `id` to `listener` on the bridge; the address the
/// connection came from.
async fn peer(env: &common::Env, listener: &std::net::TcpListener, id: &str) -> String {
    let port = listener.local_addr().unwrap().port();
    let script = format!("echo hi >/dev/tcp/10.213.0.1/{port} && echo SENT");
    let req = flotilla_api::ExecRequest {
        argv: vec!["bash".into(), "-c".into(), script],
        timeout_ms: Some(10_000),
        ..Default::default()
    };
    let (out, err, st) = env.exec(id, req).await;
    assert!(st.success() && out.contains("SENT"), "{out} {err}");
    listener.accept().unwrap().1.ip().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_sandboxes_get_their_own_address_and_give_it_back() {
    let mut env = common::env_for(common::Kind::Vm);
    let req = CreateSandboxRequest { network: NetworkMode::Tap, ..env.request().await };
    let a = env.create(req.clone()).await;
    let b = env.create(req.clone()).await;
    assert_eq!(taps().len(), 2, "{:?}", taps());
    // The host listens on the bridge; each guest reaches it from its own
    // address.
    let listener = std::net::TcpListener::bind("10.213.0.1:0").unwrap();
    assert_eq!(peer(&env, &listener, &a.id).await, "10.213.0.2");
    assert_eq!(peer(&env, &listener, &b.id).await, "10.213.0.3");

    // A node killed with -9 leaves the VMs, their TAPs and leases as they
    // were; the restarted node re-adopts them.
    env.node.kill9();
    env.node.start_again();
    assert_eq!(taps().len(), 2, "{:?}", taps());
    assert_eq!(peer(&env, &listener, &b.id).await, "10.213.0.3");

    // rm gives the TAP and the address back; the next sandbox gets it.
    env.client.delete(&a.id).await.unwrap();
    common::eventually(Duration::from_secs(10), "a's TAP to go", || async { (taps().len() == 1).then_some(()) }).await;
    let c = env.create(req.clone()).await;
    assert_eq!(peer(&env, &listener, &c.id).await, "10.213.0.2");
    for s in [&b, &c] {
        env.client.delete(&s.id).await.unwrap();
    }
    common::eventually(Duration::from_secs(10), "every TAP to go", || async { taps().is_empty().then_some(()) }).await;
}
