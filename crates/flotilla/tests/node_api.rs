//! The node's visibility and convenience API through the real daemon:
//! git revisions into the workspace, server-sent events with resume,
//! Prometheus metrics, idle TTLs, operations, and the TLS listener that
//! refuses requests without the token.

mod common;

use std::process::Command;
use std::time::Duration;

use flotilla_api::{CreateSandboxRequest, GitImportRequest, OperationState};

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .output()
        .expect("git is installed (.ci/run installs it)");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_revisions_land_in_the_workspace() {
    let env = common::env();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q", "-b", "main"]);
    std::fs::write(repo.path().join("a.txt"), "one\n").unwrap();
    git(repo.path(), &["add", "."]);
    git(repo.path(), &["commit", "-q", "-m", "one"]);
    let first = git(repo.path(), &["rev-parse", "HEAD"]);
    std::fs::write(repo.path().join("a.txt"), "two\n").unwrap();
    std::fs::create_dir(repo.path().join("sub")).unwrap();
    std::fs::write(repo.path().join("sub/b.txt"), "b\n").unwrap();
    git(repo.path(), &["add", "."]);
    git(repo.path(), &["commit", "-q", "-m", "two"]);

    let s = env.sandbox().await;
    let repo_s = repo.path().display().to_string();
    // HEAD through the API.
    let op = env
        .client
        .git_import(&s.id, &GitImportRequest { repo: repo_s.clone(), rev: None, dir: Some("head".into()) })
        .await
        .unwrap();
    let op = env.client.wait_operation(&op.id, Some(Duration::from_secs(60)), |_| {}).await.unwrap();
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    let steps: Vec<&str> = op.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(steps, ["inspect_repo", "resolved", "start_write_tar", "end_write_tar"]);
    assert_eq!(env.ok(&s.id, "cat head/a.txt head/sub/b.txt").await, "two\nb\n");
    // An older revision through the CLI, as a file:// URL (the remote path).
    let out = Command::new(common::BIN)
        .args(["sandbox", "put", &s.id, "--dir", "old", "--git"])
        .arg(format!("file://{repo_s}@{first}"))
        .arg("--home")
        .arg(env.node.home())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&first));
    assert_eq!(env.ok(&s.id, "cat old/a.txt; test ! -e old/sub && echo no-sub").await, "one\nno-sub\n");
    // A revision that does not exist fails at the step that looked for it.
    let op = env
        .client
        .git_import(&s.id, &GitImportRequest { repo: repo_s, rev: Some("nope".into()), dir: None })
        .await
        .unwrap();
    let op = env.client.wait_operation(&op.id, Some(Duration::from_secs(60)), |_| {}).await.unwrap();
    assert_eq!(op.state, OperationState::Failed);
    assert_eq!(op.error.unwrap().details.unwrap()["step"], "inspect_repo");
    // No scratch left behind.
    let tmp = env.node.home().join("tmp");
    assert!(!tmp.exists() || std::fs::read_dir(&tmp).unwrap().count() == 0);
}

