//! The coordinator's wire types: projects, changes, runs, builds and their
//! timelines (DESIGN §1, §5a). Shared by the coordinator's HTTP API and the
//! CLI. No I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Timestamp;

/// The state of a run or a build (DESIGN §5a). A build that could not run
/// at all is `failed`, naming the step that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Queued,
    Running,
    Passed,
    Failed,
    Canceled,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Passed => "passed",
            RunState::Failed => "failed",
            RunState::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<RunState> {
        Some(match s {
            "queued" => RunState::Queued,
            "running" => RunState::Running,
            "passed" => RunState::Passed,
            "failed" => RunState::Failed,
            "canceled" => RunState::Canceled,
            _ => return None,
        })
    }

    /// Whether nothing more happens to it (until a retry).
    pub fn is_final(self) -> bool {
        match self {
            RunState::Queued | RunState::Running => false,
            RunState::Passed | RunState::Failed | RunState::Canceled => true,
        }
    }
}

/// What kind of revision a change is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A commit on a watched branch.
    Branch,
    /// A revision or patch submitted with `flotilla try`.
    Try,
}

/// A revision to verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Change {
    /// Stable within the project: `BRANCH@SHA` for a branch commit,
    /// `try-N` for a try.
    pub id: String,
    pub kind: ChangeKind,
    /// The full commit id that is built.
    pub rev: String,
    /// The watched branch a commit came from, or the base of a try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The commit's subject line.
    #[serde(default)]
    pub subject: String,
    /// Grows when a change is replaced by a newer revision; the project
    /// manager keeps only the highest it has seen.
    #[serde(default)]
    pub version: u64,
}

/// Whether a project is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProjectStatus {
    Enabled,
    /// `project rm` was asked: no new runs are created.
    Removed,
}

/// A repository plus its `flotilla.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Project {
    pub name: String,
    /// A local path or a URL `git` can fetch.
    pub repo: String,
    /// The branches watched; the config's `[triggers] branches` when it has
    /// them, else the one given at `project add`.
    pub branches: Vec<String>,
    pub status: ProjectStatus,
    /// Seconds between polls of the repository.
    pub poll_interval_s: u64,
    /// Hash of the `flotilla.toml` the project manager last took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Why the last `flotilla.toml` read could not be used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    /// Builder names of the current config.
    #[serde(default)]
    pub builders: Vec<String>,
    /// Which commits of a push get a run: `all` (oldest first) or `head`
    /// (`[triggers] commits`), as the current config says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commits: Option<String>,
    /// The newest commit seen on each watched branch.
    #[serde(default)]
    pub heads: BTreeMap<String, String>,
    /// When the repository was last fetched, and what went wrong if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polled_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_error: Option<String>,
    /// Whether a webhook secret is set (the secret is never shown).
    #[serde(default)]
    pub webhook: bool,
    /// The project manager's state version: how many steps it has taken.
    pub eversion: u64,
    pub created_at: Timestamp,
}

/// `POST /v1/projects`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddProjectRequest {
    pub name: String,
    pub repo: String,
    /// The branch watched until the config names its own (default: the
    /// repository's default branch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// How often to poll, e.g. `30s` (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<String>,
    /// The shared secret GitHub or Gitea signs push webhooks with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
}

/// `PUT /v1/projects/{name}/secrets/{secret}`.
#[derive(Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecretRequest {
    /// The value: UTF-8 text of 4 bytes to 64 KiB. It is sealed at rest and
    /// never read back through the API.
    pub value: String,
}

impl std::fmt::Debug for SetSecretRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SetSecretRequest { value: <redacted> }")
    }
}

/// A project's secret as the API shows it: its name, never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretInfo {
    pub name: String,
    pub updated_at: Timestamp,
}

/// `POST /v1/projects/{name}/try`: a revision, or a patch on a base.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TryRequest {
    /// A revision of the repository (a commit, branch or tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// A patch (`git diff` / `git format-patch` output) applied on `base`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// What the patch applies to (default: the first watched branch's head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

