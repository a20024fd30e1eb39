//! One build, driven to its end on a node (seed 000's `buildStatus`, made
//! crash-proof).
//!
//! Every side effect is recorded before or as it happens, so an executor
//! started on a build that was already running (after a coordinator or
//! node crash) carries on from where the last one stopped:
//!
//! 1. **Sandbox** `build-<id>`: created with a `delete_at` past the
//!    builder's timeout (the node's janitor reaps it if we never come
//!    back). Its id is stored; on resume it is looked up, and a sandbox that
//!    is gone or dead means the build is retried once, visibly.
//! 2. **Source**: `git archive` of the revision streamed into `/workspace`;
//!    `source_written` is stored after.
//! 3. **Steps**: step `i` runs as the detached process `step-<i>`, and its
//!    index is stored *before* the exec. The agent refuses a second process
//!    with that id, so a resumed executor finds the one running instead of
//!    starting it again. The process is started with `hold`: the agent keeps
//!    every output byte until it is acknowledged, and blocks the step's
//!    writes rather than drop any. Output is followed by offset in streams
//!    of at most [`FOLLOW_LIMIT`] bytes, stored in batches with the offset
//!    they reach ([`Store::append_log`]), and acknowledged by the next
//!    request: a re-attach resumes there, no gap, no repeat.
//!    The agent enforces the build's timeout on each step (what is left of
//!    it when the step starts), by the sandbox's own clock: a step that
//!    ended while the coordinator was away is judged by its real exit.
//! 4. **Cleanup**: the build finished (and with it, maybe, the run), then
//!    its sandbox deleted: a crash between the two leaves a sandbox for the
//!    janitor, never a passed build taken for lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_agent::http::ClientError;
use flotilla_api::coordinator::{BuildFailure, RunState};
use flotilla_api::{
    BackendKind, CreateSandboxRequest, ErrorCode, ExecRequest, FrameKind, NetworkMode, OutputQuery, Resources,
    SandboxState, Timestamp,
};
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::runtime::Coordinator;
use crate::store::{BuildWork, StoreError};
use flotilla_node::NodeClient;

/// The label that marks a build's sandbox (the janitor looks for it).
pub const BUILD_LABEL: &str = "flotilla.build";
/// The label naming the coordinator that made a build's sandbox: a
/// janitor reaps only its own.
pub const COORDINATOR_LABEL: &str = "flotilla.coordinator";
/// How long a sandbox outlives its builder's timeout before the node reaps
/// it on its own (a coordinator that never came back).
pub const DELETE_AT_SLACK: Duration = Duration::from_secs(600);
/// The reason of the one automatic retry.
pub const SANDBOX_LOST: &str = "sandbox lost";
/// The retry reason of a build whose node was lost.
pub const NODE_LOST: &str = "node lost";
/// Attempts a build gets when its nodes keep being lost.
pub const NODE_LOST_ATTEMPTS: u32 = 3;
/// Lines of output a failure quotes.
pub const FAILURE_LINES: usize = 20;
/// Pause before re-attaching to a stream that broke while its sandbox runs.
const REATTACH_PAUSE: Duration = Duration::from_millis(500);

/// Output bytes one follow request asks for before it comes back to
/// acknowledge them: well under the agent's hold budget
/// ([`flotilla_api::limits::PROCESS_RING_BYTES`]), so a step printing as
/// fast as it can keeps running while the last stretch is stored.
pub const FOLLOW_LIMIT: u64 = 2 << 20;

/// Output gathered before one store write: frames that arrive together
/// are stored together (one transaction, not one per pipe read).
const LOG_BATCH: usize = 512 << 10;

/// How long past its deadline the coordinator waits for a build's end
/// before timing it out itself. The agent times out each step by the
/// sandbox's clock; this catches what no agent reports (a hung create, a
/// silent node) and gives a resumed executor time to hear how a step that
/// ended during an outage really ended.
pub const TIMEOUT_GRACE: Duration = Duration::from_secs(30);

/// How long a liveness call (is the sandbox there? what runs on the
/// node?) may take: a node cut off the network answers nothing, not even
/// a refusal, and TCP alone would wait minutes.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an executor following a silent step asks whether its node
/// still answers (the fleet's describe, at most this old).
const NODE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Resolves only once the executor's node has not answered for
/// `node_lost_after`, with why: raced against a stream that may stay
/// silent for ever when the node's link is cut rather than refused.
async fn node_lost(c: &Arc<Coordinator>) -> String {
    let Ok(name) = ON.try_with(|p| p.name.clone()) else { return std::future::pending().await };
    loop {
        tokio::time::sleep(NODE_CHECK_EVERY).await;
        if let Some(down) = c.node_down_for(&name).await
            && down >= c.config.node_lost_after
        {
            return format!("node {name} lost: no answer for {}s", down.as_secs());
        }
    }
}

/// What a build runs: its builder, as configured at the change's revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildSpec {
    pub builder: String,
    pub image: String,
    pub backend: BackendKind,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub network: NetworkMode,
    pub timeout_ms: u64,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Names of the project secrets the steps get (values are read when
    /// the steps start, never kept in the spec).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    pub steps: Vec<SpecStep>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecStep {
    pub name: String,
    pub run: String,
}

