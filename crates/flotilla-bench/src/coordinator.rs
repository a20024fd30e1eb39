//! Scenarios of the coordinator (issue 15):
//!
//! - `pm-events`: project-manager events/s on SQLite and on PostgreSQL,
//!   through the library (store + pure step + outbox, as the driver does),
//!   batch 1 (one event per step) and batch 100; baseline: the box's raw
//!   insert rate on the same database (`store.send` alone).
//! - `commit-to-running`: `git commit` → the build's step running in its
//!   sandbox, noticed by a poll (what the poller's timer does) and by a
//!   signed push webhook; baseline: create a sandbox and start the same
//!   command detached by hand on the same node (the floor).
//! - `log-first-byte`: a step prints its clock; the time until a
//!   `build log --follow` client has the byte; baseline: the same command
//!   followed straight through the node's agent stream.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use flotilla_agent::http::{Endpoint, HttpClient};
use flotilla_api::coordinator::AddProjectRequest;
use flotilla_api::{CreateSandboxRequest, ExecRequest, FrameKind};
use flotilla_coordinator::client::CoordinatorClient;
use flotilla_coordinator::pm::{self, Action, ChangeNotice, Event};
use flotilla_coordinator::store::{Created, NewBuild, NewProject, Store};
use flotilla_node::NodeClient;
use http_body_util::BodyExt;

use crate::report::{Case, Machine, Report, Unit};
use crate::scenarios::{now, target};

/// Events per `pm-events` run.
const EVENTS: usize = 2000;
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- pm-events

/// A new commit `i` on main, as a poller announces it.
pub(crate) fn notice(i: usize, subject: &str) -> Event {
    let sha = format!("{i:040x}");
    Event::ChangesUpdated {
        changes: vec![ChangeNotice {
            change: flotilla_api::coordinator::Change {
                id: format!("main@{sha}"),
                kind: flotilla_api::coordinator::ChangeKind::Branch,
                rev: sha,
                branch: Some("main".into()),
                subject: subject.to_string(),
                version: 1,
            },
            config_hash: "h".into(),
        }],
    }
}

pub(crate) async fn project(store: &Store, name: &str) -> anyhow::Result<()> {
    store
        .add_project(NewProject {
            name: name.into(),
            repo: "/bench".into(),
            branch: "main".into(),
            poll_interval_ms: 60_000,
            webhook_secret: None,
        })
        .await?;
    Ok(())
}

/// What `driver::step` does, without the runtime: load, step, commit, carry
/// out the outbox (a run of one build per `builders`). Returns the events
/// consumed.
pub(crate) async fn step(store: &Store, name: &str, builders: &[&str]) -> anyhow::Result<usize> {
    let (state, eversion, events) = store.load(name).await?;
    let n = events.len();
    if n > 0 {
        let out = pm::step(&state, &events, "main");
        store.commit_step(name, eversion, &out).await?.context("no other step runs here")?;
    }
    for (id, action) in store.outbox(name).await? {
        let Action::CreateRun { .. } = &action;
        let b = builders.iter().map(|b| NewBuild { builder: b.to_string(), spec: "{}".into() }).collect();
        // As in life, the run finishes: the manager's state stays small.
        if let Created::Run(run_id) = store.create_run(id, name, &action, b, None).await? {
            let done = Event::RunFinished { run_id, state: flotilla_api::coordinator::RunState::Passed };
            store.send(name, &format!("f:{run_id}"), &done).await?;
        }
    }
    Ok(n)
}

