//! The notifier: fetches a project's repository, and tells its manager
//! about new commits on watched branches and about config changes.
//!
//! It polls every `poll_interval`, and at once when a webhook or `try`
//! wakes it. Every notice has an idempotent id (`changes:BRANCH:SHA`,
//! `config:HASH`), and the heads it saw are stored only after the notices
//! are in the box: a crash in between sends the same notices again, which
//! the box (by id) and run creation (by operation id) absorb.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::coordinator::{Change, ChangeKind, ProjectStatus};
use tokio::sync::Notify;

use crate::config::{self, CONFIG_FILE};
use crate::git::Mirror;
use crate::pm::{ChangeNotice, ConfigRef, Event};
use crate::runtime::Coordinator;
use crate::store::PollResult;

/// Commits announced per branch per poll. A push of more (a long-lived
/// branch merged without squashing, say) builds its newest this many and
/// says so on the project (`poll_error`), never silently.
pub const MAX_NEW_COMMITS: usize = 1000;

/// The hash a missing `flotilla.toml` is noted under.
pub const NO_CONFIG: &str = "none";
/// The hash an oversized `flotilla.toml` is noted under: its commit gets a
/// failed run saying so, and polling goes on past it (a stranger's huge
/// config must not stop the project).
pub const TOO_LARGE: &str = "too-large";

pub async fn poll_loop(c: Arc<Coordinator>, project: String, wake: Arc<Notify>) {
    loop {
        let interval = match c.store.project(&project).await {
            Ok(Some(p)) if p.status == ProjectStatus::Enabled => Duration::from_secs(p.poll_interval_s.max(1)),
            Ok(_) => return,
            Err(e) => {
                tracing::error!(project, error = %crate::error_chain(&e), "reading the project failed");
                Duration::from_secs(5)
            }
        };
        if let Err(e) = poll(&c, &project).await {
            tracing::warn!(project, error = %e, "polling the repository failed");
        }
        let _ = tokio::time::timeout(interval, wake.notified()).await;
    }
}

/// The config at `rev`: its hash (stored by hash) and, when it parses,
/// the config itself.
pub async fn config_at(
    c: &Coordinator,
    mirror: &Mirror,
    rev: &str,
) -> Result<(String, Result<config::ProjectConfig, String>), String> {
    let text = match mirror.read_file(rev, CONFIG_FILE).await {
        Ok(t) => t,
        Err(crate::git::GitError::Invalid(why)) => return Ok((TOO_LARGE.to_string(), Err(why))),
        Err(e) => return Err(crate::error_chain(&e)),
    };
    let Some(text) = text else {
        return Ok((NO_CONFIG.to_string(), Err(format!("no {CONFIG_FILE} at {}", &rev[..rev.len().min(12)]))));
    };
    let hash = config::config_hash(&text);
    c.store.put_config(&hash, &text).await.map_err(|e| crate::error_chain(&e))?;
    let parsed = config::parse(&text).map_err(|e| format!("{CONFIG_FILE} at {}: {e}", &rev[..rev.len().min(12)]));
    Ok((hash, parsed))
}

/// One poll. Errors are also stored on the project (`poll_error`).
pub async fn poll(c: &Arc<Coordinator>, project: &str) -> Result<(), String> {
    let result = poll_inner(c, project).await;
    if let Err(e) = &result {
        let heads = c.store.project(project).await.ok().flatten().map(|p| p.heads).unwrap_or_default();
        let _ = c.store.set_poll(project, PollResult { heads, error: Some(e.clone()), ..Default::default() }).await;
    }
    result
}

