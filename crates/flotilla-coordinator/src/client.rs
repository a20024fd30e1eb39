//! A typed client of the coordinator's API (the CLI's, and the tests').

use flotilla_agent::http::{ClientError, HttpClient};
use flotilla_api::Page;
use flotilla_api::coordinator::{AddProjectRequest, Build, Project, ProjectLogEntry, Run, TryRequest};
use http::Method;
use hyper::body::Incoming;

use crate::api::{RetryResponse, TryResponse};

#[derive(Debug, Clone)]
pub struct CoordinatorClient {
    http: HttpClient,
}

fn seg(s: &str) -> String {
    flotilla_node::client::segment(s)
}

impl CoordinatorClient {
    pub fn new(http: HttpClient) -> CoordinatorClient {
        CoordinatorClient { http }
    }

    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    pub async fn add_project(&self, req: &AddProjectRequest) -> Result<Project, ClientError> {
        self.http.json(Method::POST, "/v1/projects", Some(req)).await
    }

    pub async fn projects(&self) -> Result<Vec<Project>, ClientError> {
        let p: Page<Project> = self.http.json(Method::GET, "/v1/projects", None::<&()>).await?;
        Ok(p.items)
    }

    pub async fn project(&self, name: &str) -> Result<Project, ClientError> {
        self.http.json(Method::GET, &format!("/v1/projects/{}", seg(name)), None::<&()>).await
    }

    pub async fn remove_project(&self, name: &str) -> Result<(), ClientError> {
        self.http.json_empty(Method::DELETE, &format!("/v1/projects/{}", seg(name)), None::<&()>).await
    }

    pub async fn set_secret(&self, project: &str, name: &str, value: &str) -> Result<(), ClientError> {
        let req = flotilla_api::coordinator::SetSecretRequest { value: value.to_string() };
        let path = format!("/v1/projects/{}/secrets/{}", seg(project), seg(name));
        self.http.json_empty(Method::PUT, &path, Some(&req)).await
    }

    pub async fn secrets(&self, project: &str) -> Result<Vec<flotilla_api::coordinator::SecretInfo>, ClientError> {
        let path = format!("/v1/projects/{}/secrets", seg(project));
        let p: Page<flotilla_api::coordinator::SecretInfo> = self.http.json(Method::GET, &path, None::<&()>).await?;
        Ok(p.items)
    }

    pub async fn remove_secret(&self, project: &str, name: &str) -> Result<(), ClientError> {
        let path = format!("/v1/projects/{}/secrets/{}", seg(project), seg(name));
        self.http.json_empty(Method::DELETE, &path, None::<&()>).await
    }

    pub async fn project_log(&self, name: &str, limit: u64) -> Result<Vec<ProjectLogEntry>, ClientError> {
        let p: Page<ProjectLogEntry> =
            self.http.json(Method::GET, &format!("/v1/projects/{}/log?limit={limit}", seg(name)), None::<&()>).await?;
        Ok(p.items)
    }

    pub async fn poll(&self, name: &str) -> Result<Project, ClientError> {
        self.http.json(Method::POST, &format!("/v1/projects/{}/poll", seg(name)), None::<&()>).await
    }

    /// The scheduler's last pass: nodes, and waiting builds with reasons.
    pub async fn queue(&self) -> Result<flotilla_api::coordinator::Queue, ClientError> {
        self.http.json(Method::GET, "/v1/queue", None::<&()>).await
    }

    /// A sandbox set up like a builder (gomote).
    pub async fn builder_sandbox(
        &self,
        project: &str,
        req: &flotilla_api::coordinator::BuilderSandboxRequest,
    ) -> Result<flotilla_api::coordinator::BuilderSandbox, ClientError> {
        self.http.json(Method::POST, &format!("/v1/projects/{}/sandboxes", seg(project)), Some(req)).await
    }

    pub async fn try_change(&self, project: &str, req: &TryRequest) -> Result<TryResponse, ClientError> {
        self.http.json(Method::POST, &format!("/v1/projects/{}/try", seg(project)), Some(req)).await
    }

    /// Runs, newest first: up to `limit`, older than the page token.
    pub async fn runs(
        &self,
        project: Option<&str>,
        limit: usize,
        page_token: Option<&str>,
    ) -> Result<Page<Run>, ClientError> {
        let mut q = vec![("limit", limit.to_string())];
        if let Some(p) = project {
            q.push(("project", p.to_string()));
        }
        if let Some(t) = page_token {
            q.push(("page_token", t.to_string()));
        }
        let qs = serde_urlencoded::to_string(&q).expect("encodable");
        self.http.json(Method::GET, &format!("/v1/runs?{qs}"), None::<&()>).await
    }

    pub async fn run(&self, id: u64) -> Result<Run, ClientError> {
        self.http.json(Method::GET, &format!("/v1/runs/{id}"), None::<&()>).await
    }

    pub async fn cancel_run(&self, id: u64) -> Result<Run, ClientError> {
        self.http.json(Method::POST, &format!("/v1/runs/{id}/cancel"), None::<&()>).await
    }

    pub async fn retry_run(&self, id: u64) -> Result<RetryResponse, ClientError> {
        self.http.json(Method::POST, &format!("/v1/runs/{id}/retry"), None::<&()>).await
    }

    pub async fn build(&self, id: u64) -> Result<Build, ClientError> {
        self.http.json(Method::GET, &format!("/v1/builds/{id}"), None::<&()>).await
    }

    pub async fn cancel_build(&self, id: u64) -> Result<Build, ClientError> {
        self.http.json(Method::POST, &format!("/v1/builds/{id}/cancel"), None::<&()>).await
    }

    pub async fn retry_build(&self, id: u64) -> Result<RetryResponse, ClientError> {
        self.http.json(Method::POST, &format!("/v1/builds/{id}/retry"), None::<&()>).await
    }

    /// The build's log from byte `from`; with `follow`, the body goes on
    /// until the build ends.
    pub async fn log(&self, id: u64, from: u64, follow: bool) -> Result<Incoming, ClientError> {
        let r = self.http.request(Method::GET, &format!("/v1/builds/{id}/log?from={from}&follow={follow}"));
        let resp = self.http.send_ok(r.body(http_body_util::Full::new(bytes::Bytes::new())).expect("valid")).await?;
        Ok(resp.into_body())
    }
}
