//! Cgroups for sandboxes: one [`CgroupManager`] over cgroup v2, cgroup v1
//! (plus the hybrid v2 mount for `cgroup.kill`), or nothing at all.
//!
//! # Layout
//!
//! Every sandbox gets a group named by its id under our parent group:
//!
//! - v2: `<root>/<group>/<id>`; the memory, pids and cpu controllers are
//!   enabled in `<root>/cgroup.subtree_control` and
//!   `<root>/<group>/cgroup.subtree_control`.
//! - v1: `<root>/memory/<group>/<id>`, `<root>/pids/<group>/<id>`,
//!   `<root>/cpu/<group>/<id>` (each only if that hierarchy is mounted; `cpu`
//!   may be a symlink to `cpu,cpuacct`), and, when the hybrid v2 mount at
//!   `<root>/unified` supports `cgroup.kill`, `<root>/unified/<group>/<id>`
//!   too — it enforces nothing but lets us kill every member at once.
//!
//! # Detection
//!
//! [`CgroupManager::detect`] never fails. A root with `cgroup.controllers` is
//! v2; otherwise the v1 hierarchies are looked for. It creates the parent
//! group while detecting, so a read-only or unprivileged cgroup filesystem is
//! found out here and reported as [`Hierarchy::None`] with the reason. With
//! `None`, [`CgroupManager::create`] returns a no-op [`Cgroup`]: limits are
//! not enforced and the caller must kill its own processes.
//!
//! # Killing and removal
//!
//! [`Cgroup::kill`] writes `1` to `cgroup.kill` where there is one, and
//! otherwise calls the caller's killer for each member (this module has no
//! `unsafe`, so it cannot call `kill(2)` itself), repeating until the group
//! is empty or [`KILL_DEADLINE`] passes. Killed processes leave the group as
//! they exit, before they are reaped: on this machine's kernel (6.18) a
//! zombie is neither listed in `cgroup.procs` nor keeps `rmdir` from
//! succeeding. [`Cgroup::remove`] still retries `rmdir` while the kernel says
//! `EBUSY`, up to [`REMOVE_DEADLINE`].

use std::collections::BTreeSet;
use std::error::Error as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// CPU bandwidth period in microseconds, for `cpu.max` (v2) and
/// `cpu.cfs_period_us` (v1). 100 ms is the kernel default, so a quota of
/// `cpus * period` reads the same as Docker's `--cpus`.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The smallest quota the kernel accepts (1 ms); smaller `cpus` values are
/// rounded up to it rather than rejected by the kernel with `EINVAL`.
const CPU_MIN_QUOTA_US: u64 = 1_000;

/// Largest quota we write; the kernel caps quotas far below `u64::MAX`, and
/// anything this large means a caller bug rather than a real limit.
const CPU_MAX_QUOTA_US: f64 = u32::MAX as f64;

/// How long [`Cgroup::kill`] keeps killing before giving up. SIGKILL takes
/// effect within milliseconds unless a process is stuck in the kernel, so a
/// group still populated after a second is reported rather than waited on.
pub const KILL_DEADLINE: Duration = Duration::from_secs(1);

/// How long [`Cgroup::remove`] retries `rmdir` while the kernel reports the
/// group busy: it takes a moment after the last member exits to release it.
pub const REMOVE_DEADLINE: Duration = Duration::from_secs(2);

/// Interval between polls of `cgroup.procs` or retries of `rmdir`.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Longest id or group name we accept; a single path component must fit
/// `NAME_MAX`.
const MAX_NAME_LEN: usize = 255;

/// Resource limits for one sandbox. `None` means unlimited when creating a
/// group, and "leave as is" when updating one with [`Cgroup::set_limits`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Memory limit in bytes; swap is disabled for the group whenever it is
    /// set (where the kernel accounts swap).
    pub memory_bytes: Option<u64>,
    /// Maximum number of tasks (processes and threads).
    pub pids: Option<u64>,
    /// CPU bandwidth in CPUs, e.g. `0.5` or `2.0`.
    pub cpus: Option<f64>,
}

/// A resource controller we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
}

impl Controller {
    /// Every controller we use, in the order we report them.
    pub const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    /// The kernel's name for the controller (v2 token and v1 mount name).
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

/// Errors from cgroup operations; each names the step and the path.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid cgroup limit: {0}")]
    InvalidLimit(String),
    #[error("invalid pid {0} for cgroup.procs")]
    InvalidPid(i32),
    #[error("creating cgroup directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing cgroup directory {path}")]
    RemoveDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("killing cgroup {path}: processes {remaining:?} still present after {waited:?}")]
    KillTimeout { path: PathBuf, remaining: Vec<i32>, waited: Duration },
}

/// What detection found. Every path is our parent group's directory in that
/// hierarchy, `<root>/…/<group>`, which detection has created.
#[derive(Debug, Clone, PartialEq)]
pub enum Hierarchy {
    /// Unified cgroup v2.
    V2 {
        /// `<root>/<group>`.
        group_dir: PathBuf,
        /// The controllers enabled for our groups; a missing one means that
        /// limit is not enforced.
        controllers: Vec<Controller>,
        /// Whether `cgroup.kill` exists (kernel 5.14+).
        kill: bool,
    },
    /// cgroup v1, one hierarchy per controller; at least one is present.
    V1 {
        /// `<root>/memory/<group>`.
        memory: Option<PathBuf>,
        /// `<root>/pids/<group>`.
        pids: Option<PathBuf>,
        /// `<root>/cpu/<group>`.
        cpu: Option<PathBuf>,
        /// `<root>/unified/<group>` when the hybrid v2 mount has `cgroup.kill`.
        unified: Option<PathBuf>,
    },
    /// No usable cgroups: limits cannot be enforced.
    None { reason: String },
}

/// Creates and finds sandbox cgroups under one parent group.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    hierarchy: Hierarchy,
    /// What detection could not use, for [`CgroupManager::describe`].
    notes: Vec<String>,
}

