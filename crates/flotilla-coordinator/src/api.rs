//! The coordinator's HTTP API: projects, try, runs, builds, logs (live),
//! cancel, retry, push webhooks and the event feed. Handlers parse a
//! request, call the coordinator and render the result; errors use the
//! node's envelope and codes (`flotilla_api::ApiError`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flotilla_agent::extract::{JsonBody, QueryParams};
use flotilla_agent::http::HttpError;
use flotilla_api::coordinator::{
    AddProjectRequest, Build, Project, ProjectLogEntry, Run, SecretInfo, SetSecretRequest, TryRequest,
};
use flotilla_api::{ApiError, ErrorCode, Page};
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::runtime::Coordinator;
use crate::store::{NewProject, StoreError};

type Result<T> = std::result::Result<T, HttpError>;
type Co = State<Arc<Coordinator>>;

/// Largest webhook payload read: a push's is a few kB to a few hundred
/// (GitHub lists at most 20 commits in one). Anyone may send one, before
/// any signature is checked, so this, [`WEBHOOKS_AT_ONCE`] and
/// [`WEBHOOK_READ`] bound what a stranger costs.
pub const MAX_WEBHOOK_BODY: usize = 1 << 20;

/// Webhook bodies read at once; more wait their turn, briefly.
const WEBHOOKS_AT_ONCE: usize = 16;

/// How long a webhook's body may take to arrive, whole.
const WEBHOOK_READ: Duration = Duration::from_secs(10);

static WEBHOOKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(WEBHOOKS_AT_ONCE);
/// How long `try` waits for its run to exist before answering without it.
pub const TRY_WAIT: Duration = Duration::from_secs(10);
/// Default poll interval of a project.
pub const DEFAULT_POLL: Duration = Duration::from_secs(10);
/// Log bytes sent per read while following.
const LOG_READ: u64 = 256 << 10;

fn store_error(e: StoreError) -> HttpError {
    HttpError(match e {
        StoreError::Exists(what) => ApiError::new(ErrorCode::Conflict, format!("{what} already exists")),
        StoreError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
        StoreError::Invalid(why) => ApiError::new(ErrorCode::Conflict, why),
        e @ StoreError::Fenced(_) => ApiError::new(ErrorCode::Conflict, e.to_string()),
        e @ (StoreError::Sql(_) | StoreError::Json(_) | StoreError::Join(_)) => {
            ApiError::internal(format!("the coordinator's store failed: {}", crate::error_chain(&e)))
        }
    })
}

/// The API on `c`. `remote` routes are the ones a TCP listener serves
/// without the bearer token: reads, the event feed and webhooks (which
/// carry their own signature).
pub fn router(c: Arc<Coordinator>) -> Router {
    let r = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { axum::Json(Doc::openapi()) }))
        .route("/v1/projects", get(list_projects).post(add_project))
        .route("/v1/projects/{name}", get(show_project).delete(remove_project))
        .route("/v1/projects/{name}/log", get(project_log))
        .route("/v1/projects/{name}/secrets", get(list_secrets))
        .route("/v1/projects/{name}/secrets/{secret}", axum::routing::put(set_secret).delete(remove_secret))
        .route("/v1/projects/{name}/poll", post(poll_project))
        .route("/v1/projects/{name}/try", post(submit_try))
        .route("/v1/projects/{name}/sandboxes", post(builder_sandbox))
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(show_run))
        .route("/v1/runs/{id}/cancel", post(cancel_run))
        .route("/v1/runs/{id}/retry", post(retry_run))
        .route("/v1/builds/{id}", get(show_build))
        .route("/v1/builds/{id}/log", get(build_log))
        .route("/v1/builds/{id}/cancel", post(cancel_build))
        .route("/v1/builds/{id}/retry", post(retry_build))
        .route("/v1/webhooks/{forge}/{project}", post(webhook))
        .route("/v1/queue", get(show_queue))
        .route("/v1/events", get(events))
        .fallback(|| async { HttpError(ApiError::not_found("no such route")) })
        .with_state(c);
    flotilla_agent::extract::layer(r)
}

