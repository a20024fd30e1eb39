//! The supervisor of one instance: a task that reads the instance's state
//! and does what it asks, until the instance is stopped or deleted.
//!
//! - `launching`, `updating`: end the current run (if any), move onto the
//!   installation's current version, then `running`.
//! - `running`: follow the recorded process (re-attaching from the stored
//!   output offset, which is also how a restarted node re-adopts it); when
//!   there is none, wait out the back-off and launch one. When it ends, the
//!   restart policy decides: launch again after a delay, or `not-running`.
//! - `suspended`: nothing (the processes are stopped where they are).
//! - `dying`: `SIGTERM`, `SIGKILL` after the stop timeout, stop the
//!   sandbox, then `not-running`.
//! - `not-running`, `deleted`: release the ports and names (and for
//!   `deleted`, the sandbox), and end.
//!
//! A process is started with the id `run-<N>`, and `N` is written before
//! the exec: after a crash the next supervisor finds that very process (the
//! agent refuses a second one with the same id) instead of starting another.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_agent::http::ClientError;
use flotilla_api::app::{Binary, Decision, Envelope, InstanceState, RunEnd};
use flotilla_api::{
    ApiError, CreateSandboxRequest, ErrorCode, ExecRequest, ExitStatus, FrameKind, SandboxState, Timestamp,
};
use tokio::sync::mpsc;

use super::logs::{self, LogWriter, Stream};
use super::{Apps, INSTANCE_LABEL, Instance, RunRecord, io_err};
use crate::node::{Backend, Node};

/// Largest binary an envelope may name.
const MAX_BINARY_BYTES: u64 = 4 << 30;

/// How often the output offset is written while output flows (a crash
/// repeats at most this much output in the log, never loses any).
const SAVE_OFFSET_EVERY: Duration = Duration::from_millis(250);

/// Pause before trying again when the agent did not answer.
const RETRY_PAUSE: Duration = Duration::from_millis(300);

/// How a followed run ended.
enum Ended {
    Exited(Option<ExitStatus>),
    /// The process is gone with no status (its sandbox stopped or restarted).
    Lost(String),
    /// Someone changed the state, or the agent hiccuped: look again.
    Again,
}

