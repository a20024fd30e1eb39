//! The node replaces its own binary without stopping a sandbox, and comes
//! back on the old one by itself when the new one fails (DESIGN §5, "Apps").
//!
//! # On disk, under the data directory `HOME`
//!
//! ```text
//! versions/<id>/flotilla     one binary per version, never changed once placed;
//!                            <id> = the first 12 hex digits of its SHA-256
//! versions/<id>/sha256       its full digest; origin: where it came from
//! versions/<id>/test.log     what it said when it was tried in test mode
//! versions/.staging-<rand>/  a binary being copied or downloaded
//! current, previous          symlinks to versions/<id>; a link is swapped by
//!                            writing `<link>.new` and renaming it over, never in place
//! update.pending             a hand-over in progress (JSON, see [`Pending`])
//! update.last                how the last one ended (JSON, [`UpdateOutcome`])
//! update.log                 what the old node, the watchdog and the new node did
//! update.watchdog.pid        the watchdog of the hand-over in progress
//! node.lock, node.pid        held (flock) by the running node, and who that is
//! ```
//!
//! A node with no `current` copies its own running binary in as the
//! first version, and links `current` to it, when its first update begins,
//! so that update has something to come back to. Under a supervisor the unit starts
//! `HOME/current/flotilla` (README: "Updating a node").
//!
//! # The protocol
//!
//! 1. **Stage**: the binary is copied (a path) or downloaded (a URL) into a
//!    staging directory while it is hashed; with a `sha256` the digests must
//!    match before anything runs it. The directory is renamed to
//!    `versions/<id>`.
//! 2. **Test mode**: the new binary runs with the node's own argv plus
//!    `--test-mode --socket HOME/update-test.sock`. In test mode it only
//!    serves `GET /v1/node` (its version) and `GET /v1/node/self-test`
//!    ([`self_test`]: root, data dir, `node.db` opened read-only, the agent,
//!    namespaces, cgroups, seccomp) on that side socket; it takes no lock,
//!    writes nothing, publishes nothing and touches no sandbox or cgroup.
//!    It must answer and pass within [`TEST_DEADLINE`], then it is stopped.
//!    Any failure leaves the old node as it was, and the error names the
//!    step and quotes the end of the child's output.
//! 3. **Switch**: `update.pending` is written (from, to, the node's pid and
//!    start time, the deadline, argv, the running sandboxes), then
//!    `previous` → from and `current` → to are swapped, then a watchdog (the
//!    *old* binary, `flotilla node watchdog`, double-forked into its own
//!    session, logging to `update.log`) is started.
//! 4. **Hand-over** ([`Stop::HandOver`]): the listeners stop accepting,
//!    requests in flight get `tls::SHUTDOWN_GRACE` to finish, no sandbox is
//!    stopped, and the process `execve`s `HOME/current/flotilla` with the
//!    same argv and environment: same pid, and the sandboxes, still its
//!    children, are re-adopted by `Node::open` as after a crash.
//! 5. **Check after the switch** ([`Updater::check_after_switch`]): the new
//!    process sees the pending record names its own pid and start time. It
//!    must answer `GET /v1/node` on its socket, have re-adopted every
//!    recorded sandbox whose process still lives, and pass its self-test,
//!    before the deadline. Then it **commits**: writes `update.last` and
//!    removes `update.pending`. If the check fails it swaps `current` back,
//!    notes why in the pending record and exits 1.
//!
//! # Who reverts
//!
//! A broken binary cannot be trusted to revert itself, so the watchdog
//! ([`run_watchdog`]) polls the pending record. Once it is gone the
//! watchdog exits. If the node's pid dies (an exit, a crash, a check that
//! failed) or the deadline passes (a hang: the process is killed with
//! SIGKILL, never SIGTERM, which would stop the sandboxes) while it is still
//! there, the watchdog swaps `current` and `previous` back, records the
//! outcome, removes the record, and starts the old version through the link
//! with the original argv (in its own session, output to `update.log`). Under
//! systemd ([`Supervisor::Systemd`]) it leaves the restart to systemd, which
//! starts `current`, already swapped back. A node that starts as the *old*
//! version while a record is left and no watchdog lives (the machine
//! rebooted mid-update) finishes the revert itself.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_agent::http::{Endpoint, HttpClient, error_chain};
use flotilla_api::update::parse_sha256;
use flotilla_api::{
    ApiError, ErrorCode, NodeUpdate, NodeUpdateRequest, NodeVersion, OperationState, PageQuery, SandboxState,
    SelfCheck, SelfTest, Step, TestModeInfo, Timestamp, UpdateKind, UpdateOutcome, UpdateResult,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::node::{Backend, Node};

/// How long a candidate in test mode has to answer `GET /v1/node` and pass
/// its self-test: a node starts in well under a second; one still silent
/// after half a minute is broken, not slow. `FLOTILLA_UPDATE_TEST_MS`
/// overrides it.
pub const TEST_DEADLINE: Duration = Duration::from_secs(30);

/// How long a new version has after the hand-over to serve, re-adopt and
/// pass its self-test before the watchdog brings the old one back. Re-adoption
/// is a pidfd per sandbox, so a minute leaves room for a loaded host.
/// `FLOTILLA_UPDATE_CHECK_MS` overrides it.
pub const CHECK_DEADLINE: Duration = Duration::from_secs(60);

/// The largest binary a node stages: a debug build is ~150 MB; a file past
/// this is not a flotilla binary, and would fill the data directory.
pub const MAX_BINARY_BYTES: u64 = 1 << 30;

/// How long a download may take in all.
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// A download that sends nothing for this long has stalled.
const DOWNLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Release servers redirect to storage once or twice; more is a loop.
const MAX_REDIRECTS: usize = 5;

/// How often the watchdog looks at the pending record and the node's pid:
/// it swaps `current` back well before a supervisor's restart delay.
const WATCHDOG_POLL: Duration = Duration::from_millis(50);

/// How long a killed process may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How long a candidate gets to exit after SIGTERM once it has passed.
const TEST_STOP_GRACE: Duration = Duration::from_secs(2);

/// How long the old node waits for the watchdog's launcher to report.
const WATCHDOG_START_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of a candidate's output an error quotes.
const OUTPUT_TAIL_BYTES: u64 = 2048;

/// The check after the switch gives up this much before the deadline, so
/// the new version reverts itself (with its reason) before the watchdog
/// has to kill it.
const CHECK_MARGIN: Duration = Duration::from_millis(500);

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

/// The binary's name inside a version directory.
pub const BINARY: &str = "flotilla";

fn env_duration(name: &str, default: Duration) -> Duration {
    std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok()).map(Duration::from_millis).unwrap_or(default)
}

/// [`TEST_DEADLINE`], or `FLOTILLA_UPDATE_TEST_MS`.
pub fn test_deadline() -> Duration {
    env_duration("FLOTILLA_UPDATE_TEST_MS", TEST_DEADLINE)
}

/// [`CHECK_DEADLINE`], or `FLOTILLA_UPDATE_CHECK_MS`.
pub fn check_deadline() -> Duration {
    env_duration("FLOTILLA_UPDATE_CHECK_MS", CHECK_DEADLINE)
}

// ------------------------------------------------------------------ errors

/// Why an update or revert did not hand over. The old node keeps running
/// untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("an update or revert is already under way")]
    Busy,
    #[error("hand-over {id} has not finished yet (see {log})")]
    Unfinished { id: String, log: PathBuf },
    #[error("operations are in flight ({0}); a hand-over would fail them: try again when they have finished")]
    OperationsInFlight(String),
    #[error("the node is shutting down")]
    Stopping,
    #[error("this server cannot replace its binary (it was not started by `flotilla node`)")]
    Unsupported,
    #[error("nothing to revert to: {0}")]
    NoPrevious(String),
    #[error("version {0} is the one running")]
    SameVersion(String),
    #[error("bad sha256: {0}")]
    BadDigest(String),
    #[error("reading {path}")]
    ReadSource {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("downloading {url}: {reason}")]
    Download { url: String, reason: String },
    #[error("the binary is larger than {MAX_BINARY_BYTES} bytes")]
    TooLarge,
    #[error("sha256 mismatch: expected {expected}, but the binary's is {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {binary} in test mode")]
    TestStart {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("in test mode, version {version} {what}; its output ends with:\n{tail}")]
    TestFailed { version: String, what: String, tail: String },
    #[error("starting the watchdog: {0}")]
    Watchdog(String),
    #[error("{path} is unreadable: {reason}")]
    Record { path: PathBuf, reason: String },
    #[error("another node runs on {0}")]
    Locked(String),
}

