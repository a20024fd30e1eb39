//! The agent's HTTP API (DESIGN §4, "Agent").
//!
//! Handlers only parse requests and render results; the work is in
//! [`crate::procs`] (processes), [`crate::tarx`] (tarballs) and
//! [`crate::session`] (terminals).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use flotilla_api::limits::{DEFAULT_TAR_MAX_BYTES, DEFAULT_TAR_MAX_ENTRIES, HEARTBEAT_INTERVAL};
use flotilla_api::{
    AgentHealth, ApiError, ErrorCode, ExecRequest, Frame, ImportSummary, LsEntry, OutputQuery, ProcessInfo,
    RemoveAllRequest, SessionQuery, SignalRequest, StdinQuery, TcpQuery, WorkspaceQuery,
};
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode, header};
use tokio::sync::mpsc;
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};

use crate::extract::{JsonBody, QueryParams};
use crate::http::{FRAMES_CONTENT_TYPE, HttpError};
use crate::procs::{ChannelSink, Reaper, Registry};
use crate::tarx::{self, Compression, ExtractError, TarLimits};

/// Frames buffered between an exec's pump and its HTTP response: small, so
/// a slow reader pushes back on the process through the pipe.
const EXEC_CHANNEL_FRAMES: usize = 16;

/// Bytes buffered between the tar writer thread and the response.
const EXPORT_PIPE_BYTES: usize = 256 * 1024;

/// Shared state of the agent.
#[derive(Debug)]
pub struct Agent {
    pub workspace: PathBuf,
    pub reaper: Arc<Reaper>,
    pub registry: Registry,
}

type AgentState = State<Arc<Agent>>;
type Result<T> = std::result::Result<T, HttpError>;

impl Agent {
    pub fn new(workspace: PathBuf, init: bool) -> Arc<Agent> {
        Arc::new(Agent { workspace, reaper: Reaper::start(init), registry: Registry::default() })
    }

    fn workspace_str(&self) -> String {
        self.workspace.to_string_lossy().into_owned()
    }
}

/// The agent's routes.
pub fn router(agent: Arc<Agent>) -> Router {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/workspace", put(put_workspace).get(get_workspace))
        .route("/ls", get(ls))
        .route("/removeall", post(removeall))
        .route("/exec", post(exec))
        .route("/processes", get(list_processes))
        .route("/processes/{id}", get(get_process))
        .route("/processes/{id}/output", get(process_output))
        .route("/processes/{id}/signal", post(signal_process))
        .route("/processes/{id}/stdin", post(stdin_process))
        .route("/session", get(session))
        .route("/tcp", get(tcp))
        .route("/halt", post(halt))
        .fallback(|| async { HttpError(ApiError::not_found("no such route")) })
        .with_state(agent);
    crate::extract::layer(router)
}

async fn healthz(State(a): AgentState) -> Json<AgentHealth> {
    Json(AgentHealth {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id() as i32,
        workspace: a.workspace_str(),
        processes: a.registry.running(),
    })
}

fn extract_error(e: ExtractError) -> HttpError {
    let entry = e.entry().map(str::to_string);
    let code = match &e {
        ExtractError::Io { .. } => ErrorCode::Internal,
        ExtractError::Hostile { .. }
        | ExtractError::OverLimit { .. }
        | ExtractError::Format { .. }
        | ExtractError::UnsupportedEncoding(_) => ErrorCode::UnprocessableTar,
    };
    let mut err = ApiError::new(code, crate::http::error_chain(&e));
    if let Some(entry) = entry {
        err = err.with_details(serde_json::json!({ "entry": entry }));
    }
    HttpError(err)
}

/// A refused workspace path (`?dir=`, a removeall path) is a bad argument,
/// not a bad tarball.
fn path_error(e: ExtractError) -> HttpError {
    let mut err = extract_error(e);
    if err.0.code == ErrorCode::UnprocessableTar {
        err.0.code = ErrorCode::InvalidArgument;
    }
    err
}

