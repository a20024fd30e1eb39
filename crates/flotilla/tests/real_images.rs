//! Real images nobody here wrote, built from Debian's packages by Debian's
//! tools (`flotilla_testkit::images`, cached once per machine): an
//! `mmdebstrap` rootfs tarball as it comes (device nodes, absolute
//! symlinks), the same root as an OCI layout (`umoci`), as a `docker save`
//! archive (`skopeo`) and pulled from a loopback registry, a two-layer
//! merged-usr image whose second layer writes through `lib -> usr/lib`, and
//! a busybox-only root without glibc.
//!
//! Each is imported through the node's API (what `flotilla image import`
//! and `image pull` call), then, in a process sandbox from it, root owns
//! the image's files and can change them: `dpkg -i` of a `.deb` fetched on
//! the host with `apt-get download`, a write to `/etc`, `python3 -c` where
//! the image has it. On the host, no device node exists under the node's
//! data directory and what a sandbox wrote is not owned by host root.
//! `vm_debian_rootfs_runs_dpkg_and_writes_etc` does the same in a microVM.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_api::{
    BackendKind, CreateSandboxRequest, Image, ImportImageRequest, OperationState, PullImageRequest, Resources, Sandbox,
    WorkspaceQuery,
};
use flotilla_testkit::images;

/// An import of a ~190 MB root on a busy 2-core machine.
const IMPORT_DEADLINE: Duration = Duration::from_secs(600);

/// The first host uid of the sandboxes' ranges (`0 → 2^30 + slot·65536`).
const SANDBOX_UID_BASE: u32 = 1 << 30;

/// A node whose process sandboxes run the static agent, so images without
/// glibc (busybox) work.
fn static_env() -> common::Env {
    let agent = flotilla_testkit::static_flotilla(Path::new(common::BIN));
    common::env_with(&["--guest-agent", agent.to_str().expect("utf-8 path")])
}

/// Imports `path` as `reference` through the API and waits for it.
async fn import(env: &common::Env, reference: &str, path: &Path) -> Image {
    let req = ImportImageRequest { reference: reference.into(), path: path.display().to_string() };
    let op = match env.client.import_image(&req).await {
        Ok(op) => op,
        Err(e) => panic!("import of {} as {reference} refused: {e:?}", path.display()),
    };
    finished(env, &op.id, &format!("import of {} as {reference}", path.display())).await
}