/// The API as a TCP listener serves it: reads, the event feed and signed
/// webhooks to anyone who can reach it; changes only with the bearer
/// `token` (`HOME/coordinator/token`). The 0600 Unix socket needs none.
pub fn tcp_router(c: Arc<Coordinator>, token: &str) -> Router {
    guarded(router(c), token)
}

/// `router` (the API and whatever is merged into it, e.g. the dashboard's
/// pages) with changes only for the bearer `token`: GETs and webhooks stay
/// open.
pub fn guarded(router: Router, token: &str) -> Router {
    use axum::http::Method;
    let token = flotilla_agent::token::BearerToken::new(token);
    router.layer(axum::middleware::from_fn(move |req: Request, next: axum::middleware::Next| {
        let token = token.clone();
        async move {
            // Reads are open, but for secrets (their names are nobody's business).
            let path = req.uri().path();
            let open = (matches!(*req.method(), Method::GET | Method::HEAD) && !is_secrets_path(path))
                || path.starts_with("/v1/webhooks/");
            if open {
                return next.run(req).await;
            }
            match token.check(req.headers()) {
                Ok(()) => next.run(req).await,
                Err(f) => HttpError(ApiError::new(
                    ErrorCode::Unauthorized,
                    match f {
                        flotilla_agent::token::AuthFailure::Missing => {
                            "changes over TCP need the coordinator's token: Authorization: Bearer (HOME/coordinator/token)"
                        }
                        flotilla_agent::token::AuthFailure::Wrong => "the bearer token is not valid",
                    },
                ))
                .into_response(),
            }
        }
    }))
}

/// `/v1/projects/NAME/secrets[/…]`.
fn is_secrets_path(path: &str) -> bool {
    let mut parts = path.trim_end_matches('/').split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(""), Some("v1"), Some("projects"), Some(_), Some("secrets"))
    )
}

/// Serves `router` [`guarded`] by `token` on `listener` until `shutdown`
/// resolves: over TLS with `tls` (the node's listener: a handshake deadline
/// and cap besides), else plain HTTP.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    router: Router,
    token: &str,
    tls: Option<&flotilla_node::tls::TlsIdentity>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The node's limits: a cap on open connections, a deadline on request
    // headers (which also closes idle keep-alive connections), a grace on
    // shutdown.
    let router = guarded(router, token);
    match tls {
        Some(identity) => flotilla_node::tls::serve_tls_open(router, listener, identity, shutdown).await,
        None => {
            let max = flotilla_agent::serve::MAX_OPEN_TCP;
            flotilla_agent::serve::serve_connections(listener, router, max, shutdown).await;
            Ok(())
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Flotilla coordinator API", description = "Projects, runs, builds, logs and events."),
    modifiers(&ErrorsEverywhere),
    paths(
        list_projects,
        add_project,
        show_project,
        remove_project,
        project_log,
        list_secrets,
        set_secret,
        remove_secret,
        poll_project,
        submit_try,
        builder_sandbox,
        list_runs,
        show_run,
        cancel_run,
        retry_run,
        show_build,
        build_log,
        cancel_build,
        retry_build,
        webhook,
        show_queue,
        events,
        healthz,
        metrics
    ),
    components(schemas(
        Project,
        AddProjectRequest,
        SetSecretRequest,
        SecretInfo,
        TryRequest,
        TryResponse,
        Run,
        Build,
        ProjectLogEntry,
        RetryResponse,
        flotilla_api::coordinator::Change,
        flotilla_api::coordinator::ChangeKind,
        flotilla_api::coordinator::RunState,
        flotilla_api::coordinator::ProjectStatus,
        flotilla_api::coordinator::TimelineEntry,
        flotilla_api::coordinator::BuildFailure,
        flotilla_api::coordinator::Queue,
        flotilla_api::coordinator::BuilderSandboxRequest,
        flotilla_api::coordinator::BuilderSandbox,
        flotilla_api::coordinator::QueueNode,
        flotilla_api::coordinator::QueueBuilder,
        flotilla_api::coordinator::QueuedBuild,
        ApiError,
        ErrorCode
    ))
)]
struct Doc;