impl CgroupManager {
    /// Detects what works under `root` (normally `/sys/fs/cgroup`) and
    /// creates the parent group `group` in each usable hierarchy. Never
    /// fails: an unusable setup becomes [`Hierarchy::None`] with a reason.
    pub fn detect(root: &Path, group: &str) -> CgroupManager {
        let mut notes = Vec::new();
        let hierarchy = match detect_hierarchy(root, group, &mut notes) {
            Ok(hierarchy) => hierarchy,
            Err(reason) => Hierarchy::None { reason },
        };
        let manager = CgroupManager { hierarchy, notes };
        tracing::debug!(cgroups = %manager.describe(), "detected cgroups");
        manager
    }

    /// What detection found.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// `"v2"`, `"v1"` or `"none"`.
    pub fn version(&self) -> &'static str {
        match self.hierarchy {
            Hierarchy::V2 { .. } => "v2",
            Hierarchy::V1 { .. } => "v1",
            Hierarchy::None { .. } => "none",
        }
    }

    /// A one-line human description, e.g.
    /// `v1 (memory, pids, cpu) + v2 kill at /sys/fs/cgroup/unified`, or the
    /// reason there are no cgroups.
    pub fn describe(&self) -> String {
        let mut text = match &self.hierarchy {
            Hierarchy::V2 { group_dir, controllers, kill } => {
                let names: Vec<&str> = controllers.iter().map(|c| c.name()).collect();
                let root = group_dir.parent().unwrap_or(group_dir);
                let kill = if *kill { " with cgroup.kill" } else { "" };
                format!("v2 ({}) at {}{kill}", names.join(", "), root.display())
            }
            Hierarchy::V1 { memory, pids, cpu, unified } => {
                let names: Vec<&str> = [(memory, "memory"), (pids, "pids"), (cpu, "cpu")]
                    .into_iter()
                    .filter(|(dir, _)| dir.is_some())
                    .map(|(_, name)| name)
                    .collect();
                let mut text = format!("v1 ({})", names.join(", "));
                if let Some(unified) = unified {
                    let mount = unified.parent().unwrap_or(unified);
                    text.push_str(&format!(" + v2 kill at {}", mount.display()));
                }
                text
            }
            Hierarchy::None { reason } => format!("none: {reason}"),
        };
        if !self.notes.is_empty() {
            text.push_str(&format!(" [{}]", self.notes.join("; ")));
        }
        text
    }

    /// Creates (or reuses) the group for sandbox `id` in every hierarchy and
    /// writes `limits`, with `None` fields reset to unlimited so a leftover
    /// group with the same id does not keep stale limits.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        validate_name(id)?;
        validate_limits(limits)?;
        let cgroup = self.open(id);
        let mut created = Vec::new();
        let result = cgroup
            .dirs()
            .iter()
            .try_for_each(|dir| {
                if make_dir(dir)? {
                    created.push(dir.to_path_buf());
                }
                Ok(())
            })
            .and_then(|()| cgroup.apply_limits(limits, true));
        if let Err(err) = result {
            // Leave no half-made group behind, but never remove one that
            // existed before this call: it may hold a running sandbox.
            for dir in created.iter().rev() {
                if let Err(rm) = fs::remove_dir(dir) {
                    tracing::warn!(path = %dir.display(), error = %rm, "cleaning up cgroup");
                }
            }
            return Err(err);
        }
        tracing::debug!(id, ?limits, "created cgroup");
        Ok(cgroup)
    }

    /// A handle to the group for sandbox `id`, which may not exist. An
    /// invalid id gives a handle whose operations all fail with
    /// [`CgroupError::InvalidName`].
    pub fn open(&self, id: &str) -> Cgroup {
        let layout = if let Err(CgroupError::InvalidName { reason, .. }) = validate_name(id) {
            Layout::Invalid { reason }
        } else {
            match &self.hierarchy {
                Hierarchy::V2 { group_dir, controllers, .. } => {
                    Layout::V2 { dir: group_dir.join(id), controllers: controllers.clone() }
                }
                Hierarchy::V1 { memory, pids, cpu, unified } => Layout::V1 {
                    memory: memory.as_ref().map(|d| d.join(id)),
                    pids: pids.as_ref().map(|d| d.join(id)),
                    cpu: cpu.as_ref().map(|d| d.join(id)),
                    unified: unified.as_ref().map(|d| d.join(id)),
                },
                Hierarchy::None { .. } => Layout::Noop,
            }
        };
        Cgroup { id: id.to_owned(), layout }
    }

    /// Ids of the groups under our parent group in any hierarchy, sorted;
    /// used to find groups left behind by a crash.
    /// Removes our (empty) parent group from every hierarchy: called when
    /// the node shuts down, so that nodes that come and go (tests, `dev`)
    /// leave nothing behind. A group that still has members stays.
    pub fn remove_group(&self) {
        let dirs: Vec<&PathBuf> = match &self.hierarchy {
            Hierarchy::V2 { group_dir, .. } => vec![group_dir],
            Hierarchy::V1 { memory, pids, cpu, unified } => {
                [memory, pids, cpu, unified].into_iter().flatten().collect()
            }
            Hierarchy::None { .. } => vec![],
        };
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }

    pub fn list(&self) -> Vec<String> {
        let mut ids = BTreeSet::new();
        for dir in self.group_dirs() {
            for child in child_dirs(dir) {
                if let Some(name) = child.file_name().and_then(|n| n.to_str()) {
                    ids.insert(name.to_owned());
                }
            }
        }
        ids.into_iter().collect()
    }

    /// The parent group's directory in each hierarchy.
    fn group_dirs(&self) -> Vec<&Path> {
        match &self.hierarchy {
            Hierarchy::V2 { group_dir, .. } => vec![group_dir.as_path()],
            Hierarchy::V1 { memory, pids, cpu, unified } => {
                [memory, pids, cpu, unified].into_iter().flatten().map(PathBuf::as_path).collect()
            }
            Hierarchy::None { .. } => Vec::new(),
        }
    }
}

/// One sandbox's group, in every hierarchy the manager uses.
#[derive(Debug, Clone)]
pub struct Cgroup {
    id: String,
    layout: Layout,
}

