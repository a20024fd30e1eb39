//! Schemathesis, a client nobody here wrote, fuzzes the node's, the names
//! server's and the coordinator's APIs from their own `/openapi.json` within a time budget
//! and fails the test on any 5xx, any response that does not match the
//! document (status, content type, schema: a non-envelope error fails the
//! `default` response's schema) or any other check it reports.
//!
//! Needs schemathesis (`st`): `FLOTILLA_SCHEMATHESIS=/path/to/st`, else `st`
//! on `PATH`. `.ci/run` installs it into a venv from PyPI.
//!
//! Left out of the fuzz run, each with its reason:
//! - streams that stay open by design (exec, process output, session,
//!   events) and `halt`, which ends the sandbox it is sent to;
//! - `POST /v1/images` (imports any path on the node: a fuzzer would copy
//!   the host's root) and `POST /v1/images/pull` (would reach registries
//!   outside this machine);
//! - `PUT .../workspace` and `.../stdin` (tar and raw bodies schemathesis
//!   cannot generate; the hostile-tar suites cover them).
//! - the coordinator's `POST /v1/projects` (clones whatever URL it is given:
//!   the fuzzer would reach outside this machine) and build logs with
//!   `follow` (a stream).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn schemathesis() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOTILLA_SCHEMATHESIS") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("st"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "schemathesis is not installed: python3 -m venv /opt/st && /opt/st/bin/pip install schemathesis, \
             then FLOTILLA_SCHEMATHESIS=/opt/st/bin/st (.ci/run does this)"
        )
    })
}

/// A free loopback port (bound and released; the server binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16) {
    flotilla_testkit::wait_until(Duration::from_secs(20), "the server to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
}

/// Runs `st run` against `spec` and fails the test with its report unless
/// every check passed.
fn fuzz(spec: &str, token: &str, exclude: &str, budget_s: u32) {
    let out = Command::new(schemathesis())
        .args(["run", spec, "--tls-verify=false"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["-c", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
        .args(["--exclude-path-regex", exclude])
        .args(["--phases", "examples,coverage,fuzzing"])
        // One worker: with two, schemathesis's threads sometimes died of
        // CPython 3.11.7's "AST constructor recursion depth mismatch"
        // (python/cpython#106905), a runtime error in the fuzzer, not a finding.
        .args(["-n", "50", "--max-time", &budget_s.to_string(), "--request-timeout", "20", "-w", "1"])
        .args(["--generation-database", "none", "--no-color"])
        // Hypothesis's health check that too many generated cases were
        // thrown away concerns the generator, not the API: schemathesis
        // discards path strings it cannot put in a URL, and for a plain
        // `string` path parameter (POST /v1/projects/{name}/poll) some
        // seeds discard most (CI seed 205869694150377448577721925108141258881
        // fails it every time, with every case that was sent passing).
        .args(["--suppress-health-check", "filter_too_much"])
        .stdin(Stdio::null())
        .output()
        .expect("running schemathesis");
    let report = String::from_utf8_lossy(&out.stdout);
    // The report from its failures on (or its last lines).
    let tail = match report.find("FAILURES") {
        Some(at) => report[at..].to_string(),
        None => report.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"),
    };
    assert!(
        out.status.success(),
        "schemathesis found problems with {spec}:\n{tail}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "schemathesis ran no case against {spec}:\n{tail}");
    eprintln!("{tail}");
}

#[test]
fn schemathesis_finds_nothing_in_the_node_api() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // --stop-apps: instances the fuzzer starts end with the node.
    let env = common::env_with(&["--listen", &listen, "--stop-apps"]);
    wait_for_port(port);
    let token = std::fs::read_to_string(env.node.home().join("tls/token")).unwrap();
    let pid = env.node.pid().expect("the node runs");
    let idle = flotilla_testkit::rss_kib(pid);
    fuzz(
        &format!("https://{listen}/openapi.json"),
        token.trim(),
        // Streams that stay open, and routes that act on the node's host
        // (import a path, pull, replace the node's own binary).
        "(/exec$|/session$|/events$|/output$|/halt$|/stdin$|/workspace$|^/v1/images$|/v1/images/pull|/logs$|^/v1/node/update$|^/v1/node/revert$)",
        90,
    );
    // For bench/README.md: what the fuzz run left behind.
    eprintln!("node RSS: idle {idle} KiB, after the fuzz run {} KiB", flotilla_testkit::rss_kib(pid));
    // The node is still whole: it answers, and its sandboxes list.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        env.client.info().await.expect("the node answers after the fuzz run");
        env.client.list().await.expect("sandboxes list after the fuzz run");
    });
}

#[test]
fn schemathesis_finds_nothing_in_the_names_api() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let home = tempfile::tempdir().unwrap();
    let token = "fuzz-token-0123456789abcdef";
    let mut server = Command::new(common::BIN)
        .args(["names", "serve", "--listen", &listen, "--home"])
        .arg(home.path())
        .env("FLOTILLA_NAMES_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut server);
    wait_for_port(port);
    fuzz(&format!("http://{listen}/openapi.json"), token, "^$", 30);
}

#[test]
fn schemathesis_finds_nothing_in_the_coordinator_api() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let dev = flotilla_testkit::NodeProcess::start_dev(
        std::path::Path::new(common::BIN),
        &["--coordinator-listen", &listen, "--stop-apps"],
    );
    wait_for_port(port);
    // A project with a run, so the fuzzer's ids sometimes hit something.
    let repo = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let ok = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"])
            .args(args)
            .current_dir(repo.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    std::fs::write(
        repo.path().join("flotilla.toml"),
        "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"t\", run = \"true\" }]\n",
    )
    .unwrap();
    git(&["add", "."]);
    git(&["commit", "-qm", "first"]);
    let (code, _, err) = common::cli(dev.home(), &["project", "add", "demo", "--repo", repo.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let token = std::fs::read_to_string(dev.home().join("coordinator/token")).unwrap();
    fuzz(&format!("http://{listen}/openapi.json"), token.trim(), "(^/v1/projects$|/events$|/log$)", 30);
    let (code, _, err) = common::cli(dev.home(), &["run", "ls"]);
    assert_eq!(code, 0, "the coordinator answers after the fuzz run: {err}");
}
