//! Scenarios of apps on a node: an instance from start to serving, and a
//! crashed instance from its exit to running again.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_api::app::{AppInstance, Envelope, InstallRequest, InstanceState};
use flotilla_api::{CreateSandboxRequest, ExecRequest};
use flotilla_node::NodeClient;

use crate::node::Node;
use crate::report::{Case, Machine, Report, Unit};
use crate::scenarios::{now, target};

const DEADLINE: Duration = Duration::from_secs(30);

/// A small HTTP server: the app both scenarios run.
fn server(title: &str) -> anyhow::Result<InstallRequest> {
    let envelope: Envelope = serde_json::from_value(serde_json::json!({
        "title": title,
        "command": ["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1"],
        "ports": [8080],
        "restart": {"policy": "always", "initial_delay": "0s"},
    }))?;
    Ok(InstallRequest { envelope, origin: None })
}

/// One HTTP answer through `address`.
async fn answers(address: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(address).await else { return false };
    if s.write_all(b"HEAD / HTTP/1.0\r\n\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    matches!(tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await, Ok(Ok(_)))
        && buf.starts_with(b"HTTP/1.0 200")
}

async fn until_serving(c: &NodeClient, address: &str) -> anyhow::Result<AppInstance> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let i: AppInstance = c.app(address).await?;
        if let Some(p) = i.ports.first()
            && answers(&p.address).await
        {
            return Ok(i);
        }
        if Instant::now() > deadline {
            bail!("{address} did not serve within {DEADLINE:?}: {i:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `app start` → the first HTTP answer through the forwarded port, against
/// a bare sandbox create → agent ready and against a bare sandbox plus the
/// same server started by hand, polled on the sandbox's own loopback.
pub async fn app_start(node: &Node, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    const WARMUPS: usize = 1;
    let c = node.client();
    c.install_app(&server("bench-start")?).await.context("installing the bench app")?;
    let (mut app, mut bare, mut by_hand) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..WARMUPS + iterations {
        let record = i >= WARMUPS;
        let t = Instant::now();
        let inst: AppInstance = c.app_action("bench-start/1", "start", None).await.context("starting an instance")?;
        until_serving(c, &inst.address).await?;
        let took = ms(t.elapsed());
        let _: AppInstance = c.app_action(&inst.address, "stop", None).await?;

        let t = Instant::now();
        let sb = c.create(&CreateSandboxRequest::default()).await.context("creating a bare sandbox")?;
        let created = ms(t.elapsed());
        let agent = c.sandbox(&sb.id);
        let req = ExecRequest {
            argv: ["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1"].map(String::from).to_vec(),
            ..Default::default()
        };
        agent.exec_detached(&req).await.context("starting the server by hand")?;
        let probe = ExecRequest {
            argv: ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/')"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        };
        loop {
            let mut s = agent.exec(&probe).await?;
            let st = flotilla_agent::client::drain_exec(&mut s, &mut std::io::sink(), &mut std::io::sink()).await?;
            if st.success() {
                break;
            }
            if t.elapsed() > DEADLINE {
                bail!("the hand-started server in {} never answered", sb.id);
            }
        }
        let hand = ms(t.elapsed());
        c.delete(&sb.id).await?;
        if record {
            app.push(took);
            bare.push(created);
            by_hand.push(hand);
        }
    }
    let _: flotilla_api::app::AppInstallation = c.app_action("bench-start/1", "uninstall", None).await?;
    let mut report = Report {
        scenario: "app-start",
        description: "app instance start → first HTTP answer through its forwarded port (python3 -m http.server)"
            .into(),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: WARMUPS,
        cases: vec![
            Case::measured(
                "flotilla_app_start_serving",
                "POST .../start, then HEAD / through the forwarded host port until it answers 200",
                false,
                &app,
            ),
            Case::measured("bare_sandbox_create", "POST /v1/sandboxes until the agent is ready", true, &bare),
            Case::measured(
                "sandbox_plus_server_by_hand",
                "create + exec the same server detached + probe it inside the sandbox until it answers",
                true,
                &by_hand,
            ),
        ],
        targets: vec![],
        notes: vec![
            "most of an instance's start is the app's own start-up (python3 importing http.server); the hand-started \
             case pays it too"
                .into(),
        ],
        details: serde_json::Value::Null,
    };
    report.set_ratios("bare_sandbox_create");
    let by_hand = report.case("sandbox_plus_server_by_hand").and_then(Case::median).unwrap_or(f64::NAN);
    let app = report.case("flotilla_app_start_serving").and_then(Case::median).unwrap_or(f64::NAN);
    report.targets = vec![target(
        "within 1.5x of create + start by hand",
        Some(app <= 1.5 * by_hand),
        format!("{:.2}x", app / by_hand),
    )];
    Ok(report)
}

/// A crashed instance (its process killed) from the kill to running again
/// at zero back-off, against the supervisor's floor: exec'ing the same
/// command detached in a running sandbox.
pub async fn app_restart(node: &Node, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    const WARMUPS: usize = 1;
    let c = node.client();
    c.install_app(&server("bench-crash")?).await.context("installing the bench app")?;
    let inst: AppInstance = c.app_action("bench-crash/1", "start", None).await?;
    let mut cur = until_serving(c, &inst.address).await?;
    let sandbox = cur.sandbox.clone().context("the instance has a sandbox")?;
    let agent = c.sandbox(&sandbox);
    let (mut running, mut serving, mut exec) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..WARMUPS + iterations {
        let record = i >= WARMUPS;
        let process = format!("run-{}", cur.restarts + 1);
        let t = Instant::now();
        agent.signal(&process, "KILL").await.with_context(|| format!("killing {process}"))?;
        let deadline = Instant::now() + DEADLINE;
        let next = loop {
            let now: AppInstance = c.app(&inst.address).await?;
            if now.restarts > cur.restarts && now.state == InstanceState::Running && now.pid.is_some() {
                break now;
            }
            if Instant::now() > deadline {
                bail!("{} did not restart: {now:?}", inst.address);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let up = ms(t.elapsed());
        until_serving(c, &inst.address).await?;
        let served = ms(t.elapsed());
        cur = next;
        let t = Instant::now();
        let req = ExecRequest { argv: vec!["true".into()], detach: true, ..Default::default() };
        let p = agent.exec_detached(&req).await?;
        let e = ms(t.elapsed());
        let _ = p;
        if record {
            running.push(up);
            serving.push(served);
            exec.push(e);
        }
    }
    let _: flotilla_api::app::AppInstallation = c.app_action("bench-crash/1", "uninstall", None).await?;
    let mut report = Report {
        scenario: "app-restart",
        description: "crashed instance (SIGKILL to its process) → running again, restart policy always, 0s back-off"
            .into(),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: WARMUPS,
        cases: vec![
            Case::measured(
                "flotilla_app_restart_running",
                "kill → the instance shows a new run with its pid (polled every 1 ms)",
                false,
                &running,
            ),
            Case::measured(
                "flotilla_app_restart_serving",
                "kill → the new run answers HTTP through the forwarded port",
                false,
                &serving,
            ),
            Case::measured(
                "exec_detached_by_hand",
                "exec of `true` detached in the same running sandbox (the floor of any restart)",
                true,
                &exec,
            ),
        ],
        targets: vec![],
        notes: vec![],
        details: serde_json::Value::Null,
    };
    report.set_ratios("exec_detached_by_hand");
    let up = report.case("flotilla_app_restart_running").and_then(Case::median).unwrap_or(f64::NAN);
    report.targets = vec![target("running again within 50 ms", Some(up < 50.0), format!("median {up:.1} ms"))];
    Ok(report)
}
