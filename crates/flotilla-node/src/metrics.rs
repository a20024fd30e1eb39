//! Prometheus metrics (`GET /metrics`), in the text exposition format.
//!
//! A handful of counters kept in one mutex-guarded map: the node's hot paths
//! touch them a few times per request, far below where a lock-free registry
//! would pay for its dependency.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// A gauge computed at scrape time: name, labels, value.
pub type Gauge = (&'static str, Vec<(String, String)>, f64);

/// One metric's name, type (`counter`, `gauge`) and help text.
pub type Help = (&'static str, &'static str, &'static str);

/// Counters and sums, keyed by metric name and label set, rendered in the
/// order of a help table (the node's, or another process's: the
/// coordinator keeps its own with [`Metrics::with_help`]).
#[derive(Debug)]
pub struct Metrics {
    help: &'static [Help],
    counters: Mutex<BTreeMap<(&'static str, String), f64>>,
}

impl Default for Metrics {
    /// The node's metrics.
    fn default() -> Metrics {
        Metrics::with_help(HELP)
    }
}

const HELP: &[Help] = &[
    ("flotilla_operations_total", "counter", "Operations finished, by kind and final state."),
    ("flotilla_operation_duration_seconds_sum", "counter", "Total time operations took, by kind."),
    ("flotilla_operation_duration_seconds_count", "counter", "Operations timed, by kind."),
    ("flotilla_import_bytes_total", "counter", "Bytes of file content written by workspace and image imports."),
    ("flotilla_janitor_reaped_total", "counter", "Sandboxes and leftovers the janitor removed, by reason."),
    ("flotilla_sandboxes", "gauge", "Sandboxes by state."),
];

impl Metrics {
    pub fn with_help(help: &'static [Help]) -> Metrics {
        Metrics { help, counters: Mutex::new(BTreeMap::new()) }
    }

    pub fn add(&self, name: &'static str, labels: &[(&str, &str)], v: f64) {
        let key = (name, render_labels(labels));
        *self.counters.lock().expect("metrics").entry(key).or_insert(0.0) += v;
    }

    pub fn operation_finished(&self, kind: &str, state: &str, took: Duration) {
        self.add("flotilla_operations_total", &[("kind", kind), ("state", state)], 1.0);
        self.add("flotilla_operation_duration_seconds_sum", &[("kind", kind)], took.as_secs_f64());
        self.add("flotilla_operation_duration_seconds_count", &[("kind", kind)], 1.0);
    }

    pub fn imported(&self, kind: &str, bytes: u64) {
        self.add("flotilla_import_bytes_total", &[("kind", kind)], bytes as f64);
    }

    pub fn reaped(&self, reason: &str) {
        self.add("flotilla_janitor_reaped_total", &[("reason", reason)], 1.0);
    }

    /// The exposition text; `gauges` are computed by the caller at scrape time.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let counters = self.counters.lock().expect("metrics");
        let mut out = String::new();
        for (name, kind, help) in self.help {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ((n, labels), v) in counters.iter() {
                if n == name {
                    let _ = writeln!(out, "{name}{labels} {v}");
                }
            }
            for (n, labels, v) in gauges {
                if n == name {
                    let pairs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    let _ = writeln!(out, "{name}{} {v}", render_labels(&pairs));
                }
            }
        }
        out
    }
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.operation_finished("create_sandbox", "succeeded", Duration::from_millis(1500));
        m.operation_finished("create_sandbox", "succeeded", Duration::from_millis(500));
        m.reaped("expired");
        m.imported("workspace", 10);
        let text = m.render(&[("flotilla_sandboxes", vec![("state".into(), "run\"ning".into())], 3.0)]);
        assert!(text.contains("flotilla_operations_total{kind=\"create_sandbox\",state=\"succeeded\"} 2\n"), "{text}");
        assert!(text.contains("flotilla_operation_duration_seconds_sum{kind=\"create_sandbox\"} 2\n"), "{text}");
        assert!(text.contains("flotilla_janitor_reaped_total{reason=\"expired\"} 1\n"), "{text}");
        assert!(text.contains("flotilla_sandboxes{state=\"run\\\"ning\"} 3\n"), "{text}");
        assert!(text.contains("# TYPE flotilla_sandboxes gauge\n"), "{text}");
    }
}
