//! The node's HTTP API (DESIGN §4, "Node").
//!
//! Handlers parse a request, call the [`Node`] core and render the result;
//! they hold no logic of their own. Sandbox-scoped agent routes (exec,
//! processes, ls, session) are proxied to the sandbox's agent byte for byte,
//! so streams stay streams and the agent's errors reach the client as the
//! agent wrote them.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use flotilla_agent::AgentClient;
use flotilla_agent::extract::{JsonBody, QueryParams};
use flotilla_agent::http::{FRAMES_CONTENT_TYPE, HttpError};
use flotilla_api::{
    ApiError, CreateSandboxRequest, NodeInfo, Operation, OperationQuery, Page, PageQuery, Sandbox,
    UpdateSandboxRequest, WorkspaceQuery,
};
use http::{StatusCode, header};
use hyper_util::rt::TokioIo;

use utoipa::openapi::path::HttpMethod;

use crate::node::{Backend, Node};
use crate::openapi::{self, Body as DocBody, DIR, Out, PAGE, QType, Route};

type Result<T> = std::result::Result<T, HttpError>;

/// The node's routes, built from [`table`].
pub fn router<B: Backend>(node: Arc<Node<B>>) -> Router {
    let mut router = Router::new();
    for (route, handler) in table::<B>() {
        router = router.route(route.path, handler);
    }
    let router = router.fallback(|| async { HttpError(ApiError::not_found("no such route")) }).with_state(node);
    flotilla_agent::extract::layer(router)
}

type Entry<B> = (Route, MethodRouter<Arc<Node<B>>>);

/// One route: its description and its handler, for `method` only.
fn entry<B: Backend, H, T>(
    (method, path, summary): (HttpMethod, &'static str, &'static str),
    body: DocBody,
    query: openapi::Query,
    ok: (u16, Out),
    handler: H,
) -> Entry<B>
where
    H: axum::handler::Handler<T, Arc<Node<B>>>,
    T: 'static,
{
    let filter = match method {
        HttpMethod::Get => MethodFilter::GET,
        HttpMethod::Post => MethodFilter::POST,
        HttpMethod::Put => MethodFilter::PUT,
        HttpMethod::Patch => MethodFilter::PATCH,
        HttpMethod::Delete => MethodFilter::DELETE,
        HttpMethod::Head => MethodFilter::HEAD,
        HttpMethod::Options => MethodFilter::OPTIONS,
        HttpMethod::Trace => MethodFilter::TRACE,
    };
    (Route { method, path, summary, body, query, ok }, axum::routing::on(filter, handler))
}

