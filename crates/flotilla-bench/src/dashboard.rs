//! Scenarios of the dashboard (issue 17):
//!
//! - `dashboard-grid`: the grid page's server time on a project of 10,000
//!   builds (5,000 runs of two builders, in SQLite), first page and a deep
//!   page, called in process (no network); baseline: `GET /v1/runs` of the
//!   same 30 runs as JSON, the API the CLI reads.
//! - `dashboard-log`: a step prints its clock every 100 ms; the time until
//!   the line reaches the build page's stream (`/ui/builds/{id}/log`, SSE of
//!   rendered lines); baseline: the raw `build log --follow` stream of the
//!   same build at the same time.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_agent::http::{Endpoint, HttpClient};
use flotilla_api::coordinator::{AddProjectRequest, RunState};
use flotilla_coordinator::pm::{self, Event};
use flotilla_coordinator::runtime::{Coordinator, CoordinatorConfig};
use flotilla_coordinator::store::Store;
use http::Method;
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::coordinator::{Dev, build_of, lag_ms, notice, project, repo, step};
use crate::report::{Case, Machine, Report, Unit};
use crate::scenarios::{now, target};

const RUNS: usize = 5_000;

/// The project's `flotilla.toml`: two builders, one with a known issue.
const CONFIG: &str = "[[builder]]\nname = \"linux-amd64\"\nsteps = [{ name = \"test\", run = \"make test\" }]\n\n\
                      [[builder]]\nname = \"linux-arm64-race\"\nknown_issue = \"https://example.com/issues/1\"\n\
                      steps = [{ name = \"test\", run = \"make race\" }]\n";

/// A store with `RUNS` runs of two finished builds each.
async fn filled(dir: &Path) -> anyhow::Result<Store> {
    let store = Store::sqlite(&dir.join("c.db"))?;
    project(&store, "demo").await?;
    // The config the grid reads for known issues, under the hash the runs use.
    store.put_config("h", CONFIG).await?;
    let cfg = Event::UpdateConfig {
        config: pm::ConfigRef { hash: "h".into(), branches: vec!["main".into()], try_enabled: true },
    };
    store.send("demo", "cfg", &cfg).await?;
    for chunk in (0..RUNS).collect::<Vec<_>>().chunks(500) {
        for &i in chunk {
            store.send("demo", &format!("c:{i}"), &notice(i, &format!("change number {i}"))).await?;
        }
        while step(&store, "demo", &["linux-amd64", "linux-arm64-race"]).await? > 0 {}
    }
    // Finish every build (a few fail) so the grid shows real states.
    for q in store.queue(u64::MAX).await? {
        store.claim(q.id, "bench", "node").await?;
        let state = if q.id % 7 == 0 { RunState::Failed } else { RunState::Passed };
        store.finish_build(q.id, state, None).await?;
    }
    Ok(store)
}

/// Milliseconds `router` takes to answer GET `uri` with a whole body.
async fn time_get(router: &axum::Router, uri: &str) -> anyhow::Result<f64> {
    Ok(get(router, uri).await?.0)
}

/// GET `uri` through `router`: the milliseconds it took and the body.
async fn get(router: &axum::Router, uri: &str) -> anyhow::Result<(f64, bytes::Bytes)> {
    let req = http::Request::builder().method(Method::GET).uri(uri).body(axum::body::Body::empty())?;
    let t = Instant::now();
    let resp = router.clone().oneshot(req).await?;
    anyhow::ensure!(resp.status().is_success(), "GET {uri}: {}", resp.status());
    let body = resp.into_body().collect().await?.to_bytes();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(!body.is_empty(), "GET {uri}: empty");
    Ok((ms, body))
}