impl BuildSpec {
    pub fn from_builder(b: &crate::config::Builder) -> BuildSpec {
        BuildSpec {
            builder: b.name.to_string(),
            image: b.image.clone(),
            backend: b.backend,
            resources: b.resources.clone(),
            network: b.network,
            timeout_ms: b.timeout.as_millis() as u64,
            env: b.env.clone(),
            secrets: b.secrets.clone(),
            steps: b.steps.iter().map(|s| SpecStep { name: s.name.clone(), run: s.run.clone() }).collect(),
        }
    }
}

impl BuildSpec {
    /// What the scheduler must find on a node: the builder's platform (from
    /// its `os-arch[-suffix]` name), image, backend and resources (a nominal
    /// share when the builder names none).
    pub fn need(&self) -> Result<crate::sched::Need, String> {
        let name: crate::config::BuilderName = self.builder.parse().map_err(|e| format!("{e}"))?;
        Ok(crate::sched::Need {
            os: name.os,
            arch: name.arch,
            image: self.image.clone(),
            backend: self.backend,
            millicpus: self.resources.cpus.map_or(crate::sched::DEFAULT_MILLICPUS, |c| (c * 1000.0).ceil() as u64),
            memory_bytes: self.resources.memory_bytes.unwrap_or(crate::sched::DEFAULT_MEMORY_BYTES),
        })
    }
}

/// A running executor's handle: how cancel reaches it, and how it hears
/// that the build is another coordinator's now.
#[derive(Debug, Default)]
pub struct Handle {
    pub cancel: Notify,
    pub fenced: Notify,
}

/// Why an executor stopped early.
enum Stop {
    /// The build ended (passed, failed, canceled): recorded.
    Done,
    /// The sandbox is gone: retry once.
    Lost(String),
    /// The build's node is lost: retry on another (a few times).
    NodeLost(String),
    /// The store failed: leave the build running for the next executor.
    Store(StoreError),
    /// Another coordinator adopted the build: stop acting on it.
    Fenced,
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Stop {
        match e {
            StoreError::Fenced(_) => Stop::Fenced,
            e => Stop::Store(e),
        }
    }
}

tokio::task_local! {
    /// The node the executor's build was placed on: every call an executor
    /// makes to a node goes to this one (see [`node`]).
    static ON: Placed;
}

#[derive(Clone)]
struct Placed {
    name: String,
    client: NodeClient,
}

/// The node of the build this executor runs (the coordinator's first node
/// outside an executor, e.g. for the janitor's scope-less calls).
fn node(c: &Coordinator) -> NodeClient {
    ON.try_with(|p| p.client.clone())
        .ok()
        .or_else(|| c.node.clone())
        .expect("node calls run in an executor's or the janitor's scope")
}

/// Drives build `id` to its end, on the node it was placed on.
pub async fn execute(c: Arc<Coordinator>, id: u64, handle: Arc<Handle>) {
    let placed = match c.store.work(id).await {
        Ok(Some(w)) => w.node,
        _ => None,
    };
    let name = placed.clone().or_else(|| c.node.as_ref().map(crate::runtime::node_name)).unwrap_or_default();
    let outcome = match c.node_for(placed.as_deref()).await {
        Some(client) => ON.scope(Placed { name, client }, run_patiently(&c, id, &handle)).await,
        None => Stop::NodeLost(format!("node {name} is no longer in the coordinator's fleet")),
    };
    match outcome {
        Stop::Done => {}
        Stop::Lost(why) => {
            if let Err(e) = lost(&c, id, why, SANDBOX_LOST).await {
                tracing::error!(build = id, error = %crate::error_chain(&e), "recording a lost sandbox failed");
            }
        }
        Stop::NodeLost(why) => {
            if let Err(e) = lost(&c, id, why, NODE_LOST).await {
                tracing::error!(build = id, error = %crate::error_chain(&e), "recording a lost node failed");
            }
        }
        Stop::Store(e) => {
            let why = format!(
                "the store kept failing for {}: {}",
                flotilla_api::units::format_duration(STORE_PATIENCE),
                crate::error_chain(&e)
            );
            tracing::error!(build = id, "{why}");
            // Said on the build if the store takes it now; if not, the
            // lease lapses and the build is adopted where it stopped.
            let _ = fail(&c, id, None, "store", why).await;
        }
        Stop::Fenced => {
            tracing::warn!(build = id, "another coordinator adopted the build; this one stops acting on it");
        }
    }
    c.build_done(id).await;
}

/// How long an executor keeps trying while the store fails (a dropped
/// connection, a restart, a failover): past this the build's lease lapses
/// and whichever coordinator reaches the store first adopts it.
pub const STORE_PATIENCE: Duration = Duration::from_secs(120);