/// Every route of the node API with its description: the router and the
/// OpenAPI document are both made from this, so neither can drift.
fn table<B: Backend>() -> Vec<Entry<B>> {
    use DocBody::{Bytes as Raw, Json as J, None as N, Tar};
    use HttpMethod::{Delete, Get, Patch, Post, Put};
    use Out::{Empty, List, Page as P, Stream, Text, Upgrade};
    const FRAMES: &str = FRAMES_CONTENT_TYPE;
    let op = |name| (202, Out::Json(name));
    let ok = |name| (200, Out::Json(name));
    vec![
        entry((Get, "/healthz", "Liveness"), N, &[], (200, Text("text/plain")), || async { "ok\n" }),
        entry((Get, "/metrics", "Prometheus metrics"), N, &[], (200, Text("text/plain")), metrics::<B>),
        entry((Get, "/openapi.json", "This document"), N, &[], (200, Text("application/json")), openapi_json::<B>),
        entry((Get, "/v1/node", "Describe the node"), N, &[], ok("NodeInfo"), node_info::<B>),
        entry((Get, "/v1/node/pools", "List warm pools of microVMs"), N, PAGE, (200, P("VmPool")), list_pools::<B>),
        entry(
            (Put, "/v1/node/pools", "Set a warm pool of microVMs (size 0 removes it)"),
            J("VmPoolRequest"),
            &[],
            (200, P("VmPool")),
            set_pool::<B>,
        ),
        entry((Get, "/v1/sandboxes", "List sandboxes"), N, PAGE, (200, P("Sandbox")), list::<B>),
        entry(
            (Post, "/v1/sandboxes", "Create a sandbox (an operation)"),
            J("CreateSandboxRequest"),
            &[],
            op("Operation"),
            create::<B>,
        ),
        entry((Get, "/v1/sandboxes/{id}", "Show a sandbox"), N, &[], ok("Sandbox"), show::<B>),
        entry(
            (Patch, "/v1/sandboxes/{id}", "Change labels, deadlines or limits"),
            J("UpdateSandboxRequest"),
            &[],
            ok("Sandbox"),
            update::<B>,
        ),
        entry((Delete, "/v1/sandboxes/{id}", "Delete a sandbox"), N, &[], (204, Empty), delete::<B>),
        entry(
            (Post, "/v1/sandboxes/{id}/start", "Start a sandbox (an operation)"),
            N,
            &[],
            op("Operation"),
            start::<B>,
        ),
        entry((Post, "/v1/sandboxes/{id}/stop", "Stop a sandbox"), N, &[], ok("Sandbox"), stop::<B>),
        entry(
            (Post, "/v1/sandboxes/{id}/restart", "Restart a sandbox (an operation)"),
            N,
            &[],
            op("Operation"),
            restart::<B>,
        ),
        entry(
            (Put, "/v1/sandboxes/{id}/workspace", "Stream a tar into the workspace"),
            Tar,
            DIR,
            ok("ImportSummary"),
            import::<B>,
        ),
        entry(
            (Get, "/v1/sandboxes/{id}/workspace", "Stream the workspace out as a tar"),
            N,
            DIR,
            (200, Stream("application/x-tar")),
            export::<B>,
        ),
        entry(
            (Post, "/v1/sandboxes/{id}/workspace/git", "Export a git revision into the workspace (an operation)"),
            J("GitImportRequest"),
            &[],
            op("Operation"),
            git_import::<B>,
        ),
        // The sandbox's agent serves these; the node proxies them.
        entry((Get, "/v1/sandboxes/{id}/ls", "List a workspace directory"), N, DIR, (200, List("LsEntry")), proxy::<B>),
        entry(
            (Post, "/v1/sandboxes/{id}/removeall", "Remove workspace paths"),
            J("RemoveAllRequest"),
            &[],
            (204, Empty),
            proxy::<B>,
        ),
        entry(
            (Post, "/v1/sandboxes/{id}/exec", "Run a command: frames stream back, the last an exit or an error frame"),
            J("ExecRequest"),
            &[],
            (200, Stream(FRAMES)),
            proxy::<B>,
        ),
        entry(
            (Get, "/v1/sandboxes/{id}/processes", "Detached processes"),
            N,
            &[],
            (200, List("ProcessInfo")),
            proxy::<B>,
        ),
        entry(
            (Get, "/v1/sandboxes/{id}/processes/{p}", "Show a detached process"),
            N,
            &[],
            ok("ProcessInfo"),
            proxy::<B>,
        ),
        entry(
            (
                Get,
                "/v1/sandboxes/{id}/processes/{p}/output",
                "A detached process's output as frames, from a byte offset",
            ),
            N,
            &[
                ("from", QType::Int, "Output byte offset (stdout and stderr bytes) to resume from"),
                ("follow", QType::Bool, "Keep the stream open until the process exits (default true)"),
                (
                    "ack",
                    QType::Bool,
                    "Every byte before `from` is stored: a process started with `hold` may forget them",
                ),
                ("limit", QType::Int, "End the stream once this many output bytes were sent"),
            ],
            (200, Stream(FRAMES)),
            proxy::<B>,
        ),
        entry(
            (Post, "/v1/sandboxes/{id}/processes/{p}/signal", "Signal a detached process"),
            J("SignalRequest"),
            &[],
            (204, Empty),
            proxy::<B>,
        ),
        entry(
            (Post, "/v1/sandboxes/{id}/processes/{p}/stdin", "Write the body to a detached process's stdin"),
            Raw,
            &[("close", QType::Bool, "Close stdin after writing")],
            (204, Empty),
            proxy::<B>,
        ),
        entry(
            (Get, "/v1/sandboxes/{id}/session", "A terminal over WebSocket, one frame per message"),
            N,
            &[
                ("cmd", QType::Str, "Command to run (default: a login shell)"),
                ("cols", QType::Int, "Terminal width"),
                ("rows", QType::Int, "Terminal height"),
                ("term", QType::Str, "TERM"),
            ],
            (101, Upgrade),
            proxy::<B>,
        ),
        entry(
            (Post, "/v1/sandboxes/{id}/halt", "Halt the sandbox's agent (what stop does first for a microVM)"),
            N,
            &[],
            (202, Empty),
            proxy::<B>,
        ),
        entry(
            (Get, "/v1/operations", "Operations kept (24 hours), newest first"),
            N,
            PAGE,
            (200, P("Operation")),
            list_operations::<B>,
        ),
        entry(
            (Get, "/v1/operations/{id}", "Show an operation, optionally waiting for it"),
            N,
            &[("wait", QType::Str, "Wait up to this long (e.g. 30s, at most 10m) for it to finish")],
            ok("Operation"),
            operation::<B>,
        ),
        entry(
            (Get, "/v1/events", "Server-sent events; resume with Last-Event-ID"),
            N,
            &[("after", QType::Int, "Replay events after this id")],
            (200, Stream("text/event-stream")),
            events::<B>,
        ),
        entry((Get, "/v1/images", "List images"), N, PAGE, (200, P("Image")), list_images::<B>),
        entry(
            (Post, "/v1/images", "Import an image from a path on the node (an operation)"),
            J("ImportImageRequest"),
            &[],
            op("Operation"),
            import_image::<B>,
        ),
        entry(
            (Post, "/v1/images/pull", "Pull an image from an OCI registry (an operation)"),
            J("PullImageRequest"),
            &[],
            op("Operation"),
            pull_image::<B>,
        ),
        entry((Get, "/v1/images/{reference}", "Show an image"), N, &[], ok("Image"), show_image::<B>),
        entry((Delete, "/v1/images/{reference}", "Delete an image tag"), N, &[], (204, Empty), delete_image::<B>),
        entry(
            (Post, "/v1/images/{reference}/promote", "Point another tag at this image's version"),
            J("PromoteImageRequest"),
            &[],
            ok("Image"),
            promote_image::<B>,
        ),
        entry(
            (Get, "/v1/apps", "List app installations with their instances"),
            N,
            PAGE,
            (200, P("AppInstallation")),
            list_apps::<B>,
        ),
        entry(
            (Post, "/v1/apps", "Install an envelope: a new installation at version v1"),
            J("InstallRequest"),
            &[],
            (201, Out::Json("AppInstallation")),
            install_app::<B>,
        ),
        entry((Get, "/v1/apps/{app}/{inst}", "Show an installation"), N, &[], ok("AppInstallation"), show_app::<B>),
        entry(
            (Post, "/v1/apps/{app}/{inst}/start", "Start a new instance on the current version"),
            N,
            &[],
            (201, Out::Json("AppInstance")),
            start_app::<B>,
        ),
        entry(
            (Post, "/v1/apps/{app}/{inst}/update", "Install a new version (same title) and move instances onto it"),
            J("InstallRequest"),
            &[],
            ok("AppInstallation"),
            update_app::<B>,
        ),
        entry(
            (Post, "/v1/apps/{app}/{inst}/revert", "Swap current and previous versions and move instances"),
            N,
            &[],
            ok("AppInstallation"),
            revert_app::<B>,
        ),
        entry(
            (Post, "/v1/apps/{app}/{inst}/uninstall", "Stop and delete every instance; mark uninstalled"),
            N,
            &[],
            ok("AppInstallation"),
            uninstall_app::<B>,
        ),
        entry(
            (Get, "/v1/apps/{app}/{inst}/{instance}", "Show an instance"),
            N,
            &[],
            ok("AppInstance"),
            show_instance::<B>,
        ),
        entry(
            (Post, "/v1/apps/{app}/{inst}/{instance}/stop", "Stop an instance (SIGTERM, then SIGKILL)"),
            N,
            &[],
            ok("AppInstance"),
            instance_op::<B, 0>,
        ),
        entry(
            (Post, "/v1/apps/{app}/{inst}/{instance}/suspend", "Suspend a serving instance where it is"),
            N,
            &[],
            ok("AppInstance"),
            instance_op::<B, 1>,
        ),
        entry(
            (Post, "/v1/apps/{app}/{inst}/{instance}/resume", "Resume a suspended instance"),
            N,
            &[],
            ok("AppInstance"),
            instance_op::<B, 2>,
        ),
        entry(
            (Post, "/v1/apps/{app}/{inst}/{instance}/restart", "Restart an instance on the current version"),
            N,
            &[],
            ok("AppInstance"),
            instance_op::<B, 3>,
        ),
        entry(
            (
                Get,
                "/v1/apps/{app}/{inst}/{instance}/logs",
                "An instance's log: timestamped lines, one run or following",
            ),
            N,
            &[
                ("follow", QType::Bool, "Keep streaming across restarts until the instance stops"),
                ("previous", QType::Bool, "The run before the current one"),
            ],
            (200, Stream("text/plain")),
            instance_logs::<B>,
        ),
        entry(
            (
                Post,
                "/v1/node/update",
                "Replace the node's binary: stage, test, switch, hand over (sandboxes keep running)",
            ),
            J("NodeUpdateRequest"),
            &[],
            ok("NodeUpdate"),
            update_node::<B>,
        ),
        entry(
            (Get, "/v1/node/update", "The hand-over under way, and how the last one ended"),
            N,
            &[],
            ok("NodeUpdateStatus"),
            update_status,
        ),
        entry(
            (Post, "/v1/node/revert", "Go back to the previous binary, handing over the same way"),
            N,
            &[],
            ok("NodeUpdate"),
            revert_node::<B>,
        ),
    ]
}