fn describe(st: Option<&ExitStatus>) -> String {
    match st {
        Some(ExitStatus { code: Some(c), .. }) => format!("exited with status {c}"),
        Some(ExitStatus { signal: Some(s), .. }) => format!("killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// A number in [0, 1) for the jitter.
fn rand01() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The program and arguments an envelope runs.
pub(super) fn argv(env: &Envelope) -> Vec<String> {
    let mut v = if env.command.is_empty() {
        vec![format!("/workspace/.app/{}", binary_name(env.binary.as_ref()))]
    } else {
        env.command.clone()
    };
    v.extend(env.args.iter().cloned());
    v
}

/// The file name a binary gets in the sandbox: the last part of its
/// URL or path, if that is a plain name.
fn binary_name(b: Option<&Binary>) -> String {
    let src = b.and_then(|b| b.url.as_deref().or(b.path.as_deref())).unwrap_or("app");
    let last = src.rsplit('/').next().unwrap_or("app");
    let ok = !last.is_empty()
        && last != "."
        && last != ".."
        && last.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.');
    if ok { last.to_string() } else { "app".into() }
}

/// Does moving from `a` to `b` need a new sandbox?
fn new_sandbox_needed(a: &Envelope, b: &Envelope) -> bool {
    a.image != b.image || a.backend != b.backend || a.network != b.network || a.resources != b.resources
}

impl<B: Backend> Apps<B> {
    pub(super) async fn run_supervisor(self: Arc<Self>, inst: Arc<Instance>) {
        // The ports being forwarded (a new version may change them).
        let mut forwarding: Option<Vec<u16>> = None;
        loop {
            let Ok(node) = self.node() else { return };
            let state = match inst.state() {
                Ok(s) => s,
                Err(d) => {
                    self.quarantine(&inst, d.0);
                    return;
                }
            };
            match state {
                InstanceState::NotRunning | InstanceState::Deleted | InstanceState::Quarantined => {
                    self.teardown(&inst, &node, state == InstanceState::Deleted).await;
                    return;
                }
                InstanceState::Suspended => {
                    self.unpublish(&inst).await;
                    inst.wake.notified().await;
                }
                InstanceState::Dying => {
                    self.end_run(&inst, &node, true).await;
                    let _g = inst.lock.lock().await;
                    let mut rec = inst.load().unwrap_or_default();
                    rec.reason = Some("stopped".into());
                    rec.retry_at = None;
                    let _ = inst.save(&rec);
                    let _ = inst.transition(InstanceState::Dying, InstanceState::NotRunning);
                    drop(_g);
                    tracing::info!(instance = %inst.key.address(), "app instance stopped");
                    self.event(&inst);
                }
                InstanceState::Launching | InstanceState::Updating => {
                    self.end_run(&inst, &node, false).await;
                    if let Err(e) = self.move_to_current(&inst, &node, state).await {
                        tracing::error!(instance = %inst.key.address(), error = %e, "moving the instance to its version failed");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    self.event(&inst);
                }
                InstanceState::Running => {
                    let ports = self.envelope(&inst.key.installation(), &inst.version()).map(|e| e.ports).ok();
                    if ports.is_some() && forwarding != ports {
                        self.stop_forwards(&inst);
                        self.start_forwards(&inst).await;
                        forwarding = ports;
                    }
                    self.step_running(&inst, &node).await;
                }
            }
        }
    }

    /// One step of a running instance: follow its process, wait out its
    /// back-off, or launch it.
    async fn step_running(self: &Arc<Self>, inst: &Arc<Instance>, node: &Arc<Node<B>>) {
        let rec = match inst.load() {
            Ok(r) => r,
            Err(d) => {
                self.quarantine(inst, d.0);
                return;
            }
        };
        if rec.process.is_some() {
            match self.follow(inst, node, rec).await {
                Ended::Again => {}
                Ended::Exited(st) => self.ended(inst, st, None).await,
                Ended::Lost(why) => self.ended(inst, None, Some(why)).await,
            }
            return;
        }
        let now = Timestamp::now();
        if let Some(at) = rec.retry_at
            && at > now
        {
            tokio::select! {
                _ = tokio::time::sleep(now.until(at)) => {}
                _ = inst.wake.notified() => {}
            }
            return;
        }
        if let Err(e) = self.launch(inst, node).await {
            tracing::warn!(instance = %inst.key.address(), error = %e, "launching the app failed");
            self.ended(inst, None, Some(format!("could not start: {}", e.message))).await;
        }
    }

    /// Ends the current run (restart, update, stop): `SIGTERM` to its
    /// process group, `SIGKILL` after the envelope's stop timeout; the rest
    /// of its output goes to the log. `stop_sandbox` also stops the sandbox.
    async fn end_run(&self, inst: &Arc<Instance>, node: &Arc<Node<B>>, stop_sandbox: bool) {
        self.unpublish(inst).await;
        let mut rec = inst.load().unwrap_or_default();
        if let (Some(sandbox), Some(process)) = (rec.sandbox.clone(), rec.process.clone())
            && let Ok(agent) = node.agent(&sandbox).await
        {
            let grace = self
                .envelope(&inst.key.installation(), &inst.version())
                .and_then(|e| e.stop_timeout())
                .unwrap_or(Duration::from_secs(10));
            let exited = |agent: flotilla_agent::AgentClient, process: String, within: Duration| async move {
                let deadline = Instant::now() + within;
                loop {
                    match agent.process(&process).await {
                        Ok(p) if p.exit.is_some() => return true,
                        Err(_) => return true,
                        Ok(_) if Instant::now() >= deadline => return false,
                        Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            };
            if agent.signal(&process, "TERM").await.is_ok() {
                // A suspended process must run to handle its TERM.
                let _ = agent.signal(&process, "CONT").await;
                if !exited(agent.clone(), process.clone(), grace).await {
                    tracing::info!(instance = %inst.key.address(), "app ignored SIGTERM for {grace:?}: killing it");
                    let _ = agent.signal(&process, "KILL").await;
                    exited(agent.clone(), process.clone(), Duration::from_secs(5)).await;
                }
            }
            // Whatever it wrote since the log last caught up, and its status.
            if let Ok((mut s, _)) = agent.output(&process, rec.offset, false).await
                && let Ok(mut w) = LogWriter::open(&inst.logs_dir(), rec.run, self.log_limits)
            {
                while let Ok(Some(f)) = s.next().await {
                    match f.kind {
                        FrameKind::Stdout => _ = w.write(Stream::Out, &f.payload, Timestamp::now()),
                        FrameKind::Stderr => _ = w.write(Stream::Err, &f.payload, Timestamp::now()),
                        FrameKind::Exit => {
                            rec.last_exit = f.as_exit();
                            let _ = w.flush(Timestamp::now());
                            let _ = w.note(
                                &format!("{} (stopped by the node)", describe(rec.last_exit.as_ref())),
                                Timestamp::now(),
                            );
                        }
                        _ => {}
                    }
                }
                rec.offset = s.offset;
            }
        }
        rec.process = None;
        let _ = inst.save(&rec);
        inst.live.lock().expect("live").pid = None;
        if stop_sandbox && let Some(sandbox) = &rec.sandbox {
            let _ = node.stop(sandbox).await;
        }
    }

    /// `launching`/`updating` → `running` on the installation's current
    /// version, with a fresh back-off; a new sandbox if the version's
    /// image, backend, network or limits differ.
    async fn move_to_current(
        &self,
        inst: &Arc<Instance>,
        node: &Arc<Node<B>>,
        from: InstanceState,
    ) -> Result<(), ApiError> {
        let _g = inst.lock.lock().await;
        if inst.state().ok() != Some(from) {
            return Ok(());
        }
        let k = inst.key.installation();
        let version = self.current(&k)?;
        let mut rec = inst.load().map_err(|d| ApiError::internal(d.0))?;
        let old = inst.version();
        if old != version {
            let replace = match (self.envelope(&k, &old), self.envelope(&k, &version)) {
                (Ok(a), Ok(b)) => new_sandbox_needed(&a, &b),
                _ => true,
            };
            if replace && let Some(sandbox) = rec.sandbox.take() {
                let _ = node.delete(&sandbox).await;
            }
            inst.set_version(&version)?;
        }
        rec.history.streak = 0;
        rec.retry_at = None;
        rec.reason = None;
        inst.save(&rec)?;
        inst.transition(from, InstanceState::Running)?;
        tracing::info!(instance = %inst.key.address(), version = %version, "app instance moving to its version");
        Ok(())
    }

    /// Starts a run: the sandbox (made, started or reused), the binary, and
    /// the process `run-<N>`, with `N` recorded before the exec.
    async fn launch(&self, inst: &Arc<Instance>, node: &Arc<Node<B>>) -> Result<(), ApiError> {
        let k = inst.key.installation();
        let version = inst.version();
        let env = self.envelope(&k, &version)?;
        let mut rec = inst.load().map_err(|d| ApiError::internal(d.0))?;
        let sandbox = self.ensure_sandbox(inst, node, &env, &version, &mut rec).await?;
        if env.binary.is_some() {
            let bin = self.layout.installation(&k).join(&version).join("bin");
            let body = binary_tar(&bin, &binary_name(env.binary.as_ref())).await?;
            node.import(&sandbox, body, None, None).await?;
        }
        rec.run += 1;
        let process = format!("run-{}", rec.run);
        rec.process = Some(process.clone());
        rec.offset = 0;
        rec.retry_at = None;
        rec.reason = None;
        rec.started_at = Some(Timestamp::now());
        inst.save(&rec)?;
        let argv = argv(&env);
        if let Ok(mut w) = LogWriter::open(&inst.logs_dir(), rec.run, self.log_limits) {
            let _ = w.note(&format!("run {} of {version} starting: {argv:?}", rec.run), Timestamp::now());
        }
        let req = ExecRequest {
            argv,
            env: env.env.clone(),
            cwd: env.cwd.clone(),
            detach: true,
            id: Some(process),
            ..Default::default()
        };
        let agent = node.agent(&sandbox).await?;
        match agent.exec_detached(&req).await {
            Ok(_) => Ok(()),
            // Started before a crash: that process is this run.
            Err(ClientError::Api(e)) if e.code == ErrorCode::Conflict => Ok(()),
            Err(e) => {
                rec.process = None;
                inst.save(&rec)?;
                Err(e.to_api())
            }
        }
    }

    /// The instance's sandbox, running: the recorded one (started again if
    /// it stopped), or a new one.
    async fn ensure_sandbox(
        &self,
        inst: &Arc<Instance>,
        node: &Arc<Node<B>>,
        env: &Envelope,
        version: &str,
        rec: &mut RunRecord,
    ) -> Result<String, ApiError> {
        let name = inst.key.sandbox_name();
        let existing = rec.sandbox.as_deref().and_then(|id| node.get(id).ok()).or_else(|| node.get(&name).ok());
        let id = match existing {
            Some(s) if s.state == SandboxState::Running => s.id,
            Some(s) if matches!(s.state, SandboxState::Stopped | SandboxState::Failed) => {
                node.start(&s.id).await?;
                s.id
            }
            Some(s) => {
                return Err(ApiError::new(
                    ErrorCode::InProgress,
                    format!("its sandbox {} is {}", s.id, s.state.as_str()),
                ));
            }
            None => {
                let req = CreateSandboxRequest {
                    image: Some(env.image().to_string()),
                    backend: env.backend,
                    name: Some(name),
                    resources: env.resources()?,
                    labels: [(INSTANCE_LABEL.to_string(), inst.key.address())].into(),
                    network: env.network.unwrap_or_default(),
                    ..Default::default()
                };
                let s = node.create(req).await?;
                rec.sandbox_version = Some(version.to_string());
                s.id
            }
        };
        rec.sandbox = Some(id.clone());
        inst.save(rec)?;
        inst.live.lock().expect("live").sandbox = Some(id.clone());
        Ok(id)
    }

    /// Follows the recorded process's output into the log until it exits,
    /// the state changes, or the agent stops answering.
    async fn follow(self: &Arc<Self>, inst: &Arc<Instance>, node: &Arc<Node<B>>, mut rec: RunRecord) -> Ended {
        let (Some(sandbox), Some(process)) = (rec.sandbox.clone(), rec.process.clone()) else {
            return Ended::Again;
        };
        inst.live.lock().expect("live").sandbox = Some(sandbox.clone());
        let agent = match node.agent(&sandbox).await {
            Ok(a) => a,
            Err(e) => return self.trouble(node, &sandbox, e.message).await,
        };
        let info = match agent.process(&process).await {
            Ok(i) => i,
            Err(ClientError::Api(e)) if e.code == ErrorCode::NotFound => {
                return Ended::Lost("its process is gone: the sandbox restarted".into());
            }
            Err(e) => return self.trouble(node, &sandbox, e.to_api().message).await,
        };
        let first = inst.live.lock().expect("live").pid.replace(info.pid).is_none();
        let (mut stream, start) = match agent.output(&process, rec.offset, true).await {
            Ok(x) => x,
            Err(e) => return self.trouble(node, &sandbox, e.to_api().message).await,
        };
        let Ok(mut w) = LogWriter::open(&inst.logs_dir(), rec.run, self.log_limits) else {
            tracing::error!(instance = %inst.key.address(), "cannot open the log");
            return self.trouble(node, &sandbox, "cannot open the log".into()).await;
        };
        if start > rec.offset {
            let _ = w.note(
                &format!("output bytes {}..{start} were lost: older than the agent keeps", rec.offset),
                Timestamp::now(),
            );
        }
        if info.exit.is_none() {
            self.publish(inst).await;
            if first {
                self.event(inst);
            }
        }
        let mut saved = Instant::now();
        loop {
            let frame = tokio::select! {
                biased;
                _ = inst.wake.notified() => {
                    rec.offset = stream.offset;
                    let _ = inst.save(&rec);
                    return Ended::Again;
                }
                f = stream.next() => f,
            };
            let now = Timestamp::now();
            match frame {
                Ok(Some(f)) => match f.kind {
                    FrameKind::Stdout => _ = w.write(Stream::Out, &f.payload, now),
                    FrameKind::Stderr => _ = w.write(Stream::Err, &f.payload, now),
                    FrameKind::Exit => {
                        let st = f.as_exit();
                        let _ = w.flush(now);
                        let _ = w.note(&describe(st.as_ref()), now);
                        rec.offset = stream.offset;
                        let _ = inst.save(&rec);
                        return Ended::Exited(st);
                    }
                    FrameKind::Error => {
                        rec.offset = stream.offset;
                        let _ = inst.save(&rec);
                        let msg = String::from_utf8_lossy(&f.payload).into_owned();
                        return self.trouble(node, &sandbox, msg).await;
                    }
                    _ => {}
                },
                Ok(None) | Err(_) => {
                    rec.offset = stream.offset;
                    let _ = inst.save(&rec);
                    return self.trouble(node, &sandbox, "the output stream broke".into()).await;
                }
            }
            if saved.elapsed() >= SAVE_OFFSET_EVERY && rec.offset != stream.offset {
                rec.offset = stream.offset;
                let _ = inst.save(&rec);
                saved = Instant::now();
            }
        }
    }

    /// The agent did not answer as expected: if the sandbox is not running
    /// the run is lost; otherwise pause and look again (never start a
    /// second copy while the first may live).
    async fn trouble(&self, node: &Arc<Node<B>>, sandbox: &str, why: String) -> Ended {
        match node.get(sandbox) {
            Ok(s) if s.state == SandboxState::Running => {
                tokio::time::sleep(RETRY_PAUSE).await;
                Ended::Again
            }
            Ok(s) => Ended::Lost(format!("its sandbox {sandbox} is {} ({why})", s.state.as_str())),
            Err(_) => Ended::Lost(format!("its sandbox {sandbox} is gone ({why})")),
        }
    }

    /// A run ended: the restart policy decides what follows.
    async fn ended(&self, inst: &Arc<Instance>, status: Option<ExitStatus>, why: Option<String>) {
        self.unpublish(inst).await;
        let _g = inst.lock.lock().await;
        inst.live.lock().expect("live").pid = None;
        let Ok(mut rec) = inst.load() else { return };
        rec.process = None;
        if inst.state().ok() != Some(InstanceState::Running) {
            // A stop or restart took over; it decides.
            let _ = inst.save(&rec);
            return;
        }
        let k = inst.key.installation();
        let policy = self.envelope(&k, &inst.version()).map(|e| e.restart).unwrap_or_default();
        let backoff = policy.backoff().unwrap_or_else(|_| {
            flotilla_api::app::RestartPolicy::default().backoff().expect("the default policy is valid")
        });
        let now = Timestamp::now();
        let end = match &status {
            Some(ExitStatus { code: Some(0), .. }) => RunEnd::Success,
            _ => RunEnd::Failure,
        };
        let what = why.unwrap_or_else(|| describe(status.as_ref()));
        rec.last_exit = status;
        let started = rec.started_at.unwrap_or(now);
        match backoff.decide(end, started, now, &mut rec.history, rand01()) {
            Decision::Restart { delay, attempt } => {
                rec.retry_at = Some(now.plus(delay));
                rec.reason =
                    Some(format!("{what}; restart {attempt} in {}", flotilla_api::units::format_duration(delay)));
                tracing::info!(instance = %inst.key.address(), reason = %what, ?delay, attempt, "app instance will restart");
                let _ = inst.save(&rec);
            }
            Decision::Stop { reason } => {
                rec.retry_at = None;
                rec.reason = Some(format!("{what}: {reason}"));
                tracing::info!(instance = %inst.key.address(), reason = %what, "app instance not restarted: {reason}");
                let _ = inst.save(&rec);
                let _ = inst.transition(InstanceState::Running, InstanceState::NotRunning);
            }
        }
        inst.bump();
        drop(_g);
        self.event(inst);
    }

    /// Releases what a stopped or deleted instance holds.
    async fn teardown(&self, inst: &Arc<Instance>, node: &Arc<Node<B>>, delete: bool) {
        self.unpublish(inst).await;
        self.stop_forwards(inst);
        let rec = inst.load().unwrap_or_default();
        if let Some(sandbox) = &rec.sandbox {
            let r = if delete { node.delete(sandbox).await } else { node.stop(sandbox).await.map(|_| ()) };
            if let Err(e) = r
                && e.code != ErrorCode::NotFound
            {
                tracing::warn!(instance = %inst.key.address(), error = %e, "releasing the instance's sandbox failed");
            }
        }
        inst.live.lock().expect("live").pid = None;
    }

    pub(super) fn quarantine(&self, inst: &Arc<Instance>, why: String) {
        tracing::error!(instance = %inst.key.address(), reason = %why, "app instance quarantined");
        self.instances.lock().expect("instances").remove(&inst.key);
        self.quarantined.lock().expect("quarantine").insert(inst.key.clone(), why);
        inst.bump();
    }

    /// Mounts the envelope's names at the instance's first forwarded port.
    async fn publish(&self, inst: &Arc<Instance>) {
        let Some(table) = self.names.lock().expect("names").clone() else { return };
        let Ok(env) = self.envelope(&inst.key.installation(), &inst.version()) else { return };
        let address = {
            let live = inst.live.lock().expect("live");
            if env.publish.is_empty() || live.publisher.is_some() {
                return;
            }
            let Some(p) = live.ports.first() else { return };
            p.address.clone()
        };
        let p = flotilla_names::Publisher::new(table, flotilla_names::PublisherConfig::new(Duration::from_secs(10)));
        let _ = p.add_server(&address).await;
        for n in &env.publish {
            if let Err(e) = p.add_name(n).await {
                tracing::warn!(instance = %inst.key.address(), name = %n, error = %e, "publishing failed (retried)");
            }
        }
        let mut live = inst.live.lock().expect("live");
        live.published = env.publish.clone();
        live.publisher = Some(p);
    }

    pub(super) async fn unpublish(&self, inst: &Arc<Instance>) {
        let p = {
            let mut live = inst.live.lock().expect("live");
            live.published.clear();
            live.publisher.take()
        };
        if let Some(p) = p {
            p.stop().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), p.wait_for_stop()).await;
        }
    }

    /// Listens on a host port for each of the envelope's ports (the same
    /// ports as before, when they are free) and forwards into the sandbox.
    async fn start_forwards(self: &Arc<Self>, inst: &Arc<Instance>) {
        let Ok(env) = self.envelope(&inst.key.installation(), &inst.version()) else { return };
        let Ok(mut rec) = inst.load() else { return };
        let mut ports = Vec::new();
        let mut tasks = Vec::new();
        let mut listeners = Vec::new();
        for port in &env.ports {
            let want = rec.host_ports.get(port).copied().unwrap_or(0);
            // Handed over by the node this one replaced: the same socket,
            // with whatever connections queued meanwhile.
            let handed = (want != 0).then(|| self.take_inherited(&format!("{}:{want}", self.host))).flatten();
            // Else the port it had before, if it can get it back: a listener
            // just aborted may take a moment to close.
            let mut listener = match handed {
                Some(l) => Ok(l),
                None => tokio::net::TcpListener::bind((self.host.as_str(), want)).await,
            };
            let deadline = Instant::now() + Duration::from_secs(1);
            while want != 0 && listener.is_err() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
                listener = tokio::net::TcpListener::bind((self.host.as_str(), want)).await;
            }
            if want != 0 && listener.is_err() {
                tracing::warn!(instance = %inst.key.address(), port = want, "the forwarded port is taken: picking another");
                listener = tokio::net::TcpListener::bind((self.host.as_str(), 0)).await;
            }
            let listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(instance = %inst.key.address(), port, error = %e, "cannot listen for the port");
                    continue;
                }
            };
            let Ok(local) = listener.local_addr() else { continue };
            rec.host_ports.insert(*port, local.port());
            ports.push(flotilla_api::app::PortForward { port: *port, address: local.to_string() });
            let listener = Arc::new(listener);
            listeners.push((local.to_string(), listener.clone()));
            let open = self.open_connections.clone();
            tasks.push(tokio::spawn(super::forward::serve(listener, *port, inst.clone(), self.node.clone(), open)));
        }
        let _ = inst.save(&rec);
        let mut live = inst.live.lock().expect("live");
        live.ports = ports;
        live.forwards = tasks;
        live.listeners = listeners;
    }

    fn stop_forwards(&self, inst: &Instance) {
        let mut live = inst.live.lock().expect("live");
        for t in live.forwards.drain(..) {
            t.abort();
        }
        live.ports.clear();
        live.listeners.clear();
    }
}

/// Fetches a binary to `dest` and checks its digest before it is used.
pub(super) async fn fetch_binary(b: &Binary, dest: &Path) -> Result<(), ApiError> {
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let part = dest.with_extension("part");
    let mut out = tokio::fs::File::create(&part).await.map_err(|e| io_err("writing the binary", &part, e))?;
    let mut hash = sha2::Sha256::new();
    let mut total = 0u64;
    let fetched: Result<(), ApiError> = async {
        let mut push = async |chunk: &[u8]| -> Result<(), ApiError> {
            total += chunk.len() as u64;
            if total > MAX_BINARY_BYTES {
                return Err(flotilla_api::field_error("binary", format!("is larger than {MAX_BINARY_BYTES} bytes")));
            }
            hash.update(chunk);
            out.write_all(chunk).await.map_err(|e| io_err("writing the binary", &part, e))
        };
        if let Some(path) = &b.path {
            use tokio::io::AsyncReadExt;
            let mut f = tokio::fs::File::open(path)
                .await
                .map_err(|e| flotilla_api::field_error("binary.path", format!("{path}: {e}")))?;
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| flotilla_api::field_error("binary.path", format!("{path}: {e}")))?;
                if n == 0 {
                    break;
                }
                push(&buf[..n]).await?;
            }
        } else if let Some(url) = &b.url {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let fail = |e: reqwest::Error| flotilla_api::field_error("binary.url", format!("fetching {url}: {e}"));
            let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(30)).build().map_err(fail)?;
            let mut resp = client.get(url).send().await.and_then(|r| r.error_for_status()).map_err(fail)?;
            while let Some(chunk) = resp.chunk().await.map_err(fail)? {
                push(&chunk).await?;
            }
        }
        out.flush().await.map_err(|e| io_err("writing the binary", &part, e))?;
        let got: String = hash.finalize_reset().iter().map(|x| format!("{x:02x}")).collect();
        if got != b.sha256 {
            return Err(flotilla_api::field_error(
                "binary.sha256",
                format!("does not match: the binary has sha256 {got}, the envelope says {}", b.sha256),
            ));
        }
        Ok(())
    }
    .await;
    if let Err(e) = fetched {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(e);
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))
        .and_then(|()| std::fs::rename(&part, dest))
        .map_err(|e| io_err("placing the binary", dest, e))
}