#[derive(Debug, Clone)]
enum Layout {
    V2 {
        dir: PathBuf,
        controllers: Vec<Controller>,
    },
    V1 {
        memory: Option<PathBuf>,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
        unified: Option<PathBuf>,
    },
    /// No cgroups on this host: every operation succeeds and does nothing.
    Noop,
    /// Opened with an invalid id: every fallible operation fails.
    Invalid {
        reason: &'static str,
    },
}

impl Cgroup {
    /// The sandbox id this group is named after.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// False when there are no cgroups and this handle does nothing.
    pub fn is_enforced(&self) -> bool {
        matches!(self.layout, Layout::V2 { .. } | Layout::V1 { .. })
    }

    /// The group's directories, primary hierarchy first.
    pub fn paths(&self) -> Vec<&Path> {
        self.dirs()
    }

    /// Moves process `pid` (with all its threads) into the group in every
    /// hierarchy.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        self.check_valid()?;
        // Writing 0 would move the calling process itself.
        if pid <= 0 {
            return Err(CgroupError::InvalidPid(pid));
        }
        let value = pid.to_string();
        for dir in self.dirs() {
            write_file(&dir.join("cgroup.procs"), &value)?;
        }
        Ok(())
    }

    /// Updates the limits of a live group; `None` fields are left alone.
    pub fn set_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        self.check_valid()?;
        validate_limits(limits)?;
        self.apply_limits(limits, false)
    }

    /// The group's member processes (including any in nested groups), from
    /// the primary hierarchy. Empty if the group does not exist.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = BTreeSet::new();
        if let Some(dir) = self.dirs().first() {
            collect_members(dir, &mut pids);
        }
        pids.into_iter().collect()
    }

    /// The peak memory use in bytes, where the kernel records it
    /// (`memory.peak` on v2 since 5.19, `memory.max_usage_in_bytes` on v1).
    pub fn memory_peak(&self) -> Option<u64> {
        let file = match &self.layout {
            Layout::V2 { dir, controllers } if controllers.contains(&Controller::Memory) => dir.join("memory.peak"),
            Layout::V1 { memory: Some(dir), .. } => dir.join("memory.max_usage_in_bytes"),
            _ => return None,
        };
        fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// Kills every member. Uses `cgroup.kill` where the kernel has it; any
    /// member it cannot reach (or every member, on v1 without the hybrid
    /// mount) is passed to `killer`, which should send SIGKILL and ignore
    /// `ESRCH`. Repeats until the group is empty or [`KILL_DEADLINE`]
    /// passes; `killer` may be called more than once for a pid. Succeeds on
    /// a group that does not exist, and does nothing on a no-op group (the
    /// caller must kill its own processes there).
    pub fn kill(&self, mut killer: impl FnMut(i32)) -> Result<(), CgroupError> {
        self.check_valid()?;
        if !self.is_enforced() {
            return Ok(());
        }
        let start = Instant::now();
        let kill_dir = self.kill_dir();
        loop {
            let mut all = BTreeSet::new();
            for dir in self.dirs() {
                collect_members(dir, &mut all);
            }
            if all.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= KILL_DEADLINE {
                return Err(CgroupError::KillTimeout {
                    path: self.primary_dir().to_path_buf(),
                    remaining: all.into_iter().collect(),
                    waited: start.elapsed(),
                });
            }
            let mut reachable = BTreeSet::new();
            if let Some(dir) = kill_dir {
                // Repeated each round so members forked meanwhile die too.
                write_file(&dir.join("cgroup.kill"), "1")?;
                collect_members(dir, &mut reachable);
            }
            for pid in all.difference(&reachable) {
                killer(*pid);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Removes the group's directories (and any nested groups) in every
    /// hierarchy, retrying while the kernel reports them busy, up to
    /// [`REMOVE_DEADLINE`]. Directories already gone are fine. Kill the
    /// members first: a populated group stays busy.
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.check_valid()?;
        let deadline = Instant::now() + REMOVE_DEADLINE;
        let mut first_error = None;
        // Try every hierarchy even if one fails, so as little as possible is
        // left behind for the orphan reaper.
        for dir in self.dirs() {
            if let Err(err) = remove_tree(dir, deadline) {
                tracing::warn!(path = %dir.display(), error = %err, "removing cgroup");
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn check_valid(&self) -> Result<(), CgroupError> {
        match self.layout {
            Layout::Invalid { reason } => Err(CgroupError::InvalidName { name: self.id.clone(), reason }),
            Layout::V2 { .. } | Layout::V1 { .. } | Layout::Noop => Ok(()),
        }
    }

    /// Directories, primary first: on v1 pids (which counts every task),
    /// then memory, cpu and the unified kill group.
    fn dirs(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::V2 { dir, .. } => vec![dir.as_path()],
            Layout::V1 { memory, pids, cpu, unified } => {
                [pids, memory, cpu, unified].into_iter().flatten().map(PathBuf::as_path).collect()
            }
            Layout::Noop | Layout::Invalid { .. } => Vec::new(),
        }
    }

    fn primary_dir(&self) -> &Path {
        self.dirs().first().copied().unwrap_or_else(|| Path::new(""))
    }

    /// The directory whose `cgroup.kill` kills the whole group, if any.
    fn kill_dir(&self) -> Option<&Path> {
        let dir = match &self.layout {
            Layout::V2 { dir, .. } => dir,
            Layout::V1 { unified: Some(dir), .. } => dir,
            _ => return None,
        };
        dir.join("cgroup.kill").exists().then_some(dir.as_path())
    }

    /// Writes `limits`; `None` fields become unlimited if `reset`, else are
    /// skipped.
    fn apply_limits(&self, limits: &Limits, reset: bool) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V2 { dir, controllers } => apply_v2(dir, controllers, limits, reset),
            Layout::V1 { memory, pids, cpu, .. } => {
                apply_v1(memory.as_deref(), pids.as_deref(), cpu.as_deref(), limits, reset)
            }
            Layout::Noop => {
                if limits != &Limits::default() {
                    tracing::warn!(id = %self.id, "no cgroups: limits are not enforced");
                }
                Ok(())
            }
            Layout::Invalid { reason } => Err(CgroupError::InvalidName { name: self.id.clone(), reason }),
        }
    }
}

fn apply_v2(dir: &Path, controllers: &[Controller], limits: &Limits, reset: bool) -> Result<(), CgroupError> {
    let has = |c: Controller| controllers.contains(&c);
    if has(Controller::Memory) {
        if let Some(value) = limit_value(limits.memory_bytes, reset, |b| b.to_string(), "max") {
            write_file(&dir.join("memory.max"), &value)?;
            // No swap: a memory limit the sandbox can escape into swap is
            // not a limit.
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                let swap_value = if limits.memory_bytes.is_some() { "0" } else { "max" };
                write_file(&swap, swap_value)?;
            }
        }
    } else {
        warn_unenforced(limits.memory_bytes.is_some(), Controller::Memory);
    }
    if has(Controller::Pids) {
        if let Some(value) = limit_value(limits.pids, reset, |n| n.to_string(), "max") {
            write_file(&dir.join("pids.max"), &value)?;
        }
    } else {
        warn_unenforced(limits.pids.is_some(), Controller::Pids);
    }
    if has(Controller::Cpu) {
        let quota = limits.cpus.map(cpu_quota_us);
        if let Some(quota) = limit_value(quota, reset, |q| q.to_string(), "max") {
            write_file(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        }
    } else {
        warn_unenforced(limits.cpus.is_some(), Controller::Cpu);
    }
    Ok(())
}

fn apply_v1(
    memory: Option<&Path>,
    pids: Option<&Path>,
    cpu: Option<&Path>,
    limits: &Limits,
    reset: bool,
) -> Result<(), CgroupError> {
    match memory {
        Some(dir) => {
            if let Some(value) = limit_value(limits.memory_bytes, reset, |b| b.to_string(), "-1") {
                // memory+swap must never be below memory alone, so write it
                // on both sides of memory: the first write fails when
                // lowering (ignored), the second when raising cannot.
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                let has_memsw = memsw.exists();
                if has_memsw {
                    write_ignoring_einval(&memsw, &value)?;
                }
                write_file(&dir.join("memory.limit_in_bytes"), &value)?;
                if has_memsw {
                    write_ignoring_einval(&memsw, &value)?;
                }
            }
        }
        None => warn_unenforced(limits.memory_bytes.is_some(), Controller::Memory),
    }
    match pids {
        Some(dir) => {
            if let Some(value) = limit_value(limits.pids, reset, |n| n.to_string(), "max") {
                write_file(&dir.join("pids.max"), &value)?;
            }
        }
        None => warn_unenforced(limits.pids.is_some(), Controller::Pids),
    }
    match cpu {
        Some(dir) => {
            let quota = limits.cpus.map(cpu_quota_us);
            if let Some(value) = limit_value(quota, reset, |q| q.to_string(), "-1") {
                write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write_file(&dir.join("cpu.cfs_quota_us"), &value)?;
            }
        }
        None => warn_unenforced(limits.cpus.is_some(), Controller::Cpu),
    }
    Ok(())
}

/// The value to write for one limit: the limit itself, `unlimited` when
/// resetting an unset limit, or nothing to write.
fn limit_value<T>(limit: Option<T>, reset: bool, render: impl Fn(T) -> String, unlimited: &str) -> Option<String> {
    match limit {
        Some(value) => Some(render(value)),
        None if reset => Some(unlimited.to_owned()),
        None => None,
    }
}

fn warn_unenforced(requested: bool, controller: Controller) {
    if requested {
        tracing::warn!(controller = controller.name(), "controller unavailable: limit not enforced");
    }
}

/// `cpus` as a quota per [`CPU_PERIOD_US`]; `cpus` is validated already.
fn cpu_quota_us(cpus: f64) -> u64 {
    // Saturating float-to-int cast; validate_limits bounds the value.
    let quota = (cpus * CPU_PERIOD_US as f64).ceil() as u64;
    quota.max(CPU_MIN_QUOTA_US)
}

fn validate_limits(limits: &Limits) -> Result<(), CgroupError> {
    if limits.memory_bytes == Some(0) {
        return Err(CgroupError::InvalidLimit("memory_bytes must be above 0".into()));
    }
    if limits.pids == Some(0) {
        return Err(CgroupError::InvalidLimit("pids must be above 0".into()));
    }
    if let Some(cpus) = limits.cpus
        && (!cpus.is_finite() || cpus <= 0.0 || cpus * CPU_PERIOD_US as f64 > CPU_MAX_QUOTA_US)
    {
        return Err(CgroupError::InvalidLimit(format!("cpus must be a positive number of CPUs, got {cpus}")));
    }
    Ok(())
}

/// Ids and the group name become single path components under
/// `/sys/fs/cgroup`, next to control files such as `memory.max`, so only a
/// plain, conservative alphabet is accepted.
fn validate_name(name: &str) -> Result<(), CgroupError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("longer than 255 bytes")
    } else if name.starts_with('.') {
        Some("starts with '.'")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        Some("only ASCII letters, digits, '-', '_' and '.' are allowed")
    } else if Controller::ALL.iter().any(|c| name.starts_with(&format!("{}.", c.name()))) || name.starts_with("cgroup.")
    {
        Some("looks like a cgroup control file")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CgroupError::InvalidName { name: name.to_owned(), reason }),
        None => Ok(()),
    }
}

