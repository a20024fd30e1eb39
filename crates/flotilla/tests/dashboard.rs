//! The dashboard in a real browser: Debian's Chromium, headless, driven
//! over WebDriver by `chromedriver`, against `flotilla dev`.
//!
//! It loads the grid after a build, watches a build page's log grow while
//! the build runs, is refused a retry without the token, retries with it
//! and lands on the new attempt, and saves screenshots (into
//! `$FLOTILLA_SCREENSHOTS` when set, as the README's were made).

mod common;

use common::git;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_testkit::{NodeProcess, wait_until};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");
const WAIT: Duration = Duration::from_secs(60);

/// One WebDriver call; the command's `value`, or a panic naming the error.
fn call(addr: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("chromedriver at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    // Read the head, then exactly Content-Length bytes (chromedriver may
    // keep the connection open).
    let mut resp = Vec::new();
    let mut buf = [0u8; 8192];
    let (head, body_start) = loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{method} {path}: chromedriver closed the connection");
        resp.extend_from_slice(&buf[..n]);
        if let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
            break (String::from_utf8_lossy(&resp[..i]).to_string(), i + 4);
        }
    };
    let len: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .map(|(_, v)| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("{method} {path}: no Content-Length in {head}"));
    while resp.len() < body_start + len {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{method} {path}: the answer was cut short");
        resp.extend_from_slice(&buf[..n]);
    }
    let rest = String::from_utf8_lossy(&resp[body_start..body_start + len]).to_string();
    let v: Value = serde_json::from_str(&rest).unwrap_or_else(|e| panic!("{method} {path}: {e}: {rest}"));
    if let Some(err) = v["value"]["error"].as_str() {
        panic!("{method} {path}: {err}: {}", v["value"]["message"]);
    }
    v["value"].clone()
}

/// `chromedriver` and one headless Chromium session, both ended on drop.
struct Browser {
    driver: Child,
    addr: String,
    session: String,
}