async fn poll_inner(c: &Arc<Coordinator>, project: &str) -> Result<(), String> {
    let p = c.store.project(project).await.map_err(|e| crate::error_chain(&e))?.ok_or("the project is gone")?;
    let mirror = c.mirror(project).await.map_err(|e| crate::error_chain(&*e))?;
    mirror.fetch().await.map_err(|e| crate::error_chain(&e))?;
    let (default_branch, _) =
        c.store.project_branch(project).await.map_err(|e| crate::error_chain(&e))?.ok_or("the project is gone")?;

    // The project config: the default branch's flotilla.toml.
    let mut result = PollResult::default();
    let mut branches = vec![default_branch.clone()];
    let mut commits_mode = config::Commits::All;
    let mut sent = false;
    if let Some(head) = mirror.head(&default_branch).await.map_err(|e| crate::error_chain(&e))? {
        let (hash, parsed) = config_at(c, &mirror, &head).await?;
        match parsed {
            Ok(cfg) => {
                if !cfg.triggers.branches.is_empty() {
                    branches = cfg.triggers.branches.clone();
                }
                result.builders = Some(cfg.builders.iter().map(|b| b.name.to_string()).collect());
                result.branches = Some(branches.clone());
                commits_mode = cfg.triggers.commits;
                result.commits = Some(commits_mode.as_str().to_string());
                if p.config_hash.as_deref() != Some(hash.as_str()) {
                    let ev = Event::UpdateConfig {
                        config: ConfigRef {
                            hash: hash.clone(),
                            branches: branches.clone(),
                            try_enabled: cfg.triggers.try_enabled,
                        },
                    };
                    c.store.send(project, &format!("config:{hash}"), &ev).await.map_err(|e| crate::error_chain(&e))?;
                    sent = true;
                }
            }
            Err(e) => result.config_error = Some(e),
        }
    } else {
        result.config_error = Some(format!("branch {default_branch:?} does not exist in {}", p.repo));
    }

    // New commits on each watched branch, oldest first.
    let mut heads = BTreeMap::new();
    for b in &branches {
        let Some(head) = mirror.head(b).await.map_err(|e| crate::error_chain(&e))? else { continue };
        let prev = p.heads.get(b).cloned();
        if prev.as_deref() != Some(head.as_str()) {
            let limit = match commits_mode {
                config::Commits::All => MAX_NEW_COMMITS,
                config::Commits::Head => 1,
            };
            // One more than the limit tells a cut push from one that fit.
            let mut commits =
                mirror.new_commits(prev.as_deref(), &head, limit + 1).await.map_err(|e| crate::error_chain(&e))?;
            if commits.len() > limit {
                commits.truncate(limit);
                if commits_mode == config::Commits::All {
                    let note = format!(
                        "a push to {b} brought more than {limit} new commits: only the newest {limit} get runs"
                    );
                    tracing::warn!(project, "{note}");
                    result.error = Some(note);
                }
            }
            let mut changes = Vec::new();
            for commit in commits.iter().rev() {
                let (hash, _) = config_at(c, &mirror, &commit.sha).await?;
                changes.push(ChangeNotice {
                    change: Change {
                        id: format!("{b}@{}", commit.sha),
                        kind: ChangeKind::Branch,
                        rev: commit.sha.clone(),
                        branch: Some(b.clone()),
                        subject: commit.subject.clone(),
                        version: 1,
                    },
                    config_hash: hash,
                });
            }
            if !changes.is_empty() {
                let ev = Event::ChangesUpdated { changes };
                c.store.send(project, &format!("changes:{b}:{head}"), &ev).await.map_err(|e| crate::error_chain(&e))?;
                sent = true;
            }
        }
        heads.insert(b.clone(), head);
    }
    if sent {
        c.wake_manager(project);
    }
    result.heads = heads;
    c.store.set_poll(project, result).await.map_err(|e| crate::error_chain(&e))?;
    Ok(())
}

/// `flotilla try`: a revision, or a patch on a base, as a new try change.
/// Returns the change id.
pub async fn submit_try(
    c: &Arc<Coordinator>,
    project: &str,
    rev: Option<&str>,
    patch: Option<&str>,
    base: Option<&str>,
) -> Result<String, String> {
    let p = c
        .store
        .project(project)
        .await
        .map_err(|e| crate::error_chain(&e))?
        .ok_or(format!("project {project} not found"))?;
    let mirror = c.mirror(project).await.map_err(|e| crate::error_chain(&*e))?;
    mirror.fetch().await.map_err(|e| crate::error_chain(&e))?;
    let sha = match (rev, patch) {
        (Some(_), Some(_)) => return Err("give a revision or a patch, not both".into()),
        (Some(r), None) => mirror.resolve(r).await.map_err(|e| crate::error_chain(&e))?,
        (None, Some(text)) => {
            let base = match base {
                Some(b) => b.to_string(),
                None => p.branches.first().cloned().unwrap_or_else(|| "HEAD".into()),
            };
            let base_sha = mirror.resolve(&base).await.map_err(|e| crate::error_chain(&e))?;
            let message = format!("try: patch on {base}");
            let date = flotilla_api::Timestamp::now().0 / 1000;
            let sha = mirror.apply_patch(&base_sha, text, &message, date).await.map_err(|e| crate::error_chain(&e))?;
            // Kept in the store before any build of it exists, so a peer
            // coordinator that claims one makes the same commit.
            let kept = crate::store::TryPatch {
                sha: sha.clone(),
                project: project.to_string(),
                base: base_sha,
                patch: text.to_string(),
                message,
                date,
            };
            c.store.put_try_patch(kept).await.map_err(|e| crate::error_chain(&e))?;
            sha
        }
        (None, None) => return Err("give a revision (--rev) or a patch (--patch FILE)".into()),
    };
    let commit = mirror.commit(&sha).await.map_err(|e| crate::error_chain(&e))?;
    let (hash, _) = config_at(c, &mirror, &sha).await?;
    let n = c.store.next_counter(&format!("try:{project}")).await.map_err(|e| crate::error_chain(&e))?;
    let id = format!("try-{n}");
    let ev = Event::ChangesUpdated {
        changes: vec![ChangeNotice {
            change: Change {
                id: id.clone(),
                kind: ChangeKind::Try,
                rev: sha,
                branch: base.map(str::to_string),
                subject: commit.subject,
                version: 1,
            },
            config_hash: hash,
        }],
    };
    c.store.send(project, &format!("changes:{id}"), &ev).await.map_err(|e| crate::error_chain(&e))?;
    c.wake_manager(project);
    Ok(id)
}