// ---------------------------------------------------------------- apps

async fn list_apps<B: Backend>(
    State(n): NodeState<B>,
    QueryParams(q): QueryParams<PageQuery>,
) -> Json<Page<flotilla_api::app::AppInstallation>> {
    Json(paginate(n.apps().list(), &q, |a| a.address.clone()))
}

async fn install_app<B: Backend>(
    State(n): NodeState<B>,
    JsonBody(req): JsonBody<flotilla_api::app::InstallRequest>,
) -> Result<Response> {
    Ok((StatusCode::CREATED, Json(n.apps().install(req).await?)).into_response())
}

async fn show_app<B: Backend>(
    State(n): NodeState<B>,
    Path((app, inst)): Path<(String, String)>,
) -> Result<Json<flotilla_api::app::AppInstallation>> {
    Ok(Json(n.apps().installation(&crate::apps::inst_key(&app, &inst))?))
}

async fn start_app<B: Backend>(State(n): NodeState<B>, Path((app, inst)): Path<(String, String)>) -> Result<Response> {
    Ok((StatusCode::CREATED, Json(n.apps().start(&crate::apps::inst_key(&app, &inst)).await?)).into_response())
}

async fn update_app<B: Backend>(
    State(n): NodeState<B>,
    Path((app, inst)): Path<(String, String)>,
    JsonBody(req): JsonBody<flotilla_api::app::InstallRequest>,
) -> Result<Json<flotilla_api::app::AppInstallation>> {
    Ok(Json(n.apps().update(&crate::apps::inst_key(&app, &inst), req).await?))
}