impl Browser {
    fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (apt-get install chromium chromium-driver)");
        let addr = format!("127.0.0.1:{port}");
        let mut b = Browser { driver, addr, session: String::new() };
        wait_until(WAIT, "chromedriver to serve", || {
            TcpStream::connect(&b.addr).is_ok().then(|| call(&b.addr, "GET", "/status", None)["ready"].as_bool())?
        });
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,860"]
        }}}});
        b.session = call(&b.addr, "POST", "/session", Some(caps))["sessionId"].as_str().unwrap().to_string();
        b
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        call(&self.addr, method, &format!("/session/{}{path}", self.session), body)
    }

    fn open(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap().to_string()
    }

    /// Runs `script` in the page; its result.
    fn js(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({ "script": script, "args": [] })))
    }

    fn click(&self, css: &str) {
        let el = self.cmd("POST", "/element", Some(json!({ "using": "css selector", "value": css })));
        let id = el.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).unwrap().to_string();
        self.cmd("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    fn text(&self, css: &str) -> String {
        let q = serde_json::to_string(css).unwrap();
        self.js(&format!("const e = document.querySelector({q}); return e ? e.textContent : null;"))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn screenshot(&self, name: &str) {
        let png = decode_base64(self.cmd("GET", "/screenshot", None).as_str().unwrap());
        let mut dirs = vec![PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots")];
        dirs.extend(std::env::var_os("FLOTILLA_SCREENSHOTS").map(PathBuf::from));
        for d in dirs {
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(name), &png).unwrap();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ =
                std::panic::catch_unwind(|| call(&self.addr, "DELETE", &format!("/session/{}", self.session), None));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, c)| n | (val(*c) as u32) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

fn json_of(home: &Path, args: &[&str]) -> Value {
    let (code, out, err) = common::cli(home, &[args, &["--json"]].concat());
    assert_eq!(code, 0, "flotilla {args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

const CONFIG: &str = r#"
[[builder]]
name = "linux-amd64"
steps = [{ name = "build", run = "sh build.sh" }]

[[builder]]
name = "linux-amd64-race"
known_issue = "https://example.com/widget/issues/7"
steps = [{ name = "test", run = "echo checking; echo 'expected 4, got 5' >&2; exit 1" }]
"#;

const BUILD: &str = "i=1\nwhile [ $i -le 60 ]; do printf '\\033[32mok\\033[0m step %s <compiled>\\n' $i; i=$((i+1)); sleep 0.15; done\n";

#[test]
fn the_dashboard_in_chromium_shows_the_grid_a_growing_log_and_guards_retry() {
    assert!(flotilla_testkit::is_root(), "this test runs a real node, which must run as root (as .ci/run does)");
    let dev = NodeProcess::start_dev(Path::new(BIN), &["--coordinator-listen", "127.0.0.1:0", "--stop-apps"]);
    let home = dev.home().to_path_buf();
    let base = std::fs::read_to_string(home.join("coordinator.url")).unwrap().trim().to_string();
    let token = std::fs::read_to_string(home.join("coordinator/token")).unwrap().trim().to_string();
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    std::fs::write(repo.path().join("flotilla.toml"), CONFIG).unwrap();
    std::fs::write(repo.path().join("build.sh"), BUILD).unwrap();
    git(repo.path(), &["add", "."]);
    git(repo.path(), &["commit", "-q", "-m", "Add the widget frobnicator"]);
    let browser = Browser::start();
    let (code, _, err) = common::cli(&home, &["project", "add", "demo", "--repo", repo.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let run = wait_until(WAIT, "the run", || {
        let runs = json_of(&home, &["run", "ls", "--project", "demo"]);
        runs.as_array()?.first().filter(|r| r["builds"].as_array().is_some_and(|b| b.len() == 2)).cloned()
    });
    let build_of = |run: &Value, name: &str| {
        run["builds"].as_array().unwrap().iter().find(|b| b["builder"] == name).unwrap()["id"].as_u64().unwrap()
    };
    let (slow, failing) = (build_of(&run, "linux-amd64"), build_of(&run, "linux-amd64-race"));

    // The build page while the build runs: the log grows with no reload.
    wait_until(WAIT, "the slow build's first lines", || {
        let (_, out, _) = common::cli(&home, &["build", "log", &slow.to_string()]);
        out.contains("step 2").then_some(())
    });
    browser.open(&format!("{base}/ui/builds/{slow}"));
    let lines = || browser.js("return document.querySelectorAll('#log .line').length").as_u64().unwrap();
    let marker = browser.js("window.unreloaded = true; return document.getElementById('state').textContent;");
    assert_eq!(marker, "running", "the build page opened while the build runs");
    let first = lines();
    let grew = wait_until(WAIT, "the log to grow in the open page", || {
        let n = lines();
        (n > first + 5 && browser.js("return window.unreloaded === true").as_bool() == Some(true)).then_some(n)
    });
    assert!(grew < 60, "the log grew while the build ran ({first} → {grew} lines)");
    // The running step's bar follows too, with no reload.
    let step_time = || browser.text(".bar-row:last-child .bar-time");
    let before = step_time();
    wait_until(WAIT, "the step's bar to grow in the open page", || {
        (step_time() != before && browser.js("return window.unreloaded === true").as_bool() == Some(true)).then_some(())
    });
    browser.screenshot("build-running.png");
    // The line text is the build's output, colours as spans, markup escaped.
    assert_eq!(browser.text("#L1"), "1ok step 1 <compiled>\n");
    assert_eq!(browser.js("return document.querySelector('#L1 .c2').textContent"), "ok");
    // At the end the page shows the final state, all 60 lines.
    wait_until(WAIT, "the build page to show it passed", || (browser.text("#state") == "passed").then_some(()));
    assert_eq!(lines(), 60);

    // The grid, once both builds are done: ok and fail, each a link.
    browser.open(&format!("{base}/"));
    wait_until(WAIT, "the grid's cells", || {
        let cells =
            browser.js("return [...document.querySelectorAll('td.cell')].map(c => c.className + ' ' + c.textContent)");
        let cells: Vec<String> = cells.as_array()?.iter().map(|c| c.as_str().unwrap_or_default().to_string()).collect();
        (cells == ["cell ok ok", "cell fail known fail"]).then_some(())
    });
    // The builder with a known issue is dimmed and links the issue.
    let issue = browser.js("const a = document.querySelector('th.builder.known a.issue'); return a && a.href");
    assert_eq!(issue, "https://example.com/widget/issues/7");
    assert!(browser.text("table.grid").contains("Add the widget frobnicator"));
    let href = browser.js("return document.querySelector('td.cell.fail a').getAttribute('href')");
    assert_eq!(href, format!("/ui/builds/{failing}").as_str());
    browser.screenshot("grid.png");

    // Queue and fleet: the node with what it has, and the name table.
    let node_id = json_of(&home, &["info"])["node_id"].as_str().unwrap().to_string();
    browser.open(&format!("{base}/ui/queue"));
    let fleet = browser.text("main");
    assert!(fleet.contains("Nothing waits."), "{fleet}");
    assert!(fleet.contains(&node_id) && fleet.contains("host"), "the node, its id and its images: {fleet}");
    assert!(fleet.contains(&format!("nodes/{node_id}")), "the name table's entry: {fleet}");
    browser.screenshot("queue.png");
    // The node's own page, from its API: the retry's sandbox is not made
    // yet, so the builds' sandboxes are gone; it shows its sandboxes table
    // or says it has none, and its images.
    browser.click("table.list tbody td a[href^='/ui/node']");
    wait_until(WAIT, "the node's page", || browser.text("h1").starts_with("Node ").then_some(()));
    let page = browser.text("main");
    assert!(page.contains(&node_id) && page.contains("Sandboxes") && page.contains("Apps"), "{page}");
    assert!(page.contains("images: host"), "{page}");
    browser.open(&format!("{base}/"));

    // Retry without the token: refused, and nothing is retried.
    browser.click("td.cell.fail a");
    wait_until(WAIT, "the failed build's page", || {
        browser.url().ends_with(&format!("/ui/builds/{failing}")).then_some(())
    });
    assert!(browser.text(".failure").contains("test"), "the failing step is named: {}", browser.text(".failure"));
    assert!(browser.js("return document.querySelector('.bar.failed') !== null").as_bool().unwrap());
    // The failure's last lines (here all the failing step printed) are marked.
    let marked = browser.js("return [...document.querySelectorAll('#log .line.failing')].map(l => l.id)");
    assert_eq!(marked, json!(["L1", "L2"]), "the failing step printed both lines");
    browser.screenshot("build-failed.png");
    browser.click("#retry");
    wait_until(WAIT, "the refusal", || browser.text("#notice").contains("refused").then_some(()));
    let started = Instant::now();
    let attempts = || {
        let r = json_of(&home, &["run", "show", &run["id"].to_string()]);
        r["builds"].as_array().unwrap().iter().filter(|b| b["builder"] == "linux-amd64-race").count()
    };
    assert_eq!(attempts(), 1, "a retry without the token changed nothing");

    // With the token: the new attempt's page.
    let t = serde_json::to_string(&token).unwrap();
    browser.js(&format!("localStorage.setItem('flotilla-token', {t}); document.getElementById('token').value = {t};"));
    browser.click("#retry");
    let url = wait_until(WAIT, "the new attempt's page", || {
        let u = browser.url();
        (!u.ends_with(&format!("/ui/builds/{failing}"))).then_some(u)
    });
    assert!(url.contains("/ui/builds/"), "{url}");
    wait_until(WAIT, "attempt 2 on the page", || browser.text(".meta").contains("attempt 2").then_some(()));
    assert_eq!(attempts(), 2);
    eprintln!("retry with the token took {:?}", started.elapsed());
}
