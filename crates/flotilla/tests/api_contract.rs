//! The API contract under hostile clients: every error is the
//! `{code, message, details}` envelope, inputs are bounded where they are
//! parsed, a body that never comes gets a 408 instead of a hung connection,
//! and a command's stream always ends by saying why. Each test is named
//! after a case a fuzzer or a hand-written bad request found.

mod common;

use std::process::Command;
use std::time::Duration;

use flotilla_agent::client::drain_exec;
use flotilla_agent::http::ClientError;
use flotilla_api::{ApiError, ErrorCode, ExecRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `head` (and `body`) as raw HTTP/1.1 on the node's socket and
/// returns the status and the body, within `within`. The request line and
/// headers are the test's own, lies included.
async fn raw(env: &common::Env, head: &str, body: &[u8], within: Duration) -> (u16, String) {
    let mut s = tokio::net::UnixStream::connect(env.node.socket()).await.unwrap();
    s.write_all(head.replace('\n', "\r\n").as_bytes()).await.unwrap();
    s.write_all(b"\r\n").await.unwrap();
    // A server may answer from the headers alone (a 415, say) and close
    // before the body is written: that is an answer, not a failure.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    // The server answers and closes (`Connection: close` in every head); a
    // connection it holds open past `within` fails the test.
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if let Some(resp) = complete(&out) {
                return resp;
            }
        }
        complete(&out).unwrap_or_else(|| panic!("connection closed mid-response: {:?}", String::from_utf8_lossy(&out)))
    };
    tokio::time::timeout(within, read).await.unwrap_or_else(|_| panic!("no answer within {within:?} to:\n{head}"))
}

/// A whole response with a Content-Length body, if `buf` holds one.
fn complete(buf: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let len = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))?
        .ok()?;
    (body.len() >= len).then(|| (status, body[..len].to_string()))
}

#[track_caller]
fn envelope(status: u16, body: &str, want_status: u16, want: ErrorCode) -> ApiError {
    assert_eq!(status, want_status, "{body}");
    let e: ApiError = serde_json::from_str(body).unwrap_or_else(|e| panic!("not an error envelope ({e}): {body}"));
    assert_eq!(e.code, want, "{body}");
    e
}

fn post(path: &str, content_type: Option<&str>, body: &str) -> String {
    let ct = content_type.map(|c| format!("Content-Type: {c}\n")).unwrap_or_default();
    format!("POST {path} HTTP/1.1\nHost: x\nConnection: close\n{ct}Content-Length: {}\n", body.len())
}

