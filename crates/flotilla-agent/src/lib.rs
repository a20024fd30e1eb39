//! The Flotilla agent: the server inside every sandbox (the *buildlet*),
//! and its typed client.
//!
//! The agent owns what happens inside one sandbox: importing and exporting
//! the workspace as tar streams ([`tarx`]), running commands with streamed,
//! framed output ([`procs`]), detached processes that outlive connections,
//! terminal sessions ([`session`]) and halting. In a sandbox it runs as init
//! (`flotilla agent --init`) and reaps every orphan.
//!
//! It serves on a listening socket the node created and passed in (socket
//! activation), and says it is ready by writing one byte on a pipe, so the
//! node never polls it. It must never trust its input: every tar entry and
//! path is checked before anything is written, and nothing is written
//! outside the workspace. It holds no state that must survive it.
#![forbid(unsafe_code)]

pub mod client;
pub mod extract;
pub mod http;
pub mod procs;
pub mod serve;
pub mod server;
pub mod session;
pub mod tarx;
pub mod token;

use std::io::Write;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

pub use client::AgentClient;
pub use server::{Agent, router};

/// How the agent is started.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Serve on this inherited listening socket (socket activation)...
    pub listen_fd: Option<RawFd>,
    /// ...or bind this Unix socket path.
    pub listen_path: Option<PathBuf>,
    /// Write one byte here once serving.
    pub ready_fd: Option<RawFd>,
    pub workspace: PathBuf,
    /// Running as the sandbox's init: reap every orphan.
    pub init: bool,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("taking the inherited descriptor {fd}")]
    Fd {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("binding {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("serving")]
    Serve(#[source] std::io::Error),
    #[error("give either a listening fd or a socket path")]
    NoListener,
}

/// Serves the agent's API on one connected byte stream (HTTP/1.1 with
/// upgrades, so sessions work), until the peer closes it.
pub async fn serve_connection<I>(app: axum::Router, io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    use tower::ServiceExt;
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "agent connection ended");
    }
}

/// Runs the agent until it is halted or killed.
pub fn run(config: AgentConfig) -> Result<(), AgentError> {
    // One thread for I/O; tar work runs on the blocking pool. Sandboxes
    // should spend their CPU on the user's work, not on their agent.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AgentError::Runtime)?;
    rt.block_on(serve(config))
}

async fn serve(config: AgentConfig) -> Result<(), AgentError> {
    let listener = match (&config.listen_fd, &config.listen_path) {
        (Some(fd), _) => {
            let owned =
                flotilla_sandbox::sys::take_inherited_fd(*fd).map_err(|source| AgentError::Fd { fd: *fd, source })?;
            let std_l = std::os::unix::net::UnixListener::from(owned);
            std_l.set_nonblocking(true).map_err(|source| AgentError::Fd { fd: *fd, source })?;
            tokio::net::UnixListener::from_std(std_l).map_err(|source| AgentError::Fd { fd: *fd, source })?
        }
        (None, Some(p)) => {
            let _ = std::fs::remove_file(p);
            tokio::net::UnixListener::bind(p).map_err(|source| AgentError::Bind { path: p.clone(), source })?
        }
        (None, None) => return Err(AgentError::NoListener),
    };
    let agent = Agent::new(config.workspace.clone(), config.init);
    if let Some(fd) = config.ready_fd {
        let owned: OwnedFd =
            flotilla_sandbox::sys::take_inherited_fd(fd).map_err(|source| AgentError::Fd { fd, source })?;
        let mut f = std::fs::File::from(owned);
        let _ = f.write_all(b"1");
    }
    tracing::info!(workspace = %config.workspace.display(), init = config.init, "agent serving");
    axum::serve(listener, router(agent)).await.map_err(AgentError::Serve)
}