/// `GET /openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    Doc::openapi()
}

/// Every operation may answer with the error envelope (any status), and
/// changes over TCP take a bearer token.
struct ErrorsEverywhere;

impl utoipa::Modify for ErrorsEverywhere {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = ResponseBuilder::new()
            .description("An error: the envelope with a stable code")
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ApiError"))).build())
            .build();
        let bearer = utoipa::openapi::security::SecurityRequirement::new("bearer", Vec::<String>::new());
        for (path, item) in doc.paths.paths.iter_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.put, &mut item.delete].into_iter().flatten() {
                op.responses.responses.insert("default".into(), error.clone().into());
            }
            // Changes take the token over TCP; webhooks are signed instead.
            if !path.starts_with("/v1/webhooks/") {
                for op in [&mut item.post, &mut item.put, &mut item.delete].into_iter().flatten() {
                    op.security = Some(vec![bearer.clone()]);
                }
            }
            // So do reads of secrets' names.
            if is_secrets_path(path) {
                for op in [&mut item.get].into_iter().flatten() {
                    op.security = Some(vec![bearer.clone()]);
                }
            }
        }
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_schema_referenced_exists_and_every_operation_has_its_error() {
        let json = serde_json::to_value(super::openapi()).unwrap();
        let schemas = json["components"]["schemas"].as_object().unwrap();
        let text = json.to_string();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            assert!(schemas.contains_key(&name), "{name} is referenced but not defined");
        }
        let paths = json["paths"].as_object().unwrap();
        assert!(paths.len() >= 16, "{:?}", paths.keys());
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                assert!(op["responses"]["default"].is_object(), "{method} {path} lacks its error response");
                let changes = (method != "get" || super::is_secrets_path(path)) && !path.starts_with("/v1/webhooks/");
                assert_eq!(op["security"][0]["bearer"].is_array(), changes, "{method} {path}: security");
                for p in op["parameters"].as_array().into_iter().flatten() {
                    let in_path = path.contains(&format!("{{{}}}", p["name"].as_str().unwrap()));
                    assert_eq!(p["in"] == "path", in_path, "{method} {path}: parameter {p}");
                }
            }
        }
    }
}

#[utoipa::path(get, path = "/v1/projects", responses((status = 200, body = Page<Project>)))]
async fn list_projects(State(c): Co) -> Result<axum::Json<Page<Project>>> {
    let items = c.store.projects().await.map_err(store_error)?.into_iter().map(shown).collect();
    Ok(axum::Json(Page { items, next_page_token: None }))
}

fn check_name(name: &str) -> std::result::Result<(), HttpError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(HttpError(
            ApiError::invalid(format!(
                "project name {name:?}: use 1 to 64 lowercase letters, digits, '-', '_' or '.', not starting with '-' or '.'"
            ))
            .with_details(serde_json::json!({"field": "name"})),
        ))
    }
}

#[utoipa::path(post, path = "/v1/projects", request_body = AddProjectRequest,
    responses((status = 201, body = Project), (status = 409, body = ApiError), (status = 400, body = ApiError)))]
