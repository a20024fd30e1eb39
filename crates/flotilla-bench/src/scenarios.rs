//! The scenarios: each times Flotilla and its baseline(s) in the same run,
//! interleaved iteration by iteration so that a machine that gets busier
//! halfway through slows both sides alike.

use std::io::ErrorKind;
use std::path::Path;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use flotilla_agent::client::drain_exec;
use flotilla_agent::http::error_chain;
use flotilla_api::{CreateSandboxRequest, ExecRequest, Sandbox, SandboxState, WorkspaceQuery};
use futures_util::{Stream, StreamExt};
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde_json::json;
use tokio_util::io::ReaderStream;

use crate::data::Workload;
use crate::node::Node;
use crate::report::{Case, Machine, Report, Target, Unit};
use crate::stats::Stats;

/// Bytes of the tarball sent before `stop-during-import` stops the sandbox.
const STOP_AFTER_BYTES: u64 = 100_000_000;
/// Read size when streaming the tarball to the node.
const CHUNK: usize = 256 * 1024;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn now() -> String {
    flotilla_api::Timestamp::now().to_string()
}

/// Flushes dirty pages so one run's writeback does not land in the next.
pub(crate) fn sync() -> anyhow::Result<()> {
    let st = Command::new("sync").status().context("running sync")?;
    anyhow::ensure!(st.success(), "sync failed: {st}");
    Ok(())
}

pub(crate) async fn new_sandbox(node: &Node) -> anyhow::Result<Sandbox> {
    let sb = node.client().create(&CreateSandboxRequest::default()).await.context("creating a sandbox")?;
    if sb.state != SandboxState::Running {
        bail!("sandbox {} came back {} (error: {:?})", sb.id, sb.state, sb.error);
    }
    Ok(sb)
}

/// A command-line baseline timed spawn → wait, or the reason it cannot run.
struct Baseline {
    name: &'static str,
    description: String,
    argv: Vec<&'static str>,
    unavailable: Option<String>,
    samples: Vec<f64>,
}

impl Baseline {
    /// Runs the command once (untimed) to learn whether it works here.
    fn probe(name: &'static str, package: &str, argv: &[&'static str]) -> Baseline {
        let description = format!("`{}` spawned and waited for", argv.join(" "));
        let unavailable = match Command::new(argv[0]).args(&argv[1..]).stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!("`{}` {} here: {}", argv[0], o.status, String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                Some(format!("`{}` is not installed (Debian package {package})", argv[0]))
            }
            Err(e) => Some(format!("cannot run `{}`: {e}", argv[0])),
        };
        if let Some(why) = &unavailable {
            eprintln!("flotilla-bench: baseline {name} unavailable: {why}");
        }
        Baseline { name, description, argv: argv.to_vec(), unavailable, samples: Vec::new() }
    }

    /// One timed run; the sample is kept only when `record` is set.
    fn run(&mut self, record: bool) -> anyhow::Result<()> {
        if self.unavailable.is_some() {
            return Ok(());
        }
        let mut cmd = Command::new(self.argv[0]);
        cmd.args(&self.argv[1..]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let t = Instant::now();
        let st = cmd.status().with_context(|| format!("running {}", self.argv[0]))?;
        let elapsed = ms(t.elapsed());
        anyhow::ensure!(st.success(), "baseline `{}` failed: {st}", self.argv.join(" "));
        if record {
            self.samples.push(elapsed);
        }
        Ok(())
    }

    fn into_case(self) -> Case {
        match self.unavailable {
            Some(why) => Case::unavailable(self.name, &self.description, why),
            None => Case::measured(self.name, &self.description, true, &self.samples),
        }
    }
}

pub(crate) fn target(description: &str, met: Option<bool>, observed: String) -> Target {
    Target { description: description.into(), met, observed }
}

// ------------------------------------------------------------------ create

