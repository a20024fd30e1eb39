//! Request and response bodies of the node and agent APIs.
//!
//! Requests deny unknown fields so that a typo in a client is an error, not a
//! silently ignored option. Responses accept unknown fields so that older
//! clients keep working against newer servers.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::frame::ExitStatus;
use crate::time::Timestamp;

// ---------------------------------------------------------------- sandboxes

/// The lifecycle of a sandbox. Transitions are in `flotilla-node`'s
/// `state` module; this is only the name on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Booting: the process is being made and the agent is not up yet.
    Creating,
    /// The agent answers; exec, put and get work.
    Running,
    /// No process; the workspace is kept and `start` boots it again.
    Stopped,
    /// Boot failed or the sandbox died on its own; `error` says why.
    Failed,
    /// Deleted; kept in listings only until the record is purged.
    Deleted,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
            SandboxState::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<SandboxState> {
        Some(match s {
            "creating" => SandboxState::Creating,
            "running" => SandboxState::Running,
            "stopped" => SandboxState::Stopped,
            "failed" => SandboxState::Failed,
            "deleted" => SandboxState::Deleted,
            _ => return None,
        })
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a sandbox is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Linux namespaces, cgroups, seccomp.
    #[default]
    Process,
    /// A microVM (QEMU): its own kernel, hardware isolation.
    Vm,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Process => "process",
            BackendKind::Vm => "vm",
        }
    }
}

/// What network a sandbox gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// Its own loopback and nothing else.
    #[default]
    None,
    /// Outbound NAT (pasta or slirp4netns for processes, passt for
    /// microVMs); the host's loopback stays out of reach.
    Outbound,
    /// MicroVMs only: a TAP device on the node's bridge with an address of
    /// its own, reachable from the host and from other `tap` sandboxes.
    Tap,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Outbound => "outbound",
            NetworkMode::Tap => "tap",
        }
    }
}

/// Resource limits. `None` means the node default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU quota in cores (0.5 = half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0.0, maximum = 1024.0)]
    pub cpus: Option<f64>,
    /// Memory limit in bytes (4 MiB to 1 PiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 4194304, maximum = 1125899906842624_u64)]
    pub memory_bytes: Option<u64>,
    /// Maximum number of processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 8, maximum = 4194304)]
    pub pids: Option<u64>,
    /// Size of a microVM's workspace disk in bytes (sparse; `vm` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1125899906842624_u64)]
    pub disk_bytes: Option<u64>,
}

impl Resources {
    /// Checks every limit against what the kernel accepts, before anything
    /// is created or changed; the error names the field.
    pub fn validate(&self) -> Result<(), ApiError> {
        use crate::limits::*;
        if let Some(c) = self.cpus
            && !(c > 0.0 && c <= MAX_CPUS)
        {
            return Err(field_error("resources.cpus", format!("must be above 0 and at most {MAX_CPUS}, not {c}")));
        }
        let range = |field: &str, v: Option<u64>, min: u64, max: u64, why: &str| match v {
            Some(v) if v < min || v > max => Err(field_error(field, format!("must be {min} to {max}{why}, not {v}"))),
            _ => Ok(()),
        };
        range("resources.memory_bytes", self.memory_bytes, MIN_MEMORY_BYTES, MAX_MEMORY_BYTES, "")?;
        range("resources.pids", self.pids, MIN_PIDS, MAX_PIDS, " (the agent needs a few)")?;
        range("resources.disk_bytes", self.disk_bytes, 1, MAX_DISK_BYTES, "")?;
        Ok(())
    }
}

/// An `invalid_argument` error about one request field, named in `details`.
pub fn field_error(field: &str, problem: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(format!("{field} {problem}")).with_details(serde_json::json!({ "field": field }))
}

/// Checks a TTL in seconds (`0` is allowed where it means "none").
pub fn validate_ttl(field: &str, secs: Option<u64>) -> Result<(), ApiError> {
    match secs {
        Some(s) if s > crate::limits::MAX_TTL_S => {
            Err(field_error(field, format!("must be at most {} seconds (10 years), not {s}", crate::limits::MAX_TTL_S)))
        }
        _ => Ok(()),
    }
}

/// Checks environment variables, the same for a sandbox's env and an
/// exec's: names non-empty without `=` or NUL, values without NUL.
pub fn validate_env(field: &str, env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(field_error(field, format!("has a bad variable name {k:?} (empty, or with `=` or NUL)")));
        }
        if v.contains('\0') {
            return Err(field_error(field, format!("variable {k:?} has a NUL byte in its value")));
        }
    }
    Ok(())
}