async fn add_project(State(c): Co, JsonBody(req): JsonBody<AddProjectRequest>) -> Result<Response> {
    check_name(&req.name)?;
    if req.repo.is_empty() || req.repo.starts_with('-') {
        return Err(HttpError(
            ApiError::invalid("repo: a local path or a URL git can fetch")
                .with_details(serde_json::json!({"field": "repo"})),
        ));
    }
    let poll = match &req.poll_interval {
        Some(s) => flotilla_api::units::parse_duration(s).map_err(|e| {
            HttpError(
                ApiError::invalid(format!("poll_interval: {e}"))
                    .with_details(serde_json::json!({"field": "poll_interval"})),
            )
        })?,
        None => DEFAULT_POLL,
    };
    if poll < Duration::from_secs(1) {
        return Err(HttpError(
            ApiError::invalid("poll_interval: at least 1s").with_details(serde_json::json!({"field": "poll_interval"})),
        ));
    }
    // A live project's name is refused before anything is touched (its
    // mirror is in use).
    if let Some(p) = c.store.project(&req.name).await.map_err(store_error)?
        && p.status == flotilla_api::coordinator::ProjectStatus::Enabled
    {
        return Err(store_error(crate::store::StoreError::Exists(format!("project {}", req.name))));
    }
    // Clone first, beside the mirrors: a repository that cannot be read is
    // refused now, with git's own words, rather than failing every poll;
    // the clone replaces the project's mirror only once the store took it.
    let repos = c.config.data_dir.join("repos");
    let dir = repos.join(format!("{}.git", req.name));
    let staging = repos.join(format!(".adding-{}-{}.git", req.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let mirror = crate::git::Mirror::open_or_clone(&staging, &req.repo).await.map_err(|e| {
        let _ = std::fs::remove_dir_all(&staging);
        HttpError(
            ApiError::invalid(format!("repo: {}", crate::error_chain(&e)))
                .with_details(serde_json::json!({"field": "repo"})),
        )
    })?;
    let branch = match req.branch.clone() {
        Some(b) => b,
        None => mirror.default_branch().await.ok().flatten().unwrap_or_else(|| "main".into()),
    };
    let added = c
        .store
        .add_project(NewProject {
            name: req.name.clone(),
            repo: req.repo.clone(),
            branch,
            poll_interval_ms: poll.as_millis() as u64,
            webhook_secret: req.webhook_secret.clone().filter(|s| !s.is_empty()),
        })
        .await;
    let p = match added {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(store_error(e));
        }
    };
    c.drop_mirror(&req.name).await;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir)
        .map_err(|e| HttpError(ApiError::internal(format!("moving the new mirror into {}: {e}", dir.display()))))?;
    c.watch_project(&p.name);
    let p = shown(p);
    c.events.publish(flotilla_api::EventBody::Project { project: Box::new(p.clone()) });
    Ok((StatusCode::CREATED, axum::Json(p)).into_response())
}

/// A project as the API and the event feed show it: its repository URL
/// without the credentials it may carry (`https://user:token@host/…`).
pub fn shown(mut p: Project) -> Project {
    p.repo = crate::git::redact(&p.repo);
    p
}

async fn project_or_404(c: &Coordinator, name: &str) -> Result<Project> {
    c.store
        .project(name)
        .await
        .map_err(store_error)?
        .ok_or_else(|| HttpError(ApiError::not_found(format!("project {name} not found"))))
}

#[utoipa::path(get, path = "/v1/projects/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Project), (status = 404, body = ApiError)))]
async fn show_project(State(c): Co, Path(name): Path<String>) -> Result<axum::Json<Project>> {
    Ok(axum::Json(shown(project_or_404(&c, &name).await?)))
}

#[utoipa::path(delete, path = "/v1/projects/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError)))]
async fn remove_project(State(c): Co, Path(name): Path<String>) -> Result<StatusCode> {
    c.store.remove_project(&name).await.map_err(store_error)?;
    c.wake_poller(&name);
    // The feed says so too (status `removed`).
    if let Ok(Some(p)) = c.store.project(&name).await {
        c.events.publish(flotilla_api::EventBody::Project { project: Box::new(shown(p)) });
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/projects/{name}/secrets", params(("name" = String, Path)),
    responses((status = 200, body = Page<SecretInfo>), (status = 404, body = ApiError)))]
