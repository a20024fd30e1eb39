//! The name table's HTTP API (DESIGN §4, "Name table").
//!
//! Handlers only parse: a request becomes a checked [`Name`] or [`Pattern`]
//! and one [`Store`] call, and the result or [`StoreError`] is rendered
//! back (through [`StoreError::to_api`], the one error mapping). The store
//! never sees HTTP, so `flotilla dev` and tests can use it directly.
//!
//! Routes: `PUT /v1/mounts`, `DELETE /v1/mounts`, `GET /v1/resolve/{name}`,
//! `GET /v1/glob/{pattern}` (paginated by name), `GET /healthz` (503 while
//! the store is unreachable), `GET /metrics` (Prometheus text) and
//! `GET /openapi.json`. Names in paths may contain `/`; the routes take the
//! rest of the path.
//!
//! Reads (`GET`, `HEAD`) are open. Every other request, the mounts and
//! unmounts and whatever write comes later, must carry the table's bearer
//! token ([`WriteAuth`]); without it the answer is a 401 `unauthorized`
//! envelope and nothing reaches the store. The check is one layer over the
//! whole router, so a new write route cannot be forgotten.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use flotilla_agent::extract::JsonBody;
use flotilla_agent::http::HttpError;
use flotilla_api::limits::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use flotilla_api::names::{
    GlobPage, MountEntry, MountRequest, MountResponse, MountedServer, Resolution, UnmountRequest, UnmountResponse,
};
use flotilla_api::{ApiError, PageQuery};
use http::{HeaderValue, StatusCode, header};
use tokio::net::TcpListener;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::auth::WriteAuth;
use crate::client::NamesClient;

use crate::name::{Name, Pattern, check_ttl};
use crate::store::{Store, StoreError};

type Result<T> = std::result::Result<T, HttpError>;

/// The operations counted in `/metrics`.
#[derive(Debug, Clone, Copy)]
enum Op {
    Mount,
    Unmount,
    Resolve,
    Glob,
}

impl Op {
    const ALL: [Op; 4] = [Op::Mount, Op::Unmount, Op::Resolve, Op::Glob];

    fn label(self) -> &'static str {
        match self {
            Op::Mount => "mount",
            Op::Unmount => "unmount",
            Op::Resolve => "resolve",
            Op::Glob => "glob",
        }
    }
}

/// Outcome classes of a request: `ok`, a 4xx the caller caused, a 5xx.
const OUTCOMES: [&str; 3] = ["ok", "client_error", "server_error"];

/// Request counters, lock-free so that counting never costs a resolve more
/// than a few nanoseconds.
#[derive(Debug, Default)]
struct Metrics {
    requests: [[AtomicU64; 3]; 4],
    nanos: [AtomicU64; 4],
}

impl Metrics {
    fn record<T>(&self, op: Op, started: Instant, result: &std::result::Result<T, StoreError>) {
        let outcome = match result {
            Ok(_) => 0,
            Err(e) if e.to_api().http_status() < 500 => 1,
            Err(_) => 2,
        };
        self.requests[op as usize][outcome].fetch_add(1, Ordering::Relaxed);
        self.nanos[op as usize].fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn render(&self, store_kind: &str) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "# HELP flotilla_names_requests_total Name table requests by operation and outcome.");
        let _ = writeln!(out, "# TYPE flotilla_names_requests_total counter");
        for op in Op::ALL {
            for (i, outcome) in OUTCOMES.iter().enumerate() {
                let n = self.requests[op as usize][i].load(Ordering::Relaxed);
                let _ =
                    writeln!(out, "flotilla_names_requests_total{{op=\"{}\",outcome=\"{outcome}\"}} {n}", op.label());
            }
        }
        let _ = writeln!(out, "# HELP flotilla_names_request_seconds_total Time spent in the store, by operation.");
        let _ = writeln!(out, "# TYPE flotilla_names_request_seconds_total counter");
        for op in Op::ALL {
            let s = self.nanos[op as usize].load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "flotilla_names_request_seconds_total{{op=\"{}\"}} {s}", op.label());
        }
        let _ = writeln!(out, "# HELP flotilla_names_store_info The store behind this name table.");
        let _ = writeln!(out, "# TYPE flotilla_names_store_info gauge");
        let _ = writeln!(out, "flotilla_names_store_info{{kind=\"{store_kind}\"}} 1");
        out
    }
}