async fn revert_app<B: Backend>(
    State(n): NodeState<B>,
    Path((app, inst)): Path<(String, String)>,
) -> Result<Json<flotilla_api::app::AppInstallation>> {
    Ok(Json(n.apps().revert(&crate::apps::inst_key(&app, &inst)).await?))
}

async fn uninstall_app<B: Backend>(
    State(n): NodeState<B>,
    Path((app, inst)): Path<(String, String)>,
) -> Result<Json<flotilla_api::app::AppInstallation>> {
    Ok(Json(n.apps().uninstall(&crate::apps::inst_key(&app, &inst)).await?))
}

async fn show_instance<B: Backend>(
    State(n): NodeState<B>,
    Path((app, inst, instance)): Path<(String, String, String)>,
) -> Result<Json<flotilla_api::app::AppInstance>> {
    Ok(Json(n.apps().get_instance(&crate::apps::inst_key(&app, &inst).instance(&instance))?))
}

/// Stop (0), suspend (1), resume (2) or restart (3) an instance.
async fn instance_op<B: Backend, const OP: u8>(
    State(n): NodeState<B>,
    Path((app, inst, instance)): Path<(String, String, String)>,
) -> Result<Json<flotilla_api::app::AppInstance>> {
    let k = crate::apps::inst_key(&app, &inst).instance(&instance);
    let apps = n.apps();
    let done = match OP {
        0 => apps.stop(&k).await,
        1 => apps.suspend(&k).await,
        2 => apps.resume(&k).await,
        _ => apps.restart(&k).await,
    };
    Ok(Json(done?))
}