async fn list_secrets(State(c): Co, Path(name): Path<String>) -> Result<axum::Json<Page<SecretInfo>>> {
    project_or_404(&c, &name).await?;
    let items = c.store.secret_names(&name).await.map_err(store_error)?;
    let items = items
        .into_iter()
        .map(|(name, at)| SecretInfo { name, updated_at: flotilla_api::Timestamp(at as u64) })
        .collect();
    Ok(axum::Json(Page { items, next_page_token: None }))
}

#[utoipa::path(put, path = "/v1/projects/{name}/secrets/{secret}",
    params(("name" = String, Path), ("secret" = String, Path)), request_body = SetSecretRequest,
    responses((status = 204), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn set_secret(
    State(c): Co,
    Path((name, secret)): Path<(String, String)>,
    JsonBody(req): JsonBody<SetSecretRequest>,
) -> Result<StatusCode> {
    let invalid = |field: &str, why: String| {
        HttpError(ApiError::invalid(why).with_details(serde_json::json!({ "field": field })))
    };
    crate::secrets::check_name(&secret).map_err(|e| invalid("secret", e))?;
    crate::secrets::check_value(req.value.as_bytes()).map_err(|e| invalid("value", e))?;
    let sealed = c
        .config
        .secrets
        .seal(&name, &secret, req.value.as_bytes())
        .map_err(|e| HttpError(ApiError::internal(e.to_string())))?;
    c.store.put_secret(&name, &secret, sealed, crate::secrets::MAX_PER_PROJECT).await.map_err(store_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/projects/{name}/secrets/{secret}",
    params(("name" = String, Path), ("secret" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError)))]
async fn remove_secret(State(c): Co, Path((name, secret)): Path<(String, String)>) -> Result<StatusCode> {
    project_or_404(&c, &name).await?;
    if c.store.delete_secret(&name, &secret).await.map_err(store_error)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(HttpError(ApiError::not_found(format!("project {name} has no secret {secret}"))))
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    limit: Option<u64>,
}

#[utoipa::path(get, path = "/v1/projects/{name}/log", params(("name" = String, Path), LogQuery),
    responses((status = 200, body = Page<ProjectLogEntry>)))]
async fn project_log(
    State(c): Co,
    Path(name): Path<String>,
    QueryParams(q): QueryParams<LogQuery>,
) -> Result<axum::Json<Page<ProjectLogEntry>>> {
    project_or_404(&c, &name).await?;
    let items = c.store.project_log(&name, q.limit.unwrap_or(50).min(1000)).await.map_err(store_error)?;
    Ok(axum::Json(Page { items, next_page_token: None }))
}

#[utoipa::path(post, path = "/v1/projects/{name}/poll", params(("name" = String, Path)),
    responses((status = 200, body = Project)))]
async fn poll_project(State(c): Co, Path(name): Path<String>) -> Result<axum::Json<Project>> {
    project_or_404(&c, &name).await?;
    crate::poller::poll(&c, &name).await.map_err(|e| HttpError(ApiError::new(ErrorCode::Conflict, e)))?;
    Ok(axum::Json(shown(project_or_404(&c, &name).await?)))
}

/// The answer to `try`: the change, and its run once created.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TryResponse {
    pub change_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<u64>,
}

#[utoipa::path(post, path = "/v1/projects/{name}/try", params(("name" = String, Path)), request_body = TryRequest,
    responses((status = 201, body = TryResponse), (status = 400, body = ApiError)))]
