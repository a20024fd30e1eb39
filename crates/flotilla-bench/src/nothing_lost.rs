//! Scenarios of the "nothing lost" issue (23):
//!
//! - `log-ingest`: a step printing 200 MB as fast as it can
//!   (`yes | head -c 200000000`), from its `start_step` to the build's end
//!   with every byte stored, in MB/s, and the growth of `flotilla dev`'s
//!   resident memory meanwhile; baseline: `cat` of the same bytes into a
//!   file.
//! - `log-follow`: reading a stored 50 MB log from byte 0 through
//!   `GET /v1/builds/{id}/log`, milliseconds per MB over the first 5 MB and
//!   over all 50 MB (flat means linear); the first 5 MB are the baseline.
//! - `adopt`: two coordinators on one PostgreSQL (`--lease 3s`), the one
//!   running a build is killed with -9: until the peer's `adopted` and
//!   until the step's output is stored again; baseline: the lease itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_agent::http::{Endpoint, HttpClient};
use flotilla_api::coordinator::{Build, RunState};
use flotilla_coordinator::client::CoordinatorClient;
use http_body_util::BodyExt;

use crate::coordinator::{Dev, add_demo, build_of, commit, git, repo};
use crate::report::{Case, Machine, Report, Unit};
use crate::scenarios::{now, target};

const WAIT: Duration = Duration::from_secs(300);
const INGEST_BYTES: u64 = 200_000_000;
const FOLLOW_BYTES: u64 = 50_000_000;

fn finished(b: &Build) -> bool {
    b.state.is_final()
}