async fn instance_logs<B: Backend>(
    State(n): NodeState<B>,
    Path((app, inst, instance)): Path<(String, String, String)>,
    QueryParams(q): QueryParams<flotilla_api::app::AppLogsQuery>,
) -> Result<Response> {
    let k = crate::apps::inst_key(&app, &inst).instance(&instance);
    let mut rx = n.apps().logs(&k, &q)?;
    let stream = futures_util::StreamExt::map(
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)),
        Ok::<_, std::convert::Infallible>,
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(stream)).into_response())
}

async fn openapi_json<B: Backend>() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi::document(table::<B>().iter().map(|(route, _)| route)))
}

/// The document of the real router, for unit tests (any backend will do:
/// the table does not depend on it).
#[cfg(test)]
pub(crate) fn document_for_tests() -> utoipa::openapi::OpenApi {
    openapi::document(table::<crate::backend::ProcessNodeBackend>().iter().map(|(route, _)| route))
}

type NodeState<B> = State<Arc<Node<B>>>;

async fn node_info<B: Backend>(State(n): NodeState<B>) -> Json<NodeInfo> {
    Json(n.info())
}

async fn create<B: Backend>(State(n): NodeState<B>, JsonBody(req): JsonBody<CreateSandboxRequest>) -> Result<Response> {
    Ok(accepted(n.create_operation(req).await?))
}

async fn list_pools<B: Backend>(
    State(n): NodeState<B>,
    QueryParams(q): QueryParams<PageQuery>,
) -> Json<Page<flotilla_api::VmPool>> {
    Json(paginate(n.pools(), &q, pool_key))
}

async fn set_pool<B: Backend>(
    State(n): NodeState<B>,
    JsonBody(req): JsonBody<flotilla_api::VmPoolRequest>,
) -> Result<Json<Page<flotilla_api::VmPool>>> {
    Ok(Json(paginate(n.set_pool(req)?, &PageQuery::default(), pool_key)))
}

fn pool_key(p: &flotilla_api::VmPool) -> String {
    format!("{}/{}/{}/{}", p.image, p.memory_bytes, p.vcpus, p.disk_bytes)
}

async fn list_images<B: Backend>(
    State(n): NodeState<B>,
    QueryParams(q): QueryParams<PageQuery>,
) -> Result<Json<Page<flotilla_api::Image>>> {
    Ok(Json(paginate(n.images()?, &q, |i| i.reference.clone())))
}

async fn import_image<B: Backend>(
    State(n): NodeState<B>,
    JsonBody(req): JsonBody<flotilla_api::ImportImageRequest>,
) -> Result<Response> {
    Ok(accepted(n.import_image_operation(req)?))
}

async fn pull_image<B: Backend>(
    State(n): NodeState<B>,
    JsonBody(req): JsonBody<flotilla_api::PullImageRequest>,
) -> Result<Response> {
    Ok(accepted(n.pull_image_operation(req)?))
}

async fn show_image<B: Backend>(
    State(n): NodeState<B>,
    Path(reference): Path<String>,
) -> Result<Json<flotilla_api::Image>> {
    Ok(Json(n.image(&reference)?))
}

