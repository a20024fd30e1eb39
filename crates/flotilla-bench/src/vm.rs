//! MicroVM scenarios: `vm-create` (create → agent ready, against a raw QEMU
//! boot of the same kernel on the same accelerator to a trivial static
//! init), `vm-exec` (round trip of `true` in a booted VM, against the same
//! in a process sandbox) and `vm-import` (workspace import MB/s into a VM,
//! against the same tar into a process sandbox).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_agent::client::drain_exec;
use flotilla_api::{
    BackendKind, CreateSandboxRequest, ExecRequest, ImportImageRequest, OperationState, Resources, Sandbox,
    SandboxState, WorkspaceQuery,
};
use serde_json::json;

use flotilla_vm::Accel;

use crate::node::Node;
use crate::report::{Case, Machine, Report, Unit};
use crate::scenarios::{new_sandbox, now, target};

const IMAGE: &str = "bench-vm:1";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Imports a minimal rootfs (host shell and tools) once per node.
async fn ensure_image(node: &Node) -> anyhow::Result<()> {
    if node.client().image(IMAGE).await.is_ok() {
        return Ok(());
    }
    let dir = node.scratch("vm-rootfs");
    flotilla_testkit::minimal_rootfs(&dir, &["/bin/sh", "/bin/true", "/bin/cat"], &[]);
    let req = ImportImageRequest { reference: IMAGE.into(), path: dir.display().to_string() };
    let op = node.client().import_image(&req).await.context("importing the VM image")?;
    let op = node.client().wait_operation(&op.id, Some(Duration::from_secs(300)), |_| {}).await?;
    anyhow::ensure!(op.state == OperationState::Succeeded, "importing the VM image: {:?}", op.error);
    Ok(())
}

async fn new_vm(node: &Node) -> anyhow::Result<Sandbox> {
    let req = CreateSandboxRequest {
        image: Some(IMAGE.into()),
        backend: BackendKind::Vm,
        resources: Resources { memory_bytes: Some(256 << 20), ..Default::default() },
        ..Default::default()
    };
    let sb = node.client().create(&req).await.context("creating a microVM")?;
    if sb.state != SandboxState::Running {
        bail!("microVM {} came back {} (error: {:?})", sb.id, sb.state, sb.error);
    }
    Ok(sb)
}

/// The guest kernel the node made, and its accelerator.
/// The kernel the node boots, its accelerator, and whether the kernel
/// uses ACPI (the bench finds the kernel as the node does: same env).
fn node_assets(node: &Node) -> anyhow::Result<(PathBuf, String, bool)> {
    let dir = node.home().join("vm");
    let mut vmlinux = None;
    let mut accel = None;
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("vmlinux-") {
            vmlinux = Some(e.path());
        }
        if name.starts_with("accel-") {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path())?)?;
            accel = v["accel"].as_str().map(str::to_owned);
        }
    }
    let acpi = flotilla_vm::assets::find_kernel(&dir).map(|k| k.acpi).context("finding the node's kernel")?;
    Ok((vmlinux.context("no vmlinux in the node's vm directory")?, accel.context("no accelerator decision")?, acpi))
}

/// A one-file initramfs whose `/init` (a static C program, built here with
/// `gcc -static`) prints a line and resets the machine: the least a boot
/// can do, so the time is QEMU + kernel + nothing.
fn trivial_initramfs(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let src = dir.join("init.c");
    std::fs::write(
        &src,
        "#include <unistd.h>\n#include <sys/reboot.h>\nint main(void){write(1,\"TRIVIAL-INIT\\n\",13);reboot(RB_AUTOBOOT);return 0;}\n",
    )?;
    let bin = dir.join("init");
    let st = Command::new("gcc").args(["-static", "-O2", "-o"]).arg(&bin).arg(&src).status().context("running gcc")?;
    anyhow::ensure!(st.success(), "gcc -static failed (install gcc and libc6-dev)");
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("dev"))?;
    std::fs::copy(&bin, root.join("init"))?;
    let out = dir.join("trivial.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && find . | cpio -o -H newc > {} 2>/dev/null", root.display(), out.display()))
        .status()?;
    anyhow::ensure!(st.success(), "cpio failed (install cpio)");
    Ok(out)
}

