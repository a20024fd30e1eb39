//! Apps: envelopes (what an app is), installations and instances as the
//! node reports them, and the restart policy's pure back-off arithmetic.
//!
//! An envelope is written by people in TOML and sent as JSON; both parse
//! into [`Envelope`], whose [`Envelope::validate`] names the failing field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::frame::ExitStatus;
use crate::time::Timestamp;
use crate::types::{BackendKind, NetworkMode, Resources, field_error, validate_env};
use crate::units::{parse_duration, parse_size};

/// Longest app title: it names a directory, a sandbox (`TITLE.INST.N`) and
/// the first part of every address.
pub const MAX_TITLE_LEN: usize = 40;

/// What an app is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The app's name: letters, digits, `-`, `_`, `.`; an update must keep it.
    pub title: String,
    /// Image the instances run in (`host`, `NAME:TAG`, `dir:/path`); `host`
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A program to run, fetched and checked against its digest at install;
    /// it is placed at `/workspace/.app/NAME` in each instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<Binary>,
    /// Program and arguments. Without it, the binary runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments appended to the command (or the binary).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory inside the sandbox (default `/workspace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default)]
    pub backend: BackendKind,
    /// The sandbox's network (default `none`: ports are still forwarded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkMode>,
    /// Ports the app listens on inside its sandbox (on loopback or any
    /// address); the node forwards a host port to each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Names mounted in the name table at each running instance's forwarded
    /// address (its first port), only while it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    #[serde(default)]
    pub resources: EnvelopeResources,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How long a stop waits after `SIGTERM` before it kills (default `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<String>,
}

/// A program fetched at install: `url` (http or https) or an absolute
/// `path` on the node, and the SHA-256 it must have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Binary {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Lower-case hex.
    pub sha256: String,
}

/// Limits of each instance, in the units people write.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeResources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// `256M`, `2G`, or bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<SizeValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// A microVM's workspace disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<SizeValue>,
}

/// A size written as a string with a unit or as a number of bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(&self, field: &str) -> Result<u64, ApiError> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(s) => parse_size(s).map_err(|e| field_error(field, e)),
        }
    }
}

/// When an instance that exits is started again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Never: an exit leaves the instance `not-running`.
    Never,
    /// After an exit with a non-zero status or a signal (the default).
    #[default]
    OnFailure,
    /// After every exit.
    Always,
}

/// Restart policy: exponential back-off with jitter, reset after a clean
/// window, and an optional cap on restarts within a window (as systemd's
/// start limit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    #[serde(default)]
    pub policy: RestartMode,
    /// Delay before the first restart (default `1s`; `0s` restarts at once).
    #[serde(default = "default_initial_delay")]
    pub initial_delay: String,
    /// Each further restart waits this much longer (default 2).
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// The delay never grows past this (default `5m`).
    #[serde(default = "default_max_delay")]
    pub max_delay: String,
    /// A run this long counts as healthy: the next failure starts the
    /// back-off over (default `10m`).
    #[serde(default = "default_reset_after")]
    pub reset_after: String,
    /// Give up after this many restarts within `window` (0, the default:
    /// never give up).
    #[serde(default)]
    pub max_attempts: u32,
    /// The window `max_attempts` counts in (default `10m`).
    #[serde(default = "default_window")]
    pub window: String,
    /// Up to this fraction of each delay is added at random, so instances
    /// that crash together do not restart together (default 0.1).
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

fn default_initial_delay() -> String {
    "1s".into()
}
fn default_factor() -> f64 {
    2.0
}
fn default_max_delay() -> String {
    "5m".into()
}
fn default_reset_after() -> String {
    "10m".into()
}
fn default_window() -> String {
    "10m".into()
}
fn default_jitter() -> f64 {
    0.1
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            policy: RestartMode::default(),
            initial_delay: default_initial_delay(),
            factor: default_factor(),
            max_delay: default_max_delay(),
            reset_after: default_reset_after(),
            max_attempts: 0,
            window: default_window(),
            jitter: default_jitter(),
        }
    }
}

/// A policy with its durations parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    pub mode: RestartMode,
    pub initial: Duration,
    pub factor: f64,
    pub max: Duration,
    pub reset_after: Duration,
    pub max_attempts: u32,
    pub window: Duration,
    pub jitter: f64,
}

fn duration(field: &str, s: &str) -> Result<Duration, ApiError> {
    let d = parse_duration(s).map_err(|e| field_error(field, e))?;
    if d > Duration::from_secs(crate::limits::MAX_TTL_S) {
        return Err(field_error(field, "is longer than ten years"));
    }
    Ok(d)
}

impl RestartPolicy {
    /// Parses and checks every field; the error names the one at fault.
    pub fn backoff(&self) -> Result<Backoff, ApiError> {
        let b = Backoff {
            mode: self.policy,
            initial: duration("restart.initial_delay", &self.initial_delay)?,
            factor: self.factor,
            max: duration("restart.max_delay", &self.max_delay)?,
            reset_after: duration("restart.reset_after", &self.reset_after)?,
            max_attempts: self.max_attempts,
            window: duration("restart.window", &self.window)?,
            jitter: self.jitter,
        };
        if !(1.0..=100.0).contains(&b.factor) {
            return Err(field_error("restart.factor", format!("must be 1 to 100, not {}", b.factor)));
        }
        if !(0.0..=1.0).contains(&b.jitter) {
            return Err(field_error("restart.jitter", format!("must be 0 to 1, not {}", b.jitter)));
        }
        if b.max < b.initial {
            return Err(field_error("restart.max_delay", "must not be shorter than restart.initial_delay"));
        }
        if b.max_attempts > 0 && b.window.is_zero() {
            return Err(field_error("restart.window", "must be longer than 0 when restart.max_attempts is set"));
        }
        Ok(b)
    }
}

/// The restart history of one instance: what the back-off needs to decide,
/// kept across node restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RestartHistory {
    /// Restarts since the last healthy run (the back-off exponent).
    #[serde(default)]
    pub streak: u32,
    /// When each recent restart was decided (for `max_attempts` in `window`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent: Vec<Timestamp>,
    /// Every restart of this instance, for `show`.
    #[serde(default)]
    pub total: u64,
}

/// How a run ended, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// Exited with status 0.
    Success,
    /// Exited non-zero, was killed by a signal, or could not start.
    Failure,
}

/// What to do after a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start again after `delay`; this is restart number `attempt` of the streak.
    Restart { delay: Duration, attempt: u32 },
    /// Leave it `not-running`, for this reason.
    Stop { reason: String },
}

impl Backoff {
    /// Decides what follows a run that started at `started` and ended at
    /// `now` with `end`. `rand` in [0, 1) draws the jitter, so the result is
    /// a pure function of its inputs. Updates `history` when it restarts.
    pub fn decide(
        &self,
        end: RunEnd,
        started: Timestamp,
        now: Timestamp,
        history: &mut RestartHistory,
        rand: f64,
    ) -> Decision {
        match (self.mode, end) {
            (RestartMode::Never, RunEnd::Success) => return Decision::Stop { reason: "exited with status 0".into() },
            (RestartMode::Never, RunEnd::Failure) => {
                return Decision::Stop { reason: "failed, and its restart policy is never".into() };
            }
            (RestartMode::OnFailure, RunEnd::Success) => {
                return Decision::Stop { reason: "exited with status 0 (restart policy on-failure)".into() };
            }
            _ => {}
        }
        if started.until(now) >= self.reset_after {
            history.streak = 0;
        }
        let since = now.millis().saturating_sub(self.window.as_millis() as u64);
        history.recent.retain(|t| t.millis() > since);
        if self.max_attempts > 0 && history.recent.len() as u32 >= self.max_attempts {
            return Decision::Stop {
                reason: format!(
                    "restarted {} times within {}: giving up (restart.max_attempts)",
                    history.recent.len(),
                    crate::units::format_duration(self.window)
                ),
            };
        }
        let exp = self.factor.powi(history.streak.min(1000) as i32);
        let base = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let delay = base + base * self.jitter * rand.clamp(0.0, 1.0);
        history.streak += 1;
        history.total += 1;
        history.recent.push(now);
        Decision::Restart { delay: Duration::from_secs_f64(delay), attempt: history.streak }
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

/// Checks an app title.
pub fn validate_title(title: &str) -> Result<(), ApiError> {
    if title.len() > MAX_TITLE_LEN || !valid_segment(title) {
        return Err(field_error(
            "title",
            format!(
                "must be 1 to {MAX_TITLE_LEN} letters, digits, `-`, `_` or `.`, starting with a letter or digit, not {title:?}"
            ),
        ));
    }
    Ok(())
}

impl Envelope {
    /// Every check an envelope must pass before anything is written.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_title(&self.title)?;
        if let Some(b) = &self.binary {
            match (&b.url, &b.path) {
                (Some(u), None) => {
                    if !(u.starts_with("http://") || u.starts_with("https://")) {
                        return Err(field_error("binary.url", format!("must be an http or https URL, not {u:?}")));
                    }
                }
                (None, Some(p)) => {
                    if !p.starts_with('/') {
                        return Err(field_error("binary.path", format!("must be an absolute path, not {p:?}")));
                    }
                }
                _ => return Err(field_error("binary", "needs exactly one of url and path")),
            }
            if b.sha256.len() != 64 || !b.sha256.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
                return Err(field_error("binary.sha256", "must be 64 lower-case hex digits"));
            }
        }
        if self.command.is_empty() && self.binary.is_none() {
            return Err(field_error("command", "is needed when there is no binary"));
        }
        if self.command.first().is_some_and(|c| c.is_empty()) {
            return Err(field_error("command", "must name a program"));
        }
        if self.command.iter().chain(&self.args).any(|a| a.contains('\0')) {
            return Err(field_error("command", "has a NUL byte"));
        }
        validate_env("env", &self.env)?;
        if let Some(c) = &self.cwd
            && !c.starts_with('/')
        {
            return Err(field_error("cwd", format!("must be an absolute path, not {c:?}")));
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.ports {
            if *p == 0 {
                return Err(field_error("ports", "has port 0"));
            }
            if !seen.insert(p) {
                return Err(field_error("ports", format!("lists port {p} twice")));
            }
        }
        if self.ports.len() > 16 {
            return Err(field_error("ports", "has more than 16 ports"));
        }
        if !self.publish.is_empty() && self.ports.is_empty() {
            return Err(field_error("publish", "needs a port to publish: set ports"));
        }
        for n in &self.publish {
            let ok = !n.is_empty()
                && n.len() <= crate::names::MAX_NAME_BYTES
                && n.split('/').all(|seg| !seg.is_empty() && !seg.contains(['*', '?', '[', '\0']));
            if !ok {
                return Err(field_error("publish", format!("has a bad name {n:?}: use `/`-separated words")));
            }
        }
        self.resources()?;
        self.restart.backoff()?;
        self.stop_timeout()?;
        Ok(())
    }

    /// The sandbox limits, in bytes.
    pub fn resources(&self) -> Result<Resources, ApiError> {
        let r = Resources {
            cpus: self.resources.cpus,
            memory_bytes: self.resources.memory.as_ref().map(|m| m.bytes("resources.memory")).transpose()?,
            pids: self.resources.pids,
            disk_bytes: self.resources.disk.as_ref().map(|m| m.bytes("resources.disk")).transpose()?,
        };
        r.validate()?;
        Ok(r)
    }

    pub fn stop_timeout(&self) -> Result<Duration, ApiError> {
        match &self.stop_timeout {
            Some(s) => duration("stop_timeout", s),
            None => Ok(Duration::from_secs(10)),
        }
    }

    /// The image, `host` when unset.
    pub fn image(&self) -> &str {
        self.image.as_deref().unwrap_or("host")
    }
}

/// `POST /v1/apps` and `POST /v1/apps/{app}/{installation}/update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstallRequest {
    pub envelope: Envelope,
    /// Where the envelope came from (a file path or URL), kept beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// Query of `GET .../{instance}/logs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppLogsQuery {
    /// Keep streaming, across restarts, until the instance stops.
    #[serde(default)]
    pub follow: bool,
    /// The run before the current one (its output before the last restart).
    #[serde(default)]
    pub previous: bool,
}

/// An instance's state: the name of its state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    Launching,
    Running,
    Suspended,
    Dying,
    NotRunning,
    Updating,
    Deleted,
    /// Not a file: the node could not read this instance's state and left it alone.
    Quarantined,
}