const SECS: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_overflow_is_refused_and_nothing_is_created() {
    let env = common::env();
    for (field, body) in [
        ("ttl_s", r#"{"ttl_s": 9223372036854775807}"#),
        ("ttl_s", r#"{"ttl_s": 315576001}"#),
        ("idle_ttl_s", r#"{"idle_ttl_s": 18446744073709551615}"#),
    ] {
        let (st, b) = raw(&env, &post("/v1/sandboxes", Some("application/json"), body), body.as_bytes(), SECS).await;
        let e = envelope(st, &b, 400, ErrorCode::InvalidArgument);
        assert_eq!(e.details.unwrap()["field"], field);
    }
    // The CLI says so and creates nothing.
    let home = env.node.home().to_str().unwrap().to_string();
    let out = Command::new(common::BIN)
        .args(["--home", &home, "sandbox", "create", "--ttl", "1000000000000s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("ttl_s"), "{stderr}");
    assert!(!stderr.contains("internal"), "{stderr}");
    let list = env.client.list().await.unwrap();
    assert!(list.is_empty(), "created anyway: {list:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_limits_are_a_400_naming_the_field_on_create_and_patch() {
    let env = common::env();
    for (field, body) in [
        ("resources.pids", r#"{"resources": {"pids": 9223372036854775807}}"#),
        ("resources.pids", r#"{"resources": {"pids": 2}}"#),
        ("resources.memory_bytes", r#"{"resources": {"memory_bytes": 18446744073709551615}}"#),
        ("resources.cpus", r#"{"resources": {"cpus": 1e300}}"#),
        ("env", r#"{"env": {"A=B": "x"}}"#),
    ] {
        let (st, b) = raw(&env, &post("/v1/sandboxes", Some("application/json"), body), body.as_bytes(), SECS).await;
        let e = envelope(st, &b, 400, ErrorCode::InvalidArgument);
        assert_eq!(e.details.unwrap()["field"], field, "{b}");
    }
    assert!(env.client.list().await.unwrap().is_empty());

    let s = env.sandbox().await;
    let body = r#"{"resources": {"pids": 9223372036854775807}}"#;
    let head = format!(
        "PATCH /v1/sandboxes/{} HTTP/1.1\nHost: x\nConnection: close\nContent-Type: application/json\nContent-Length: {}\n",
        s.id,
        body.len()
    );
    let (st, b) = raw(&env, &head, body.as_bytes(), SECS).await;
    let e = envelope(st, &b, 400, ErrorCode::InvalidArgument);
    assert_eq!(e.details.unwrap()["field"], "resources.pids");
    // Exec takes the same env rules as create.
    let bad = ExecRequest {
        argv: vec!["true".into()],
        env: [("A=B".to_string(), "x".to_string())].into(),
        ..Default::default()
    };
    match env.client.sandbox(&s.id).exec(&bad).await {
        Err(ClientError::Api(e)) => assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}"),
        Err(e) => panic!("expected invalid_argument, got {e:?}"),
        Ok(_) => panic!("an env name with `=` was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_are_envelopes() {
    let env = common::env();
    let s = env.sandbox().await;
    let create = |ct: Option<&str>, body: &str| post("/v1/sandboxes", ct, body);
    for (head, body, status, code) in [
        (create(Some("text/plain"), "{}"), "{}", 415, ErrorCode::UnsupportedMediaType),
        (create(None, "{}"), "{}", 415, ErrorCode::UnsupportedMediaType),
        (create(Some("application/json"), "[]"), "[]", 400, ErrorCode::InvalidArgument),
        (create(Some("application/json"), r#"{"nme":"x"}"#), r#"{"nme":"x"}"#, 400, ErrorCode::InvalidArgument),
        (create(Some("application/json"), "{"), "{", 400, ErrorCode::InvalidArgument),
    ] {
        let (st, b) = raw(&env, &head, body.as_bytes(), SECS).await;
        envelope(st, &b, status, code);
    }
    let get = |path: &str| format!("GET {path} HTTP/1.1\nHost: x\nConnection: close\n");
    let cases = [
        (get("/v1/sandboxes?limit=many"), 400, ErrorCode::InvalidArgument),
        (get("/v1/sandboxes?nonsense=1"), 400, ErrorCode::InvalidArgument),
        (get(&format!("/v1/sandboxes/{}/ls?dir=../x", s.id)), 400, ErrorCode::InvalidArgument),
        (get("/v1/nowhere"), 404, ErrorCode::NotFound),
        ("DELETE /v1/node HTTP/1.1\nHost: x\nConnection: close\n".to_string(), 405, ErrorCode::MethodNotAllowed),
    ];
    for (head, status, code) in cases {
        let (st, b) = raw(&env, &head, b"", SECS).await;
        envelope(st, &b, status, code);
    }
    // Exec bodies and agent routes proxied by the node too.
    let path = format!("/v1/sandboxes/{}/exec", s.id);
    let (st, b) = raw(&env, &post(&path, Some("text/plain"), "{}"), b"{}", SECS).await;
    envelope(st, &b, 415, ErrorCode::UnsupportedMediaType);
    let body = r#"{"argv": []}"#;
    let (st, b) = raw(&env, &post(&path, Some("application/json"), body), body.as_bytes(), SECS).await;
    envelope(st, &b, 400, ErrorCode::InvalidArgument);
}

/// A request that declares a body and never sends it: answered with a 408
/// once the (here shortened) body timeout passes, not held open. One that
/// declares more than a JSON route takes is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_comes_gets_408_not_a_hung_connection() {
    let env = common::env_with_env(&[], &[("FLOTILLA_BODY_TIMEOUT_MS", Some("1000"))]);
    let head = "POST /v1/sandboxes HTTP/1.1\nHost: x\nConnection: close\nContent-Type: application/json\nContent-Length: 100\n";
    let (st, b) = raw(&env, head, b"{", SECS).await;
    envelope(st, &b, 408, ErrorCode::RequestTimeout);
    let head = "POST /v1/sandboxes HTTP/1.1\nHost: x\nConnection: close\nContent-Type: application/json\nContent-Length: 5000000000\n";
    let (st, b) = raw(&env, head, b"", SECS).await;
    envelope(st, &b, 413, ErrorCode::PayloadTooLarge);
    // A streamed body (a workspace tarball) that stalls is cut off too.
    let s = env.sandbox().await;
    let head = format!(
        "PUT /v1/sandboxes/{}/workspace HTTP/1.1\nHost: x\nConnection: close\nContent-Length: 5000000000\n",
        s.id
    );
    let (st, b) = raw(&env, &head, &[0u8; 512], SECS).await;
    assert!(st >= 400, "{st} {b}");
    serde_json::from_str::<ApiError>(&b).unwrap_or_else(|e| panic!("not an envelope ({e}): {b}"));
}

/// A client that starts its headers and never finishes them is
/// disconnected once the (here shortened) header timeout passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_never_finish_are_cut_off() {
    let env = common::env_with_env(&[], &[("FLOTILLA_HEADER_TIMEOUT_MS", Some("500"))]);
    let mut s = tokio::net::UnixStream::connect(env.node.socket()).await.unwrap();
    s.write_all(b"GET /v1/node HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(SECS, s.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "the connection is still open after {SECS:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    // Others are served meanwhile and after.
    env.client.info().await.unwrap();
}

/// A sandbox stopped during an exec: the stream ends with an error frame
/// that says so (not a bare end of stream), and the CLI prints the reason
/// and exits 125.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stream_of_a_stopped_sandbox_ends_with_sandbox_stopped() {
    let env = common::env();
    let s = env.sandbox().await;
    let req = ExecRequest { argv: vec!["sleep".into(), "60".into()], ..Default::default() };
    let mut stream = env.client.sandbox(&s.id).exec(&req).await.unwrap();
    // Stop once the command runs inside.
    common::eventually(SECS, "the command to run in the sandbox", || async {
        let (out, _, _) = env.sh(&s.id, "pgrep -x sleep || true").await;
        (!out.trim().is_empty()).then_some(())
    })
    .await;
    env.client.action(&s.id, "stop").await.unwrap();
    let drained =
        tokio::time::timeout(SECS, drain_exec(&mut stream, &mut std::io::sink(), &mut std::io::sink())).await.unwrap();
    match drained {
        Err(ClientError::Api(e)) => assert_eq!(e.code, ErrorCode::SandboxStopped, "{e:?}"),
        other => panic!("expected a sandbox_stopped error frame, got {other:?}"),
    }

    // The same through the CLI.
    env.client.action(&s.id, "start").await.unwrap();
    let home = env.node.home().to_str().unwrap().to_string();
    let child = Command::new(common::BIN)
        .args(["--home", &home, "sandbox", "exec", &s.id, "--", "sleep", "60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let child = scopeguard(child);
    // Stop once the command runs inside.
    common::eventually(SECS, "the command to run in the sandbox", || async {
        let (out, _, _) = env.sh(&s.id, "pgrep -x sleep || true").await;
        (!out.trim().is_empty()).then_some(())
    })
    .await;
    env.client.action(&s.id, "stop").await.unwrap();
    let out = tokio::task::spawn_blocking(move || child.into_inner().wait_with_output().unwrap()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("sandbox_stopped"), "{stderr}");
}

/// Kills the child if the test fails before it is waited for.
struct Guard(Option<std::process::Child>);

fn scopeguard(c: std::process::Child) -> Guard {
    Guard(Some(c))
}

impl Guard {
    fn into_inner(mut self) -> std::process::Child {
        self.0.take().expect("once")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