/// A tar stream of `.app/NAME` (mode 0755) holding the file `bin`.
async fn binary_tar(bin: &Path, name: &str) -> Result<axum::body::Body, ApiError> {
    let f = tokio::fs::File::open(bin).await.map_err(|e| io_err("reading the binary", bin, e))?;
    let len = f.metadata().await.map_err(|e| io_err("reading the binary", bin, e))?.len();
    let header = |path: &str, size: u64, kind: tar::EntryType| -> Result<tar::Header, ApiError> {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).map_err(|e| ApiError::internal(format!("tar header for {path}: {e}")))?;
        h.set_size(size);
        h.set_mode(0o755);
        h.set_entry_type(kind);
        h.set_mtime(0);
        h.set_cksum();
        Ok(h)
    };
    let mut head = Vec::with_capacity(1024);
    head.extend_from_slice(header(".app/", 0, tar::EntryType::Directory)?.as_bytes());
    head.extend_from_slice(header(&format!(".app/{name}"), len, tar::EntryType::Regular)?.as_bytes());
    let pad = ((512 - len % 512) % 512) as usize;
    let tail = vec![0u8; pad + 1024];
    use futures_util::StreamExt;
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) })
        .chain(tokio_util::io::ReaderStream::new(f))
        .chain(futures_util::stream::once(async move { Ok(Bytes::from(tail)) }));
    Ok(axum::body::Body::from_stream(stream))
}

