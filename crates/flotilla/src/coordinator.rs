//! `flotilla coordinator` (and the coordinator inside `flotilla dev`): the
//! role's options, its start-up, and how client commands find it.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::Args;
use flotilla_agent::http::{Endpoint, HttpClient};
use flotilla_coordinator::client::CoordinatorClient;
use flotilla_coordinator::store::Store;
use flotilla_coordinator::{Coordinator, CoordinatorConfig};
use flotilla_node::NodeClient;

use crate::cli::NodeArgs;

/// Where `flotilla dev` and `flotilla coordinator` write the coordinator's
/// TCP address for clients (`HOME/coordinator.url`).
pub const URL_FILE: &str = "coordinator.url";
/// Its Unix socket (0600), what the CLI uses by default.
pub const SOCKET: &str = "coordinator.sock";

/// Options of the coordinator role.
#[derive(Debug, Clone, Args)]
pub struct CoordinatorArgs {
    /// The coordinator's database: `postgres://user@host:port/db` (several coordinators may share
    /// one), else SQLite in HOME/coordinator/coordinator.db.
    #[arg(long, env = "FLOTILLA_DATABASE")]
    pub database: Option<String>,
    /// Also serve the coordinator's API over TCP here, for the CLI on other machines, webhooks and
    /// browsers (default 127.0.0.1:7780; `none` to turn it off; port 0 picks one; the URL clients
    /// use is written to HOME/coordinator.url). Beyond loopback it speaks TLS (see
    /// --coordinator-tls).
    #[arg(long, env = "FLOTILLA_COORDINATOR_LISTEN")]
    pub coordinator_listen: Option<String>,
    /// TLS on the TCP listener: `auto` (TLS unless it listens on loopback only), `on`, or `off`
    /// (plain HTTP everywhere, e.g. behind a proxy that terminates TLS: tokens cross the network in
    /// clear). Without --coordinator-cert a self-signed certificate is kept in
    /// HOME/coordinator/tls; clients pin it with the printed `https://HOST:PORT#sha256=…` URL.
    #[arg(long, value_enum, default_value_t = TlsMode::Auto)]
    pub coordinator_tls: TlsMode,
    /// The listener's certificate chain (PEM), e.g. one a public CA issued so that webhook senders
    /// trust it; with --coordinator-key.
    #[arg(long, value_name = "FILE", requires = "coordinator_key")]
    pub coordinator_cert: Option<PathBuf>,
    /// The private key (PEM) of --coordinator-cert.
    #[arg(long, value_name = "FILE", requires = "coordinator_cert")]
    pub coordinator_key: Option<PathBuf>,
    /// Builds run at once.
    #[arg(long, default_value_t = 4)]
    pub max_builds: usize,
    /// Another node to place builds on (repeat for more): unix:///path/node.sock or
    /// https://host:port, reached with the same --token and --ca (or --cert-sha256) as --node.
    #[arg(long = "fleet-node", value_name = "URL")]
    pub fleet_nodes: Vec<String>,
    /// A node that answers nothing for this long is lost: its builds are retried on another node.
    #[arg(long, value_parser = flotilla_api::units::parse_duration, default_value = "60s")]
    pub node_lost_after: std::time::Duration,
    /// How long a running build's lease lasts: renewed every third of it while this coordinator
    /// runs the build; once it lapses (the coordinator died, hung, or lost the database) any
    /// coordinator on the same database adopts the build where it stopped.
    #[arg(long, value_parser = flotilla_api::units::parse_duration, default_value = "10s")]
    pub lease: std::time::Duration,
    /// Log bytes stored per build: past this the log says where it was cut, and the step's further
    /// output is read and dropped (it never blocks the step).
    #[arg(long, value_parser = flotilla_api::units::parse_size, default_value = "64M")]
    pub max_log: u64,
    /// Finished runs (with their builds, logs and timelines) and project-manager log rows older than
    /// this are deleted, in small batches, every hour.
    #[arg(long, value_parser = flotilla_api::units::parse_duration, default_value = "90d")]
    pub retention: std::time::Duration,
    /// The key project secrets are sealed with (32 bytes; made, 0600, when absent). Coordinators
    /// sharing one database need the same file. Default: HOME/coordinator/secrets.key.
    #[arg(long, value_name = "FILE")]
    pub secrets_key: Option<std::path::PathBuf>,
}

/// Whether the coordinator's TCP listener speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// TLS unless the listener is on a loopback address.
    Auto,
    On,
    Off,
}

impl TlsMode {
    /// Whether a listener bound to `addr` serves TLS.
    pub fn applies(self, addr: std::net::SocketAddr) -> bool {
        match self {
            TlsMode::Auto => !addr.ip().is_loopback(),
            TlsMode::On => true,
            TlsMode::Off => false,
        }
    }
}