impl UpdateError {
    /// The step that failed, as `details.step` names it.
    pub fn step(&self) -> &'static str {
        match self {
            UpdateError::Busy
            | UpdateError::Unfinished { .. }
            | UpdateError::OperationsInFlight(_)
            | UpdateError::Stopping
            | UpdateError::Unsupported
            | UpdateError::NoPrevious(_)
            | UpdateError::SameVersion(_)
            | UpdateError::Record { .. }
            | UpdateError::Locked(_) => "prepare",
            UpdateError::BadDigest(_)
            | UpdateError::ReadSource { .. }
            | UpdateError::Download { .. }
            | UpdateError::TooLarge
            | UpdateError::Io { .. } => "stage",
            UpdateError::DigestMismatch { .. } => "verify",
            UpdateError::TestStart { .. } | UpdateError::TestFailed { .. } => "test_mode",
            UpdateError::Watchdog(_) => "watchdog",
        }
    }

    /// The one mapping of update errors to API errors.
    pub fn to_api(&self) -> ApiError {
        let code = match self {
            UpdateError::Busy | UpdateError::Unfinished { .. } | UpdateError::OperationsInFlight(_) => {
                ErrorCode::InProgress
            }
            UpdateError::Stopping
            | UpdateError::NoPrevious(_)
            | UpdateError::SameVersion(_)
            | UpdateError::Locked(_) => ErrorCode::Conflict,
            UpdateError::Unsupported => ErrorCode::NotReady,
            UpdateError::BadDigest(_)
            | UpdateError::ReadSource { .. }
            | UpdateError::Download { .. }
            | UpdateError::DigestMismatch { .. }
            | UpdateError::TestStart { .. }
            | UpdateError::TestFailed { .. } => ErrorCode::InvalidArgument,
            UpdateError::TooLarge => ErrorCode::PayloadTooLarge,
            UpdateError::Io { .. } | UpdateError::Watchdog(_) | UpdateError::Record { .. } => ErrorCode::Internal,
        };
        let mut details = serde_json::json!({ "step": self.step() });
        if let UpdateError::DigestMismatch { expected, actual } = self {
            details["expected"] = expected.clone().into();
            details["actual"] = actual.clone().into();
        }
        ApiError::new(code, format!("{} failed: {}", self.step(), error_chain(self))).with_details(details)
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpdateError {
    let what = what.into();
    move |source| UpdateError::Io { what, source }
}

// ------------------------------------------------------------------ files

/// Which version link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Current,
    Previous,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Current => "current",
            Link::Previous => "previous",
        }
    }
}

/// Who restarts the node when its process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Supervisor {
    /// Nobody: the watchdog starts the old version itself.
    None,
    /// systemd restarts the unit through `current` (`Restart=on-failure`).
    Systemd,
}

impl Supervisor {
    /// `FLOTILLA_SUPERVISOR` (`none` or `systemd`) when set; else systemd
    /// when this process is a systemd service's (it has an
    /// `INVOCATION_ID` and its parent is systemd).
    pub fn detect() -> Supervisor {
        match std::env::var("FLOTILLA_SUPERVISOR").as_deref() {
            Ok("systemd") => return Supervisor::Systemd,
            Ok("none") => return Supervisor::None,
            _ => {}
        }
        let parent = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| parse_stat(&s)).map(|s| s.ppid);
        let parent_is_systemd = parent
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
            .is_some_and(|c| c.trim() == "systemd");
        if std::env::var_os("INVOCATION_ID").is_some() && parent_is_systemd {
            Supervisor::Systemd
        } else {
            Supervisor::None
        }
    }
}

/// A sandbox that ran at the hand-over, to check it was re-adopted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracked {
    pub id: String,
    pub pid: i32,
    pub start: u64,
}

/// `update.pending`: a hand-over between switching the links and the new
/// version's commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub id: String,
    pub kind: UpdateKind,
    pub from: String,
    pub to: String,
    /// What `previous` named before the switch; a revert restores it.
    pub previous_before: Option<String>,
    /// The node's process, which keeps its pid and start time across exec.
    pub pid: i32,
    pub pid_start: u64,
    /// The new version must have committed by then.
    pub deadline: Timestamp,
    /// The node's argv, which the watchdog restarts the old version with.
    pub argv: Vec<String>,
    pub supervisor: Supervisor,
    pub sandboxes: Vec<Tracked>,
    /// Why the new version gave up, written by it before it exits.
    #[serde(default)]
    pub failure: Option<String>,
}

/// A version directory, as `flotilla node versions` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeptVersion {
    pub id: String,
    pub sha256: Option<String>,
    pub origin: Option<String>,
    pub added: Option<Timestamp>,
    pub current: bool,
    pub previous: bool,
}

/// The self-update files under a data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    home: PathBuf,
}

impl Layout {
    pub fn new(home: impl Into<PathBuf>) -> Layout {
        Layout { home: home.into() }
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn versions(&self) -> PathBuf {
        self.home.join("versions")
    }

    pub fn version_dir(&self, id: &str) -> PathBuf {
        self.versions().join(id)
    }

    pub fn binary(&self, id: &str) -> PathBuf {
        self.version_dir(id).join(BINARY)
    }

    pub fn link(&self, which: Link) -> PathBuf {
        self.home.join(which.name())
    }

    /// `HOME/current/flotilla`: what a hand-over executes, through the link.
    pub fn current_binary(&self) -> PathBuf {
        self.link(Link::Current).join(BINARY)
    }

    pub fn pending_path(&self) -> PathBuf {
        self.home.join("update.pending")
    }

    pub fn last_path(&self) -> PathBuf {
        self.home.join("update.last")
    }

    pub fn log_path(&self) -> PathBuf {
        self.home.join("update.log")
    }

    pub fn watchdog_pid_path(&self) -> PathBuf {
        self.home.join("update.watchdog.pid")
    }

    pub fn node_pid_path(&self) -> PathBuf {
        self.home.join("node.pid")
    }

    /// The side socket of a candidate in test mode.
    pub fn test_socket(&self) -> PathBuf {
        self.home.join("update-test.sock")
    }

    /// The version a link names, if it is set.
    pub fn read_link(&self, which: Link) -> Option<String> {
        let target = std::fs::read_link(self.link(which)).ok()?;
        target.file_name()?.to_str().map(str::to_string)
    }

    /// Points `which` at `versions/<id>` (or removes it): the new link is
    /// made beside it as `<link>.new` and renamed over, so a reader sees
    /// the old target or the new one, never none.
    pub fn set_link(&self, which: Link, id: Option<&str>) -> std::io::Result<()> {
        let link = self.link(which);
        let Some(id) = id else {
            return match std::fs::remove_file(&link) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            };
        };
        let staged = self.home.join(format!("{}.new", which.name()));
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(Path::new("versions").join(id), &staged)?;
        std::fs::rename(&staged, &link)
    }

    pub fn read_pending(&self) -> Result<Option<Pending>, UpdateError> {
        read_json(&self.pending_path())
    }

    pub fn write_pending(&self, p: &Pending) -> std::io::Result<()> {
        write_json(&self.pending_path(), p)
    }

