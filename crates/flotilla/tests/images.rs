//! Images: import from a directory, a rootfs tarball, an OCI image layout
//! (directory and tar, built with `umoci`) and a `docker save` archive
//! (made with `skopeo`), run a sandbox from each, promote and delete tags,
//! and refuse hostile or tampered layers.

mod common;
use common::run;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla_api::{CreateSandboxRequest, ErrorCode, Image, ImportImageRequest, OperationState};

/// Imports and waits; returns the image or the operation's error.
async fn import(env: &common::Env, reference: &str, path: &Path) -> Result<Image, flotilla_api::ApiError> {
    let req = ImportImageRequest { reference: reference.into(), path: path.display().to_string() };
    let op = env.client.import_image(&req).await.map_err(|e| e.to_api())?;
    let op = env.client.wait_operation(&op.id, Some(Duration::from_secs(120)), |_| {}).await.unwrap();
    match op.state {
        OperationState::Succeeded => Ok(serde_json::from_value(op.result.unwrap()).unwrap()),
        OperationState::Failed => Err(op.error.unwrap()),
        OperationState::Running => panic!("import of {reference} did not finish: {op:?}"),
    }
}

/// Creates a sandbox from `image` and returns what `script` prints in it.
async fn run_in(env: &common::Env, image: &str, script: &str) -> (String, String) {
    let s = env.create(CreateSandboxRequest { image: Some(image.into()), ..Default::default() }).await;
    (s.id.clone(), env.ok(&s.id, script).await)
}

