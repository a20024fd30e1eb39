//! The coordinator's Prometheus metrics (`GET /metrics`, text format), kept
//! the node's way ([`flotilla_node::metrics::Metrics`]): counters of what
//! this coordinator did, and gauges read at scrape time from the store
//! (every coordinator's queue) and from its view of the fleet.

use std::time::Duration;

use flotilla_node::metrics::{Gauge, Help, Metrics};

use crate::runtime::Coordinator;
use crate::sched::Priority;
use crate::store::StoreError;

pub const HELP: &[Help] = &[
    (
        "flotilla_coordinator_builds",
        "gauge",
        "Builds queued and running in the store (every coordinator's), by state and priority.",
    ),
    ("flotilla_coordinator_builds_finished_total", "counter", "Builds this coordinator ended, by final state."),
    ("flotilla_coordinator_build_duration_seconds_sum", "counter", "Time from start to end of the builds it ended."),
    ("flotilla_coordinator_build_duration_seconds_count", "counter", "Builds timed from start to end."),
    (
        "flotilla_coordinator_queue_wait_seconds_sum",
        "counter",
        "Time builds waited from creation to their claim by this coordinator, by priority.",
    ),
    ("flotilla_coordinator_queue_wait_seconds_count", "counter", "Builds claimed by this coordinator, by priority."),
    ("flotilla_coordinator_builds_retried_total", "counter", "Attempts replaced by a new one, by reason."),
    (
        "flotilla_coordinator_nodes",
        "gauge",
        "Nodes in this coordinator's fleet by state: up, silent (no answer yet, not lost), lost.",
    ),
    (
        "flotilla_coordinator_lease_adoptions_total",
        "counter",
        "Builds this coordinator adopted because their owner's lease lapsed.",
    ),
    (
        "flotilla_coordinator_store_retries_total",
        "counter",
        "Store operations that failed and were tried again, by task (executor, dispatcher, lease, manager).",
    ),
];

pub fn new() -> Metrics {
    Metrics::with_help(HELP)
}

/// A priority as a label value.
pub fn priority_label(kind: &str) -> &'static str {
    match Priority::of_kind(kind) {
        Priority::Interactive => "interactive",
        Priority::Try => "try",
        Priority::PostSubmit => "post-submit",
    }
}

pub fn store_retry(m: &Metrics, task: &str) {
    m.add("flotilla_coordinator_store_retries_total", &[("task", task)], 1.0);
}

pub fn queue_wait(m: &Metrics, kind: &str, waited: Duration) {
    let p = [("priority", priority_label(kind))];
    m.add("flotilla_coordinator_queue_wait_seconds_sum", &p, waited.as_secs_f64());
    m.add("flotilla_coordinator_queue_wait_seconds_count", &p, 1.0);
}

pub fn finished(m: &Metrics, state: &str, took: Option<Duration>) {
    m.add("flotilla_coordinator_builds_finished_total", &[("state", state)], 1.0);
    if let Some(t) = took {
        m.add("flotilla_coordinator_build_duration_seconds_sum", &[], t.as_secs_f64());
        m.add("flotilla_coordinator_build_duration_seconds_count", &[], 1.0);
    }
}

/// The exposition text: this coordinator's counters and the gauges read now.
pub async fn render(c: &Coordinator) -> Result<String, StoreError> {
    let mut gauges: Vec<Gauge> = Vec::new();
    let mut counts = std::collections::BTreeMap::new();
    for state in ["queued", "running"] {
        for p in ["interactive", "try", "post-submit"] {
            counts.insert((state.to_string(), p), 0u64);
        }
    }
    for (state, kind, n) in c.store.active_counts().await? {
        *counts.entry((state, priority_label(&kind))).or_default() += n;
    }
    for ((state, p), n) in counts {
        gauges.push((
            "flotilla_coordinator_builds",
            vec![("state".into(), state), ("priority".into(), p.into())],
            n as f64,
        ));
    }
    for (state, n) in c.fleet_states().await {
        gauges.push(("flotilla_coordinator_nodes", vec![("state".into(), state.into())], n as f64));
    }
    Ok(c.metrics.render(&gauges))
}
