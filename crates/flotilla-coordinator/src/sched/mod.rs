//! The scheduler's pure core: can this node run that build, and where does
//! the queue go now (DESIGN §2; Go's build farm's `IsRunnable` and its
//! priority scheduler).
//!
//! No I/O and no clock: the runtime hands [`place`] a snapshot of the nodes
//! (their capabilities and what is already placed on them), the queue, and
//! how many builds each project has running; it gets back a [`Plan`] of
//! placements and, for every build left waiting, the reason. The rules:
//!
//! - **Priority.** Interactive (`build sandbox`) before try before
//!   post-submit. Within a level first come first served, except post-submit,
//!   which builds the newest commit first.
//! - **Fair shares.** Within a level the next build comes from the project
//!   with the fewest builds running, so a project with ten thousand queued
//!   commits does not starve one with a single try.
//! - **Capacity.** A build takes its CPUs and memory from its node; no
//!   node is ever given more than it has.
//! - **Least loaded.** Among the nodes that can run a build and have room,
//!   one with a warm pool for its image comes first, then the least loaded.
//! - **No inversion, no waste.** When a build finds no room, the runnable
//!   node closest to fitting it is held: it takes no lower-priority build,
//!   so it drains until the waiting one fits. A big try build is not
//!   starved by small post-submit builds that keep filling the room it
//!   needs, and one big build does not idle the whole fleet: one node per
//!   waiting shape and level is held, the rest take lower work.

pub mod sim;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::fmt;

use flotilla_api::types::BackendKind;
use serde::Serialize;

/// What a build is counted as taking when its builder names no resources
/// (its sandbox is then not limited): half a core and 512 MiB, so a
/// two-core machine runs four such builds at once.
pub const DEFAULT_MILLICPUS: u64 = 500;
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;

/// Who waits first. The derived order is the serving order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// A developer's sandbox set up like a builder (`build sandbox`).
    Interactive,
    /// A patch or revision submitted with `flotilla try`.
    Try,
    /// A commit on a watched branch.
    PostSubmit,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Interactive, Priority::Try, Priority::PostSubmit];

    /// From a build's `kind` as the store keeps it.
    pub fn of_kind(kind: &str) -> Priority {
        match kind {
            "interactive" => Priority::Interactive,
            "try" => Priority::Try,
            _ => Priority::PostSubmit,
        }
    }
}

/// What a build needs from a node: its builder's platform, image, backend
/// and resources.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Need {
    /// Go's names: `linux`, `darwin`, ...
    pub os: String,
    /// Go's names: `amd64`, `arm64`, ...
    pub arch: String,
    pub image: String,
    pub backend: BackendKind,
    pub millicpus: u64,
    pub memory_bytes: u64,
}

/// One node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    /// As the node reports it (`std::env::consts`); compared in Go's names.
    pub os: String,
    pub arch: String,
    /// Backends the node can run now.
    pub backends: Vec<BackendKind>,
    pub images: BTreeSet<String>,
    /// Images with a warm microVM pool that has a member ready.
    pub pools: BTreeSet<String>,
    /// What builds may take in all.
    pub millicpus: u64,
    pub memory_bytes: u64,
    /// What placed builds hold now.
    pub used_millicpus: u64,
    pub used_memory_bytes: u64,
    /// False while the node is lost or draining: it takes nothing.
    pub up: bool,
}

impl NodeView {
    /// Whether `need` fits in what is left of the node.
    pub fn fits(&self, need: &Need) -> bool {
        self.used_millicpus + need.millicpus <= self.millicpus
            && self.used_memory_bytes + need.memory_bytes <= self.memory_bytes
    }

    /// The larger of its CPU and memory shares in use, in parts per million,
    /// if `need` were added.
    fn load_with(&self, need: &Need) -> u64 {
        let share = |used: u64, cap: u64| {
            if cap == 0 { u64::MAX } else { ((used as u128 * 1_000_000) / cap as u128) as u64 }
        };
        share(self.used_millicpus + need.millicpus, self.millicpus)
            .max(share(self.used_memory_bytes + need.memory_bytes, self.memory_bytes))
    }

    pub fn take(&mut self, need: &Need) {
        self.used_millicpus += need.millicpus;
        self.used_memory_bytes += need.memory_bytes;
    }

    pub fn release(&mut self, need: &Need) {
        self.used_millicpus = self.used_millicpus.saturating_sub(need.millicpus);
        self.used_memory_bytes = self.used_memory_bytes.saturating_sub(need.memory_bytes);
    }
}

/// Why a node can never run a build, whatever its load.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Unrunnable {
    Down,
    Os { want: String, have: String },
    Arch { want: String, have: String },
    Backend(BackendKind),
    Image(String),
    TooSmall { millicpus: u64, memory_bytes: u64 },
}

