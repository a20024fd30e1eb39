//! HTTP plumbing shared by every Flotilla client and server: the
//! transport (Unix socket or TCP), the error envelope as a response, and
//! frame streams with dead-peer detection.
//!
//! Clients open one HTTP/1.1 connection per request over a Unix socket: a
//! connect there costs tens of microseconds, far below anything else in a
//! request, and it keeps streams (exec, tar) independent of each other.

use std::path::PathBuf;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flotilla_api::{ApiError, ErrorCode, Frame, FrameDecoder};
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:///path`, `/path`, `http://host:port`.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        if let Some(hp) = s.strip_prefix("http://") {
            return Ok(Endpoint::Tcp(hp.trim_end_matches('/').to_string()));
        }
        Err(format!("bad endpoint {s:?}: use unix:///path/to/node.sock or http://host:port"))
    }

    fn host_header(&self) -> &str {
        match self {
            Endpoint::Unix(_) => "localhost",
            Endpoint::Tcp(hp) => hp,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(hp) => write!(f, "http://{hp}"),
        }
    }
}

/// A connected byte stream to an endpoint (for upgrades and raw use).
pub enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Conn {
    pub async fn connect(ep: &Endpoint) -> std::io::Result<Conn> {
        Ok(match ep {
            Endpoint::Unix(p) => Conn::Unix(tokio::net::UnixStream::connect(p).await?),
            Endpoint::Tcp(hp) => {
                let s = tokio::net::TcpStream::connect(hp).await?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
        })
    }
}

macro_rules! delegate_io {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Unix($s) => $e,
            Conn::Tcp($s) => $e,
        }
    };
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, s => std::pin::Pin::new(s).poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate_io!(self, s => std::pin::Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, s => std::pin::Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, s => std::pin::Pin::new(s).poll_shutdown(cx))
    }
}

/// Errors a client sees.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with {endpoint} failed")]
    Http {
        endpoint: String,
        #[source]
        source: hyper::Error,
    },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("bad response from server: {0}")]
    Decode(String),
    #[error("no data from {0} for {1:?}: the peer is gone or hung")]
    Dead(String, Duration),
}

impl ClientError {
    /// The error as an envelope, for servers relaying a client error.
    pub fn to_api(&self) -> ApiError {
        match self {
            ClientError::Api(e) => e.clone(),
            ClientError::Dead(..) => ApiError::new(ErrorCode::AgentUnreachable, self.to_string()),
            other => ApiError::new(ErrorCode::AgentUnreachable, error_chain(other)),
        }
    }
}

/// `error: cause: cause` in one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A minimal HTTP/1.1 client for one endpoint.
#[derive(Debug, Clone)]
pub struct HttpClient {
    endpoint: Endpoint,
    token: Option<String>,
}

impl HttpClient {
    pub fn new(endpoint: Endpoint) -> HttpClient {
        HttpClient { endpoint, token: None }
    }

    pub fn with_token(mut self, token: Option<String>) -> HttpClient {
        self.token = token;
        self
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Builds a request with the host and auth headers set.
    pub fn request(&self, method: Method, path_and_query: &str) -> http::request::Builder {
        let mut b =
            Request::builder().method(method).uri(path_and_query).header(header::HOST, self.endpoint.host_header());
        if let Some(t) = &self.token
            && let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}"))
        {
            b = b.header(header::AUTHORIZATION, v);
        }
        b
    }