struct Shared {
    store: Arc<dyn Store>,
    metrics: Metrics,
}

type AppState = State<Arc<Shared>>;

/// The error envelope as the OpenAPI document shows it (the wire type is
/// `flotilla_api::ApiError`; this copy exists only to describe it).
#[derive(ToSchema)]
#[allow(dead_code)]
struct ErrorEnvelope {
    /// Stable code: `invalid_argument`, `unauthorized`, `not_found`, `not_ready`, `internal`.
    code: String,
    message: String,
    #[schema(value_type = Option<Object>)]
    details: Option<serde_json::Value>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Flotilla name table", description = "Mounts with TTLs, resolve and glob (DESIGN.md §4)."),
    paths(mount, unmount, resolve, glob, healthz, metrics),
    components(schemas(
        MountRequest,
        MountResponse,
        UnmountRequest,
        UnmountResponse,
        Resolution,
        GlobPage,
        MountEntry,
        MountedServer,
        ErrorEnvelope
    )),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

/// Declares the `bearer` security scheme the write routes name.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document of this API, as served at `/openapi.json`.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// The name table's routes over `store`; writes need `auth`'s token.
pub fn router(store: Arc<dyn Store>, auth: WriteAuth) -> Router {
    let shared = Arc::new(Shared { store, metrics: Metrics::default() });
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json()) }))
        .route("/v1/mounts", put(mount).delete(unmount))
        .route("/v1/resolve/{*name}", get(resolve))
        .route("/v1/glob/{*pattern}", get(glob))
        .fallback(|| async { HttpError(ApiError::not_found("no such route")) })
        .with_state(shared)
        .layer(axum::middleware::from_fn_with_state(Arc::new(auth), require_token));
    // Envelopes for every rejection, bounded and timed bodies, as the node.
    flotilla_agent::extract::layer(router)
}

/// Lets reads through and refuses writes without the right bearer token
/// (before their body is read).
async fn require_token(State(auth): State<Arc<WriteAuth>>, req: Request, next: Next) -> Response {
    if let Err(failure) = auth.check(req.method(), req.headers()) {
        tracing::debug!(method = %req.method(), path = req.uri().path(), "name table: refused: {failure:?} token");
        let mut resp = HttpError(crate::auth::refusal(failure)).into_response();
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    next.run(req).await
}

/// Serves the name table on `listener` until `shutdown` completes, then
/// finishes the requests in flight. Writes need `auth`'s token. The
/// node's limits hold here too ([`flotilla_agent::serve`]): open
/// connections capped, request headers (and idle keep-alives) timed out.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn Store>,
    auth: WriteAuth,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max = flotilla_agent::serve::MAX_OPEN_TCP;
    flotilla_agent::serve::serve_connections(listener, router(store, auth), max, shutdown).await;
    Ok(())
}

/// A name table served on a background task (for `flotilla dev` and
/// tests). Dropping the handle does not stop it; call [`ServerHandle::shutdown`].
pub struct ServerHandle {
    addr: SocketAddr,
    token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Written out so that the token never reaches a log.
impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").field("addr", &self.addr).field("token", &"<redacted>").finish()
    }
}

impl ServerHandle {
    /// Serves `store` on `listener` in a new task, with a fresh random
    /// write token ([`ServerHandle::token`], [`ServerHandle::client`]).
    pub fn spawn(listener: TcpListener, store: Arc<dyn Store>) -> std::io::Result<ServerHandle> {
        let token = crate::auth::generate_token().map_err(std::io::Error::other)?;
        ServerHandle::spawn_with_token(listener, store, &token)
    }

