//! What every server (node, agent, names) does with a request before a
//! handler sees it, in one place: JSON bodies and queries parsed into the
//! error envelope, request bodies that stall cut off, and any error response
//! that is not already an envelope (a framework rejection, a 405, a 413)
//! turned into one.
//!
//! - [`JsonBody`] requires `Content-Type: application/json`, a JSON object,
//!   at most [`MAX_JSON_BODY`] bytes, all of it within [`body_timeout`].
//! - [`QueryParams`] parses the query string; a bad one is a 400 envelope.
//! - [`layer`] wraps a router: request bodies end with an error after
//!   [`body_idle_timeout`] without a byte (streams stay open while bytes
//!   flow), and non-envelope error responses become envelopes.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use flotilla_api::limits::{BODY_IDLE_TIMEOUT, BODY_TIMEOUT, HEADER_TIMEOUT, MAX_JSON_BODY};
use flotilla_api::{ApiError, ErrorCode};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use hyper::body::Frame;
use serde::de::DeserializeOwned;

use crate::http::HttpError;

/// How long a JSON body may take to arrive: [`BODY_TIMEOUT`], or
/// `FLOTILLA_BODY_TIMEOUT_MS` (tests shorten it).
pub fn body_timeout() -> Duration {
    static T: OnceLock<Duration> = OnceLock::new();
    *T.get_or_init(|| env_ms("FLOTILLA_BODY_TIMEOUT_MS").unwrap_or(BODY_TIMEOUT))
}

/// How long a streamed body may stall: [`BODY_IDLE_TIMEOUT`], or
/// `FLOTILLA_BODY_TIMEOUT_MS` (tests shorten it).
pub fn body_idle_timeout() -> Duration {
    static T: OnceLock<Duration> = OnceLock::new();
    *T.get_or_init(|| env_ms("FLOTILLA_BODY_TIMEOUT_MS").unwrap_or(BODY_IDLE_TIMEOUT))
}

/// How long a client has to send a request's headers before its
/// connection is closed: [`HEADER_TIMEOUT`], or `FLOTILLA_HEADER_TIMEOUT_MS`
/// (tests shorten it).
pub fn header_timeout() -> Duration {
    static T: OnceLock<Duration> = OnceLock::new();
    *T.get_or_init(|| env_ms("FLOTILLA_HEADER_TIMEOUT_MS").unwrap_or(HEADER_TIMEOUT))
}

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name).ok()?.parse().ok().map(Duration::from_millis)
}

fn too_slow(within: Duration) -> HttpError {
    HttpError(ApiError::new(ErrorCode::RequestTimeout, format!("the request body did not arrive within {within:?}")))
}

/// A JSON request body (see the module docs).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, HttpError> {
        let ct = req.headers().get(CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let mime = ct.as_deref().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if !(mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))) {
            let got = ct.map(|c| format!(", not {c:?}")).unwrap_or_else(|| ", and none was given".into());
            return Err(HttpError(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!("this route takes a JSON body: send Content-Type: application/json{got}"),
            )));
        }
        let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_JSON_BODY as u64) {
            return Err(too_large());
        }
        let within = body_timeout();
        let bytes = match tokio::time::timeout(within, axum::body::to_bytes(req.into_body(), MAX_JSON_BODY)).await {
            Err(_) => return Err(too_slow(within)),
            Ok(Err(e)) if is_length_limit(&e) => return Err(too_large()),
            // The stream's own idle cut-off (see `layer`) came first.
            Ok(Err(e)) if is_timed_out(&e) => return Err(too_slow(within.min(body_idle_timeout()))),
            Ok(Err(e)) => {
                return Err(HttpError(ApiError::invalid(format!(
                    "reading the request body: {}",
                    crate::http::error_chain(&e)
                ))));
            }
            Ok(Ok(b)) => b,
        };
        parse_json_object(&bytes).map(JsonBody)
    }
}

fn too_large() -> HttpError {
    HttpError(ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("the request body is over the {MAX_JSON_BODY}-byte limit for JSON"),
    ))
}

fn is_timed_out(e: &axum::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        cur = err.source();
    }
    false
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Parses a request body that must be one JSON object.
pub fn parse_json_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, HttpError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(HttpError(ApiError::invalid("the request body must be a JSON object")));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        HttpError(
            ApiError::invalid(format!("bad request body: {e}"))
                .with_details(serde_json::json!({ "line": e.line(), "column": e.column() })),
        )
    })
}

/// A query string parsed into `T`; a bad one is a 400 envelope.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, HttpError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| QueryParams(q.0))
            .map_err(|e| HttpError(ApiError::invalid(format!("bad query: {}", e.body_text()))))
    }
}

/// Wraps `router` with the shared request handling (see the module docs).
pub fn layer(router: axum::Router) -> axum::Router {
    router.layer(axum::middleware::map_response(envelope_errors)).layer(axum::middleware::map_request(
        |req: Request| async move { req.map(|b| Body::new(IdleTimeout::new(b, body_idle_timeout()))) },
    ))
}

/// Turns an error response that is not an envelope into one. Error bodies
/// are short (framework rejections say a sentence), so reading it is cheap.
async fn envelope_errors(res: Response) -> Response {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let json = res
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if json {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let code = ErrorCode::from_http_status(status.as_u16());
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_lowercase() } else { text };
    let mut out = HttpError(ApiError::new(code, message)).into_response();
    *out.status_mut() = status;
    for (k, v) in parts.headers.iter() {
        if k != CONTENT_TYPE && k != CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// A request body that fails once it has sent nothing for `idle`.
struct IdleTimeout {
    inner: Body,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimeout {
    fn new(inner: Body, idle: Duration) -> IdleTimeout {
        IdleTimeout { inner, idle, sleep: Box::pin(tokio::time::sleep(idle)) }
    }
}

impl hyper::body::Body for IdleTimeout {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(frame)
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the request body sent nothing for {:?}", this.idle),
                    );
                    Poll::Ready(Some(Err(axum::Error::new(e))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
