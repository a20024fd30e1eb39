//! The typed client of the agent API.
//!
//! The node serves the same sandbox-scoped routes under
//! `/v1/sandboxes/{id}`, proxying them to the agent, so one client serves
//! both: [`AgentClient::direct`] talks to an agent's socket,
//! [`AgentClient::via_node`] to a sandbox through its node.

use std::io::Write;

use bytes::Bytes;
use flotilla_api::{
    AgentHealth, ExecRequest, ExitStatus, FrameKind, ImportSummary, LsEntry, OutputQuery, ProcessInfo,
    RemoveAllRequest, SessionQuery, SignalRequest, StdinQuery, WorkspaceQuery,
};
use http::{Method, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;

use crate::http::{ClientError, FrameStream, HttpClient};

/// Client of one sandbox's agent, directly or through the node.
#[derive(Debug, Clone)]
pub struct AgentClient {
    http: HttpClient,
    prefix: String,
}

fn qs<T: serde::Serialize>(q: &T) -> String {
    let s = serde_urlencoded::to_string(q).unwrap_or_default();
    if s.is_empty() { s } else { format!("?{s}") }
}

impl AgentClient {
    pub fn direct(http: HttpClient) -> AgentClient {
        AgentClient { http, prefix: String::new() }
    }

    pub fn via_node(http: HttpClient, sandbox: &str) -> AgentClient {
        AgentClient { http, prefix: format!("/v1/sandboxes/{sandbox}") }
    }

    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    fn path(&self, p: &str) -> String {
        format!("{}{p}", self.prefix)
    }

    pub async fn health(&self) -> Result<AgentHealth, ClientError> {
        self.http.json(Method::GET, &self.path("/healthz"), None::<&()>).await
    }

    /// Streams a tarball into the workspace. `encoding` is the body's
    /// `Content-Encoding` (`gzip`, `zstd` or none).
    pub async fn put_workspace<B>(
        &self,
        body: B,
        encoding: Option<&str>,
        q: &WorkspaceQuery,
    ) -> Result<ImportSummary, ClientError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut b = self.http.request(Method::PUT, &self.path(&format!("/workspace{}", qs(q))));
        b = b.header(header::CONTENT_TYPE, "application/x-tar");
        if let Some(enc) = encoding {
            b = b.header(header::CONTENT_ENCODING, enc);
        }
        let resp = self.http.send_ok(b.body(body).expect("valid request")).await?;
        let bytes = crate::http::read_body(resp).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Streams the workspace (or a directory in it) out as a tar.
    pub async fn get_workspace(&self, q: &WorkspaceQuery) -> Result<Incoming, ClientError> {
        let req = self.http.request(Method::GET, &self.path(&format!("/workspace{}", qs(q))));
        Ok(self.http.send_ok(req.body(Full::new(Bytes::new())).expect("valid")).await?.into_body())
    }

    pub async fn ls(&self, dir: Option<&str>) -> Result<Vec<LsEntry>, ClientError> {
        let q = WorkspaceQuery { dir: dir.map(str::to_string), ..Default::default() };
        self.http.json(Method::GET, &self.path(&format!("/ls{}", qs(&q))), None::<&()>).await
    }

    pub async fn remove_all(&self, paths: Vec<String>) -> Result<(), ClientError> {
        self.http.json_empty(Method::POST, &self.path("/removeall"), Some(&RemoveAllRequest { paths })).await
    }

    /// Runs a command and returns its frame stream.
    pub async fn exec(&self, req: &ExecRequest) -> Result<FrameStream, ClientError> {
        let body = Full::new(Bytes::from(serde_json::to_vec(req).expect("serialisable")));
        let r = self
            .http
            .request(Method::POST, &self.path("/exec"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .expect("valid");
        let resp = self.http.send_ok(r).await?;
        Ok(FrameStream::new(resp.into_body(), self.http.endpoint().to_string(), 0))
    }

    /// Starts a detached process.
    pub async fn exec_detached(&self, req: &ExecRequest) -> Result<ProcessInfo, ClientError> {
        let req = ExecRequest { detach: true, ..req.clone() };
        self.http.json(Method::POST, &self.path("/exec"), Some(&req)).await
    }

    pub async fn processes(&self) -> Result<Vec<ProcessInfo>, ClientError> {
        self.http.json(Method::GET, &self.path("/processes"), None::<&()>).await
    }

    pub async fn process(&self, id: &str) -> Result<ProcessInfo, ClientError> {
        self.http.json(Method::GET, &self.path(&format!("/processes/{id}")), None::<&()>).await
    }

    /// Re-attaches to a detached process's output from `from`. Returns the
    /// stream and where the kept output starts (older output is gone).
    pub async fn output(&self, id: &str, from: u64, follow: bool) -> Result<(FrameStream, u64), ClientError> {
        self.output_with(id, &OutputQuery { from, follow: Some(follow), ack: false, limit: None }).await
    }

    /// [`AgentClient::output`] with every option of the route: `ack`
    /// acknowledges the bytes before `from` to a held process, `limit`
    /// ends the stream after that many bytes.
    pub async fn output_with(&self, id: &str, q: &OutputQuery) -> Result<(FrameStream, u64), ClientError> {
        let from = q.from;
        let r = self.http.request(Method::GET, &self.path(&format!("/processes/{id}/output{}", qs(q))));
        let resp = self.http.send_ok(r.body(Full::new(Bytes::new())).expect("valid")).await?;
        let start = resp
            .headers()
            .get("x-flotilla-output-start")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok((FrameStream::new(resp.into_body(), self.http.endpoint().to_string(), from.max(start)), start))
    }

    pub async fn signal(&self, id: &str, signal: &str) -> Result<(), ClientError> {
        let req = SignalRequest { signal: signal.to_string() };
        self.http.json_empty(Method::POST, &self.path(&format!("/processes/{id}/signal")), Some(&req)).await
    }

    pub async fn stdin(&self, id: &str, data: Bytes, close: bool) -> Result<(), ClientError> {
        let q = StdinQuery { close };
        let r = self
            .http
            .request(Method::POST, &self.path(&format!("/processes/{id}/stdin{}", qs(&q))))
            .body(Full::new(data))
            .expect("valid");
        crate::http::read_body(self.http.send_ok(r).await?).await.map(|_| ())
    }

    /// Opens an interactive terminal session (a WebSocket of frames).
    pub async fn session(
        &self,
        q: &SessionQuery,
    ) -> Result<WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, ClientError> {
        use tokio_tungstenite::tungstenite::handshake::client::generate_key;
        let req = self
            .http
            .request(Method::GET, &self.path(&format!("/session{}", qs(q))))
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, generate_key())
            .body(Full::new(Bytes::new()))
            .expect("valid");
        let resp = self.http.send_ok(req).await?;
        let upgraded =
            hyper::upgrade::on(resp).await.map_err(|e| ClientError::Decode(format!("session upgrade failed: {e}")))?;
        Ok(WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await)
    }

    /// Opens a byte stream to `port` on the sandbox's loopback (`GET /tcp`).
    pub async fn connect_tcp(&self, port: u16) -> Result<TokioIo<hyper::upgrade::Upgraded>, ClientError> {
        let req = self
            .http
            .request(Method::GET, &self.path(&format!("/tcp?port={port}")))
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "tcp")
            .body(Full::new(Bytes::new()))
            .expect("valid");
        let resp = self.http.send_ok(req).await?;
        let up = hyper::upgrade::on(resp).await.map_err(|e| ClientError::Decode(format!("tcp upgrade failed: {e}")))?;
        Ok(TokioIo::new(up))
    }

    pub async fn halt(&self) -> Result<(), ClientError> {
        self.http.json_empty(Method::POST, &self.path("/halt"), None::<&()>).await
    }
}

/// Copies an exec stream to two writers and returns the exit status. An
/// `Error` frame, or a stream that ends without an exit, is an error.
pub async fn drain_exec(
    stream: &mut FrameStream,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<ExitStatus, ClientError> {
    while let Some(f) = stream.next().await? {
        match f.kind {
            FrameKind::Stdout => {
                let _ = stdout.write_all(&f.payload);
                let _ = stdout.flush();
            }
            FrameKind::Stderr => {
                let _ = stderr.write_all(&f.payload);
                let _ = stderr.flush();
            }
            FrameKind::Exit => {
                return f.as_exit().ok_or_else(|| ClientError::Decode("garbled exit frame".into()));
            }
            FrameKind::Error => return Err(ClientError::Api(f.as_error().expect("error frame"))),
            FrameKind::Heartbeat | FrameKind::Stdin | FrameKind::Resize => {}
        }
    }
    Err(ClientError::Decode("the stream ended without an exit status (the sandbox stopped?)".into()))
}