    pub fn remove_pending(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.pending_path()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    pub fn read_last(&self) -> Result<Option<UpdateOutcome>, UpdateError> {
        read_json(&self.last_path())
    }

    fn write_last(&self, o: &UpdateOutcome) -> std::io::Result<()> {
        write_json(&self.last_path(), o)
    }

    /// Appends a timestamped line to `update.log`; a failure to log is
    /// reported on stderr and never stops an update.
    pub fn log(&self, who: &str, line: &str) {
        let text = format!("{} {who}[{}]: {line}\n", Timestamp::now(), std::process::id());
        let written = self.open_log().and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = written {
            eprintln!("flotilla: writing {}: {e}: {text}", self.log_path().display());
        }
    }

    fn open_log(&self) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())
    }

    /// The digest recorded for a version.
    pub fn sha256_of(&self, id: &str) -> Option<String> {
        std::fs::read_to_string(self.version_dir(id).join("sha256")).ok().map(|s| s.trim().to_string())
    }

    pub fn version(&self, id: &str) -> NodeVersion {
        NodeVersion { id: id.to_string(), sha256: self.sha256_of(id) }
    }

    /// Removes every version neither `current` nor `previous` names (each
    /// is a whole binary, 100+ MB): after a commit, those are the only two
    /// a revert or a watchdog can come back to.
    pub fn prune_versions(&self) {
        let keep = [self.read_link(Link::Current), self.read_link(Link::Previous)];
        for v in self.kept_versions() {
            if !keep.iter().flatten().any(|k| *k == v.id) {
                match std::fs::remove_dir_all(self.version_dir(&v.id)) {
                    Ok(()) => self.log("node", &format!("removed version {}: neither current nor previous", v.id)),
                    Err(e) => self.log("node", &format!("could not remove version {}: {e}", v.id)),
                }
            }
        }
    }

    /// Every version directory, oldest first.
    pub fn kept_versions(&self) -> Vec<KeptVersion> {
        let current = self.read_link(Link::Current);
        let previous = self.read_link(Link::Previous);
        let mut out: Vec<KeptVersion> = std::fs::read_dir(self.versions())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let id = e.file_name().to_str()?.to_string();
                if id.starts_with('.') {
                    return None;
                }
                let added = e.metadata().and_then(|m| m.modified()).ok().map(Timestamp::from);
                Some(KeptVersion {
                    sha256: self.sha256_of(&id),
                    origin: std::fs::read_to_string(self.version_dir(&id).join("origin"))
                        .ok()
                        .map(|s| s.trim().to_string()),
                    added,
                    current: current.as_deref() == Some(id.as_str()),
                    previous: previous.as_deref() == Some(id.as_str()),
                    id,
                })
            })
            .collect();
        out.sort_by(|a, b| a.added.cmp(&b.added).then_with(|| a.id.cmp(&b.id)));
        out
    }

    /// `(pid, start time)` of the node that holds the data directory.
    pub fn node_pid(&self) -> Option<(i32, u64)> {
        read_pid_file(&self.node_pid_path())
    }

    /// Whether the watchdog of a hand-over still runs.
    pub fn watchdog_alive(&self) -> bool {
        read_pid_file(&self.watchdog_pid_path()).is_some_and(|(pid, start)| alive(pid, start))
    }

    /// The end of what a candidate wrote in test mode.
    fn test_output_tail(&self, id: &str) -> String {
        let path = self.version_dir(id).join("test.log");
        let Ok(mut f) = std::fs::File::open(&path) else { return "(no output)".into() };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let from = len.saturating_sub(OUTPUT_TAIL_BYTES);
        let _ = std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(from));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        // Start at a line boundary when the tail was cut.
        let text = if from > 0 { text.split_once('\n').map(|(_, t)| t).unwrap_or(&text) } else { &text };
        let text = text.trim_end();
        if text.is_empty() { "(no output)".into() } else { text.to_string() }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, UpdateError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| UpdateError::Record { path: path.to_path_buf(), reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(UpdateError::Record { path: path.to_path_buf(), reason: e.to_string() }),
    }
}

/// Writes a file whole: a temporary beside it, synced, renamed over.
fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn write_pid_file(path: &Path) -> std::io::Result<()> {
    let pid = std::process::id() as i32;
    let start = proc_stat(pid).map(|s| s.start).unwrap_or(0);
    std::fs::write(path, format!("{pid} {start}\n"))
}

fn read_pid_file(path: &Path) -> Option<(i32, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut words = text.split_whitespace();
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

// ------------------------------------------------------------------ processes

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    state: char,
    ppid: i32,
    /// Clock ticks after boot: with the pid, a process's identity.
    start: u64,
}

/// Parses `/proc/<pid>/stat`. The command name may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

fn proc_stat(pid: i32) -> Option<Stat> {
    if pid <= 0 {
        return None;
    }
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether the process `pid` that started at `start` still runs: a zombie
/// has ended, and a different start time is a stranger that reused the pid.
pub fn alive(pid: i32, start: u64) -> bool {
    proc_stat(pid).is_some_and(|s| s.start == start && !matches!(s.state, 'Z' | 'X' | 'x'))
}

/// This process's `(pid, start time)`.
fn me() -> (i32, u64) {
    let pid = std::process::id() as i32;
    (pid, proc_stat(pid).map(|s| s.start).unwrap_or(0))
}

/// SIGKILLs `(pid, start)` if it is still that process, and waits (up to
/// [`KILL_WAIT`]) until it is gone.
fn kill_and_wait(pid: i32, start: u64) -> bool {
    if alive(pid, start) {
        let _ = flotilla_sandbox::sys::kill(pid, SIGKILL);
    }
    let deadline = std::time::Instant::now() + KILL_WAIT;
    while alive(pid, start) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// The version directory this process's binary is in, if it runs from one.
fn own_version(layout: &Layout) -> Option<String> {
    let exe = std::fs::read_link("/proc/self/exe").ok()?;
    let versions = std::fs::canonicalize(layout.versions()).ok()?;
    let dir = exe.parent()?;
    (exe.file_name()? == BINARY && dir.parent()? == versions).then(|| dir.file_name()?.to_str().map(str::to_string))?
}

// ------------------------------------------------------------------ the node lock

/// The data directory's lock: one node per directory. Held for the node's
/// life; released by the kernel when the process ends or execs (the file is
/// close-on-exec), so the re-executed node takes it again at once.
#[derive(Debug)]
pub struct NodeLock {
    _file: std::fs::File,
}

/// How long a starting node waits for the lock: a node that was just
/// killed may take a moment to be gone (and a sandbox it was starting holds
/// a copy of its descriptors until its own death signal lands).
const LOCK_WAIT: Duration = Duration::from_secs(5);

impl NodeLock {
    pub fn acquire(home: &Path) -> Result<NodeLock, UpdateError> {
        let path = home.join("node.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    let who = Layout::new(home).node_pid().map(|(p, _)| format!(" (pid {p})")).unwrap_or_default();
                    return Err(UpdateError::Locked(format!("{}{who}", home.display())));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(io_err(format!("locking {}", path.display()))(e));
                }
            }
        }
        write_pid_file(&home.join("node.pid")).map_err(io_err("writing node.pid"))?;
        Ok(NodeLock { _file: file })
    }
}

// ------------------------------------------------------------------ stopping

/// Why the node stops serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM or Ctrl-C: stop the sandboxes (app instances' excepted
    /// unless `--stop-apps`), then exit.
    Shutdown,
    /// Re-execute through `HOME/current`, every sandbox left running.
    HandOver,
}

/// Tells every listener why and when to stop; the first request wins.
#[derive(Debug)]
pub struct StopSwitch {
    tx: tokio::sync::watch::Sender<Option<Stop>>,
}

impl StopSwitch {
    pub fn new() -> Arc<StopSwitch> {
        Arc::new(StopSwitch { tx: tokio::sync::watch::channel(None).0 })
    }

    /// Asks to stop; false if a stop was already asked for.
    pub fn request(&self, stop: Stop) -> bool {
        self.tx.send_if_modified(|s| {
            if s.is_some() {
                return false;
            }
            *s = Some(stop);
            true
        })
    }

    pub fn requested(&self) -> Option<Stop> {
        *self.tx.borrow()
    }

    /// Resolves with the reason once a stop is asked for.
    pub async fn stopped(&self) -> Stop {
        let mut rx = self.tx.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(s) => s.unwrap_or(Stop::Shutdown),
            Err(_) => Stop::Shutdown,
        }
    }
}

// ------------------------------------------------------------------ the updater

/// What the node found at start-up about a hand-over.
#[derive(Debug, Clone, PartialEq)]
pub enum Startup {
    /// No hand-over was in progress.
    Normal,
    /// This process is the new version of a hand-over: it must check
    /// itself and commit.
    Candidate(Pending),
    /// This is the old version back after a hand-over that did not commit.
    Reverted(Pending),
    /// A hand-over is in progress that this binary is no part of.
    Unrelated(Pending),
}

/// What a hand-over records of the node at the switch.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub sandboxes: Vec<Tracked>,
    /// Operations still running, as `kind id`.
    pub operations: Vec<String>,
}

