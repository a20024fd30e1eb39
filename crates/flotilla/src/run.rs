//! `flotilla run …` and `flotilla build …`: what the coordinator built.

use std::io::Write;

use clap::Subcommand;
use flotilla_api::Timestamp;
use flotilla_api::coordinator::{Build, Run};
use http_body_util::BodyExt;

use crate::cli::NodeArgs;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// List runs, newest first: the change, its state, each builder's latest attempt.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        project: Option<String>,
        /// How many (default 20).
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Show a run: its change and every attempt of every build, with failures.
    Show { id: u64 },
    /// Cancel a run's unfinished builds.
    Cancel { id: u64 },
    /// Retry a run's failed and canceled builds, each as a new attempt.
    Retry { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum BuildCommand {
    /// Show a build: state, failure, and its timeline with the time each step took.
    Show { id: u64 },
    /// Print a build's log (its steps' output, byte for byte).
    Log {
        id: u64,
        /// Keep following until the build ends.
        #[arg(short, long)]
        follow: bool,
        /// Start at this byte.
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Cancel a build.
    Cancel { id: u64 },
    /// Retry a finished build as a new attempt.
    Retry { id: u64 },
    /// A sandbox set up exactly like a builder (image, backend, resources, network, env) with the
    /// source at REV in /workspace, to debug a build by hand (Go's gomote). Prints how to exec and
    /// shell into it; it is deleted after --idle-ttl without use.
    Sandbox {
        project: String,
        builder: String,
        /// A revision (default: the watched branch's head).
        #[arg(long)]
        rev: Option<String>,
        /// Deleted after this long without use, e.g. 2h (default 30m).
        #[arg(long, value_parser = flotilla_api::units::parse_duration)]
        idle_ttl: Option<std::time::Duration>,
    },
}

fn short(rev: &str) -> &str {
    &rev[..rev.len().min(10)]
}

fn builds_cell(r: &Run) -> String {
    r.builds.iter().map(|b| format!("{}:{}", b.builder, b.state.as_str())).collect::<Vec<_>>().join(" ")
}

pub async fn run(cmd: RunCommand, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    let c = crate::coordinator::client(&node)?;
    match cmd {
        RunCommand::Ls { project, limit } => {
            let page = c.runs(project.as_deref(), limit, None).await?;
            if json {
                output::json(&page.items)?;
            } else {
                let rows: Vec<Vec<String>> = page
                    .items
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.to_string(),
                            r.project.clone(),
                            r.change.id.split('@').next().unwrap_or_default().to_string(),
                            short(&r.change.rev).to_string(),
                            r.state.as_str().to_string(),
                            output::relative(r.created_at),
                            builds_cell(r),
                            r.change.subject.chars().take(40).collect(),
                        ]
                    })
                    .collect();
                output::table(&["RUN", "PROJECT", "CHANGE", "REV", "STATE", "CREATED", "BUILDS", "SUBJECT"], &rows);
            }
        }
        RunCommand::Show { id } => {
            let r = c.run(id).await?;
            if json {
                output::json(&r)?;
            } else {
                show_run(&r);
            }
        }
        RunCommand::Cancel { id } => {
            let r = c.cancel_run(id).await?;
            if json {
                output::json(&r)?;
            } else {
                eprintln!("run {id}: cancel asked; {}", builds_cell(&r));
            }
        }
        RunCommand::Retry { id } => {
            let r = c.retry_run(id).await?;
            if json {
                output::json(&r)?;
            } else {
                for b in &r.builds {
                    println!("{b}");
                }
                eprintln!("run {id}: {} new attempt(s)", r.builds.len());
            }
        }
    }
    Ok(0)
}

fn show_run(r: &Run) {
    println!("run         {} ({})", r.id, r.state.as_str());
    println!("project     {}", r.project);
    println!("change      {} {}", r.change.id, r.change.subject);
    println!("rev         {}", r.change.rev);
    println!("created     {}", r.created_at);
    if let Some(f) = r.finished_at {
        println!("finished    {f} ({})", flotilla_api::units::format_duration(r.created_at.until(f)));
    }
    if let Some(e) = &r.error {
        println!("error       {e}");
    }
    for b in &r.builds {
        let retry = match (&b.retry_of, &b.retry_reason) {
            (Some(o), Some(why)) => format!("  (retry of {o}: {why})"),
            _ => String::new(),
        };
        println!("build {:<5} {:<24} attempt {} {}{retry}", b.id, b.builder, b.attempt, b.state.as_str());
        if let Some(f) = &b.failure {
            println!("            failed in {}: {}", f.step, f.message);
        }
    }
}

