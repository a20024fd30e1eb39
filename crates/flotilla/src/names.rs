//! `flotilla names ...`: the name table from the shell, and its server.
//!
//! Reads are open; writes carry the table's bearer token: `--names-token`
//! (`$FLOTILLA_NAMES_TOKEN`), else, for the table `flotilla dev` runs (found
//! through `HOME/names.url`), the token it keeps in `HOME/names.token`.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use flotilla_names::{EtcdConfig, EtcdStore, MemoryStore, NamesClient, Store};

use crate::cli::{NamesCommand, NodeArgs};
use crate::output;

/// The file `flotilla dev` writes its name table's URL to.
pub const URL_FILE: &str = "names.url";

/// The file (0600) holding the write token of the table `flotilla dev` or
/// `flotilla names serve` runs on a data directory, unless given one.
pub const TOKEN_FILE: &str = "names.token";

/// The write token a table serving from `home` requires: `given`
/// (`--names-token`), else the one in `HOME/names.token`, generated there
/// (0600) on the first start.
pub fn server_token(given: Option<&str>, home: &std::path::Path) -> anyhow::Result<(String, String)> {
    match given {
        Some(t) => {
            flotilla_names::auth::check_token(t).context("checking --names-token")?;
            Ok((t.to_string(), "--names-token".into()))
        }
        None => {
            let path = home.join(TOKEN_FILE);
            let t = flotilla_names::auth::load_or_generate_token(&path)
                .map_err(|e| anyhow!("making the name table's token: {}", flotilla_agent::http::error_chain(&e)))?;
            Ok((t, path.display().to_string()))
        }
    }
}

/// The name table to talk to: `--names`, else the one `flotilla dev` runs.
/// Writes carry `--names-token`, else (for `dev`'s table) HOME/names.token.
pub fn client(args: &NodeArgs) -> anyhow::Result<NamesClient> {
    let mut token = args.names_token.clone().filter(|t| !t.is_empty());
    let url = match &args.names {
        Some(u) => u.clone(),
        None => {
            let home = crate::cli::default_home(args.home.clone());
            let file = home.join(URL_FILE);
            if token.is_none() {
                // Only with dev's own URL: a token from this machine's data
                // directory is never sent to a table named on the command line.
                token = std::fs::read_to_string(home.join(TOKEN_FILE))
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty());
            }
            std::fs::read_to_string(&file).map(|s| s.trim().to_string()).map_err(|_| {
                anyhow!(
                    "no name table given: pass --names URL (or $FLOTILLA_NAMES), or run `flotilla dev --home {}`, \
                         which serves one and writes its URL to {}",
                    home.display(),
                    file.display()
                )
            })?
        }
    };
    Ok(NamesClient::connect(&url)
        .map_err(|e| anyhow!("name table {url}: {}", flotilla_agent::http::error_chain(&e)))?
        .with_token(token))
}

/// Explains a refused write: which token the table wants.
fn write_error(e: flotilla_agent::http::ClientError) -> anyhow::Error {
    let refused =
        matches!(&e, flotilla_agent::http::ClientError::Api(a) if a.code == flotilla_api::ErrorCode::Unauthorized);
    let e = anyhow::Error::new(e);
    if refused {
        e.context(
            "the name table refuses writes without its token: pass --names-token (or $FLOTILLA_NAMES_TOKEN); \
             `flotilla dev` and `flotilla names serve` keep theirs in HOME/names.token",
        )
    } else {
        e
    }
}

/// `nodes/<id>` → the node's API URL.
pub async fn node_url(args: &NodeArgs, id: &str) -> anyhow::Result<String> {
    let r = client(args)?.resolve(&format!("nodes/{id}")).await.with_context(|| format!("finding node {id}"))?;
    r.servers.into_iter().next().ok_or_else(|| anyhow!("node {id} is in the name table but has no live address"))
}