impl Snapshot {
    pub fn of<B: Backend>(node: &Node<B>) -> Snapshot {
        let mut sandboxes = Vec::new();
        let mut q = PageQuery { page_token: None, limit: Some(flotilla_api::limits::MAX_PAGE_SIZE) };
        loop {
            let page = node.list(&q);
            for s in &page.items {
                if s.state != SandboxState::Running {
                    continue;
                }
                // The host pid of the sandbox's init (or its QEMU): the
                // `created` step of its latest boot says `[qemu ]pid N`.
                let pid = s
                    .steps
                    .iter()
                    .rev()
                    .find(|st| st.name == "created")
                    .and_then(|st| st.detail.as_deref()?.rsplit_once("pid ")?.1.trim().parse::<i32>().ok());
                if let Some(pid) = pid
                    && let Some(stat) = proc_stat(pid)
                {
                    sandboxes.push(Tracked { id: s.id.clone(), pid, start: stat.start });
                }
            }
            match page.next_page_token {
                Some(t) => q.page_token = Some(t),
                None => break,
            }
        }
        let operations = node
            .operations()
            .list()
            .into_iter()
            .filter(|o| o.state == OperationState::Running)
            .map(|o| format!("{} {}", o.kind.as_str(), o.id))
            .collect();
        Snapshot { sandboxes, operations }
    }
}

/// The steps of one update, as the answer lists them.
#[derive(Debug, Default)]
struct Steps(Vec<Step>);

impl Steps {
    fn push(&mut self, layout: &Layout, name: &str, detail: impl Into<String>) {
        let detail = detail.into();
        layout.log("node", &format!("{name}: {detail}"));
        tracing::info!(step = name, detail = %detail, "self-update");
        self.0.push(Step { name: name.into(), at: Timestamp::now(), detail: Some(detail) });
    }
}

/// A node's self-update: one per node process, shared by the API handlers
/// (as an axum `Extension`) and the daemon.
#[derive(Debug)]
pub struct Updater {
    layout: Layout,
    argv: Vec<OsString>,
    /// The agent the node runs (what the self-test looks for).
    agent: PathBuf,
    supervisor: Supervisor,
    stop: Arc<StopSwitch>,
    startup: Startup,
    running: tokio::sync::OnceCell<NodeVersion>,
    /// One update or revert at a time.
    busy: tokio::sync::Mutex<()>,
}

impl Updater {
    /// Reads what a previous process left (the pending record) and decides
    /// this process's part in it.
    pub fn open(
        home: PathBuf,
        argv: Vec<OsString>,
        agent: PathBuf,
        stop: Arc<StopSwitch>,
    ) -> Result<Arc<Updater>, UpdateError> {
        let layout = Layout::new(home);
        let startup = match layout.read_pending()? {
            None => Startup::Normal,
            Some(p) => {
                let own = own_version(&layout);
                if (p.pid, p.pid_start) == me() || own.as_deref() == Some(p.to.as_str()) {
                    Startup::Candidate(p)
                } else if own.as_deref() == Some(p.from.as_str()) {
                    Startup::Reverted(p)
                } else {
                    Startup::Unrelated(p)
                }
            }
        };
        Ok(Arc::new(Updater {
            layout,
            argv,
            agent,
            supervisor: Supervisor::detect(),
            stop,
            startup,
            running: tokio::sync::OnceCell::new(),
            busy: tokio::sync::Mutex::new(()),
        }))
    }