pub async fn log_ingest(bin: &Path, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    let dev = Dev::start_with(bin, &["--max-log", "1G"])?;
    let c = dev.coordinator();
    let repo = repo(&format!("yes | head -c {INGEST_BYTES}"))?;
    add_demo(&c, repo.path(), None).await?;
    let pid = dev.pid();
    let (mut flotilla, mut cat, mut growth) = (Vec::new(), Vec::new(), Vec::new());
    let scratch = tempfile::Builder::new().prefix("flotilla-bench-ingest.").tempdir_in("/var/tmp")?;
    let src = scratch.path().join("src");
    let made =
        Command::new("sh").arg("-c").arg(format!("yes | head -c {INGEST_BYTES} > {}", src.display())).status()?;
    anyhow::ensure!(made.success(), "making the baseline's bytes failed");
    let mut rev = git(repo.path(), &["rev-parse", "HEAD"])?;
    for i in 0..iterations + 1 {
        if i > 0 {
            rev = commit(repo.path(), i)?;
            c.poll("demo").await?;
        }
        let before = flotilla_testkit::rss_kib(pid);
        let mut peak = before;
        let deadline = Instant::now() + WAIT;
        let b = loop {
            peak = peak.max(flotilla_testkit::rss_kib(pid));
            if let Ok(b) = build_of(&c, &rev, |_| true).await
                && finished(&b)
            {
                break b;
            }
            anyhow::ensure!(Instant::now() < deadline, "the build of {rev} did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        anyhow::ensure!(b.state == RunState::Passed, "the build failed: {:?}", b.failure);
        anyhow::ensure!(b.log_bytes == INGEST_BYTES, "stored {} of {INGEST_BYTES} bytes", b.log_bytes);
        let start = b.timeline.iter().find(|t| t.event == "start_step").context("no start_step")?.at.0;
        let end = b.finished_at.context("no end")?.0;
        let secs = end.saturating_sub(start) as f64 / 1000.0;
        let t = Instant::now();
        let dst = scratch.path().join("dst");
        let copied = Command::new("sh").arg("-c").arg(format!("cat {} > {}", src.display(), dst.display())).status()?;
        anyhow::ensure!(copied.success(), "cat failed");
        let cat_secs = t.elapsed().as_secs_f64();
        std::fs::remove_file(&dst)?;
        if i > 0 {
            flotilla.push(INGEST_BYTES as f64 / 1e6 / secs);
            cat.push(INGEST_BYTES as f64 / 1e6 / cat_secs);
            growth.push(peak.saturating_sub(before) as f64 / 1024.0);
        }
    }
    let max_growth = growth.iter().copied().fold(0.0, f64::max);
    let mut report = Report {
        scenario: "log-ingest",
        description: format!(
            "a step printing {} MB as fast as it can (yes | head -c), start_step → build passed with every byte stored",
            INGEST_BYTES / 1_000_000
        ),
        date: now(),
        machine: machine.clone(),
        unit: Unit::MegabytesPerSec,
        warmups: 1,
        cases: vec![
            Case::measured(
                "flotilla_log_ingest",
                "agent (held, acked) → coordinator → SQLite, through the node",
                false,
                &flotilla,
            ),
            Case::measured("cat_into_a_file", "cat of the same bytes into a file on the same disk", true, &cat),
        ],
        targets: vec![],
        notes: vec![format!(
            "flotilla dev's resident memory grew by at most {max_growth:.1} MiB during a build (per build: {})",
            growth.iter().map(|g| format!("{g:.1}")).collect::<Vec<_>>().join(", ")
        )],
        details: serde_json::Value::Null,
    };
    report.set_ratios("cat_into_a_file");
    report.targets =
        vec![target("memory flat: under 100 MB of growth", Some(max_growth < 100.0), format!("{max_growth:.1} MiB"))];
    Ok(report)
}

pub async fn log_follow(bin: &Path, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    let dev = Dev::start(bin)?;
    let c = dev.coordinator();
    let repo = repo(&format!("head -c {FOLLOW_BYTES} /dev/zero | tr '\\0' a"))?;
    add_demo(&c, repo.path(), None).await?;
    let rev = git(repo.path(), &["rev-parse", "HEAD"])?;
    let b = build_of(&c, &rev, finished).await?;
    anyhow::ensure!(b.log_bytes == FOLLOW_BYTES, "stored {} of {FOLLOW_BYTES} bytes", b.log_bytes);
    let (mut first, mut all) = (Vec::new(), Vec::new());
    for i in 0..iterations + 1 {
        let t = Instant::now();
        let mut body = c.log(b.id, 0, false).await?;
        let (mut got, mut at_5) = (0u64, None);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                got += data.len() as u64;
                if at_5.is_none() && got >= 5_000_000 {
                    at_5 = Some(t.elapsed());
                }
            }
        }
        anyhow::ensure!(got == FOLLOW_BYTES, "read {got} of {FOLLOW_BYTES} bytes");
        if i > 0 {
            first.push(at_5.context("never 5 MB")?.as_secs_f64() * 1000.0 / 5.0);
            all.push(t.elapsed().as_secs_f64() * 1000.0 / 50.0);
        }
    }
    let mut report = Report {
        scenario: "log-follow",
        description: "a stored 50 MB log read from byte 0 through GET /v1/builds/{id}/log: ms per MB".into(),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: 1,
        cases: vec![
            Case::measured("follow_all_50_mb", "ms per MB over the whole 50 MB", false, &all),
            Case::measured("follow_first_5_mb", "ms per MB over the first 5 MB", true, &first),
        ],
        targets: vec![],
        notes: vec![
            "linear means the two are about equal (the chunk holding an offset is found by primary key)".into(),
        ],
        details: serde_json::Value::Null,
    };
    report.set_ratios("follow_first_5_mb");
    let r = report.case("follow_all_50_mb").and_then(|c| c.ratio_to_baseline).unwrap_or(f64::NAN);
    report.targets =
        vec![target("time per MB flat from 5 MB to 50 MB (ratio ≤ 1.5)", Some(r <= 1.5), format!("{r:.2}"))];
    Ok(report)
}

/// A process started from `bin`, killed on drop.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // killed and reaped already
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(bin: &Path, args: &[&str], log: &Path, sock: &Path) -> anyhow::Result<Proc> {
    let _ = std::fs::remove_file(sock);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting flotilla {args:?}"))?;
    let p = Proc { child };
    let deadline = Instant::now() + WAIT;
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "flotilla {args:?} did not serve");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(p)
}

const LEASE_MS: u64 = 3000;

fn coordinator(bin: &Path, home: &Path, node: &Path, db: &str) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(home)?;
    let (h, n) = (home.to_str().context("utf-8")?, format!("unix://{}", node.join("node.sock").display()));
    let lease = format!("{LEASE_MS}ms");
    let args =
        ["coordinator", "--home", h, "--node", &n, "--database", db, "--coordinator-listen", "none", "--lease", &lease];
    spawn(bin, &args, &home.join("coordinator.log"), &home.join("coordinator.sock"))
}