/// A named, timestamped point in a build's life (DESIGN §5, seed 000).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TimelineEntry {
    pub at: Timestamp,
    /// `sandbox_create_requested`, `sandbox_created`, `agent_up`,
    /// `start_write_tar`, `end_write_tar`, `start_step`, `end_step`,
    /// `sandbox_deleted`, `retried`, `canceled`, `reattached`, …
    pub event: String,
    /// The step's name, an exit status, a reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Why a build failed: the step, and what it said last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BuildFailure {
    /// The step that failed: a builder step's name, or one of the build's
    /// own (`create_sandbox`, `write_source`, `timeout`, …).
    pub step: String,
    pub message: String,
    /// The last lines of the step's output.
    #[serde(default)]
    pub last_lines: Vec<String>,
}

/// One builder's work on one change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Build {
    pub id: u64,
    pub run_id: u64,
    pub project: String,
    pub builder: String,
    /// 1 for the first attempt; a retry is a new build with the next number.
    pub attempt: u32,
    /// The build this one retries, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_reason: Option<String>,
    pub state: RunState,
    pub rev: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// The step running now (or last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<BuildFailure>,
    /// Bytes of log stored.
    pub log_bytes: u64,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// The node the scheduler placed it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default)]
    pub timeline: Vec<TimelineEntry>,
}

/// The verification of one change: one build per matching builder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Run {
    pub id: u64,
    pub project: String,
    pub change: Change,
    pub state: RunState,
    pub config_hash: String,
    /// Why the run could not start a build (its `flotilla.toml` is invalid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// The latest attempt of each builder (earlier attempts are in `show`).
    #[serde(default)]
    pub builds: Vec<Build>,
}

/// A row of a project's log: one step of its project manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProjectLogEntry {
    pub eversion: u64,
    pub at: Timestamp,
    /// The events the step consumed, and what it decided.
    pub reasons: Vec<String>,
}

/// The scheduler's view: the nodes it places on and the builds waiting,
/// each with the reason it waits (`GET /v1/queue`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Queue {
    /// When the scheduler last made a pass.
    pub at: Timestamp,
    pub nodes: Vec<QueueNode>,
    /// Waiting builds in the order they will be served.
    pub waiting: Vec<QueuedBuild>,
    /// Per builder (Go's host type): how many wait, the oldest and newest
    /// waiting, and when one of its builds last started.
    #[serde(default)]
    pub builders: Vec<QueueBuilder>,
}

/// One builder's queue, as Go's farmer page shows a host type's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QueueBuilder {
    pub builder: String,
    pub waiting: u64,
    pub oldest: Timestamp,
    pub newest: Timestamp,
    /// When this coordinator last started one of its builds (since it started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_moved: Option<Timestamp>,
}

/// A node as the scheduler last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QueueNode {
    pub name: String,
    /// False when the node did not answer its describe call.
    pub up: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `os-arch` in Go's names, as builders are named.
    pub platform: String,
    pub millicpus: u64,
    pub memory_bytes: u64,
    /// What is held on it after the pass: the larger of what its running
    /// sandboxes' limits add up to and what this coordinator's running
    /// builds take, plus what the pass placed.
    pub used_millicpus: u64,
    pub used_memory_bytes: u64,
    pub running: u64,
}

/// A build the scheduler has not placed yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QueuedBuild {
    pub build: u64,
    pub run: u64,
    pub project: String,
    pub builder: String,
    /// `interactive`, `try` or `post_submit`: the order levels are served in.
    pub priority: String,
    pub queued_at: Timestamp,
    /// Why it waits: "no node can run ...", "all 3 runnable nodes are full".
    pub reason: String,
}

/// `POST /v1/projects/{name}/sandboxes`: a sandbox set up like one of the
/// project's builders, to debug a build by hand (Go's gomote).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuilderSandboxRequest {
    /// A builder in the project's `flotilla.toml` at `rev`.
    pub builder: String,
    /// A revision (default: the watched branch's head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Seconds without use after which it is deleted (default 1800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 604800)]
    pub idle_ttl_s: Option<u64>,
}

/// The sandbox made for a builder: where it is and what is in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BuilderSandbox {
    /// The sandbox's id on its node (what `flotilla exec` and `shell` take).
    pub sandbox_id: String,
    pub name: String,
    /// The node it runs on.
    pub node: String,
    pub project: String,
    pub builder: String,
    /// The commit whose source is in `/workspace`.
    pub rev: String,
    pub image: String,
    pub backend: String,
    /// When it is deleted unless used before then (every use moves it on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_at: Option<Timestamp>,
}
