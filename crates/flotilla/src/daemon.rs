//! `flotilla dev`, `flotilla node` and `flotilla agent`.

use std::os::unix::fs::PermissionsExt;

use anyhow::{Context, bail};
use flotilla_node::backend::{NodeBackend, ProcessNodeBackend, VmNodeBackend};
use flotilla_node::selfupdate::{NodeLock, Stop, StopSwitch, Updater};
use flotilla_node::{Node, NodeConfig};

use crate::cli::{AgentArgs, DaemonArgs};

/// `flotilla node`, or with `coordinator` (`flotilla dev`) the node, its
/// name table and a coordinator in one process.
pub fn node(args: DaemonArgs, coordinator: Option<crate::coordinator::CoordinatorArgs>) -> anyhow::Result<i32> {
    let dev = coordinator.is_some();
    if args.test_mode {
        return test_mode(args);
    }
    if flotilla_sandbox::sys::euid() != 0 {
        bail!(
            "the node must run as root: it gives every sandbox its own range of user ids and its own cgroup \
             (try: sudo flotilla {})",
            if dev { "dev" } else { "node" }
        );
    }
    let home = crate::cli::default_home(args.home.clone());
    std::fs::create_dir_all(&home).with_context(|| format!("creating the data directory {}", home.display()))?;
    // Traversable but not listable: each sandbox's own (unprivileged) uid must
    // reach its mount points under here; the node socket itself is 0600.
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("securing {}", home.display()))?;
    let lock = NodeLock::acquire(&home).map_err(anyhow::Error::new)?;
    let exe = std::env::current_exe().context("finding our own executable (the sandbox agent)")?;
    // Image sandboxes exec the agent inside the image's root: a static
    // one (the microVM guest agent, or this binary when it is static)
    // runs in any image, busybox-only and musl roots included.
    let agent = args.guest_agent.clone().unwrap_or(exe);
    let stop = StopSwitch::new();
    let updater = Updater::open(home.clone(), std::env::args_os().collect(), agent.clone(), stop.clone())
        .map_err(anyhow::Error::new)?;
    let runtime = daemon_runtime()?;
    let served = runtime.block_on(serve(args, coordinator, home, agent, stop, updater.clone()));
    let (stopped, handed) = served?;
    match stopped {
        Stop::Shutdown => Ok(0),
        Stop::HandOver => {
            // The lock is close-on-exec: the next image takes it again. The
            // runtime is not dropped (that would wait for blocking tasks):
            // exec replaces the whole process, same pid, sandboxes still
            // our children.
            drop(lock);
            let e = updater.exec_current(&handed);
            updater.restore_after_failed_exec();
            runtime.shutdown_background();
            Err(anyhow::Error::new(e).context("re-executing HOME/current/flotilla for the hand-over"))
        }
    }
}

/// Puts the node's egress policy in place; without it, `outbound`
/// sandboxes are refused (with the reason) and the rest works.
fn egress_policy(
    home: &std::path::Path,
    allow: &[flotilla_sandbox::egress::Cidr],
) -> Result<flotilla_sandbox::egress::EgressPolicy, String> {
    let swept = flotilla_sandbox::egress::sweep_stale();
    if !swept.is_empty() {
        tracing::info!(chains = ?swept, "removed the egress rules of nodes whose home is gone");
    }
    let policy = flotilla_sandbox::egress::EgressPolicy::for_home(home, allow.to_vec());
    match policy.install() {
        Ok(()) => {
            tracing::info!(
                chain = policy.chain(),
                gid = policy.gid,
                allowed = ?policy.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "egress policy in place for outbound sandboxes"
            );
            Ok(policy)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no egress policy: outbound sandboxes are refused");
            Err(e.to_string())
        }
    }
}