fn detect_hierarchy(root: &Path, group: &str, notes: &mut Vec<String>) -> Result<Hierarchy, String> {
    validate_name(group).map_err(|err| error_chain(&err))?;
    if !root.is_dir() {
        return Err(format!("no cgroup filesystem at {}", root.display()));
    }
    let controllers_file = root.join("cgroup.controllers");
    if controllers_file.exists() {
        detect_v2(root, group, &controllers_file, notes)
    } else {
        detect_v1(root, group, notes)
    }
}

fn detect_v2(root: &Path, group: &str, controllers_file: &Path, notes: &mut Vec<String>) -> Result<Hierarchy, String> {
    let listed = read_file(controllers_file).map_err(|err| error_chain(&err))?;
    let listed: Vec<&str> = listed.split_whitespace().collect();
    let mut controllers = Vec::new();
    for controller in Controller::ALL {
        if listed.contains(&controller.name()) {
            controllers.push(controller);
        } else {
            notes.push(format!("no {0} controller: {0} limits not enforced", controller.name()));
        }
    }
    if controllers.is_empty() {
        notes.clear();
        return Err(format!(
            "cgroup v2 at {} offers none of memory, pids, cpu (cgroup.controllers: {:?})",
            root.display(),
            listed.join(" ")
        ));
    }
    let group_dir = root.join(group);
    enable_controllers(&root.join("cgroup.subtree_control"), &controllers)
        .and_then(|()| make_dir(&group_dir))
        .and_then(|_| enable_controllers(&group_dir.join("cgroup.subtree_control"), &controllers))
        .map_err(|err| error_chain(&err))?;
    let kill = group_dir.join("cgroup.kill").exists();
    if !kill {
        notes.push("no cgroup.kill: members are killed one by one".into());
    }
    Ok(Hierarchy::V2 { group_dir, controllers, kill })
}