async fn put_workspace(
    State(a): AgentState,
    QueryParams(q): QueryParams<WorkspaceQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ImportSummary>> {
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
    let compression = Compression::from_content_encoding(encoding).map_err(extract_error)?;
    let dest = tarx::ensure_dir(&a.workspace, q.dir.as_deref()).map_err(extract_error)?;
    let limits = TarLimits {
        max_bytes: q.max_bytes.unwrap_or(DEFAULT_TAR_MAX_BYTES),
        max_entries: q.max_entries.unwrap_or(DEFAULT_TAR_MAX_ENTRIES),
    };
    // Bytes flow from the socket through a bounded bridge into the
    // extractor on a blocking thread: never whole in memory.
    let stream = body.into_data_stream().map(|r| r.map_err(std::io::Error::other));
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let started = Instant::now();
    let summary = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dest)
            .map_err(|source| ExtractError::Io { entry: dest.display().to_string(), source })?;
        tarx::extract(reader, compression, &dest, &limits)
    })
    .await
    .map_err(|e| HttpError(ApiError::internal(format!("import task failed: {e}"))))?
    .map_err(extract_error)?;
    Ok(Json(ImportSummary { duration_ms: started.elapsed().as_millis() as u64, ..summary }))
}

async fn get_workspace(State(a): AgentState, QueryParams(q): QueryParams<WorkspaceQuery>) -> Result<Response> {
    let dir = tarx::resolve_dir(&a.workspace, q.dir.as_deref()).map_err(extract_error)?;
    if !dir.is_dir() {
        return Err(HttpError(ApiError::not_found(format!("{} is not a directory", q.dir.unwrap_or_default()))));
    }
    let (reader, writer) = tokio::io::duplex(EXPORT_PIPE_BYTES);
    tokio::task::spawn_blocking(move || {
        // An error mid-stream truncates the tar; the client's tar reader
        // then fails on the short archive rather than accepting it.
        let _ = tarx::pack(&dir, SyncIoBridge::new(writer));
    });
    Ok(([(header::CONTENT_TYPE, "application/x-tar")], Body::from_stream(ReaderStream::new(reader))).into_response())
}

async fn ls(State(a): AgentState, QueryParams(q): QueryParams<WorkspaceQuery>) -> Result<Json<Vec<LsEntry>>> {
    let dir = tarx::resolve_dir(&a.workspace, q.dir.as_deref()).map_err(path_error)?;
    tokio::task::spawn_blocking(move || tarx::list(&dir))
        .await
        .map_err(|e| HttpError(ApiError::internal(e.to_string())))?
        .map(Json)
        .map_err(|e| {
            let code = if e.kind() == std::io::ErrorKind::NotFound { ErrorCode::NotFound } else { ErrorCode::Internal };
            HttpError(ApiError::new(code, format!("listing {}: {e}", q.dir.unwrap_or_default())))
        })
}

async fn removeall(State(a): AgentState, JsonBody(req): JsonBody<RemoveAllRequest>) -> Result<StatusCode> {
    let root = a.workspace.clone();
    tokio::task::spawn_blocking(move || tarx::remove_all(&root, &req.paths))
        .await
        .map_err(|e| HttpError(ApiError::internal(e.to_string())))?
        .map_err(path_error)?;
    Ok(StatusCode::NO_CONTENT)
}

fn frames_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = tokio_stream_from(rx).map(Ok::<_, std::io::Error>);
    ([(header::CONTENT_TYPE, FRAMES_CONTENT_TYPE)], Body::from_stream(stream)).into_response()
}

fn tokio_stream_from(mut rx: mpsc::Receiver<Bytes>) -> impl futures_util::Stream<Item = Bytes> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn exec(State(a): AgentState, JsonBody(req): JsonBody<ExecRequest>) -> Result<Response> {
    req.validate()?;
    let ws = a.workspace_str();
    if req.detach {
        let d = a.registry.start(&a.reaper, &req, &ws)?;
        return Ok((StatusCode::CREATED, Json(d.info())).into_response());
    }
    let mut sp = crate::procs::spawn(&a.reaper, &req, &ws, false)?;
    crate::procs::feed_stdin(sp.stdin.take(), req.stdin.clone());
    let (tx, rx) = mpsc::channel(EXEC_CHANNEL_FRAMES);
    let timeout = req.timeout_ms.map(Duration::from_millis);
    tokio::spawn(crate::procs::pump(sp, timeout, ChannelSink(tx), true));
    Ok(frames_response(rx))
}

async fn list_processes(State(a): AgentState) -> Json<Vec<ProcessInfo>> {
    Json(a.registry.list())
}

async fn get_process(State(a): AgentState, Path(id): Path<String>) -> Result<Json<ProcessInfo>> {
    Ok(Json(a.registry.get(&id)?.info()))
}

