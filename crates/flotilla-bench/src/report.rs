//! What a scenario found, as a table for people and a JSON object for
//! tools (shaped like Cloud Hypervisor's performance-metrics: named cases,
//! each with its statistics).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::stats::Stats;

/// The unit of a scenario's samples, and which way is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Unit {
    /// Latency in milliseconds: lower is better.
    #[serde(rename = "ms")]
    Millis,
    /// Throughput in megabytes (10^6 bytes) per second: higher is better.
    #[serde(rename = "MB/s")]
    MegabytesPerSec,
}

impl Unit {
    fn fmt(self, v: f64) -> String {
        match self {
            Unit::Millis if v < 10.0 => format!("{v:.3}"),
            Unit::Millis => format!("{v:.2}"),
            Unit::MegabytesPerSec => format!("{v:.1}"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Unit::Millis => "ms",
            Unit::MegabytesPerSec => "MB/s",
        }
    }
}

/// One measured thing: Flotilla itself or a baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    /// Stable, machine-friendly name (`flotilla_create_ready`).
    pub name: String,
    /// What exactly was timed.
    pub description: String,
    pub baseline: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// This case's median over the scenario's reference baseline's median.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_baseline: Option<f64>,
    /// Why the case has no numbers (a baseline tool that is missing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    /// Every timed sample, in the order taken.
    pub samples: Vec<f64>,
}

impl Case {
    pub fn measured(name: &str, description: &str, baseline: bool, samples: &[f64]) -> Case {
        Case {
            name: name.into(),
            description: description.into(),
            baseline,
            stats: Stats::from_samples(samples),
            ratio_to_baseline: None,
            unavailable: None,
            samples: samples.to_vec(),
        }
    }

    pub fn unavailable(name: &str, description: &str, reason: String) -> Case {
        Case {
            name: name.into(),
            description: description.into(),
            baseline: true,
            stats: None,
            ratio_to_baseline: None,
            unavailable: Some(reason),
            samples: Vec::new(),
        }
    }

    pub fn median(&self) -> Option<f64> {
        self.stats.as_ref().map(|s| s.median)
    }
}

/// A goal from the issue and whether this run met it. `met` is `None` when
/// it could not be judged (a baseline was unavailable). Never asserted.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub description: String,
    pub met: Option<bool>,
    pub observed: String,
}

/// The machine the numbers came from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub memory_bytes: u64,
    /// Filesystem type of the node home (and the baseline's directory).
    pub node_home_fs: String,
}

impl Machine {
    pub fn probe(node_home: &Path) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().into()))
            .unwrap_or_else(|| "unknown".into());
        let memory_bytes = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        let node_home_fs = std::process::Command::new("df")
            .args(["--output=fstype,source"])
            .arg(node_home)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().nth(1).map(|l| l.split_whitespace().collect::<Vec<_>>().join(" on ")))
            .unwrap_or_else(|| "unknown".into());
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu,
            memory_bytes,
            node_home_fs,
        }
    }
}

/// Everything one scenario reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub description: String,
    /// UTC, when the scenario finished.
    pub date: String,
    pub machine: Machine,
    pub unit: Unit,
    /// Untimed runs of every case before the timed ones.
    pub warmups: usize,
    pub cases: Vec<Case>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
    /// Scenario-specific findings (create's step breakdown, stop's import
    /// outcomes).
    pub details: serde_json::Value,
}

impl Report {
    /// Sets every case's ratio to the case named `baseline`.
    pub fn set_ratios(&mut self, baseline: &str) {
        let reference = self.cases.iter().find(|c| c.name == baseline).and_then(Case::median);
        for c in &mut self.cases {
            c.ratio_to_baseline = match (c.median(), reference) {
                (Some(m), Some(r)) if r > 0.0 => Some(m / r),
                _ => None,
            };
        }
    }

    pub fn case(&self, name: &str) -> Option<&Case> {
        self.cases.iter().find(|c| c.name == name)
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let u = self.unit;
        let mut out = String::new();
        let _ = writeln!(out, "\n== {}: {}", self.scenario, self.description);
        let _ = writeln!(
            out,
            "{:<30} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            format!("case ({})", u.label()),
            "n",
            "median",
            "p90",
            "p95",
            "min",
            "max",
            "mean",
            "stddev",
            "ratio"
        );
        for c in &self.cases {
            let name = if c.baseline { format!("{} (base)", c.name) } else { c.name.clone() };
            match &c.stats {
                Some(s) => {
                    let ratio = c.ratio_to_baseline.map_or("-".into(), |r| format!("{r:.2}x"));
                    let _ = writeln!(
                        out,
                        "{:<30} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
                        name,
                        s.iterations,
                        u.fmt(s.median),
                        u.fmt(s.p90),
                        u.fmt(s.p95),
                        u.fmt(s.min),
                        u.fmt(s.max),
                        u.fmt(s.mean),
                        u.fmt(s.std_dev),
                        ratio
                    );
                }
                None => {
                    let why = c.unavailable.as_deref().unwrap_or("no samples");
                    let _ = writeln!(out, "{name:<30} unavailable: {why}");
                }
            }
        }
        for c in &self.cases {
            let _ = writeln!(out, "  {}: {}", c.name, c.description);
        }
        for t in &self.targets {
            let verdict = match t.met {
                Some(true) => "MET",
                Some(false) => "MISSED",
                None => "NOT JUDGED",
            };
            let _ = writeln!(out, "  target {}: {verdict} ({})", t.description, t.observed);
        }
        for n in &self.notes {
            let _ = writeln!(out, "  note: {n}");
        }
        out
    }
}