fn client(home: &Path) -> CoordinatorClient {
    CoordinatorClient::new(HttpClient::new(Endpoint::Unix(home.join("coordinator.sock"))))
}

pub async fn adopt(bin: &Path, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    let pg = flotilla_testkit::postgres::Postgres::start();
    let db = pg.create_database("adopt");
    let root = tempfile::Builder::new().prefix("flotilla-bench-adopt.").tempdir_in("/var/tmp")?;
    std::fs::set_permissions(root.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    let node_home = root.path().join("node");
    let nh = node_home.to_str().context("utf-8")?.to_string();
    let _node = spawn(
        bin,
        &["node", "--stop-apps", "--home", &nh],
        &root.path().join("node.log"),
        &node_home.join("node.sock"),
    )?;
    let (home_a, home_b): (PathBuf, PathBuf) = (root.path().join("a"), root.path().join("b"));
    let repo = repo("while :; do date +%s%N; sleep 0.05; done")?;
    let mut a = Some(coordinator(bin, &home_a, &node_home, &db)?);
    add_demo(&client(&home_a), repo.path(), None).await?;
    let (mut adopted_ms, mut flowing_ms, mut lease) = (Vec::new(), Vec::new(), Vec::new());
    let mut rev = git(repo.path(), &["rev-parse", "HEAD"])?;
    for i in 0..iterations.max(1) {
        if a.is_none() {
            a = Some(coordinator(bin, &home_a, &node_home, &db)?);
        }
        let ca = client(&home_a);
        if i > 0 {
            rev = commit(repo.path(), i)?;
            ca.poll("demo").await?;
        }
        let b = build_of(&ca, &rev, |b| b.log_bytes > 0).await?;
        let peer = coordinator(bin, &home_b, &node_home, &db)?;
        let cb = client(&home_b);
        let killed = Instant::now();
        let kill_at = flotilla_api::Timestamp::now();
        if let Some(mut p) = a.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        let stored = cb.build(b.id).await?.log_bytes;
        let deadline = Instant::now() + WAIT;
        let mut adopted = None;
        let flowing = loop {
            let now = cb.build(b.id).await?;
            if adopted.is_none()
                && let Some(t) = now.timeline.iter().find(|t| t.event == "adopted" && t.at.0 >= kill_at.0)
            {
                adopted = Some(t.at.0.saturating_sub(kill_at.0) as f64);
            }
            if adopted.is_some() && now.log_bytes > stored {
                break killed.elapsed().as_secs_f64() * 1000.0;
            }
            if Instant::now() > deadline {
                bail!("build {} was not adopted", b.id);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        adopted_ms.push(adopted.unwrap_or(f64::NAN));
        flowing_ms.push(flowing);
        lease.push(LEASE_MS as f64);
        cb.cancel_run(b.run_id).await?;
        build_of(&cb, &rev, finished).await?;
        drop(peer);
    }
    drop(a);
    let mut report = Report {
        scenario: "adopt",
        description: format!(
            "two coordinators on one PostgreSQL (--lease {LEASE_MS}ms), the one running a printing step killed -9: \
             until the peer adopts it, and until its output is stored again"
        ),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: 0,
        cases: vec![
            Case::measured(
                "kill_to_adopted",
                "kill -9 → the peer's `adopted` on the build's timeline",
                false,
                &adopted_ms,
            ),
            Case::measured(
                "kill_to_output_stored",
                "kill -9 → the next output byte stored by the peer",
                false,
                &flowing_ms,
            ),
            Case::measured("lease", "the lease (--lease): a lapse cannot be seen sooner", true, &lease),
        ],
        targets: vec![],
        notes: vec![
            "the keeper renews and looks every lease/3 (at most 1 s): a lease lapses 2/3 to 1 lease after a kill and \
             is taken at the next look"
                .into(),
        ],
        details: serde_json::Value::Null,
    };
    report.set_ratios("lease");
    let m = report.case("kill_to_output_stored").and_then(Case::median).unwrap_or(f64::NAN);
    let goal = LEASE_MS as f64 + 1000.0;
    report.targets = vec![target(
        "a dead coordinator's builds adopted and running again ≤ lease + 1 s",
        Some(m <= goal),
        format!("median {m:.0} ms (lease {LEASE_MS} ms)"),
    )];
    drop(pg);
    Ok(report)
}