/// An OCI layout at `dir/oci` with tags `v1` (the rootfs plus /bin/extra)
/// and `v2` (a second layer that deletes /bin/extra and rewrites
/// /etc/os-release: a whiteout and an overwrite).
fn oci_layout(dir: &Path, rootfs: &Path) {
    run(Command::new("umoci").current_dir(dir).args(["init", "--layout", "oci"]));
    run(Command::new("umoci").current_dir(dir).args(["new", "--image", "oci:base"]));
    run(Command::new("umoci").current_dir(dir).args(["unpack", "--image", "oci:base", "bundle"]));
    run(Command::new("cp").arg("-a").arg(format!("{}/.", rootfs.display())).arg(dir.join("bundle/rootfs")));
    std::fs::write(dir.join("bundle/rootfs/bin/extra"), "extra\n").unwrap();
    run(Command::new("umoci").current_dir(dir).args(["repack", "--image", "oci:v1", "bundle"]));
    // v2 is a layer on top of v1: unpack v1 afresh so the diff is against it.
    run(Command::new("umoci").current_dir(dir).args(["unpack", "--image", "oci:v1", "bundle2"]));
    std::fs::remove_file(dir.join("bundle2/rootfs/bin/extra")).unwrap();
    std::fs::write(dir.join("bundle2/rootfs/etc/os-release"), "ID=flotilla-v2\n").unwrap();
    run(Command::new("umoci").current_dir(dir).args(["repack", "--image", "oci:v2", "bundle2"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_imports_and_runs() {
    let env = common::env();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    common::minimal_rootfs(&rootfs);
    std::fs::write(rootfs.join("etc/os-release"), "ID=flotilla-v1\n").unwrap();

    // A directory.
    let dir_img = import(&env, "t/dir:1", &rootfs).await.unwrap();
    assert_eq!(dir_img.source_format, "dir");
    assert!(dir_img.digest.starts_with("sha256:"));
    let (a, out) = run_in(&env, "t/dir:1", "cat /etc/os-release").await;
    assert_eq!(out, "ID=flotilla-v1\n");
    // The sandbox records the version it booted from.
    assert_eq!(env.client.get(&a).await.unwrap().image, format!("t/dir:1@{}", dir_img.digest));
    // The store is the node's alone: the sandbox got a tree the node
    // opened for it, never the path.
    use std::os::unix::fs::PermissionsExt;
    for d in ["images", "images/versions", "images/staging"] {
        let mode = std::fs::metadata(env.node.home().join(d)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{d}");
    }

    // A plain rootfs tarball (gzip).
    let tgz = work.path().join("root.tar.gz");
    run(Command::new("tar").arg("-C").arg(&rootfs).arg("-czf").arg(&tgz).arg("."));
    let tar_img = import(&env, "t/tar:1", &tgz).await.unwrap();
    assert_eq!(tar_img.source_format, "rootfs_tar");
    assert_eq!(run_in(&env, "t/tar:1", "cat /etc/os-release").await.1, "ID=flotilla-v1\n");

    // An OCI layout directory, two layers, the second with a whiteout.
    let oci_dir = work.path().join("ocibuild");
    std::fs::create_dir(&oci_dir).unwrap();
    oci_layout(&oci_dir, &rootfs);
    let layout = oci_dir.join("oci");
    let v1 = import(&env, "t/oci:v1", &layout).await.unwrap();
    let v2 = import(&env, "t/oci:v2", &layout).await.unwrap();
    assert_eq!(v2.source_format, "oci_layout");
    assert_ne!(v1.digest, v2.digest, "tags pick their own manifests");
    assert!(v2.layers.len() >= 2, "{v2:?}");
    assert_eq!(run_in(&env, "t/oci:v1", "cat /bin/extra /etc/os-release").await.1, "extra\nID=flotilla-v1\n");
    let (_, out) =
        run_in(&env, "t/oci:v2", "test ! -e /bin/extra && echo whiteout-honoured; cat /etc/os-release").await;
    assert_eq!(out, "whiteout-honoured\nID=flotilla-v2\n");

    // The same layout as a tarball.
    let oci_tar = work.path().join("oci.tar");
    run(Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&oci_tar).arg("."));
    let from_tar = import(&env, "t/ocitar:v2", &oci_tar).await.unwrap();
    assert_eq!(from_tar.digest, v2.digest, "the digest is the manifest's, whatever the packaging");

    // A `docker save` archive, written by skopeo from the layout.
    let docker = work.path().join("docker.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:v2", layout.display()))
        .arg(format!("docker-archive:{}:t/docker:v2", docker.display())));
    let d = import(&env, "t/docker:v2", &docker).await.unwrap();
    assert_eq!(d.source_format, "docker_archive");
    let (docker_sb, out) = run_in(&env, "t/docker:v2", "test ! -e /bin/extra && cat /etc/os-release").await;
    assert_eq!(out, "ID=flotilla-v2\n");

    // Listing, promotion, deletion.
    let all = env.client.images().await.unwrap();
    for r in ["t/dir:1", "t/tar:1", "t/oci:v1", "t/oci:v2", "t/ocitar:v2", "t/docker:v2"] {
        assert!(all.iter().any(|i| i.reference == r), "{r} not listed");
    }
    let promoted = env.client.promote_image("t/oci:v2", "t/oci:stable").await.unwrap();
    assert_eq!(promoted.digest, v2.digest);
    let shown = env.client.image("t/oci:stable").await.unwrap();
    assert!(shown.aliases.iter().any(|a| a == "t/oci:v2" || a == "t/ocitar:v2"), "{shown:?}");
    let busy = env.client.delete_image("t/docker:v2").await.unwrap_err().to_api();
    assert_eq!(busy.code, ErrorCode::Conflict, "{busy:?}");
    assert!(busy.message.contains(&docker_sb), "{}", busy.message);
    env.client.delete(&docker_sb).await.unwrap();
    env.client.delete_image("t/docker:v2").await.unwrap();
    let gone = env.client.image("t/docker:v2").await.unwrap_err().to_api();
    assert_eq!(gone.code, ErrorCode::NotFound);

    // The CLI: a list as JSON, an import by relative path.
    let out = Command::new(common::BIN)
        .args(["image", "import", "t/cli:1", "root.tar.gz", "--json", "--home"])
        .arg(env.node.home())
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img: Image = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(img.digest, tar_img.digest, "the same archive gives the same digest");
    let out =
        Command::new(common::BIN).args(["image", "ls", "--json", "--home"]).arg(env.node.home()).output().unwrap();
    let listed: Vec<Image> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed.iter().any(|i| i.reference == "t/cli:1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_tampered_images_are_refused() {
    let env = common::env();
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();

    // A rootfs tarball that climbs out.
    let mut h = tar::Header::new_old();
    let name = b"../../../../../../../../tmp/flotilla-image-escape";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_size(4);
    h.set_mode(0o644);
    h.set_cksum();
    let mut evil = h.as_bytes().to_vec();
    evil.extend_from_slice(b"evil");
    evil.resize(512 * 2, 0);
    evil.extend_from_slice(&[0; 1024]);
    let evil_path = work.path().join("evil.tar");
    std::fs::write(&evil_path, &evil).unwrap();
    let e = import(&env, "t/evil:1", &evil_path).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::UnprocessableTar, "{e:?}");
    assert!(e.message.contains("flotilla-image-escape"), "the entry is named: {}", e.message);
    assert!(!Path::new("/tmp/flotilla-image-escape").exists());

    // An OCI layout whose layer was changed after its manifest was written.
    let rootfs = work.path().join("rootfs");
    common::minimal_rootfs(&rootfs);
    std::fs::write(rootfs.join("etc/os-release"), "ID=x\n").unwrap();
    let oci_dir = work.path().join("ocibuild");
    std::fs::create_dir(&oci_dir).unwrap();
    oci_layout(&oci_dir, &rootfs);
    let layout = oci_dir.join("oci");
    let v1 = import(&env, "t/good:v1", &layout).await.unwrap();
    let layer = v1.layers.last().unwrap().strip_prefix("sha256:").unwrap().to_string();
    let blob = layout.join("blobs/sha256").join(&layer);
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 8); // a gzip stream cut short: corrupt and mismatched
    std::fs::write(&blob, &bytes).unwrap();
    let e = import(&env, "t/tampered:v1", &layout).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::UnprocessableTar, "{e:?}");

    // A docker archive whose manifest points outside it.
    let d = work.path().join("docker");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(
        d.join("manifest.json"),
        r#"[{"Config":"../../../etc/passwd","RepoTags":["x:1"],"Layers":["../../../etc/shadow"]}]"#,
    )
    .unwrap();
    let docker_tar = work.path().join("docker.tar");
    run(Command::new("tar").arg("-C").arg(&d).arg("-cf").arg(&docker_tar).arg("manifest.json"));
    let e = import(&env, "t/docker-evil:1", &docker_tar).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::UnprocessableTar, "{e:?}");
    assert!(e.message.contains("etc/passwd"), "{}", e.message);

    // Bad references and missing sources are plain errors, not operations.
    let bad = env
        .client
        .import_image(&ImportImageRequest { reference: "Bad Name".into(), path: "/tmp".into() })
        .await
        .unwrap_err()
        .to_api();
    assert_eq!(bad.code, ErrorCode::InvalidArgument);
    let missing = import(&env, "t/missing:1", Path::new("/no/such/file.tar")).await.unwrap_err();
    assert_eq!(missing.code, ErrorCode::InvalidArgument, "{missing:?}");

    // Nothing was left half-made: only the good image exists.
    let all = env.client.images().await.unwrap();
    assert_eq!(all.iter().map(|i| i.reference.as_str()).collect::<Vec<_>>(), ["t/good:v1"]);
    let staging = env.node.home().join("images/staging");
    assert_eq!(std::fs::read_dir(staging).unwrap().count(), 0, "staging left behind");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}
