//! The typed client of the node API, used by the CLI, the bench and tests.

use flotilla_agent::AgentClient;
use flotilla_agent::http::{ClientError, HttpClient};
use flotilla_api::{CreateSandboxRequest, NodeInfo, Page, Sandbox, UpdateSandboxRequest};
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

    pub async fn create(&self, req: &CreateSandboxRequest) -> Result<Sandbox, ClientError> {
        self.http.json(Method::POST, "/v1/sandboxes", Some(req)).await
    }

    /// Every sandbox, following pages.
    pub async fn list(&self) -> Result<Vec<Sandbox>, ClientError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let path = match &token {
                Some(t) => format!("/v1/sandboxes?page_token={t}"),
                None => "/v1/sandboxes".to_string(),
            };
            let page: Page<Sandbox> = self.http.json(Method::GET, &path, None::<&()>).await?;
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

    /// `start`, `stop` or `restart`.
    pub async fn action(&self, id: &str, action: &str) -> Result<Sandbox, ClientError> {
        self.http.json(Method::POST, &format!("/v1/sandboxes/{id}/{action}"), None::<&()>).await
    }
}