/// Starts the coordinator: its store, its tasks, its API on HOME's socket
/// and the optional TCP listener, until `stop` resolves.
pub async fn serve(
    home: &Path,
    args: &CoordinatorArgs,
    node: Option<NodeClient>,
    fleet: Vec<NodeClient>,
    discovery: Option<flotilla_coordinator::runtime::Discovery>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let data = home.join("coordinator");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    // Its database holds webhook secrets and its mirrors private code:
    // the coordinator's own, whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", data.display()))?;
    let store = match &args.database {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Store::postgres(url, 8)
            .map_err(|e| anyhow!("opening the PostgreSQL database: {}", flotilla_coordinator::error_chain(&e)))?,
        Some(other) => anyhow::bail!("--database {other:?}: give a postgres:// URL (SQLite is the default)"),
        None => {
            let db = data.join("coordinator.db");
            let store = Store::sqlite(&db)
                .map_err(|e| anyhow!("opening {}: {}", db.display(), flotilla_coordinator::error_chain(&e)))?;
            std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} private", db.display()))?;
            store
        }
    };
    let owner = coordinator_id(&data)?;
    let key = args.secrets_key.clone().unwrap_or_else(|| data.join("secrets.key"));
    let secrets = flotilla_coordinator::secrets::SecretBox::load_or_create(&key)
        .map_err(|e| anyhow!("loading the secrets key: {e}"))?;
    let c = Coordinator::new(
        store,
        node,
        CoordinatorConfig {
            data_dir: data.clone(),
            owner,
            max_builds: args.max_builds.max(1),
            fleet,
            node_lost_after: args.node_lost_after,
            lease: args.lease.max(std::time::Duration::from_secs(1)),
            max_log_bytes: args.max_log,
            retention: args.retention,
            discovery,
            secrets: std::sync::Arc::new(secrets),
        },
    );
    c.start().await.map_err(|e| anyhow!("starting the coordinator: {}", flotilla_coordinator::error_chain(&e)))?;
    // The API and the dashboard's pages, on the socket and over TCP alike.
    let router = flotilla_coordinator::api::router(c.clone()).merge(flotilla_dashboard::router(c.clone()));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut tcp = None;
    let listen = args.coordinator_listen.clone().unwrap_or_else(|| "127.0.0.1:7780".into());
    let url_file = home.join(URL_FILE);
    if listen != "none" {
        match tokio::net::TcpListener::bind(&listen).await {
            Ok(l) => {
                let addr = l.local_addr()?;
                let tls =
                    if args.coordinator_tls.applies(addr) { Some(tls_identity(&data, args, addr)?) } else { None };
                let (url, base) = match &tls {
                    Some(id) => (format!("https://{addr}#sha256={}", id.fingerprint()), format!("https://{addr}")),
                    None => (format!("http://{addr}"), format!("http://{addr}")),
                };
                std::fs::write(&url_file, format!("{url}\n"))
                    .with_context(|| format!("writing {}", url_file.display()))?;
                eprintln!(
                    "flotilla: coordinator on {url} (dashboard: {base}/; webhooks: POST /v1/webhooks/github/PROJECT; changes need the token in {})",
                    data.join("token").display()
                );
                if tls.is_none() && !addr.ip().is_loopback() {
                    eprintln!(
                        "flotilla: warning: the coordinator serves plain HTTP on {addr} (--coordinator-tls off): its token crosses the network in clear"
                    );
                }
                let mut rx = rx.clone();
                let router = router.clone();
                let token =
                    flotilla_node::tls::load_or_generate_token(&data).context("making the coordinator's token")?;
                tcp = Some(tokio::spawn(async move {
                    let stop = async move {
                        let _ = rx.wait_for(|s| *s).await;
                    };
                    if let Err(e) = flotilla_coordinator::api::serve_tcp(l, router, &token, tls.as_ref(), stop).await {
                        tracing::error!(error = %e, "the coordinator's TCP listener failed");
                    }
                }));
            }
            Err(e) if args.coordinator_listen.is_none() => {
                tracing::warn!(address = %listen, error = %e, "the coordinator's HTTP listener is off (the address is taken); the CLI uses its socket");
            }
            Err(e) => return Err(e).with_context(|| format!("listening on {listen}")),
        }
    }
    let socket = home.join(SOCKET);
    tracing::info!(socket = %socket.display(), "coordinator ready");
    let mut rx2 = rx.clone();
    let unix = flotilla_node::serve_router_unix(&socket, router, async move {
        let _ = rx2.wait_for(|s| *s).await;
    });
    let stopping = async move {
        stop.await;
        let _ = tx.send(true);
    };
    let (served, ()) = tokio::join!(unix, stopping);
    served.with_context(|| format!("serving on {}", socket.display()))?;
    if let Some(t) = tcp {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&url_file);
    Ok(())
}

/// The TCP listener's certificate: the operator's (--coordinator-cert), else
/// a self-signed one kept in HOME/coordinator/tls, naming the address it
/// listens on.
fn tls_identity(
    data: &Path,
    args: &CoordinatorArgs,
    addr: std::net::SocketAddr,
) -> anyhow::Result<flotilla_node::tls::TlsIdentity> {
    let names: Vec<String> = (!addr.ip().is_unspecified()).then(|| addr.ip().to_string()).into_iter().collect();
    flotilla_node::tls::TlsIdentity::load_or_generate(
        &data.join("tls"),
        args.coordinator_cert.as_deref(),
        args.coordinator_key.as_deref(),
        &names,
    )
    .context("setting up TLS for --coordinator-listen")
}