async fn submit_try(State(c): Co, Path(name): Path<String>, JsonBody(req): JsonBody<TryRequest>) -> Result<Response> {
    project_or_404(&c, &name).await?;
    let change_id = crate::poller::submit_try(&c, &name, req.rev.as_deref(), req.patch.as_deref(), req.base.as_deref())
        .await
        .map_err(|e| HttpError(ApiError::invalid(e)))?;
    let deadline = tokio::time::Instant::now() + TRY_WAIT;
    let mut run_id = None;
    while tokio::time::Instant::now() < deadline {
        run_id = c.store.run_of_change(&name, &change_id).await.map_err(store_error)?;
        if run_id.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((StatusCode::CREATED, axum::Json(TryResponse { change_id, run_id })).into_response())
}

/// A sandbox set up like one of the project's builders, with the source at
/// `rev` in `/workspace`, deleted after `idle_ttl_s` without use (gomote).
#[utoipa::path(post, path = "/v1/projects/{name}/sandboxes", params(("name" = String, Path)),
    request_body = flotilla_api::coordinator::BuilderSandboxRequest,
    responses((status = 201, body = flotilla_api::coordinator::BuilderSandbox)))]
async fn builder_sandbox(
    State(c): Co,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<flotilla_api::coordinator::BuilderSandboxRequest>,
) -> Result<Response> {
    project_or_404(&c, &name).await?;
    match crate::gomote::builder_sandbox(&c, &name, &req).await {
        Ok(s) => Ok((StatusCode::CREATED, axum::Json(s)).into_response()),
        Err(crate::gomote::Refused::Invalid(e)) => Err(HttpError(ApiError::invalid(e))),
        Err(crate::gomote::Refused::Unavailable(e)) => Err(HttpError(ApiError::new(ErrorCode::NotReady, e))),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    project: Option<String>,
    limit: Option<usize>,
    /// The `next_page_token` of the previous page.
    page_token: Option<String>,
}

#[utoipa::path(get, path = "/v1/runs", params(RunsQuery), responses((status = 200, body = Page<Run>)))]
async fn list_runs(State(c): Co, QueryParams(q): QueryParams<RunsQuery>) -> Result<axum::Json<Page<Run>>> {
    let limit = q.limit.unwrap_or(50).clamp(1, 500) as u64;
    let before = match &q.page_token {
        Some(t) => {
            Some(t.parse::<u64>().map_err(|_| HttpError(ApiError::invalid("page_token: not one this API gave")))?)
        }
        None => None,
    };
    let items = c.store.runs(q.project.clone(), limit, before).await.map_err(store_error)?;
    let next_page_token = (items.len() as u64 == limit).then(|| items.last().map(|r| r.id.to_string())).flatten();
    Ok(axum::Json(Page { items, next_page_token }))
}

async fn run_or_404(c: &Coordinator, id: u64) -> Result<Run> {
    c.store
        .run(id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| HttpError(ApiError::not_found(format!("run {id} not found"))))
}

async fn build_or_404(c: &Coordinator, id: u64) -> Result<Build> {
    c.store
        .build(id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| HttpError(ApiError::not_found(format!("build {id} not found"))))
}

fn id_of(s: &str, what: &str) -> Result<u64> {
    s.parse().map_err(|_| HttpError(ApiError::invalid(format!("{what} id {s:?}: a number such as 12"))))
}

#[utoipa::path(get, path = "/v1/runs/{id}", params(("id" = u64, Path)), responses((status = 200, body = Run), (status = 404, body = ApiError)))]
async fn show_run(State(c): Co, Path(id): Path<String>) -> Result<axum::Json<Run>> {
    Ok(axum::Json(run_or_404(&c, id_of(&id, "run")?).await?))
}

#[utoipa::path(post, path = "/v1/runs/{id}/cancel", params(("id" = u64, Path)), responses((status = 200, body = Run)))]
async fn cancel_run(State(c): Co, Path(id): Path<String>) -> Result<axum::Json<Run>> {
    let id = id_of(&id, "run")?;
    run_or_404(&c, id).await?;
    c.cancel(Some(id), None).await.map_err(store_error)?;
    Ok(axum::Json(run_or_404(&c, id).await?))
}

/// The new attempts a retry made.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RetryResponse {
    pub builds: Vec<u64>,
}

