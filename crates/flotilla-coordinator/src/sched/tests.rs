use std::collections::{BTreeMap, HashMap, HashSet};

use flotilla_api::types::BackendKind;

use super::sim::{self, Rng};
use super::*;

fn node(name: &str, cpus: u64) -> NodeView {
    NodeView {
        name: name.into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        backends: vec![BackendKind::Process],
        images: ["debian:12".to_string()].into(),
        pools: BTreeSet::new(),
        millicpus: cpus * 1000,
        memory_bytes: cpus << 30,
        used_millicpus: 0,
        used_memory_bytes: 0,
        up: true,
    }
}

fn need(cpus: u64) -> Need {
    Need {
        os: "linux".into(),
        arch: "amd64".into(),
        image: "debian:12".into(),
        backend: BackendKind::Process,
        millicpus: cpus * 1000,
        memory_bytes: cpus << 30,
    }
}

fn build(id: u64, project: &str, priority: Priority, order: u64, cpus: u64) -> Queued {
    Queued { id, project: project.into(), priority, order, need: need(cpus) }
}

fn placed(plan: &Plan) -> Vec<u64> {
    plan.placements.iter().map(|p| p.build).collect()
}

#[test]
fn runnable_names_what_is_missing() {
    let n = node("a", 4);
    assert_eq!(runnable(&need(1), &n), Ok(()));
    let arm = Need { arch: "arm64".into(), ..need(1) };
    assert_eq!(runnable(&arm, &n), Err(Unrunnable::Arch { want: "arm64".into(), have: "amd64".into() }));
    let win = Need { os: "windows".into(), ..need(1) };
    assert_eq!(runnable(&win, &n).unwrap_err().to_string(), "runs linux, not windows");
    let vm = Need { backend: BackendKind::Vm, ..need(1) };
    assert_eq!(runnable(&vm, &n).unwrap_err().to_string(), "has no vm backend");
    let img = Need { image: "alpine:3".into(), ..need(1) };
    assert_eq!(runnable(&img, &n).unwrap_err().to_string(), "has no image alpine:3");
    assert_eq!(runnable(&need(5), &n).unwrap_err().to_string(), "has only 4 CPUs and 4096 MiB in all");
    // Full now is not "never": load does not count.
    let mut busy = n.clone();
    busy.take(&need(4));
    assert_eq!(runnable(&need(1), &busy), Ok(()));
    busy.up = false;
    assert_eq!(runnable(&need(1), &busy), Err(Unrunnable::Down));
    let mut mac = node("m", 4);
    (mac.os, mac.arch) = ("macos".into(), "aarch64".into());
    let darwin = Need { os: "darwin".into(), arch: "arm64".into(), ..need(1) };
    assert_eq!(runnable(&darwin, &mac), Ok(()));
}

#[test]
fn higher_priority_first_and_post_submit_newest_first() {
    let mut nodes = vec![node("a", 3)];
    let queue = vec![
        build(1, "p", Priority::PostSubmit, 1, 1),
        build(2, "p", Priority::PostSubmit, 3, 1),
        build(3, "p", Priority::PostSubmit, 2, 1),
        build(4, "p", Priority::Try, 9, 1),
        build(5, "p", Priority::Try, 5, 1),
        build(6, "p", Priority::Interactive, 7, 1),
    ];
    let plan = place(&mut nodes, &queue, &BTreeMap::new());
    assert_eq!(placed(&plan), vec![6, 5, 4]);
    let waiting: Vec<u64> = plan.waiting.iter().map(|w| w.build).collect();
    assert_eq!(waiting, vec![2, 3, 1], "post-submit waits newest first");
    assert_eq!(nodes[0].used_millicpus, 3000);

    let mut nodes = vec![node("a", 2)];
    let plan = place(&mut nodes, &queue[..3], &BTreeMap::new());
    assert_eq!(placed(&plan), vec![2, 3], "the newest commits are built first");
}

#[test]
fn fair_shares_across_projects() {
    // A project with a deep queue and one already running does not crowd
    // out the others: each turn goes to the project with fewest running.
    let mut nodes = vec![node("a", 4), node("b", 4)];
    let mut queue = Vec::new();
    for i in 0..100 {
        queue.push(build(i + 1, "big", Priority::PostSubmit, i + 1, 1));
    }
    queue.push(build(200, "small", Priority::PostSubmit, 1, 1));
    queue.push(build(201, "small", Priority::PostSubmit, 2, 1));
    queue.push(build(300, "tiny", Priority::PostSubmit, 1, 1));
    let running = BTreeMap::from([("big".to_string(), 1)]);
    let plan = place(&mut nodes, &queue, &running);
    let got: HashSet<u64> = placed(&plan).into_iter().collect();
    assert_eq!(got.len(), 8);
    for id in [200, 201, 300] {
        assert!(got.contains(&id), "build {id} of a small project waits behind a big one: {got:?}");
    }
}

