//! `flotilla names ...`: the name table from the shell, and its server.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use flotilla_names::{EtcdConfig, EtcdStore, MemoryStore, NamesClient, Store};

use crate::cli::{NamesCommand, NodeArgs};
use crate::output;

/// The file `flotilla dev` writes its name table's URL to.
pub const URL_FILE: &str = "names.url";

/// The name table to talk to: `--names`, else the one `flotilla dev` runs.
pub fn client(args: &NodeArgs) -> anyhow::Result<NamesClient> {
    let url = match &args.names {
        Some(u) => u.clone(),
        None => {
            let home = crate::cli::default_home(args.home.clone());
            let file = home.join(URL_FILE);
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
    NamesClient::connect(&url).map_err(|e| anyhow!("name table {url}: {}", flotilla_agent::http::error_chain(&e)))
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
            let m = client(&node)?.mount(&name, &server, ttl).await?;
            println!("{} {} ttl {:.0}s", m.name, m.server, m.ttl_s);
            Ok(0)
        }
        NamesCommand::Unmount { name, server } => {
            let removed = client(&node)?.unmount(&name, &server).await?;
            if !removed {
                eprintln!("{name} {server}: was not mounted");
            }
            Ok(0)
        }
    }
}

/// `flotilla names serve`.
pub fn serve(listen: std::net::SocketAddr, etcd: Vec<String>, prefix: String) -> anyhow::Result<i32> {
    crate::daemon::daemon_runtime()?.block_on(async move {
        let store: Arc<dyn Store> = if etcd.is_empty() {
            Arc::new(MemoryStore::new())
        } else {
            let mut cfg = EtcdConfig::new(etcd[0].clone()).with_prefix(prefix);
            cfg.endpoints = etcd.clone();
            Arc::new(EtcdStore::connect(&cfg).await.with_context(|| format!("connecting to etcd at {etcd:?}"))?)
        };
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        let addr = listener.local_addr()?;
        eprintln!("flotilla: name table on http://{addr} ({})", if etcd.is_empty() { "in memory" } else { "on etcd" });
        flotilla_names::serve(listener, store, crate::daemon::shutdown_signal())
            .await
            .context("serving the name table")?;
        Ok(0)
    })
}