/// Waits for an image operation and returns its image; panics with its
/// error (and the node's log) otherwise.
async fn finished(env: &common::Env, op: &str, what: &str) -> Image {
    let op = env.client.wait_operation(op, Some(IMPORT_DEADLINE), |_| {}).await.expect("waiting for the operation");
    match op.state {
        OperationState::Succeeded => serde_json::from_value(op.result.expect("a result")).expect("an image"),
        OperationState::Failed => {
            panic!("{what} failed: {:?}\nnode log:\n{}", op.error, tail(&env.node.log()))
        }
        OperationState::Running => panic!("{what} did not finish within {IMPORT_DEADLINE:?}: {op:?}"),
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The unpacked root of an image version on the host.
fn version_root(env: &common::Env, img: &Image) -> PathBuf {
    let hex = img.digest.strip_prefix("sha256:").expect("a sha256 digest");
    let root = env.node.home().join("images/versions").join(hex).join("rootfs");
    assert!(root.is_dir(), "{} is not a directory ({img:?})", root.display());
    root
}

/// A process sandbox from `image`.
async fn sandbox(env: &common::Env, image: &str) -> Sandbox {
    env.create(CreateSandboxRequest { image: Some(image.into()), ..Default::default() }).await
}

/// Puts the host's `hello` .deb into the sandbox's workspace as
/// `/workspace/hello.deb` (the workspace-put API).
async fn put_hello_deb(env: &common::Env, id: &str) {
    let deb = std::fs::read(images::hello_deb()).expect("reading the .deb");
    let tar = common::tar_of(&[("hello.deb", &deb)]);
    let sum = env
        .client
        .sandbox(id)
        .put_workspace(common::body(tar), None, &WorkspaceQuery::default())
        .await
        .unwrap_or_else(|e| panic!("workspace put into {id}: {e:?}"));
    assert_eq!(sum.entries, 1, "{sum:?}");
}

/// Root inside owns what the image's root owns.
async fn root_owns_the_image(env: &common::Env, id: &str) {
    assert_eq!(env.ok(id, "id -u").await, "0\n");
    assert_eq!(env.ok(id, "stat -c %u /etc/passwd").await, "0\n", "the image's /etc/passwd shows as root's");
    assert_eq!(env.ok(id, "stat -c %u /etc").await, "0\n");
}

/// The checks every Debian image passes in a process sandbox: root owns
/// the image, `dpkg -i` installs a package that then runs, `/etc` takes a
/// write (an overwrite and a new file), python3 runs; on the host the
/// sandbox's writes are in its upper dir owned by its own range, and no
/// device node exists under the data directory.
async fn debian_checks(env: &common::Env, image: &str) {
    let s = sandbox(env, image).await;
    root_owns_the_image(env, &s.id).await;

    put_hello_deb(env, &s.id).await;
    env.ok(&s.id, "dpkg -i /workspace/hello.deb").await;
    assert_eq!(env.ok(&s.id, "hello").await, images::HELLO_OUTPUT);
    assert_eq!(env.ok(&s.id, "dpkg-query -W -f '${Status}' hello").await, "install ok installed");

    assert_eq!(env.ok(&s.id, "echo x > /etc/motd && cat /etc/motd").await, "x\n");
    assert_eq!(env.ok(&s.id, "echo new > /etc/flotilla-new && cat /etc/flotilla-new").await, "new\n");
    assert_eq!(env.ok(&s.id, "stat -c %u /etc/flotilla-new /etc/motd").await, "0\n0\n");
    assert_eq!(env.ok(&s.id, "python3 -c 'print(1+1)'").await, "2\n");

    let upper = env.node.home().join("sandboxes").join(&s.id).join("upper");
    for rel in ["etc/flotilla-new", "etc/motd", "usr/bin/hello"] {
        not_host_root(&upper.join(rel));
    }
    no_device_nodes(env.node.home());
    env.client.delete(&s.id).await.expect("deleting the sandbox");
}

/// A file a sandbox wrote: in its upper dir, owned by the sandbox's host
/// range, never by host root.
fn not_host_root(path: &Path) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_ne!(m.uid(), 0, "{} is owned by host root", path.display());
    assert!(
        m.uid() >= SANDBOX_UID_BASE,
        "{} is owned by host uid {}, outside the sandbox ranges",
        path.display(),
        m.uid()
    );
    assert_ne!(m.gid(), 0, "{} has host group root", path.display());
}

/// Walks the node's data directory: no device node or fifo anywhere,
/// except overlayfs whiteouts (character device 0:0) in a sandbox's upper
/// and work dirs, which is how the kernel records a deletion there (and
/// stages one).
fn no_device_nodes(home: &Path) {
    let mut stack = vec![home.to_path_buf()];
    let mut seen = 0usize;
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for e in rd {
            let e = e.unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let path = e.path();
            let m = std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let t = m.file_type();
            seen += 1;
            if t.is_dir() {
                stack.push(path);
            } else if t.is_char_device() || t.is_block_device() || t.is_fifo() {
                let whiteout = t.is_char_device() && m.rdev() == 0 && is_in_overlay_dirs(home, &path);
                assert!(whiteout, "{} is a device node or fifo (rdev {:#x})", path.display(), m.rdev());
            }
        }
    }
    assert!(seen > 1000, "walked only {seen} entries under {}: is the image there?", home.display());
}