impl fmt::Display for Unrunnable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unrunnable::Down => write!(f, "lost or draining"),
            Unrunnable::Os { want, have } => write!(f, "runs {have}, not {want}"),
            Unrunnable::Arch { want, have } => write!(f, "is {have}, not {want}"),
            Unrunnable::Backend(b) => write!(f, "has no {} backend", b.as_str()),
            Unrunnable::Image(i) => write!(f, "has no image {i}"),
            Unrunnable::TooSmall { millicpus, memory_bytes } => {
                write!(f, "has only {} CPUs and {} MiB in all", *millicpus as f64 / 1000.0, memory_bytes >> 20)
            }
        }
    }
}

/// The Go name of an architecture (`x86_64` → `amd64`), as builders are
/// named; names it does not know pass through.
pub fn go_arch(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" | "i386" | "i686" => "386",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// The Go name of an OS (`macos` → `darwin`).
pub fn go_os(os: &str) -> &str {
    match os {
        "macos" => "darwin",
        other => other,
    }
}

/// A node as the scheduler sees it, from its describe answer. `name` is
/// how the coordinator calls it. It starts as loaded as the limits of the
/// sandboxes running there (the caller adds what its own builds hold on top,
/// taking the larger: a build's sandbox is in both once it runs).
pub fn view_of(name: &str, info: &flotilla_api::types::NodeInfo) -> NodeView {
    NodeView {
        name: name.to_string(),
        os: info.os.clone(),
        arch: info.arch.clone(),
        backends: info.backends.iter().filter(|b| b.available).map(|b| b.kind).collect(),
        images: info.images.iter().cloned().collect(),
        pools: info.warm_pools.iter().cloned().collect(),
        millicpus: info.cpus as u64 * 1000,
        memory_bytes: info.memory_bytes,
        used_millicpus: info.allocated_millicpus,
        used_memory_bytes: info.allocated_memory_bytes,
        up: true,
    }
}

/// Whether `node` could ever run a build that needs `need` (Go's
/// `IsRunnable`), and if not, why. Load is not considered; size in all is.
pub fn runnable(need: &Need, node: &NodeView) -> Result<(), Unrunnable> {
    if !node.up {
        return Err(Unrunnable::Down);
    }
    if go_os(&node.os) != need.os {
        return Err(Unrunnable::Os { want: need.os.clone(), have: go_os(&node.os).to_string() });
    }
    if go_arch(&node.arch) != need.arch {
        return Err(Unrunnable::Arch { want: need.arch.clone(), have: go_arch(&node.arch).to_string() });
    }
    if !node.backends.contains(&need.backend) {
        return Err(Unrunnable::Backend(need.backend));
    }
    // A `dir:` image is a path on the node: only the node can tell.
    if !need.image.starts_with("dir:") && !node.images.contains(&need.image) {
        return Err(Unrunnable::Image(need.image.clone()));
    }
    if need.millicpus > node.millicpus || need.memory_bytes > node.memory_bytes {
        return Err(Unrunnable::TooSmall { millicpus: node.millicpus, memory_bytes: node.memory_bytes });
    }
    Ok(())
}

/// A build waiting to be placed.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub id: u64,
    pub project: String,
    pub priority: Priority,
    /// The change's order in its project (the run id): post-submit builds
    /// the highest first, the other levels the lowest first.
    pub order: u64,
    pub need: Need,
}

impl Queued {
    /// Smaller is served first within its level and project.
    fn key(&self) -> (u64, u64) {
        match self.priority {
            Priority::PostSubmit => (u64::MAX - self.order, self.id),
            _ => (self.order, self.id),
        }
    }
}

/// A build given a node (an index into the snapshot's nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub build: u64,
    pub node: usize,
}

/// A build left waiting, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Waiting {
    pub build: u64,
    pub reason: String,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    pub waiting: Vec<Waiting>,
    /// Nodes held for a waiting build (node, build): no build of a lower
    /// level was placed on them.
    pub held: Vec<(usize, u64)>,
}

/// A project's turn within a level: its running count, then its next
/// build's key (fewest running first, then that build's order).
type Turn<'a> = (u64, (u64, u64), &'a str);

/// What is known in one pass about every build with the same need.
struct Class {
    /// Nodes that could run it.
    nodes: Vec<usize>,
    /// Why none can, when `nodes` is empty.
    never: Option<String>,
    /// Set once a build of this need found no room: room only shrinks
    /// within a pass, so every later one waits too, for this reason.
    full: Option<String>,
}