/// Runs the node until it stops, and says why.
async fn serve(
    args: DaemonArgs,
    coordinator: Option<crate::coordinator::CoordinatorArgs>,
    home: std::path::PathBuf,
    agent: std::path::PathBuf,
    stop: std::sync::Arc<StopSwitch>,
    updater: std::sync::Arc<Updater>,
) -> anyhow::Result<(Stop, Vec<(String, String)>)> {
    let dev = coordinator.is_some();
    let egress = egress_policy(&home, &args.egress_allow);
    let process = ProcessNodeBackend::new(home.clone(), agent, vec!["agent".into()], &egress)
        .map_err(anyhow::Error::new)?
        .allow_image_dirs(&args.allow_image_dirs)
        .context("reading --allow-image-dir")?;
    let backend = NodeBackend { process, vm: VmNodeBackend::new(home.clone(), args.guest_agent.clone(), &egress) };
    let config = NodeConfig {
        stop_apps: args.stop_apps,
        max_sandboxes: args.max_sandboxes as usize,
        ..NodeConfig::new(home.clone())
    };
    let node = Node::open(backend, config).await.map_err(anyhow::Error::new)?;
    updater.start();
    let socket = home.join("node.sock");
    let info = node.info();
    tracing::info!(
        node_id = %info.node_id,
        socket = %socket.display(),
        cgroup = %info.cgroup,
        "node ready"
    );
    if dev {
        eprintln!(
            "flotilla dev: node {} ready on unix://{}\n  try:  flotilla sandbox create --home {}\n  stop: Ctrl-C (sandboxes are stopped, workspaces kept; app instances keep running unless --stop-apps)",
            info.node_id,
            socket.display(),
            home.display()
        );
    }
    // A signal stops both listeners, as does a hand-over (the updater asks).
    let signalled = stop.clone();
    tokio::spawn(async move {
        signal_received().await;
        if signalled.request(Stop::Shutdown) {
            tracing::info!("shutting down: stopping running sandboxes");
        }
    });
    let stopped = |s: std::sync::Arc<StopSwitch>| async move { s.stopped().await };
    // The update routes find the updater as an extension of the router.
    let router = updater.attach(flotilla_node::api::router(node.clone()));
    let mut https_url = None;
    let mut tls_task = None;
    if let Some(addr) = args.listen {
        let tls_dir = home.join("tls");
        let mut names = args.tls_names.clone();
        if !addr.ip().is_unspecified() {
            names.push(addr.ip().to_string());
        }
        let identity = flotilla_node::tls::TlsIdentity::load_or_generate(
            &tls_dir,
            args.tls_cert.as_deref(),
            args.tls_key.as_deref(),
            &names,
        )
        .context("setting up TLS for --listen")?;
        let identity = match &args.client_ca {
            Some(ca) => identity.with_client_ca(ca).context("setting up --client-ca")?,
            None => identity,
        };
        let token = match &args.token {
            Some(t) => {
                flotilla_node::tls::check_token(t).context("checking --token")?;
                t.clone()
            }
            None => flotilla_node::tls::load_or_generate_token(&tls_dir).context("making the API token")?,
        };
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
        let bound = listener.local_addr().context("reading the bound address")?;
        https_url = Some(format!("https://{bound}#sha256={}", identity.fingerprint()));
        tracing::info!(
            address = %bound,
            certificate = %identity.cert_path().display(),
            sha256 = identity.fingerprint(),
            "serving the node API over TLS; clients need the bearer token"
        );
        eprintln!(
            "flotilla: node API on https://{bound} (certificate {} sha256 {}; token in {})",
            identity.cert_path().display(),
            identity.fingerprint(),
            if args.token.is_some() { "--token".to_string() } else { tls_dir.join("token").display().to_string() }
        );
        let router = router.clone();
        let s = stop.clone();
        tls_task = Some(tokio::spawn(async move {
            let done = async move {
                s.stopped().await;
            };
            if let Err(e) = flotilla_node::tls::serve_tls(router, listener, &identity, token, done).await {
                tracing::error!(error = %e, "the TLS listener failed");
            }
        }));
    }
    // Where others find this node: `nodes/<id>` in the name table, which
    // `flotilla dev` serves itself (in memory) and a node joins with --names.
    // A node serving TLS is meant to be reached over the network: it
    // publishes that address with its certificate's fingerprint (a client
    // pins it), not a socket path that means nothing on another host.
    let urls = match &https_url {
        Some(https) => vec![https.clone()],
        None => vec![format!("unix://{}", socket.display())],
    };
    let names = crate::daemon::names_for(dev, args.names.as_deref(), args.names_token.as_deref(), &home).await?;
    let publisher = match &names {
        Some(n) => Some(crate::daemon::publish(n, &info.node_id, &urls).await?),
        None => None,
    };
    if let Some(n) = &names {
        // Instances publish their forwarded addresses in the same table.
        node.apps().set_name_table(name_table(n)?);
    }
    // A new version just handed over to checks itself and commits, or
    // gives up: then it exits, leaving every sandbox running, and the
    // watchdog brings the previous version back.
    // How the last hand-over ended goes on the event feed once (a revert is
    // announced by the version that came back).
    announce_update(&node, &updater);
    let checking = updater.clone();
    let check_socket = socket.clone();
    let announcing = node.clone();
    tokio::spawn(async move {
        match checking.check_after_switch(&check_socket).await {
            Ok(Some(o)) => {
                tracing::info!(update = %o.id, version = %o.to, "the new version checked itself and committed");
                announce_update(&announcing, &checking);
            }
            Ok(None) => {}
            Err(why) => {
                tracing::error!(reason = %why, "the new version failed its check after the switch; exiting so the previous one comes back");
                std::process::exit(1);
            }
        }
    });
    // `dev` runs a coordinator beside the node, driving it over its socket.
    let names_url = match &names {
        Some(Names::Embedded { server, .. }) => Some(server.url()),
        Some(Names::Remote { url, .. }) => Some(url.clone()),
        None => None,
    };
    let coordinator_task = coordinator.map(|cargs| {
        let home = home.clone();
        let sock = socket.clone();
        let s = stop.clone();
        tokio::spawn(async move {
            crate::coordinator::wait_for_socket(&sock).await;
            let client = flotilla_node::NodeClient::new(flotilla_agent::http::HttpClient::new(
                flotilla_agent::http::Endpoint::Unix(sock),
            ));
            // Further nodes: reached as `flotilla coordinator` reaches them,
            // with $FLOTILLA_TOKEN (the clients' token) and a pin when the
            // address carries one.
            let reach = crate::cli::NodeArgs { token: std::env::var("FLOTILLA_TOKEN").ok(), ..Default::default() };
            let connect = move |url: &str| {
                let (addr, pin) = flotilla_agent::http::split_pin(url);
                let ep = flotilla_agent::http::Endpoint::parse(addr).map_err(|e| anyhow::anyhow!(e))?;
                crate::sandbox::node_pinned(&reach, ep, pin)
            };
            let mut fleet = Vec::new();
            for url in &cargs.fleet_nodes {
                match connect(url) {
                    Ok(c) => fleet.push(c),
                    Err(e) => {
                        tracing::error!(url = %url, error = %format!("{e:#}"), "--fleet-node: not an address; left out")
                    }
                }
            }
            // Nodes that publish themselves in dev's name table join the fleet.
            let table = names_url.and_then(|u| flotilla_agent::http::Endpoint::parse(&u).ok());
            let discovery = table.map(|ep| flotilla_coordinator::runtime::Discovery {
                names: flotilla_names::NamesClient::new(flotilla_agent::http::HttpClient::new(ep)),
                connect: std::sync::Arc::new(move |url: &str| connect(url).ok()),
            });
            if let Err(e) = crate::coordinator::serve(&home, &cargs, Some(client), fleet, discovery, async move {
                s.stopped().await;
            })
            .await
            {
                tracing::error!(error = %format!("{e:#}"), "the coordinator stopped");
                eprintln!("flotilla dev: the coordinator failed: {e:#}");
            }
        })
    });
    let apps = node.apps().clone();
    let served = node.clone();
    let reason = flotilla_node::serve_unix(node, &socket, router, stopped(stop.clone()))
        .await
        .with_context(|| format!("serving on {}", socket.display()))?;
    // The egress rules go with the node unless an outbound sandbox (an app
    // instance) outlives it; a hand-over keeps them for the next image.
    if let Ok(policy) = &egress
        && reason == Stop::Shutdown
        && !served.runs_outbound()
    {
        policy.remove();
    }
    // At a hand-over the apps' forwarded ports go to the next image as open
    // sockets: connections wait in their backlog, none is refused.
    let handed = match reason {
        Stop::HandOver => vec![apps.handover_listeners().await],
        Stop::Shutdown => Vec::new(),
    };
    if let Some(t) = coordinator_task {
        let _ = tokio::time::timeout(flotilla_node::tls::SHUTDOWN_GRACE, t).await;
    }
    if let Some(t) = tls_task {
        // It drains within its own grace.
        let _ = tokio::time::timeout(flotilla_node::tls::SHUTDOWN_GRACE * 2, t).await;
    }
    if let Some(p) = publisher {
        // At a hand-over the name stays mounted: the next image publishes
        // the same name and addresses at once, and the TTL covers the gap.
        if reason == Stop::Shutdown {
            p.stop().await;
            p.wait_for_stop().await;
        }
    }
    if let Some(n) = names {
        n.shutdown().await;
    }
    Ok((reason, handed))
}