/// Sandbox create → agent ready, against `bwrap … true` and `unshare … true`.
pub async fn create(node: &Node, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    const WARMUPS: usize = 2;
    let client = node.client();
    let mut bwrap = Baseline::probe(
        "bwrap_true",
        "bubblewrap",
        &[
            "bwrap",
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--unshare-all",
            "--die-with-parent",
            "true",
        ],
    );
    let mut unshare = Baseline::probe(
        "unshare_true",
        "util-linux",
        &["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--net", "--uts", "--ipc", "true"],
    );
    let mut samples = Vec::with_capacity(iterations);
    // Gaps between the node's recorded boot steps, in order of first sight.
    let mut gaps: Vec<(String, Vec<f64>)> = Vec::new();
    let mut outside = Vec::new();
    for i in 0..WARMUPS + iterations {
        let record = i >= WARMUPS;
        let t = Instant::now();
        let sb = new_sandbox(node).await?;
        let elapsed = t.elapsed();
        client.delete(&sb.id).await.with_context(|| format!("deleting sandbox {}", sb.id))?;
        if record {
            samples.push(ms(elapsed));
            for w in sb.steps.windows(2) {
                let gap = w[0].at.until(w[1].at).as_millis() as f64;
                let key = format!("{}→{}", w[0].name, w[1].name);
                match gaps.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push(gap),
                    None => gaps.push((key, vec![gap])),
                }
            }
            if let (Some(first), Some(last)) = (sb.steps.first(), sb.steps.last()) {
                outside.push(ms(elapsed) - first.at.until(last.at).as_millis() as f64);
            }
        }
        bwrap.run(record)?;
        unshare.run(record)?;
    }
    let mut report = Report {
        scenario: "create",
        description: "sandbox create → agent ready (POST /v1/sandboxes, then wait on its operation until the agent signalled ready)".into(),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: WARMUPS,
        cases: vec![
            Case::measured(
                "flotilla_create_ready",
                "client.create(default) until the sandbox is returned; delete after, untimed",
                false,
                &samples,
            ),
            bwrap.into_case(),
            unshare.into_case(),
        ],
        targets: vec![],
        notes: vec![],
        details: serde_json::Value::Null,
    };
    report.set_ratios("bwrap_true");
    let median = report.case("flotilla_create_ready").and_then(Case::median).unwrap_or(f64::NAN);
    let vs_bwrap = report.case("flotilla_create_ready").and_then(|c| c.ratio_to_baseline);
    report.targets = vec![
        target("median < 25 ms", Some(median < 25.0), format!("median {median:.2} ms")),
        target(
            "within 4x of bwrap",
            vs_bwrap.map(|r| r <= 4.0),
            vs_bwrap.map_or("bwrap unavailable".into(), |r| format!("{r:.2}x bwrap")),
        ),
    ];
    if let Some(u) = report.case("unshare_true").and_then(Case::median) {
        report.notes.push(format!("flotilla create is {:.2}x `unshare … true`", median / u));
    }
    let step_stats: Vec<(String, Stats)> =
        gaps.iter().filter_map(|(k, v)| Stats::from_samples(v).map(|s| (k.clone(), s))).collect();
    let outside_stats = Stats::from_samples(&outside);
    let mut breakdown: Vec<String> = step_stats.iter().map(|(k, s)| format!("{k} {:.1} ms", s.median)).collect();
    if let Some(s) = &outside_stats {
        breakdown.push(format!("outside the recorded steps (HTTP, validation, response) {:.1} ms", s.median));
    }
    report.notes.push(format!(
        "where it goes (medians of the node's step timestamps, 1 ms resolution): {}",
        breakdown.join("; ")
    ));
    report.details = json!({
        "step_gaps_ms": step_stats.into_iter().map(|(k, s)| (k, json!(s))).collect::<serde_json::Map<_, _>>(),
        "outside_steps_ms": outside_stats,
        "step_resolution_ms": 1,
    });
    Ok(report)
}

// ------------------------------------------------------------------ exec

/// Exec round trip of `true` through the node, against fork+exec.
pub async fn exec(node: &Node, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    const WARMUPS: usize = 5;
    let sb = new_sandbox(node).await?;
    let result = exec_loop(node, &sb, WARMUPS, iterations).await;
    node.client().delete(&sb.id).await.with_context(|| format!("deleting sandbox {}", sb.id))?;
    let ExecSamples { total, headers, process, baseline } = result?;
    let mut report = Report {
        scenario: "exec",
        description: "exec round trip of `true` through the node API, on one running sandbox".into(),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: WARMUPS,
        cases: vec![
            Case::measured(
                "flotilla_exec_true",
                "POST /v1/sandboxes/{id}/exec {argv:[true]} and drain the frames to the exit frame",
                false,
                &total,
            ),
            baseline.into_case(),
        ],
        targets: vec![],
        notes: vec![],
        details: serde_json::Value::Null,
    };
    report.set_ratios("fork_exec_true");
    let median = report.case("flotilla_exec_true").and_then(Case::median).unwrap_or(f64::NAN);
    report.targets = vec![target("median < 3 ms", Some(median < 3.0), format!("median {median:.3} ms"))];
    let (headers, process) = (Stats::from_samples(&headers), Stats::from_samples(&process));
    if let (Some(h), Some(p)) = (&headers, &process) {
        report.notes.push(format!(
            "where it goes (medians): {:.3} ms until the response headers, {:.3} ms more until the exit frame; \
             the agent reports the process itself took {:.0} ms (1 ms resolution)",
            h.median,
            median - h.median,
            p.median
        ));
    }
    report.details = json!({ "until_headers_ms": headers, "agent_reported_process_ms": process });
    Ok(report)
}

