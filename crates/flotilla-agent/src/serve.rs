//! Serving a router over plain connections (a Unix socket, or TCP for the
//! coordinator's and the name table's listeners) with the limits a
//! stranger on the other end must meet: at most `max_open` connections at
//! once (past that, new ones wait in the kernel's backlog), a deadline on
//! request headers ([`crate::extract::header_timeout`], which also closes
//! a keep-alive connection idle that long), one task per connection,
//! HTTP/1.1 with upgrades, and on shutdown the request in hand finished
//! within [`SHUTDOWN_GRACE`], then the rest dropped. Request bodies are
//! bounded by the routers' own layers. The node's TLS listener
//! (`flotilla_node::tls`) keeps the same limits around its handshake.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

/// How long open connections get to finish on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// After an accept error other than a peer giving up (e.g. out of file
/// descriptors), how long to pause before accepting again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Connections a TCP listener keeps open at once.
pub const MAX_OPEN_TCP: usize = 512;

/// A listener connections are served from.
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Io> {
        let (s, _) = self.accept().await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

/// An accept error: a peer that gave up is nothing; anything else (out of
/// file descriptors) pauses the loop briefly instead of spinning.
pub async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused => {
            tracing::debug!(error = %e, "accept");
        }
        _ => {
            tracing::warn!(error = %e, "accept failed; pausing");
            tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves (see the module
/// doc for the limits).
pub async fn serve_connections<L: Accept>(
    listener: L,
    router: axum::Router,
    max_open: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let service = hyper_util::service::TowerToHyperService::new(router);
    let open = Arc::new(Semaphore::new(max_open.max(1)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, permit) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = async {
                let permit = open.clone().acquire_owned().await.expect("never closed");
                (listener.accept_one().await, permit)
            } => match accepted {
                (Ok(stream), permit) => (stream, permit),
                (Err(e), _) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let service = service.clone();
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(crate::extract::header_timeout());
            let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), service).with_upgrades());
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = stop.wait_for(|stopping| *stopping) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    drain(stop_tx, connections).await;
}

/// Shutdown: tells every connection to finish the request in hand, waits
/// [`SHUTDOWN_GRACE`] for them, then drops what is still open.
pub async fn drain(stop: tokio::sync::watch::Sender<bool>, mut connections: tokio::task::JoinSet<()>) {
    let _ = stop.send(true);
    let finished = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, finished).await.is_err() {
        tracing::info!(open = connections.len(), "dropping connections still open after the shutdown grace");
        connections.shutdown().await;
    }
}