fn show_build(b: &Build) {
    println!("build       {} ({})", b.id, b.state.as_str());
    println!("run         {}", b.run_id);
    println!("builder     {} attempt {}", b.builder, b.attempt);
    if let (Some(o), Some(why)) = (&b.retry_of, &b.retry_reason) {
        println!("retry of    {o}: {why}");
    }
    println!("rev         {}", b.rev);
    if let Some(s) = &b.sandbox {
        println!("sandbox     {s}");
    }
    println!("log         {} bytes", b.log_bytes);
    if let Some(f) = &b.failure {
        println!("failed in   {}: {}", f.step, f.message);
        for l in &f.last_lines {
            println!("  | {l}");
        }
    }
    println!("timeline");
    let start = b.timeline.first().map(|t| t.at).unwrap_or(b.created_at);
    for (i, t) in b.timeline.iter().enumerate() {
        let next: Option<Timestamp> = b.timeline.get(i + 1).map(|n| n.at).or(b.finished_at);
        let took = next.map(|n| flotilla_api::units::format_duration(t.at.until(n))).unwrap_or_else(|| "…".into());
        println!(
            "  +{:<8} {:<26} {:<32} {took}",
            flotilla_api::units::format_duration(start.until(t.at)),
            t.event,
            t.detail.as_deref().unwrap_or("")
        );
    }
}

pub async fn build(cmd: BuildCommand, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    let c = crate::coordinator::client(&node)?;
    match cmd {
        BuildCommand::Sandbox { project, builder, rev, idle_ttl } => {
            let req = flotilla_api::coordinator::BuilderSandboxRequest {
                builder,
                rev,
                idle_ttl_s: idle_ttl.map(|d| d.as_secs().max(1)),
            };
            let s = c.builder_sandbox(&project, &req).await?;
            if json {
                output::json(&s)?;
            } else {
                println!("{}", s.sandbox_id);
                eprintln!(
                    "sandbox {} ({}): {} of {} at {} in /workspace, {} on {}, node {}",
                    s.name,
                    s.sandbox_id,
                    s.builder,
                    s.project,
                    short(&s.rev),
                    s.image,
                    s.backend,
                    s.node
                );
                if let Some(at) = s.delete_at {
                    eprintln!("deleted {} unless used (each use moves that on)", output::relative(at));
                }
                eprintln!("  flotilla sandbox exec {} --cwd /workspace -- COMMAND", s.sandbox_id);
                eprintln!("  flotilla sandbox shell {}", s.sandbox_id);
                eprintln!("  flotilla sandbox rm {}", s.sandbox_id);
            }
        }
        BuildCommand::Show { id } => {
            let b = c.build(id).await?;
            if json {
                output::json(&b)?;
            } else {
                show_build(&b);
            }
        }
        BuildCommand::Log { id, follow, from } => {
            let mut body = c.log(id, from, follow).await?;
            let mut out = std::io::stdout().lock();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| anyhow::anyhow!("the log stream broke: {e}"))?;
                if let Ok(data) = frame.into_data() {
                    out.write_all(&data)?;
                    out.flush()?;
                }
            }
            if follow {
                let b = c.build(id).await?;
                return Ok(if b.state == flotilla_api::coordinator::RunState::Passed { 0 } else { 1 });
            }
        }
        BuildCommand::Cancel { id } => {
            let b = c.cancel_build(id).await?;
            if json {
                output::json(&b)?;
            } else {
                eprintln!("build {id}: cancel asked ({})", b.state.as_str());
            }
        }
        BuildCommand::Retry { id } => {
            let r = c.retry_build(id).await?;
            if json {
                output::json(&r)?;
            } else {
                for b in &r.builds {
                    println!("{b}");
                }
            }
        }
    }
    Ok(0)
}