    /// `router` with this updater attached, for the update routes.
    pub fn attach(self: &Arc<Self>, router: axum::Router) -> axum::Router {
        router.layer(axum::Extension(self.clone()))
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn startup(&self) -> &Startup {
        &self.startup
    }

    /// Start-up work: remove staging a crash left, and finish a revert
    /// whose watchdog is gone.
    pub fn start(self: &Arc<Self>) {
        // Copies a crash interrupted (no update runs yet).
        for e in std::fs::read_dir(self.layout.versions()).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(".staging-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        match &self.startup {
            Startup::Normal | Startup::Candidate(_) => {}
            Startup::Reverted(p) => {
                if !self.layout.watchdog_alive() {
                    let why = p
                        .failure
                        .clone()
                        .unwrap_or_else(|| format!("the node restarted before version {} committed", p.to));
                    self.finish_revert(p, &why);
                }
            }
            Startup::Unrelated(p) => tracing::warn!(
                update = %p.id,
                "a hand-over from {} to {} is pending, and this binary is neither (see {})",
                p.from,
                p.to,
                self.layout.log_path().display()
            ),
        }
        // `current` is recorded lazily, when the first update or revert
        // needs it (`running_version`, from /proc/self/exe): copying a
        // 100+ MB binary at every start of every fresh node would cost
        // more than it saves.
    }

    /// The running binary as a version: its directory when it runs from
    /// one, else a copy of it placed now (and `current`, if unset, linked
    /// to it).
    pub async fn running_version(&self) -> Result<NodeVersion, UpdateError> {
        self.running
            .get_or_try_init(|| async {
                let layout = self.layout.clone();
                tokio::task::spawn_blocking(move || record_running(&layout))
                    .await
                    .map_err(|e| io_err("recording the running binary")(std::io::Error::other(e)))?
            })
            .await
            .cloned()
    }

    fn ready(&self, snap: &Snapshot) -> Result<(), UpdateError> {
        if self.stop.requested().is_some() {
            return Err(UpdateError::Stopping);
        }
        if let Some(p) = self.layout.read_pending()? {
            return Err(UpdateError::Unfinished { id: p.id, log: self.layout.log_path() });
        }
        if !snap.operations.is_empty() {
            return Err(UpdateError::OperationsInFlight(snap.operations.join(", ")));
        }
        Ok(())
    }

    /// `POST /v1/node/update`: stage, verify, test, switch; on success the
    /// node hands over once the answer is sent.
    pub async fn update(&self, req: &NodeUpdateRequest, snap: Snapshot) -> Result<NodeUpdate, UpdateError> {
        let _busy = self.busy.try_lock().map_err(|_| UpdateError::Busy)?;
        self.ready(&snap)?;
        let expected = req.sha256.as_deref().map(parse_sha256).transpose().map_err(UpdateError::BadDigest)?;
        let from = self.running_version().await?;
        let mut steps = Steps::default();
        let to = self.stage(&req.binary, expected.as_deref(), &mut steps).await?;
        if to.id == from.id {
            return Err(UpdateError::SameVersion(to.id));
        }
        if let Err(e) = self.try_candidate(&to, &mut steps).await {
            // A binary that failed its test is not kept (the error quotes
            // its output), unless a link names it.
            let linked =
                [Link::Current, Link::Previous].iter().any(|l| self.layout.read_link(*l) == Some(to.id.clone()));
            if !linked {
                let _ = std::fs::remove_dir_all(self.layout.version_dir(&to.id));
            }
            return Err(e);
        }
        self.hand_over(UpdateKind::Update, from, to, snap, steps).await
    }

    /// `POST /v1/node/revert`: the same hand-over, to `previous`.
    pub async fn revert(&self, snap: Snapshot) -> Result<NodeUpdate, UpdateError> {
        let _busy = self.busy.try_lock().map_err(|_| UpdateError::Busy)?;
        self.ready(&snap)?;
        let from = self.running_version().await?;
        let Some(prev) = self.layout.read_link(Link::Previous) else {
            return Err(UpdateError::NoPrevious(format!("{} is not set", self.layout.link(Link::Previous).display())));
        };
        if prev == from.id {
            return Err(UpdateError::SameVersion(prev));
        }
        if !self.layout.binary(&prev).is_file() {
            return Err(UpdateError::NoPrevious(format!("{} is missing", self.layout.binary(&prev).display())));
        }
        let to = self.layout.version(&prev);
        let mut steps = Steps::default();
        steps.push(
            &self.layout,
            "staged",
            format!("version {prev} is kept in {}", self.layout.version_dir(&prev).display()),
        );
        self.try_candidate(&to, &mut steps).await?;
        self.hand_over(UpdateKind::Revert, from, to, snap, steps).await
    }

    /// Copies or downloads `source` into a staging directory, hashing it,
    /// checks the digest, and places it as `versions/<id>`.
    async fn stage(&self, source: &str, expected: Option<&str>, steps: &mut Steps) -> Result<NodeVersion, UpdateError> {
        let versions = self.layout.versions();
        std::fs::create_dir_all(&versions).map_err(io_err(format!("creating {}", versions.display())))?;
        let staging = versions.join(format!(".staging-{}", crate::node::new_id()));
        std::fs::create_dir(&staging).map_err(io_err(format!("creating {}", staging.display())))?;
        let result = async {
            let file = staging.join(BINARY);
            let sha = if source.starts_with("http://") || source.starts_with("https://") {
                download(source, &file).await?
            } else {
                let (src, dst) = (PathBuf::from(source), file.clone());
                tokio::task::spawn_blocking(move || copy_hashing(&src, &dst))
                    .await
                    .map_err(|e| io_err("copying the binary")(std::io::Error::other(e)))??
            };
            steps.push(&self.layout, "staged", format!("{source}: sha256 {sha}"));
            if let Some(expected) = expected {
                if expected != sha {
                    return Err(UpdateError::DigestMismatch { expected: expected.to_string(), actual: sha });
                }
                steps.push(&self.layout, "verified", format!("sha256 {sha} as expected"));
            }
            place(&self.layout, &staging, &sha, source)
        }
        .await;
        let _ = std::fs::remove_dir_all(&staging);
        result
    }

    /// Runs version `to` in test mode and checks it answers and passes its
    /// self-test; the child is always stopped.
    async fn try_candidate(&self, to: &NodeVersion, steps: &mut Steps) -> Result<(), UpdateError> {
        let binary = self.layout.binary(&to.id);
        let socket = self.layout.test_socket();
        let _ = std::fs::remove_file(&socket);
        let log_path = self.layout.version_dir(&to.id).join("test.log");
        let log = std::fs::File::create(&log_path).map_err(io_err(format!("creating {}", log_path.display())))?;
        let out = log.try_clone().map_err(io_err("duplicating the test log"))?;
        let mut child = tokio::process::Command::new(&binary)
            .arg0(self.argv.first().cloned().unwrap_or_else(|| "flotilla".into()))
            .args(self.argv.iter().skip(1))
            .arg("--test-mode")
            .arg("--socket")
            .arg(&socket)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| UpdateError::TestStart { binary: binary.clone(), source })?;
        steps.push(&self.layout, "test_started", format!("pid {} on {}", child.id().unwrap_or(0), socket.display()));
        let failed = |what: String| UpdateError::TestFailed {
            version: to.id.clone(),
            what,
            tail: self.layout.test_output_tail(&to.id),
        };
        let deadline = tokio::time::Instant::now() + test_deadline();
        let client = HttpClient::new(Endpoint::Unix(socket.clone()));
        let result = async {
            let info: TestModeInfo = loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(failed(format!("exited ({status}) before it answered GET /v1/node")));
                }
                let asked = tokio::time::timeout_at(deadline, client.json(http::Method::GET, "/v1/node", None::<&()>));
                match asked.await {
                    Ok(Ok(info)) => break info,
                    Ok(Err(_)) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(Err(_)) | Err(_) => {
                        return Err(failed(format!("did not answer GET /v1/node within {:?}", test_deadline())));
                    }
                }
            };
            if !info.test_mode {
                return Err(failed("answered GET /v1/node, but not as a node in test mode".into()));
            }
            steps.push(&self.layout, "test_answered", format!("version {} (pid {})", info.version, info.pid));
            let st: SelfTest = match tokio::time::timeout_at(
                deadline,
                client.json(http::Method::GET, "/v1/node/self-test", None::<&()>),
            )
            .await
            {
                Ok(Ok(st)) => st,
                Ok(Err(e)) => return Err(failed(format!("could not run its self-test: {}", error_chain(&e)))),
                Err(_) => return Err(failed(format!("did not finish its self-test within {:?}", test_deadline()))),
            };
            if !st.passed {
                return Err(failed(format!("failed its self-test: {}", st.failures())));
            }
            steps.push(&self.layout, "self_test_passed", format!("{} checks", st.checks.len()));
            Ok(())
        }
        .await;
        // Stop it: SIGTERM, then SIGKILL (kill_on_drop) past the grace.
        if let Some(pid) = child.id() {
            let _ = flotilla_sandbox::sys::kill(pid as i32, SIGTERM);
        }
        if tokio::time::timeout(TEST_STOP_GRACE, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
        let _ = std::fs::remove_file(&socket);
        result
    }

    /// Writes the pending record, swaps the links, starts the watchdog and
    /// asks the listeners to stop for a hand-over. Undone if any of it fails.
    async fn hand_over(
        &self,
        kind: UpdateKind,
        from: NodeVersion,
        to: NodeVersion,
        snap: Snapshot,
        mut steps: Steps,
    ) -> Result<NodeUpdate, UpdateError> {
        let (pid, pid_start) = me();
        let deadline = Timestamp::now().plus(crate::tls::SHUTDOWN_GRACE + check_deadline());
        let pending = Pending {
            id: crate::node::new_id(),
            kind,
            from: from.id.clone(),
            to: to.id.clone(),
            previous_before: self.layout.read_link(Link::Previous),
            pid,
            pid_start,
            deadline,
            argv: self.argv.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
            supervisor: self.supervisor,
            sandboxes: snap.sandboxes,
            failure: None,
        };
        self.layout.write_pending(&pending).map_err(io_err("writing update.pending"))?;
        steps.push(
            &self.layout,
            "pending_written",
            format!("{} {}: {} -> {}, commit by {deadline}", kind.as_str(), pending.id, from.id, to.id),
        );
        let switched = self
            .layout
            .set_link(Link::Previous, Some(&from.id))
            .and_then(|()| self.layout.set_link(Link::Current, Some(&to.id)));
        if let Err(e) = switched {
            self.undo(&pending);
            return Err(io_err("swapping the version links")(e));
        }
        steps.push(
            &self.layout,
            "switched",
            format!("current -> versions/{}, previous -> versions/{}", to.id, from.id),
        );
        match self.spawn_watchdog(&pending).await {
            Ok(w) => steps.push(&self.layout, "watchdog_started", format!("pid {w}")),
            Err(e) => {
                self.undo(&pending);
                return Err(e);
            }
        }
        if !self.stop.request(Stop::HandOver) {
            self.undo(&pending);
            return Err(UpdateError::Stopping);
        }
        self.layout.log("node", &format!("handing over to version {} (pid {pid} re-executes)", to.id));
        Ok(NodeUpdate { id: pending.id, kind, from, to, pid: pid as u32, deadline, steps: steps.0 })
    }

    /// Puts the links back and drops the record: the watchdog, if started,
    /// sees the record gone and `current` unchanged, and exits.
    fn undo(&self, p: &Pending) {
        let _ = self.layout.set_link(Link::Current, Some(&p.from));
        let _ = self.layout.set_link(Link::Previous, p.previous_before.as_deref());
        let _ = self.layout.remove_pending();
        self.layout.log("node", &format!("{} {} abandoned: version {} keeps running", p.kind.as_str(), p.id, p.from));
    }

    /// Starts the old binary's watchdog through a launcher that puts it in
    /// a session of its own and exits, so the watchdog is nobody's child
    /// here and survives the exec. Returns the watchdog's pid.
    async fn spawn_watchdog(&self, p: &Pending) -> Result<u32, UpdateError> {
        let log = self.layout.open_log().map_err(|e| UpdateError::Watchdog(format!("opening update.log: {e}")))?;
        let launched = tokio::process::Command::new(self.layout.binary(&p.from))
            .args(["node", "watchdog", "--detach", "--update", &p.id, "--home"])
            .arg(self.layout.home())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(WATCHDOG_START_TIMEOUT, launched)
            .await
            .map_err(|_| {
                UpdateError::Watchdog(format!("its launcher did not report within {WATCHDOG_START_TIMEOUT:?}"))
            })?
            .map_err(|e| UpdateError::Watchdog(e.to_string()))?;
        if !out.status.success() {
            return Err(UpdateError::Watchdog(format!("its launcher exited with {} (see update.log)", out.status)));
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| UpdateError::Watchdog("its launcher printed no pid".into()))
    }

    /// Re-executes `HOME/current/flotilla` with this process's argv and
    /// environment plus `env` (the app listeners handed over); returns only
    /// if that failed.
    pub fn exec_current(&self, env: &[(String, String)]) -> std::io::Error {
        let mut cmd = std::process::Command::new(self.layout.current_binary());
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        if let Some(arg0) = self.argv.first() {
            cmd.arg0(arg0);
        }
        cmd.args(self.argv.iter().skip(1));
        let e = cmd.exec();
        self.layout.log("node", &format!("executing {} failed: {e}", self.layout.current_binary().display()));
        e
    }

    /// After a failed exec: points `current` back at the version this
    /// process ran, so whoever restarts the node gets it.
    pub fn restore_after_failed_exec(&self) {
        if let Ok(Some(p)) = self.layout.read_pending() {
            let mut p = p;
            p.failure = Some(format!("executing {} failed", self.layout.current_binary().display()));
            let _ = self.layout.write_pending(&p);
            let _ = self.layout.set_link(Link::Current, Some(&p.from));
            let _ = self.layout.set_link(Link::Previous, p.previous_before.as_deref());
        }
    }

    /// For a new version just handed over to: checks that it serves on
    /// `socket`, re-adopted the sandboxes that still run, and passes its
    /// self-test, before the deadline; then commits. On failure it swaps
    /// `current` back, notes why in the record and returns the reason: the
    /// caller exits, and the watchdog brings the old version back.
    /// `Ok(None)` when this process is no candidate.
    pub async fn check_after_switch(&self, socket: &Path) -> Result<Option<UpdateOutcome>, String> {
        let Startup::Candidate(p) = &self.startup else { return Ok(None) };
        self.layout.log("node", &format!("version {} started (pid {}); checking itself", p.to, std::process::id()));
        let left = Timestamp::now().until(p.deadline).saturating_sub(CHECK_MARGIN);
        let checked = match tokio::time::timeout(left, self.check(p, socket)).await {
            Ok(r) => r,
            Err(_) => Err(format!("the check did not pass by the deadline ({})", p.deadline)),
        };
        match checked {
            Ok(()) => {
                let outcome = UpdateOutcome {
                    id: p.id.clone(),
                    kind: p.kind,
                    from: p.from.clone(),
                    to: p.to.clone(),
                    result: UpdateResult::Committed,
                    reason: None,
                    at: Timestamp::now(),
                };
                let committed = self.layout.write_last(&outcome).and_then(|()| self.layout.remove_pending());
                match committed {
                    Ok(()) => {
                        self.layout.log("node", &format!("{} {}: version {} committed", p.kind.as_str(), p.id, p.to));
                        self.layout.prune_versions();
                        Ok(Some(outcome))
                    }
                    Err(e) => self.give_up(p, format!("committing: {e}")),
                }
            }
            Err(why) => self.give_up(p, why),
        }
    }

    fn give_up(&self, p: &Pending, why: String) -> Result<Option<UpdateOutcome>, String> {
        let mut failed = p.clone();
        failed.failure = Some(format!("version {} failed its check after the switch: {why}", p.to));
        let _ = self.layout.write_pending(&failed);
        let _ = self.layout.set_link(Link::Current, Some(&p.from));
        let _ = self.layout.set_link(Link::Previous, p.previous_before.as_deref());
        self.layout
            .log("node", &format!("{}; current -> versions/{} again", failed.failure.as_deref().unwrap_or(""), p.from));
        Err(why)
    }

    async fn check(&self, p: &Pending, socket: &Path) -> Result<(), String> {
        let client = crate::NodeClient::new(HttpClient::new(Endpoint::Unix(socket.to_path_buf())));
        // It serves (polled: the listener is being bound as this starts).
        while client.info().await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let listed = client.list().await.map_err(|e| format!("listing sandboxes: {}", error_chain(&e)))?;
        for t in &p.sandboxes {
            if !alive(t.pid, t.start) {
                continue; // it ended during the hand-over: nothing to adopt
            }
            match listed.iter().find(|s| s.id == t.id) {
                Some(s) if s.state == SandboxState::Running => {}
                Some(s) => {
                    return Err(format!(
                        "sandbox {} still runs (pid {}) but was not re-adopted: it is {}",
                        t.id, t.pid, s.state
                    ));
                }
                None => return Err(format!("sandbox {} still runs (pid {}) but is not listed", t.id, t.pid)),
            }
        }
        let (home, agent) = (self.layout.home().to_path_buf(), self.agent.clone());
        let st = tokio::task::spawn_blocking(move || self_test(&home, &agent))
            .await
            .map_err(|e| format!("the self-test panicked: {e}"))?;
        if !st.passed {
            return Err(format!("self-test: {}", st.failures()));
        }
        Ok(())
    }

    /// Completes a revert the watchdog did not live to finish.
    fn finish_revert(&self, p: &Pending, why: &str) {
        let _ = self.layout.set_link(Link::Current, Some(&p.from));
        let _ = self.layout.set_link(Link::Previous, p.previous_before.as_deref());
        let outcome = reverted(p, why);
        let _ = self.layout.write_last(&outcome);
        let _ = self.layout.remove_pending();
        self.layout.log("node", &format!("{} {} reverted: {why}; version {} runs", p.kind.as_str(), p.id, p.from));
    }
}