/// [`run`], again from what the store holds after every store failure
/// (re-attaching at the stored offset, as an adopting coordinator would),
/// with back-off from 100 ms to 5 s, for up to [`STORE_PATIENCE`]. A run
/// that gets further than its last failure starts the patience afresh.
async fn run_patiently(c: &Arc<Coordinator>, id: u64, handle: &Handle) -> Stop {
    let mut pause = Duration::from_millis(100);
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        let began = tokio::time::Instant::now();
        match run(c, id, handle).await {
            Stop::Store(e) => {
                // A run that went on for a while before failing was not
                // the same outage: the patience and back-off start over.
                if began.elapsed() > pause * 4 {
                    failing_since = None;
                    pause = Duration::from_millis(100);
                }
                let since = *failing_since.get_or_insert(began);
                if since.elapsed() >= STORE_PATIENCE {
                    return Stop::Store(e);
                }
                crate::metrics::store_retry(&c.metrics, "executor");
                tracing::warn!(build = id, error = %crate::error_chain(&e), retry_in = ?pause, "the store failed; trying again from what it holds");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

async fn run(c: &Arc<Coordinator>, id: u64, handle: &Handle) -> Stop {
    let work = match c.store.work(id).await {
        Ok(Some(w)) => w,
        Ok(None) => return Stop::Done,
        Err(e) => return Stop::Store(e),
    };
    if work.state.is_final() {
        return Stop::Done;
    }
    if work.owner.as_deref() != Some(c.config.owner.as_str()) {
        return Stop::Fenced;
    }
    // Canceled while no executor ran it (the coordinator was down): end it
    // now instead of resuming it.
    if work.cancel_requested {
        return end_early(c, &work, RunState::Canceled, None).await;
    }
    let spec: BuildSpec = match serde_json::from_str(&work.spec) {
        Ok(s) => s,
        Err(e) => return fail(c, id, None, "spec", format!("the stored build spec is damaged: {e}")).await,
    };
    let started = c.store.build(id).await.ok().flatten().and_then(|b| b.started_at).unwrap_or_else(Timestamp::now);
    let deadline = started.plus(Duration::from_millis(spec.timeout_ms));
    // Counted from now when the deadline passed while no executor ran (an
    // outage): the steps' own ends, which the agent knows, come first.
    let until = tokio::time::Instant::now() + Timestamp::now().until(deadline) + TIMEOUT_GRACE;
    tokio::select! {
        s = steps(c, &work, &spec, deadline) => s,
        () = handle.fenced.notified() => Stop::Fenced,
        () = handle.cancel.notified() => {
            end_early(c, &work, RunState::Canceled, None).await
        }
        () = tokio::time::sleep_until(until) => {
            let step = c.store.build(id).await.ok().flatten().and_then(|b| b.step).unwrap_or_default();
            timed_out(c, &work, &spec, &step).await
        }
    }
}

/// Fails the build for its timeout, in `step`.
async fn timed_out(c: &Arc<Coordinator>, work: &BuildWork, spec: &BuildSpec, step: &str) -> Stop {
    let failure = BuildFailure {
        step: step.to_string(),
        message: format!(
            "timed out after {} in step {step:?}",
            flotilla_api::units::format_duration(Duration::from_millis(spec.timeout_ms))
        ),
        last_lines: c.store.tail(work.id, FAILURE_LINES).await.unwrap_or_default(),
    };
    end_early(c, work, RunState::Failed, Some(failure)).await
}

/// Cancel or timeout: stop what runs, delete the sandbox, record the end.
async fn end_early(c: &Arc<Coordinator>, work: &BuildWork, state: RunState, failure: Option<BuildFailure>) -> Stop {
    let id = work.id;
    let w = c.store.work(id).await.ok().flatten();
    let sandbox = w.as_ref().and_then(|w| w.sandbox.clone());
    let event = if state == RunState::Canceled { "canceled" } else { "timeout" };
    let _ = c.store.timeline(id, event, failure.as_ref().map(|f| f.message.clone())).await;
    finish_then_delete(c, id, sandbox.as_deref(), state, failure).await
}

async fn steps(c: &Arc<Coordinator>, work: &BuildWork, spec: &BuildSpec, deadline: Timestamp) -> Stop {
    let id = work.id;
    let (env, masker) = match step_env(c, work, spec).await {
        Ok(x) => x,
        Err(stop) => return stop,
    };
    let sandbox = match ensure_sandbox(c, work, spec).await {
        Ok(s) => s,
        Err(stop) => return stop,
    };
    if !work.source_written
        && let Err(stop) = write_source(c, work, &sandbox).await
    {
        return stop;
    }
    let first = work.step_index;
    for (i, step) in spec.steps.iter().enumerate().skip(first) {
        let process = format!("step-{i}");
        // What is left of the build's time.
        let left = Timestamp::now().until(deadline);
        let resumed = match c.store.begin_step(id, i, &step.name).await {
            Ok(true) => {
                if left.is_zero() {
                    return timed_out(c, work, spec, &step.name).await;
                }
                let _ = c.timeline(id, "start_step", Some(step.name.clone())).await;
                false
            }
            Ok(false) => {
                let _ = c
                    .timeline(id, "reattached", Some(format!("{} at output byte {}", step.name, work.proc_offset)))
                    .await;
                true
            }
            Err(e) => return e.into(),
        };
        let agent = node(c).sandbox(&sandbox);
        // A resumed step keeps the timeout it was started with (the exec
        // is refused as a conflict) and is judged by how it really ended;
        // one a crash kept from starting gets what is left, if only 1 ms.
        let left = if resumed { left.max(Duration::from_millis(1)) } else { left };
        let req = ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), step.run.clone()],
            env: env.clone(),
            cwd: Some("/workspace".into()),
            detach: true,
            id: Some(process.clone()),
            timeout_ms: Some(left.as_millis() as u64),
            hold: true,
            ..Default::default()
        };
        let started = tokio::select! {
            r = agent.exec_detached(&req) => r,
            why = node_lost(c) => return Stop::NodeLost(why),
        };
        match started {
            Ok(_) => {}
            // Started before a crash: that process is this step.
            Err(ClientError::Api(e)) if e.code == ErrorCode::Conflict => {}
            Err(e) => match sandbox_alive(c, &sandbox).await {
                Ok(()) => {
                    let msg = format!("starting step {:?} failed: {}", step.name, crate::error_chain(&e));
                    return fail(c, id, Some(&sandbox), &step.name, msg).await;
                }
                Err(g) => return g.stop(format!("its sandbox {sandbox} is gone ({})", crate::error_chain(&e))),
            },
        }
        let status = match follow(c, id, &sandbox, &process, &step.name, &masker).await {
            Ok(s) => s,
            Err(stop) => return stop,
        };
        if status.as_ref().is_some_and(|s| s.timed_out) {
            let _ = c.timeline(id, "end_step", Some(format!("{} timed out", step.name))).await;
            return timed_out(c, work, spec, &step.name).await;
        }
        let code = status.as_ref().and_then(|s| s.code);
        let detail = match (&status, code) {
            (_, Some(code)) => format!("{} exit {code}", step.name),
            (Some(s), None) => format!("{} killed by signal {}", step.name, s.signal.unwrap_or_default()),
            (None, None) => format!("{} ended without a status", step.name),
        };
        let _ = c.timeline(id, "end_step", Some(detail.clone())).await;
        if code != Some(0) {
            return fail(
                c,
                id,
                Some(&sandbox),
                &step.name,
                format!("step {:?} failed: {}", step.name, &detail[step.name.len() + 1..]),
            )
            .await;
        }
    }
    finish_then_delete(c, id, Some(&sandbox), RunState::Passed, None).await
}