/// `flotilla node --test-mode --socket PATH`: a candidate binary proving
/// it works, touching nothing (see `flotilla_node::selfupdate`).
fn test_mode(args: DaemonArgs) -> anyhow::Result<i32> {
    let socket = args.socket.clone().context("--test-mode needs --socket")?;
    let home = crate::cli::default_home(args.home.clone());
    let agent = match args.guest_agent.clone() {
        Some(a) => a,
        None => std::env::current_exe().context("finding our own executable (the sandbox agent)")?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async move {
        flotilla_node::selfupdate::serve_test_mode(&socket, home, agent, signal_received())
            .await
            .with_context(|| format!("serving in test mode on {}", socket.display()))
    })?;
    Ok(0)
}

/// The runtime of a long-running role: two workers are plenty, since the
/// heavy work (tar extraction, sandbox boots) runs on blocking threads.
pub fn daemon_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the runtime")
}

pub async fn shutdown_signal() {
    signal_received().await;
    tracing::info!("shutting down");
}

/// Resolves at SIGTERM or SIGINT.
pub async fn signal_received() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// `flotilla node setup-vm`: builds the guest kernel when asked (from
/// `kernel_source`), makes the initramfs and probes the accelerator,
/// printing what it found.
pub fn setup_vm(
    home: std::path::PathBuf,
    kernel_source: Option<std::path::PathBuf>,
    json: bool,
) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&home).with_context(|| format!("creating the data directory {}", home.display()))?;
    if let Some(source) = kernel_source {
        let assets = flotilla_vm::VmBackend::new(&home, None).assets_dir();
        let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        eprintln!("building the guest kernel from {} with {jobs} jobs ...", source.display());
        let mut steps = crate::output::Steps::new("building the guest kernel");
        let started = std::time::Instant::now();
        let built = flotilla_vm::kernel::build(&assets, &source, jobs, &mut |what| steps.set(what));
        steps.finish();
        let (image, built) = built.context("building the guest kernel")?;
        eprintln!("built the guest kernel {} ({}) in {:.0?}", image.display(), built.release, started.elapsed());
    }
    daemon_runtime()?.block_on(async move {
        let vm = flotilla_vm::VmBackend::new(&home, None);
        if let Err(why) = vm.available() {
            bail!("microVMs cannot run here: {why}");
        }
        eprintln!("preparing the guest kernel and initramfs in {} ...", home.join("vm").display());
        let assets = vm.assets().await.map_err(|e| anyhow::anyhow!(flotilla_agent::http::error_chain(&e)))?;
        eprintln!("probing the accelerator (boots a guest under KVM with a deadline) ...");
        let accel = vm.accel().await.map_err(|e| anyhow::anyhow!(flotilla_agent::http::error_chain(&e)))?;
        if json {
            crate::output::json(&serde_json::json!({
                "kernel": assets.vmlinux, "initramfs": assets.initramfs, "release": assets.release,
                "accelerator": accel.accel, "reason": accel.reason,
            }))?;
        } else {
            println!("kernel       {} ({})", assets.vmlinux.display(), assets.release);
            println!("initramfs    {}", assets.initramfs.display());
            println!("accelerator  {}: {}", accel.accel.as_str(), accel.reason);
        }
        Ok(0)
    })
}