pub async fn dashboard_grid(machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let fill = Instant::now();
    let store = filled(dir.path()).await?;
    let filled_in = fill.elapsed();
    let c: Arc<Coordinator> = Coordinator::new(
        store,
        None,
        CoordinatorConfig {
            data_dir: dir.path().to_path_buf(),
            owner: "bench".into(),
            max_builds: 1,
            fleet: Vec::new(),
            node_lost_after: Duration::from_secs(60),
            lease: Duration::from_secs(10),
            max_log_bytes: 64 << 20,
            retention: Duration::from_secs(90 * 86_400),
            discovery: None,
            secrets: Arc::new(flotilla_coordinator::secrets::SecretBox::load_or_create(&dir.path().join("key"))?),
        },
    );
    let pages = flotilla_dashboard::router(c.clone());
    let api = flotilla_coordinator::api::router(c.clone());
    let deep = RUNS as u64 / 2;
    // The page timed is the whole one: 30 rows, the known issue read from the config.
    let (_, page) = get(&pages, "/?project=demo&branch=main").await?;
    let page = String::from_utf8_lossy(&page);
    anyhow::ensure!(page.matches("<tr>").count() == 32, "the grid has not 30 rows of runs");
    anyhow::ensure!(page.contains("known issue"), "the grid did not read the known issue from the config");
    let (mut first, mut older, mut json) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iterations + 3 {
        let a = time_get(&pages, "/?project=demo&branch=main").await?;
        let b = time_get(&pages, &format!("/?project=demo&branch=main&before={deep}")).await?;
        let j = time_get(&api, "/v1/runs?project=demo&limit=30").await?;
        if i >= 3 {
            first.push(a);
            older.push(b);
            json.push(j);
        }
    }
    let mut report = Report {
        scenario: "dashboard-grid",
        description: format!("the grid page's server time, {RUNS} runs × 2 builders = {} builds in SQLite", RUNS * 2),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: 3,
        cases: vec![
            Case::measured("grid_first_page", "GET / (30 newest runs of main, rendered)", false, &first),
            Case::measured("grid_deep_page", &format!("GET /?before={deep} (a page half way down)"), false, &older),
            Case::measured("api_runs_json", "GET /v1/runs?limit=30 (the same runs as JSON)", true, &json),
        ],
        targets: vec![],
        notes: vec![format!("filling the store took {:.1} s", filled_in.as_secs_f64())],
        details: serde_json::Value::Null,
    };
    report.set_ratios("api_runs_json");
    let m = report.case("grid_first_page").and_then(Case::median).unwrap_or(f64::NAN);
    let d = report.case("grid_deep_page").and_then(Case::median).unwrap_or(f64::NAN);
    report.targets = vec![target(
        "the grid under 100 ms server time with 10,000 builds",
        Some(m < 100.0 && d < 100.0),
        format!("first page {m:.1} ms, deep page {d:.1} ms"),
    )];
    Ok(report)
}

/// Reads a streamed body for `lines` clock lines, mapping each chunk to
/// the clocks it holds with `parse`.
async fn clocks(
    http: &HttpClient,
    path: &str,
    lines: usize,
    parse: fn(&str) -> Vec<String>,
) -> anyhow::Result<Vec<f64>> {
    let req = http.request(Method::GET, path).body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let mut body = http.send_ok(req).await?.into_body();
    let (mut out, mut pending) = (Vec::new(), String::new());
    while out.len() < lines {
        let frame = body.frame().await.context("the stream ended")??;
        let Ok(data) = frame.into_data() else { continue };
        pending.push_str(&String::from_utf8_lossy(&data));
        // Only whole records: up to the last newline.
        let Some(cut) = pending.rfind('\n') else { continue };
        let whole: String = pending.drain(..=cut).collect();
        for clock in parse(&whole) {
            if let Ok(ms) = lag_ms(clock.as_bytes()) {
                out.push(ms);
            }
        }
    }
    Ok(out)
}

/// Clock lines in raw log bytes.
fn raw_lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_string).collect()
}

/// Clock lines in the page's SSE stream: the text after each line's
/// number anchor.
fn sse_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .filter_map(|l| l.split("</a>").nth(1))
        .map(|l| l.split('<').next().unwrap_or_default().to_string())
        .collect()
}

pub async fn dashboard_log(bin: &Path, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    let dev = Dev::start(bin)?;
    let c = dev.coordinator();
    let lines = iterations.max(1) * 10;
    let step = format!("sleep 1; i=0; while [ $i -lt {} ]; do date +%s%N; sleep 0.1; i=$((i+1)); done", lines + 5);
    let repo = repo(&step)?;
    let req = AddProjectRequest {
        name: "demo".into(),
        repo: repo.path().to_str().context("utf-8 path")?.into(),
        branch: Some("main".into()),
        poll_interval: Some("1h".into()),
        webhook_secret: None,
    };
    c.add_project(&req).await?;
    let rev = crate::coordinator::git(repo.path(), &["rev-parse", "HEAD"])?;
    let b = build_of(&c, &rev, |b| b.timeline.iter().any(|t| t.event == "start_step")).await?;
    let http = HttpClient::new(Endpoint::Unix(dev.home.join("coordinator.sock")));
    // Both streams from the start of the log, at once.
    let (page_path, raw_path) =
        (format!("/ui/builds/{}/log?from=0&line=1", b.id), format!("/v1/builds/{}/log?from=0&follow=true", b.id));
    let page = clocks(&http, &page_path, lines, sse_lines);
    let raw = clocks(&http, &raw_path, lines, raw_lines);
    let (page, raw) = tokio::join!(page, raw);
    let mut report = Report {
        scenario: "dashboard-log",
        description: "a step prints its clock every 100 ms; until the line is in the build page's stream".into(),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: 0,
        cases: vec![
            Case::measured("page_log_sse", "GET /ui/builds/{id}/log: rendered lines over SSE", false, &page?),
            Case::measured("raw_log_follow", "GET /v1/builds/{id}/log?follow=true, the same build", true, &raw?),
        ],
        targets: vec![],
        notes: vec![format!("{lines} lines; the page's stream sends whole lines only, the raw one any bytes")],
        details: serde_json::Value::Null,
    };
    report.set_ratios("raw_log_follow");
    let m = report.case("page_log_sse").and_then(Case::median).unwrap_or(f64::NAN);
    report.targets = vec![target(
        "a log line in the page ≤ 1 s after it is written",
        Some(m <= 1000.0),
        format!("median {m:.1} ms"),
    )];
    Ok(report)
}
