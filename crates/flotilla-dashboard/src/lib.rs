//! The coordinator's dashboard: what a team wants to see at a glance, as
//! HTML rendered on the server (maud: templates are Rust, checked when
//! compiled), with a little JavaScript for live updates and the two
//! buttons.
//!
//! - `/`: the grid, commits down and builders across (builders grouped by
//!   OS, then arch, as Go's build dashboard does), one project and branch at
//!   a time, paginated by run id.
//! - `/ui/runs/{id}`: a run's builds with state, duration and node.
//! - `/ui/builds/{id}`: a build's timeline as bars, its failure, and its log
//!   with line numbers, links to lines and ANSI colours, growing as it is
//!   written (`/ui/builds/{id}/log` streams rendered lines over SSE).
//! - `/ui/queue`: what waits and why, per builder and per build, the
//!   fleet's nodes with their load and what they have, and the name table.
//! - `/ui/node?name=ADDRESS`: one node as its own API tells it now (asked
//!   by the coordinator, with the fleet's credentials): its sandboxes
//!   (build sandboxes linked to their builds), apps and their instances,
//!   warm pools.
//!
//! Pages are read-only and open to anyone who reaches the coordinator's
//! TCP address. Cancel and retry call the API with the token the user
//! pastes into the page (kept in the browser's local storage); without it
//! the API refuses them and the page says so. Grid and queue refresh
//! themselves on the coordinator's event feed (`/v1/events`). Assets are
//! embedded: the dashboard works offline.

mod ansi;
mod pages;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use flotilla_coordinator::runtime::Coordinator;
use serde::Deserialize;

type Co = State<Arc<Coordinator>>;

/// The dashboard's routes; merge them into the coordinator's router.
pub fn router(c: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/", get(grid))
        .route("/ui/runs/{id}", get(run))
        .route("/ui/builds/{id}", get(build))
        .route("/ui/builds/{id}/log", get(log_stream))
        .route("/ui/queue", get(queue))
        .route("/ui/node", get(node))
        .route("/ui/assets/dashboard.css", get(|| asset("text/css", include_str!("../assets/dashboard.css"))))
        .route("/ui/assets/dashboard.js", get(|| asset("text/javascript", include_str!("../assets/dashboard.js"))))
        .with_state(c)
}

async fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

/// A page that could not be made: the status and a line saying why.
fn problem(status: StatusCode, why: String) -> Response {
    (status, pages::problem(&why)).into_response()
}

fn store_problem(e: flotilla_coordinator::store::StoreError) -> Response {
    problem(StatusCode::INTERNAL_SERVER_ERROR, format!("the coordinator's store failed: {e}"))
}

#[derive(Debug, Deserialize)]
struct GridQuery {
    project: Option<String>,
    branch: Option<String>,
    /// Show runs older than this run id (the next page).
    before: Option<u64>,
}

/// Runs per grid page.
pub const GRID_ROWS: u64 = 30;