#[utoipa::path(post, path = "/v1/runs/{id}/retry", params(("id" = u64, Path)),
    responses((status = 200, body = RetryResponse), (status = 409, body = ApiError)))]
async fn retry_run(State(c): Co, Path(id): Path<String>) -> Result<axum::Json<RetryResponse>> {
    let id = id_of(&id, "run")?;
    run_or_404(&c, id).await?;
    Ok(axum::Json(RetryResponse { builds: c.retry(Some(id), None).await.map_err(store_error)? }))
}

#[utoipa::path(get, path = "/v1/builds/{id}", params(("id" = u64, Path)), responses((status = 200, body = Build), (status = 404, body = ApiError)))]
async fn show_build(State(c): Co, Path(id): Path<String>) -> Result<axum::Json<Build>> {
    Ok(axum::Json(build_or_404(&c, id_of(&id, "build")?).await?))
}

#[utoipa::path(post, path = "/v1/builds/{id}/cancel", params(("id" = u64, Path)), responses((status = 200, body = Build)))]
async fn cancel_build(State(c): Co, Path(id): Path<String>) -> Result<axum::Json<Build>> {
    let id = id_of(&id, "build")?;
    build_or_404(&c, id).await?;
    c.cancel(None, Some(id)).await.map_err(store_error)?;
    Ok(axum::Json(build_or_404(&c, id).await?))
}

#[utoipa::path(post, path = "/v1/builds/{id}/retry", params(("id" = u64, Path)),
    responses((status = 200, body = RetryResponse), (status = 409, body = ApiError)))]
