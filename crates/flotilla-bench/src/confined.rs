//! `confined-create`: what the egress policy and a disk limit add to
//! create → agent ready of a process sandbox, against a plain create on
//! the same node, interleaved.

use flotilla_api::{CreateSandboxRequest, NetworkMode, Resources};

use crate::node::Node;
use crate::report::{Case, Machine, Report, Unit};
use crate::scenarios::{now, target};

const DISK: u64 = 1 << 30;

pub async fn confined_create(node: &Node, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    const WARMUPS: usize = 2;
    let plain = CreateSandboxRequest::default();
    let outbound = CreateSandboxRequest { network: NetworkMode::Outbound, ..Default::default() };
    let disk = CreateSandboxRequest {
        resources: Resources { disk_bytes: Some(DISK), ..Default::default() },
        ..Default::default()
    };
    let both = CreateSandboxRequest { network: NetworkMode::Outbound, ..disk.clone() };
    let mut times: [Vec<f64>; 4] = Default::default();
    let reqs = [&plain, &outbound, &disk, &both];
    for i in 0..WARMUPS + iterations {
        // Each iteration starts with another case: what the one before
        // left to the kernel (a lazy unmount, a cgroup's removal) falls on
        // each in turn.
        for j in 0..reqs.len() {
            let k = (i + j) % reqs.len();
            let t = crate::images::create_ready_as(node, reqs[k]).await?;
            if i >= WARMUPS {
                times[k].push(t);
            }
        }
    }
    let [plain_t, outbound_t, disk_t, both_t] = times;
    let mut report = Report {
        scenario: "confined-create",
        description: "create → agent ready with outbound network under the egress policy and with a 1 GiB disk \
                      limit, against a plain create (network none, no disk), interleaved"
            .into(),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: WARMUPS,
        cases: vec![
            Case::measured(
                "create_plain",
                "client.create(default) until running; delete after, untimed",
                true,
                &plain_t,
            ),
            Case::measured(
                "create_outbound_egress",
                "network outbound: the helper (slirp4netns or pasta) in the node's egress group",
                false,
                &outbound_t,
            ),
            Case::measured(
                "create_disk_1g",
                "resources.disk_bytes 1 GiB: sparse image, mkfs.ext4, loop mount, tmpfs size=",
                false,
                &disk_t,
            ),
            Case::measured("create_outbound_disk", "both", false, &both_t),
        ],
        targets: vec![],
        notes: vec![
            "the egress policy costs nothing per create (the host's rules are installed once, at node start); \
                     outbound's cost is the network helper's start"
                .into(),
        ],
        details: serde_json::Value::Null,
    };
    report.set_ratios("create_plain");
    let ratio = |name: &str| report.case(name).and_then(|c| c.ratio_to_baseline);
    let (o, d, b) = (ratio("create_outbound_egress"), ratio("create_disk_1g"), ratio("create_outbound_disk"));
    let shown = |r: Option<f64>| r.map(|r| format!("{r:.2}x plain")).unwrap_or_default();
    report.targets = vec![
        target("outbound under the egress policy ≤ 1.1x plain create", o.map(|r| r <= 1.1), shown(o)),
        target("1 GiB disk limit ≤ 1.1x plain create", d.map(|r| r <= 1.1), shown(d)),
        target("both: reported", None, shown(b)),
    ];
    Ok(report)
}