pub fn agent(args: AgentArgs) -> anyhow::Result<i32> {
    if args.vm {
        // The guest's PID 1: nothing to return to, so report and power off.
        if args.probe {
            flotilla_vm::guest::probe();
        }
        let e = flotilla_vm::guest::run();
        eprintln!("flotilla: guest init failed: {e}");
        println!("flotilla: guest init failed: {e}");
        flotilla_vm::guest::power_off();
    }
    flotilla_agent::run(flotilla_agent::AgentConfig {
        listen_fd: args.listen_fd,
        listen_path: args.listen,
        ready_fd: args.ready_fd,
        workspace: args.workspace,
        init: args.init,
    })
    .context("agent")?;
    Ok(0)
}

/// The name table a node publishes to: its own in-memory one for `dev`, a
/// remote one with `--names URL` (and the token its writes need), or none.
pub enum Names {
    Embedded {
        server: flotilla_names::ServerHandle,
        store: std::sync::Arc<dyn flotilla_names::Store>,
        url_file: std::path::PathBuf,
    },
    Remote {
        url: String,
        token: String,
    },
}

impl Names {
    pub async fn shutdown(self) {
        if let Names::Embedded { server, url_file, .. } = self {
            let _ = std::fs::remove_file(url_file);
            let _ = server.shutdown().await;
        }
    }
}