fn reverted(p: &Pending, why: &str) -> UpdateOutcome {
    UpdateOutcome {
        id: p.id.clone(),
        kind: p.kind,
        from: p.from.clone(),
        to: p.to.clone(),
        result: UpdateResult::Reverted,
        reason: Some(why.to_string()),
        at: Timestamp::now(),
    }
}

/// The running binary as a version (see [`Updater::running_version`]).
fn record_running(layout: &Layout) -> Result<NodeVersion, UpdateError> {
    if let Some(id) = own_version(layout) {
        return Ok(layout.version(&id));
    }
    let versions = layout.versions();
    std::fs::create_dir_all(&versions).map_err(io_err(format!("creating {}", versions.display())))?;
    let staging = versions.join(format!(".staging-{}", crate::node::new_id()));
    std::fs::create_dir(&staging).map_err(io_err(format!("creating {}", staging.display())))?;
    let origin = std::fs::read_link("/proc/self/exe").map(|p| p.display().to_string()).unwrap_or_default();
    // /proc/self/exe is the running file even if its path was replaced since.
    let placed = copy_hashing(Path::new("/proc/self/exe"), &staging.join(BINARY))
        .and_then(|sha| place(layout, &staging, &sha, &origin));
    let _ = std::fs::remove_dir_all(&staging);
    let v = placed?;
    if layout.read_link(Link::Current).is_none() {
        layout.set_link(Link::Current, Some(&v.id)).map_err(io_err("linking current"))?;
        layout.log("node", &format!("recorded the running binary ({origin}) as version {}; current -> it", v.id));
    }
    Ok(v)
}

/// Copies `src` to `dst` (mode 0755), returning its SHA-256.
fn copy_hashing(src: &Path, dst: &Path) -> Result<String, UpdateError> {
    let read_err = |source| UpdateError::ReadSource { path: src.display().to_string(), source };
    let mut input = std::fs::File::open(src).map_err(read_err)?;
    let meta = input.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    let mut out = std::fs::File::create(dst).map_err(io_err(format!("creating {}", dst.display())))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > MAX_BINARY_BYTES {
            return Err(UpdateError::TooLarge);
        }
        hash.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(format!("writing {}", dst.display())))?;
    }
    out.set_permissions(std::fs::Permissions::from_mode(0o755)).map_err(io_err("making the binary executable"))?;
    out.sync_all().map_err(io_err(format!("syncing {}", dst.display())))?;
    Ok(hex(&hash.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Moves a staged binary into `versions/<id>`; a version already there
/// (the same digest) is kept as it is.
fn place(layout: &Layout, staging: &Path, sha: &str, origin: &str) -> Result<NodeVersion, UpdateError> {
    let id = sha[..12].to_string();
    let dir = layout.version_dir(&id);
    if layout.binary(&id).is_file() {
        return Ok(layout.version(&id));
    }
    let w = |name: &str, text: &str| {
        std::fs::write(staging.join(name), format!("{text}\n")).map_err(io_err(format!("writing {name}")))
    };
    w("sha256", sha)?;
    w("origin", origin)?;
    let _ = std::fs::remove_dir_all(&dir); // a directory without its binary
    std::fs::rename(staging, &dir).map_err(io_err(format!("placing {}", dir.display())))?;
    Ok(NodeVersion { id, sha256: Some(sha.to_string()) })
}

// ------------------------------------------------------------------ downloads

/// `(endpoint, path and query)` of an http(s) URL.
fn split_url(url: &str) -> Result<(Endpoint, String), String> {
    let (https, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(r), _) => (true, r),
        (None, Some(r)) => (false, r),
        (None, None) => return Err("not an http(s) URL".into()),
    };
    let rest = rest.split('#').next().unwrap_or(rest);
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err("no host".into());
    }
    if authority.contains('@') {
        return Err("credentials in URLs are not supported".into());
    }
    let has_port = match authority.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => authority.contains(':'),
    };
    let host_port =
        if has_port { authority.to_string() } else { format!("{authority}:{}", if https { 443 } else { 80 }) };
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
    Ok((if https { Endpoint::Https(host_port) } else { Endpoint::Tcp(host_port) }, path))
}

/// Where a redirect from `base` to `location` leads.
fn resolve_location(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_string();
    }
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{}{rest}", &base[..scheme_end]);
    }
    let authority_end = base[scheme_end..].find(['/', '?']).map(|i| scheme_end + i).unwrap_or(base.len());
    if location.starts_with('/') {
        return format!("{}{location}", &base[..authority_end]);
    }
    let path = base[authority_end..].split('?').next().unwrap_or("");
    let dir = path.rfind('/').map(|i| &path[..=i]).unwrap_or("/");
    format!("{}{dir}{location}", &base[..authority_end])
}

