//! A simulated fleet and queue for the scheduler's core: what the
//! simulation test checks and `flotilla-bench schedule` times. Seeded and
//! deterministic, so a failure can be replayed.

use std::collections::BTreeSet;

use flotilla_api::types::BackendKind;

use super::{Need, NodeView, Priority, Queued};

/// xorshift64*: small, fast and good enough to shuffle a simulation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() >> 32) * n) >> 32
    }

    /// True with probability `pct`/100.
    pub fn pct(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// The one image only a single node has (node 0).
pub const RARE_IMAGE: &str = "rare/toolchain:1";

/// `n` nodes: mostly linux/amd64, a fifth arm64; every node has
/// `debian:12`, half `ubuntu:24.04`, node 0 (amd64) alone [`RARE_IMAGE`]; half can
/// run microVMs and a tenth of those keep a warm pool; 4, 8 or 16 CPUs.
pub fn fleet(n: usize, rng: &mut Rng) -> Vec<NodeView> {
    (0..n)
        .map(|i| {
            let cpus = [4u64, 8, 16][rng.below(3) as usize];
            let vm = rng.pct(50);
            let mut images: BTreeSet<String> = ["debian:12".to_string()].into();
            if rng.pct(50) {
                images.insert("ubuntu:24.04".into());
            }
            if i == 0 {
                images.insert(RARE_IMAGE.into());
            }
            let pools = if vm && rng.pct(10) { ["debian:12".to_string()].into() } else { BTreeSet::new() };
            NodeView {
                name: format!("node-{i:04}"),
                os: "linux".into(),
                arch: if i > 0 && rng.pct(20) { "aarch64".into() } else { "x86_64".into() },
                backends: if vm { vec![BackendKind::Process, BackendKind::Vm] } else { vec![BackendKind::Process] },
                images,
                pools,
                millicpus: cpus * 1000,
                memory_bytes: (cpus * 2) << 30,
                used_millicpus: 0,
                used_memory_bytes: 0,
                up: true,
            }
        })
        .collect()
}

/// The builders the simulated projects use, the last one runnable nowhere.
pub fn builders() -> Vec<Need> {
    let need = |arch: &str, image: &str, backend, cpus: u64, gib: u64| Need {
        os: "linux".into(),
        arch: arch.into(),
        image: image.into(),
        backend,
        millicpus: cpus * 1000,
        memory_bytes: gib << 30,
    };
    vec![
        need("amd64", "debian:12", BackendKind::Process, 1, 1),
        need("amd64", "debian:12", BackendKind::Process, 2, 4),
        need("amd64", "ubuntu:24.04", BackendKind::Process, 1, 2),
        need("arm64", "debian:12", BackendKind::Process, 1, 1),
        need("amd64", "debian:12", BackendKind::Vm, 2, 2),
        need("amd64", "debian:12", BackendKind::Process, 8, 16),
        need("amd64", RARE_IMAGE, BackendKind::Process, 1, 1),
        Need { os: "windows".into(), ..need("amd64", "windows:2025", BackendKind::Vm, 2, 4) },
    ]
}

/// `n` queued builds over `projects` projects of skewed size (project `k`
/// gets about twice the builds of project `k+1`): 1% interactive, 20% try,
/// the rest post-submit; each with one of [`builders`], mostly small ones,
/// the rare image's and the unrunnable one seldom.
pub fn queue(n: usize, projects: usize, rng: &mut Rng) -> Vec<Queued> {
    let builders = builders();
    (0..n)
        .map(|i| {
            let mut p = 0;
            while p + 1 < projects && rng.pct(50) {
                p += 1;
            }
            let priority = match rng.below(100) {
                0 => Priority::Interactive,
                1..=20 => Priority::Try,
                _ => Priority::PostSubmit,
            };
            // Shares per mille: small builds most, the big and the rare
            // ones seldom, the unrunnable one once in a thousand.
            let b = match rng.below(1000) {
                0 => 7,
                1..=2 => 6,
                3..=52 => 5,
                53..=202 => 4,
                203..=402 => 3,
                403..=552 => 2,
                553..=702 => 1,
                _ => 0,
            };
            Queued {
                id: i as u64 + 1,
                project: format!("project-{p:02}"),
                priority,
                order: i as u64 / 4 + 1,
                need: builders[b].clone(),
            }
        })
        .collect()
}