impl CreateSandboxRequest {
    /// Every bound a create must meet before it is accepted.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.resources.validate()?;
        validate_ttl("ttl_s", self.ttl_s)?;
        validate_ttl("idle_ttl_s", self.idle_ttl_s)?;
        if self.idle_ttl_s == Some(0) {
            return Err(field_error("idle_ttl_s", "must be at least 1 second"));
        }
        validate_env("env", &self.env)
    }
}

impl UpdateSandboxRequest {
    /// Every bound a change must meet before anything is changed.
    pub fn validate(&self) -> Result<(), ApiError> {
        if let Some(r) = &self.resources {
            r.validate()?;
        }
        validate_ttl("ttl_s", self.ttl_s)?;
        validate_ttl("idle_ttl_s", self.idle_ttl_s)
    }
}

impl ExecRequest {
    /// Checks argv and env before anything is started.
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(field_error("argv", "must name a program"));
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err(field_error("argv", "has a NUL byte"));
        }
        if let Some(id) = &self.id {
            let ok = !id.is_empty()
                && id.len() <= 64
                && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.');
            if !ok || !self.detach {
                return Err(field_error("id", "must be 1 to 64 letters, digits, `-`, `_` or `.`, with detach"));
            }
        }
        validate_env("env", &self.env)
    }
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    /// `host` (default) or `dir:/abs/path` for a root filesystem directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub backend: BackendKind,
    /// Unique among live sandboxes; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub resources: Resources,
    /// Seconds until the sandbox is deleted; no deadline when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 315576000)]
    pub ttl_s: Option<u64>,
    /// Seconds of inactivity after which the sandbox is deleted: every exec,
    /// put, get and session pushes `delete_at` this far into the future.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 315576000)]
    pub idle_ttl_s: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Environment every exec in the sandbox starts with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub network: NetworkMode,
}

/// `PATCH /v1/sandboxes/{id}`: fields present are changed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSandboxRequest {
    /// Labels to set; an empty value removes the label.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// New deadline, counted from now; `0` removes the deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 315576000)]
    pub ttl_s: Option<u64>,
    /// New idle TTL in seconds (renews the deadline now); `0` removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 315576000)]
    pub idle_ttl_s: Option<u64>,
    /// Limits to change; applied live to a running sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

/// A named, timestamped step in a sandbox's life (`create_requested`,
/// `created`, `agent_up`, `stopped`, ...), as the build timeline records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Step {
    pub name: String,
    pub at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A sandbox as the node reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub image: String,
    pub backend: BackendKind,
    pub state: SandboxState,
    pub resources: Resources,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub network: NetworkMode,
    pub created_at: Timestamp,
    /// When the node will delete this sandbox, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_at: Option<Timestamp>,
    /// Inactivity allowed before deletion; activity renews `delete_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ttl_s: Option<u64>,
    /// Why the sandbox failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The steps of the most recent boot, oldest first.
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// One page of a list. Pass `next_page_token` back as `page_token`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// Query of every list endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

// ---------------------------------------------------------------- workspace

/// Query of `PUT/GET /workspace`, `GET /ls`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceQuery {
    /// Directory relative to the workspace root (default: the root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Cap on bytes a tar may expand to (agent only; the node sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Cap on entries in a tar (agent only; the node sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_entries: Option<u64>,
}

/// What a workspace import wrote.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportSummary {
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    pub duration_ms: u64,
    /// Image layers only: device nodes and fifos in the archive, skipped
    /// (a sandbox gets its own `/dev`; nothing special is created on the host).
    #[serde(default)]
    pub skipped_special: u64,
    /// Extended attributes (`security.capability` and the like) recorded in
    /// the archive and dropped: none is ever applied to the host.
    #[serde(default)]
    pub dropped_xattrs: u64,
}

/// The kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LsEntry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
}

/// `POST /removeall`: paths relative to the workspace root.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveAllRequest {
    pub paths: Vec<String>,
}

// ---------------------------------------------------------------- exec