/// Streams a detached process's output from a byte offset (stdout and
/// stderr bytes, so a resume inside a stored frame sends the rest of that
/// frame), then follows new output until it exits. The response header
/// `x-flotilla-output-start` says where the kept output begins, so a
/// client that asked for something older knows what it missed; output
/// dropped while the stream follows ends the stream instead of being
/// skipped, so the client's next request learns of it the same way.
/// With `ack`, every byte before `from` is acknowledged (a `hold`
/// process may forget them); with `limit`, the stream ends once that many
/// bytes were sent, for the client to come back and acknowledge them.
async fn process_output(
    State(a): AgentState,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<OutputQuery>,
) -> Result<Response> {
    let d = a.registry.get(&id)?;
    let follow = q.follow.unwrap_or(true);
    if q.ack {
        d.ack(q.from);
    }
    let start = d.output_start();
    let (tx, rx) = mpsc::channel::<Bytes>(EXEC_CHANNEL_FRAMES);
    tokio::spawn(async move {
        let mut changed = d.subscribe();
        let mut cursor = q.from.max(start);
        let mut sent = 0u64;
        loop {
            changed.borrow_and_update();
            let Some((chunk, next, done)) = d.read_exactly_from(cursor) else { return };
            sent += next - cursor;
            cursor = next;
            if !chunk.is_empty() && tx.send(chunk).await.is_err() {
                return;
            }
            if done || !follow || q.limit.is_some_and(|l| sent >= l) {
                return;
            }
            match tokio::time::timeout(HEARTBEAT_INTERVAL, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    if tx.send(Frame::heartbeat().to_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut resp = frames_response(rx);
    resp.headers_mut().insert("x-flotilla-output-start", start.into());
    // This stream may end cleanly before the exit frame (`follow=false`,
    // `limit`, output dropped under a follower): the node passes such an
    // end on as it is instead of calling the agent broken.
    resp.headers_mut().insert(flotilla_api::limits::STREAM_MAY_END_HEADER, "true".parse().expect("valid"));
    Ok(resp)
}

async fn signal_process(
    State(a): AgentState,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<SignalRequest>,
) -> Result<StatusCode> {
    let sig = flotilla_sandbox::sys::signal_from_str(&req.signal)
        .ok_or_else(|| ApiError::invalid(format!("unknown signal {:?}", req.signal)))?;
    a.registry.get(&id)?.signal(sig)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stdin_process(
    State(a): AgentState,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<StdinQuery>,
    body: Bytes,
) -> Result<StatusCode> {
    a.registry.get(&id)?.write_stdin(&body, q.close).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn session(State(a): AgentState, QueryParams(q): QueryParams<SessionQuery>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| crate::session::run(a, q, socket))
}

/// `GET /tcp?port=N` with `Upgrade: tcp`: connects to port N on the
/// sandbox's loopback (IPv4, then IPv6) and, once upgraded, copies bytes
/// both ways until either side closes. Nothing listening is a 503 before
/// the upgrade, so the caller can tell "app not up" from a dropped link.
/// The node forwards an app's ports through this, on every backend.
async fn tcp(QueryParams(q): QueryParams<TcpQuery>, mut req: axum::extract::Request) -> Result<Response> {
    let upstream = match tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, q.port)).await {
        Ok(s) => s,
        Err(e4) => tokio::net::TcpStream::connect((std::net::Ipv6Addr::LOCALHOST, q.port)).await.map_err(|_| {
            ApiError::new(ErrorCode::NotReady, format!("nothing listens on port {} in the sandbox: {e4}", q.port))
        })?,
    };
    let _ = upstream.set_nodelay(true);
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = upgrade.await {
            let mut up = hyper_util::rt::TokioIo::new(up);
            let mut upstream = upstream;
            let _ = tokio::io::copy_bidirectional(&mut up, &mut upstream).await;
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "tcp")
        .body(Body::empty())
        .expect("valid response"))
}

/// What `POST /halt` does after answering: exit (the default, right for
/// a process sandbox, whose init we are), or what the host of the agent
/// set here (a microVM's init syncs its disks and powers off).
static HALT: std::sync::OnceLock<fn() -> !> = std::sync::OnceLock::new();

/// Replaces the default halt (exit 0). Only the first call counts.
pub fn set_halt(f: fn() -> !) {
    let _ = HALT.set(f);
}

async fn halt(State(a): AgentState) -> StatusCode {
    tracing::info!(workspace = %a.workspace.display(), "halt requested");
    tokio::spawn(async {
        // Let the response go out first.
        tokio::time::sleep(Duration::from_millis(20)).await;
        match HALT.get() {
            Some(f) => f(),
            None => std::process::exit(0),
        }
    });
    StatusCode::ACCEPTED
}
