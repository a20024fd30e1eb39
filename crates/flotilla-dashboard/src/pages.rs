//! The pages, as maud templates.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_api::Timestamp;
use flotilla_api::coordinator::{Build, Project, Queue, Run, RunState};
use flotilla_api::units::{format_duration, format_size};
use maud::{DOCTYPE, Markup, PreEscaped, html};

fn layout(title: &str, live: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Flotilla" }
                link rel="stylesheet" href="/ui/assets/dashboard.css";
                script src="/ui/assets/dashboard.js" defer {}
            }
            body data-live=(live) {
                header {
                    a.brand href="/" { "Flotilla" }
                    nav {
                        a href="/" { "Grid" }
                        a href="/ui/queue" { "Queue and fleet" }
                    }
                    label.token title="The coordinator's token (HOME/coordinator/token): cancel and retry need it. Kept in this browser only." {
                        "token "
                        input #token type="password" autocomplete="off" placeholder="for cancel and retry";
                    }
                }
                main #main { (body) }
                p #notice role="status" {}
            }
        }
    }
}

pub fn problem(why: &str) -> Markup {
    layout("Problem", "", html! { p.problem { (why) } })
}

pub fn empty() -> Markup {
    layout(
        "Grid",
        "events",
        html! {
            h1 { "No projects yet" }
            p { "Add one: " code { "flotilla project add NAME --repo PATH|URL" } }
        },
    )
}

fn state_class(s: RunState) -> &'static str {
    match s {
        RunState::Passed => "ok",
        RunState::Failed => "fail",
        RunState::Running => "running",
        RunState::Queued => "queued",
        RunState::Canceled => "canceled",
    }
}

fn took(b: &Build) -> Option<Duration> {
    let start = b.started_at?;
    Some(start.until(b.finished_at.unwrap_or_else(Timestamp::now)))
}

fn ago(t: Timestamp) -> String {
    format!("{} ago", format_duration(Duration::from_secs(t.until(Timestamp::now()).as_secs())))
}

/// A builder name's (os, arch, rest): `linux-amd64-race`.
fn split_builder(name: &str) -> (&str, &str, &str) {
    let mut parts = name.splitn(3, '-');
    (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""))
}

pub fn grid(
    projects: &[Project],
    project: &Project,
    branch: &str,
    runs: &[Run],
    next: Option<u64>,
    known: &BTreeMap<String, String>,
) -> Markup {
    let mut builders: Vec<&str> = project.builders.iter().map(String::as_str).collect();
    for r in runs {
        for b in &r.builds {
            if !builders.contains(&b.builder.as_str()) {
                builders.push(&b.builder);
            }
        }
    }
    builders.sort_by_key(|b| split_builder(b));
    let mut by_os: BTreeMap<&str, usize> = BTreeMap::new();
    for b in &builders {
        *by_os.entry(split_builder(b).0).or_default() += 1;
    }
    let link = |p: &str, br: &str| format!("/?project={p}&branch={br}");
    html! {
        (layout(&format!("{} {branch}", project.name), "events", html! {
            div.pickers {
                @for p in projects {
                    a.picked[p.name == project.name] href=(link(&p.name, p.branches.first().map_or("main", String::as_str))) { (p.name) }
                }
                span.sep { "branch" }
                @for br in &project.branches {
                    a.picked[br == branch] href=(link(&project.name, br)) { (br) }
                }
            }
            @if let Some(e) = &project.config_error {
                p.problem { "flotilla.toml: " (e) }
            }
            table.grid {
                thead {
                    tr {
                        th {}
                        @for (os, n) in &by_os { th.os colspan=(n) { (os) } }
                    }
                    tr {
                        th { "commit" }
                        @for b in &builders {
                            @let (_, arch, rest) = split_builder(b);
                            th.builder.known[known.contains_key(*b)] title=(b) {
                                (arch) @if !rest.is_empty() { br; small { (rest) } }
                                @if let Some(url) = known.get(*b) { br; a.issue href=(url) title={"known issue: " (url)} { "known issue" } }
                            }
                        }
                    }
                }
                tbody {
                    @for r in runs {
                        tr {
                            td.commit {
                                a href={"/ui/runs/" (r.id)} title=(r.change.rev) { code { (&r.change.rev[..r.change.rev.len().min(10)]) } }
                                " " span.subject { (r.change.subject) }
                            }
                            @for b in &builders {
                                @match r.builds.iter().filter(|x| x.builder == *b).max_by_key(|x| x.attempt) {
                                    Some(x) => td.cell.(state_class(x.state)).known[known.contains_key(*b)] {
                                        a href={"/ui/builds/" (x.id)} title={(b) ": " (x.state.as_str())} {
                                            @match x.state {
                                                RunState::Passed => "ok",
                                                RunState::Failed => "fail",
                                                RunState::Running => "…",
                                                RunState::Queued => "·",
                                                RunState::Canceled => "—",
                                            }
                                        }
                                    },
                                    None => td.cell.untested title="untested" { "•" },
                                }
                            }
                        }
                    }
                }
            }
            @if runs.is_empty() { p { "No runs on " (branch) " yet." } }
            @if let Some(before) = next {
                p { a.more href={(link(&project.name, branch)) "&before=" (before)} { "Older →" } }
            }
        }))
    }
}

