//! `flotilla operation ...` and `flotilla events`: long requests and the
//! node's event feed from the shell.

use std::io::IsTerminal;

use anyhow::{Context, anyhow};
use flotilla_api::{Operation, OperationState, Sandbox};
use flotilla_node::NodeClient;
use http_body_util::BodyExt;

use crate::cli::{NodeArgs, OperationCommand};
use crate::output;
use crate::sandbox::client;

pub async fn run(cmd: OperationCommand, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    match cmd {
        OperationCommand::Ls => {
            let list = client(&node).await?.operations().await?;
            if json {
                output::json(&list)?
            } else {
                output::operation_rows(&list)
            }
            Ok(0)
        }
        OperationCommand::Show { id } => {
            let op = client(&node).await?.operation(&id).await?;
            if json {
                output::json(&op)?
            } else {
                output::operation_detail(&op)
            }
            Ok(0)
        }
        OperationCommand::Wait { id, timeout } => {
            let c = client(&node).await?;
            let op = wait(&c, &id, timeout).await?;
            if json {
                output::json(&op)?
            } else {
                output::operation_detail(&op)
            }
            Ok(match op.state {
                OperationState::Succeeded => 0,
                OperationState::Failed => 1,
                OperationState::Running => 2,
            })
        }
    }
}

/// Waits for an operation, printing its steps on a terminal as they happen.
pub async fn wait(c: &NodeClient, id: &str, timeout: Option<std::time::Duration>) -> anyhow::Result<Operation> {
    let tty = std::io::stderr().is_terminal();
    let mut printed = 0;
    let op = c
        .wait_operation(id, timeout, |op| {
            if tty {
                for st in &op.steps[printed.min(op.steps.len())..] {
                    let detail = st.detail.as_deref().map(|d| format!("  {d}")).unwrap_or_default();
                    eprintln!("  {:<20}{detail}", st.name);
                }
            }
            printed = op.steps.len();
        })
        .await
        .with_context(|| format!("waiting for operation {id}"))?;
    Ok(op)
}

/// Waits for a sandbox operation; a failure names the step that failed.
pub async fn wait_sandbox(c: &NodeClient, op: Operation) -> anyhow::Result<Sandbox> {
    let op = wait(c, &op.id, None).await?;
    if let Some(e) = &op.error {
        return Err(anyhow!("{}", output::operation_error(&op, e)));
    }
    Ok(flotilla_node::client::operation_outcome(op)?)
}

/// Follows `GET /v1/events`, one line per event (or one JSON object per
/// line with `--json`), until interrupted or the node goes away.
pub async fn events(node: NodeArgs, after: Option<u64>, coordinator: bool, json: bool) -> anyhow::Result<i32> {
    let http = if coordinator {
        crate::coordinator::client(&node)?.http().clone()
    } else {
        client(&node).await?.http().clone()
    };
    let path = match after {
        Some(a) => format!("/v1/events?after={a}"),
        None => "/v1/events".to_string(),
    };
    let req = http.request(http::Method::GET, &path).body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let whose = if coordinator { "coordinator" } else { "node" };
    let resp = http.send_ok(req).await.with_context(|| format!("subscribing to the {whose}'s events"))?;
    let mut body = resp.into_body();
    let mut buf = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the event stream")?;
        let Ok(data) = frame.into_data() else { continue };
        buf.push_str(&String::from_utf8_lossy(&data));
        // SSE messages end with a blank line.
        while let Some(end) = buf.find("\n\n") {
            let msg: String = buf.drain(..end + 2).collect();
            let data: String = msg
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.trim_start())
                .collect::<Vec<_>>()
                .join("\n");
            if data.is_empty() {
                continue; // a keep-alive comment
            }
            if json {
                println!("{data}");
                continue;
            }
            match serde_json::from_str::<flotilla_api::NodeEvent>(&data) {
                Ok(ev) => println!("{}", describe(&ev)),
                Err(_) => println!("{data}"),
            }
        }
    }
    Ok(0)
}

fn describe(ev: &flotilla_api::NodeEvent) -> String {
    use flotilla_api::EventBody as B;
    let what = match &ev.body {
        B::Sandbox { sandbox: s } => {
            let step = s.steps.last().map(|st| format!(" ({})", st.name)).unwrap_or_default();
            format!("sandbox {} {} {}{step}", s.id, s.name, s.state)
        }
        B::SandboxDeleted { sandbox_id, name } => format!("sandbox {sandbox_id} {name} deleted"),
        B::Operation { operation: o } => {
            let step = o.steps.last().map(|st| st.name.as_str()).unwrap_or("-");
            let err = o.error.as_ref().map(|e| format!(": {}", e.message)).unwrap_or_default();
            format!("operation {} {} {} {} [{step}]{err}", o.id, o.kind.as_str(), o.target, o.state)
        }
        B::Image { action, image } => format!("image {image} {action}"),
        B::Reaped { what, target, reason } => format!("janitor reaped {what} {target}: {reason}"),
        B::Reset { reason } => format!("reset: {reason}"),
        B::AppInstance { instance: i } => {
            let why = i.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default();
            format!("app {} {} ({}){why}", i.address, i.state.as_str(), i.version)
        }
        B::AppInstallation { action, installation, version } => format!("app {installation} {action} ({version})"),
        B::NodeUpdate { outcome: o } => {
            let why = o.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default();
            format!("node {} {} -> {} {:?}{why}", o.kind.as_str(), o.from, o.to, o.result)
        }
        B::Run { run: r } => format!("run {} {} {} {}", r.id, r.project, r.change.id, r.state.as_str()),
        B::Build { build: b } => {
            let last = b
                .timeline
                .last()
                .map(|t| format!(" [{}{}]", t.event, t.detail.as_ref().map(|d| format!(" {d}")).unwrap_or_default()));
            format!("build {} {} {} {}{}", b.id, b.project, b.builder, b.state.as_str(), last.unwrap_or_default())
        }
        B::Project { project: p } => format!("project {} {:?}", p.name, p.status),
    };
    format!("{}  {what}", ev.at)
}
