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
pub mod state;
pub mod store;
pub mod tls;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

pub use client::NodeClient;
pub use node::{Backend, Node, NodeConfig};

/// Serves the node API on `socket` (mode 0600) until `shutdown` resolves,
/// then stops every running sandbox.
pub async fn serve_unix<B: Backend>(
    node: Arc<Node<B>>,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = bind_private(socket)?;
    node.spawn_janitor();
    // Graceful shutdown waits for open connections, and exec or session
    // streams stay open as long as their sandbox runs: stop the sandboxes
    // first, which ends those streams, then let the server drain.
    let stopping = node.clone();
    let shutdown = async move {
        shutdown.await;
        stopping.shutdown().await;
    };
    axum::serve(listener, api::router(node.clone())).with_graceful_shutdown(shutdown).await?;
    // Anything created while draining.
    node.shutdown().await;
    let _ = std::fs::remove_file(socket);
    Ok(())
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