async fn delete_image<B: Backend>(State(n): NodeState<B>, Path(reference): Path<String>) -> Result<StatusCode> {
    n.delete_image(&reference).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn promote_image<B: Backend>(
    State(n): NodeState<B>,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<flotilla_api::PromoteImageRequest>,
) -> Result<Json<flotilla_api::Image>> {
    Ok(Json(n.promote_image(&reference, &req.to).await?))
}

/// `202 Accepted` with the operation and where to wait for it.
fn accepted(op: Operation) -> Response {
    let location = format!("/v1/operations/{}", op.id);
    (StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(op)).into_response()
}

async fn operation<B: Backend>(
    State(n): NodeState<B>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<OperationQuery>,
) -> Result<Json<Operation>> {
    let op = match q.wait.as_deref() {
        None => n.operations().get(&id)?,
        Some(w) => {
            let d = flotilla_api::units::parse_duration(w)
                .map_err(|e| HttpError(ApiError::invalid(format!("bad wait {w:?}: {e}"))))?;
            n.operations().wait(&id, d).await?
        }
    };
    Ok(Json(op))
}

async fn list_operations<B: Backend>(
    State(n): NodeState<B>,
    QueryParams(q): QueryParams<PageQuery>,
) -> Json<Page<Operation>> {
    let all = n.operations().list();
    Json(paginate(all, &q, |o| o.id.clone()))
}

/// Pages a list that is already in order; the token is the last key seen.
fn paginate<T>(items: Vec<T>, q: &PageQuery, key: impl Fn(&T) -> String) -> Page<T> {
    let limit =
        q.limit.unwrap_or(flotilla_api::limits::DEFAULT_PAGE_SIZE).clamp(1, flotilla_api::limits::MAX_PAGE_SIZE);
    let start = match &q.page_token {
        Some(t) => items.iter().position(|i| &key(i) == t).map(|p| p + 1).unwrap_or(items.len()),
        None => 0,
    };
    let mut page: Vec<T> = items.into_iter().skip(start).take(limit + 1).collect();
    let next_page_token = (page.len() > limit).then(|| {
        page.truncate(limit);
        page.last().map(&key).unwrap_or_default()
    });
    Page { items: page, next_page_token }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Resume after this event id (like the `Last-Event-ID` header).
    after: Option<u64>,
}

/// Server-sent events: every state change and operation step. Resumes
/// after `Last-Event-ID` (or `?after=`).
async fn events<B: Backend>(
    State(n): NodeState<B>,
    QueryParams(q): QueryParams<EventsQuery>,
    req: Request,
) -> Response {
    let last = req.headers().get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    sse(n.events().subscribe(q.after.or(last)))
}

/// An event subscription as server-sent events: the replay, then the live
/// feed; a client that falls behind gets a `reset` event. (The coordinator
/// serves its own feed through this too.)
pub fn sse(sub: crate::events::Subscription) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let to_sse = |e: &flotilla_api::NodeEvent| -> std::result::Result<Event, std::convert::Infallible> {
        Ok(Event::default()
            .id(e.id.to_string())
            .event(e.body.name())
            .data(serde_json::to_string(e).unwrap_or_default()))
    };
    let replay = futures_util::stream::iter(sub.replay.into_iter().map(move |e| to_sse(&e)));
    let live = futures_util::stream::unfold(sub.live, move |mut rx| async move {
        match rx.recv().await {
            Ok(e) => Some((to_sse(&e), rx)),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                let reset = flotilla_api::NodeEvent {
                    id: 0,
                    at: flotilla_api::Timestamp::now(),
                    body: flotilla_api::EventBody::Reset {
                        reason: format!("this client fell {missed} events behind; re-list"),
                    },
                };
                Some((to_sse(&reset), rx))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    });
    Sse::new(futures_util::StreamExt::chain(replay, live)).keep_alive(KeepAlive::default()).into_response()
}

async fn metrics<B: Backend>(State(n): NodeState<B>) -> Response {
    let gauges: Vec<_> = n
        .state_counts()
        .into_iter()
        .map(|(state, count)| ("flotilla_sandboxes", vec![("state".to_string(), state)], count as f64))
        .collect();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], n.metrics().render(&gauges)).into_response()
}

async fn list<B: Backend>(State(n): NodeState<B>, QueryParams(q): QueryParams<PageQuery>) -> Json<Page<Sandbox>> {
    Json(n.list(&q))
}

async fn show<B: Backend>(State(n): NodeState<B>, Path(id): Path<String>) -> Result<Json<Sandbox>> {
    Ok(Json(n.get(&id)?))
}

async fn update<B: Backend>(
    State(n): NodeState<B>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<UpdateSandboxRequest>,
) -> Result<Json<Sandbox>> {
    Ok(Json(n.update(&id, req).await?))
}

