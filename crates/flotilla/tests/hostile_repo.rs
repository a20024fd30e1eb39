//! A repository (or a try of it) as a stranger writes it, through the real
//! binary: what it asks for is bounded and checked, and the secrets of the
//! project reach only trusted builds, never a log in clear.

mod common;

use common::{cli, cli_ok, commit, git, json};

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_testkit::{NodeProcess, wait_until};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");
const WAIT: Duration = Duration::from_secs(90);

/// A token with bytes that URL encoding changes.
const TOKEN: &str = "tok-9f3a/b+Zq7w=x!";

/// `printf %s VALUE | flotilla secret set PROJECT NAME`.
fn secret_set(home: &Path, project: &str, name: &str, value: &str) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(["secret", "set", project, name])
        .env("FLOTILLA_HOME", home)
        .env_remove("FLOTILLA_NODE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(value.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The run of `rev` (or of run id `id`), once final.
fn finished(home: &Path, pick: impl Fn(&Value) -> bool) -> Value {
    wait_until(WAIT, "the run to finish", || {
        let runs = json(home, &["run", "ls", "--project", "demo", "--limit", "50"]);
        let run = runs.as_array()?.iter().find(|r| pick(r))?.clone();
        matches!(run["state"].as_str(), Some("passed" | "failed" | "canceled")).then_some(run)
    })
}

fn build_log(home: &Path, run: &Value) -> String {
    cli_ok(home, &["build", "log", &run["builds"][0]["id"].to_string()])
}

const CONFIG: &str = r#"
[[builder]]
name = "linux-amd64"
secrets = ["API_TOKEN"]
steps = [
  { name = "have", run = "test -n \"$API_TOKEN\" && echo HAVE_TOKEN || echo NO_TOKEN" },
  { name = "raw", run = "echo \"raw=$API_TOKEN\"" },
  { name = "base64", run = "printf 'user:%s' \"$API_TOKEN\" | base64 -w0; echo" },
  { name = "url", run = "python3 -c 'import os, urllib.parse; print(\"url=\" + urllib.parse.quote(os.environ.get(\"API_TOKEN\", \"\"), safe=\"\"))'" },
  { name = "split", run = "printf 'split=%s' \"$(printf %s \"$API_TOKEN\" | head -c 7)\"; sleep 0.5; printf '%s\\n' \"$(printf %s \"$API_TOKEN\" | tail -c +8)\"" },
]
"#;

#[test]
fn secrets_reach_branch_builds_masked_and_never_a_try() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let dev = NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "127.0.0.1:0", "--stop-apps"]);
    let home = dev.home().to_path_buf();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let first = commit(repo.path(), &[("flotilla.toml", CONFIG)], "needs a secret");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);

    // Not set yet: the build fails naming the secret and how to set it.
    let run = finished(&home, |r| r["change"]["rev"] == first.as_str());
    assert_eq!(run["state"], "failed", "{run:#}");
    let failure = run["builds"][0]["failure"]["message"].as_str().unwrap_or_default().to_string();
    assert!(failure.contains("API_TOKEN") && failure.contains("flotilla secret set demo API_TOKEN"), "{run:#}");

    // Bad names and values are refused, saying why.
    let (code, err) = secret_set(&home, "demo", "api-token", TOKEN);
    assert_ne!(code, 0);
    assert!(err.contains("uppercase"), "{err}");
    let (code, err) = secret_set(&home, "demo", "API_TOKEN", "abc");
    assert_ne!(code, 0);
    assert!(err.contains("at least 4 bytes"), "{err}");
    let (code, err) = secret_set(&home, "nope", "API_TOKEN", TOKEN);
    assert_ne!(code, 0);
    assert!(err.contains("nope"), "{err}");

    let (code, err) = secret_set(&home, "demo", "API_TOKEN", TOKEN);
    assert_eq!(code, 0, "{err}");
    let listed = json(&home, &["secret", "ls", "demo"]);
    assert_eq!(listed[0]["name"], "API_TOKEN", "{listed}");
    assert!(!listed.to_string().contains(TOKEN));

    // A branch commit gets it; every form of it is masked in the log, a
    // value split across writes too.
    let second = commit(repo.path(), &[("README", "again\n")], "with the secret set");
    let run = finished(&home, |r| r["change"]["rev"] == second.as_str());
    assert_eq!(run["state"], "passed", "{run:#}");
    let log = build_log(&home, &run);
    assert!(log.contains("HAVE_TOKEN"), "{log}");
    let stars = "*".repeat(TOKEN.len());
    assert!(log.contains(&format!("raw={stars}\n")), "{log}");
    assert!(log.contains(&format!("split={stars}\n")), "{log}");
    let url_line = log.lines().find(|l| l.starts_with("url=")).unwrap();
    assert!(url_line.len() > 10 && url_line[4..].bytes().all(|b| b == b'*'), "{log}");
    let b64_line = log.lines().nth(2).unwrap();
    assert!(b64_line.contains("*****"), "base64 not masked: {log}");
    for leak in [TOKEN, "tok-9f3", "Zq7w", "tok-9f3a%2Fb"] {
        assert!(!log.contains(leak), "{leak:?} in the log: {log}");
    }

    // A try of the same commit runs without it: the timeline says so.
    let tried = json(&home, &["try", "--project", "demo", "--rev", &second]);
    let id = tried["run_id"].as_u64().unwrap_or_else(|| panic!("{tried}"));
    let run = finished(&home, |r| r["id"].as_u64() == Some(id));
    assert_eq!(run["state"], "passed", "{run:#}");
    assert_eq!(run["change"]["kind"], "try");
    let log = build_log(&home, &run);
    assert!(log.starts_with("NO_TOKEN\nraw=\n"), "{log}");
    let shown = json(&home, &["build", "show", &run["builds"][0]["id"].to_string()]);
    assert!(shown["timeline"].to_string().contains("secrets_withheld"), "{shown:#}");

    // Nowhere else in clear: not the API, not the database file.
    let build = run["builds"][0]["id"].to_string();
    for path in ["/v1/projects".to_string(), "/v1/runs?project=demo".into(), format!("/v1/builds/{build}")] {
        let body = common::coordinator_get(&home, &path).unwrap_or_else(|| panic!("GET {path}"));
        assert!(!body.contains(TOKEN), "{path}: {body}");
    }
    let db = std::fs::read(home.join("coordinator/coordinator.db")).unwrap();
    assert!(!db.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()), "the value is stored in clear");
    use std::os::unix::fs::PermissionsExt as _;
    let key = std::fs::metadata(home.join("coordinator/secrets.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);

    // Over TCP, even the names need the token.
    let url = std::fs::read_to_string(home.join("coordinator.url")).unwrap();
    let addr = url.trim().trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(s, "GET /v1/projects/demo/secrets HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.0 401"), "{answer}");

    // Removed: the next branch build fails again, naming it.
    cli_ok(&home, &["secret", "rm", "demo", "API_TOKEN"]);
    let (code, _, err) = cli(&home, &["secret", "rm", "demo", "API_TOKEN"]);
    assert_ne!(code, 0, "removing twice says so: {err}");
    assert_eq!(json(&home, &["secret", "ls", "demo"]), serde_json::json!([]));
}

