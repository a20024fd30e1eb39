//! `flotilla sandbox ...` and `flotilla info`: the node API from the shell.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, anyhow};
use flotilla_agent::client::drain_exec;
use flotilla_agent::http::{ClientError, Endpoint, HttpClient, TlsClientConfig};
use flotilla_api::{
    BackendKind, CreateSandboxRequest, ExecRequest, FrameKind, NetworkMode, SessionQuery, UpdateSandboxRequest,
};
use flotilla_node::NodeClient;
use futures_util::{SinkExt, StreamExt};

use crate::cli::{CreateArgs, ExecArgs, IdArgs, NodeArgs, SandboxCommand, SetArgs};
use crate::output;

/// Client commands run on one thread: their own start-up stays near a
/// millisecond, and they only wait on sockets.
pub fn block_on<F: std::future::Future<Output = anyhow::Result<i32>>>(f: F) -> anyhow::Result<i32> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?.block_on(f)
}

pub async fn client(args: &NodeArgs) -> anyhow::Result<NodeClient> {
    let by_id = match &args.node_id {
        Some(id) => Some(crate::names::node_url(args, id).await?),
        None => None,
    };
    let ep = match by_id.as_ref().or(args.node.as_ref()) {
        Some(url) => Endpoint::parse(url).map_err(|e| anyhow!(e))?,
        None => {
            let home = crate::cli::default_home(args.home.clone());
            let sock = home.join("node.sock");
            if !sock.exists() {
                anyhow::bail!(
                    "no node socket at {}: is the node running? Start one with `sudo flotilla dev --home {}`, \
                     or point at one with --home DIR or --node URL",
                    sock.display(),
                    home.display()
                );
            }
            Endpoint::Unix(sock)
        }
    };
    node_at(args, ep)
}

/// A client of the node at `ep`, with the token and the trust that `args`
/// give (`--token`, `--ca`, `--cert-sha256`).
pub fn node_at(args: &NodeArgs, ep: Endpoint) -> anyhow::Result<NodeClient> {
    node_pinned(args, ep, None)
}

/// [`node_at`] for an address found with its certificate's fingerprint
/// (a node's `https://…#sha256=…` in the name table): `--ca` or
/// `--cert-sha256` still win when given, else the published pin is trusted
/// (the name table takes writes only with its token).
pub fn node_pinned(args: &NodeArgs, ep: Endpoint, pin: Option<&str>) -> anyhow::Result<NodeClient> {
    let http = HttpClient::new(ep).with_token(args.token.clone());
    let tls = if let Some(ca) = &args.ca {
        Some(TlsClientConfig::from_ca_file(ca).with_context(|| format!("loading {}", ca.display()))?)
    } else if let Some(fp) = args.cert_sha256.as_deref().or(pin) {
        Some(TlsClientConfig::pinned(fp).context("reading the certificate fingerprint")?)
    } else if args.client_cert.is_some() {
        Some(TlsClientConfig::system().context("loading the system CA bundle")?)
    } else {
        None
    };
    let tls = match (tls, &args.client_cert, &args.client_key) {
        (Some(t), Some(cert), Some(key)) => Some(t.with_client_cert(cert, key).context("loading --client-cert")?),
        (t, _, _) => t,
    };
    Ok(NodeClient::new(match tls {
        Some(t) => http.with_tls(t),
        None => http,
    }))
}

