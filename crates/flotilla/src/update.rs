//! `flotilla node update | revert | versions`, and the hidden `node
//! watchdog` a node starts to guard its own hand-over. The protocol is
//! `flotilla_node::selfupdate`'s; this file only asks and reports.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use flotilla_agent::http::Endpoint;
use flotilla_api::{NodeUpdate, NodeUpdateRequest, Timestamp, UpdateOutcome, UpdateResult};
use flotilla_node::NodeClient;
use flotilla_node::selfupdate::{Layout, Link};
use http::Method;

use crate::cli::NodeArgs;
use crate::output;
use crate::sandbox::client;

/// How long past the hand-over's deadline the CLI waits for an outcome:
/// the watchdog reacts within a poll and the old version starts in seconds.
const OUTCOME_MARGIN: Duration = Duration::from_secs(60);

/// `flotilla node update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The new binary: a path on the node's host, or an http(s) URL the node downloads.
    #[arg(long, value_name = "PATH|URL")]
    pub binary: String,
    /// Its SHA-256 (hex): the node refuses a binary with another digest before running it.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// Return once the node hands over, without waiting for the new version to commit.
    #[arg(long)]
    pub no_wait: bool,
}

/// `flotilla node revert`.
#[derive(Debug, Args)]
pub struct RevertArgs {
    /// Return once the node hands over, without waiting for the old version to commit.
    #[arg(long)]
    pub no_wait: bool,
}

/// `flotilla node watchdog` (started by the node, not by people).
#[derive(Debug, Args)]
pub struct WatchdogArgs {
    /// The hand-over to guard (its id in HOME/update.pending).
    #[arg(long)]
    pub update: String,
    /// Start the watchdog in its own session, print its pid and return.
    #[arg(long)]
    pub detach: bool,
}

pub async fn update(args: UpdateArgs, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    let binary = if args.binary.starts_with("http://") || args.binary.starts_with("https://") {
        args.binary
    } else {
        // The node reads the path on its host: make it absolute here.
        std::path::absolute(&args.binary)
            .with_context(|| format!("resolving {}", args.binary))?
            .to_string_lossy()
            .into_owned()
    };
    let c = client(&node).await?;
    eprintln!("flotilla: updating the node to {binary}: staging it, then trying it in test mode ...");
    let req = NodeUpdateRequest { binary, sha256: args.sha256 };
    let handed: NodeUpdate = c.http().json(Method::POST, "/v1/node/update", Some(&req)).await?;
    follow(&c, handed, args.no_wait, json).await
}

pub async fn revert(args: RevertArgs, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    let c = client(&node).await?;
    eprintln!("flotilla: reverting the node to its previous version: trying it in test mode ...");
    let handed: NodeUpdate = c.http().json(Method::POST, "/v1/node/revert", None::<&()>).await?;
    follow(&c, handed, args.no_wait, json).await
}

/// Reports the hand-over's steps, then waits for its outcome.
async fn follow(c: &NodeClient, handed: NodeUpdate, no_wait: bool, json: bool) -> anyhow::Result<i32> {
    for st in &handed.steps {
        eprintln!("  {:<18} {}", st.name, st.detail.as_deref().unwrap_or(""));
    }
    eprintln!(
        "flotilla: handing over from version {} to {} (pid {} re-executes; it must commit by {})",
        handed.from.id, handed.to.id, handed.pid, handed.deadline
    );
    let outcome = if no_wait { None } else { wait_for_outcome(c, &handed).await? };
    if json {
        output::json(&serde_json::json!({ "update": handed, "outcome": outcome }))?;
    }
    let Some(o) = outcome else {
        if !no_wait {
            eprintln!(
                "flotilla: the node answers again; the outcome is in HOME/update.last on its host (a remote node's \
                 commit cannot be seen from here)"
            );
        }
        return Ok(0);
    };
    match o.result {
        UpdateResult::Committed => {
            eprintln!("flotilla: version {} runs and committed", o.to);
            Ok(0)
        }
        UpdateResult::Reverted => {
            bail!(
                "version {} was reverted, version {} runs again: {}",
                o.to,
                o.from,
                o.reason.as_deref().unwrap_or("no reason recorded")
            )
        }
    }
}

/// The data directory of a node reached over its Unix socket (`HOME/node.sock`).
fn local_home(c: &NodeClient) -> Option<PathBuf> {
    match c.http().endpoint() {
        Endpoint::Unix(sock) => sock.parent().map(Path::to_path_buf),
        Endpoint::Tcp(_) | Endpoint::Https(_) | Endpoint::Dial(_) => None,
    }
}