#[test]
fn fairness_holds_round_after_round() {
    let mut rng = Rng::new(7);
    let mut nodes: Vec<NodeView> = (0..20).map(|i| node(&format!("n{i}"), 4)).collect();
    let mut waiting: Vec<Queued> = Vec::new();
    let mut id = 0;
    for (p, n) in [("a", 500u64), ("b", 50), ("c", 5), ("d", 200)] {
        for k in 0..n {
            id += 1;
            waiting.push(build(id, p, Priority::PostSubmit, k + 1, 1));
        }
    }
    let mut running: Vec<(u64, usize, String)> = Vec::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    while !waiting.is_empty() {
        // About a third of what runs finishes each round.
        running.retain(|(_, i, p)| {
            if rng.pct(33) {
                nodes[*i].release(&need(1));
                *counts.get_mut(p).unwrap() -= 1;
                false
            } else {
                true
            }
        });
        let plan = place(&mut nodes, &waiting, &counts);
        let by_id: HashMap<u64, &Queued> = waiting.iter().map(|q| (q.id, q)).collect();
        let mut got = HashSet::new();
        for p in &plan.placements {
            let q = by_id[&p.build];
            *counts.entry(q.project.clone()).or_default() += 1;
            running.push((q.id, p.node, q.project.clone()));
            got.insert(q.project.clone());
        }
        waiting.retain(|q| !plan.placements.iter().any(|p| p.build == q.id));
        let still: HashSet<&str> = waiting.iter().map(|q| q.project.as_str()).collect();
        if let Some(least) = still.iter().map(|p| counts.get(*p).copied().unwrap_or(0)).min() {
            for p in &got {
                assert!(
                    counts[p] <= least + 1,
                    "{p} got a slot at {} running while a project still waiting has {least}: {counts:?}",
                    counts[p]
                );
            }
        }
    }
}

#[test]
fn a_waiting_big_build_holds_its_node_against_lower_levels() {
    let mut nodes = vec![node("a", 4)];
    nodes[0].take(&need(2));
    let queue = vec![build(1, "p", Priority::Try, 1, 4), build(2, "q", Priority::PostSubmit, 1, 1)];
    let plan = place(&mut nodes, &queue, &BTreeMap::new());
    assert!(plan.placements.is_empty(), "{plan:?}");
    assert_eq!(plan.waiting[0].reason, "its one runnable node is full");
    assert_eq!(plan.waiting[1].reason, "its one runnable node is held for higher-priority builds");

    assert_eq!(plan.held, vec![(0, 1)]);

    // A node the big build cannot use at all is not held, and of those it
    // can use only the one closest to fitting it is.
    let mut nodes = vec![node("a", 4), node("b", 2), node("c", 4)];
    nodes[0].take(&need(2));
    nodes[2].take(&need(3));
    let fresh = nodes.clone();
    let plan = place(&mut nodes, &queue, &BTreeMap::new());
    assert_eq!(plan.held, vec![(0, 1)]);
    assert_eq!(plan.placements, vec![Placement { build: 2, node: 1 }]);
    let queue = [queue[0].clone(), build(2, "q", Priority::PostSubmit, 1, 2)];
    let plan = place(&mut fresh.clone(), &queue, &BTreeMap::new());
    assert_eq!(plan.placements, vec![Placement { build: 2, node: 1 }], "not on the held node");
}

#[test]
fn least_loaded_and_warm_pools_first() {
    let mut nodes = vec![node("a", 8), node("b", 8), node("c", 8)];
    nodes[0].take(&need(4));
    nodes[1].take(&need(2));
    nodes[2].take(&need(6));
    let plan = place(&mut nodes, &[build(1, "p", Priority::Try, 1, 1)], &BTreeMap::new());
    assert_eq!(plan.placements, vec![Placement { build: 1, node: 1 }]);

    for n in &mut nodes {
        n.backends.push(BackendKind::Vm);
    }
    nodes[2].pools.insert("debian:12".into());
    let vm = Queued { need: Need { backend: BackendKind::Vm, ..need(1) }, ..build(2, "p", Priority::Try, 2, 1) };
    let plan = place(&mut nodes, &[vm], &BTreeMap::new());
    assert_eq!(plan.placements, vec![Placement { build: 2, node: 2 }], "the warm pool wins over load");
}