pub async fn info(node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    let i = client(&node).await?.info().await?;
    if json {
        output::json(&i)?;
        return Ok(0);
    }
    println!("node:       {}", i.node_id);
    println!("version:    {}", i.version);
    println!("platform:   {}-{} (kernel {})", i.os, i.arch, i.kernel);
    println!("cpus:       {}", i.cpus);
    println!("memory:     {}", flotilla_api::units::format_size(i.memory_bytes));
    println!("cgroup:     {}", i.cgroup);
    for b in &i.backends {
        let why = b.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
        println!("backend:    {} {}{why}", b.kind.as_str(), if b.available { "available" } else { "unavailable" });
    }
    println!("images:     {}", i.images.join(", "));
    println!("networks:   {}", i.network_modes.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "));
    let counts: Vec<String> = i.sandboxes.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!("sandboxes:  {}", if counts.is_empty() { "none".into() } else { counts.join(", ") });
    Ok(0)
}

pub async fn run(cmd: SandboxCommand, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    match cmd {
        SandboxCommand::Create(a) => create(a, &node, json).await,
        SandboxCommand::Ls => {
            let list = client(&node).await?.list().await?;
            if json {
                output::json(&list)?
            } else {
                output::sandbox_rows(&list)
            }
            Ok(0)
        }
        SandboxCommand::Show { id } => {
            let s = client(&node).await?.get(&id).await?;
            if json {
                output::json(&s)?
            } else {
                output::sandbox_detail(&s)
            }
            Ok(0)
        }
        SandboxCommand::Exec(a) => exec(a, &node, json).await,
        SandboxCommand::Attach { id, process, from } => attach(&client(&node).await?, &id, &process, from).await,
        SandboxCommand::Ps { id } => {
            let procs = client(&node).await?.sandbox(&id).processes().await?;
            if json {
                output::json(&procs)?;
            } else {
                let rows: Vec<Vec<String>> = procs
                    .iter()
                    .map(|p| {
                        let state = match &p.exit {
                            Some(e) => format!("exited {}", e.shell_code()),
                            None => "running".into(),
                        };
                        vec![
                            p.id.clone(),
                            p.pid.to_string(),
                            state,
                            output::relative(p.started_at),
                            // The bytes `attach --from` can resume from.
                            format!("{}..{}", p.output_start, p.output_end),
                            p.argv.join(" "),
                        ]
                    })
                    .collect();
                output::table(&["PROCESS", "PID", "STATE", "STARTED", "OUTPUT", "COMMAND"], &rows);
            }
            Ok(0)
        }
        SandboxCommand::Kill { id, process, signal } => {
            client(&node).await?.sandbox(&id).signal(&process, &signal).await?;
            Ok(0)
        }
        SandboxCommand::Shell { id, cmd } => shell(&client(&node).await?, &id, cmd).await,
        SandboxCommand::Put { id, dir, src: _, git: Some(git) } => {
            let c = client(&node).await?;
            let (repo, rev) = split_git(&git);
            // A local path means the node's host, which is ours for a Unix socket.
            let repo = match std::path::Path::new(repo) {
                p if p.exists() => std::path::absolute(p)?.display().to_string(),
                _ => repo.to_string(),
            };
            let req = flotilla_api::GitImportRequest { repo, rev: rev.map(str::to_string), dir };
            let op = c.git_import(&id, &req).await.context("exporting the revision")?;
            let op = crate::ops::wait(&c, &op.id, None).await?;
            if let Some(e) = &op.error {
                anyhow::bail!("{}", output::operation_error(&op, e));
            }
            let s: flotilla_api::GitImportSummary =
                serde_json::from_value(op.result.unwrap_or_default()).context("reading the result")?;
            if json {
                output::json(&s)?;
            } else {
                println!("{} {} files, {} bytes", s.commit, s.import.entries, s.import.bytes);
            }
            Ok(0)
        }
        SandboxCommand::Put { id, dir, src, git: None } => {
            let c = client(&node).await?;
            let src = src.context("give a source (a directory, a tarball, or -) or --git REPO[@REV]")?;
            let s = crate::transfer::put(&c.sandbox(&id), &src, dir).await?;
            if json {
                output::json(&s)?;
            } else {
                eprintln!(
                    "wrote {} entries, {} in {}",
                    s.entries,
                    flotilla_api::units::format_size(s.bytes),
                    flotilla_api::units::format_duration(Duration::from_millis(s.duration_ms))
                );
            }
            Ok(0)
        }
        SandboxCommand::Get { id, dir, output } => {
            crate::transfer::get(&client(&node).await?.sandbox(&id), dir, output).await?;
            Ok(0)
        }
        SandboxCommand::Files { id, dir } => {
            let entries = client(&node).await?.sandbox(&id).ls(dir.as_deref()).await?;
            if json {
                output::json(&entries)?;
            } else {
                let rows: Vec<Vec<String>> = entries
                    .iter()
                    .map(|e| {
                        vec![
                            format!("{:o}", e.mode),
                            e.size.to_string(),
                            format!("{:?}", e.kind).to_lowercase(),
                            e.name.clone(),
                        ]
                    })
                    .collect();
                output::table(&["MODE", "SIZE", "KIND", "NAME"], &rows);
            }
            Ok(0)
        }
        SandboxCommand::Stop(a) => action(a, &node, json, "stop").await,
        SandboxCommand::Start(a) => action(a, &node, json, "start").await,
        SandboxCommand::Restart(a) => action(a, &node, json, "restart").await,
        SandboxCommand::Rm(a) => {
            let c = client(&node).await?;
            let mut code = 0;
            for id in &a.ids {
                match c.delete(id).await {
                    Ok(()) => println!("{id}"),
                    // Repeating an rm is harmless: gone is what was asked for.
                    Err(e) if e.to_api().code == flotilla_api::ErrorCode::NotFound => {
                        eprintln!("{id}: already gone")
                    }
                    Err(e) => {
                        eprintln!("error: deleting {id}: {}", flotilla_agent::http::error_chain(&e));
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        SandboxCommand::Set(a) => set(a, &node, json).await,
    }
}

/// `REPO[@REV]`: the revision follows the last `@`, unless what follows
/// holds a `:` (then the `@` belonged to an ssh address like `git@host:x`).
fn split_git(s: &str) -> (&str, Option<&str>) {
    match s.rsplit_once('@') {
        Some((repo, rev)) if !repo.is_empty() && !rev.is_empty() && !rev.contains(':') => (repo, Some(rev)),
        _ => (s, None),
    }
}

async fn create(a: CreateArgs, node: &NodeArgs, json: bool) -> anyhow::Result<i32> {
    let req = CreateSandboxRequest {
        image: Some(a.image),
        backend: if a.backend == "vm" { BackendKind::Vm } else { BackendKind::Process },
        name: a.name,
        resources: a.limits.resources().unwrap_or_default(),
        ttl_s: a.ttl.map(|d| d.as_secs().max(1)),
        idle_ttl_s: a.idle_ttl.map(|d| d.as_secs().max(1)),
        labels: a.labels.into_iter().collect(),
        env: a.env.into_iter().collect(),
        network: match a.network.as_str() {
            "outbound" => NetworkMode::Outbound,
            "tap" => NetworkMode::Tap,
            _ => NetworkMode::None,
        },
    };
    let c = client(node).await?;
    let op = c.create_operation(&req).await.context("creating the sandbox")?;
    if a.no_wait {
        if json {
            output::json(&op)?
        } else {
            println!("{}", op.id)
        }
        return Ok(0);
    }
    let s = crate::ops::wait_sandbox(&c, op).await.context("creating the sandbox")?;
    if json {
        output::json(&s)?
    } else {
        println!("{}", s.id)
    }
    Ok(0)
}

async fn action(a: IdArgs, node: &NodeArgs, json: bool, what: &str) -> anyhow::Result<i32> {
    let c = client(node).await?;
    let mut code = 0;
    for id in &a.ids {
        match c.action(id, what).await {
            Ok(s) if json => output::json(&s)?,
            Ok(s) => println!("{} {}", s.id, s.state),
            Err(e) => {
                eprintln!("error: {what} {id}: {}", flotilla_agent::http::error_chain(&e));
                code = 1;
            }
        }
    }
    Ok(code)
}

async fn set(a: SetArgs, node: &NodeArgs, json: bool) -> anyhow::Result<i32> {
    let req = UpdateSandboxRequest {
        labels: a.labels.into_iter().collect::<BTreeMap<_, _>>(),
        ttl_s: a.ttl.map(|d| d.as_secs()),
        idle_ttl_s: a.idle_ttl.map(|d| d.as_secs()),
        resources: a.limits.resources(),
    };
    let s = client(node).await?.update(&a.id, &req).await?;
    if json {
        output::json(&s)?
    } else {
        output::sandbox_detail(&s);
        if req.resources.is_some() && s.backend == BackendKind::Vm && s.state == flotilla_api::SandboxState::Running {
            eprintln!(
                "note: a microVM's memory, cpus and disk are fixed at boot: the new limits apply at its next restart"
            );
        }
    }
    Ok(0)
}

async fn exec(a: ExecArgs, node: &NodeArgs, json: bool) -> anyhow::Result<i32> {
    let c = client(node).await?;
    let req = ExecRequest {
        argv: a.argv,
        env: a.env.into_iter().collect(),
        cwd: a.cwd,
        timeout_ms: a.timeout.map(|d| d.as_millis() as u64),
        stdin: None,
        detach: a.detach,
        id: None,
        hold: false,
    };
    let agent = c.sandbox(&a.id);
    if a.detach {
        let p = agent.exec_detached(&req).await?;
        if json {
            output::json(&p)?
        } else {
            println!("{}", p.id)
        }
        return Ok(0);
    }
    let mut stream = agent.exec(&req).await?;
    let status = match drain_exec(&mut stream, &mut std::io::stdout(), &mut std::io::stderr()).await {
        Ok(status) => status,
        Err(e) => return stream_ended(e),
    };
    if status.timed_out {
        eprintln!(
            "flotilla: command timed out after {}",
            flotilla_api::units::format_duration(Duration::from_millis(status.duration_ms))
        );
    }
    Ok(status.shell_code())
}

/// What `exec` and `attach` exit with when the stream ended without the
/// command's status: the sandbox stopped, or its agent became unreachable.
/// (125 is what docker uses for "the command did not get to finish because
/// of the runtime", above any status a shell gives a command.)
pub const EXIT_STREAM_ENDED: i32 = 125;

/// Says why a command's stream ended without its exit status and gives the
/// exit code for it; other errors pass through.
fn stream_ended(e: ClientError) -> anyhow::Result<i32> {
    use flotilla_api::ErrorCode;
    match e {
        ClientError::Api(api) if matches!(api.code, ErrorCode::SandboxStopped | ErrorCode::AgentUnreachable) => {
            eprintln!("flotilla: {} ({})", api.message, api.code.as_str());
            Ok(EXIT_STREAM_ENDED)
        }
        ClientError::Decode(msg) => {
            eprintln!("flotilla: {msg}");
            Ok(EXIT_STREAM_ENDED)
        }
        other => Err(other.into()),
    }
}

/// Follows a detached process's output, reconnecting (and resuming from the
/// last byte received) when the connection drops.
async fn attach(c: &NodeClient, id: &str, process: &str, from: u64) -> anyhow::Result<i32> {
    let agent = c.sandbox(id);
    let mut offset = from;
    let mut failures = 0;
    loop {
        let result = async {
            let (mut stream, start) = agent.output(process, offset, true).await?;
            if start > offset {
                eprintln!("flotilla: output before offset {start} was dropped from the process's buffer");
            }
            let r = drain_exec(&mut stream, &mut std::io::stdout(), &mut std::io::stderr()).await;
            offset = stream.offset;
            r
        }
        .await;
        match result {
            Ok(status) => return Ok(status.shell_code()),
            Err(e @ ClientError::Api(_)) => return stream_ended(e),
            Err(e) if failures < 5 => {
                failures += 1;
                eprintln!("flotilla: connection lost at offset {offset} ({e}); reconnecting");
                tokio::time::sleep(Duration::from_millis(200 * failures)).await;
            }
            Err(e) => {
                return Err(anyhow!(e).context(format!(
                    "giving up; resume with: flotilla sandbox attach {id} {process} --from {offset}"
                )));
            }
        }
    }
}

async fn shell(c: &NodeClient, id: &str, cmd: Option<String>) -> anyhow::Result<i32> {
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let tty = flotilla_sandbox::sys::is_terminal(stdin.as_fd());
    let (cols, rows) = flotilla_sandbox::sys::window_size(std::io::stdout().as_fd()).unwrap_or((80, 24));
    let q = SessionQuery { cmd, cols: Some(cols), rows: Some(rows), term: std::env::var("TERM").ok() };
    let ws = c.sandbox(id).session(&q).await?;
    let _raw = if tty { Some(flotilla_sandbox::sys::RawModeGuard::enable(stdin.as_fd())?) } else { None };
    let (mut tx, mut rx) = ws.split();
    use tokio_tungstenite::tungstenite::Message;
    // stdin -> Stdin frames, on a thread: terminal reads block.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        let mut input = std::io::stdin();
        while let Ok(n) = input.read(&mut buf) {
            if n == 0 || in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            data = in_rx.recv() => match data {
                Some(d) => {
                    let f = flotilla_api::Frame::new(FrameKind::Stdin, d);
                    if tx.send(Message::Binary(f.to_bytes())).await.is_err() { break; }
                }
                None => {
                    // stdin closed (non-interactive use): send EOF (Ctrl-D).
                    let f = flotilla_api::Frame::new(FrameKind::Stdin, &b"\x04"[..]);
                    let _ = tx.send(Message::Binary(f.to_bytes())).await;
                    in_rx.close();
                }
            },
            _ = winch.recv() => {
                if let Some((c, r)) = flotilla_sandbox::sys::window_size(std::io::stdout().as_fd()) {
                    let _ = tx.send(Message::Binary(flotilla_api::Frame::resize(c, r).to_bytes())).await;
                }
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    for f in flotilla_api::frame::decode_all(&b).unwrap_or_default() {
                        match f.kind {
                            FrameKind::Stdout | FrameKind::Stderr => {
                                out.write_all(&f.payload)?;
                                out.flush()?;
                            }
                            // The exit frame is the session's last word.
                            FrameKind::Exit => return Ok(f.as_exit().map(|e| e.shell_code()).unwrap_or(1)),
                            FrameKind::Error => return Err(f.as_error().expect("error frame").into()),
                            FrameKind::Heartbeat | FrameKind::Stdin | FrameKind::Resize => {}
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(anyhow!("session connection failed: {e}")),
            }
        }
    }
    Err(anyhow!("the session ended without an exit status (the sandbox stopped?)"))
}

/// `flotilla node pool set|ls`.
pub async fn pool(cmd: crate::cli::PoolCommand, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    use crate::cli::PoolCommand;
    let pools = match cmd {
        PoolCommand::Set { image, size, limits } => {
            let req = flotilla_api::VmPoolRequest { image, size, resources: limits.resources().unwrap_or_default() };
            client(&node).await?.set_pool(&req).await.context("setting the pool")?
        }
        PoolCommand::Ls => client(&node).await?.pools().await.context("listing pools")?,
    };
    if json {
        output::json(&pools)?;
    } else {
        let rows: Vec<Vec<String>> = pools
            .iter()
            .map(|p| {
                vec![
                    p.image.clone(),
                    format!("{}MiB", p.memory_bytes >> 20),
                    p.vcpus.to_string(),
                    format!("{}MiB", p.disk_bytes >> 20),
                    p.size.to_string(),
                    p.ready.to_string(),
                    p.booting.to_string(),
                    match (&p.last_from, p.last_ms) {
                        (Some(from), Some(ms)) => format!("{from} in {ms}ms"),
                        _ => "-".into(),
                    },
                ]
            })
            .collect();
        output::table(&["IMAGE", "MEMORY", "VCPUS", "DISK", "SIZE", "READY", "BOOTING", "LAST"], &rows);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn git_sources_split_at_the_revision() {
        use super::split_git;
        assert_eq!(split_git("/src/repo"), ("/src/repo", None));
        assert_eq!(split_git("/src/repo@v1.2"), ("/src/repo", Some("v1.2")));
        assert_eq!(split_git("git@github.com:a/b.git"), ("git@github.com:a/b.git", None));
        assert_eq!(split_git("git@github.com:a/b.git@main"), ("git@github.com:a/b.git", Some("main")));
        assert_eq!(split_git("https://h/x.git@feature/y"), ("https://h/x.git", Some("feature/y")));
    }
}
