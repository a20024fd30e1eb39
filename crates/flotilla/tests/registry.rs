//! Pulling images from an OCI registry: Debian's `docker-registry`
//! (distribution v2) on loopback, fed by `skopeo copy` from an OCI layout
//! built with `umoci`. Anonymous and basic-auth pulls, a pull by digest,
//! a sandbox run from a pulled image, and refusals: a wrong or missing
//! password, a missing tag, a layer whose bytes do not match its digest.
//!
//! Basic auth over plain HTTP: distribution accepts it without TLS (it only
//! warns), so no certificate is needed; the htpasswd file holds a fixed
//! bcrypt hash of a test-only password, so the test needs no `htpasswd`
//! tool.

mod common;
use common::run;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_api::{
    ErrorCode, Image, ImportImageRequest, Operation, OperationKind, OperationState, PullImageRequest, Sandbox,
};
use flotilla_testkit::images::{BasicAuth, LoopbackRegistry};

/// The test user, with a bcrypt hash of the password for the registry's
/// htpasswd file (made once with Python's `bcrypt.hashpw(pw, gensalt(5))`).
const ALICE: BasicAuth = BasicAuth {
    user: "alice",
    password: "flotilla-test-password",
    bcrypt: "$2b$05$HVyLV0VOMLApLTX6vDnwVe0xsEFHrGNdzHjYeEHpExTfT1OlARRBW",
};
const USER: &str = ALICE.user;
const PASSWORD: &str = ALICE.password;

/// An OCI layout at `dir/oci` with tag `v2`: a first layer holding the
/// minimal rootfs plus /bin/extra and ID=flotilla-v1, a second layer that
/// deletes /bin/extra (a whiteout) and rewrites /etc/os-release (an
/// overwrite).
fn two_layer_layout(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    common::minimal_rootfs(&rootfs);
    std::fs::write(rootfs.join("etc/os-release"), "ID=flotilla-v1\n").unwrap();
    let umoci = |args: &[&str]| run(Command::new("umoci").current_dir(dir).args(args));
    umoci(&["init", "--layout", "oci"]);
    umoci(&["new", "--image", "oci:base"]);
    umoci(&["unpack", "--image", "oci:base", "bundle"]);
    run(Command::new("cp").arg("-a").arg(format!("{}/.", rootfs.display())).arg(dir.join("bundle/rootfs")));
    std::fs::write(dir.join("bundle/rootfs/bin/extra"), "extra\n").unwrap();
    umoci(&["repack", "--image", "oci:v1", "bundle"]);
    umoci(&["unpack", "--image", "oci:v1", "bundle2"]);
    std::fs::remove_file(dir.join("bundle2/rootfs/bin/extra")).unwrap();
    std::fs::write(dir.join("bundle2/rootfs/etc/os-release"), "ID=flotilla-v2\n").unwrap();
    umoci(&["repack", "--image", "oci:v2", "bundle2"]);
    dir.join("oci")
}

/// Starts a pull through the API and waits for it.
async fn pull(env: &common::Env, req: PullImageRequest) -> (Operation, Result<Image, flotilla_api::ApiError>) {
    let op = env.client.pull_image(&req).await.map_err(|e| e.to_api()).expect("pull accepted");
    let op = env.client.wait_operation(&op.id, Some(Duration::from_secs(120)), |_| {}).await.unwrap();
    let result = match op.state {
        OperationState::Succeeded => Ok(serde_json::from_value(op.result.clone().unwrap()).unwrap()),
        OperationState::Failed => Err(op.error.clone().unwrap()),
        OperationState::Running => panic!("pull did not finish: {op:?}"),
    };
    (op, result)
}

async fn import(env: &common::Env, reference: &str, path: &Path) -> Image {
    let req = ImportImageRequest { reference: reference.into(), path: path.display().to_string() };
    let op = env.client.import_image(&req).await.unwrap();
    let op = env.client.wait_operation(&op.id, Some(Duration::from_secs(120)), |_| {}).await.unwrap();
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    serde_json::from_value(op.result.unwrap()).unwrap()
}