/// Streams the log of run `run` and, with `follow`, each later run as it
/// appears, until the instance stops and everything is sent.
pub(super) fn stream_logs(inst: Arc<Instance>, dir: PathBuf, run: u64, follow: bool) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut changed = inst.changed.subscribe();
        let (mut run, mut part, mut pos) = (run, 0usize, 0u64);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let files = logs::run_files(&dir, run);
            let mut progressed = false;
            if let Some(path) = files.get(part)
                && let Ok(mut f) = tokio::fs::File::open(path).await
                && f.seek(std::io::SeekFrom::Start(pos)).await.is_ok()
            {
                loop {
                    match f.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            pos += n as u64;
                            progressed = true;
                            if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            if part + 1 < files.len() {
                (part, pos) = (part + 1, 0);
                continue;
            }
            if !follow {
                return;
            }
            if let Some(next) = logs::runs(&dir).into_iter().find(|r| *r > run) {
                (run, part, pos) = (next, 0, 0);
                continue;
            }
            if progressed {
                continue;
            }
            let live = matches!(
                inst.state(),
                Ok(InstanceState::Running
                    | InstanceState::Launching
                    | InstanceState::Updating
                    | InstanceState::Suspended
                    | InstanceState::Dying)
            );
            if !live || tx.is_closed() {
                return;
            }
            changed.borrow_and_update();
            let _ = tokio::time::timeout(Duration::from_millis(200), changed.changed()).await;
        }
    });
    rx
}