/// Adds `controllers` to a `cgroup.subtree_control` unless already there.
/// The write is skipped when nothing is missing because it fails with
/// `EBUSY` in a non-root group that has member processes of its own.
fn enable_controllers(file: &Path, controllers: &[Controller]) -> Result<(), CgroupError> {
    let current = match fs::read_to_string(file) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(CgroupError::Read { path: file.to_path_buf(), source });
        }
    };
    let enabled: Vec<&str> = current.split_whitespace().collect();
    let missing: Vec<String> =
        controllers.iter().filter(|c| !enabled.contains(&c.name())).map(|c| format!("+{}", c.name())).collect();
    if missing.is_empty() {
        return Ok(());
    }
    write_file(file, &missing.join(" "))
}

fn detect_v1(root: &Path, group: &str, notes: &mut Vec<String>) -> Result<Hierarchy, String> {
    let mut found: [Option<PathBuf>; 3] = [None, None, None];
    for (slot, controller) in found.iter_mut().zip(Controller::ALL) {
        let name = controller.name();
        // `is_file`/`is_dir` follow symlinks, so `cpu -> cpu,cpuacct` works.
        let hierarchy = root.join(name);
        if !hierarchy.join("cgroup.procs").is_file() {
            notes.push(format!("no v1 {name} hierarchy: {name} limits not enforced"));
            continue;
        }
        // Without CONFIG_CFS_BANDWIDTH the cpu hierarchy has no quota file.
        if controller == Controller::Cpu && !hierarchy.join("cpu.cfs_quota_us").is_file() {
            notes.push("v1 cpu hierarchy has no cpu.cfs_quota_us: cpu limits not enforced".into());
            continue;
        }
        let group_dir = hierarchy.join(group);
        match make_dir(&group_dir) {
            Ok(_) => *slot = Some(group_dir),
            Err(err) => notes.push(format!("v1 {name} unusable: {}", error_chain(&err))),
        }
    }
    let [memory, pids, cpu] = found;
    if memory.is_none() && pids.is_none() && cpu.is_none() {
        let reason = format!(
            "no cgroup.controllers at {} and no usable v1 memory, pids or cpu hierarchy ({})",
            root.display(),
            notes.join("; ")
        );
        notes.clear();
        return Err(reason);
    }
    let unified = detect_unified_kill(root, group, notes);
    Ok(Hierarchy::V1 { memory, pids, cpu, unified })
}

/// The hybrid layout's v2 mount at `<root>/unified` enforces nothing, but a
/// group there has `cgroup.kill` (kernel 5.14+), which kills every member at
/// once — including ones forked while we kill.
fn detect_unified_kill(root: &Path, group: &str, notes: &mut Vec<String>) -> Option<PathBuf> {
    let mount = root.join("unified");
    if !mount.join("cgroup.controllers").is_file() {
        return None;
    }
    let group_dir = mount.join(group);
    let created = match make_dir(&group_dir) {
        Ok(created) => created,
        Err(err) => {
            notes.push(format!("hybrid v2 mount unusable: {}", error_chain(&err)));
            return None;
        }
    };
    if group_dir.join("cgroup.kill").exists() {
        return Some(group_dir);
    }
    notes.push(format!("no cgroup.kill in {}: members are killed one by one", mount.display()));
    if created {
        // Best effort: the group is useless to us without cgroup.kill.
        let _ = fs::remove_dir(&group_dir);
    }
    None
}

/// Creates a directory; returns whether it was created (false if it was
/// already there).
fn make_dir(path: &Path) -> Result<bool, CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(false),
        Err(source) => Err(CgroupError::CreateDir { path: path.to_path_buf(), source }),
    }
}

/// Writes `value` in one `write(2)`, as cgroup files expect. Creates the
/// file if missing, which cgroupfs refuses but a fake root in a test allows.
fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_owned(),
        source,
    })
}

fn write_ignoring_einval(path: &Path, value: &str) -> Result<(), CgroupError> {
    match write_file(path, value) {
        Err(CgroupError::Write { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

fn read_file(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.to_path_buf(), source })
}

/// Adds the pids in `dir/cgroup.procs` and in every nested group's. A
/// missing group has no members; a line that is not a pid is skipped.
fn collect_members(dir: &Path, pids: &mut BTreeSet<i32>) {
    match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(text) => pids.extend(text.split_whitespace().filter_map(|s| s.parse::<i32>().ok())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => {
            tracing::warn!(path = %dir.display(), error = %err, "reading cgroup.procs");
        }
    }
    for child in child_dirs(dir) {
        collect_members(&child, pids);
    }
}

/// Subdirectories of `dir` (nested groups); none if it cannot be read. Does
/// not follow symlinks, which cgroupfs never has below a hierarchy root.
fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| entry.path())
        .collect()
}

/// Removes a group and its nested groups, deepest first, retrying on
/// `EBUSY` until `deadline`.
fn remove_tree(dir: &Path, deadline: Instant) -> Result<(), CgroupError> {
    for child in child_dirs(dir) {
        remove_tree(&child, deadline)?;
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(POLL_INTERVAL);
            }
            Err(source) => {
                return Err(CgroupError::RemoveDir { path: dir.to_path_buf(), source });
            }
        }
    }
}