/// Downloads `url` (https against the system's trust store, or plain
/// http) into `dest`, following redirects, returning the SHA-256.
async fn download(url: &str, dest: &Path) -> Result<String, UpdateError> {
    tokio::time::timeout(DOWNLOAD_TIMEOUT, download_inner(url, dest)).await.unwrap_or_else(|_| {
        Err(UpdateError::Download { url: url.to_string(), reason: format!("not done within {DOWNLOAD_TIMEOUT:?}") })
    })
}

async fn download_inner(url: &str, dest: &Path) -> Result<String, UpdateError> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let fail = |url: &str, reason: String| UpdateError::Download { url: url.to_string(), reason };
    let mut at = url.to_string();
    for _ in 0..=MAX_REDIRECTS {
        let (endpoint, path) = split_url(&at).map_err(|e| fail(&at, e))?;
        let client = HttpClient::new(endpoint);
        let req = client
            .request(http::Method::GET, &path)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| fail(&at, e.to_string()))?;
        let resp = client.send(req).await.map_err(|e| fail(&at, error_chain(&e)))?;
        let status = resp.status();
        if status.is_redirection() {
            let Some(location) = resp.headers().get(http::header::LOCATION).and_then(|v| v.to_str().ok()) else {
                return Err(fail(&at, format!("{status} without a Location")));
            };
            at = resolve_location(&at, location);
            continue;
        }
        if !status.is_success() {
            return Err(fail(&at, format!("the server answered {status}")));
        }
        if resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n > MAX_BINARY_BYTES)
        {
            return Err(UpdateError::TooLarge);
        }
        let mut out = tokio::fs::File::create(dest).await.map_err(io_err(format!("creating {}", dest.display())))?;
        let mut body = resp.into_body();
        let mut hash = Sha256::new();
        let mut total = 0u64;
        loop {
            let frame = tokio::time::timeout(DOWNLOAD_IDLE_TIMEOUT, body.frame())
                .await
                .map_err(|_| fail(&at, format!("nothing received for {DOWNLOAD_IDLE_TIMEOUT:?}")))?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| fail(&at, e.to_string()))?;
            let Ok(data) = frame.into_data() else { continue };
            total += data.len() as u64;
            if total > MAX_BINARY_BYTES {
                return Err(UpdateError::TooLarge);
            }
            hash.update(&data);
            out.write_all(&data).await.map_err(io_err(format!("writing {}", dest.display())))?;
        }
        out.set_permissions(std::fs::Permissions::from_mode(0o755))
            .await
            .map_err(io_err("making the binary executable"))?;
        out.sync_all().await.map_err(io_err(format!("syncing {}", dest.display())))?;
        return Ok(hex(&hash.finalize()));
    }
    Err(fail(url, format!("more than {MAX_REDIRECTS} redirects")))
}

// ------------------------------------------------------------------ self-test

/// What a node checks of itself before it is trusted: cheap, read-only,
/// real. Run by a candidate in test mode and by a new version after the
/// switch.
pub fn self_test(home: &Path, agent: &Path) -> SelfTest {
    let check = |name: &str, r: Result<String, String>| match r {
        Ok(detail) => SelfCheck { name: name.into(), ok: true, detail },
        Err(detail) => SelfCheck { name: name.into(), ok: false, detail },
    };
    SelfTest::new(vec![
        check(
            "root",
            if flotilla_sandbox::sys::euid() == 0 {
                Ok("running as root".into())
            } else {
                Err("not root: a node gives every sandbox its own uid range and cgroup".into())
            },
        ),
        check(
            "data_dir",
            match std::fs::metadata(home) {
                Ok(m) if m.is_dir() => Ok(home.display().to_string()),
                Ok(_) => Err(format!("{} is not a directory", home.display())),
                Err(e) => Err(format!("{}: {e}", home.display())),
            },
        ),
        check("node_db", node_db_readable(&home.join("node.db"))),
        check("agent", executable(agent)),
        check("namespaces", namespaces()),
        check("cgroups", cgroups(Path::new("/sys/fs/cgroup"))),
        check("seccomp", seccomp()),
    ])
}

/// Opens `node.db` read-only and counts its sandboxes.
fn node_db_readable(path: &Path) -> Result<String, String> {
    if !path.exists() {
        return Ok("no node.db yet (a new data directory)".into());
    }
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let db = rusqlite::Connection::open_with_flags(path, flags).map_err(|e| format!("{}: {e}", path.display()))?;
    let n: i64 = db
        .query_row("SELECT count(*) FROM sandboxes", [], |r| r.get(0))
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok(format!("{} opened read-only: {n} sandboxes recorded", path.display()))
}

fn executable(path: &Path) -> Result<String, String> {
    let m = std::fs::metadata(path).map_err(|e| format!("the agent {}: {e}", path.display()))?;
    if !m.is_file() || m.permissions().mode() & 0o111 == 0 {
        return Err(format!("the agent {} is not an executable file", path.display()));
    }
    Ok(path.display().to_string())
}

fn namespaces() -> Result<String, String> {
    let kinds = ["user", "mnt", "pid", "net", "uts", "ipc"];
    let missing: Vec<&str> = kinds.iter().copied().filter(|k| !Path::new("/proc/self/ns").join(k).exists()).collect();
    if !missing.is_empty() {
        return Err(format!("the kernel lacks {} namespaces", missing.join(", ")));
    }
    match std::fs::read_to_string("/proc/sys/user/max_user_namespaces") {
        Ok(n) if n.trim() == "0" => Err("user namespaces are disabled (user.max_user_namespaces = 0)".into()),
        _ => Ok(kinds.join(", ")),
    }
}

/// Which cgroup hierarchy there is, read only (detection proper creates
/// the node's group, which test mode must not).
fn cgroups(root: &Path) -> Result<String, String> {
    if let Ok(c) = std::fs::read_to_string(root.join("cgroup.controllers")) {
        return Ok(format!("v2 ({})", c.trim()));
    }
    if root.join("memory").is_dir() || root.join("pids").is_dir() {
        return Ok("v1".into());
    }
    // A node runs without cgroups (limits are then not enforced): a finding, not a failure.
    Ok(format!("none at {}: limits would not be enforced", root.display()))
}

fn seccomp() -> Result<String, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
    if status.lines().any(|l| l.starts_with("Seccomp:")) {
        Ok("available".into())
    } else {
        Err("the kernel has no seccomp (CONFIG_SECCOMP)".into())
    }
}

// ------------------------------------------------------------------ test mode

/// Serves a candidate in test mode on `socket` until `stop`: `GET /v1/node`
/// (its version) and `GET /v1/node/self-test`. Nothing else: no lock, no
/// store, no sandbox, no cgroup, no name table.
pub async fn serve_test_mode(
    socket: &Path,
    home: PathBuf,
    agent: PathBuf,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let info = TestModeInfo { version: env!("CARGO_PKG_VERSION").into(), pid: std::process::id(), test_mode: true };
    let router = axum::Router::new()
        .route(
            "/v1/node",
            get(move || {
                let info = info.clone();
                async move { axum::Json(info) }
            }),
        )
        .route(
            "/v1/node/self-test",
            get(move || {
                let (home, agent) = (home.clone(), agent.clone());
                async move {
                    let st = tokio::task::spawn_blocking(move || self_test(&home, &agent)).await.unwrap_or_else(|e| {
                        SelfTest::new(vec![SelfCheck {
                            name: "self_test".into(),
                            ok: false,
                            detail: format!("panicked: {e}"),
                        }])
                    });
                    axum::Json(st)
                }
            }),
        );
    let listener = crate::bind_private(socket)?;
    crate::serve_connections(listener, router, stop).await;
    let _ = std::fs::remove_file(socket);
    Ok(())
}

// ------------------------------------------------------------------ watchdog

/// The launcher's half of the double fork: starts `exe node watchdog
/// --update ID --home HOME` in a new session with its output appended to
/// `update.log`, and returns its pid without waiting for it.
pub fn launch_watchdog(exe: &Path, home: &Path, update: &str) -> std::io::Result<u32> {
    let layout = Layout::new(home);
    let log = layout.open_log()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["node", "watchdog", "--update", update, "--home"])
        .arg(home)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    flotilla_sandbox::sys::command_new_session(&mut cmd, false);
    Ok(cmd.spawn()?.id())
}

