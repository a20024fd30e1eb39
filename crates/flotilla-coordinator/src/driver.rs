//! The project manager's driver: load, step, commit, carry out the outbox.
//!
//! A step lists the box outside any transaction, runs the pure
//! [`pm::step`], then commits with the `eversion` it loaded. If another
//! step (another coordinator on the same PostgreSQL) committed first, the
//! commit changes nothing and a new step is scheduled, never a retry in
//! place with stale input. Actions are carried out only from the outbox,
//! after the commit, and each removes its own outbox row in the
//! transaction that does it: a crash between commit and action leaves the
//! row for the next start, and an action is never done twice.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::build::BuildSpec;
use crate::pm::{self, Action};
use crate::runtime::Coordinator;
use crate::store::{Created, NewBuild, StoreError};

/// Pause after a store error before stepping again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Runs a project's manager until the process ends: one step per wake-up
/// (coalesced), more while events keep coming.
pub async fn manage(c: Arc<Coordinator>, project: String, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        match step(&c, &project).await {
            Ok(Stepped::Idle) => {}
            Ok(Stepped::Again) => wake.notify_one(),
            Err(e) => {
                crate::metrics::store_retry(&c.metrics, "manager");
                tracing::error!(project, error = %crate::error_chain(&e), "project manager step failed");
                tokio::time::sleep(ERROR_PAUSE).await;
                wake.notify_one();
            }
        }
    }
}

/// What a step calls for next.
#[derive(Debug, PartialEq, Eq)]
pub enum Stepped {
    /// Nothing waiting.
    Idle,
    /// Step again now (lost a race, or more to do).
    Again,
}

/// One step: commit the box's events, then carry out the outbox.
pub async fn step(c: &Arc<Coordinator>, project: &str) -> Result<Stepped, StoreError> {
    let (state, eversion, events) = c.store.load(project).await?;
    let mut again = false;
    if !events.is_empty() {
        let branch = c.store.project_branch(project).await?.map(|(b, _)| b).unwrap_or_else(|| "main".into());
        let outcome = pm::step(&state, &events, &branch);
        match c.store.commit_step(project, eversion, &outcome).await? {
            Some((ev, _)) => {
                tracing::debug!(project, eversion = ev, reasons = ?outcome.reasons, "project manager stepped");
                if outcome.new_config.is_some()
                    && let Ok(Some(p)) = c.store.project(project).await
                {
                    c.events.publish(flotilla_api::EventBody::Project { project: Box::new(crate::api::shown(p)) });
                }
            }
            None => {
                tracing::debug!(project, eversion, "another step committed first; stepping again");
                return Ok(Stepped::Again);
            }
        }
    }
    for (id, action) in c.store.outbox(project).await? {
        if carry_out(c, project, id, &action).await? {
            again = true;
        }
    }
    Ok(if again { Stepped::Again } else { Stepped::Idle })
}

/// Does one outbox action. True if it put an event in the box (the
/// manager steps again to take it).
async fn carry_out(c: &Arc<Coordinator>, project: &str, outbox_id: u64, action: &Action) -> Result<bool, StoreError> {
    let Action::CreateRun { change, config_hash, .. } = action;
    let (builds, error) = builds_for(c, config_hash, &change.rev).await?;
    let created = c.store.create_run(outbox_id, project, action, builds, error).await?;
    match created {
        Created::Run(id) => {
            tracing::info!(project, run = id, change = %change.id, "run created");
            c.run_changed(id).await;
            c.wake_dispatcher();
        }
        Created::Existing(id) => tracing::debug!(project, run = id, change = %change.id, "run already created"),
        Created::Refused(why) => tracing::info!(project, change = %change.id, reason = %why, "run creation refused"),
    }
    Ok(true)
}

/// The builds of a run from the config stored under `hash`, or why there
/// are none.
async fn builds_for(
    c: &Arc<Coordinator>,
    hash: &str,
    rev: &str,
) -> Result<(Vec<NewBuild>, Option<String>), StoreError> {
    let short = &rev[..rev.len().min(12)];
    if hash == crate::poller::TOO_LARGE {
        let (file, max) = (crate::config::CONFIG_FILE, crate::git::MAX_FILE);
        return Ok((
            Vec::new(),
            Some(format!("{file} at {short} is over the {max} bytes a config may have (not read)")),
        ));
    }
    let Some(text) = c.store.config(hash).await? else {
        return Ok((Vec::new(), Some(format!("no {} at {short}", crate::config::CONFIG_FILE))));
    };
    match crate::config::parse(&text) {
        Ok(cfg) => {
            let mut builds = Vec::new();
            for b in &cfg.builders {
                let spec = serde_json::to_string(&BuildSpec::from_builder(b))?;
                builds.push(NewBuild { builder: b.name.to_string(), spec });
            }
            Ok((builds, None))
        }
        Err(e) => Ok((Vec::new(), Some(format!("{} at {short}: {e}", crate::config::CONFIG_FILE)))),
    }
}