impl InstanceState {
    pub const FILES: [InstanceState; 7] = [
        InstanceState::Launching,
        InstanceState::Running,
        InstanceState::Suspended,
        InstanceState::Dying,
        InstanceState::NotRunning,
        InstanceState::Updating,
        InstanceState::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Launching => "launching",
            InstanceState::Running => "running",
            InstanceState::Suspended => "suspended",
            InstanceState::Dying => "dying",
            InstanceState::NotRunning => "not-running",
            InstanceState::Updating => "updating",
            InstanceState::Deleted => "deleted",
            InstanceState::Quarantined => "quarantined",
        }
    }

    pub fn parse(s: &str) -> Option<InstanceState> {
        Self::FILES.into_iter().find(|x| x.as_str() == s)
    }

    /// A state some operation is still working through.
    pub fn is_transitional(self) -> bool {
        matches!(self, InstanceState::Launching | InstanceState::Dying | InstanceState::Updating)
    }
}

/// An installation's state: the name of its state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InstallationState {
    Active,
    Uninstalled,
}

impl InstallationState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstallationState::Active => "active",
            InstallationState::Uninstalled => "uninstalled",
        }
    }
}

/// A host port forwarded to an instance's port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortForward {
    /// The port inside the sandbox.
    pub port: u16,
    /// `HOST:PORT` on the node that reaches it.
    pub address: String,
}