async fn delete<B: Backend>(State(n): NodeState<B>, Path(id): Path<String>) -> Result<StatusCode> {
    n.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start<B: Backend>(State(n): NodeState<B>, Path(id): Path<String>) -> Result<Response> {
    Ok(accepted(n.start_operation(&id).await?))
}

async fn stop<B: Backend>(State(n): NodeState<B>, Path(id): Path<String>) -> Result<Json<Sandbox>> {
    Ok(Json(n.stop(&id).await?))
}

async fn restart<B: Backend>(State(n): NodeState<B>, Path(id): Path<String>) -> Result<Response> {
    Ok(accepted(n.restart_operation(&id).await?))
}

async fn import<B: Backend>(
    State(n): NodeState<B>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<WorkspaceQuery>,
    req: Request,
) -> Result<Json<flotilla_api::ImportSummary>> {
    let encoding = req.headers().get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).map(str::to_string);
    Ok(Json(n.import(&id, req.into_body(), encoding, q.dir).await?))
}

async fn git_import<B: Backend>(
    State(n): NodeState<B>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<flotilla_api::GitImportRequest>,
) -> Result<Response> {
    Ok(accepted(n.git_import_operation(&id, req).await?))
}

async fn export<B: Backend>(
    State(n): NodeState<B>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<WorkspaceQuery>,
) -> Result<Response> {
    let exported = n.export(&id, q.dir).await?;
    // The workspace lock travels with the body and is released when the
    // last byte has gone (or the client hangs up).
    let lock = exported.lock;
    let stream = exported.body.into_data_stream();
    let guarded = futures_util::StreamExt::map(stream, move |chunk| {
        let _held = &lock;
        chunk
    });
    Ok(([(header::CONTENT_TYPE, "application/x-tar")], Body::from_stream(guarded)).into_response())
}

/// Forwards a sandbox-scoped request to the agent: same method, the path
/// after `/v1/sandboxes/{id}`, same query and body; the response (stream or
/// WebSocket upgrade) comes back untouched.
async fn proxy<B: Backend>(State(n): NodeState<B>, mut req: Request) -> Result<Response> {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/v1/sandboxes/").unwrap_or("");
    let (id, suffix) = rest.split_once('/').unwrap_or((rest, ""));
    let agent: AgentClient = n.agent(id).await?;
    let boot = boot_of(&n, id);
    let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let mut fwd = agent.http().request(req.method().clone(), &format!("/{suffix}{query}"));
    for h in [
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::CONNECTION,
        header::UPGRADE,
        header::SEC_WEBSOCKET_KEY,
        header::SEC_WEBSOCKET_VERSION,
        header::SEC_WEBSOCKET_PROTOCOL,
    ] {
        if let Some(v) = req.headers().get(&h) {
            fwd = fwd.header(h, v.clone());
        }
    }
    let upgrading = req.headers().contains_key(header::UPGRADE);
    let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let body = if upgrading { Body::empty() } else { req.into_body() };
    let resp = match agent.http().send(fwd.body(body).expect("valid forwarded request")).await {
        Ok(resp) => resp,
        // A stop or delete that raced this request took the agent away:
        // say so, rather than that the agent is broken.
        Err(_) if stopped_meanwhile(&n, id, boot).await => {
            return Err(HttpError(stopped_error(id, "the request ran")));
        }
        Err(e) => return Err(HttpError(e.to_api())),
    };
    if let Some(client_upgrade) = client_upgrade
        && resp.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let mut out = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
        for (k, v) in resp.headers() {
            out = out.header(k, v);
        }
        let agent_upgrade = hyper::upgrade::on(resp);
        tokio::spawn(async move {
            if let (Ok(c), Ok(a)) = (client_upgrade.await, agent_upgrade.await) {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(a)).await;
            }
        });
        return Ok(out.body(Body::empty()).expect("valid response"));
    }
    let (parts, body) = resp.into_parts();
    let frames = parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v == FRAMES_CONTENT_TYPE);
    if frames {
        let may_end = parts.headers.contains_key(flotilla_api::limits::STREAM_MAY_END_HEADER);
        return Ok(Response::from_parts(parts, ended_frames(n, id.to_string(), boot, body, may_end)));
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Which boot of sandbox `id` is running: when its latest boot began.
fn boot_of<B: Backend>(n: &Node<B>, id: &str) -> Option<flotilla_api::Timestamp> {
    n.get(id).ok().and_then(|s| s.steps.first().map(|st| st.at))
}

/// Whether sandbox `id` stopped, went away or was restarted (a boot other
/// than `boot`) while a request to its agent was in flight. A stop kills
/// the sandbox first and records the state after: the record gets a moment
/// before the answer is no.
async fn stopped_meanwhile<B: Backend>(n: &Node<B>, id: &str, boot: Option<flotilla_api::Timestamp>) -> bool {
    let stopped = || match n.get(id) {
        Ok(s) => s.state != flotilla_api::SandboxState::Running || s.steps.first().map(|st| st.at) != boot,
        Err(_) => true,
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while !stopped() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stopped()
}

fn stopped_error(id: &str, during: &str) -> ApiError {
    ApiError::new(flotilla_api::ErrorCode::SandboxStopped, format!("sandbox {id} stopped while {during}"))
}

/// Passes a frame stream (exec, process output) through, and makes sure it
/// ends with an exit or an error frame: if the agent's stream breaks or
/// ends without one (the sandbox was stopped, the agent died), the node
/// adds an error frame that says why, `sandbox_stopped` or
/// `agent_unreachable`, so a client never sees a stream just stop. A
/// stream the agent marked as one that `may_end` early (a bounded read of
/// a process's output) passes a clean end on untouched.
fn ended_frames<B: Backend>(
    n: Arc<Node<B>>,
    id: String,
    boot: Option<flotilla_api::Timestamp>,
    mut body: hyper::body::Incoming,
    may_end: bool,
) -> Body {
    use http_body_util::BodyExt;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<bytes::Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let mut decoder = flotilla_api::FrameDecoder::new();
        let mut ended = false;
        let broke = loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    decoder.push(&data);
                    while let Ok(Some(f)) = decoder.next_frame() {
                        ended |= matches!(f.kind, flotilla_api::FrameKind::Exit | flotilla_api::FrameKind::Error);
                    }
                    if tx.send(Ok(data)).await.is_err() {
                        return; // the client went away
                    }
                }
                Some(Err(e)) => break Some(e.to_string()),
                None => break None,
            }
        };
        if ended || (may_end && broke.is_none()) {
            return;
        }
        let err = if stopped_meanwhile(&n, &id, boot).await {
            stopped_error(&id, "the command ran")
        } else {
            let why = broke.map(|e| format!(": {e}")).unwrap_or_default();
            ApiError::new(
                flotilla_api::ErrorCode::AgentUnreachable,
                format!("the agent of sandbox {id} ended the stream without an exit status{why}"),
            )
        };
        let _ = tx.send(Ok(flotilla_api::Frame::error(&err).to_bytes())).await;
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) }))
}