/// `POST /exec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    #[schema(min_items = 1)]
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory inside the sandbox (default `/workspace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Kill the process group after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Bytes written to the process's stdin before it is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Keep the process running when the connection ends; the response is a
    /// [`ProcessInfo`] instead of a frame stream.
    #[serde(default)]
    pub detach: bool,
    /// With `detach`: the id to give the process (1 to 64 letters, digits,
    /// `-`, `_`, `.`), so a client that lost the answer finds it again.
    /// Refused with `conflict` while a process with that id is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// With `detach`: keep every output byte until a reader acknowledges
    /// it (`ack` on the output route) instead of dropping the oldest once
    /// [`crate::limits::PROCESS_RING_BYTES`] are kept. Past that many
    /// unacknowledged bytes the process's writes block (its pipe fills)
    /// until the reader catches up: back-pressure, never a silent drop.
    /// For a reader that stores everything, such as the coordinator.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
}

/// The state of a process the agent tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    Running,
    Exited,
}

/// A detached process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProcessInfo {
    pub id: String,
    pub argv: Vec<String>,
    pub pid: i32,
    pub state: ProcessState,
    pub started_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitStatus>,
    /// Offset of the oldest output byte still kept.
    pub output_start: u64,
    /// Offset just past the newest output byte.
    pub output_end: u64,
}

/// Query of `GET /processes/{id}/output`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    /// Output byte offset (stdout and stderr bytes as delivered) to resume from.
    #[serde(default)]
    pub from: u64,
    /// Keep the stream open until the process exits (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<bool>,
    /// The reader has stored every byte before `from`: a process started
    /// with `hold` may forget them and go on writing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ack: bool,
    /// End the stream once at least this many output bytes were sent, so a
    /// reader of a held process comes back (with `ack`) to let it go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

/// `POST /processes/{id}/signal`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// A name (`TERM`, `SIGKILL`) or a number.
    pub signal: String,
}

/// Query of `POST /processes/{id}/stdin`: the body is the bytes to write.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StdinQuery {
    /// Close stdin after writing.
    #[serde(default)]
    pub close: bool,
}

/// Query of `GET /tcp` (`Upgrade: tcp`): after `101`, the connection is a
/// byte stream to this port on the sandbox's loopback.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpQuery {
    pub port: u16,
}

/// Query of `GET /session` (WebSocket upgrade).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionQuery {
    /// Command to run on the terminal; the default is a login shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
}

/// `GET /healthz` of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentHealth {
    pub version: String,
    pub pid: i32,
    pub workspace: String,
    pub processes: usize,
}

// ---------------------------------------------------------------- operations

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
}

impl OperationState {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationState::Running => "running",
            OperationState::Succeeded => "succeeded",
            OperationState::Failed => "failed",
        }
    }

    pub fn is_done(self) -> bool {
        self != OperationState::Running
    }
}

impl fmt::Display for OperationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    CreateSandbox,
    StartSandbox,
    RestartSandbox,
    ImportImage,
    WorkspaceGit,
    PullImage,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::CreateSandbox => "create_sandbox",
            OperationKind::StartSandbox => "start_sandbox",
            OperationKind::RestartSandbox => "restart_sandbox",
            OperationKind::ImportImage => "import_image",
            OperationKind::WorkspaceGit => "workspace_git",
            OperationKind::PullImage => "pull_image",
        }
    }
}

/// A long-running request: returned at once by the call that starts it,
/// then waited on with `GET /v1/operations/{id}?wait=DUR`. Persisted, so it
/// can be waited on across a node restart (an operation the restart
/// interrupted ends `failed`, saying so).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Operation {
    pub id: String,
    pub kind: OperationKind,
    pub state: OperationState,
    /// What it works on: a sandbox id or an image reference.
    pub target: String,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// The steps so far, oldest first.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Why it failed; `details.step` names the step that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::ApiError>,
    /// What it produced (a sandbox, an image, an import summary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

/// Query of `GET /v1/operations/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationQuery {
    /// Wait up to this long (`30s`, `5m`; at most 10 minutes) for the
    /// operation to finish before answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
}

// ---------------------------------------------------------------- events

/// One entry of `GET /v1/events` (server-sent events). `id` grows
/// monotonically, also across node restarts, so a client resumes with
/// `Last-Event-ID`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeEvent {
    pub id: u64,
    pub at: Timestamp,
    #[serde(flatten)]
    pub body: EventBody,
}