/// Reads SSE messages from `GET /v1/events` until `until` says stop.
async fn read_events(
    env: &common::Env,
    last_id: Option<u64>,
    mut until: impl FnMut(&flotilla_api::NodeEvent) -> bool,
) -> Vec<flotilla_api::NodeEvent> {
    use http_body_util::BodyExt;
    let mut req = env.client.http().request(http::Method::GET, "/v1/events");
    if let Some(id) = last_id {
        req = req.header("last-event-id", id.to_string());
    }
    let resp =
        env.client.http().send_ok(req.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap()).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.unwrap().into_data() else { continue };
            buf.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = buf.find("\n\n") {
                let msg: String = buf.drain(..end + 2).collect();
                let Some(data) = msg.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
                let ev: flotilla_api::NodeEvent = serde_json::from_str(data).unwrap();
                let id_line = msg.lines().find_map(|l| l.strip_prefix("id: ")).unwrap();
                assert_eq!(id_line, ev.id.to_string(), "the SSE id is the event's id");
                let stop = until(&ev);
                out.push(ev);
                if stop {
                    return;
                }
            }
        }
    })
    .await
    .expect("events arrived in time");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_every_change_and_resume_by_id() {
    let env = common::env();
    let client = env.client.clone();
    let creator = tokio::spawn(async move {
        // Give the subscriber a moment's head start by creating twice.
        let a = client.create(&CreateSandboxRequest::default()).await.unwrap();
        client.delete(&a.id).await.unwrap();
        a.id
    });
    let events = read_events(&env, None, |e| matches!(e.body, flotilla_api::EventBody::SandboxDeleted { .. })).await;
    let id = creator.await.unwrap();
    let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "ids grow: {ids:?}");
    let states: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.body {
            flotilla_api::EventBody::Sandbox { sandbox } if sandbox.id == id => Some(sandbox.state.to_string()),
            _ => None,
        })
        .collect();
    assert!(states.contains(&"running".to_string()), "{states:?}");
    assert!(
        events.iter().any(|e| matches!(&e.body, flotilla_api::EventBody::Operation { operation }
            if operation.target == id && operation.state == OperationState::Succeeded)),
        "the create operation's end is an event"
    );
    // Resume after the first event: exactly the rest is replayed.
    let first = events[0].id;
    let last = events.last().unwrap().id;
    let replay = read_events(&env, Some(first), |e| e.id == last).await;
    assert_eq!(replay.iter().map(|e| e.id).collect::<Vec<_>>(), ids[1..].to_vec());
    // The CLI prints the replay too, one JSON event per line.
    let mut child = Command::new(common::BIN)
        .args(["events", "--json", "--after"])
        .arg(first.to_string())
        .arg("--home")
        .arg(env.node.home())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let want = ids.len() - 1;
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().take(want).map(|l| l.unwrap()).collect::<Vec<_>>()
    });
    let lines =
        tokio::time::timeout(Duration::from_secs(20), lines).await.expect("the CLI printed the replay").unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let printed: Vec<u64> =
        lines.iter().map(|l| serde_json::from_str::<flotilla_api::NodeEvent>(l).expect("JSON lines").id).collect();
    assert_eq!(printed, ids[1..].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_idle_ttls() {
    let env = common::env();
    let s = env.create(CreateSandboxRequest { idle_ttl_s: Some(3), ..Default::default() }).await;
    let first = s.delete_at.expect("an idle TTL sets a deadline");
    // Activity pushes the deadline out.
    common::eventually(Duration::from_secs(10), "an exec to renew the deadline", || async {
        env.ok(&s.id, "true").await;
        let now = env.client.get(&s.id).await.unwrap();
        (now.delete_at.unwrap() > first).then_some(())
    })
    .await;
    // Idle, it is reaped.
    common::eventually(Duration::from_secs(20), "the idle sandbox to be reaped", || async {
        env.client.get(&s.id).await.is_err().then_some(())
    })
    .await;
    let resp = env
        .client
        .http()
        .send_ok(
            env.client
                .http()
                .request(http::Method::GET, "/metrics")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let text = String::from_utf8(flotilla_agent::http::read_body(resp).await.unwrap().to_vec()).unwrap();
    assert!(text.contains("flotilla_operations_total{kind=\"create_sandbox\",state=\"succeeded\"} 1"), "{text}");
    assert!(text.contains("flotilla_janitor_reaped_total{reason=\"expired\"} 1"), "{text}");
    assert!(text.contains("# TYPE flotilla_sandboxes gauge"), "{text}");
    assert!(text.contains("flotilla_operation_duration_seconds_count{kind=\"create_sandbox\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_api_refuses_requests_without_the_token() {
    let env = common::env_with(&["--listen", "127.0.0.1:0"]);
    // The node prints where it listens and its certificate's fingerprint.
    let (addr, sha) = common::eventually(Duration::from_secs(10), "the TLS listener", || async {
        let log = env.node.log();
        let line = log.lines().find(|l| l.contains("node API on https://"))?.to_string();
        let addr = line.split("https://").nth(1)?.split_whitespace().next()?.to_string();
        let sha = line.split("sha256 ").nth(1)?.split(|c: char| c == ';' || c.is_whitespace()).next()?.to_string();
        Some((addr, sha))
    })
    .await;
    let token = std::fs::read_to_string(env.node.home().join("tls/token")).unwrap().trim().to_string();
    let url = format!("https://{addr}");
    let cli = |extra: &[&str]| {
        Command::new(common::BIN)
            .args(["info", "--json", "--node", &url])
            .args(extra)
            .env_remove("FLOTILLA_TOKEN")
            .output()
            .unwrap()
    };
    // No token: refused with the envelope's code.
    let out = cli(&["--cert-sha256", &sha]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unauthorized"), "{}", String::from_utf8_lossy(&out.stderr));
    // A wrong token: refused.
    let out = cli(&["--cert-sha256", &sha, "--token", "not-the-token-at-all"]);
    assert!(!out.status.success());
    // The right token, pinned by fingerprint and by the certificate file.
    let out = cli(&["--cert-sha256", &sha, "--token", &token]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cert = env.node.home().join("tls/cert.pem");
    let out = cli(&["--ca", cert.to_str().unwrap(), "--token", &token]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: flotilla_api::NodeInfo = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!info.node_id.is_empty());
    // Sandboxes work over TLS too, including an exec stream.
    let out = Command::new(common::BIN)
        .args(["sandbox", "create", "--json", "--node", &url, "--token", &token, "--cert-sha256", &sha])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: flotilla_api::Sandbox = serde_json::from_slice(&out.stdout).unwrap();
    let out = Command::new(common::BIN)
        .args([
            "sandbox",
            "exec",
            &s.id,
            "--node",
            &url,
            "--token",
            &token,
            "--cert-sha256",
            &sha,
            "--",
            "echo",
            "over-tls",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over-tls\n");
    // The Unix socket stays private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.node.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