async fn grid(State(c): Co, Query(q): Query<GridQuery>) -> Response {
    let projects = match c.store.projects().await {
        Ok(p) => p,
        Err(e) => return store_problem(e),
    };
    let Some(project) = q.project.as_deref().map_or(projects.first(), |n| projects.iter().find(|p| p.name == n)) else {
        return match q.project {
            Some(n) => problem(StatusCode::NOT_FOUND, format!("no project {n:?}")),
            None => pages::empty().into_response(),
        };
    };
    let branch = q.branch.clone().or_else(|| project.branches.first().cloned()).unwrap_or_else(|| "main".into());
    // Runs of other branches and tries are skipped: read a few pages' worth.
    let runs = match c.store.runs(Some(project.name.clone()), GRID_ROWS * 4, q.before).await {
        Ok(r) => r,
        Err(e) => return store_problem(e),
    };
    let scanned_to = (runs.len() as u64 == GRID_ROWS * 4).then(|| runs.last().map(|r| r.id)).flatten();
    let rows: Vec<_> = runs
        .into_iter()
        .filter(|r| r.change.branch.as_deref() == Some(branch.as_str()))
        .take(GRID_ROWS as usize)
        .collect();
    // Older runs exist when a page filled, or when the scan did.
    let next = if rows.len() as u64 == GRID_ROWS { rows.last().map(|r| r.id) } else { scanned_to };
    // Builders with a known issue, from the project's current config.
    let known: BTreeMap<String, String> = match &project.config_hash {
        Some(hash) => match c.store.config(hash).await {
            Ok(Some(text)) => flotilla_coordinator::config::parse(&text)
                .map(|cfg| {
                    cfg.builders.into_iter().filter_map(|b| Some((b.name.to_string(), b.known_issue?))).collect()
                })
                .unwrap_or_default(),
            Ok(None) => BTreeMap::new(),
            Err(e) => return store_problem(e),
        },
        None => BTreeMap::new(),
    };
    pages::grid(&projects, project, &branch, &rows, next, &known).into_response()
}

/// A path's id, or why it is not one.
fn id_of(s: &str) -> Result<u64, String> {
    s.parse().map_err(|_| format!("{s:?} is not an id"))
}

async fn run(State(c): Co, Path(id): Path<String>) -> Response {
    let id = match id_of(&id) {
        Ok(id) => id,
        Err(why) => return problem(StatusCode::BAD_REQUEST, why),
    };
    match c.store.run(id).await {
        Ok(Some(r)) => pages::run(&r).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, format!("no run {id}")),
        Err(e) => store_problem(e),
    }
}

/// Bytes of log rendered into the page itself; the rest streams.
const LOG_IN_PAGE: u64 = 4 << 20;

async fn build(State(c): Co, Path(id): Path<String>) -> Response {
    let id = match id_of(&id) {
        Ok(id) => id,
        Err(why) => return problem(StatusCode::BAD_REQUEST, why),
    };
    let b = match c.store.build(id).await {
        Ok(Some(b)) => b,
        Ok(None) => return problem(StatusCode::NOT_FOUND, format!("no build {id}")),
        Err(e) => return store_problem(e),
    };
    let slice = match c.store.log(id, 0, LOG_IN_PAGE).await {
        Ok(s) => s,
        Err(e) => return store_problem(e),
    };
    let data = slice.as_ref().map(|s| s.data.as_slice()).unwrap_or_default();
    // Only whole lines go in the page; the stream goes on from there.
    let whole =
        if b.state.is_final() { data.len() } else { data.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1) };
    let lines = render_lines(&data[..whole], 1, &mut ansi::Style::default());
    pages::build(&b, &lines, whole as u64, lines.len() as u64 + 1).into_response()
}

/// Lines of output as (number, html), numbered from `first`.
fn render_lines(data: &[u8], first: u64, style: &mut ansi::Style) -> Vec<(u64, String)> {
    let text = String::from_utf8_lossy(data);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    if text.is_empty() && data.is_empty() {
        return Vec::new();
    }
    text.split('\n').enumerate().map(|(i, l)| (first + i as u64, ansi::line_to_html(l, style))).collect()
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    /// Byte offset of the first byte not yet shown.
    from: u64,
    /// The number the next line gets.
    line: u64,
}