/// What an event is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// A sandbox changed (state, step, deadline, limits).
    Sandbox { sandbox: Box<Sandbox> },
    /// A sandbox is gone for good.
    SandboxDeleted { sandbox_id: String, name: String },
    /// An operation started, took a step or finished.
    Operation { operation: Box<Operation> },
    /// An image was imported, promoted or deleted.
    Image { action: String, image: String },
    /// The janitor removed something, and why.
    Reaped { what: String, target: String, reason: String },
    /// Events before `Last-Event-ID` are no longer kept: re-list, then follow.
    Reset { reason: String },
    /// An app instance changed state (or its run did: started, exited, waiting).
    AppInstance { instance: Box<crate::app::AppInstance> },
    /// An installation was installed, updated, reverted or uninstalled.
    AppInstallation { action: String, installation: String, version: String },
    /// A self-update or revert of the node ended: committed, or reverted
    /// and why.
    NodeUpdate { outcome: Box<crate::update::UpdateOutcome> },
    /// A run (coordinator) was created or changed state.
    Run { run: Box<crate::coordinator::Run> },
    /// A build (coordinator) changed state or took a step: the build as
    /// it is now, with only its newest timeline entry (what happened);
    /// `GET /v1/builds/{id}` has the whole timeline.
    Build { build: Box<crate::coordinator::Build> },
    /// A project was added, changed or removed (coordinator).
    Project { project: Box<crate::coordinator::Project> },
}

impl EventBody {
    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            EventBody::Sandbox { .. } => "sandbox",
            EventBody::SandboxDeleted { .. } => "sandbox_deleted",
            EventBody::Operation { .. } => "operation",
            EventBody::Image { .. } => "image",
            EventBody::Reaped { .. } => "reaped",
            EventBody::Reset { .. } => "reset",
            EventBody::AppInstance { .. } => "app_instance",
            EventBody::AppInstallation { .. } => "app_installation",
            EventBody::NodeUpdate { .. } => "node_update",
            EventBody::Run { .. } => "run",
            EventBody::Build { .. } => "build",
            EventBody::Project { .. } => "project",
        }
    }
}

// ---------------------------------------------------------------- images

/// An image version as the node stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Image {
    /// `name:tag`.
    pub reference: String,
    /// `sha256:...` of the image content (the OCI manifest digest where the
    /// source has one, else of the imported archive).
    pub digest: String,
    /// What it was imported from: `dir`, `rootfs_tar`, `oci_layout`,
    /// `docker_archive`, `oci_registry`.
    pub source_format: String,
    /// A path on the node, or the registry reference it was pulled from.
    pub source: String,
    pub size_bytes: u64,
    pub layers: Vec<String>,
    /// Device nodes and fifos the layers held, skipped at import (a
    /// sandbox gets its own `/dev`).
    #[serde(default)]
    pub skipped_special: u64,
    /// Extended attributes the layers recorded, dropped at import (none is
    /// ever applied to the host).
    #[serde(default)]
    pub dropped_xattrs: u64,
    pub created_at: Timestamp,
    /// Sandboxes that use this version now.
    #[serde(default)]
    pub used_by: Vec<String>,
    /// Other tags that point at the same version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

/// `POST /v1/images`: import from a path on the node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportImageRequest {
    /// `name:tag` to give the image.
    pub reference: String,
    /// A directory, a rootfs tarball (.tar, .tar.gz, .tar.zst), an OCI image
    /// layout (directory or tar) or a `docker save` archive, on the node.
    pub path: String,
}

/// `POST /v1/images/pull`: pull from an OCI registry (Docker Registry v2 /
/// OCI distribution API).
///
/// The credentials are used for this pull only: they are never written to
/// the operation, the node's store, its logs or its events, and `Debug`
/// prints them redacted.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImageRequest {
    /// `host[:port]/repository[:tag]` or `host[:port]/repository@sha256:<hex>`
    /// (no host means Docker Hub; no tag means `latest`).
    pub source: String,
    /// `name:tag` to store it as; default: the repository's last path part and
    /// the tag (`127.0.0.1:5000/team/app:1` → `app:1`; a digest pull takes the
    /// first 12 hex digits as its tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Speak plain HTTP instead of HTTPS to this registry (a registry on
    /// loopback without TLS).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain_http: bool,
    /// Basic credentials: sent to the registry as they are, or exchanged
    /// for a bearer token where the registry asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(write_only)]
    pub password: Option<String>,
}