/// Whether `path` is under `home/sandboxes/<id>/{upper,work}/`.
fn is_in_overlay_dirs(home: &Path, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(home.join("sandboxes")) else { return false };
    rel.components().nth(1).is_some_and(|c| c.as_os_str() == "upper" || c.as_os_str() == "work")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mmdebstrap_tarball_imports_as_it_comes_and_root_can_install() {
    let tarball = images::debian_rootfs_tar();
    let env = common::env();
    let img = import(&env, "real/debian-tar:bookworm", &tarball).await;
    assert_eq!(img.source_format, "rootfs_tar");
    // mmdebstrap puts console, full, null, ptmx, random, tty, urandom, zero in /dev.
    assert!(img.skipped_special >= 8, "the /dev nodes are skipped and counted: {img:?}");
    no_device_nodes(env.node.home());
    // Symlinks as they come: absolute ones, and merged-usr's relative ones.
    let root = version_root(&env, &img);
    let awk = std::fs::read_link(root.join("etc/alternatives/awk")).expect("etc/alternatives/awk is a symlink");
    assert_eq!(awk, Path::new("/usr/bin/mawk"));
    assert_eq!(std::fs::read_link(root.join("lib")).expect("lib is a symlink"), Path::new("usr/lib"));
    assert!(!root.join("dev/console").exists() && !root.join("dev/null").exists());
    debian_checks(&env, "real/debian-tar:bookworm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn umoci_oci_layout_of_debian_imports_and_root_can_install() {
    let layout = images::debian_oci_layout();
    let env = common::env();
    let reference = format!("real/debian-oci:{}", images::DEBIAN_TAG);
    let img = import(&env, &reference, &layout).await;
    assert_eq!(img.source_format, "oci_layout");
    assert_eq!(img.layers.len(), 1, "{img:?}");
    assert!(img.skipped_special >= 8, "umoci keeps the /dev nodes in its layer; skipped and counted: {img:?}");
    debian_checks(&env, &reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_docker_archive_of_debian_imports_and_root_can_install() {
    let archive = images::debian_docker_archive();
    let env = common::env();
    let img = import(&env, images::DEBIAN_ARCHIVE_NAME, &archive).await;
    assert_eq!(img.source_format, "docker_archive");
    assert!(img.skipped_special >= 8, "{img:?}");
    debian_checks(&env, images::DEBIAN_ARCHIVE_NAME).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_pulled_from_a_loopback_registry_runs_and_root_can_install() {
    let layout = images::debian_oci_layout();
    let registry = images::LoopbackRegistry::start();
    registry.push(&layout, images::DEBIAN_TAG, "flotilla-test/debian:bookworm");
    let env = common::env();
    let req = PullImageRequest {
        source: format!("{}/flotilla-test/debian:bookworm", registry.addr()),
        reference: Some("real/debian-pulled:bookworm".into()),
        plain_http: true,
        ..Default::default()
    };
    let op = match env.client.pull_image(&req).await {
        Ok(op) => op,
        Err(e) => panic!("pull refused: {e:?}\nregistry log:\n{}", tail(&registry.log())),
    };
    let img = finished(&env, &op.id, "the pull").await;
    assert_eq!(img.source_format, "oci_registry");
    assert_eq!(img.layers.len(), 1, "{img:?}");
    assert!(img.skipped_special >= 8, "{img:?}");
    debian_checks(&env, "real/debian-pulled:bookworm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_usr_second_layer_lands_through_the_lib_symlink() {
    let layout = images::merged_usr_two_layer();
    let env = static_env();
    let reference = format!("real/merged-usr:{}", images::MERGED_USR_TAG);
    let img = import(&env, &reference, &layout).await;
    assert_eq!(img.layers.len(), 2, "{img:?}");

    // On the host: the entry went through the link, which is still a link.
    let root = version_root(&env, &img);
    let marker = root.join(images::MARKER_PATH.trim_start_matches('/'));
    assert_eq!(std::fs::read_to_string(&marker).expect("the marker in usr/lib"), images::MARKER_CONTENT);
    assert_eq!(std::fs::read_link(root.join("lib")).expect("lib is still a symlink"), Path::new("usr/lib"));
    no_device_nodes_in_image(&root);

    // In a sandbox.
    let s = sandbox(&env, &reference).await;
    assert_eq!(env.ok(&s.id, &format!("cat {}", images::MARKER_PATH)).await, images::MARKER_CONTENT);
    assert_eq!(env.ok(&s.id, "cat /lib/x86_64-linux-gnu/flotilla-marker").await, images::MARKER_CONTENT);
    assert_eq!(env.ok(&s.id, "test -L /lib && readlink /lib").await, "usr/lib\n");
    assert_eq!(env.ok(&s.id, "test -L /bin && readlink /bin").await, "usr/bin\n");
    root_owns_the_image(&env, &s.id).await;
    assert_eq!(env.ok(&s.id, "echo hi > /etc/x && cat /etc/x").await, "hi\n");
    not_host_root(&env.node.home().join("sandboxes").join(&s.id).join("upper/etc/x"));
    env.client.delete(&s.id).await.expect("deleting the sandbox");
}

/// An image's unpacked tree holds no device node or fifo at all.
fn no_device_nodes_in_image(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
            let t = e.file_type().expect("a file type");
            assert!(!(t.is_char_device() || t.is_block_device() || t.is_fifo()), "{}", e.path().display());
            if t.is_dir() {
                stack.push(e.path());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_only_root_runs_with_the_static_agent() {
    let root = images::busybox_root();
    let env = static_env();
    let img = import(&env, "real/busybox:1", &root).await;
    assert_eq!(img.source_format, "dir");
    let s = sandbox(&env, "real/busybox:1").await;
    // No glibc and no loader in the image: the agent is static.
    env.ok(&s.id, "test ! -e /lib/x86_64-linux-gnu/libc.so.6 && test ! -e /lib64/ld-linux-x86-64.so.2").await;
    let (out, err, st) = env
        .exec(
            &s.id,
            flotilla_api::ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo hi > /etc/x && cat /etc/x".into()],
                ..Default::default()
            },
        )
        .await;
    assert!(st.success(), "{st:?} {err}");
    assert_eq!(out, "hi\n");
    root_owns_the_image(&env, &s.id).await;
    not_host_root(&env.node.home().join("sandboxes").join(&s.id).join("upper/etc/x"));
    env.client.delete(&s.id).await.expect("deleting the sandbox");
}

/// The microVM from the mmdebstrap tarball: the same `dpkg -i` and `/etc`
/// checks (named `vm_` so that nextest's microVM group takes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_debian_rootfs_runs_dpkg_and_writes_etc() {
    let tarball = images::debian_rootfs_tar();
    let env = common::vm_env(common::VmKernel::Built);
    import(&env, "real/debian-vm:bookworm", &tarball).await;
    let s = env
        .create(CreateSandboxRequest {
            image: Some("real/debian-vm:bookworm".into()),
            backend: BackendKind::Vm,
            resources: Resources { memory_bytes: Some(512 << 20), ..Default::default() },
            ..Default::default()
        })
        .await;
    assert_eq!(s.backend, BackendKind::Vm);
    assert_eq!(env.ok(&s.id, "id -u").await, "0\n");
    put_hello_deb(&env, &s.id).await;
    env.ok(&s.id, "dpkg -i /workspace/hello.deb").await;
    assert_eq!(env.ok(&s.id, "hello").await, images::HELLO_OUTPUT);
    assert_eq!(env.ok(&s.id, "echo x > /etc/motd && cat /etc/motd").await, "x\n");
    assert_eq!(env.ok(&s.id, "python3 -c 'print(1+1)'").await, "2\n");
    env.client.delete(&s.id).await.expect("deleting the VM");
}