/// New whole lines of a build's log as SSE `lines` events (HTML), each
/// with the offset and line number to resume from as its id, then `done`
/// when the build is final.
async fn log_stream(
    State(c): Co,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
    headers: axum::http::HeaderMap,
) -> Response {
    let id = match id_of(&id) {
        Ok(id) => id,
        Err(why) => return problem(StatusCode::BAD_REQUEST, why),
    };
    // A browser that reconnects says where it got to: go on from there.
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(':'))
        .and_then(|(at, line)| Some((at.parse().ok()?, line.parse().ok()?)));
    let (from, line) = resume.unwrap_or((q.from, q.line));
    // A stream that ends at once would have the browser reconnect forever.
    match c.store.build(id).await {
        Ok(Some(_)) => {}
        Ok(None) => return problem(StatusCode::NOT_FOUND, format!("no build {id}")),
        Err(e) => return store_problem(e),
    }
    let mut changed = c.log_watch(id);
    changed.borrow_and_update();
    let state = (c, changed, from, line, ansi::Style::default(), false);
    let stream =
        futures_util::stream::unfold(state, move |(c, mut changed, mut at, mut line, mut style, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let slice = match c.store.log(id, at, 1 << 20).await {
                    Ok(Some(s)) => s,
                    Ok(None) | Err(_) => return None,
                };
                let take = if slice.done {
                    slice.data.len()
                } else {
                    slice.data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
                };
                if take > 0 {
                    let lines = render_lines(&slice.data[..take], line, &mut style);
                    at += take as u64;
                    line += lines.len() as u64;
                    let html = pages::log_lines(&lines, None).into_string();
                    let ev = Event::default().event("lines").id(format!("{at}:{line}")).data(html);
                    return Some((Ok::<_, std::convert::Infallible>(ev), (c, changed, at, line, style, false)));
                }
                if slice.done {
                    // An event with no data is never dispatched.
                    let ev = Event::default().event("done").data("final");
                    return Some((Ok(ev), (c, changed, at, line, style, true)));
                }
                // The next append wakes us; another coordinator's does not, so
                // look again every second too.
                let _ = tokio::time::timeout(Duration::from_secs(1), changed.changed()).await;
                changed.borrow_and_update();
            }
        });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

#[derive(Debug, Deserialize)]
struct NodeQuery {
    name: String,
}

/// How long the node page waits for each of the node's answers.
const NODE_ASK: Duration = Duration::from_secs(3);

async fn node(State(c): Co, Query(q): Query<NodeQuery>) -> Response {
    let fleet = c.describe_fleet().await;
    let Some((name, client, info)) = fleet.into_iter().find(|(n, _, _)| *n == q.name) else {
        return problem(StatusCode::NOT_FOUND, format!("no node {:?} in the coordinator's fleet", q.name));
    };
    let (sandboxes, apps, pools) = tokio::join!(
        tokio::time::timeout(NODE_ASK, client.list()),
        tokio::time::timeout(NODE_ASK, client.apps()),
        tokio::time::timeout(NODE_ASK, client.pools()),
    );
    pages::node(
        &name,
        info.as_ref(),
        &answered("its sandboxes", sandboxes),
        &answered("its apps", apps),
        &answered("its warm pools", pools),
    )
    .into_response()
}

/// A node's answer within [`NODE_ASK`], or what went wrong asking for `what`.
fn answered<T, E: std::error::Error + 'static>(
    what: &str,
    r: Result<Result<T, E>, tokio::time::error::Elapsed>,
) -> Result<T, String> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", flotilla_coordinator::error_chain(&e))),
        Err(_) => Err(format!("{what}: no answer within {}s", NODE_ASK.as_secs())),
    }
}

async fn queue(State(c): Co) -> Response {
    // What each node said of itself at its last describe (no node is asked
    // here), and the name table's nodes when the coordinator reads one.
    let nodes: Vec<(String, Option<flotilla_api::NodeInfo>)> =
        c.describe_fleet().await.into_iter().map(|(name, _, info)| (name, info.ok())).collect();
    let table = match &c.config.discovery {
        Some(d) => match tokio::time::timeout(Duration::from_secs(2), d.names.glob("nodes/*")).await {
            Ok(Ok(entries)) => Some(Ok(entries)),
            Ok(Err(e)) => Some(Err(e.to_string())),
            Err(_) => Some(Err("the name table did not answer within 2 s".to_string())),
        },
        None => None,
    };
    pages::queue(&c.queue(), &nodes, table.as_ref()).into_response()
}