    /// Sends a request on a fresh connection.
    pub async fn send<B>(&self, req: Request<B>) -> Result<http::Response<Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let ep = self.endpoint.to_string();
        let conn = Conn::connect(&self.endpoint)
            .await
            .map_err(|source| ClientError::Connect { endpoint: ep.clone(), source })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
            .await
            .map_err(|source| ClientError::Http { endpoint: ep.clone(), source })?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        sender.send_request(req).await.map_err(|source| ClientError::Http { endpoint: ep, source })
    }

    /// Sends a request and turns a non-2xx response into its `ApiError`.
    pub async fn send_ok<B>(&self, req: Request<B>) -> Result<http::Response<Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let resp = self.send(req).await?;
        if resp.status().is_success() || resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp);
        }
        Err(ClientError::Api(read_error(resp).await))
    }

    /// A JSON request with a JSON answer.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let bytes = read_body(self.json_raw(method, path, body).await?).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// A JSON request whose answer body is ignored.
    pub async fn json_empty(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<(), ClientError> {
        read_body(self.json_raw(method, path, body).await?).await.map(|_| ())
    }

    async fn json_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let b = self.request(method, path);
        let req = match body {
            Some(v) => b
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(serde_json::to_vec(v).expect("serialisable"))))
                .expect("valid request"),
            None => b.body(Full::new(Bytes::new())).expect("valid request"),
        };
        self.send_ok(req).await
    }
}

/// Reads a whole (small) body.
pub async fn read_body(resp: http::Response<Incoming>) -> Result<Bytes, ClientError> {
    resp.into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ClientError::Decode(format!("reading body: {e}")))
}

/// Turns an error response into its envelope (or a synthetic one).
pub async fn read_error(resp: http::Response<Incoming>) -> ApiError {
    let status = resp.status().as_u16();
    match read_body(resp).await {
        Ok(b) => serde_json::from_slice::<ApiError>(&b).unwrap_or_else(|_| {
            ApiError::new(
                ErrorCode::from_http_status(status),
                format!("HTTP {status}: {}", String::from_utf8_lossy(&b)),
            )
        }),
        Err(e) => ApiError::new(ErrorCode::from_http_status(status), format!("HTTP {status}: {e}")),
    }
}

/// Reads frames from a response body, failing if the peer goes silent for
/// longer than [`flotilla_api::limits::STREAM_DEAD_AFTER`] (heartbeats keep
/// a live but idle stream talking).
pub struct FrameStream {
    body: Incoming,
    decoder: FrameDecoder,
    peer: String,
    /// Bytes of non-heartbeat frames read so far (for resuming).
    pub offset: u64,
    dead_after: Duration,
}

impl FrameStream {
    pub fn new(body: Incoming, peer: impl Into<String>, start_offset: u64) -> FrameStream {
        FrameStream {
            body,
            decoder: FrameDecoder::new(),
            peer: peer.into(),
            offset: start_offset,
            dead_after: flotilla_api::limits::STREAM_DEAD_AFTER,
        }
    }

    pub fn with_dead_after(mut self, d: Duration) -> FrameStream {
        self.dead_after = d;
        self
    }

    /// The next frame (heartbeats included), `None` at a clean end.
    pub async fn next(&mut self) -> Result<Option<Frame>, ClientError> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => {
                    if f.kind != flotilla_api::FrameKind::Heartbeat {
                        self.offset += (flotilla_api::frame::HEADER_LEN + f.payload.len()) as u64;
                    }
                    return Ok(Some(f));
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Decode(e.to_string())),
            }
            let frame = match tokio::time::timeout(self.dead_after, self.body.frame()).await {
                Err(_) => return Err(ClientError::Dead(self.peer.clone(), self.dead_after)),
                Ok(None) => {
                    return match self.decoder.finish() {
                        Ok(()) => Ok(None),
                        Err(e) => Err(ClientError::Decode(e.to_string())),
                    };
                }
                Ok(Some(Err(e))) => return Err(ClientError::Decode(format!("stream from {} broke: {e}", self.peer))),
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                self.decoder.push(&data);
            }
        }
    }
}

/// An `ApiError` as an HTTP response (the orphan rule keeps the impl here).
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}

/// Content type of frame streams.
pub const FRAMES_CONTENT_TYPE: &str = "application/vnd.flotilla.frames";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(Endpoint::parse("/a/node.sock").unwrap(), Endpoint::Unix("/a/node.sock".into()));
        assert_eq!(Endpoint::parse("unix:///a/b").unwrap(), Endpoint::Unix("/a/b".into()));
        assert_eq!(Endpoint::parse("http://127.0.0.1:7000/").unwrap(), Endpoint::Tcp("127.0.0.1:7000".into()));
        assert!(Endpoint::parse("ftp://x").is_err());
    }
}