/// Waits until the hand-over is decided and a node answers again. For a
/// local node the outcome comes from `HOME/update.last`; for a remote one
/// from `GET /v1/node/update`.
async fn wait_for_outcome(c: &NodeClient, handed: &NodeUpdate) -> anyhow::Result<Option<UpdateOutcome>> {
    let layout = local_home(c).map(Layout::new);
    let deadline = Instant::now() + Timestamp::now().until(handed.deadline) + OUTCOME_MARGIN;
    loop {
        let decided = match &layout {
            Some(l) => {
                let pending = l.read_pending().ok().flatten().is_some_and(|p| p.id == handed.id);
                match l.read_last() {
                    Ok(Some(o)) if o.id == handed.id && !pending => Some(Some(o)),
                    _ => None,
                }
            }
            // A remote node says itself, once it answers again.
            None => match c
                .http()
                .json::<flotilla_api::NodeUpdateStatus>(http::Method::GET, "/v1/node/update", None::<&()>)
                .await
            {
                Ok(st) if st.pending.as_deref() != Some(&handed.id) => st.last.filter(|o| o.id == handed.id).map(Some),
                _ => None,
            },
        };
        if let Some(outcome) = decided
            && c.info().await.is_ok()
        {
            return Ok(outcome);
        }
        if Instant::now() > deadline {
            bail!(
                "no outcome of hand-over {} by {} (see HOME/update.log on the node's host)",
                handed.id,
                handed.deadline
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `flotilla node versions`: what HOME/versions holds (read from the data
/// directory, so on the node's host).
pub fn versions(node: &NodeArgs, json: bool) -> anyhow::Result<i32> {
    let home = match node.node.as_deref().and_then(|n| Endpoint::parse(n).ok()) {
        Some(Endpoint::Unix(sock)) => sock.parent().map(Path::to_path_buf).context("a socket path has a directory")?,
        Some(other) => bail!("`node versions` reads the node's data directory: run it on {other}'s host with --home"),
        None => crate::cli::default_home(node.home.clone()),
    };
    let layout = Layout::new(&home);
    let kept = layout.kept_versions();
    let pending = layout.read_pending().map_err(anyhow::Error::new)?;
    let last = layout.read_last().map_err(anyhow::Error::new)?;
    if json {
        output::json(&serde_json::json!({
            "versions": kept,
            "current": layout.read_link(Link::Current),
            "previous": layout.read_link(Link::Previous),
            "pending": pending,
            "last": last,
        }))?;
        return Ok(0);
    }
    if kept.is_empty() {
        println!("no versions in {} (a node records its own binary when it starts)", layout.versions().display());
    } else {
        let rows: Vec<Vec<String>> = kept
            .iter()
            .map(|v| {
                let link = match (v.current, v.previous) {
                    (true, _) => "current",
                    (false, true) => "previous",
                    (false, false) => "",
                };
                vec![
                    v.id.clone(),
                    link.to_string(),
                    v.added.map(output::relative).unwrap_or_default(),
                    v.origin.clone().unwrap_or_default(),
                ]
            })
            .collect();
        output::table(&["VERSION", "LINK", "ADDED", "FROM"], &rows);
    }
    if let Some(p) = pending {
        println!("\nin progress: {} {} from {} to {}, commit by {}", p.kind.as_str(), p.id, p.from, p.to, p.deadline);
    }
    if let Some(o) = last {
        let how = match o.result {
            UpdateResult::Committed => "committed".to_string(),
            UpdateResult::Reverted => format!("reverted: {}", o.reason.unwrap_or_default()),
        };
        println!(
            "\nlast: {} {} from {} to {} ({}), {how}",
            o.kind.as_str(),
            o.id,
            o.from,
            o.to,
            output::relative(o.at)
        );
    }
    Ok(0)
}

/// `flotilla node watchdog`: with `--detach` the launcher (start the
/// watchdog in its own session, print its pid), else the watchdog itself.
pub fn watchdog(args: WatchdogArgs, home: PathBuf) -> anyhow::Result<i32> {
    if args.detach {
        let exe = std::env::current_exe().context("finding our own executable")?;
        let pid =
            flotilla_node::selfupdate::launch_watchdog(&exe, &home, &args.update).context("starting the watchdog")?;
        println!("{pid}");
        return Ok(0);
    }
    Ok(flotilla_node::selfupdate::run_watchdog(&home, &args.update))
}