/// The watchdog of hand-over `update`: waits for the new version to
/// commit; if its process dies or the deadline passes first, reverts (see
/// the module docs). Logs to `update.log`; returns the exit code.
pub fn run_watchdog(home: &Path, update: &str) -> i32 {
    let layout = Layout::new(home);
    if let Err(e) = write_pid_file(&layout.watchdog_pid_path()) {
        layout.log("watchdog", &format!("writing {}: {e}", layout.watchdog_pid_path().display()));
    }
    let code = watch(&layout, update);
    if read_pid_file(&layout.watchdog_pid_path()).map(|(p, _)| p) == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(layout.watchdog_pid_path());
    }
    code
}

fn watch(layout: &Layout, update: &str) -> i32 {
    let mut unreadable = 0;
    let mut announced = false;
    loop {
        let p = match layout.read_pending() {
            Ok(Some(p)) if p.id == update => p,
            Ok(_) => {
                let how = match layout.read_last() {
                    Ok(Some(o)) if o.id == update => match o.result {
                        UpdateResult::Committed => format!("version {} committed", o.to),
                        UpdateResult::Reverted => format!("reverted to {}", o.from),
                    },
                    _ => "abandoned before the hand-over".into(),
                };
                layout.log("watchdog", &format!("{update}: {how}; done"));
                return 0;
            }
            Err(e) => {
                // Written whole by rename, so this is not a half-written
                // file; give a disk hiccup a few tries.
                unreadable += 1;
                if unreadable > 100 {
                    layout.log("watchdog", &format!("{update}: giving up: {e}"));
                    return 1;
                }
                std::thread::sleep(WATCHDOG_POLL);
                continue;
            }
        };
        unreadable = 0;
        if !announced {
            layout.log(
                "watchdog",
                &format!("{update}: watching pid {} until {} for version {} to commit", p.pid, p.deadline, p.to),
            );
            announced = true;
        }
        let why = if !alive(p.pid, p.pid_start) {
            Some(
                p.failure
                    .clone()
                    .unwrap_or_else(|| format!("the node (pid {}) ended before version {} committed", p.pid, p.to)),
            )
        } else if Timestamp::now() >= p.deadline {
            Some(format!("version {} did not commit by {}", p.to, p.deadline))
        } else {
            None
        };
        if let Some(why) = why {
            return revert(layout, &p, &why);
        }
        std::thread::sleep(WATCHDOG_POLL);
    }
}

fn revert(layout: &Layout, p: &Pending, why: &str) -> i32 {
    layout.log("watchdog", &format!("{}: reverting to version {}: {why}", p.id, p.from));
    // SIGKILL, never SIGTERM: a graceful stop would stop the sandboxes.
    if !kill_and_wait(p.pid, p.pid_start) {
        layout.log("watchdog", &format!("pid {} is still there after SIGKILL", p.pid));
    }
    // A new version a supervisor restarted (a different process) goes too.
    if let Some((pid, start)) = layout.node_pid()
        && (pid, start) != (p.pid, p.pid_start)
        && alive(pid, start)
        && std::fs::read_link(format!("/proc/{pid}/exe")).ok() == std::fs::canonicalize(layout.binary(&p.to)).ok()
    {
        layout.log("watchdog", &format!("stopping pid {pid}, which runs version {}", p.to));
        kill_and_wait(pid, start);
    }
    let restored = layout
        .set_link(Link::Current, Some(&p.from))
        .and_then(|()| layout.set_link(Link::Previous, p.previous_before.as_deref()));
    if let Err(e) = restored {
        layout.log("watchdog", &format!("swapping the links back failed: {e}"));
        return 1;
    }
    let _ = layout.write_last(&reverted(p, why));
    let _ = layout.remove_pending();
    layout.log("watchdog", &format!("current -> versions/{} again", p.from));
    match p.supervisor {
        Supervisor::Systemd => {
            layout.log("watchdog", "systemd restarts the node through current (Restart=on-failure)");
            0
        }
        Supervisor::None => match start_node(layout, &p.argv) {
            Ok(pid) => {
                layout.log("watchdog", &format!("started version {} as pid {pid}", p.from));
                0
            }
            Err(e) => {
                layout.log("watchdog", &format!("starting version {} failed: {e}", p.from));
                1
            }
        },
    }
}

/// Starts `HOME/current/flotilla` with `argv`, in its own session, its
/// output appended to `update.log`; not waited for.
fn start_node(layout: &Layout, argv: &[String]) -> std::io::Result<u32> {
    let log = layout.open_log()?;
    let mut cmd = std::process::Command::new(layout.current_binary());
    if let Some(arg0) = argv.first() {
        cmd.arg0(arg0);
    }
    cmd.args(argv.iter().skip(1)).stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    flotilla_sandbox::sys::command_new_session(&mut cmd, false);
    Ok(cmd.spawn()?.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.state, s.ppid, s.start), ('S', 1, 987654));
        assert!(parse_stat("garbage").is_none());
        let me = proc_stat(std::process::id() as i32).unwrap();
        assert!(alive(std::process::id() as i32, me.start));
        assert!(!alive(std::process::id() as i32, me.start + 1), "another start time is another process");
    }

    #[test]
    fn links_are_swapped_whole() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        assert_eq!(l.read_link(Link::Current), None);
        l.set_link(Link::Current, Some("aaa")).unwrap();
        l.set_link(Link::Current, Some("bbb")).unwrap();
        assert_eq!(l.read_link(Link::Current).as_deref(), Some("bbb"));
        assert_eq!(std::fs::read_link(l.link(Link::Current)).unwrap(), Path::new("versions/bbb"));
        assert!(!dir.path().join("current.new").exists());
        l.set_link(Link::Current, None).unwrap();
        l.set_link(Link::Current, None).unwrap();
        assert_eq!(l.read_link(Link::Current), None);
    }

    #[test]
    fn urls_split_into_endpoint_and_path() {
        let (ep, path) = split_url("https://example.com/dl/flotilla?x=1#frag").unwrap();
        assert_eq!((ep, path.as_str()), (Endpoint::Https("example.com:443".into()), "/dl/flotilla?x=1"));
        let (ep, path) = split_url("http://[::1]:8080").unwrap();
        assert_eq!((ep, path.as_str()), (Endpoint::Tcp("[::1]:8080".into()), "/"));
        assert!(split_url("http://user:pw@host/x").is_err());
        assert!(split_url("ftp://host/x").is_err());
    }

    #[test]
    fn redirects_resolve_like_a_browser() {
        let base = "https://a.example/releases/v1/flotilla?sig=1";
        assert_eq!(resolve_location(base, "https://b.example/x"), "https://b.example/x");
        assert_eq!(resolve_location(base, "//c.example/y"), "https://c.example/y");
        assert_eq!(resolve_location(base, "/z"), "https://a.example/z");
        assert_eq!(resolve_location(base, "other"), "https://a.example/releases/v1/other");
    }

    #[test]
    fn staging_verifies_and_places_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path().join("home"));
        std::fs::create_dir_all(l.versions()).unwrap();
        let src = dir.path().join("bin");
        std::fs::write(&src, b"#!/bin/sh\nexit 0\n").unwrap();
        let staging = l.versions().join(".staging-x");
        std::fs::create_dir(&staging).unwrap();
        let sha = copy_hashing(&src, &staging.join(BINARY)).unwrap();
        let v = place(&l, &staging, &sha, "test").unwrap();
        assert_eq!(v.id, &sha[..12]);
        assert_eq!(l.sha256_of(&v.id).as_deref(), Some(sha.as_str()));
        let mode = std::fs::metadata(l.binary(&v.id)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(l.kept_versions().len(), 1);
    }

    #[test]
    fn errors_name_their_step_and_status() {
        let e = UpdateError::DigestMismatch { expected: "a".repeat(64), actual: "b".repeat(64) };
        let api = e.to_api();
        assert_eq!(api.http_status(), 400);
        assert!(api.message.contains(&"a".repeat(64)) && api.message.contains(&"b".repeat(64)), "{api:?}");
        assert_eq!(api.details.as_ref().unwrap()["step"], "verify");
        assert_eq!(UpdateError::Busy.to_api().http_status(), 409);
    }

    #[tokio::test]
    async fn the_first_stop_wins() {
        let s = StopSwitch::new();
        assert!(s.request(Stop::HandOver));
        assert!(!s.request(Stop::Shutdown));
        assert_eq!(s.stopped().await, Stop::HandOver);
    }
}
