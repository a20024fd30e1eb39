//! The typed client of the node API, used by the CLI, the bench and tests.

use flotilla_agent::AgentClient;
use flotilla_agent::http::{ClientError, HttpClient};
use std::time::{Duration, Instant};

use flotilla_api::{
    ApiError, CreateSandboxRequest, ErrorCode, NodeInfo, Operation, Page, Sandbox, UpdateSandboxRequest,
};
use http::Method;

#[derive(Debug, Clone)]
pub struct NodeClient {
    http: HttpClient,
}

impl NodeClient {
    pub fn new(http: HttpClient) -> NodeClient {
        NodeClient { http }
    }

    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// The agent-scoped API of one sandbox, through the node.
    pub fn sandbox(&self, id_or_name: &str) -> AgentClient {
        AgentClient::via_node(self.http.clone(), id_or_name)
    }

    pub async fn info(&self) -> Result<NodeInfo, ClientError> {
        self.http.json(Method::GET, "/v1/node", None::<&()>).await
    }

    /// Creates a sandbox and waits until it runs (or its boot failed, in
    /// which case the error names the step).
    pub async fn create(&self, req: &CreateSandboxRequest) -> Result<Sandbox, ClientError> {
        let op = self.create_operation(req).await?;
        self.sandbox_result(op, None).await
    }

    /// Starts creating a sandbox; returns the operation at once.
    pub async fn create_operation(&self, req: &CreateSandboxRequest) -> Result<Operation, ClientError> {
        self.http.json(Method::POST, "/v1/sandboxes", Some(req)).await
    }

    /// The operation as it is now.
    pub async fn operation(&self, id: &str) -> Result<Operation, ClientError> {
        self.http.json(Method::GET, &format!("/v1/operations/{id}"), None::<&()>).await
    }

    /// Waits for an operation to finish, for at most `timeout` (`None`:
    /// as long as it takes), calling `progress` whenever it took a step.
    pub async fn wait_operation(
        &self,
        id: &str,
        timeout: Option<Duration>,
        mut progress: impl FnMut(&Operation),
    ) -> Result<Operation, ClientError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut seen = usize::MAX;
        loop {
            // Short server-side waits, so progress shows as steps happen.
            let slice = deadline
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(1), Duration::from_secs(1));
            let path = format!("/v1/operations/{id}?wait={}ms", slice.as_millis());
            let op: Operation = self.http.json(Method::GET, &path, None::<&()>).await?;
            if op.steps.len() != seen {
                seen = op.steps.len();
                progress(&op);
            }
            if op.state.is_done() || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(op);
            }
        }
    }

    /// Waits for a sandbox operation and turns its outcome into a result.
    pub async fn sandbox_result(&self, op: Operation, timeout: Option<Duration>) -> Result<Sandbox, ClientError> {
        let op = self.wait_operation(&op.id, timeout, |_| {}).await?;
        operation_outcome(op)
    }

    /// Every sandbox, following pages.
    pub async fn list(&self) -> Result<Vec<Sandbox>, ClientError> {
        self.list_all("/v1/sandboxes").await
    }

    /// Every operation kept, newest first.
    pub async fn operations(&self) -> Result<Vec<Operation>, ClientError> {
        self.list_all("/v1/operations").await
    }

    /// Follows the pages of a list endpoint.
    pub async fn list_all<T: serde::de::DeserializeOwned>(&self, base: &str) -> Result<Vec<T>, ClientError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let path = match &token {
                Some(t) => format!("{base}?page_token={t}"),
                None => base.to_string(),
            };
            let page: Page<T> = self.http.json(Method::GET, &path, None::<&()>).await?;
            out.extend(page.items);
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    pub async fn get(&self, id: &str) -> Result<Sandbox, ClientError> {
        self.http.json(Method::GET, &format!("/v1/sandboxes/{id}"), None::<&()>).await
    }

    pub async fn update(&self, id: &str, req: &UpdateSandboxRequest) -> Result<Sandbox, ClientError> {
        self.http.json(Method::PATCH, &format!("/v1/sandboxes/{id}"), Some(req)).await
    }

    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.http.json_empty(Method::DELETE, &format!("/v1/sandboxes/{id}"), None::<&()>).await
    }

    /// `start`, `stop` or `restart`, waiting for start and restart to finish.
    pub async fn action(&self, id: &str, action: &str) -> Result<Sandbox, ClientError> {
        let path = format!("/v1/sandboxes/{id}/{action}");
        if action == "stop" {
            return self.http.json(Method::POST, &path, None::<&()>).await;
        }
        let op: Operation = self.http.json(Method::POST, &path, None::<&()>).await?;
        self.sandbox_result(op, None).await
    }
}

impl NodeClient {
    /// Warm pools of microVMs.
    pub async fn pools(&self) -> Result<Vec<flotilla_api::VmPool>, ClientError> {
        self.list_all("/v1/node/pools").await
    }

