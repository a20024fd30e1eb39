//! `schedule` (issue 16): placements/s of the scheduler's pure core over
//! 1,000 simulated nodes and 100,000 queued builds of mixed priority,
//! project and shape ([`flotilla_coordinator::sched::sim`]). Passes are
//! made until the queue drains, while placed builds finish after one to
//! four passes; only the time inside the placement call counts.
//!
//! Baseline, same run, same fleet, queue and finishing order: first fit in
//! arrival order with the same candidate lists and capacity checks, but no
//! priorities, fair shares, least-loaded choice or holds: what placement
//! costs with no policy at all.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use flotilla_coordinator::sched::sim::{self, Rng};
use flotilla_coordinator::sched::{self, Need, NodeView, Placement, Queued};

use crate::report::{Case, Machine, Report, Unit};
use crate::scenarios::{now, target};

const NODES: usize = 1000;
const BUILDS: usize = 100_000;
const PROJECTS: usize = 20;
/// Nomad's C1M rate (5 servers), the target.
const TARGET_PER_SEC: f64 = 3750.0;

/// What one drain took: time inside placement calls, placements, passes,
/// and the first pass alone (all 100,000 builds, an empty fleet).
struct Drain {
    placing: Duration,
    placements: usize,
    passes: usize,
    first_pass: Duration,
}

fn drain(
    seed: u64,
    mut place: impl FnMut(&mut [NodeView], &[Queued], &BTreeMap<String, u64>) -> Vec<Placement>,
) -> Drain {
    let mut rng = Rng::new(seed);
    let mut nodes = sim::fleet(NODES, &mut rng);
    let mut waiting = sim::queue(BUILDS, PROJECTS, &mut rng);
    // Finishing order comes from its own stream, so both policies see the
    // same one however differently they place.
    let mut finish = Rng::new(seed ^ 0xf1f1);
    let mut running: Vec<(Queued, usize, u32)> = Vec::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut d = Drain { placing: Duration::ZERO, placements: 0, passes: 0, first_pass: Duration::ZERO };
    loop {
        running.retain_mut(|(q, i, left)| {
            *left -= 1;
            if *left == 0 {
                nodes[*i].release(&q.need);
                *counts.get_mut(&q.project).expect("counted") -= 1;
            }
            *left > 0
        });
        let t = Instant::now();
        let placed = place(&mut nodes, &waiting, &counts);
        let took = t.elapsed();
        if d.passes == 0 {
            d.first_pass = took;
        }
        d.placing += took;
        d.passes += 1;
        d.placements += placed.len();
        if placed.is_empty() && running.is_empty() {
            return d;
        }
        let node_of: HashMap<u64, usize> = placed.iter().map(|p| (p.build, p.node)).collect();
        let mut next = Vec::with_capacity(waiting.len());
        for q in waiting {
            match node_of.get(&q.id) {
                Some(&i) => {
                    *counts.entry(q.project.clone()).or_default() += 1;
                    running.push((q, i, 1 + finish.below(4) as u32));
                }
                None => next.push(q),
            }
        }
        waiting = next;
    }
}

/// The baseline: first fit in arrival order.
fn first_fit(nodes: &mut [NodeView], queue: &[Queued], _: &BTreeMap<String, u64>) -> Vec<Placement> {
    let mut candidates: HashMap<&Need, Vec<usize>> = HashMap::new();
    let mut out = Vec::new();
    for q in queue {
        let c = candidates
            .entry(&q.need)
            .or_insert_with(|| (0..nodes.len()).filter(|&i| sched::runnable(&q.need, &nodes[i]).is_ok()).collect());
        if let Some(&i) = c.iter().find(|&&i| nodes[i].fits(&q.need)) {
            nodes[i].take(&q.need);
            out.push(Placement { build: q.id, node: i });
        }
    }
    out
}

pub async fn schedule(machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    let mut notes = Vec::new();
    let mut rates = Vec::new();
    // ms per 1000 placements.
    let per_k = |d: &Drain| d.placing.as_secs_f64() * 1e6 / d.placements.max(1) as f64;
    for it in 0..iterations.max(1) {
        let seed = 0x5eed + it as u64;
        let d = drain(seed, |n, q, r| sched::place(n, q, r).placements);
        let b = drain(seed, first_fit);
        rates.push(d.placements as f64 / d.placing.as_secs_f64());
        notes.push(format!(
            "run {it}: {} placements in {} passes, {:.0} ms placing ({:.0}/s), the first pass (100,000 queued, an empty \
             fleet) {:.1} ms; first fit: {} passes, {:.0} ms",
            d.placements,
            d.passes,
            d.placing.as_secs_f64() * 1e3,
            d.placements as f64 / d.placing.as_secs_f64(),
            d.first_pass.as_secs_f64() * 1e3,
            b.passes,
            b.placing.as_secs_f64() * 1e3
        ));
        ours.push(per_k(&d));
        base.push(per_k(&b));
    }
    let mut report = Report {
        scenario: "schedule",
        description: format!(
            "scheduler core: {BUILDS} builds ({PROJECTS} projects, 1% interactive, 20% try) over {NODES} simulated nodes, \
             placed pass after pass until drained; ms per 1000 placements"
        ),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: 0,
        cases: vec![
            Case::measured(
                "sched_place",
                "sched::place (priorities, fair shares, least loaded, holds); ms per 1000 placements",
                false,
                &ours,
            ),
            Case::measured(
                "first_fit",
                "first fit in arrival order, same candidates and capacity checks; ms per 1000 placements",
                true,
                &base,
            ),
        ],
        targets: vec![],
        notes,
        details: serde_json::Value::Null,
    };
    report.set_ratios("first_fit");
    let rate = crate::stats::Stats::from_samples(&rates).map_or(f64::NAN, |s| s.median);
    report.targets = vec![target(
        "≥ 3,750 placements/s over 1,000 simulated nodes (Nomad C1M on 5 servers)",
        Some(rate >= TARGET_PER_SEC),
        format!("{rate:.0} placements/s"),
    )];
    Ok(report)
}