/// The steps' environment: the builder's `env`, plus the project secrets
/// it names when this build may have them ([`crate::secrets::allowed`]:
/// withheld from a try, which the timeline says); and the masker of their
/// values for the log. A secret that is not set fails the build, naming it.
async fn step_env(
    c: &Arc<Coordinator>,
    work: &BuildWork,
    spec: &BuildSpec,
) -> Result<(BTreeMap<String, String>, crate::secrets::Masker), Stop> {
    let mut env = spec.env.clone();
    if spec.secrets.is_empty() {
        return Ok((env, Default::default()));
    }
    if let Err(why) = crate::secrets::allowed(work.kind) {
        // Said once, when the build starts: an executor that resumes or
        // adopts it (its sandbox already made) finds it on the timeline.
        if work.sandbox.is_none() {
            let detail = format!("{}: {why}", spec.secrets.join(", "));
            let _ = c.timeline(work.id, "secrets_withheld", Some(detail)).await;
        }
        return Ok((env, Default::default()));
    }
    let sealed = c.store.sealed_secrets(&work.project, spec.secrets.clone()).await?;
    let sandbox = work.sandbox.as_deref();
    if let Some(missing) = spec.secrets.iter().find(|n| !sealed.iter().any(|(s, _)| s == *n)) {
        let p = &work.project;
        let msg = format!("secret {missing} is not set for project {p} (flotilla secret set {p} {missing})");
        return Err(fail(c, work.id, sandbox, "secrets", msg).await);
    }
    let mut values = Vec::new();
    for (name, s) in sealed {
        match c.config.secrets.open(&work.project, &name, &s) {
            Ok(v) => {
                values.push(v.clone());
                env.insert(name, v);
            }
            Err(e) => return Err(fail(c, work.id, sandbox, "secrets", e.to_string()).await),
        }
    }
    Ok((env, crate::secrets::Masker::new(values.iter().map(String::as_str))))
}