/// A `flotilla.toml` that is huge (5 MB, or 64 MB of zeros that git keeps
/// as a few kB) or asks for an absurd timeout is refused with a clear
/// error, unread past its size; the project goes on, and the next good
/// commit is built.
#[test]
fn oversized_and_absurd_configs_are_refused_and_the_project_goes_on() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let dev = NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "none", "--stop-apps"]);
    let home = dev.home().to_path_buf();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    let good = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"t\", run = \"echo fine\" }]\n";
    commit(repo.path(), &[("flotilla.toml", good)], "a good start");
    cli_ok(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap(), "--poll-interval", "1s"]);
    let padded = format!("{good}{}", "# padding\n".repeat(500_000));
    let zeros = format!("{good}#{}\n", "0".repeat(64 << 20));
    let absurd = good.replace("steps", "timeout = \"1000000000000000d\"\nsteps");
    for (config, says) in [
        (padded.as_str(), "over the 1048576 bytes a config may have"),
        (zeros.as_str(), "over the 1048576 bytes a config may have"),
        (absurd.as_str(), "is too long"),
    ] {
        let rev = commit(repo.path(), &[("flotilla.toml", config)], "hostile config");
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let p = json(&home, &["project", "show", "demo"]);
            let runs = json(&home, &["run", "ls", "--project", "demo", "--limit", "50"]);
            let run = runs.as_array().unwrap().iter().find(|r| r["change"]["rev"] == rev.as_str()).cloned();
            let text = format!("{p} {run:?}");
            if text.contains(says) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no {says:?} for {rev}: {text}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let fixed = commit(repo.path(), &[("flotilla.toml", good)], "good again");
    let run = finished(&home, |r| r["change"]["rev"] == fixed.as_str());
    assert_eq!(run["state"], "passed", "{run:#}");
    assert_eq!(build_log(&home, &run), "fine\n");
}