/// One instance, as `app show` and `app ls` report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppInstance {
    /// `APP/INSTALLATION/INSTANCE`.
    pub address: String,
    pub app: String,
    pub installation: String,
    pub instance: String,
    pub state: InstanceState,
    /// The version it runs (pinned until it is restarted or updated).
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// The app's process in the sandbox, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// When the current run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortForward>,
    /// Names mounted at this instance's address right now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<String>,
    pub restarts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitStatus>,
    /// Why it is not serving right now (waiting to restart, gave up, launch failed…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When a waiting instance is started again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
}

/// One installation with its versions and instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppInstallation {
    /// `APP/INSTALLATION`.
    pub address: String,
    pub app: String,
    pub installation: String,
    pub state: InstallationState,
    pub current: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    pub versions: Vec<String>,
    pub envelope: Envelope,
    pub instances: Vec<AppInstance>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(toml_like: serde_json::Value) -> Result<(), ApiError> {
        let e: Envelope = serde_json::from_value(toml_like).map_err(|e| ApiError::invalid(e.to_string()))?;
        e.validate()
    }

    fn field(r: Result<(), ApiError>) -> String {
        r.expect_err("refused").details.and_then(|d| d["field"].as_str().map(str::to_string)).unwrap_or_default()
    }

    #[test]
    fn envelopes_are_checked_field_by_field() {
        let ok = serde_json::json!({"title": "hello-web", "command": ["python3", "-m", "http.server"], "ports": [8080],
            "publish": ["apps/hello"], "resources": {"memory": "256M", "pids": 128}});
        env(ok.clone()).expect("valid");
        let with = |k: &str, v: serde_json::Value| {
            let mut e = ok.clone();
            e[k] = v;
            e
        };
        assert_eq!(field(env(with("title", "../x".into()))), "title");
        assert_eq!(field(env(with("title", "a".repeat(41).into()))), "title");
        assert_eq!(field(env(with("command", serde_json::json!([])))), "command");
        assert_eq!(field(env(with("ports", serde_json::json!([8080, 8080])))), "ports");
        assert_eq!(field(env(with("publish", serde_json::json!(["/bad//name"])))), "publish");
        assert_eq!(field(env(with("resources", serde_json::json!({"memory": "lots"})))), "resources.memory");
        assert_eq!(field(env(with("restart", serde_json::json!({"initial_delay": "soon"})))), "restart.initial_delay");
        assert_eq!(field(env(with("restart", serde_json::json!({"factor": 0.5})))), "restart.factor");
        assert_eq!(
            field(env(with("binary", serde_json::json!({"url": "ftp://x", "sha256": "0".repeat(64)})))),
            "binary.url"
        );
        assert_eq!(field(env(with("binary", serde_json::json!({"path": "/bin/x", "sha256": "XY"})))), "binary.sha256");
        assert!(env(with("bogus", 1.into())).is_err(), "unknown keys are refused");
    }

    fn at(ms: u64) -> Timestamp {
        Timestamp(ms)
    }

    fn policy(mode: RestartMode) -> Backoff {
        RestartPolicy {
            policy: mode,
            initial_delay: "1s".into(),
            factor: 2.0,
            max_delay: "10s".into(),
            reset_after: "60s".into(),
            max_attempts: 0,
            window: "10m".into(),
            jitter: 0.0,
        }
        .backoff()
        .expect("valid")
    }

    /// A crash loop on an injected clock: each run lasts 100 ms, then waits
    /// the delay the policy chose. Returns the delays.
    fn crash_loop(b: &Backoff, runs: usize, end: RunEnd) -> (Vec<Duration>, Option<String>) {
        let mut h = RestartHistory::default();
        let mut now = 0u64;
        let mut delays = Vec::new();
        for _ in 0..runs {
            let started = now;
            now += 100;
            match b.decide(end, at(started), at(now), &mut h, 0.0) {
                Decision::Restart { delay, .. } => {
                    delays.push(delay);
                    now += delay.as_millis() as u64;
                }
                Decision::Stop { reason } => return (delays, Some(reason)),
            }
        }
        (delays, None)
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let (d, stop) = crash_loop(&policy(RestartMode::OnFailure), 7, RunEnd::Failure);
        let secs: Vec<u64> = d.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 10, 10, 10]);
        assert_eq!(stop, None);
        let (d, _) = crash_loop(&policy(RestartMode::Always), 3, RunEnd::Success);
        assert_eq!(d.iter().map(|d| d.as_secs()).collect::<Vec<_>>(), [1, 2, 4], "always restarts clean exits too");
    }

    #[test]
    fn never_and_on_failure_stop_when_they_should() {
        let (d, stop) = crash_loop(&policy(RestartMode::Never), 3, RunEnd::Failure);
        assert!(d.is_empty());
        assert!(stop.expect("stops").contains("never"));
        let (d, stop) = crash_loop(&policy(RestartMode::OnFailure), 3, RunEnd::Success);
        assert!(d.is_empty());
        assert!(stop.expect("stops").contains("status 0"));
    }

    #[test]
    fn a_healthy_run_resets_the_backoff() {
        let b = policy(RestartMode::OnFailure);
        let mut h = RestartHistory::default();
        for _ in 0..4 {
            b.decide(RunEnd::Failure, at(0), at(10), &mut h, 0.0);
        }
        assert_eq!(h.streak, 4);
        // Ran 60 s (reset_after): the next delay is the initial one again.
        let d = b.decide(RunEnd::Failure, at(100_000), at(160_000), &mut h, 0.0);
        assert_eq!(d, Decision::Restart { delay: Duration::from_secs(1), attempt: 1 });
        assert_eq!(h.total, 5);
    }

    #[test]
    fn max_attempts_in_a_window_gives_up_and_old_attempts_age_out() {
        let mut b = policy(RestartMode::Always);
        b.max_attempts = 3;
        b.window = Duration::from_secs(30);
        let (d, stop) = crash_loop(&b, 10, RunEnd::Failure);
        assert_eq!(d.len(), 3);
        assert!(stop.expect("gives up").contains("3 times within 30s"));
        // Restarts spread wider than the window never hit the cap.
        let mut h = RestartHistory::default();
        for i in 0..10u64 {
            let t = i * 31_000;
            assert!(matches!(b.decide(RunEnd::Failure, at(t), at(t + 10), &mut h, 0.0), Decision::Restart { .. }));
        }
    }

    #[test]
    fn jitter_adds_at_most_its_fraction() {
        let mut b = policy(RestartMode::Always);
        b.jitter = 0.5;
        let mut h = RestartHistory::default();
        let Decision::Restart { delay, .. } = b.decide(RunEnd::Failure, at(0), at(1), &mut h, 0.999) else {
            panic!("restarts")
        };
        assert!(delay >= Duration::from_secs(1) && delay < Duration::from_millis(1500), "{delay:?}");
    }
}