/// The build's sandbox, running: the recorded one, or a new one.
async fn ensure_sandbox(c: &Arc<Coordinator>, work: &BuildWork, spec: &BuildSpec) -> Result<String, Stop> {
    let id = work.id;
    if let Some(sb) = &work.sandbox {
        return match sandbox_alive(c, sb).await {
            Ok(()) => Ok(sb.clone()),
            Err(g) => Err(g.stop(format!("its sandbox {sb} is gone or stopped"))),
        };
    }
    c.timeline(id, "sandbox_create_requested", Some(spec.image.clone())).await?;
    let name = format!("build-{id}");
    let req = CreateSandboxRequest {
        image: Some(spec.image.clone()),
        backend: spec.backend,
        name: Some(name.clone()),
        resources: spec.resources.clone(),
        ttl_s: Some((Duration::from_millis(spec.timeout_ms) + DELETE_AT_SLACK).as_secs()),
        labels: [
            (BUILD_LABEL.to_string(), id.to_string()),
            ("flotilla.project".to_string(), work.project.clone()),
            ("flotilla.builder".to_string(), work.builder.clone()),
            (COORDINATOR_LABEL.to_string(), c.config.owner.clone()),
        ]
        .into(),
        env: BTreeMap::new(),
        network: spec.network,
        ..Default::default()
    };
    // A node that hangs (accepts, never answers) is lost, not waited on.
    let created = tokio::select! {
        r = create_patiently(c, &req) => r,
        why = node_lost(c) => return Err(Stop::NodeLost(why)),
    };
    let created = match created {
        Ok(s) => s,
        // Created before a crash, its id not yet stored: it is ours by name.
        Err(ClientError::Api(e)) if e.code == ErrorCode::Conflict => {
            match tokio::time::timeout(CALL_TIMEOUT, node(c).get(&name)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(fail(c, id, None, "create_sandbox", crate::error_chain(&e)).await),
                Err(_) => return Err(Stop::NodeLost(format!("its node did not answer for {CALL_TIMEOUT:?}"))),
            }
        }
        Err(e) => {
            let msg = format!("creating the sandbox failed: {}", crate::error_chain(&e));
            return Err(fail(c, id, None, "create_sandbox", msg).await);
        }
    };
    c.store.set_sandbox(id, &created.id).await?;
    c.timeline(id, "sandbox_created", Some(created.id.clone())).await?;
    if created.state != SandboxState::Running {
        let msg = format!("the sandbox {} is {} after create", created.id, created.state.as_str());
        return Err(fail(c, id, Some(&created.id), "create_sandbox", msg).await);
    }
    c.timeline(id, "agent_up", None).await?;
    Ok(created.id)
}

/// How long a build waits for a node that does not answer (restarting,
/// handing over to a new version) before it fails at `create_sandbox`.
pub const NODE_PATIENCE: Duration = Duration::from_secs(120);