/// Seconds to push `EVENTS` events through the manager in batches of
/// `batch` (send a batch, step until the box and outbox are empty).
async fn manager_run(store: &Store, name: &str, batch: usize) -> anyhow::Result<f64> {
    project(store, name).await?;
    let t = Instant::now();
    let mut sent = 0;
    while sent < EVENTS {
        for i in sent..(sent + batch).min(EVENTS) {
            store.send(name, &format!("c:{i}"), &notice(i, "")).await?;
        }
        sent = (sent + batch).min(EVENTS);
        // The run_created events the actions put back need a step too.
        while step(store, name, &["linux-amd64"]).await? > 0 {}
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds for `EVENTS` bare inserts into the box.
async fn raw_sends(store: &Store, name: &str) -> anyhow::Result<f64> {
    project(store, name).await?;
    let t = Instant::now();
    for i in 0..EVENTS {
        store.send(name, &format!("c:{i}"), &notice(i, "")).await?;
    }
    Ok(t.elapsed().as_secs_f64())
}

pub async fn pm_events(machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let pg = flotilla_testkit::postgres::Postgres::start();
    let mut cases = Vec::new();
    let mut rates = Vec::new();
    let iterations = iterations.max(1);
    for db in ["sqlite", "postgres"] {
        let (mut b1, mut b100, mut raw) = (Vec::new(), Vec::new(), Vec::new());
        for it in 0..iterations {
            let store = match db {
                "sqlite" => Store::sqlite(&dir.path().join(format!("pm-{it}.db")))?,
                _ => Store::postgres(&pg.create_database(&format!("pm{it}")), 4)?,
            };
            // ms per 1000 events, as the names scenario reports.
            let per_k = |secs: f64| secs * 1000.0 * 1000.0 / EVENTS as f64;
            raw.push(per_k(raw_sends(&store, "raw").await?));
            b1.push(per_k(manager_run(&store, "one", 1).await?));
            b100.push(per_k(manager_run(&store, "batched", 100).await?));
        }
        let rate = |v: &[f64]| crate::stats::Stats::from_samples(v).map_or(f64::NAN, |s| 1_000_000.0 / s.median);
        rates.push((db, rate(&b1), rate(&b100), rate(&raw)));
        cases.push(Case::measured(
            &format!("{db}_pm_batch_1"),
            "send 1 changes_updated event, step (load, pure step, commit with eversion + outbox), create its run, step again for run_created; per 1000 events",
            false,
            &b1,
        ));
        cases.push(Case::measured(
            &format!("{db}_pm_batch_100"),
            "send 100 events, then step until box and outbox are empty; per 1000 events",
            false,
            &b100,
        ));
        cases.push(Case::measured(
            &format!("{db}_box_insert"),
            "store.send alone (one insert transaction per event, no manager); per 1000 events",
            true,
            &raw,
        ));
    }
    let mut report = Report {
        scenario: "pm-events",
        description: format!(
            "project-manager events/s: {EVENTS} changes, each becoming a run whose run_created and run_finished come back \
             as events too (counted: the {EVENTS} changes), SQLite and PostgreSQL"
        ),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: 0,
        cases,
        targets: vec![],
        notes: rates
            .iter()
            .map(|(db, b1, b100, raw)| {
                format!("{db}: {b1:.0} events/s one per step, {b100:.0} events/s in batches of 100, box inserts alone {raw:.0}/s")
            })
            .collect(),
        details: serde_json::Value::Null,
    };
    report.set_ratios("sqlite_box_insert");
    let sqlite100 = rates.first().map_or(f64::NAN, |r| r.2);
    report.targets = vec![target(
        "report (no target in the issue)",
        None,
        format!("SQLite, batches of 100: {sqlite100:.0} events/s"),
    )];
    Ok(report)
}

// ------------------------------------------------- a throwaway flotilla dev

/// `flotilla dev` in a scratch directory, stopped on drop.
pub(crate) struct Dev {
    child: Child,
    pub(crate) home: PathBuf,
    _root: tempfile::TempDir,
}

impl Dev {
    pub(crate) fn start(bin: &Path) -> anyhow::Result<Dev> {
        Dev::start_with(bin, &[])
    }

    pub(crate) fn start_with(bin: &Path, extra: &[&str]) -> anyhow::Result<Dev> {
        let root = tempfile::Builder::new().prefix("flotilla-bench-dev.").tempdir_in("/var/tmp")?;
        std::fs::set_permissions(root.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        let home = root.path().join("home");
        let log = std::fs::File::create(root.path().join("dev.log"))?;
        let child = Command::new(bin)
            .args(["dev", "--home"])
            .arg(&home)
            .args(["--coordinator-listen", "127.0.0.1:0", "--stop-apps"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting flotilla dev")?;
        let mut dev = Dev { child, home, _root: root };
        let deadline = Instant::now() + WAIT;
        while !(std::os::unix::net::UnixStream::connect(dev.home.join("coordinator.sock")).is_ok()
            && dev.home.join("coordinator.url").exists())
        {
            if let Some(s) = dev.child.try_wait()? {
                bail!("flotilla dev exited: {s}");
            }
            if Instant::now() > deadline {
                bail!("flotilla dev did not serve within {WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(dev)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn coordinator(&self) -> CoordinatorClient {
        CoordinatorClient::new(HttpClient::new(Endpoint::Unix(self.home.join("coordinator.sock"))))
    }

    fn node(&self) -> NodeClient {
        NodeClient::new(HttpClient::new(Endpoint::Unix(self.home.join("node.sock"))))
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(["-c", "user.name=bench", "-c", "user.email=bench@flotilla.invalid", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A repository whose one builder runs `step`.
pub(crate) fn repo(step: &str) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    git(dir.path(), &["init", "-q"])?;
    let config = format!("[[builder]]\nname = \"linux-amd64\"\nsteps = [{{ name = \"s\", run = {step:?} }}]\n");
    std::fs::write(dir.path().join("flotilla.toml"), config)?;
    std::fs::write(dir.path().join("n"), "0\n")?;
    git(dir.path(), &["add", "."])?;
    git(dir.path(), &["commit", "-qm", "start"])?;
    Ok(dir)
}

pub(crate) fn commit(dir: &Path, i: usize) -> anyhow::Result<String> {
    std::fs::write(dir.join("n"), format!("{i}\n"))?;
    git(dir, &["commit", "-qam", &format!("change {i}")])?;
    git(dir, &["rev-parse", "HEAD"])
}

/// Adds the repository at `dir` as project `demo`, polled only when asked.
pub(crate) async fn add_demo(c: &CoordinatorClient, dir: &Path, webhook_secret: Option<&str>) -> anyhow::Result<()> {
    let req = AddProjectRequest {
        name: "demo".into(),
        repo: dir.to_str().context("utf-8 path")?.into(),
        branch: Some("main".into()),
        poll_interval: Some("1h".into()),
        webhook_secret: webhook_secret.map(str::to_string),
    };
    c.add_project(&req).await?;
    Ok(())
}

/// The build of `rev`, once it satisfies `done`.
pub(crate) async fn build_of(
    c: &CoordinatorClient,
    rev: &str,
    done: impl Fn(&flotilla_api::coordinator::Build) -> bool,
) -> anyhow::Result<flotilla_api::coordinator::Build> {
    let deadline = Instant::now() + WAIT;
    loop {
        let runs = c.runs(Some("demo"), 20, None).await?;
        if let Some(run) = runs.items.iter().find(|r| r.change.rev == rev)
            && let Some(b) = run.builds.first()
        {
            let b = c.build(b.id).await?;
            if done(&b) {
                return Ok(b);
            }
        }
        if Instant::now() > deadline {
            bail!("the build of {rev} did not get there within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn signature(secret: &[u8], body: &[u8]) -> String {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
    m.update(body);
    let sig: String = m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={sig}")
}

async fn webhook(url: &str, rev: &str) -> anyhow::Result<()> {
    let ep = Endpoint::parse(url.trim()).map_err(|e| anyhow::anyhow!(e))?;
    let http = HttpClient::new(ep);
    let body =
        format!(r#"{{"ref":"refs/heads/main","before":"0","after":"{rev}","repository":{{"full_name":"b/demo"}}}}"#);
    let req = http
        .request(http::Method::POST, "/v1/webhooks/github/demo")
        .header("x-github-event", "push")
        .header("x-hub-signature-256", signature(b"bench-secret", body.as_bytes()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    http.send_ok(req).await?;
    Ok(())
}

pub async fn commit_to_running(bin: &Path, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    let dev = Dev::start(bin)?;
    let c = dev.coordinator();
    let url = std::fs::read_to_string(dev.home.join("coordinator.url"))?;
    let repo = repo("sleep 30")?;
    add_demo(&c, repo.path(), Some("bench-secret")).await?;
    let first = git(repo.path(), &["rev-parse", "HEAD"])?;
    let b = build_of(&c, &first, |b| b.timeline.iter().any(|t| t.event == "start_step")).await?;
    c.cancel_run(b.run_id).await?;
    let node = dev.node();
    let (mut by_poll, mut by_hook, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    let mut gaps: Vec<(String, f64)> = Vec::new();
    for i in 0..iterations * 2 {
        let rev = commit(repo.path(), i + 1)?;
        let t0 = wall_ms();
        if i % 2 == 0 {
            c.poll("demo").await?;
        } else {
            webhook(&url, &rev).await?;
        }
        let b = build_of(&c, &rev, |b| b.timeline.iter().any(|t| t.event == "start_step")).await?;
        let at = |e: &str| b.timeline.iter().find(|t| t.event == e).map(|t| t.at.0);
        let start = at("start_step").context("start_step")?;
        let ms = start.saturating_sub(t0) as f64;
        if i % 2 == 0 {
            by_poll.push(ms)
        } else {
            by_hook.push(ms)
        }
        if let (Some(req), Some(tar0), Some(tar1)) =
            (at("sandbox_create_requested"), at("start_write_tar"), at("end_write_tar"))
        {
            gaps.push(("notice → sandbox_create_requested".into(), req.saturating_sub(t0) as f64));
            gaps.push(("sandbox_create_requested → agent_up".into(), tar0.saturating_sub(req) as f64));
            gaps.push(("write tar".into(), tar1.saturating_sub(tar0) as f64));
            gaps.push(("end_write_tar → start_step".into(), start.saturating_sub(tar1) as f64));
        }
        c.cancel_run(b.run_id).await?;
        // The floor: the same, by hand, on the same node.
        let t = Instant::now();
        let s = node.create(&CreateSandboxRequest::default()).await?;
        let agent = node.sandbox(&s.id);
        agent
            .exec_detached(&ExecRequest { argv: vec!["sleep".into(), "30".into()], detach: true, ..Default::default() })
            .await?;
        floor.push(t.elapsed().as_secs_f64() * 1000.0);
        node.delete(&s.id).await?;
    }
    let median = |name: &str| {
        let v: Vec<f64> = gaps.iter().filter(|(n, _)| n == name).map(|(_, v)| *v).collect();
        crate::stats::Stats::from_samples(&v).map_or(f64::NAN, |s| s.median)
    };
    let notes = vec![format!(
        "where the time goes (medians): notice → sandbox_create_requested {:.0} ms, create → agent up {:.0} ms, \
         source tar {:.0} ms, tar → step started {:.0} ms; timeline stamps are wall-clock milliseconds",
        median("notice → sandbox_create_requested"),
        median("sandbox_create_requested → agent_up"),
        median("write tar"),
        median("end_write_tar → start_step"),
    ), "the poll case is what the poller does when its timer fires (POST /v1/projects/demo/poll: fetch, read flotilla.toml, notify); the poll interval itself (default 10s) comes on top".into()];
    let mut report = Report {
        scenario: "commit-to-running",
        description: "git commit → the build's step running in its sandbox (flotilla dev, one builder)".into(),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: 1,
        cases: vec![
            Case::measured(
                "flotilla_commit_to_running_poll",
                "commit, POST .../poll, until start_step on the timeline",
                false,
                &by_poll,
            ),
            Case::measured(
                "flotilla_commit_to_running_webhook",
                "commit, signed GitHub push webhook over TCP, until start_step",
                false,
                &by_hook,
            ),
            Case::measured(
                "sandbox_and_exec_by_hand",
                "create a sandbox + exec the step detached, on the same node",
                true,
                &floor,
            ),
        ],
        targets: vec![],
        notes,
        details: serde_json::Value::Null,
    };
    report.set_ratios("sandbox_and_exec_by_hand");
    let p = report.case("flotilla_commit_to_running_poll").and_then(Case::median).unwrap_or(f64::NAN);
    let h = report.case("flotilla_commit_to_running_webhook").and_then(Case::median).unwrap_or(f64::NAN);
    report.targets = vec![
        target("commit → running ≤ 1 s (poller's notice)", Some(p <= 1000.0), format!("median {p:.0} ms")),
        target("commit → running ≤ 1 s (webhook)", Some(h <= 1000.0), format!("median {h:.0} ms")),
    ];
    Ok(report)
}

// ---------------------------------------------------------------- node-loss

/// How long a silent node is given in `node-loss`.
const LOST_AFTER_MS: u64 = 3000;

/// A plain `flotilla node` in a scratch home: the fleet's second node.
struct SecondNode {
    child: Option<Child>,
    bin: PathBuf,
    home: PathBuf,
    _root: tempfile::TempDir,
}

impl SecondNode {
    fn start(bin: &Path) -> anyhow::Result<SecondNode> {
        let root = tempfile::Builder::new().prefix("flotilla-bench-node.").tempdir_in("/var/tmp")?;
        std::fs::set_permissions(root.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        let mut n = SecondNode { child: None, bin: bin.into(), home: root.path().join("home"), _root: root };
        n.spawn()?;
        Ok(n)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(self.home.join("node.sock"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self._root.path().join("node.log"))?;
        let child = Command::new(&self.bin)
            .args(["node", "--stop-apps", "--home"])
            .arg(&self.home)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the second node")?;
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(self.home.join("node.sock")).is_err() {
            if Instant::now() > deadline {
                bail!("the second node did not serve within {WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn url(&self) -> String {
        format!("unix://{}", self.home.join("node.sock").display())
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for SecondNode {
    fn drop(&mut self) {
        // Killed with -9: its sandboxes still run. Bring it back once so a
        // clean stop ends them.
        if self.child.is_none() && self.spawn().is_err() {
            return;
        }
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `flotilla dev` plus a second node (`--fleet-node`): a commit whose two
/// builds land one on each node, then a `kill -9` of the second node until
/// its build's retry runs its step on the first.
pub async fn node_loss(bin: &Path, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    let (mut commit_ms, mut loss_ms, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    let half = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64 / 2.0;
    for i in 0..iterations.max(1) {
        let mut second = SecondNode::start(bin)?;
        let lost_after = format!("{}ms", LOST_AFTER_MS);
        let dev = Dev::start_with(bin, &["--fleet-node", &second.url(), "--node-lost-after", &lost_after])?;
        let c = dev.coordinator();
        let dir = tempfile::tempdir()?;
        git(dir.path(), &["init", "-q"])?;
        // Half the machine each: least loaded placement puts one on each node.
        let step = "echo started; if [ -f go ]; then sleep 30; fi";
        let config: String = ["", "-b"]
            .iter()
            .map(|s| format!("[[builder]]\nname = \"linux-amd64{s}\"\ncpus = {half}\nsteps = [{{ name = \"s\", run = {step:?} }}]\n"))
            .collect();
        std::fs::write(dir.path().join("flotilla.toml"), config)?;
        git(dir.path(), &["add", "."])?;
        git(dir.path(), &["commit", "-qm", "start"])?;
        add_demo(&c, dir.path(), None).await?;
        let deadline = Instant::now() + WAIT;
        while c.queue().await?.nodes.iter().filter(|n| n.up).count() < 2 {
            anyhow::ensure!(Instant::now() < deadline, "the second node never joined the fleet");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::write(dir.path().join("go"), format!("{i}\n"))?;
        git(dir.path(), &["add", "go"])?;
        git(dir.path(), &["commit", "-qm", "go"])?;
        let rev = git(dir.path(), &["rev-parse", "HEAD"])?;
        let t0 = wall_ms();
        c.poll("demo").await?;
        let started =
            |b: &flotilla_api::coordinator::Build| b.timeline.iter().find(|t| t.event == "start_step").map(|t| t.at.0);
        let deadline = Instant::now() + WAIT;
        let builds = loop {
            let runs = c.runs(Some("demo"), 5, None).await?;
            if let Some(run) = runs.items.iter().find(|r| r.change.rev == rev) {
                let mut all = Vec::new();
                for b in &run.builds {
                    all.push(c.build(b.id).await?);
                }
                if all.len() == 2 && all.iter().all(|b| started(b).is_some()) {
                    break all;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "the two builds never both started");
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let last = builds.iter().filter_map(started).max().unwrap_or(t0);
        commit_ms.push(last.saturating_sub(t0) as f64);
        let lost = builds
            .iter()
            .find(|b| b.node.as_deref() == Some(second.url().as_str()))
            .context("no build was placed on the second node")?
            .clone();
        let t1 = wall_ms();
        second.kill9();
        let deadline = Instant::now() + WAIT;
        let again = loop {
            let run = c.run(lost.run_id).await?;
            if let Some(b) = run.builds.iter().find(|b| b.builder == lost.builder && b.attempt > lost.attempt) {
                let b = c.build(b.id).await?;
                if let Some(at) = started(&b) {
                    break at;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "the lost build was never retried");
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        loss_ms.push(again.saturating_sub(t1) as f64);
        c.cancel_run(lost.run_id).await?;
        // The floor of starting a build again: a sandbox + a detached exec
        // by hand on the surviving node, after the deadline.
        let node = dev.node();
        let t = Instant::now();
        let s = node.create(&CreateSandboxRequest::default()).await?;
        node.sandbox(&s.id)
            .exec_detached(&ExecRequest { argv: vec!["sleep".into(), "30".into()], detach: true, ..Default::default() })
            .await?;
        floor.push(LOST_AFTER_MS as f64 + t.elapsed().as_secs_f64() * 1000.0);
        node.delete(&s.id).await?;
    }
    let mut report = Report {
        scenario: "node-loss",
        description: format!(
            "flotilla dev + a second node (--fleet-node, --node-lost-after {LOST_AFTER_MS}ms), two builders of half \
             the machine each: commit → both steps running (one per node); kill -9 of the second node → its \
             build's retry running its step on the first"
        ),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: 0,
        cases: vec![
            Case::measured(
                "fleet_commit_to_running",
                "commit, POST .../poll, until both builds' start_step",
                false,
                &commit_ms,
            ),
            Case::measured(
                "node_loss_to_running_elsewhere",
                "kill -9 of the second node until the retry's start_step on the first",
                false,
                &loss_ms,
            ),
            Case::measured(
                "deadline_plus_start_by_hand",
                "the node-lost deadline plus a sandbox create + detached exec by hand on the surviving node",
                true,
                &floor,
            ),
        ],
        targets: vec![],
        notes: vec![
            "the deadline (--node-lost-after, default 60s) is the bulk of the loss time by design: a node that is only \
             restarting must not have its builds run twice"
                .into(),
        ],
        details: serde_json::Value::Null,
    };
    report.set_ratios("deadline_plus_start_by_hand");
    let m = report.case("fleet_commit_to_running").and_then(Case::median).unwrap_or(f64::NAN);
    report.targets =
        vec![target("commit → running ≤ 1 s on a two-node fleet", Some(m <= 1000.0), format!("median {m:.0} ms"))];
    Ok(report)
}

// ----------------------------------------------------------- log-first-byte

/// Milliseconds between the nanosecond clock a line carries and now.
pub(crate) fn lag_ms(line: &[u8]) -> anyhow::Result<f64> {
    let text = String::from_utf8_lossy(line);
    let printed: u128 = text.trim().lines().next().unwrap_or_default().trim().parse().context("a clock line")?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    Ok(now.saturating_sub(printed) as f64 / 1e6)
}

pub async fn log_first_byte(bin: &Path, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    let dev = Dev::start(bin)?;
    let c = dev.coordinator();
    let repo = repo("sleep 1; date +%s%N; sleep 30")?;
    add_demo(&c, repo.path(), None).await?;
    let node = dev.node();
    let (mut follow, mut floor) = (Vec::new(), Vec::new());
    let mut rev = git(repo.path(), &["rev-parse", "HEAD"])?;
    for i in 0..iterations + 1 {
        if i > 0 {
            rev = commit(repo.path(), i)?;
            c.poll("demo").await?;
        }
        let b = build_of(&c, &rev, |b| b.timeline.iter().any(|t| t.event == "start_step")).await?;
        let mut body = c.log(b.id, 0, true).await?;
        let frame = body.frame().await.context("the log ended")??;
        let data = frame.into_data().map_err(|_| anyhow::anyhow!("not data"))?;
        let lag = lag_ms(&data)?;
        c.cancel_run(b.run_id).await?;
        // The floor: the same command in a sandbox, followed through the agent.
        let s = node.create(&CreateSandboxRequest::default()).await?;
        let agent = node.sandbox(&s.id);
        let argv = vec!["sh".into(), "-c".into(), "sleep 1; date +%s%N".into()];
        let p = agent.exec_detached(&ExecRequest { argv, detach: true, ..Default::default() }).await?;
        let (mut stream, _) = agent.output(&p.id, 0, true).await?;
        let direct = loop {
            match stream.next().await? {
                Some(f) if f.kind == FrameKind::Stdout => break lag_ms(&f.payload)?,
                Some(_) => {}
                None => bail!("the process ended without output"),
            }
        };
        node.delete(&s.id).await?;
        if i > 0 {
            follow.push(lag);
            floor.push(direct);
        }
    }
    let mut report = Report {
        scenario: "log-first-byte",
        description: "a step prints its clock; until a `build log --follow` client has the byte".into(),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: 1,
        cases: vec![
            Case::measured("flotilla_build_log_follow", "GET /v1/builds/{id}/log?follow=true, first chunk", false, &follow),
            Case::measured("agent_output_follow", "the same command followed through the node's agent stream", true, &floor),
        ],
        targets: vec![],
        notes: vec!["the step's output goes agent → coordinator (stored with its offset in SQLite) → follower, woken by the append".into()],
        details: serde_json::Value::Null,
    };
    report.set_ratios("agent_output_follow");
    let m = report.case("flotilla_build_log_follow").and_then(Case::median).unwrap_or(f64::NAN);
    report.targets = vec![target(
        "first log byte to a follower ≤ 100 ms (Buildkite: a chunk every 3 s)",
        Some(m <= 100.0),
        format!("median {m:.1} ms"),
    )];
    Ok(report)
}