async fn retry_build(State(c): Co, Path(id): Path<String>) -> Result<axum::Json<RetryResponse>> {
    let id = id_of(&id, "build")?;
    build_or_404(&c, id).await?;
    Ok(axum::Json(RetryResponse { builds: c.retry(None, Some(id)).await.map_err(store_error)? }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct BuildLogQuery {
    /// Byte offset to start from (resume a follow here).
    from: Option<u64>,
    /// Keep the response open and stream bytes as they are stored, until
    /// the build ends.
    follow: Option<bool>,
}

/// The build's log as bytes; `X-Flotilla-Log-Size` says how much was
/// stored when the response began.
#[utoipa::path(get, path = "/v1/builds/{id}/log", params(("id" = u64, Path), BuildLogQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>)))]
async fn build_log(
    State(c): Co,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<BuildLogQuery>,
) -> Result<Response> {
    let id = id_of(&id, "build")?;
    // Subscribe before the first read: a byte stored in between wakes us.
    let mut changed = c.log_watch(id);
    changed.borrow_and_update();
    let first = c
        .store
        .log(id, q.from.unwrap_or(0), LOG_READ)
        .await
        .map_err(store_error)?
        .ok_or_else(|| HttpError(ApiError::not_found(format!("build {id} not found"))))?;
    let total = first.total;
    let follow = q.follow.unwrap_or(false);
    let from = q.from.unwrap_or(0);
    // The state carries the watch receiver, so each wait sees only appends
    // made since the last read.
    let stream = futures_util::stream::unfold((Some(first), from, changed), move |(pending, mut at, mut changed)| {
        let c = c.clone();
        async move {
            let mut slice = pending;
            loop {
                let s = match slice.take() {
                    Some(s) => s,
                    None => match c.store.log(id, at, LOG_READ).await {
                        Ok(Some(s)) => s,
                        Ok(None) | Err(_) => return None,
                    },
                };
                if !s.data.is_empty() {
                    at += s.data.len() as u64;
                    return Some((Ok::<_, std::io::Error>(Bytes::from(s.data)), (None, at, changed)));
                }
                if !follow || s.done {
                    return None;
                }
                // Wait for the next append, or look again every second (an
                // append by another coordinator does not wake us).
                let _ = tokio::time::timeout(Duration::from_secs(1), changed.changed()).await;
                changed.borrow_and_update();
            }
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("x-flotilla-log-size", total.to_string())
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

#[utoipa::path(post, path = "/v1/webhooks/{forge}/{project}", params(("forge" = String, Path), ("project" = String, Path)),
    responses((status = 202), (status = 401, body = ApiError)))]
async fn webhook(
    State(c): Co,
    Path((forge, project)): Path<(String, String)>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response> {
    let forge = crate::webhook::Forge::parse(&forge).ok_or_else(|| {
        HttpError(ApiError::not_found(format!("webhook forge {forge:?}: this coordinator takes github or gitea")))
    })?;
    let secret = c.store.webhook_secret(&project).await.map_err(store_error)?;
    let Some(secret) = secret else {
        return Err(HttpError(ApiError::not_found(format!(
            "project {project} has no webhook secret (add it with `flotilla project add --webhook-secret`)"
        ))));
    };
    let too_big = || {
        HttpError(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("webhook body: over the {MAX_WEBHOOK_BODY} bytes this coordinator reads"),
        ))
    };
    // Said too big before a byte of it is read.
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    if declared.is_some_and(|n: u64| n > MAX_WEBHOOK_BODY as u64) {
        return Err(too_big());
    }
    let _turn = tokio::time::timeout(WEBHOOK_READ, WEBHOOKS.acquire()).await.map_err(|_| {
        HttpError(ApiError::new(ErrorCode::RequestTimeout, "too many webhooks at once: send it again".to_string()))
    })?;
    let body = match tokio::time::timeout(WEBHOOK_READ, axum::body::to_bytes(req.into_body(), MAX_WEBHOOK_BODY)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return Err(too_big()),
        Err(_) => {
            return Err(HttpError(ApiError::new(
                ErrorCode::RequestTimeout,
                format!("webhook body: not all there within {}s", WEBHOOK_READ.as_secs()),
            )));
        }
    };
    crate::webhook::verify(forge, secret.as_bytes(), &headers, &body)
        .map_err(|e| HttpError(ApiError::new(ErrorCode::Unauthorized, e.to_string())))?;
    let event = crate::webhook::event(forge, &headers).unwrap_or_default();
    if event == "push" {
        let push = crate::webhook::parse_push(&body).map_err(|e| HttpError(ApiError::invalid(e.to_string())))?;
        tracing::info!(project, branch = ?push.branch, after = %push.after, "push webhook: fetching now");
        c.wake_poller(&project);
    }
    Ok((StatusCode::ACCEPTED, axum::Json(serde_json::json!({ "event": event }))).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Resume after this event id.
    after: Option<u64>,
}

/// The scheduler's last pass: its nodes and the builds waiting, each with
/// the reason it waits.
#[utoipa::path(get, path = "/v1/queue", responses((status = 200, body = flotilla_api::coordinator::Queue)))]
async fn show_queue(State(c): Co) -> axum::Json<flotilla_api::coordinator::Queue> {
    axum::Json(c.queue())
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", responses((status = 200, content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// Prometheus metrics: the queue by state and priority (every
/// coordinator's), the fleet, and what this coordinator did (builds ended,
/// their durations and queue waits, adoptions, store retries).
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics(State(c): Co) -> Result<Response> {
    let text = crate::metrics::render(&c).await.map_err(store_error)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// Server-sent events: every project, run and build change; resume with
/// `Last-Event-ID` or `?after=`.
#[utoipa::path(get, path = "/v1/events", params(EventsQuery),
    responses((status = 200, content_type = "text/event-stream", body = String)))]
async fn events(State(c): Co, QueryParams(q): QueryParams<EventsQuery>, req: Request) -> Response {
    let last = req.headers().get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    flotilla_node::api::sse(c.events.subscribe(q.after.or(last)))
}