/// The node's self-update, which `flotilla node` attaches to the router as
/// an extension; a router built without it cannot update.
type UpdaterExt = Option<axum::Extension<Arc<crate::selfupdate::Updater>>>;

fn updater(ext: UpdaterExt) -> Result<Arc<crate::selfupdate::Updater>> {
    ext.map(|axum::Extension(u)| u).ok_or_else(|| HttpError(crate::selfupdate::UpdateError::Unsupported.to_api()))
}

async fn update_node<B: Backend>(
    State(n): NodeState<B>,
    ext: UpdaterExt,
    JsonBody(req): JsonBody<flotilla_api::NodeUpdateRequest>,
) -> Result<Json<flotilla_api::NodeUpdate>> {
    req.validate()?;
    let u = updater(ext)?;
    let snapshot = crate::selfupdate::Snapshot::of(&n);
    Ok(Json(u.update(&req, snapshot).await.map_err(|e| HttpError(e.to_api()))?))
}

async fn revert_node<B: Backend>(State(n): NodeState<B>, ext: UpdaterExt) -> Result<Json<flotilla_api::NodeUpdate>> {
    let u = updater(ext)?;
    let snapshot = crate::selfupdate::Snapshot::of(&n);
    Ok(Json(u.revert(snapshot).await.map_err(|e| HttpError(e.to_api()))?))
}

async fn update_status(ext: UpdaterExt) -> Result<Json<flotilla_api::NodeUpdateStatus>> {
    let u = updater(ext)?;
    let layout = u.layout();
    let pending = layout.read_pending().map_err(|e| HttpError(e.to_api()))?.map(|p| p.id);
    let last = layout.read_last().map_err(|e| HttpError(e.to_api()))?;
    Ok(Json(flotilla_api::NodeUpdateStatus { pending, last }))
}