fn class_of(need: &Need, nodes: &[NodeView]) -> Class {
    let mut ok = Vec::new();
    let mut why: BTreeMap<String, usize> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        match runnable(need, n) {
            Ok(()) => ok.push(i),
            Err(e) => *why.entry(e.to_string()).or_default() += 1,
        }
    }
    let never = ok.is_empty().then(|| {
        if nodes.is_empty() {
            return "no nodes".to_string();
        }
        let mut why: Vec<(usize, String)> = why.into_iter().map(|(w, n)| (n, w)).collect();
        why.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let parts: Vec<String> = why
            .iter()
            .take(3)
            .map(|(n, w)| if *n == 1 { format!("1 node {w}") } else { format!("{n} nodes: {w}") })
            .collect();
        let more = if why.len() > 3 { "; ..." } else { "" };
        format!(
            "no node can run {}-{} {} on {} with {} CPUs and {} MiB: {}{more}",
            need.os,
            need.arch,
            need.image,
            need.backend.as_str(),
            need.millicpus as f64 / 1000.0,
            need.memory_bytes >> 20,
            parts.join("; ")
        )
    });
    Class { nodes: ok, never, full: None }
}

/// Places as much of `queue` as fits on `nodes`, taking each placement's
/// resources from its node (so the caller's snapshot stays true for the
/// next pass). `running` is how many builds each project has running now.
pub fn place(nodes: &mut [NodeView], queue: &[Queued], running: &BTreeMap<String, u64>) -> Plan {
    let mut plan = Plan::default();
    let mut classes: HashMap<&Need, Class> = HashMap::new();
    // Nodes a waiting build of a higher level holds.
    let mut held = vec![false; nodes.len()];
    let mut counts: HashMap<&str, u64> = running.iter().map(|(p, n)| (p.as_str(), *n)).collect();

    // Per level, per project: its builds, the next one last (to pop).
    let mut levels: [BTreeMap<&str, Vec<&Queued>>; 3] = Default::default();
    for q in queue {
        levels[q.priority as usize].entry(&q.project).or_default().push(q);
    }
    for level in levels.iter_mut() {
        for builds in level.values_mut() {
            builds.sort_unstable_by_key(|q| Reverse(q.key()));
        }
        let mut turn: BinaryHeap<Reverse<Turn>> = level
            .iter()
            .map(|(p, b)| Reverse((counts.get(p).copied().unwrap_or(0), b.last().expect("non-empty").key(), *p)))
            .collect();
        let mut holds = Vec::new();
        while let Some(Reverse((_, _, project))) = turn.pop() {
            let builds = level.get_mut(project).expect("listed");
            let q = builds.pop().expect("non-empty");
            let class = classes.entry(&q.need).or_insert_with(|| class_of(&q.need, nodes));
            if let Some(why) = class.never.as_ref().or(class.full.as_ref()) {
                plan.waiting.push(Waiting { build: q.id, reason: why.clone() });
            } else {
                let best =
                    class.nodes.iter().copied().filter(|&i| !held[i] && nodes[i].fits(&q.need)).min_by_key(|&i| {
                        let pooled = q.need.backend == BackendKind::Vm && nodes[i].pools.contains(&q.need.image);
                        (!pooled, nodes[i].load_with(&q.need), i)
                    });
                match best {
                    Some(i) => {
                        nodes[i].take(&q.need);
                        *counts.entry(&q.project).or_default() += 1;
                        plan.placements.push(Placement { build: q.id, node: i });
                    }
                    None => {
                        let n = class.nodes.len();
                        let by_others = class.nodes.iter().filter(|&&i| held[i]).count();
                        let full = match (n, by_others) {
                            (1, 0) => "its one runnable node is full".to_string(),
                            (1, 1) => "its one runnable node is held for higher-priority builds".to_string(),
                            (n, 0) => format!("all {n} runnable nodes are full"),
                            (n, h) => {
                                format!("all {n} runnable nodes are full or held ({h} for higher-priority builds)")
                            }
                        };
                        plan.waiting.push(Waiting { build: q.id, reason: full.clone() });
                        // Hold the node closest to fitting it (not one a
                        // higher level holds), so that it drains for this
                        // build while lower levels fill the others.
                        let hold = class
                            .nodes
                            .iter()
                            .copied()
                            .filter(|&i| !held[i] && !holds.iter().any(|&(h, _)| h == i))
                            .min_by_key(|&i| (nodes[i].load_with(&q.need), i));
                        if let Some(i) = hold {
                            holds.push((i, q.id));
                        }
                        class.full = Some(full);
                    }
                }
            }
            if let Some(next) = builds.last() {
                turn.push(Reverse((counts.get(project).copied().unwrap_or(0), next.key(), project)));
            }
        }
        for &(i, _) in &holds {
            held[i] = true;
        }
        plan.held.extend(holds);
    }
    plan
}

/// `95s` → `1m35s`, for reasons a person reads.
pub fn ago(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