/// With `url` (`--names`): that table, written to with `token`
/// (`--names-token`), which it must have. Else for `dev`: an in-memory table
/// on loopback, its URL in HOME/names.url and the token its writes need in
/// HOME/names.token (0600; or `token` when given), where the CLI finds both.
pub async fn names_for(
    dev: bool,
    url: Option<&str>,
    token: Option<&str>,
    home: &std::path::Path,
) -> anyhow::Result<Option<Names>> {
    let token = token.filter(|t| !t.is_empty());
    if let Some(url) = url {
        let Some(token) = token else {
            bail!(
                "--names {url} needs the name table's write token to publish this node: pass --names-token \
                 (or set $FLOTILLA_NAMES_TOKEN); the table's operator has it (`flotilla names serve` keeps it in \
                 its HOME/names.token)"
            );
        };
        flotilla_names::auth::check_token(token).context("checking --names-token")?;
        return Ok(Some(Names::Remote { url: url.to_string(), token: token.to_string() }));
    }
    if !dev {
        return Ok(None);
    }
    let (token, token_from) = crate::names::server_token(token, home)?;
    let store: std::sync::Arc<dyn flotilla_names::Store> = std::sync::Arc::new(flotilla_names::MemoryStore::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the name table")?;
    let server = flotilla_names::ServerHandle::spawn_with_token(listener, store.clone(), &token)
        .context("serving the name table")?;
    let url_file = home.join(crate::names::URL_FILE);
    std::fs::write(&url_file, format!("{}\n", server.url()))
        .with_context(|| format!("writing {}", url_file.display()))?;
    eprintln!("flotilla dev: name table on {} (in memory; writes need the token in {token_from})", server.url());
    Ok(Some(Names::Embedded { server, store, url_file }))
}

/// Publishes `nodes/<id>` → each of `urls`, refreshed every 10 seconds.
pub async fn publish(names: &Names, node_id: &str, urls: &[String]) -> anyhow::Result<flotilla_names::Publisher> {
    let table = name_table(names)?;
    let p =
        flotilla_names::Publisher::new(table, flotilla_names::PublisherConfig::new(std::time::Duration::from_secs(10)));
    for u in urls {
        p.add_server(u).await.map_err(|e| anyhow::anyhow!("publishing {u}: {e}"))?;
    }
    p.add_name(&format!("nodes/{node_id}")).await.map_err(|e| anyhow::anyhow!("publishing nodes/{node_id}: {e}"))?;
    tracing::info!(name = %format!("nodes/{node_id}"), servers = ?urls, "publishing this node in the name table");
    // The first mounts were tried: say at once if the table refused them
    // (a wrong token, say) rather than only in the refresh logs.
    for s in p.status().await {
        if let Some(e) = s.last_mount_error {
            eprintln!("flotilla: publishing {} -> {} failed (retried every 10s): {e}", s.name, s.server);
        }
    }
    Ok(p)
}

/// A client of the name table the node publishes to (its apps too).
pub fn name_table(names: &Names) -> anyhow::Result<std::sync::Arc<dyn flotilla_names::NameTable>> {
    Ok(match names {
        Names::Embedded { store, .. } => std::sync::Arc::new(flotilla_names::StoreTable::new(store.clone())),
        Names::Remote { url, token } => std::sync::Arc::new(
            flotilla_names::NamesClient::connect(url)
                .map_err(|e| anyhow::anyhow!("name table {url}: {}", flotilla_agent::http::error_chain(&e)))?
                .with_token(Some(token.clone())),
        ),
    })
}

/// Publishes the outcome in `HOME/update.last` on the event feed, once per
/// hand-over (`HOME/update.announced` holds the last id announced).
fn announce_update<B: flotilla_node::Backend>(node: &Node<B>, updater: &Updater) {
    let Ok(Some(outcome)) = updater.layout().read_last() else { return };
    let marker = node.config().home.join("update.announced");
    if std::fs::read_to_string(&marker).is_ok_and(|id| id.trim() == outcome.id) {
        return;
    }
    let _ = std::fs::write(&marker, &outcome.id);
    node.events().publish(flotilla_api::EventBody::NodeUpdate { outcome: Box::new(outcome) });
}
