//! The Flotilla node daemon.
//!
//! It owns everything about the sandboxes on one machine: the registry and
//! its per-sandbox locks ([`node`]), their lifecycle ([`state`]), durable
//! state in SQLite ([`store`]), the HTTP API ([`api`]) and its typed client
//! ([`client`]). Backends come in through the [`node::Backend`] trait; the
//! real one is the process backend ([`backend`]).
//!
//! It must never hold a sandbox's lifecycle lock across guest I/O, never
//! act before recording what it is about to do, and never lose a sandbox:
//! after any crash, every sandbox on disk is re-adopted or cleaned up.
#![forbid(unsafe_code)]

pub mod api;
pub mod apps;
pub mod backend;
pub mod client;
pub mod events;
pub mod git;
pub mod images;
pub mod metrics;
pub mod node;
pub mod openapi;
pub mod ops;
pub mod registry;
pub mod selfupdate;
pub mod state;
pub mod store;
pub mod tls;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

pub use client::NodeClient;
pub use node::{Backend, Node, NodeConfig};
pub use selfupdate::Stop;

/// Serves `router` (the node API, see [`api::router`]) on `socket` (mode
/// 0600) until `stop` resolves, and says why it stopped.
///
/// At a [`Stop::Shutdown`] every running sandbox is stopped, except app
/// instances' when the node keeps them ([`Node::shutdown`]), and the socket
/// is removed. At a [`Stop::HandOver`] every sandbox keeps running and the
/// socket file stays, for the re-executed node to rename its own over.
pub async fn serve_unix<B: Backend>(
    node: Arc<Node<B>>,
    socket: &Path,
    router: axum::Router,
    stop: impl std::future::Future<Output = Stop> + Send + 'static,
) -> std::io::Result<Stop> {
    let listener = bind_private(socket)?;
    node.spawn_janitor();
    // Graceful shutdown waits for open connections, and exec or session
    // streams stay open as long as their sandbox runs: stop the sandboxes
    // first, which ends those streams, then let the server drain. A
    // hand-over stops nothing: in-flight requests get the grace, then go.
    let stopping = node.clone();
    let (reason_tx, reason_rx) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        let reason = stop.await;
        match reason {
            Stop::Shutdown => stopping.shutdown().await,
            Stop::HandOver => tracing::info!("handing over: sandboxes keep running"),
        }
        let _ = reason_tx.send(reason);
    };
    serve_connections(listener, router, shutdown).await;
    let reason = reason_rx.await.unwrap_or(Stop::Shutdown);
    match reason {
        Stop::Shutdown => {
            // Anything created while draining.
            node.shutdown().await;
            let _ = std::fs::remove_file(socket);
        }
        Stop::HandOver => {}
    }
    Ok(reason)
}

/// Serves `router` on a private (0600) Unix socket until `shutdown`
/// resolves (the coordinator's socket; the node's own goes through
/// [`serve_unix`]).
pub async fn serve_router_unix(
    socket: &Path,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = bind_private(socket)?;
    serve_connections(listener, router, shutdown).await;
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// Serves `router` on a Unix listener until `shutdown` resolves, with the
/// limits of [`flotilla_agent::serve`] (a Unix socket's clients are local
/// and few: the cap only guards the descriptors).
async fn serve_connections(
    listener: tokio::net::UnixListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    flotilla_agent::serve::serve_connections(listener, router, 4096, shutdown).await;
}

/// Binds a listening Unix socket at `socket`, mode 0600, so that the path
/// appears only once it is both private and accepting.
///
/// Binding in place would leave two windows: between `bind` and `listen` a
/// client that sees the file gets `ECONNREFUSED` (a restarted node looked
/// dead to anyone polling for the file), and between `bind` and `chmod` the
/// socket carries the umask's mode. So bind a temporary name beside it,
/// restrict it, and rename it over the real path: a rename is atomic, and a
/// listening socket keeps working under its new name.
fn bind_private(socket: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let mut staging = socket.as_os_str().to_owned();
    staging.push(format!(".{}.tmp", std::process::id()));
    let staging = std::path::PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = tokio::net::UnixListener::bind(&staging)?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&staging, socket));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    Ok(listener)
}