/// A stranger's connections to the TCP ports anyone can reach (the name
/// table's and the coordinator's): 2,000 that never finish their headers
/// hold at most the cap of open connections, each is cut off at the
/// (here shortened) header deadline, a JSON body that trickles in one byte
/// at a time is cut off whole at the body deadline (408), and an ordinary
/// request is answered throughout.
#[test]
fn slowloris_and_trickled_bodies_cannot_hold_the_names_or_coordinator_port() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let have = flotilla_testkit::raise_fd_limit(4096);
    assert!(have >= 2600, "the test needs 2,600 descriptors; the hard limit allows {have}");
    let home = tempfile::tempdir().unwrap();
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            flotilla_testkit::stop_child(&mut self.0, Duration::from_secs(10));
        }
    }
    let spawn = |args: &[&str], log: &str| {
        let log = std::fs::File::create(home.path().join(log)).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .arg("--home")
            .arg(home.path())
            .env("FLOTILLA_HEADER_TIMEOUT_MS", "1500")
            .env("FLOTILLA_BODY_TIMEOUT_MS", "1500")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Stop(child)
    };
    let names = spawn(&["names", "serve", "--listen", "127.0.0.1:0"], "names.log");
    let nowhere = format!("unix://{}", home.path().join("no-node/node.sock").display());
    let coordinator = spawn(&["coordinator", "--coordinator-listen", "127.0.0.1:0", "--node", &nowhere], "c.log");
    let names_addr = wait_until(WAIT, "the name table's address", || {
        let log = std::fs::read_to_string(home.path().join("names.log")).ok()?;
        Some(log.split("name table on http://").nth(1)?.split_whitespace().next()?.to_string())
    });
    let coordinator_addr = wait_until(WAIT, "the coordinator's address", || {
        let url = std::fs::read_to_string(home.path().join("coordinator.url")).ok()?;
        Some(url.trim().strip_prefix("http://")?.to_string())
    });

    let ask = |addr: &str, request: &str| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    for (what, addr, pid) in
        [("names", &names_addr, names.0.id()), ("coordinator", &coordinator_addr, coordinator.0.id())]
    {
        let healthz = || ask(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(healthz().starts_with("HTTP/1.1 200"), "{what}");
        let slow: Vec<TcpStream> = (0..2000)
            .map(|_| {
                let a: std::net::SocketAddr = addr.parse().unwrap();
                let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(60)).unwrap();
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
                s
            })
            .collect();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
        assert!(fds < 512 + 100, "{what}: {fds} descriptors open with 2,000 slow clients");
        let started = std::time::Instant::now();
        assert!(healthz().starts_with("HTTP/1.1 200"), "{what}: not served while 2,000 clients dribble");
        assert!(started.elapsed() < Duration::from_secs(20), "{what}: served after {:?}", started.elapsed());
        for mut s in slow {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut out = Vec::new();
            assert!(s.read_to_end(&mut out).is_ok(), "{what}: a slow client's connection was left open");
        }
    }

    // A write without the table's token is refused before its body is read;
    // with it, a body sent a byte at a time, faster than any idle timeout,
    // is still cut off whole (and so is a webhook's, signed or not).
    let head = "PUT /v1/mounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n";
    assert!(ask(&names_addr, &format!("{head}\r\n")).starts_with("HTTP/1.1 401"), "an unsigned write's body was read");
    // (Webhooks are read only for a project that takes them.)
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    commit(repo.path(), &[("flotilla.toml", "[[builder]]\nname = \"b\"\nsteps = [{ run = \"true\" }]\n")], "one");
    let repo_arg = repo.path().to_str().unwrap();
    let add = ["project", "add", "demo", "--repo", repo_arg, "--poll-interval", "1h", "--webhook-secret", "s3cret"];
    cli_ok(home.path(), &add);
    let token = std::fs::read_to_string(home.path().join("names.token")).unwrap();
    let names_write = format!("PUT /v1/mounts HTTP/1.1\r\nAuthorization: Bearer {}", token.trim());
    for (what, addr, path) in [
        ("names", &names_addr, names_write.as_str()),
        ("coordinator", &coordinator_addr, "POST /v1/webhooks/github/demo HTTP/1.1"),
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "{path}\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n").unwrap();
        s.set_nonblocking(true).unwrap();
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        wait_until(Duration::from_secs(30), &format!("{what}: the trickled body to be cut off"), || {
            let _ = s.write_all(b" ");
            let mut buf = [0u8; 4096];
            match s.read(&mut buf) {
                Ok(0) => Some(()),
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    out.windows(4).any(|w| w == b"\r\n\r\n").then_some(())
                }
                Err(_) => None,
            }
        });
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 408"), "{what}: {out}");
        assert!(started.elapsed() < Duration::from_secs(15), "{what}: cut off after {:?}", started.elapsed());
    }
}