    /// Serves `store` on `listener` in a new task; writes need `token`
    /// (refused, as `InvalidInput`, if too short or unprintable).
    pub fn spawn_with_token(
        listener: TcpListener,
        store: Arc<dyn Store>,
        token: &str,
    ) -> std::io::Result<ServerHandle> {
        let auth = WriteAuth::new(token).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, store, auth, async move {
            let _ = rx.await;
        }));
        Ok(ServerHandle { addr, token: token.to_string(), stop: Some(tx), task })
    }

    /// The bearer token writes need.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// A client of this table that sends its token on writes.
    pub fn client(&self) -> NamesClient {
        NamesClient::new(flotilla_agent::http::HttpClient::new(flotilla_agent::http::Endpoint::Tcp(
            self.addr.to_string(),
        )))
        .with_token(Some(self.token.clone()))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, what [`crate::NamesClient::connect`] takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets requests in flight finish, and waits.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// JSON bodies parsed here so a bad one gets our envelope, not axum's text.
fn store_err(e: StoreError) -> HttpError {
    HttpError(e.to_api())
}

fn name(s: &str) -> Result<Name> {
    Name::parse(s).map_err(|e| store_err(e.into()))
}

/// Mounts a server at a name for `ttl_s` seconds (mounting again refreshes).
#[utoipa::path(put, path = "/v1/mounts", request_body = MountRequest, security(("bearer" = [])), responses(
    (status = 200, description = "Mounted", body = MountResponse),
    (status = 400, description = "Bad name, server or TTL", body = ErrorEnvelope),
    (status = 401, description = "No bearer token, or not the table's", body = ErrorEnvelope),
    (status = 503, description = "The store is unreachable", body = ErrorEnvelope),
    (status = "default", description = "Any other error (e.g. 405, 408, 413, 415), as the envelope", body = ErrorEnvelope),
))]
async fn mount(State(s): AppState, JsonBody(req): JsonBody<MountRequest>) -> Result<Json<MountResponse>> {
    let n = name(&req.name)?;
    let ttl = check_ttl(req.ttl_s).map_err(|e| store_err(e.into()))?;
    let started = Instant::now();
    let r = s.store.mount(&n, &req.server, ttl).await;
    s.metrics.record(Op::Mount, started, &r);
    let applied = r.map_err(store_err)?;
    Ok(Json(MountResponse { name: n.to_string(), server: req.server, ttl_s: applied.as_secs_f64() }))
}

/// Removes a mount; removing one that is not there succeeds.
#[utoipa::path(delete, path = "/v1/mounts", request_body = UnmountRequest, security(("bearer" = [])), responses(
    (status = 200, description = "Unmounted (or was not mounted)", body = UnmountResponse),
    (status = 400, description = "Bad name or server", body = ErrorEnvelope),
    (status = 401, description = "No bearer token, or not the table's", body = ErrorEnvelope),
    (status = 503, description = "The store is unreachable", body = ErrorEnvelope),
    (status = "default", description = "Any other error (e.g. 405, 408, 413, 415), as the envelope", body = ErrorEnvelope),
))]
async fn unmount(State(s): AppState, JsonBody(req): JsonBody<UnmountRequest>) -> Result<Json<UnmountResponse>> {
    let n = name(&req.name)?;
    let started = Instant::now();
    let r = s.store.unmount(&n, &req.server).await;
    s.metrics.record(Op::Unmount, started, &r);
    Ok(Json(UnmountResponse { removed: r.map_err(store_err)? }))
}

/// The servers at the longest mounted prefix of a name, and the rest of it.
#[utoipa::path(get, path = "/v1/resolve/{name}",
    params(("name" = String, Path, description = "The name; may contain `/`")),
    responses(
        (status = 200, description = "Resolved", body = Resolution),
        (status = 400, description = "Bad name", body = ErrorEnvelope),
        (status = 404, description = "No prefix of the name is mounted", body = ErrorEnvelope),
        (status = 503, description = "The store is unreachable", body = ErrorEnvelope),
    (status = "default", description = "Any other error (e.g. 405, 408, 413, 415), as the envelope", body = ErrorEnvelope),
    )
)]
async fn resolve(State(s): AppState, Path(raw): Path<String>) -> Result<Json<Resolution>> {
    let n = name(&raw)?;
    let started = Instant::now();
    let r = s.store.resolve(&n).await;
    s.metrics.record(Op::Resolve, started, &r);
    Ok(Json(r.map_err(store_err)?))
}