    /// Sets a warm pool (size 0 removes it); returns every pool.
    pub async fn set_pool(&self, req: &flotilla_api::VmPoolRequest) -> Result<Vec<flotilla_api::VmPool>, ClientError> {
        let page: flotilla_api::Page<flotilla_api::VmPool> =
            self.http.json(Method::PUT, "/v1/node/pools", Some(req)).await?;
        Ok(page.items)
    }

    pub async fn images(&self) -> Result<Vec<flotilla_api::Image>, ClientError> {
        self.list_all("/v1/images").await
    }

    pub async fn image(&self, reference: &str) -> Result<flotilla_api::Image, ClientError> {
        self.http.json(Method::GET, &format!("/v1/images/{}", segment(reference)), None::<&()>).await
    }

    /// Starts importing an image from a path on the node's host.
    pub async fn import_image(&self, req: &flotilla_api::ImportImageRequest) -> Result<Operation, ClientError> {
        self.http.json(Method::POST, "/v1/images", Some(req)).await
    }

    /// Starts pulling an image from an OCI registry (the node downloads it).
    pub async fn pull_image(&self, req: &flotilla_api::PullImageRequest) -> Result<Operation, ClientError> {
        self.http.json(Method::POST, "/v1/images/pull", Some(req)).await
    }

    pub async fn promote_image(&self, from: &str, to: &str) -> Result<flotilla_api::Image, ClientError> {
        let req = flotilla_api::PromoteImageRequest { to: to.to_string() };
        self.http.json(Method::POST, &format!("/v1/images/{}/promote", segment(from)), Some(&req)).await
    }

    /// Starts exporting a git revision into a sandbox's workspace.
    pub async fn git_import(&self, id: &str, req: &flotilla_api::GitImportRequest) -> Result<Operation, ClientError> {
        self.http.json(Method::POST, &format!("/v1/sandboxes/{id}/workspace/git"), Some(req)).await
    }

    pub async fn delete_image(&self, reference: &str) -> Result<(), ClientError> {
        self.http.json_empty(Method::DELETE, &format!("/v1/images/{}", segment(reference)), None::<&()>).await
    }
}

/// Apps: installations and instances (`/v1/apps`).
impl NodeClient {
    pub async fn apps(&self) -> Result<Vec<flotilla_api::app::AppInstallation>, ClientError> {
        self.list_all("/v1/apps").await
    }

    pub async fn install_app(
        &self,
        req: &flotilla_api::app::InstallRequest,
    ) -> Result<flotilla_api::app::AppInstallation, ClientError> {
        self.http.json(Method::POST, "/v1/apps", Some(req)).await
    }

    /// `GET /v1/apps/{address}` for `APP/INST` (an installation) or
    /// `APP/INST/INSTANCE` (an instance).
    pub async fn app<T: serde::de::DeserializeOwned>(&self, address: &str) -> Result<T, ClientError> {
        self.http.json(Method::GET, &format!("/v1/apps/{}", app_path(address)), None::<&()>).await
    }

    /// `POST /v1/apps/{address}/{action}`, with a body for `update`.
    pub async fn app_action<T: serde::de::DeserializeOwned>(
        &self,
        address: &str,
        action: &str,
        body: Option<&flotilla_api::app::InstallRequest>,
    ) -> Result<T, ClientError> {
        self.http.json(Method::POST, &format!("/v1/apps/{}/{action}", app_path(address)), body).await
    }

    /// An instance's log as a byte stream.
    pub async fn app_logs(
        &self,
        address: &str,
        q: &flotilla_api::app::AppLogsQuery,
    ) -> Result<hyper::body::Incoming, ClientError> {
        let qs = format!("follow={}&previous={}", q.follow, q.previous);
        let req = self.http.request(Method::GET, &format!("/v1/apps/{}/logs?{qs}", app_path(address)));
        let resp = self.http.send_ok(req.body(http_body_util::Full::new(bytes::Bytes::new())).expect("valid")).await?;
        Ok(resp.into_body())
    }
}

fn app_path(address: &str) -> String {
    address.split('/').map(segment).collect::<Vec<_>>().join("/")
}

/// Percent-encodes one path segment (image names may hold `/`).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The sandbox an operation produced, or its error.
pub fn operation_outcome(op: Operation) -> Result<Sandbox, ClientError> {
    if let Some(e) = op.error {
        return Err(ClientError::Api(e));
    }
    match op.result {
        Some(v) => serde_json::from_value(v).map_err(|e| ClientError::Api(ApiError::internal(e.to_string()))),
        None => Err(ClientError::Api(ApiError::new(
            ErrorCode::Timeout,
            format!("operation {} is still {} (last step: {})", op.id, op.state, last_step(&op)),
        ))),
    }
}

/// The name of the operation's latest step, or `-`.
pub fn last_step(op: &Operation) -> &str {
    op.steps.last().map(|s| s.name.as_str()).unwrap_or("-")
}