/// One raw QEMU boot to the trivial init and out again.
fn raw_boot(vmlinux: &Path, initrd: &Path, accel: &str, acpi: bool, log: &Path) -> anyhow::Result<Duration> {
    let _ = std::fs::remove_file(log);
    let t = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            flotilla_vm::qemu::machine(acpi),
            "-accel",
            accel,
            "-cpu",
            if accel == "kvm" { "host" } else { "max" },
        ])
        .args(["-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &flotilla_vm::qemu::cmdline(if accel == "kvm" { Accel::Kvm } else { Accel::Tcg }, acpi)])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait()? {
            let elapsed = t.elapsed();
            anyhow::ensure!(st.success(), "raw QEMU boot ended {st}");
            anyhow::ensure!(
                std::fs::read_to_string(log).unwrap_or_default().contains("TRIVIAL-INIT"),
                "the trivial init did not run"
            );
            return Ok(elapsed);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("raw QEMU boot hung for 30 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What raw QEMU boots (the baselines) need.
struct RawBoots {
    /// The kernel the node boots, and whether it uses ACPI.
    vmlinux: PathBuf,
    acpi: bool,
    accel: String,
    scratch: PathBuf,
    /// The trivial initramfs, and where a boot's console goes.
    initrd: PathBuf,
    log: PathBuf,
}

/// Boots one VM through the node (untimed: it makes the assets and decides
/// the accelerator), then makes the trivial initramfs in scratch `name`.
async fn raw_boots(node: &Node, name: &str) -> anyhow::Result<RawBoots> {
    ensure_image(node).await?;
    let first = new_vm(node).await?;
    node.client().delete(&first.id).await?;
    let (vmlinux, accel, acpi) = node_assets(node)?;
    let scratch = node.scratch(name);
    let initrd = trivial_initramfs(&scratch)?;
    let log = scratch.join("console.log");
    Ok(RawBoots { vmlinux, acpi, accel, scratch, initrd, log })
}

// ------------------------------------------------------------------ vm-kernel

/// The kernel decision (issue: "measure both and decide"): raw QEMU boots
/// to the trivial init of the kernel Flotilla builds against the
/// distribution's cloud kernel, same accelerator, interleaved.
pub async fn vm_kernel(node: &Node, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    const WARMUPS: usize = 1;
    let RawBoots { accel, scratch, initrd, log, .. } = raw_boots(node, "vm-kernel").await?;
    let distro = flotilla_vm::assets::distribution_kernel().context("finding the distribution's kernel")?;
    let packed = std::fs::read(&distro.image).with_context(|| format!("reading {}", distro.image.display()))?;
    let distro_vmlinux = scratch.join("vmlinux-distribution");
    std::fs::write(
        &distro_vmlinux,
        flotilla_vm::assets::unpack_kernel(&packed).context("unpacking the distribution's kernel")?,
    )?;
    let built = std::env::var_os("FLOTILLA_VM_KERNEL")
        .map(PathBuf::from)
        .and_then(|p| flotilla_vm::kernel::describe(&p).map(|k| (p, k)))
        .or_else(|| flotilla_vm::kernel::installed(&node.home().join("vm")));
    let (mut ours, mut theirs, mut failed) = (Vec::new(), Vec::new(), 0usize);
    let mut notes = vec![format!("distribution kernel: {} ({})", distro.image.display(), distro.release)];
    match &built {
        Some((b, k)) => notes.push(format!("built kernel: {} ({})", b.display(), k.release)),
        None => notes.push(
            "no built kernel: run `flotilla node setup-vm --build-kernel` and set FLOTILLA_VM_KERNEL to its vmlinux"
                .into(),
        ),
    }
    for i in 0..WARMUPS + iterations {
        let record = i >= WARMUPS;
        // Take turns going first.
        let order: [bool; 2] = if i % 2 == 0 { [true, false] } else { [false, true] };
        for ours_turn in order {
            let (kernel, acpi, into) = match (ours_turn, &built) {
                (true, Some((b, _))) => (b.as_path(), false, &mut ours),
                (true, None) => continue,
                (false, _) => (distro_vmlinux.as_path(), true, &mut theirs),
            };
            match raw_boot(kernel, &initrd, &accel, acpi, &log) {
                Ok(d) if record => into.push(ms(d)),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("flotilla-bench: raw boot of {}: {e:#}", kernel.display());
                    failed += 1;
                }
            }
        }
    }
    let ours_case = match &built {
        Some(_) => Case::measured(
            "built_kernel_boot_trivial_init",
            "qemu microvm,acpi=off + the kernel setup-vm --build-kernel makes, static /init that resets; spawn → exit",
            false,
            &ours,
        ),
        None => Case::unavailable(
            "built_kernel_boot_trivial_init",
            "the kernel setup-vm --build-kernel makes",
            "no built kernel (see notes)".into(),
        ),
    };
    let mut report = Report {
        scenario: "vm-kernel",
        description: format!("guest kernel boot to a trivial init, accelerator {accel}"),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: WARMUPS,
        cases: vec![
            ours_case,
            Case::measured(
                "distribution_kernel_boot_trivial_init",
                "qemu microvm (ACPI) + Debian's cloud kernel, same /init, accelerator and base command line",
                true,
                &theirs,
            ),
        ],
        targets: vec![],
        notes,
        details: json!({ "raw_boots_failed": failed, "accelerator": accel }),
    };
    report.set_ratios("distribution_kernel_boot_trivial_init");
    let ratio = report.case("built_kernel_boot_trivial_init").and_then(|c| c.ratio_to_baseline);
    report.targets = vec![target(
        "the built kernel boots much faster (≤ 0.75x), so nodes prefer it",
        ratio.map(|r| r <= 0.75),
        ratio.map_or("no built kernel".into(), |r| format!("{r:.2}x the distribution kernel")),
    )];
    Ok(report)
}

// ------------------------------------------------------------------ vm-create

pub async fn vm_create(node: &Node, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    const WARMUPS: usize = 1;
    let RawBoots { vmlinux, accel, acpi, initrd, log, .. } = raw_boots(node, "vm-raw").await?;
    let (mut create, mut raw, mut hung) = (Vec::new(), Vec::new(), 0usize);
    let mut retries = 0;
    for i in 0..WARMUPS + iterations {
        let record = i >= WARMUPS;
        let t = Instant::now();
        let sb = new_vm(node).await?;
        let elapsed = t.elapsed();
        retries += sb.steps.iter().filter(|s| s.name == "boot_retry").count();
        node.client().delete(&sb.id).await?;
        match raw_boot(&vmlinux, &initrd, &accel, acpi, &log) {
            Ok(d) if record => raw.push(ms(d)),
            Ok(_) => {}
            Err(e) => {
                eprintln!("flotilla-bench: raw boot: {e:#}");
                hung += 1;
            }
        }
        if record {
            create.push(ms(elapsed));
        }
    }
    // From the warm pool: one member kept booted; each create claims it,
    // then the bench waits (untimed) for the refill.
    let pool = flotilla_api::VmPoolRequest {
        image: IMAGE.into(),
        size: 1,
        resources: Resources { memory_bytes: Some(256 << 20), ..Default::default() },
    };
    node.client().set_pool(&pool).await.context("setting a warm pool")?;
    let mut claimed = Vec::new();
    let mut not_claimed = 0;
    let (mut restored, mut not_restored) = (Vec::new(), 0usize);
    for _ in 0..iterations {
        wait_pool_ready(node).await?;
        let t = Instant::now();
        let sb = new_vm(node).await?;
        let elapsed = t.elapsed();
        if sb.steps.iter().any(|s| s.name == "claimed") {
            claimed.push(ms(elapsed));
        } else {
            not_claimed += 1;
        }
        node.client().delete(&sb.id).await?;
        // The refill restores the claimed member from the pool's snapshot:
        // the node times it from start to agent ready.
        wait_pool_ready(node).await?;
        let pools = node.client().pools().await?;
        match pools.first().map(|p| (p.last_from.as_deref(), p.last_ms)) {
            Some((Some("snapshot"), Some(ms))) => restored.push(ms as f64),
            _ => not_restored += 1,
        }
    }
    // From the pool's snapshot through the API: the member is claimed by
    // a first create (untimed), so the second finds none ready and is
    // restored from the snapshot (the refill restores beside it).
    let (mut from_snapshot, mut creates_not_restored) = (Vec::new(), 0usize);
    for _ in 0..iterations {
        wait_pool_ready(node).await?;
        let first = new_vm(node).await?;
        let t = Instant::now();
        let sb = new_vm(node).await?;
        let elapsed = t.elapsed();
        if sb.steps.iter().any(|s| s.name == "restored") {
            from_snapshot.push(ms(elapsed));
        } else {
            creates_not_restored += 1;
        }
        node.client().delete(&first.id).await?;
        node.client().delete(&sb.id).await?;
    }
    node.client().set_pool(&flotilla_api::VmPoolRequest { size: 0, ..pool }).await?;
    let mut report = Report {
        scenario: "vm-create",
        description: format!("microVM create → agent ready, accelerator {accel}"),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: WARMUPS,
        cases: vec![
            Case::measured(
                "flotilla_vm_create_cold",
                "client.create(backend vm, 256 MiB) until Running: disks, QEMU, kernel, init, agent on virtio-serial",
                false,
                &create,
            ),
            Case::measured(
                "flotilla_vm_create_from_pool",
                "the same create with a warm pool of 1 (claim of a booted member); refill waited for, untimed",
                false,
                &claimed,
            ),
            Case::measured(
                "flotilla_vm_create_from_snapshot",
                "create while the pool has no member ready: restored from the pool's snapshot (a refill runs beside it)",
                false,
                &from_snapshot,
            ),
            Case::measured(
                "flotilla_vm_restore_from_snapshot",
                "a pool refill: copy the snapshot's disks, QEMU -incoming, load the saved state, agent ready (node-side)",
                false,
                &restored,
            ),
            Case::measured(
                "raw_qemu_boot_trivial_init",
                "qemu-system-x86_64 microvm, same kernel/accelerator/cmdline, static /init that resets at once; spawn → exit",
                true,
                &raw,
            ),
        ],
        targets: vec![],
        notes: vec![],
        details: json!({
            "raw_boots_failed": hung, "create_boot_retries": retries, "accelerator": accel,
            "pool_creates_not_claimed": not_claimed, "pool_refills_not_from_snapshot": not_restored,
            "creates_not_restored": creates_not_restored,
        }),
    };
    report.set_ratios("raw_qemu_boot_trivial_init");
    let ratio = report.case("flotilla_vm_create_cold").and_then(|c| c.ratio_to_baseline);
    let pool_median = report.case("flotilla_vm_create_from_pool").and_then(Case::median).unwrap_or(f64::NAN);
    report.targets = vec![
        target(
            "cold create within 1.5x of a raw QEMU boot",
            ratio.map(|r| r <= 1.5),
            ratio.map_or("baseline unavailable".into(), |r| format!("{r:.2}x")),
        ),
        target("pool claim < 10 ms", Some(pool_median < 10.0), format!("median {pool_median:.2} ms")),
    ];
    let cold = report.case("flotilla_vm_create_cold").and_then(Case::median).unwrap_or(f64::NAN);
    let restore = report.case("flotilla_vm_restore_from_snapshot").and_then(Case::median).unwrap_or(f64::NAN);
    report.targets.push(target(
        "snapshot restore beats a cold boot (so pools use it)",
        Some(restore < cold),
        format!("median restore {restore:.0} ms vs cold create {cold:.0} ms ({:.2}x)", cold / restore),
    ));
    Ok(report)
}

async fn wait_pool_ready(node: &Node) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pools = node.client().pools().await?;
        if pools.iter().any(|p| p.ready >= 1) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the warm pool did not fill within 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------ vm-exec

async fn exec_samples(node: &Node, sb: &Sandbox, warmups: usize, n: usize) -> anyhow::Result<Vec<f64>> {
    let agent = node.client().sandbox(&sb.id);
    let req = ExecRequest { argv: vec!["true".into()], ..Default::default() };
    let mut out = Vec::with_capacity(n);
    for i in 0..warmups + n {
        let t = Instant::now();
        let mut frames = agent.exec(&req).await.context("exec of `true`")?;
        let status = drain_exec(&mut frames, &mut std::io::sink(), &mut std::io::sink()).await?;
        anyhow::ensure!(status.code == Some(0), "`true` ended {status:?}");
        if i >= warmups {
            out.push(ms(t.elapsed()));
        }
    }
    Ok(out)
}

pub async fn vm_exec(node: &Node, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    const WARMUPS: usize = 5;
    ensure_image(node).await?;
    let vm = new_vm(node).await?;
    let sb = new_sandbox(node).await?;
    let (mut in_vm, mut in_proc) = (Vec::new(), Vec::new());
    // Interleaved in rounds of 10 so load changes hit both alike.
    let rounds = iterations.div_ceil(10);
    let mut result = Ok(());
    for r in 0..rounds {
        let w = if r == 0 { WARMUPS } else { 0 };
        match (exec_samples(node, &vm, w, 10).await, exec_samples(node, &sb, w, 10).await) {
            (Ok(a), Ok(b)) => {
                in_vm.extend(a);
                in_proc.extend(b);
            }
            (Err(e), _) | (_, Err(e)) => {
                result = Err(e);
                break;
            }
        }
    }
    let _ = node.client().delete(&vm.id).await;
    let _ = node.client().delete(&sb.id).await;
    result?;
    let mut report = Report {
        scenario: "vm-exec",
        description: "exec round trip of `true` in a booted microVM (agent over virtio-serial + yamux)".into(),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: WARMUPS,
        cases: vec![
            Case::measured("flotilla_vm_exec_true", "POST exec {argv:[true]} to a vm sandbox, drained", false, &in_vm),
            Case::measured("process_sandbox_exec_true", "the same against a process sandbox", true, &in_proc),
        ],
        targets: vec![],
        notes: vec![],
        details: serde_json::Value::Null,
    };
    report.set_ratios("process_sandbox_exec_true");
    let median = report.case("flotilla_vm_exec_true").and_then(Case::median).unwrap_or(f64::NAN);
    report.targets = vec![target("median < 6 ms", Some(median < 6.0), format!("median {median:.3} ms"))];
    Ok(report)
}

// ------------------------------------------------------------------ vm-import

/// A tar of `files` files of `size` bytes each (compressible but not
/// trivially: a counter pattern).
fn workload_tar(files: usize, size: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::with_capacity(files * (size + 1024)));
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    for i in 0..files {
        let mut h = tar::Header::new_gnu();
        h.set_size(size as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("d{}/f{i}.bin", i % 16), &data[..]).expect("in-memory tar");
    }
    b.into_inner().expect("in-memory tar")
}

async fn import_mbps(node: &Node, sb: &Sandbox, tar: &bytes::Bytes) -> anyhow::Result<f64> {
    let agent = node.client().sandbox(&sb.id);
    let t = Instant::now();
    let body = http_body_util::Full::new(tar.clone());
    agent.put_workspace(body, None, &WorkspaceQuery::default()).await.context("importing")?;
    Ok(tar.len() as f64 / 1e6 / t.elapsed().as_secs_f64())
}

pub async fn vm_import(node: &Node, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    ensure_image(node).await?;
    let tar = bytes::Bytes::from(workload_tar(256, 1 << 20));
    let (mut in_vm, mut in_proc) = (Vec::new(), Vec::new());
    for _ in 0..iterations {
        let vm = new_vm(node).await?;
        let sb = new_sandbox(node).await?;
        let a = import_mbps(node, &vm, &tar).await;
        let b = import_mbps(node, &sb, &tar).await;
        let _ = node.client().delete(&vm.id).await;
        let _ = node.client().delete(&sb.id).await;
        in_vm.push(a?);
        in_proc.push(b?);
    }
    let mut report = Report {
        scenario: "vm-import",
        description: format!("workspace import of a {} MB tar (256 files of 1 MiB)", tar.len() / 1_000_000),
        date: now(),
        machine: machine.clone(),
        unit: Unit::MegabytesPerSec,
        warmups: 0,
        cases: vec![
            Case::measured(
                "flotilla_vm_import",
                "PUT workspace into a fresh microVM (ext4 workspace disk)",
                false,
                &in_vm,
            ),
            Case::measured("process_sandbox_import", "the same tar into a fresh process sandbox", true, &in_proc),
        ],
        targets: vec![],
        notes: vec![],
        details: serde_json::Value::Null,
    };
    report.set_ratios("process_sandbox_import");
    let ratio = report.case("flotilla_vm_import").and_then(|c| c.ratio_to_baseline);
    report.targets = vec![target(
        "at least 50% of the process backend",
        ratio.map(|r| r >= 0.5),
        ratio.map_or("baseline unavailable".into(), |r| format!("{:.0}%", r * 100.0)),
    )];
    Ok(report)
}