/// The coordinator's stable id (`HOME/coordinator/id`): the builds it runs
/// carry it, so after a restart it resumes exactly its own.
fn coordinator_id(data: &Path) -> anyhow::Result<String> {
    let f = data.join("id");
    if let Ok(id) = std::fs::read_to_string(&f) {
        let id = id.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id = format!("{}-{:x}", host.trim(), std::process::id() as u64 ^ flotilla_api::Timestamp::now().0);
    let tmp = data.join("id.tmp");
    std::fs::write(&tmp, &id)?;
    std::fs::rename(&tmp, &f)?;
    Ok(id)
}

/// `flotilla coordinator`: the role on its own, driving the node at
/// `--node` (default: HOME's node socket).
pub fn run(args: CoordinatorArgs, node: NodeArgs) -> anyhow::Result<i32> {
    let home = crate::cli::default_home(node.home.clone());
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    let rt = crate::daemon::daemon_runtime()?;
    rt.block_on(async move {
        let client = node_client(&node, &home)?;
        let fleet = fleet_clients(&node, &args)?;
        let discovery = discovery(&node);
        if client.is_none() && fleet.is_empty() && discovery.is_none() {
            anyhow::bail!(
                "no node to run builds on: give --node URL, --fleet-node URL or --names URL (nodes publish \
                 themselves there), or run a node with this --home"
            );
        }
        serve(&home, &args, client, fleet, discovery, crate::daemon::shutdown_signal()).await
    })?;
    Ok(0)
}

/// The node a coordinator was pointed at: `--node`, else HOME's node
/// socket when a node serves there; none when it finds its nodes in the
/// name table only.
pub fn node_client(node: &NodeArgs, home: &Path) -> anyhow::Result<Option<NodeClient>> {
    let ep = match &node.node {
        Some(url) => Endpoint::parse(url).map_err(|e| anyhow!(e))?,
        None if home.join("node.sock").exists() => Endpoint::Unix(home.join("node.sock")),
        None => return Ok(None),
    };
    crate::sandbox::node_at(node, ep).map(Some)
}

/// Nodes from the name table (`--names`, else the one of HOME/names.url),
/// reached with the node options' token and TLS trust; none without a table.
pub fn discovery(node: &NodeArgs) -> Option<flotilla_coordinator::runtime::Discovery> {
    let names = crate::names::client(node).ok()?;
    let args = node.clone();
    Some(flotilla_coordinator::runtime::Discovery {
        names,
        connect: std::sync::Arc::new(move |url: &str| {
            let (addr, pin) = flotilla_agent::http::split_pin(url);
            let ep = Endpoint::parse(addr).ok()?;
            crate::sandbox::node_pinned(&args, ep, pin)
                .inspect_err(|e| tracing::warn!(node = %addr, error = %format!("{e:#}"), "cannot reach a node from the name table"))
                .ok()
        }),
    })
}

/// The `--fleet-node` clients, with the node options' token and TLS trust.
pub fn fleet_clients(node: &NodeArgs, args: &CoordinatorArgs) -> anyhow::Result<Vec<NodeClient>> {
    args.fleet_nodes
        .iter()
        .map(|url| {
            let ep = Endpoint::parse(url).map_err(|e| anyhow!("--fleet-node {url:?}: {e}"))?;
            crate::sandbox::node_at(node, ep)
        })
        .collect()
}

/// How a client command finds the coordinator: `--coordinator URL`, else
/// HOME's socket.
pub fn client(node: &NodeArgs) -> anyhow::Result<CoordinatorClient> {
    // An https address may carry the certificate's fingerprint, as the
    // coordinator prints it (`https://host:port#sha256=…`); without one the
    // system's CAs are trusted.
    let mut pin = None;
    let ep = match &node.coordinator {
        Some(url) => {
            let (addr, p) = flotilla_agent::http::split_pin(url);
            pin = p;
            Endpoint::parse(addr).map_err(|e| anyhow!("--coordinator {addr}: {e}"))?
        }
        None => {
            let home = crate::cli::default_home(node.home.clone());
            let sock: PathBuf = home.join(SOCKET);
            if !sock.exists() {
                anyhow::bail!(
                    "no coordinator socket at {}: is `flotilla dev` (or `flotilla coordinator`) running? \
                     Point at one with --home DIR or --coordinator URL",
                    sock.display()
                );
            }
            Endpoint::Unix(sock)
        }
    };
    let mut http = HttpClient::new(ep).with_token(node.coordinator_token.clone());
    if let Some(pin) = pin {
        http = http
            .with_cert_sha256(pin)
            .map_err(|e| anyhow!("--coordinator {}: {e}", node.coordinator.as_deref().unwrap_or_default()))?;
    }
    Ok(CoordinatorClient::new(http))
}

/// Keeps the coordinator in `flotilla dev` from starting before its node
/// serves (it resumes builds at once).
pub async fn wait_for_socket(socket: &Path) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
