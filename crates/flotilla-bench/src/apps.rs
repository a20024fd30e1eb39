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

/// Instances running through `app-handover`.
pub const HANDOVER_INSTANCES: usize = 50;

/// Requests sent round-robin to every instance's forwarded address while
/// `run` is set: (answered, failed).
async fn load(addresses: Vec<String>, run: std::sync::Arc<std::sync::atomic::AtomicBool>) -> (u64, u64) {
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut i = 0;
    while run.load(std::sync::atomic::Ordering::Relaxed) {
        if answers(&addresses[i % addresses.len()]).await {
            ok += 1;
        } else {
            failed += 1;
        }
        i += 1;
        tokio::task::yield_now().await;
    }
    (ok, failed)
}

/// Waits until every instance of `inst` runs with a pid and the update
/// (if any) has committed.
async fn all_back(node: &Node, inst: &str, n: usize, committed_to: Option<&str>) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE * 2;
    loop {
        let committed = match committed_to {
            None => true,
            Some(to) => {
                !node.home().join("update.pending").exists()
                    && std::fs::read(node.home().join("update.last"))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<flotilla_api::UpdateOutcome>(&b).ok())
                        .is_some_and(|o| o.to == to && o.result == flotilla_api::UpdateResult::Committed)
            }
        };
        if committed
            && let Ok(a) = node.client().app::<flotilla_api::app::AppInstallation>(inst).await
            && a.instances.len() == n
            && a.instances.iter().all(|i| i.state == InstanceState::Running && i.pid.is_some())
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the node did not come back with {n} instances running; its log:\n{}", node.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Self-update hand-over with 50 instances serving: from `POST
/// /v1/node/update` to the new version committed with every instance
/// re-adopted, and the requests to instances that failed meanwhile;
/// against a kill -9 and restart of the same node.
pub async fn app_handover(
    node: &mut Node,
    bin: &std::path::Path,
    machine: &Machine,
    iterations: usize,
) -> anyhow::Result<Report> {
    const WARMUPS: usize = 1;
    let n = HANDOVER_INSTANCES;
    node.client().install_app(&server("bench-handover")?).await.context("installing the bench app")?;
    let mut addresses = Vec::new();
    for _ in 0..n {
        let i: AppInstance = node.client().app_action("bench-handover/1", "start", None).await?;
        let i = until_serving(node.client(), &i.address).await?;
        addresses.push(i.ports[0].address.clone());
    }
    let original = std::fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    let (mut handover, mut exec_to_back, mut crash) = (Vec::new(), Vec::new(), Vec::new());
    let (mut handover_failed, mut handover_sent, mut crash_failed, mut crash_sent) = (0u64, 0u64, 0u64, 0u64);
    for it in 0..WARMUPS + iterations {
        let record = it >= WARMUPS;
        // A distinct binary each time: the same program with a trailer.
        let candidate = node.scratch(&format!("flotilla-{it}"));
        let mut bytes = original.clone();
        bytes.extend_from_slice(format!("\nflotilla-bench candidate {it}\n").as_bytes());
        std::fs::write(&candidate, &bytes)?;
        std::fs::set_permissions(&candidate, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let run = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let traffic = tokio::spawn(load(addresses.clone(), run.clone()));
        let req = flotilla_api::NodeUpdateRequest { binary: candidate.display().to_string(), sha256: None };
        let t = Instant::now();
        let u: flotilla_api::NodeUpdate = node
            .client()
            .http()
            .json(http::Method::POST, "/v1/node/update", Some(&req))
            .await
            .context("updating the node")?;
        let answered = Instant::now();
        all_back(node, "bench-handover/1", n, Some(&u.to.id)).await?;
        let (h, e) = (ms(t.elapsed()), ms(answered.elapsed()));
        run.store(false, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed) = traffic.await?;
        let _ = std::fs::remove_file(&candidate);

        let run = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let traffic = tokio::spawn(load(addresses.clone(), run.clone()));
        let current = node.home().join("current/flotilla");
        let c = node.crash_and_restart(&current, n).await?;
        all_back(node, "bench-handover/1", n, None).await?;
        let crashed = ms(c);
        run.store(false, std::sync::atomic::Ordering::Relaxed);
        let (c_ok, c_failed) = traffic.await?;
        if record {
            handover.push(h);
            exec_to_back.push(e);
            crash.push(crashed);
            handover_failed += failed;
            handover_sent += ok + failed;
            crash_failed += c_failed;
            crash_sent += c_ok + c_failed;
        }
    }
    let _: flotilla_api::app::AppInstallation = node.client().app_action("bench-handover/1", "uninstall", None).await?;
    let mut report = Report {
        scenario: "app-handover",
        description: format!(
            "self-update with {n} app instances serving: POST /v1/node/update → new version committed, all {n} re-adopted"
        ),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: WARMUPS,
        cases: vec![
            Case::measured(
                "flotilla_update_handover",
                "POST /v1/node/update (stage + sha256, test mode, switch) until update.last says committed and every instance runs with its pid",
                false,
                &handover,
            ),
            Case::measured(
                "flotilla_update_answer_to_back",
                "from the update's answer (the exec follows) to the same end",
                false,
                &exec_to_back,
            ),
            Case::measured(
                "kill9_restart",
                "kill -9 of the node and a start of the same binary until it lists every sandbox running",
                true,
                &crash,
            ),
        ],
        targets: vec![],
        notes: vec![
            format!(
                "requests to the instances during the hand-overs: {handover_failed} failed of {handover_sent} (listeners handed over by execve)"
            ),
            format!(
                "during the kill -9 restarts: {crash_failed} failed of {crash_sent} (the listeners die with the node)"
            ),
        ],
        details: serde_json::json!({
            "handover_requests": handover_sent, "handover_failed": handover_failed,
            "crash_requests": crash_sent, "crash_failed": crash_failed,
        }),
    };
    report.set_ratios("kill9_restart");
    report.targets = vec![target(
        "no request to an instance fails during a hand-over",
        Some(handover_failed == 0),
        format!("{handover_failed} of {handover_sent} failed"),
    )];
    Ok(report)
}