#[test]
fn reasons_say_what_no_node_has() {
    let mut nodes = vec![node("a", 4), node("b", 4), node("c", 2)];
    let mut q = build(1, "p", Priority::Try, 1, 1);
    q.need.image = "alpine:3".into();
    let plan = place(&mut nodes, &[q], &BTreeMap::new());
    assert_eq!(
        plan.waiting[0].reason,
        "no node can run linux-amd64 alpine:3 on process with 1 CPUs and 1024 MiB: 3 nodes: has no image alpine:3"
    );
    let plan = place(&mut [], &[build(2, "p", Priority::Try, 1, 1)], &BTreeMap::new());
    assert_eq!(plan.waiting[0].reason, "no nodes");

    let mut q = build(3, "p", Priority::Try, 1, 3);
    q.need.arch = "arm64".into();
    let plan = place(&mut nodes, &[q], &BTreeMap::new());
    assert!(plan.waiting[0].reason.ends_with("3 nodes: is amd64, not arm64"), "{}", plan.waiting[0].reason);

    for n in &mut nodes {
        n.take(&need(2));
    }
    let plan = place(&mut nodes, &[build(4, "p", Priority::Try, 1, 3)], &BTreeMap::new());
    assert_eq!(plan.waiting[0].reason, "all 2 runnable nodes are full");
}

/// 1,000 simulated nodes and 100,000 queued builds of mixed priority,
/// project and shape, placed pass after pass while builds finish: no node is
/// ever given more than it has, a build is placed once, no lower-priority
/// build takes a node a higher one waits for, the rare image's builds all go
/// to its one node, and everything runnable is built.
#[test]
fn simulation_of_a_thousand_nodes_and_a_hundred_thousand_builds() {
    let mut rng = Rng::new(0x5eed);
    let mut nodes = sim::fleet(1000, &mut rng);
    let mut waiting = sim::queue(100_000, 20, &mut rng);
    let total = waiting.len();
    let never: HashSet<u64> = waiting.iter().filter(|q| q.need.os == "windows").map(|q| q.id).collect();
    assert!(!never.is_empty());
    let mut running: Vec<(Queued, usize, u32)> = Vec::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut done: HashSet<u64> = HashSet::new();
    let mut passes = 0;
    loop {
        passes += 1;
        assert!(passes < 10_000, "the queue never drained");
        running.retain_mut(|(q, i, left)| {
            *left -= 1;
            if *left == 0 {
                nodes[*i].release(&q.need);
                *counts.get_mut(&q.project).unwrap() -= 1;
            }
            *left > 0
        });
        let plan = place(&mut nodes, &waiting, &counts);
        assert_eq!(plan.placements.len() + plan.waiting.len(), waiting.len(), "every build is placed or waits");

        let node_of: HashMap<u64, usize> = plan.placements.iter().map(|p| (p.build, p.node)).collect();
        let by_id: HashMap<u64, &Queued> = waiting.iter().map(|q| (q.id, q)).collect();
        // Every shape that waits for room at a level holds a node for it
        // (while one is left to hold), and no lower level went there.
        let mut held_for: HashMap<usize, Priority> = HashMap::new();
        for &(i, b) in &plan.held {
            let q = by_id[&b];
            assert!(!node_of.contains_key(&b));
            assert_eq!(runnable(&q.need, &nodes[i]), Ok(()));
            assert!(held_for.insert(i, q.priority).is_none(), "node {i} held twice");
        }
        for p in &plan.placements {
            let q = by_id[&p.build];
            let n = &nodes[p.node];
            assert!(done.insert(q.id), "build {} placed twice", q.id);
            assert_eq!(runnable(&q.need, n), Ok(()), "build {} on {}", q.id, n.name);
            if q.need.image == sim::RARE_IMAGE {
                assert_eq!(p.node, 0);
            }
            if let Some(&hp) = held_for.get(&p.node) {
                assert!(
                    hp >= q.priority,
                    "{:?} build {} went to {}, held for a {hp:?} build",
                    q.priority,
                    q.id,
                    n.name
                );
            }
        }
        for n in &nodes {
            assert!(n.used_millicpus <= n.millicpus && n.used_memory_bytes <= n.memory_bytes, "{n:?}");
        }
        for w in &plan.waiting {
            if never.contains(&w.build) {
                assert!(w.reason.starts_with("no node can run linux") || w.reason.contains("runs linux, not windows"));
            }
        }
        let mut next = Vec::with_capacity(waiting.len());
        for q in waiting {
            if let Some(&i) = node_of.get(&q.id) {
                *counts.entry(q.project.clone()).or_default() += 1;
                running.push((q, i, 1 + rng.below(4) as u32));
            } else {
                next.push(q);
            }
        }
        waiting = next;
        if running.is_empty() && plan.placements.is_empty() {
            break;
        }
    }
    let left: Vec<_> = waiting.iter().filter(|q| !never.contains(&q.id)).take(3).collect();
    assert!(left.is_empty(), "runnable builds never placed: {left:?}");
    assert_eq!(done.len() + never.len(), total, "everything runnable was built");
    assert!(waiting.iter().all(|q| never.contains(&q.id)));
}