pub fn run(r: &Run) -> Markup {
    layout(
        &format!("Run {}", r.id),
        "events",
        html! {
            h1 { "Run " (r.id) " " span.state.(state_class(r.state)) { (r.state.as_str()) } }
            p { (r.project) " · " code { (r.change.rev) } " · " (r.change.subject) " · " (ago(r.created_at)) }
            @if let Some(e) = &r.error { p.problem { (e) } }
            table.list {
                thead { tr { th { "builder" } th { "state" } th { "attempt" } th { "took" } th { "node" } th { "step" } } }
                tbody {
                    @for b in &r.builds {
                        tr {
                            td { a href={"/ui/builds/" (b.id)} { (b.builder) } }
                            td { span.state.(state_class(b.state)) { (b.state.as_str()) } }
                            td { (b.attempt) @if let Some(why) = &b.retry_reason { " (" (why) ")" } }
                            td { @if let Some(d) = took(b) { (format_duration(d)) } }
                            td { (b.node.as_deref().unwrap_or("")) }
                            td { (b.step.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        },
    )
}

/// A timeline bar: its label, where it starts and how long it is, in
/// parts of the whole, and whether it is the failing step.
struct Bar {
    label: String,
    at: Duration,
    len: Duration,
    failed: bool,
}

/// Steps (`start_step` .. `end_step`) and the stages between events.
fn bars(b: &Build) -> (Vec<Bar>, Duration) {
    let Some(first) = b.timeline.first().map(|t| t.at) else { return (Vec::new(), Duration::ZERO) };
    let end = b.finished_at.unwrap_or_else(Timestamp::now);
    let total = first.until(end).max(Duration::from_millis(1));
    let failing = b.failure.as_ref().map(|f| f.step.as_str());
    let mut out = Vec::new();
    for (i, t) in b.timeline.iter().enumerate() {
        if t.event.starts_with("end_") {
            continue;
        }
        let next_at = b.timeline.get(i + 1).map_or(end, |n| n.at);
        let (label, until, failed) = match (t.event.as_str(), t.detail.as_deref()) {
            // A step lasts until its `end_step`, whatever came between.
            ("start_step", Some(step)) => {
                let end_at = b.timeline[i..].iter().find(|e| e.event == "end_step").map_or(end, |e| e.at);
                (format!("step {step}"), end_at, failing == Some(step))
            }
            ("start_write_tar", _) => ("write source".to_string(), next_at, false),
            (event, _) => (event.replace('_', " "), next_at, false),
        };
        out.push(Bar { label, at: first.until(t.at), len: t.at.until(until), failed });
    }
    (out, total)
}

pub fn build(b: &Build, lines: &[(u64, String)], offset: u64, next_line: u64) -> Markup {
    let (bars, total) = bars(b);
    let pct = |d: Duration| format!("{:.2}%", d.as_secs_f64() * 100.0 / total.as_secs_f64());
    let live = if b.state.is_final() { String::new() } else { format!("log:{}:{offset}:{next_line}", b.id) };
    layout(
        &format!("{} build {}", b.builder, b.id),
        &live,
        html! {
            h1 {
                (b.builder) " " span.state #state .(state_class(b.state)) { (b.state.as_str()) }
            }
            p.meta {
                a href={"/ui/runs/" (b.run_id)} { "run " (b.run_id) } " · " (b.project) " · " code { (b.rev) }
                " · attempt " (b.attempt)
                @if let Some(why) = &b.retry_reason { " (" (why) ")" }
                @if let Some(n) = &b.node { " · on " (n) }
                @if let Some(d) = took(b) { " · " (format_duration(d)) }
            }
            div.actions {
                button #cancel data-build=(b.id) disabled[b.state.is_final()] { "Cancel" }
                button #retry data-build=(b.id) disabled[!b.state.is_final()] { "Retry" }
            }
            @if let Some(f) = &b.failure {
                div.failure {
                    p {
                        "failed in " strong { (f.step) } ": " (f.message)
                        @if let Some(n) = failing_from(b, lines.len() as u64) { " · " a href={"#L" (n)} { "the last lines" } }
                    }
                }
            }
            h2 { "Timeline" }
            div.timeline {
                @for bar in &bars {
                    div.bar-row {
                        span.bar-label { (bar.label) }
                        span.bar-track {
                            span.bar.failed[bar.failed] style={"left:" (pct(bar.at)) ";width:" (pct(bar.len))} {}
                        }
                        span.bar-time { (format_duration(bar.len)) }
                    }
                }
            }
            h2 { "Log " small { a href={"/v1/builds/" (b.id) "/log"} { "raw" } } }
            pre #log { (log_lines(lines, failing_from(b, lines.len() as u64))) }
        },
    )
}

/// The first of the log's last lines the failure kept (up to 20: the
/// failing step's output, which ends the log, and what came before it when
/// that step printed less).
fn failing_from(b: &Build, lines: u64) -> Option<u64> {
    let kept = b.failure.as_ref()?.last_lines.len() as u64;
    (b.state == RunState::Failed && kept > 0 && lines > 0).then(|| lines.saturating_sub(kept) + 1)
}

/// Numbered log lines, each with an anchor to link to; those from
/// `failing_from` on marked as the failure's last lines.
pub fn log_lines(lines: &[(u64, String)], failing_from: Option<u64>) -> Markup {
    html! {
        @for (n, l) in lines {
            span.line.failing[failing_from.is_some_and(|f| *n >= f)] id={"L" (n)} {
                a.ln href={"#L" (n)} { (n) } (PreEscaped(l)) "\n"
            }
        }
    }
}

/// `s` for a query string value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One node, from its own API: what it is, its sandboxes, apps and pools.
pub fn node(
    name: &str,
    info: Result<&flotilla_api::NodeInfo, &String>,
    sandboxes: &Result<Vec<flotilla_api::Sandbox>, String>,
    apps: &Result<Vec<flotilla_api::app::AppInstallation>, String>,
    pools: &Result<Vec<flotilla_api::VmPool>, String>,
) -> Markup {
    layout(
        &format!("Node {name}"),
        "",
        html! {
            h1 { "Node " (name) }
            @match info {
                Ok(i) => {
                    p.meta {
                        (i.node_id) " · flotilla " (i.version) " · " (i.os) "-" (i.arch) " · kernel " (i.kernel)
                        " · " (i.cpus) " CPUs · " (format_size(i.memory_bytes)) " · cgroup " (i.cgroup)
                    }
                    p {
                        "backends: "
                        @for b in &i.backends {
                            span.backend { (b.kind.as_str()) " " @if b.available { "✓" } @else { "✗ " (b.reason.as_deref().unwrap_or("")) } } " "
                        }
                    }
                    p { "images: " (i.images.join(", ")) }
                }
                Err(e) => p.problem { "down: " (e) },
            }
            h2 { "Sandboxes" }
            @match sandboxes {
                Ok(list) if list.is_empty() => p { "None." },
                Ok(list) => table.list.sandboxes {
                    thead { tr { th { "name" } th { "state" } th { "image" } th { "backend" } th { "created" } th { "deleted at" } th { "build" } } }
                    tbody {
                        @for s in list {
                            tr {
                                td { (s.name) }
                                td { (s.state.as_str()) }
                                td { (s.image) }
                                td { (s.backend.as_str()) }
                                td { (ago(s.created_at)) }
                                td { @if let Some(t) = s.delete_at { (t) } }
                                td { @if let Some(b) = s.labels.get("flotilla.build") { a href={"/ui/builds/" (b)} { (b) } } }
                            }
                        }
                    }
                },
                Err(e) => p.problem { (e) },
            }
            h2 { "Apps" }
            @match apps {
                Ok(list) if list.is_empty() => p { "None." },
                Ok(list) => table.list {
                    thead { tr { th { "installation" } th { "state" } th { "version" } th { "instances" } } }
                    tbody {
                        @for a in list {
                            tr {
                                td { (a.address) }
                                td { (a.state.as_str()) }
                                td { (a.current) }
                                td { (a.instances.iter().map(|i| format!("{} {}", i.instance, i.state.as_str())).collect::<Vec<_>>().join(", ")) }
                            }
                        }
                    }
                },
                Err(e) => p.problem { (e) },
            }
            h2 { "Warm pools" }
            @match pools {
                Ok(list) if list.is_empty() => p { "None." },
                Ok(list) => table.list {
                    thead { tr { th { "image" } th { "size" } th { "ready" } th { "booting" } } }
                    tbody { @for p in list { tr { td { (p.image) } td { (p.size) } td { (p.ready) } td { (p.booting) } } } }
                },
                Err(e) => p.problem { (e) },
            }
        },
    )
}

pub fn queue(
    q: &Queue,
    nodes: &[(String, Option<flotilla_api::NodeInfo>)],
    table: Option<&Result<Vec<flotilla_api::names::MountEntry>, String>>,
) -> Markup {
    layout(
        "Queue and fleet",
        "events",
        html! {
            h1 { "Queue" }
            @if q.builders.is_empty() { p { "Nothing waits." } }
            @else {
                table.list {
                    thead { tr { th { "builder" } th { "waiting" } th { "oldest" } th { "newest" } th { "last started" } } }
                    tbody {
                        @for b in &q.builders {
                            tr {
                                td { (b.builder) } td { (b.waiting) } td { (ago(b.oldest)) } td { (ago(b.newest)) }
                                td { @match b.last_moved { Some(t) => (ago(t)), None => "never" } }
                            }
                        }
                    }
                }
                table.list.waiting {
                    thead { tr { th { "build" } th { "project" } th { "builder" } th { "priority" } th { "waiting" } th { "why" } } }
                    tbody {
                        @for w in &q.waiting {
                            tr {
                                td { a href={"/ui/builds/" (w.build)} { (w.build) } }
                                td { (w.project) } td { (w.builder) } td { (w.priority) } td { (ago(w.queued_at)) }
                                td.reason { (w.reason) }
                            }
                        }
                    }
                }
            }
            h1 { "Fleet" }
            table.list {
                thead { tr { th { "node" } th { "up" } th { "platform" } th { "CPUs used" } th { "memory used" } th { "builds" } } }
                tbody {
                    @for n in &q.nodes {
                        tr.down[!n.up] {
                            td { a href={"/ui/node?name=" (url_encode(&n.name))} { (n.name) } }
                            td { @if n.up { "up" } @else { "down" @if let Some(e) = &n.error { ": " (e) } } }
                            td { (n.platform) }
                            td { (format!("{:.1} / {:.1}", n.used_millicpus as f64 / 1000.0, n.millicpus as f64 / 1000.0)) }
                            td { (format_size(n.used_memory_bytes)) " / " (format_size(n.memory_bytes)) }
                            td { (n.running) }
                        }
                    }
                }
            }
            h2 { "What the nodes have" }
            table.list {
                thead { tr { th { "node" } th { "id" } th { "version" } th { "backends" } th { "images" } th { "warm pools" } th { "sandboxes" } } }
                tbody {
                    @for (name, info) in nodes {
                        @if let Some(i) = info {
                            tr {
                                td { (name) } td { (i.node_id) } td { (i.version) }
                                td { (i.backends.iter().filter(|b| b.available).map(|b| b.kind.as_str()).collect::<Vec<_>>().join(", ")) }
                                td.images { (i.images.join(", ")) }
                                td { (i.warm_pools.join(", ")) }
                                td { (i.sandboxes.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")) }
                            }
                        }
                    }
                }
            }
            @if let Some(t) = table {
                h2 { "Name table: nodes/*" }
                @match t {
                    Ok(entries) => table.list {
                        thead { tr { th { "name" } th { "address" } th { "expires in" } } }
                        tbody {
                            @for e in entries {
                                @for srv in &e.servers {
                                    tr { td { (e.name) } td { (srv.server.split('#').next().unwrap_or_default()) } td { (format!("{:.0} s", srv.expires_in_s)) } }
                                }
                            }
                        }
                    },
                    Err(e) => p.problem { "reading the name table failed: " (e) },
                }
            }
            p.meta { "as of " (q.at) }
        },
    )
}