impl fmt::Debug for PullImageRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullImageRequest")
            .field("source", &self.source)
            .field("reference", &self.reference)
            .field("plain_http", &self.plain_http)
            .field("username", &self.username.as_ref().map(|_| "<redacted>"))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `POST /v1/images/{ref}/promote`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteImageRequest {
    /// The tag to point at this image's version (`name:tag`).
    pub to: String,
}

// ---------------------------------------------------------------- git

/// `POST /v1/sandboxes/{id}/workspace/git`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GitImportRequest {
    /// A local path or a URL `git` can fetch.
    pub repo: String,
    /// Branch, tag or commit; `HEAD` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Directory in the workspace (default: the root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

/// What a git import wrote.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GitImportSummary {
    /// The commit exported.
    pub commit: String,
    pub import: ImportSummary,
}

// ---------------------------------------------------------------- node

/// Whether a backend works on this node, and why not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackendInfo {
    pub kind: BackendKind,
    pub available: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `vm`: `kvm` or `tcg` (software: slow boots), once probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// Why that accelerator was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator_reason: Option<String>,
    /// Network modes this backend can give a sandbox on this host.
    #[serde(default)]
    pub network_modes: Vec<NetworkMode>,
}

/// `GET /v1/node`: what a scheduler needs to know to place work here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeInfo {
    pub node_id: String,
    pub version: String,
    pub os: String,
    pub arch: String,
    pub kernel: String,
    pub cpus: usize,
    pub memory_bytes: u64,
    pub backends: Vec<BackendInfo>,
    pub images: Vec<String>,
    pub network_modes: Vec<NetworkMode>,
    /// `v1`, `v2` or `none`: which cgroup hierarchy enforces limits.
    pub cgroup: String,
    pub sandboxes: BTreeMap<String, usize>,
    /// What the limits of running sandboxes add up to (a sandbox without a
    /// CPU or memory limit adds nothing to that one), so a scheduler sees
    /// the node's load in the one call that says what it can run.
    #[serde(default)]
    pub allocated_millicpus: u64,
    #[serde(default)]
    pub allocated_memory_bytes: u64,
    /// Images whose warm microVM pool has a member booted and waiting.
    #[serde(default)]
    pub warm_pools: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_refuse_unknown_fields() {
        let err = serde_json::from_str::<CreateSandboxRequest>(r#"{"imgae":"host"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let ok: CreateSandboxRequest = serde_json::from_str(r#"{"image":"host","network":"outbound"}"#).unwrap();
        assert_eq!(ok.network, NetworkMode::Outbound);
    }

    #[test]
    fn every_event_round_trips() {
        // `body` is flattened into the event: no variant may reuse `id` or `at`.
        let bodies = [
            EventBody::SandboxDeleted { sandbox_id: "a".into(), name: "n".into() },
            EventBody::Image { action: "imported".into(), image: "x:1".into() },
            EventBody::Reaped { what: "orphan".into(), target: "a".into(), reason: "r".into() },
            EventBody::Reset { reason: "r".into() },
        ];
        for body in bodies {
            let ev = NodeEvent { id: 7, at: Timestamp(1), body };
            let json = serde_json::to_string(&ev).unwrap();
            assert_eq!(serde_json::from_str::<NodeEvent>(&json).unwrap(), ev, "{json}");
        }
    }

    #[test]
    fn states_round_trip() {
        for s in [
            SandboxState::Creating,
            SandboxState::Running,
            SandboxState::Stopped,
            SandboxState::Failed,
            SandboxState::Deleted,
        ] {
            assert_eq!(SandboxState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}

// ---------------------------------------------------------------- microVM pools

/// `PUT /v1/node/pools`: keep `size` microVMs of this shape booted, so that
/// a matching `create` (same image, memory, cpus, disk; no network, no env)
/// claims one in milliseconds. `size` 0 removes the pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmPoolRequest {
    /// `name:tag` (pinned to its current version) or `dir:/path`.
    pub image: String,
    pub size: u32,
    #[serde(default)]
    pub resources: Resources,
}

/// A pool as the node reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmPool {
    /// The pinned image reference.
    pub image: String,
    pub size: u32,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub disk_bytes: u64,
    /// Booted and waiting.
    pub ready: u32,
    /// Booting now.
    pub booting: u32,
    /// How the last member came up: `snapshot` (restored from the pool's
    /// saved guest) or `cold` (a full boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_from: Option<String>,
    /// How long the last member took, from start to agent ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ms: Option<u64>,
}