/// What [`exec_loop`] measured.
struct ExecSamples {
    /// Request sent → exit frame read.
    total: Vec<f64>,
    /// Request sent → response headers read.
    headers: Vec<f64>,
    /// The process's own wall time as the agent reports it.
    process: Vec<f64>,
    baseline: Baseline,
}

async fn exec_loop(node: &Node, sb: &Sandbox, warmups: usize, iterations: usize) -> anyhow::Result<ExecSamples> {
    let agent = node.client().sandbox(&sb.id);
    let req = ExecRequest { argv: vec!["true".into()], ..Default::default() };
    let mut out = ExecSamples {
        total: Vec::with_capacity(iterations),
        headers: Vec::with_capacity(iterations),
        process: Vec::with_capacity(iterations),
        baseline: Baseline::probe("fork_exec_true", "coreutils", &["/bin/true"]),
    };
    for i in 0..warmups + iterations {
        let t = Instant::now();
        let mut frames = agent.exec(&req).await.context("exec of `true`")?;
        let headers = t.elapsed();
        let status = drain_exec(&mut frames, &mut std::io::sink(), &mut std::io::sink()).await?;
        let elapsed = t.elapsed();
        anyhow::ensure!(status.code == Some(0), "`true` in the sandbox ended {status:?}");
        out.baseline.run(i >= warmups)?;
        if i >= warmups {
            out.total.push(ms(elapsed));
            out.headers.push(ms(headers));
            out.process.push(status.duration_ms as f64);
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------ import

type TarStream = Pin<Box<dyn Stream<Item = std::io::Result<Frame<Bytes>>> + Send>>;

/// Counts the bytes handed to the HTTP client and fires once past a mark.
struct Tap {
    sent: Arc<AtomicU64>,
    mark: u64,
    reached: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The tarball as a streaming request body, optionally tapped.
async fn tar_body(path: &Path, mut tap: Option<Tap>) -> anyhow::Result<StreamBody<TarStream>> {
    let file = tokio::fs::File::open(path).await.with_context(|| format!("opening {}", path.display()))?;
    let stream = ReaderStream::with_capacity(file, CHUNK).map(move |chunk| {
        if let (Ok(b), Some(tap)) = (&chunk, tap.as_mut()) {
            let total = tap.sent.fetch_add(b.len() as u64, Ordering::Relaxed) + b.len() as u64;
            if total >= tap.mark
                && let Some(tx) = tap.reached.take()
            {
                let _ = tx.send(());
            }
        }
        chunk.map(Frame::data)
    });
    Ok(StreamBody::new(Box::pin(stream) as TarStream))
}

/// Reads the tarball once so both sides start from the page cache.
pub(crate) fn warm(path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

/// The two ways `tar -x` reads the tarball in the import baselines.
pub(crate) const TAR_PIPE: &str = "cat \"$1\" | tar -x -C \"$2\"";
const TAR_FILE: &str = "tar -x -f \"$1\" -C \"$2\"";

#[derive(Debug, Clone, Copy)]
enum Side {
    Flotilla,
    TarPipe,
    TarFile,
}

/// Times `sh -c script tar dir` into a fresh directory beside the node
/// home; returns seconds. The directory is removed afterwards, untimed.
pub(crate) fn tar_x(node: &Node, tar: &Path, script: &str, i: usize) -> anyhow::Result<f64> {
    let dir = node.scratch(&format!("tar-x-{i}"));
    std::fs::create_dir(&dir)?;
    sync()?;
    let t = Instant::now();
    let st = Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(tar)
        .arg(&dir)
        .status()
        .with_context(|| format!("running sh -c '{script}'"))?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    anyhow::ensure!(st.success(), "sh -c '{script}' failed: {st}");
    Ok(secs)
}

/// Workspace import MB/s, against `cat tar | tar -x` onto the same filesystem.
pub async fn import(node: &Node, machine: &Machine, iterations: usize, w: &Workload) -> anyhow::Result<Report> {
    warm(&w.tar).context("reading the tarball into the page cache")?;
    let mb = w.tar_bytes as f64 / 1e6;
    let (mut flotilla, mut summaries) = (Vec::new(), Vec::new());
    let (mut tar_pipe, mut tar_file) = (Vec::new(), Vec::new());
    for i in 0..iterations {
        // Rotate which side goes first so none always inherits another's
        // writeback.
        let mut sides = [Side::Flotilla, Side::TarPipe, Side::TarFile];
        let n = sides.len();
        sides.rotate_left(i % n);
        for side in sides {
            match side {
                Side::Flotilla => {
                    let sb = new_sandbox(node).await?;
                    sync()?;
                    let body = tar_body(&w.tar, None).await?;
                    let t = Instant::now();
                    let res = node.client().sandbox(&sb.id).put_workspace(body, None, &WorkspaceQuery::default()).await;
                    let secs = t.elapsed().as_secs_f64();
                    node.client().delete(&sb.id).await.with_context(|| format!("deleting sandbox {}", sb.id))?;
                    let summary = res.context("importing the tarball")?;
                    anyhow::ensure!(
                        summary.bytes == w.content_bytes,
                        "the import wrote {} content bytes, expected {}",
                        summary.bytes,
                        w.content_bytes
                    );
                    flotilla.push(mb / secs);
                    summaries.push(summary);
                }
                Side::TarPipe => tar_pipe.push(mb / tar_x(node, &w.tar, TAR_PIPE, i)?),
                Side::TarFile => tar_file.push(mb / tar_x(node, &w.tar, TAR_FILE, i)?),
            }
        }
    }
    sync()?;
    let mut report = Report {
        scenario: "import",
        description: format!(
            "workspace import of a {:.2} GB tar ({} files, {} dirs) into a fresh sandbox; warm",
            w.tar_bytes as f64 / 1e9,
            w.files,
            w.dirs
        ),
        date: now(),
        machine: machine.clone(),
        unit: Unit::MegabytesPerSec,
        warmups: 0,
        cases: vec![
            Case::measured(
                "flotilla_import",
                "tar file streamed through PUT /v1/sandboxes/{id}/workspace until the summary returns",
                false,
                &flotilla,
            ),
            Case::measured(
                "tar_x_pipe",
                "sh -c 'cat TAR | tar -x -C DIR', DIR fresh and beside the node home (the issue's baseline)",
                true,
                &tar_pipe,
            ),
            Case::measured(
                "tar_x_file",
                "sh -c 'tar -x -f TAR -C DIR': the same extraction without the pipe (informative only; the \
                 target is against tar_x_pipe)",
                true,
                &tar_file,
            ),
        ],
        targets: vec![],
        notes: vec![
            "warm: the tarball is read into the page cache first; `sync` before every timed run; no cache is dropped"
                .into(),
            format!("MB/s = tar file bytes ({}) / 10^6 / seconds", w.tar_bytes),
        ],
        details: json!({ "workload": w, "flotilla_import_summaries": summaries }),
    };
    report.set_ratios("tar_x_pipe");
    let ratio = report.case("flotilla_import").and_then(|c| c.ratio_to_baseline);
    report.targets = vec![target(
        "throughput >= 70% of tar -x",
        ratio.map(|r| r >= 0.70),
        ratio.map_or("no baseline".into(), |r| format!("{:.0}% of tar -x", r * 100.0)),
    )];
    Ok(report)
}

// ------------------------------------------------------------------ stop

/// `stop` latency while a 1 GB import streams in, against stopping an idle
/// sandbox.
pub async fn stop_during_import(
    node: &Node,
    machine: &Machine,
    iterations: usize,
    w: &Workload,
) -> anyhow::Result<Report> {
    warm(&w.tar).context("reading the tarball into the page cache")?;
    let client = node.client();
    let (mut busy, mut idle, mut after) = (Vec::new(), Vec::new(), Vec::new());
    let (mut outcomes, mut sent_at_stop) = (Vec::new(), Vec::new());
    for _ in 0..iterations {
        // Idle baseline.
        let sb = new_sandbox(node).await?;
        let t = Instant::now();
        let stopped = client.action(&sb.id, "stop").await.context("stopping an idle sandbox")?;
        idle.push(ms(t.elapsed()));
        client.delete(&sb.id).await?;
        anyhow::ensure!(stopped.state == SandboxState::Stopped, "stop left the sandbox {}", stopped.state);

        // During an import.
        let sb = new_sandbox(node).await?;
        let sent = Arc::new(AtomicU64::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let body =
            tar_body(&w.tar, Some(Tap { sent: sent.clone(), mark: STOP_AFTER_BYTES, reached: Some(tx) })).await?;
        let agent = client.sandbox(&sb.id);
        let mut import = tokio::spawn(async move { agent.put_workspace(body, None, &WorkspaceQuery::default()).await });
        if tokio::time::timeout(Duration::from_secs(120), rx).await.is_err() || import.is_finished() {
            import.abort();
            let got = match import.await {
                Ok(r) => format!("{r:?}"),
                Err(e) => e.to_string(),
            };
            client.delete(&sb.id).await?;
            bail!("the import did not reach {STOP_AFTER_BYTES} bytes (sent {}): {got}", sent.load(Ordering::Relaxed));
        }
        let t = Instant::now();
        let stopped = client.action(&sb.id, "stop").await.context("stopping a sandbox during an import")?;
        let stop_time = t.elapsed();
        sent_at_stop.push(sent.load(Ordering::Relaxed));
        busy.push(ms(stop_time));
        let outcome = match tokio::time::timeout(Duration::from_secs(30), &mut import).await {
            Ok(Ok(Ok(summary))) => format!("Ok (the import completed: {summary:?})"),
            Ok(Ok(Err(e))) => format!("Err: {}", error_chain(&e)),
            Ok(Err(e)) => format!("the import task failed: {e}"),
            Err(_) => {
                import.abort();
                "still running 30 s after the stop".to_string()
            }
        };
        after.push(ms(t.elapsed() - stop_time));
        // Without the per-sandbox paths, so equal outcomes group together.
        let home = node.home().display().to_string();
        outcomes.push(outcome.replace(&home, "<node home>").replace(&sb.id, "<id>"));
        client.delete(&sb.id).await?;
        anyhow::ensure!(stopped.state == SandboxState::Stopped, "stop left the sandbox {}", stopped.state);
    }
    let mut report = Report {
        scenario: "stop-during-import",
        description: format!(
            "POST /v1/sandboxes/{{id}}/stop once ~{} MB of a {:.2} GB import has been sent",
            STOP_AFTER_BYTES / 1_000_000,
            w.tar_bytes as f64 / 1e9
        ),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: 0,
        cases: vec![
            Case::measured(
                "flotilla_stop_during_import",
                "client.action(id, \"stop\") while put_workspace streams in another task",
                false,
                &busy,
            ),
            Case::measured("flotilla_stop_idle", "client.action(id, \"stop\") on an idle running sandbox", true, &idle),
        ],
        targets: vec![],
        notes: vec![],
        details: json!({
            "import_results": outcomes,
            "bytes_sent_at_stop": sent_at_stop,
            "import_returned_after_stop_ms": Stats::from_samples(&after),
        }),
    };
    report.set_ratios("flotilla_stop_idle");
    let busy_stats = Stats::from_samples(&busy);
    let median = busy_stats.as_ref().map_or(f64::NAN, |s| s.median);
    let max = busy_stats.as_ref().map_or(f64::NAN, |s| s.max);
    report.targets =
        vec![target("median < 100 ms", Some(median < 100.0), format!("median {median:.2} ms, max {max:.2} ms"))];
    let mut distinct: Vec<(String, usize)> = Vec::new();
    for o in &outcomes {
        match distinct.iter_mut().find(|(k, _)| k == o) {
            Some((_, n)) => *n += 1,
            None => distinct.push((o.clone(), 1)),
        }
    }
    for (o, n) in distinct {
        report.notes.push(format!("the import call returned ({n}/{}): {o}", outcomes.len()));
    }
    if let Some(s) = Stats::from_samples(&after) {
        report.notes.push(format!("the import call returned a median {:.3} ms after the stop returned", s.median));
    }
    Ok(report)
}