pub async fn run(cmd: NamesCommand, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    match cmd {
        NamesCommand::Serve { .. } => unreachable!("served by `serve`"),
        NamesCommand::Ls { pattern } => {
            let entries = client(&node)?.glob(pattern.as_deref().unwrap_or("...")).await?;
            if json {
                output::json(&entries)?;
            } else {
                let rows: Vec<Vec<String>> = entries
                    .iter()
                    .flat_map(|e| {
                        e.servers
                            .iter()
                            .map(|s| vec![e.name.clone(), s.server.clone(), format!("{:.0}s", s.expires_in_s)])
                    })
                    .collect();
                output::table(&["NAME", "SERVER", "EXPIRES IN"], &rows);
            }
            Ok(0)
        }
        NamesCommand::Resolve { name } => {
            let r = client(&node)?.resolve(&name).await?;
            if json {
                output::json(&r)?;
            } else {
                for s in &r.servers {
                    if r.suffix.is_empty() { println!("{s}") } else { println!("{s} {}", r.suffix) }
                }
            }
            Ok(0)
        }
        NamesCommand::Mount { name, server, ttl } => {
            let m = client(&node)?.mount(&name, &server, ttl).await.map_err(write_error)?;
            println!("{} {} ttl {:.0}s", m.name, m.server, m.ttl_s);
            Ok(0)
        }
        NamesCommand::Unmount { name, server } => {
            let removed = client(&node)?.unmount(&name, &server).await.map_err(write_error)?;
            if !removed {
                eprintln!("{name} {server}: was not mounted");
            }
            Ok(0)
        }
    }
}

/// `flotilla names serve`: reads open, writes with the token of
/// `--names-token`, else of HOME/names.token (generated on the first start).
/// `names serve --tls`: the operator's certificate and key, or none for a
/// self-signed pair in HOME/tls.
#[derive(Debug)]
pub struct Tls {
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

pub fn serve(
    listen: std::net::SocketAddr,
    etcd: Vec<String>,
    prefix: String,
    etcd_tls: flotilla_names::EtcdTls,
    tls: Option<Tls>,
    node: &NodeArgs,
) -> anyhow::Result<i32> {
    let home = crate::cli::default_home(node.home.clone());
    let (token, token_from) = server_token(node.names_token.as_deref(), &home)?;
    let auth = flotilla_names::WriteAuth::new(&token).context("checking the name table's token")?;
    drop(token);
    crate::daemon::daemon_runtime()?.block_on(async move {
        let store: Arc<dyn Store> = if etcd.is_empty() {
            Arc::new(MemoryStore::new())
        } else {
            let mut cfg = EtcdConfig::new(etcd[0].clone()).with_prefix(prefix);
            cfg.endpoints = etcd.clone();
            cfg.tls = etcd_tls;
            Arc::new(EtcdStore::connect(&cfg).await.with_context(|| format!("connecting to etcd at {etcd:?}"))?)
        };
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        let addr = listener.local_addr()?;
        let kind = if etcd.is_empty() { "in memory" } else { "on etcd" };
        let Some(tls) = tls else {
            eprintln!("flotilla: name table on http://{addr} ({kind}; writes need the token in {token_from})");
            flotilla_names::serve(listener, store, auth, crate::daemon::shutdown_signal())
                .await
                .context("serving the name table")?;
            return Ok(0);
        };
        let mut names = Vec::new();
        if !addr.ip().is_unspecified() {
            names.push(addr.ip().to_string());
        }
        let identity = flotilla_node::tls::TlsIdentity::load_or_generate(
            &home.join("tls"),
            tls.cert.as_deref(),
            tls.key.as_deref(),
            &names,
        )
        .context("setting up TLS for the name table")?;
        // Reads stay open and writes check the table's own token: the
        // router guards itself.
        eprintln!(
            "flotilla: name table on https://{addr}#sha256={} ({kind}; writes need the token in {token_from})",
            identity.fingerprint()
        );
        let router = flotilla_names::server::router(store, auth);
        flotilla_node::tls::serve_tls_open(router, listener, &identity, crate::daemon::shutdown_signal())
            .await
            .context("serving the name table over TLS")?;
        Ok(0)
    })
}