/// Mounted names matching a pattern (`*` within an element, `...` for any
/// number of elements), sorted by name, one page at a time.
#[utoipa::path(get, path = "/v1/glob/{pattern}",
    params(
        ("pattern" = String, Path, description = "e.g. `nodes/*` or `apps/...`; may contain `/`"),
        ("page_token" = Option<String>, Query, description = "`next_page_token` of the previous page"),
        ("limit" = Option<usize>, Query, description = "Entries per page (default 100, at most 1000)"),
    ),
    responses(
        (status = 200, description = "One page of matches", body = GlobPage),
        (status = 400, description = "Bad pattern or query", body = ErrorEnvelope),
        (status = 503, description = "The store is unreachable", body = ErrorEnvelope),
    (status = "default", description = "Any other error (e.g. 405, 408, 413, 415), as the envelope", body = ErrorEnvelope),
    )
)]
async fn glob(
    State(s): AppState,
    Path(raw): Path<String>,
    q: std::result::Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<GlobPage>> {
    let Query(q) = q.map_err(|e| HttpError(ApiError::invalid(format!("bad query: {e}"))))?;
    let pattern = Pattern::parse(&raw).map_err(|e| store_err(e.into()))?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE_SIZE);
    if limit == 0 || limit > MAX_PAGE_SIZE {
        return Err(HttpError(ApiError::invalid(format!("limit must be 1..={MAX_PAGE_SIZE}"))));
    }
    let started = Instant::now();
    let r = s.store.glob(&pattern).await;
    s.metrics.record(Op::Glob, started, &r);
    Ok(Json(page(r.map_err(store_err)?, q.page_token.as_deref(), limit)))
}

/// The entries after `after` (a name), `limit` of them. The token is the
/// last name of the page, so a page never repeats or skips a name even if
/// mounts come and go between requests.
fn page(entries: Vec<MountEntry>, after: Option<&str>, limit: usize) -> GlobPage {
    let mut rest: Vec<MountEntry> =
        entries.into_iter().filter(|e| after.is_none_or(|a| e.name.as_str() > a)).take(limit + 1).collect();
    let next_page_token = if rest.len() > limit {
        rest.truncate(limit);
        rest.last().map(|e| e.name.clone())
    } else {
        None
    };
    GlobPage { entries: rest, next_page_token }
}

/// `ok` while the store answers, 503 otherwise.
#[utoipa::path(get, path = "/healthz", responses(
    (status = 200, description = "Serving", body = String),
    (status = 503, description = "The store is unreachable", body = ErrorEnvelope),
    (status = "default", description = "Any other error (e.g. 405, 408, 413, 415), as the envelope", body = ErrorEnvelope),
))]
async fn healthz(State(s): AppState) -> Result<&'static str> {
    s.store.health().await.map_err(store_err)?;
    Ok("ok\n")
}

/// Request counters in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "Prometheus text", body = String),
    (status = "default", description = "An error, as the envelope", body = ErrorEnvelope),
))]
async fn metrics(State(s): AppState) -> Response {
    let body = s.metrics.render(s.store.kind());
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> MountEntry {
        MountEntry { name: name.into(), servers: vec![] }
    }

    #[test]
    fn pages_follow_names() {
        let all = || vec![entry("a"), entry("b"), entry("c")];
        let p1 = page(all(), None, 2);
        assert_eq!(p1.entries.len(), 2);
        assert_eq!(p1.next_page_token.as_deref(), Some("b"));
        let p2 = page(all(), p1.next_page_token.as_deref(), 2);
        assert_eq!((p2.entries.len(), p2.next_page_token), (1, None));
        assert_eq!(page(all(), None, 3).next_page_token, None);
    }

    #[test]
    fn openapi_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        for p in ["/v1/mounts", "/v1/resolve/{name}", "/v1/glob/{pattern}", "/healthz", "/metrics"] {
            assert!(doc["paths"][p].is_object(), "{p} missing from {doc}");
        }
        assert!(doc["components"]["schemas"]["MountRequest"].is_object());
    }

    #[test]
    fn openapi_says_writes_need_the_token() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer", "{doc}");
        for m in ["put", "delete"] {
            let op = &doc["paths"]["/v1/mounts"][m];
            assert!(op["responses"]["401"].is_object(), "{m}: {op}");
            assert!(op["security"][0]["bearer"].is_array(), "{m}: {op}");
        }
        assert!(doc["paths"]["/v1/resolve/{name}"]["get"]["security"].is_null(), "reads are open");
    }
}
