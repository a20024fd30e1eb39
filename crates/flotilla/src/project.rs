//! `flotilla project …` and `flotilla try`: what the coordinator watches.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use flotilla_api::coordinator::{AddProjectRequest, Project, ProjectStatus, TryRequest};

use crate::cli::NodeArgs;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Watch a repository: every new commit on its branch (or the branches its flotilla.toml
    /// names) is built by each builder of its flotilla.toml.
    #[command(after_help = "Example:\n  flotilla project add demo --repo /src/demo --branch main\n  \
        flotilla project add web --repo https://github.com/org/web.git --webhook-secret \"$SECRET\"")]
    Add(AddArgs),
    /// List projects: status, branches, builders, last poll.
    #[command(alias = "list")]
    Ls,
    /// Show a project: its config hash, builders, heads, poll errors, manager version.
    Show {
        name: String,
        /// Also print the project manager's log (its last N steps and their reasons).
        #[arg(long, value_name = "N")]
        log: Option<u64>,
    },
    /// Stop watching a project (its runs are kept; no new ones are made).
    #[command(alias = "remove")]
    Rm { name: String },
    /// Fetch the repository now instead of waiting for the next poll.
    Poll { name: String },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Project name: lowercase letters, digits, '-', '_', '.'.
    pub name: String,
    /// A local path or a URL git can fetch.
    #[arg(long)]
    pub repo: String,
    /// The branch to watch (default: the repository's default branch); flotilla.toml's
    /// `[triggers] branches` takes over once it names some.
    #[arg(long)]
    pub branch: Option<String>,
    /// How often to fetch, e.g. 30s (default 10s).
    #[arg(long)]
    pub poll_interval: Option<String>,
    /// The secret GitHub or Gitea signs push webhooks with (POST /v1/webhooks/github/NAME).
    #[arg(long, env = "FLOTILLA_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
}

/// `flotilla try`: build a revision or a patch with the project's builders.
#[derive(Debug, Args)]
pub struct TryArgs {
    #[arg(long)]
    pub project: String,
    /// A revision of the repository (commit, branch or tag).
    #[arg(long, conflicts_with = "patch", required_unless_present = "patch")]
    pub rev: Option<String>,
    /// A patch file (git diff or git format-patch output; `-` for stdin), applied on --base.
    #[arg(long)]
    pub patch: Option<PathBuf>,
    /// What the patch applies to (default: the watched branch's head).
    #[arg(long, requires = "patch")]
    pub base: Option<String>,
}

pub async fn run(cmd: ProjectCommand, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    let c = crate::coordinator::client(&node)?;
    match cmd {
        ProjectCommand::Add(a) => {
            let p = c
                .add_project(&AddProjectRequest {
                    name: a.name,
                    repo: a.repo,
                    branch: a.branch,
                    poll_interval: a.poll_interval,
                    webhook_secret: a.webhook_secret,
                })
                .await?;
            if json {
                output::json(&p)?;
            } else {
                println!("{}", p.name);
                eprintln!(
                    "watching {} on {} every {}s; follow its runs with: flotilla run ls --project {}",
                    p.repo,
                    p.branches.join(", "),
                    p.poll_interval_s,
                    p.name
                );
            }
        }
        ProjectCommand::Ls => {
            let list = c.projects().await?;
            if json {
                output::json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|p| {
                        vec![
                            p.name.clone(),
                            status(p).to_string(),
                            p.branches.join(","),
                            p.builders.join(","),
                            p.polled_at.map(output::relative).unwrap_or_else(|| "-".into()),
                            p.repo.clone(),
                        ]
                    })
                    .collect();
                output::table(&["NAME", "STATUS", "BRANCHES", "BUILDERS", "POLLED", "REPO"], &rows);
            }
        }
        ProjectCommand::Show { name, log } => {
            let p = c.project(&name).await?;
            let entries = match log {
                Some(n) => Some(c.project_log(&name, n).await?),
                None => None,
            };
            if json {
                let mut v = serde_json::to_value(&p)?;
                if let Some(e) = &entries {
                    v["log"] = serde_json::to_value(e)?;
                }
                output::json(&v)?;
            } else {
                show(&p);
                for e in entries.unwrap_or_default() {
                    println!("  v{:<5} {}  {}", e.eversion, e.at, e.reasons.join("; "));
                }
            }
        }
        ProjectCommand::Rm { name } => {
            c.remove_project(&name).await?;
            if !json {
                eprintln!("project {name} removed: its runs are kept, no new ones are made");
            }
        }
        ProjectCommand::Poll { name } => {
            let p = c.poll(&name).await?;
            if json {
                output::json(&p)?;
            } else {
                show(&p);
            }
        }
    }
    Ok(0)
}

fn status(p: &Project) -> &'static str {
    match p.status {
        ProjectStatus::Enabled if p.poll_error.is_some() || p.config_error.is_some() => "error",
        ProjectStatus::Enabled => "enabled",
        ProjectStatus::Removed => "removed",
    }
}

fn show(p: &Project) {
    println!("name        {}", p.name);
    println!("repo        {}", p.repo);
    println!("status      {}", status(p));
    println!("branches    {}", p.branches.join(", "));
    println!("builders    {}", if p.builders.is_empty() { "-".to_string() } else { p.builders.join(", ") });
    println!("config      {}", p.config_hash.as_deref().unwrap_or("-"));
    for (b, h) in &p.heads {
        println!("head        {b} {h}");
    }
    println!(
        "polled      {} (every {}s)",
        p.polled_at.map(output::relative).unwrap_or_else(|| "never".into()),
        p.poll_interval_s
    );
    if let Some(e) = &p.poll_error {
        println!("poll error  {e}");
    }
    if let Some(e) = &p.config_error {
        println!("config error {e}");
    }
    println!("webhook     {}", if p.webhook { "secret set" } else { "no secret" });
    println!("manager     eversion {}", p.eversion);
}

pub async fn try_change(a: TryArgs, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    let c = crate::coordinator::client(&node)?;
    let patch = match &a.patch {
        Some(p) if p.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading the patch from stdin")?;
            Some(s)
        }
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading the patch {}", p.display()))?),
        None => None,
    };
    let r = c.try_change(&a.project, &TryRequest { rev: a.rev, patch, base: a.base }).await?;
    if json {
        output::json(&r)?;
    } else {
        match r.run_id {
            Some(id) => {
                println!("{id}");
                eprintln!("{} is run {id}: flotilla run show {id}", r.change_id);
            }
            None => eprintln!(
                "{} submitted; its run is not created yet: flotilla run ls --project {}",
                r.change_id, a.project
            ),
        }
    }
    Ok(0)
}