/// An error and its causes on one line, for detection reasons.
fn error_chain(err: &CgroupError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    const MIB: u64 = 1024 * 1024;

    fn touch(path: &Path, content: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display())).trim().to_owned()
    }

    /// Removes the regular files a fake root accumulates, so `rmdir` can
    /// work as it does on cgroupfs, where control files never block it.
    fn clear_files(dir: &Path) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                fs::remove_file(entry.path()).unwrap();
            }
        }
    }

    fn fake_v2(controllers: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        touch(&root.path().join("cgroup.controllers"), controllers);
        touch(&root.path().join("cgroup.subtree_control"), "");
        touch(&root.path().join("cgroup.procs"), "1\n");
        root
    }

    #[test]
    fn fake_v2_creates_group_and_writes_limits() {
        let root = fake_v2("cpuset cpu io memory hugetlb pids rdma misc\n");
        let r = root.path();
        // Pretend the kernel supports cgroup.kill and swap accounting.
        touch(&r.join("flotilla/cgroup.kill"), "");
        let manager = CgroupManager::detect(r, "flotilla");
        assert_eq!(manager.version(), "v2", "{}", manager.describe());
        assert_eq!(manager.describe(), format!("v2 (memory, pids, cpu) at {} with cgroup.kill", r.display()));
        assert_eq!(read(&r.join("cgroup.subtree_control")), "+memory +pids +cpu");
        assert_eq!(read(&r.join("flotilla/cgroup.subtree_control")), "+memory +pids +cpu");

        touch(&r.join("flotilla/sb1/memory.swap.max"), "max");
        let limits = Limits { memory_bytes: Some(64 * MIB), pids: Some(20), cpus: Some(1.5) };
        let cg = manager.create("sb1", &limits).unwrap();
        let dir = r.join("flotilla/sb1");
        assert_eq!(cg.paths(), vec![dir.as_path()]);
        assert_eq!(read(&dir.join("memory.max")), "67108864");
        assert_eq!(read(&dir.join("memory.swap.max")), "0");
        assert_eq!(read(&dir.join("pids.max")), "20");
        assert_eq!(read(&dir.join("cpu.max")), "150000 100000");

        // Idempotent, and unset limits are reset to unlimited.
        let cg = manager.create("sb1", &Limits::default()).unwrap();
        assert_eq!(read(&dir.join("memory.max")), "max");
        assert_eq!(read(&dir.join("memory.swap.max")), "max");
        assert_eq!(read(&dir.join("pids.max")), "max");
        assert_eq!(read(&dir.join("cpu.max")), "max 100000");

        // A live update leaves unset fields alone.
        cg.set_limits(&Limits { pids: Some(7), ..Limits::default() }).unwrap();
        assert_eq!(read(&dir.join("pids.max")), "7");
        assert_eq!(read(&dir.join("memory.max")), "max");

        cg.add_pid(4242).unwrap();
        assert_eq!(read(&dir.join("cgroup.procs")), "4242");
        assert_eq!(cg.pids(), vec![4242]);
        assert_eq!(manager.list(), vec!["sb1".to_owned()]);

        // Kill goes through cgroup.kill; the fake kernel never empties the
        // group, so it times out and names what is left.
        touch(&dir.join("cgroup.kill"), "");
        let mut killed = Vec::new();
        let err = cg.kill(|pid| killed.push(pid)).unwrap_err();
        assert!(matches!(err, CgroupError::KillTimeout { ref remaining, .. } if remaining == &[4242]));
        assert_eq!(read(&dir.join("cgroup.kill")), "1");
        assert!(killed.is_empty(), "cgroup.kill reached every member");

        // A fake directory holds regular files, which cgroupfs rmdir ignores.
        assert!(matches!(cg.remove(), Err(CgroupError::RemoveDir { .. })));
        clear_files(&dir);
        cg.remove().unwrap();
        assert!(!dir.exists());
        cg.remove().unwrap();
        assert!(manager.list().is_empty());
    }

    #[test]
    fn fake_v2_without_cpu_controller_notes_it() {
        let root = fake_v2("memory pids");
        let manager = CgroupManager::detect(root.path(), "flotilla");
        assert_eq!(manager.version(), "v2");
        let text = manager.describe();
        assert!(text.starts_with("v2 (memory, pids) at "), "{text}");
        assert!(text.contains("no cpu controller"), "{text}");
        assert!(text.contains("no cgroup.kill"), "{text}");
        let cg = manager.create("sb", &Limits { cpus: Some(1.0), ..Limits::default() }).unwrap();
        assert!(!cg.paths()[0].join("cpu.max").exists());
        assert_eq!(read(&cg.paths()[0].join("memory.max")), "max");
    }

    #[test]
    fn fake_v2_skips_subtree_write_when_enabled() {
        let root = fake_v2("memory pids cpu");
        touch(&root.path().join("cgroup.subtree_control"), "cpu memory pids\n");
        CgroupManager::detect(root.path(), "flotilla");
        assert_eq!(read(&root.path().join("cgroup.subtree_control")), "cpu memory pids");
    }

    #[test]
    fn fake_v2_without_controllers_is_none() {
        let root = fake_v2("io rdma");
        let manager = CgroupManager::detect(root.path(), "flotilla");
        assert_eq!(manager.version(), "none");
        assert!(manager.describe().contains("offers none of memory, pids, cpu"));
    }

    fn fake_v1(with_unified_kill: bool) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for name in ["memory", "pids", "cpu,cpuacct", "freezer", "unified"] {
            touch(&r.join(name).join("cgroup.procs"), "1\n");
        }
        touch(&r.join("memory/memory.limit_in_bytes"), "9223372036854771712");
        touch(&r.join("cpu,cpuacct/cpu.cfs_quota_us"), "-1");
        std::os::unix::fs::symlink("cpu,cpuacct", r.join("cpu")).unwrap();
        touch(&r.join("unified/cgroup.controllers"), "");
        if with_unified_kill {
            touch(&r.join("unified/flotilla/cgroup.kill"), "");
        }
        root
    }

    #[test]
    fn fake_v1_creates_group_in_each_hierarchy() {
        let root = fake_v1(true);
        let r = root.path();
        let manager = CgroupManager::detect(r, "flotilla");
        assert_eq!(manager.version(), "v1");
        assert_eq!(manager.describe(), format!("v1 (memory, pids, cpu) + v2 kill at {}", r.join("unified").display()));

        touch(&r.join("memory/flotilla/sb1/memory.memsw.limit_in_bytes"), "-1");
        let limits = Limits { memory_bytes: Some(64 * MIB), pids: Some(20), cpus: Some(0.25) };
        let cg = manager.create("sb1", &limits).unwrap();
        let mem = r.join("memory/flotilla/sb1");
        let pids = r.join("pids/flotilla/sb1");
        let cpu = r.join("cpu,cpuacct/flotilla/sb1");
        let unified = r.join("unified/flotilla/sb1");
        assert_eq!(read(&mem.join("memory.limit_in_bytes")), "67108864");
        assert_eq!(read(&mem.join("memory.memsw.limit_in_bytes")), "67108864");
        assert_eq!(read(&pids.join("pids.max")), "20");
        assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "25000");

        let cg2 = manager.open("sb1");
        cg2.set_limits(&Limits { memory_bytes: Some(32 * MIB), cpus: Some(0.000_001), ..Limits::default() }).unwrap();
        assert_eq!(read(&mem.join("memory.limit_in_bytes")), "33554432");
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "1000", "kernel minimum");
        assert_eq!(read(&pids.join("pids.max")), "20");

        manager.create("sb1", &Limits::default()).unwrap();
        assert_eq!(read(&mem.join("memory.limit_in_bytes")), "-1");
        assert_eq!(read(&mem.join("memory.memsw.limit_in_bytes")), "-1");
        assert_eq!(read(&pids.join("pids.max")), "max");
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "-1");

        cg.add_pid(77).unwrap();
        for dir in [&mem, &pids, &cpu, &unified] {
            assert_eq!(read(&dir.join("cgroup.procs")), "77", "{}", dir.display());
        }
        assert_eq!(cg.pids(), vec![77]);
        assert!(!r.join("freezer/flotilla").exists());

        manager.create("sb2", &Limits::default()).unwrap();
        assert_eq!(manager.list(), vec!["sb1".to_owned(), "sb2".to_owned()]);

        for dir in [&mem, &pids, &cpu, &unified] {
            clear_files(dir);
        }
        cg.remove().unwrap();
        for dir in [&mem, &pids, &cpu, &unified] {
            assert!(!dir.exists(), "{}", dir.display());
        }
        assert_eq!(manager.list(), vec!["sb2".to_owned()]);
    }

    #[test]
    fn fake_v1_without_cgroup_kill_calls_killer() {
        let root = fake_v1(false);
        let r = root.path();
        let manager = CgroupManager::detect(r, "flotilla");
        let text = manager.describe();
        assert!(text.starts_with("v1 (memory, pids, cpu) ["), "{text}");
        assert!(text.contains("no cgroup.kill"), "{text}");
        assert!(!r.join("unified/flotilla").exists());

        let cg = manager.create("sb", &Limits::default()).unwrap();
        cg.add_pid(99).unwrap();
        // The fake killer "kills" by emptying cgroup.procs everywhere.
        let mut calls = Vec::new();
        cg.kill(|pid| {
            calls.push(pid);
            for dir in cg.paths() {
                fs::write(dir.join("cgroup.procs"), "").unwrap();
            }
        })
        .unwrap();
        assert_eq!(calls, vec![99]);
        assert!(cg.pids().is_empty());
    }

    #[test]
    fn fake_none_layouts() {
        let empty = tempfile::tempdir().unwrap();
        let manager = CgroupManager::detect(empty.path(), "flotilla");
        assert_eq!(manager.version(), "none");
        assert!(matches!(manager.hierarchy(), Hierarchy::None { .. }));
        let text = manager.describe();
        assert!(text.starts_with("none: no cgroup.controllers at"), "{text}");

        let missing = empty.path().join("nope");
        let manager = CgroupManager::detect(&missing, "flotilla");
        assert_eq!(manager.describe(), format!("none: no cgroup filesystem at {}", missing.display()));

        // No-op handles: nothing is enforced and nothing fails.
        let cg = manager.create("sb", &Limits { pids: Some(5), ..Limits::default() }).unwrap();
        assert!(!cg.is_enforced());
        cg.add_pid(1234).unwrap();
        assert!(cg.pids().is_empty());
        cg.kill(|_| panic!("nothing to kill")).unwrap();
        cg.remove().unwrap();
        assert!(manager.list().is_empty());
        assert_eq!(cg.memory_peak(), None);
    }

    #[test]
    fn rejects_bad_names_and_limits() {
        let root = fake_v2("memory pids cpu");
        let manager = CgroupManager::detect(root.path(), "flotilla");
        for id in ["", ".", "..", "a/b", "../x", "memory.max", "cgroup.procs", "a b"] {
            assert!(matches!(manager.create(id, &Limits::default()), Err(CgroupError::InvalidName { .. })), "{id:?}");
            let cg = manager.open(id);
            assert!(cg.remove().is_err(), "{id:?}");
            assert!(cg.kill(|_| {}).is_err(), "{id:?}");
        }
        for limits in [
            Limits { cpus: Some(0.0), ..Limits::default() },
            Limits { cpus: Some(f64::NAN), ..Limits::default() },
            Limits { cpus: Some(1e12), ..Limits::default() },
            Limits { memory_bytes: Some(0), ..Limits::default() },
            Limits { pids: Some(0), ..Limits::default() },
        ] {
            assert!(matches!(manager.create("sb", &limits), Err(CgroupError::InvalidLimit(_))), "{limits:?}");
        }
        assert!(!root.path().join("flotilla/sb").exists());
        let cg = manager.create("sb", &Limits::default()).unwrap();
        assert!(matches!(cg.add_pid(0), Err(CgroupError::InvalidPid(0))));
        let bad_group = CgroupManager::detect(root.path(), "../etc");
        assert_eq!(bad_group.version(), "none");
    }

    #[test]
    fn odd_procs_content_is_skipped() {
        let root = fake_v2("pids");
        let manager = CgroupManager::detect(root.path(), "flotilla");
        let cg = manager.create("sb", &Limits::default()).unwrap();
        fs::write(cg.paths()[0].join("cgroup.procs"), "12\nnot-a-pid\n\n-\n34\n").unwrap();
        assert_eq!(cg.pids(), vec![12, 34]);
        fs::write(cg.paths()[0].join("memory.peak"), "garbage").unwrap();
        assert_eq!(cg.memory_peak(), None);
    }

    /// Kills the child and removes the test's groups even when an assertion
    /// fails halfway.
    struct RealGuard {
        manager: CgroupManager,
        cgroup: Option<Cgroup>,
        child: Option<Child>,
    }

    impl Drop for RealGuard {
        fn drop(&mut self) {
            if let Some(child) = self.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if let Some(cgroup) = &self.cgroup {
                let _ = cgroup.kill(kill_with_command);
                let _ = cgroup.remove();
            }
            for dir in self.manager.group_dirs() {
                let _ = fs::remove_dir(dir);
            }
        }
    }

    fn kill_with_command(pid: i32) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }

    fn is_root() -> bool {
        fs::read_to_string("/proc/self/status").is_ok_and(|status| {
            status.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2)) == Some("0")
        })
    }

    /// Detects the real cgroups under a test-only parent group, or says
    /// loudly why the real test is skipped.
    fn real_manager(tag: &str) -> Option<CgroupManager> {
        if !is_root() {
            eprintln!("SKIPPING real cgroup test {tag}: not running as root");
            return None;
        }
        let group = format!("flotilla-test-{}-{tag}", std::process::id());
        let manager = CgroupManager::detect(Path::new("/sys/fs/cgroup"), &group);
        eprintln!("real cgroups: {}", manager.describe());
        if manager.version() == "none" {
            eprintln!("SKIPPING real cgroup test {tag}: {}", manager.describe());
            return None;
        }
        Some(manager)
    }

    fn run_real(manager: CgroupManager, use_killer_only: bool) {
        let mut guard = RealGuard { manager, cgroup: None, child: None };
        let limits = Limits { memory_bytes: Some(64 * MIB), pids: Some(20), cpus: Some(0.5) };
        let cg = guard.manager.create("sb", &limits).unwrap();
        guard.cgroup = Some(cg.clone());
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        guard.child = Some(child);
        cg.add_pid(pid).unwrap();
        assert!(cg.pids().contains(&pid), "{:?}", cg.pids());
        assert_eq!(guard.manager.list(), vec!["sb".to_owned()]);

        match guard.manager.hierarchy() {
            Hierarchy::V2 { controllers, .. } => {
                let dir = cg.paths()[0];
                if controllers.contains(&Controller::Memory) {
                    assert_eq!(read(&dir.join("memory.max")), "67108864");
                }
                if controllers.contains(&Controller::Pids) {
                    assert_eq!(read(&dir.join("pids.max")), "20");
                }
                if controllers.contains(&Controller::Cpu) {
                    assert_eq!(read(&dir.join("cpu.max")), "50000 100000");
                }
            }
            Hierarchy::V1 { memory, pids, cpu, .. } => {
                if let Some(dir) = memory {
                    let dir = dir.join("sb");
                    assert_eq!(read(&dir.join("memory.limit_in_bytes")), "67108864");
                    if dir.join("memory.memsw.limit_in_bytes").exists() {
                        assert_eq!(read(&dir.join("memory.memsw.limit_in_bytes")), "67108864");
                    }
                }
                if let Some(dir) = pids {
                    assert_eq!(read(&dir.join("sb/pids.max")), "20");
                }
                if let Some(dir) = cpu {
                    assert_eq!(read(&dir.join("sb/cpu.cfs_quota_us")), "50000");
                }
            }
            Hierarchy::None { .. } => unreachable!("skipped above"),
        }
        // A live update reads back too.
        cg.set_limits(&Limits { pids: Some(30), ..Limits::default() }).unwrap();
        let pids_dir = cg.paths().into_iter().find(|d| d.join("pids.max").exists()).map(Path::to_path_buf);
        if let Some(dir) = pids_dir {
            assert_eq!(read(&dir.join("pids.max")), "30");
        }

        eprintln!("memory peak: {:?}", cg.memory_peak());
        let mut killer_calls = Vec::new();
        // The child is not reaped yet: a zombie must not count as a member.
        cg.kill(|pid| {
            killer_calls.push(pid);
            kill_with_command(pid);
        })
        .unwrap();
        if use_killer_only {
            assert!(!killer_calls.is_empty(), "killer was used");
            assert!(killer_calls.iter().all(|p| *p == pid), "{killer_calls:?}");
        } else {
            eprintln!("killer calls with cgroup.kill available: {killer_calls:?}");
        }
        let status = guard.child.take().unwrap().wait().unwrap();
        assert!(!status.success(), "sleep was killed: {status:?}");
        assert!(cg.pids().is_empty());

        cg.remove().unwrap();
        for dir in cg.paths() {
            assert!(!dir.exists(), "{} still exists", dir.display());
        }
        assert!(guard.manager.list().is_empty());
    }

    #[test]
    fn real_cgroup_limits_kill_and_remove() {
        let Some(manager) = real_manager("main") else {
            return;
        };
        let uses_kill_file = match manager.hierarchy() {
            Hierarchy::V2 { kill, .. } => *kill,
            Hierarchy::V1 { unified, .. } => unified.is_some(),
            Hierarchy::None { .. } => false,
        };
        run_real(manager, !uses_kill_file);
    }

    /// The v1 path without the hybrid mount, where the killer does the work.
    #[test]
    fn real_v1_killer_fallback() {
        let Some(mut manager) = real_manager("killer") else {
            return;
        };
        let Hierarchy::V1 { unified, .. } = &mut manager.hierarchy else {
            eprintln!("SKIPPING real_v1_killer_fallback: not v1");
            // Leave no parent group behind.
            for dir in manager.group_dirs() {
                let _ = fs::remove_dir(dir);
            }
            return;
        };
        if let Some(dir) = unified.take() {
            let _ = fs::remove_dir(dir);
        }
        run_real(manager, true);
    }
}