/// `flotilla ARGS --home HOME`, returning stdout; panics on failure.
fn cli(env: &common::Env, args: &[&str], stdin: Option<&str>, envs: &[(&str, &str)]) -> Vec<u8> {
    let out = cli_output(env, args, stdin, envs);
    assert!(out.status.success(), "flotilla {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn cli_output(env: &common::Env, args: &[&str], stdin: Option<&str>, envs: &[(&str, &str)]) -> std::process::Output {
    // `--home` goes before a `--` that starts a command's argv.
    let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    let mut child = Command::new(common::BIN)
        .args(&args[..split])
        .arg("--home")
        .arg(env.node.home())
        .args(&args[split..])
        .envs(envs.iter().copied())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn staging_is_empty(env: &common::Env) {
    let staging = env.node.home().join("images/staging");
    let left: Vec<_> = std::fs::read_dir(staging).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_matches_the_local_layout_and_runs() {
    let env = common::env();
    let work = tempfile::tempdir().unwrap();
    let layout = two_layer_layout(work.path());
    let registry = LoopbackRegistry::start();
    registry.push(&layout, "v2", "team/app:1");
    let source = format!("{}/team/app:1", registry.addr());

    // The CLI, with its default local name.
    let out = cli(&env, &["image", "pull", "--plain-http", &source, "--json"], None, &[]);
    let img: Image = serde_json::from_slice(&out).unwrap();
    assert_eq!(img.reference, "app:1");
    assert_eq!(img.source_format, "oci_registry");
    assert_eq!(img.source, source);
    assert_eq!(img.layers.len(), 2, "{img:?}");

    // The same layout imported from disk: the same version.
    let local = import(&env, "t/local:v2", &layout).await;
    assert_eq!(img.digest, local.digest, "a pull records the manifest digest, as a layout import does");
    assert_eq!(img.layers, local.layers);
    let listed = env.client.images().await.unwrap();
    let app = listed.iter().find(|i| i.reference == "app:1").expect("app:1 listed");
    assert_eq!(app.digest, local.digest);
    assert!(app.aliases.iter().any(|a| a == "t/local:v2"), "{app:?}");

    // The steps a client follows.
    let ops = env.client.operations().await.unwrap();
    let op = ops.iter().find(|o| o.kind == OperationKind::PullImage).expect("a pull operation");
    assert_eq!(op.target, "app:1");
    let steps: Vec<&str> = op.steps.iter().map(|s| s.name.as_str()).collect();
    for want in ["pull_requested", "authenticating", "resolving", "pulling_layer", "applying", "committing"] {
        assert!(steps.contains(&want), "no step {want}: {steps:?}");
    }
    let layer_step = op.steps.iter().find(|s| s.name == "pulling_layer").unwrap();
    let detail = layer_step.detail.as_deref().unwrap();
    assert!(detail.starts_with("1/2 sha256:"), "{detail}");

    // A sandbox from it: the second layer's overwrite and whiteout hold.
    let out = cli(&env, &["sandbox", "create", "--image", "app:1", "--json"], None, &[]);
    let sb: Sandbox = serde_json::from_slice(&out).unwrap();
    assert_eq!(sb.image, format!("app:1@{}", img.digest));
    let out = cli(&env, &["sandbox", "exec", &sb.id, "--", "cat", "/etc/os-release"], None, &[]);
    assert_eq!(String::from_utf8_lossy(&out), "ID=flotilla-v2\n");
    let out = env.ok(&sb.id, "test ! -e /bin/extra && echo whiteout-honoured").await;
    assert_eq!(out, "whiteout-honoured\n");

    // By digest, with an explicit name.
    let by_digest = format!("{}/team/app@{}", registry.addr(), img.digest);
    let (_, pinned) = pull(
        &env,
        PullImageRequest {
            source: by_digest,
            reference: Some("team/app:pinned".into()),
            plain_http: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(pinned.unwrap().digest, img.digest);

    // A missing tag and a missing repository: not_found, nothing stored.
    for missing in ["team/app:nope", "team/nothing:1"] {
        let (op, res) = pull(
            &env,
            PullImageRequest {
                source: format!("{}/{missing}", registry.addr()),
                reference: Some("t/missing:1".into()),
                plain_http: true,
                ..Default::default()
            },
        )
        .await;
        let e = res.unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound, "{missing}: {e:?}");
        assert_eq!(e.details.unwrap()["step"], "resolving", "{op:?}");
    }
    // HTTPS to a plain-HTTP registry fails and says what to try.
    let (_, res) = pull(
        &env,
        PullImageRequest { source: source.clone(), reference: Some("t/tls:1".into()), ..Default::default() },
    )
    .await;
    let e = res.unwrap_err();
    assert!(e.message.contains("--plain-http"), "{e:?}");
    assert!(env.client.image("t/missing:1").await.is_err());
    assert!(env.client.image("t/tls:1").await.is_err());
    staging_is_empty(&env);
    env.client.delete(&sb.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_pulls_and_refusals_name_the_step() {
    let env = common::env();
    let work = tempfile::tempdir().unwrap();
    let layout = two_layer_layout(work.path());
    let registry = LoopbackRegistry::start_with(Some(ALICE));
    registry.push_as(&layout, "v2", "team/private:3", Some(ALICE));
    let source = format!("{}/team/private:3", registry.addr());
    let req = |username: Option<&str>, password: Option<&str>| PullImageRequest {
        source: source.clone(),
        reference: None,
        plain_http: true,
        username: username.map(str::to_string),
        password: password.map(str::to_string),
    };

    // No credentials, then a wrong password: refused at `authenticating`.
    let (_, res) = pull(&env, req(None, None)).await;
    let e = res.unwrap_err();
    assert_eq!(e.code, ErrorCode::Unauthorized, "{e:?}");
    assert_eq!(e.details.as_ref().unwrap()["step"], "authenticating");
    assert!(e.message.contains("--username"), "{}", e.message);
    let wrong = "not-the-password-42";
    let (op, res) = pull(&env, req(Some(USER), Some(wrong))).await;
    let e = res.unwrap_err();
    assert_eq!(e.code, ErrorCode::Unauthorized, "{e:?}");
    assert_eq!(e.details.as_ref().unwrap()["step"], "authenticating");
    assert!(e.message.contains("refused the credentials"), "{}", e.message);
    let text = serde_json::to_string(&op).unwrap();
    assert!(!text.contains(wrong) && !text.contains(USER), "credentials in the operation: {text}");

    // The right password, from standard input and from the environment.
    let out = cli(
        &env,
        &["image", "pull", "--plain-http", &source, "--username", USER, "--password-stdin", "--json"],
        Some(&format!("{PASSWORD}\n")),
        &[],
    );
    let img: Image = serde_json::from_slice(&out).unwrap();
    assert_eq!(img.reference, "private:3");
    let out = cli(
        &env,
        &["image", "pull", "--plain-http", &source, "--as", "team/private:env", "--username", USER, "--json"],
        None,
        &[("FLOTILLA_REGISTRY_PASSWORD", PASSWORD)],
    );
    let again: Image = serde_json::from_slice(&out).unwrap();
    assert_eq!(again.digest, img.digest);
    // The CLI's failure names the step too.
    let out = cli_output(
        &env,
        &["image", "pull", "--plain-http", &source, "--as", "t/x:1", "--username", USER, "--password-stdin"],
        Some("nope\n"),
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("authenticating") && stderr.contains("unauthorized"), "{stderr}");

    // The password is nowhere the node writes: operations, events, log,
    // database.
    for op in env.client.operations().await.unwrap() {
        let text = serde_json::to_string(&op).unwrap();
        assert!(!text.contains(PASSWORD) && !text.contains(wrong), "credentials in {text}");
    }
    let log = env.node.log();
    assert!(!log.contains(PASSWORD) && !log.contains(wrong), "credentials in the node log");
    for entry in std::fs::read_dir(env.node.home()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("node.db") {
            let bytes = std::fs::read(entry.path()).unwrap();
            let hay = String::from_utf8_lossy(&bytes);
            assert!(!hay.contains(PASSWORD) && !hay.contains(wrong), "credentials in {name}");
        }
    }
    staging_is_empty(&env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_that_does_not_match_its_digest_is_refused() {
    let env = common::env();
    let work = tempfile::tempdir().unwrap();
    let layout = two_layer_layout(work.path());
    let registry = LoopbackRegistry::start();
    registry.push(&layout, "v2", "team/app:1");
    let local = import(&env, "t/local:v2", &layout).await;

    // Flip bytes in the middle of the second layer as the registry stores
    // it: same length, different content.
    let layer = local.layers.last().unwrap();
    let blob = registry.blob(layer);
    let mut bytes = std::fs::read(&blob).unwrap_or_else(|e| panic!("{}: {e}", blob.display()));
    let (mid, end) = (bytes.len() / 2, (bytes.len() / 2 + 16).min(bytes.len()));
    for b in &mut bytes[mid..end] {
        *b ^= 0xff;
    }
    std::fs::write(&blob, &bytes).unwrap();

    let (op, res) = pull(
        &env,
        PullImageRequest {
            source: format!("{}/team/app:1", registry.addr()),
            reference: Some("t/corrupt:1".into()),
            plain_http: true,
            ..Default::default()
        },
    )
    .await;
    let e = res.unwrap_err();
    assert_eq!(e.code, ErrorCode::UnprocessableTar, "{e:?}");
    assert!(e.message.contains(layer.as_str()) && e.message.contains("does not match its digest"), "{}", e.message);
    assert_eq!(e.details.as_ref().unwrap()["step"], "pulling_layer", "{op:?}");
    assert!(env.client.image("t/corrupt:1").await.is_err());
    let all: Vec<String> = env.client.images().await.unwrap().into_iter().map(|i| i.reference).collect();
    assert_eq!(all, ["t/local:v2"]);
    staging_is_empty(&env);
}