/// Creates the sandbox, waiting out a node that cannot be reached for up to
/// [`NODE_PATIENCE`]; an answer (even a refusal) ends the wait.
async fn create_patiently(
    c: &Arc<Coordinator>,
    req: &CreateSandboxRequest,
) -> Result<flotilla_api::Sandbox, ClientError> {
    let deadline = tokio::time::Instant::now() + NODE_PATIENCE;
    let mut pause = Duration::from_millis(200);
    loop {
        match node(c).create(req).await {
            Err(e @ (ClientError::Connect { .. } | ClientError::Http { .. }))
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::warn!(error = %crate::error_chain(&e), "the node does not answer; creating the build's sandbox again shortly");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// `git archive` of the revision, streamed into `/workspace`.
async fn write_source(c: &Arc<Coordinator>, work: &BuildWork, sandbox: &str) -> Result<(), Stop> {
    let id = work.id;
    c.timeline(id, "start_write_tar", Some(work.rev.clone())).await?;
    let mirror = match c.mirror(&work.project).await {
        Ok(m) => m,
        Err(e) => return Err(fail(c, id, Some(sandbox), "write_source", crate::error_chain(&*e)).await),
    };
    // Another coordinator may have seen the commit first (or this one
    // adopted the build): fetch what the mirror lacks.
    if mirror.commit(&work.rev).await.is_err() {
        if let Err(e) = mirror.fetch().await {
            tracing::warn!(build = id, error = %crate::error_chain(&e), "fetching the build's revision failed");
        }
        // A try another coordinator accepted: make its commit here.
        if mirror.commit(&work.rev).await.is_err()
            && let Some(p) = c.store.try_patch(&work.rev).await?
        {
            match mirror.apply_patch(&p.base, &p.patch, &p.message, p.date).await {
                Ok(sha) if sha == work.rev => {}
                Ok(sha) => {
                    let why = format!("the stored try patch made commit {sha} here, not {}", work.rev);
                    return Err(fail(c, id, Some(sandbox), "write_source", why).await);
                }
                Err(e) => {
                    let why = format!("making the try commit from its stored patch: {}", crate::error_chain(&e));
                    return Err(fail(c, id, Some(sandbox), "write_source", why).await);
                }
            }
        }
    }
    let mut child = match mirror.archive(&work.rev) {
        Ok(ch) => ch,
        Err(e) => return Err(fail(c, id, Some(sandbox), "write_source", crate::error_chain(&e)).await),
    };
    let stdout = child.stdout.take().expect("piped");
    let stream = tokio_util::io::ReaderStream::with_capacity(stdout, 256 << 10);
    let body = http_body_util::StreamBody::new(stream.map(|r| r.map(hyper::body::Frame::data)));
    let agent = node(c).sandbox(sandbox);
    let limits = Default::default();
    let put = tokio::select! {
        put = agent.put_workspace(body, None, &limits) => put,
        why = node_lost(c) => {
            let _ = child.kill().await;
            return Err(Stop::NodeLost(why));
        }
    };
    let finished = crate::git::Mirror::finish(child).await;
    match (put, finished) {
        (Ok(summary), Ok(())) => {
            c.store.set_source_written(id).await?;
            c.timeline(id, "end_write_tar", Some(format!("{} entries, {} bytes", summary.entries, summary.bytes)))
                .await?;
            Ok(())
        }
        (Err(e), _) => {
            let msg = format!("writing the source failed: {}", crate::error_chain(&e));
            Err(fail(c, id, Some(sandbox), "write_source", msg).await)
        }
        (Ok(_), Err(e)) => Err(fail(c, id, Some(sandbox), "write_source", crate::error_chain(&e)).await),
    }
}

/// Follows a step's process from the stored offset, storing every byte,
/// until it exits. Re-attaches while the sandbox lives.
async fn follow(
    c: &Arc<Coordinator>,
    id: u64,
    sandbox: &str,
    process: &str,
    step: &str,
    masker: &crate::secrets::Masker,
) -> Result<Option<flotilla_api::ExitStatus>, Stop> {
    loop {
        let w = c.store.work(id).await?.ok_or(Stop::Done)?;
        let mut offset = w.proc_offset;
        let agent = node(c).sandbox(sandbox);
        // Everything before `offset` is stored: the agent may let it go.
        let q = OutputQuery { from: offset, follow: Some(true), ack: true, limit: Some(FOLLOW_LIMIT) };
        let attached = agent.output_with(process, &q).await;
        let (mut stream, start) = match attached {
            Ok(x) => x,
            Err(ClientError::Api(e)) if e.code == ErrorCode::NotFound => {
                return Err(Stop::Lost(format!("its process {process} is gone: the sandbox restarted")));
            }
            Err(e) => {
                trouble(c, sandbox, &e).await?;
                continue;
            }
        };
        if start > offset {
            // The agent no longer keeps those bytes: say so on the timeline
            // (never silently), and go on from what it has.
            let _ =
                c.timeline(id, "log_gap", Some(format!("output bytes {offset}..{start} of {process} were lost"))).await;
            if !c.store.skip_to(id, offset, start).await? {
                continue;
            }
            offset = start;
        }
        let attached_at = offset;
        let mut batch: Vec<u8> = Vec::new();
        // Bytes past `offset` held back because they may begin a secret
        // that the next frame completes; re-read from the agent if this
        // attachment ends first.
        let mut held: Vec<u8> = Vec::new();
        loop {
            // Frames already here join the batch; once none is, the batch
            // is stored before waiting for more.
            let next = if batch.is_empty() {
                // Made anew for each frame: kept across the loop's body, a
                // check suspended inside the fleet's lock would hold it while
                // this task wants it (in `trouble`), a deadlock.
                tokio::select! {
                    next = stream.next() => next,
                    why = node_lost(c) => return Err(Stop::NodeLost(why)),
                }
            } else {
                match stream.next().now_or_never() {
                    Some(next) => next,
                    None => {
                        if !store_batch(c, id, &mut offset, &mut batch, &mut held, masker, false).await? {
                            break;
                        }
                        continue;
                    }
                }
            };
            let ends = !matches!(&next, Ok(Some(f)) if matches!(f.kind, FrameKind::Stdout | FrameKind::Stderr | FrameKind::Heartbeat));
            // The process is done: nothing can complete a held-back tail.
            let last = matches!(&next, Ok(Some(f)) if matches!(f.kind, FrameKind::Exit | FrameKind::Error));
            if (ends || batch.len() >= LOG_BATCH)
                && !store_batch(c, id, &mut offset, &mut batch, &mut held, masker, last).await?
            {
                // Someone else stored past here: start over from the
                // stored offset.
                break;
            }
            match next {
                Ok(Some(f)) => match f.kind {
                    FrameKind::Stdout | FrameKind::Stderr => batch.extend_from_slice(&f.payload),
                    FrameKind::Exit => return Ok(f.as_exit()),
                    FrameKind::Error => {
                        // The agent's own error (the sandbox stopped under
                        // the process, say): lost if the sandbox is gone,
                        // else a failure of the step.
                        let msg = String::from_utf8_lossy(&f.payload).into_owned();
                        if let Err(g) = sandbox_alive(c, sandbox).await {
                            return Err(g.stop(format!("its sandbox {sandbox} is gone ({msg})")));
                        }
                        return Err(fail(c, id, Some(sandbox), step, msg).await);
                    }
                    _ => {}
                },
                // The agent ends a stream after FOLLOW_LIMIT bytes (or
                // where it dropped output, for the next request to hear
                // of): come back for the rest at once. A stream that ends
                // having brought nothing is trouble.
                Ok(None) if offset > attached_at => break,
                Ok(None) => {
                    trouble(c, sandbox, &ClientError::Decode("the output stream ended without an exit".into())).await?;
                    break;
                }
                Err(e) => {
                    trouble(c, sandbox, &e).await?;
                    break;
                }
            }
        }
    }
}

/// Stores the gathered output at `offset`, secrets masked, and moves past
/// it; false if the store holds other bytes there (another executor stored
/// them). Unless `last`, a tail that may begin a secret stays in `held`.
async fn store_batch(
    c: &Arc<Coordinator>,
    id: u64,
    offset: &mut u64,
    batch: &mut Vec<u8>,
    held: &mut Vec<u8>,
    masker: &crate::secrets::Masker,
    last: bool,
) -> Result<bool, Stop> {
    if batch.is_empty() && (held.is_empty() || !last) {
        return Ok(true);
    }
    // Nothing held (always so without secrets): the batch itself, uncopied.
    let mut data = std::mem::take(batch);
    if !held.is_empty() {
        data = [std::mem::take(held), data].concat();
    }
    masker.mask(&mut data);
    let keep = if last { 0 } else { masker.hold_back(&data) };
    *held = data.split_off(data.len() - keep);
    if data.is_empty() {
        return Ok(true);
    }
    let len = data.len() as u64;
    if !c.store.append_log(id, &c.config.owner, *offset, data, c.config.max_log_bytes).await? {
        return Ok(false);
    }
    *offset += len;
    c.log_appended(id);
    Ok(true)
}

/// A stream broke: if the sandbox still runs, pause and re-attach;
/// otherwise it is lost.
async fn trouble(c: &Arc<Coordinator>, sandbox: &str, e: &ClientError) -> Result<(), Stop> {
    match sandbox_alive(c, sandbox).await {
        Ok(()) => {
            tracing::warn!(sandbox, error = %crate::error_chain(e), "build output stream broke; re-attaching");
            tokio::time::sleep(REATTACH_PAUSE).await;
            Ok(())
        }
        Err(g) => Err(g.stop(format!("its sandbox {sandbox} is gone ({})", crate::error_chain(e)))),
    }
}

/// What became of a build's sandbox.
enum Gone {
    /// The node says it is gone or stopped.
    Sandbox,
    /// Its node has not answered for `node_lost_after`: why.
    Node(String),
}

impl Gone {
    /// The stop this means; `sandbox_why` says what happened to the sandbox.
    fn stop(self, sandbox_why: String) -> Stop {
        match self {
            Gone::Sandbox => Stop::Lost(sandbox_why),
            Gone::Node(why) => Stop::NodeLost(why),
        }
    }
}

/// `Ok` if the sandbox exists and runs. A node that does not answer is
/// waited for (its sandboxes may be fine) until it counts as lost.
async fn sandbox_alive(c: &Arc<Coordinator>, sandbox: &str) -> Result<(), Gone> {
    let mut pause = Duration::from_millis(200);
    loop {
        // The node's silence, as the fleet's describes see it, ends the
        // wait even while this call hangs.
        let client = node(c);
        let got = tokio::select! {
            got = tokio::time::timeout(CALL_TIMEOUT, client.get(sandbox)) => match got {
                Ok(got) => got,
                Err(_) => Err(ClientError::Dead(sandbox.to_string(), CALL_TIMEOUT)),
            },
            why = node_lost(c) => return Err(Gone::Node(why)),
        };
        match got {
            Ok(s) if s.state == SandboxState::Running => return Ok(()),
            Ok(s) if s.state == SandboxState::Creating => {}
            Ok(_) => return Err(Gone::Sandbox),
            Err(ClientError::Api(e)) if e.code == ErrorCode::NotFound => return Err(Gone::Sandbox),
            Err(e) => {
                if let Ok(name) = ON.try_with(|p| p.name.clone())
                    && let Some(down) = c.node_failed(&name).await
                    && down >= c.config.node_lost_after
                {
                    let why =
                        format!("node {name} lost: no answer for {}s ({})", down.as_secs(), crate::error_chain(&e));
                    return Err(Gone::Node(why));
                }
                tracing::warn!(sandbox, error = %crate::error_chain(&e), "the node does not answer; waiting for it");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

async fn delete_sandbox(c: &Arc<Coordinator>, id: u64, sandbox: &str) {
    // Bounded: a hung node must not hold the executor (and its slot).
    match tokio::time::timeout(CALL_TIMEOUT, node(c).delete(sandbox)).await {
        Ok(Ok(())) => {
            let _ = c.timeline(id, "sandbox_deleted", Some(sandbox.to_string())).await;
        }
        Ok(Err(e)) => {
            // Its delete_at, or the janitor, reaps it.
            tracing::warn!(build = id, sandbox, error = %crate::error_chain(&e), "deleting the build's sandbox failed");
        }
        Err(_) => {
            tracing::warn!(build = id, sandbox, "deleting the build's sandbox got no answer; the janitor reaps it")
        }
    }
}

/// Fails the build at `step` with the last lines of its log.
async fn fail(c: &Arc<Coordinator>, id: u64, sandbox: Option<&str>, step: &str, message: String) -> Stop {
    let last_lines = c.store.tail(id, FAILURE_LINES).await.unwrap_or_default();
    let failure = BuildFailure { step: step.to_string(), message, last_lines };
    finish_then_delete(c, id, sandbox, RunState::Failed, Some(failure)).await
}

/// Records the build's end, then deletes its sandbox: the end is what must
/// survive a crash; a sandbox left behind is the janitor's.
async fn finish_then_delete(
    c: &Arc<Coordinator>,
    id: u64,
    sandbox: Option<&str>,
    state: RunState,
    failure: Option<BuildFailure>,
) -> Stop {
    let stop = finish(c, id, state, failure).await;
    if let (Stop::Done, Some(sb)) = (&stop, sandbox) {
        delete_sandbox(c, id, sb).await;
        // The feed shows the delete too.
        c.build_changed(id).await;
    }
    stop
}

async fn finish(c: &Arc<Coordinator>, id: u64, state: RunState, failure: Option<BuildFailure>) -> Stop {
    match c.store.finish_build_as(id, Some(&c.config.owner), state, failure).await {
        Ok(run_state) => {
            let took = match c.store.build(id).await {
                Ok(Some(b)) => {
                    b.started_at.zip(b.finished_at).map(|(s, f)| Duration::from_millis(f.0.saturating_sub(s.0)))
                }
                _ => None,
            };
            crate::metrics::finished(&c.metrics, state.as_str(), took);
            c.build_changed(id).await;
            if run_state.is_some() {
                c.run_finished(id).await;
            }
            Stop::Done
        }
        Err(e) => e.into(),
    }
}

/// The sandbox is gone, or its node: a new attempt replaces the build,
/// marked with `reason` (`retried: sandbox lost`, `retried: node lost`).
/// A sandbox lost a second time, or nodes lost past
/// [`NODE_LOST_ATTEMPTS`], fail the build instead.
async fn lost(c: &Arc<Coordinator>, id: u64, why: String, reason: &str) -> Result<(), StoreError> {
    let work = c.store.work(id).await?;
    let Some(work) = work else { return Ok(()) };
    let step = if reason == NODE_LOST { "node" } else { "sandbox" };
    let failure = BuildFailure { step: step.into(), message: format!("{reason}: {why}"), last_lines: Vec::new() };
    let enough = match reason {
        NODE_LOST => work.attempt >= NODE_LOST_ATTEMPTS,
        _ => work.retry_reason.as_deref() == Some(SANDBOX_LOST),
    };
    if enough {
        let _ = finish(c, id, RunState::Failed, Some(failure)).await;
        return Ok(());
    }
    let new = c.store.replace(id, failure, reason).await?;
    c.metrics.add("flotilla_coordinator_builds_retried_total", &[("reason", reason)], 1.0);
    let _ = c.store.timeline(new, &format!("retried: {reason}"), Some(why.clone())).await;
    tracing::warn!(build = id, retry = new, reason = %why, "build retried: {reason}");
    c.build_changed(id).await;
    c.build_changed(new).await;
    c.wake_dispatcher();
    Ok(())
}

/// How often the janitor looks.
pub const JANITOR_EVERY: Duration = Duration::from_secs(60);

/// Reaps this coordinator's build sandboxes whose build is unknown or
/// finished (a crash between a build's end and its sandbox's delete, a
/// store restored from a backup). A running build's sandbox is never
/// touched. Returns what it deleted.
pub async fn janitor_pass(c: &Arc<Coordinator>) -> Vec<String> {
    let mut reaped = Vec::new();
    for (name, client, info) in c.describe_fleet().await {
        if info.is_ok() {
            reaped.extend(ON.scope(Placed { name, client }, janitor_node(c)).await);
        }
    }
    reaped
}

/// The janitor's pass over one node.
async fn janitor_node(c: &Arc<Coordinator>) -> Vec<String> {
    let mut reaped = Vec::new();
    let list = match tokio::time::timeout(CALL_TIMEOUT, node(c).list()).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            tracing::warn!(error = %crate::error_chain(&e), "janitor: listing the node's sandboxes failed");
            return reaped;
        }
        Err(_) => {
            tracing::warn!("janitor: the node did not list its sandboxes within {}s", CALL_TIMEOUT.as_secs());
            return reaped;
        }
    };
    for s in list {
        let Some(build) = s.labels.get(BUILD_LABEL).and_then(|b| b.parse::<u64>().ok()) else { continue };
        if s.labels.get(COORDINATOR_LABEL).is_some_and(|o| *o != c.config.owner) {
            continue;
        }
        let why = match c.store.build(build).await {
            Ok(None) => format!("build {build} is unknown to this coordinator"),
            Ok(Some(b)) if b.state.is_final() => format!("build {build} is {}", b.state.as_str()),
            Ok(Some(_)) => continue,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "janitor: reading build {build} failed");
                continue;
            }
        };
        let deleted = tokio::time::timeout(CALL_TIMEOUT, node(c).delete(&s.id)).await;
        match deleted.unwrap_or_else(|_| Err(ClientError::Dead("the node".into(), CALL_TIMEOUT))) {
            Ok(()) => {
                tracing::info!(sandbox = %s.id, reason = %why, "janitor reaped a build sandbox");
                c.events.publish(flotilla_api::EventBody::Reaped {
                    what: "sandbox".into(),
                    target: s.id.clone(),
                    reason: why,
                });
                reaped.push(s.id);
            }
            Err(e) => tracing::warn!(sandbox = %s.id, error = %crate::error_chain(&e), "janitor: deleting failed"),
        }
    }
    reaped
}
