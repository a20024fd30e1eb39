//! `flotilla-bench`: measures Flotilla against a baseline run on the same
//! machine in the same run (DESIGN.md §8), and prints a table (and, with
//! `--json`, one JSON object per scenario).
//!
//! Scenarios: `create` (sandbox create → agent ready, vs `bwrap … true` and
//! `unshare … true`), `exec` (round trip of `true`, vs fork+exec of
//! `/bin/true`), `import` (workspace import MB/s of a ~1 GiB tar, vs
//! `cat | tar -x`), `stop-during-import` (stop latency while an import
//! streams, vs stopping an idle sandbox), and `all`.
//!
//! It starts its own throwaway `flotilla node` (which needs root) in a
//! scratch directory and stops it on the way out, even on error.
//!
//! It must never assert on timings: a slow run is a finding to report, not a
//! failure. Targets are printed as met or missed and the exit status only
//! says whether every scenario could run. It is a program, not a test, so it
//! never runs under `cargo test` on a busy machine.

#![forbid(unsafe_code)]

mod apps;
mod confined;
mod coordinator;
mod dashboard;
mod data;
mod durable;
mod images;
mod names;
mod node;
mod nothing_lost;
mod report;
mod scenarios;
mod schedule;
mod stats;
mod vm;

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::node::Node;
use crate::report::{Machine, Report};

/// Where the node home and the baseline's directories go (both on one
/// filesystem, and a disk rather than a tmpfs on hosts that mount /tmp so).
const SCRATCH_PARENT: &str = "/var/tmp";

const USAGE: &str =
    "usage: flotilla-bench <create|exec|import|stop-during-import|restart|oci-import|names|all|vm-kernel|vm-create|vm-exec|vm-import|vm|images-import|images-create|confined-create|images|app-start|app-restart|app-handover|apps|pm-events|commit-to-running|log-first-byte|coordinator|node-loss|schedule|dashboard-grid|dashboard-log|dashboard|log-ingest|log-follow|adopt|nothing-lost> [--iterations N] [--json]

`all` runs the process-backend and name-table scenarios; `vm` runs the four
microVM ones (they need QEMU, a guest kernel and a static flotilla build;
vm-kernel also the kernel `flotilla node setup-vm --build-kernel` makes,
found through $FLOTILLA_VM_KERNEL); `images` runs images-import and
images-create on Debian's own root (built once with mmdebstrap, which needs
a Debian mirror). `coordinator` runs pm-events (on SQLite and a throwaway
PostgreSQL: it needs Debian's `postgresql`), commit-to-running and
log-first-byte (each starts its own `flotilla dev`). `node-loss` runs dev with a
second node and kills it mid-build. `schedule` times the
scheduler's pure core over 1,000 simulated nodes and 100,000 builds.
`nothing-lost` runs log-ingest (200 MB printed as fast as it can, stored
byte for byte, vs cat into a file), log-follow (a 50 MB log read from byte
0, ms per MB) and adopt (two coordinators on a throwaway PostgreSQL, the
owner of a build killed -9).

Runs each scenario against its baseline in the same run and prints a table;
--json also prints one JSON object per scenario on stdout (tables go to stderr).
The node is started from the `flotilla` binary next to this one, or $FLOTILLA_BIN.
Must run as root (the node does).";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Create,
    Exec,
    Import,
    StopDuringImport,
    Restart,
    OciImport,
    Names,
    VmCreate,
    VmExec,
    VmImport,
    VmKernel,
    ImagesImport,
    ImagesCreate,
    ConfinedCreate,
    AppStart,
    AppRestart,
    AppHandover,
    PmEvents,
    CommitToRunning,
    LogFirstByte,
    Schedule,
    NodeLoss,
    DashboardGrid,
    DashboardLog,
    LogIngest,
    LogFollow,
    Adopt,
}

impl Scenario {
    const ALL: [Scenario; 7] = [
        Scenario::Create,
        Scenario::Exec,
        Scenario::Import,
        Scenario::StopDuringImport,
        Scenario::Restart,
        Scenario::OciImport,
        Scenario::Names,
    ];

    fn parse(s: &str) -> Option<Vec<Scenario>> {
        Some(match s {
            "create" => vec![Scenario::Create],
            "exec" => vec![Scenario::Exec],
            "import" => vec![Scenario::Import],
            "stop-during-import" => vec![Scenario::StopDuringImport],
            "restart" => vec![Scenario::Restart],
            "oci-import" => vec![Scenario::OciImport],
            "names" => vec![Scenario::Names],
            "all" => Scenario::ALL.to_vec(),
            "vm-create" => vec![Scenario::VmCreate],
            "vm-exec" => vec![Scenario::VmExec],
            "vm-import" => vec![Scenario::VmImport],
            "vm-kernel" => vec![Scenario::VmKernel],
            "vm" => vec![Scenario::VmKernel, Scenario::VmCreate, Scenario::VmExec, Scenario::VmImport],
            "images-import" => vec![Scenario::ImagesImport],
            "images-create" => vec![Scenario::ImagesCreate],
            "confined-create" => vec![Scenario::ConfinedCreate],
            "images" => vec![Scenario::ImagesImport, Scenario::ImagesCreate],
            "app-start" => vec![Scenario::AppStart],
            "app-restart" => vec![Scenario::AppRestart],
            "app-handover" => vec![Scenario::AppHandover],
            "apps" => vec![Scenario::AppStart, Scenario::AppRestart, Scenario::AppHandover],
            "pm-events" => vec![Scenario::PmEvents],
            "commit-to-running" => vec![Scenario::CommitToRunning],
            "log-first-byte" => vec![Scenario::LogFirstByte],
            "coordinator" => vec![Scenario::PmEvents, Scenario::CommitToRunning, Scenario::LogFirstByte],
            "schedule" => vec![Scenario::Schedule],
            "node-loss" => vec![Scenario::NodeLoss],
            "dashboard-grid" => vec![Scenario::DashboardGrid],
            "dashboard-log" => vec![Scenario::DashboardLog],
            "dashboard" => vec![Scenario::DashboardGrid, Scenario::DashboardLog],
            "log-ingest" => vec![Scenario::LogIngest],
            "log-follow" => vec![Scenario::LogFollow],
            "adopt" => vec![Scenario::Adopt],
            "nothing-lost" => vec![Scenario::LogIngest, Scenario::LogFollow, Scenario::Adopt],
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Create => "create",
            Scenario::Exec => "exec",
            Scenario::Import => "import",
            Scenario::StopDuringImport => "stop-during-import",
            Scenario::Restart => "restart",
            Scenario::OciImport => "oci-import",
            Scenario::Names => "names",
            Scenario::VmCreate => "vm-create",
            Scenario::VmExec => "vm-exec",
            Scenario::VmImport => "vm-import",
            Scenario::VmKernel => "vm-kernel",
            Scenario::ImagesImport => "images-import",
            Scenario::ImagesCreate => "images-create",
            Scenario::ConfinedCreate => "confined-create",
            Scenario::AppStart => "app-start",
            Scenario::AppRestart => "app-restart",
            Scenario::AppHandover => "app-handover",
            Scenario::PmEvents => "pm-events",
            Scenario::CommitToRunning => "commit-to-running",
            Scenario::LogFirstByte => "log-first-byte",
            Scenario::Schedule => "schedule",
            Scenario::NodeLoss => "node-loss",
            Scenario::DashboardGrid => "dashboard-grid",
            Scenario::DashboardLog => "dashboard-log",
            Scenario::LogIngest => "log-ingest",
            Scenario::LogFollow => "log-follow",
            Scenario::Adopt => "adopt",
        }
    }

    fn default_iterations(self) -> usize {
        match self {
            Scenario::Create => 30,
            Scenario::Exec => 200,
            Scenario::Import => 3,
            Scenario::StopDuringImport => 5,
            Scenario::Restart => 5,
            Scenario::OciImport => 3,
            Scenario::Names => 8,
            Scenario::VmCreate => 8,
            Scenario::VmExec => 100,
            Scenario::VmImport => 3,
            Scenario::VmKernel => 10,
            Scenario::ImagesImport => 5,
            Scenario::ImagesCreate => 20,
            Scenario::ConfinedCreate => 20,
            Scenario::AppStart => 10,
            Scenario::AppRestart => 20,
            Scenario::AppHandover => 3,
            Scenario::PmEvents => 3,
            Scenario::CommitToRunning => 10,
            Scenario::LogFirstByte => 10,
            Scenario::Schedule => 3,
            Scenario::NodeLoss => 3,
            Scenario::DashboardGrid => 30,
            Scenario::DashboardLog => 5,
            Scenario::LogIngest => 3,
            Scenario::LogFollow => 5,
            Scenario::Adopt => 5,
        }
    }

    fn needs_workload(self) -> bool {
        matches!(self, Scenario::Import | Scenario::StopDuringImport | Scenario::OciImport)
    }
}

#[derive(Debug)]
struct Args {
    scenarios: Vec<Scenario>,
    iterations: Option<usize>,
    json: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> anyhow::Result<Option<Args>> {
    let (mut scenarios, mut iterations, mut json) = (None, None, false);
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--json" => json = true,
            "--iterations" | "-n" => {
                let v = inline.or_else(|| args.next()).context("--iterations needs a number")?;
                let n: usize = v.parse().with_context(|| format!("--iterations {v:?} is not a number"))?;
                anyhow::ensure!(n > 0, "--iterations must be at least 1");
                iterations = Some(n);
            }
            s if !s.starts_with('-') && scenarios.is_none() => {
                scenarios = Some(Scenario::parse(s).with_context(|| format!("unknown scenario {s:?}\n\n{USAGE}"))?);
            }
            other => bail!("unexpected argument {other:?}\n\n{USAGE}"),
        }
    }
    let scenarios = scenarios.with_context(|| format!("which scenario?\n\n{USAGE}"))?;
    Ok(Some(Args { scenarios, iterations, json }))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("flotilla-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("flotilla-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the scenarios; `Ok(false)` if any of them could not finish.
fn run(args: &Args) -> anyhow::Result<bool> {
    let workload = if args.scenarios.iter().any(|s| s.needs_workload()) { Some(data::ensure()?) } else { None };
    // The scheduler's core needs no node (and no root).
    if args.scenarios.iter().all(|s| *s == Scenario::Schedule) {
        let machine = Machine::probe(Path::new(SCRATCH_PARENT));
        let rt = tokio::runtime::Builder::new_current_thread().build().context("starting the runtime")?;
        let report = rt.block_on(schedule::schedule(&machine, args.iterations.unwrap_or(3)))?;
        if args.json {
            eprint!("{}", report.table());
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", report.table());
        }
        return Ok(true);
    }
    let bin = Node::binary()?;
    // One lean thread for the client, as the CLI does: the node gets the
    // machine's cores.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async {
        let mut node = Node::start(&bin, Path::new(SCRATCH_PARENT)).await?;
        let machine = Machine::probe(node.home());
        eprintln!(
            "flotilla-bench: node {} ({} cpus, {:.1} GiB, kernel {}, {}; home on {})",
            bin.display(),
            machine.nproc,
            machine.memory_bytes as f64 / (1u64 << 30) as f64,
            machine.kernel,
            machine.cpu,
            machine.node_home_fs
        );
        let mut all_ran = true;
        for &s in &args.scenarios {
            let n = args.iterations.unwrap_or_else(|| s.default_iterations());
            eprintln!("flotilla-bench: running {} ({n} iterations)", s.name());
            let result: anyhow::Result<Report> = match s {
                Scenario::Create => scenarios::create(&node, &machine, n).await,
                Scenario::Exec => scenarios::exec(&node, &machine, n).await,
                Scenario::Import => scenarios::import(&node, &machine, n, workload.as_ref().expect("loaded")).await,
                Scenario::StopDuringImport => {
                    scenarios::stop_during_import(&node, &machine, n, workload.as_ref().expect("loaded")).await
                }
                Scenario::Restart => durable::restart(&mut node, &bin, &machine, n).await,
                Scenario::Names => names::names_scenario(&machine, n).await,
                Scenario::VmCreate => vm::vm_create(&node, &machine, n).await,
                Scenario::VmExec => vm::vm_exec(&node, &machine, n).await,
                Scenario::VmImport => vm::vm_import(&node, &machine, n).await,
                Scenario::VmKernel => vm::vm_kernel(&node, &machine, n).await,
                Scenario::ImagesImport => images::images_import(&node, &machine, n).await,
                Scenario::ImagesCreate => images::images_create(&node, &machine, n).await,
                Scenario::ConfinedCreate => confined::confined_create(&node, &machine, n).await,
                Scenario::AppStart => apps::app_start(&node, &machine, n).await,
                Scenario::AppRestart => apps::app_restart(&node, &machine, n).await,
                Scenario::AppHandover => apps::app_handover(&mut node, &bin, &machine, n).await,
                Scenario::PmEvents => coordinator::pm_events(&machine, n).await,
                Scenario::CommitToRunning => coordinator::commit_to_running(&bin, &machine, n).await,
                Scenario::LogFirstByte => coordinator::log_first_byte(&bin, &machine, n).await,
                Scenario::Schedule => schedule::schedule(&machine, n).await,
                Scenario::NodeLoss => coordinator::node_loss(&bin, &machine, n).await,
                Scenario::LogIngest => nothing_lost::log_ingest(&bin, &machine, n).await,
                Scenario::LogFollow => nothing_lost::log_follow(&bin, &machine, n).await,
                Scenario::Adopt => nothing_lost::adopt(&bin, &machine, n).await,
                Scenario::DashboardGrid => dashboard::dashboard_grid(&machine, n).await,
                Scenario::DashboardLog => dashboard::dashboard_log(&bin, &machine, n).await,
                Scenario::OciImport => {
                    durable::oci_import(&node, &machine, n, workload.as_ref().expect("loaded")).await
                }
            };
            match result {
                Ok(report) => {
                    if args.json {
                        eprint!("{}", report.table());
                        println!("{}", serde_json::to_string(&report)?);
                    } else {
                        print!("{}", report.table());
                    }
                }
                Err(e) => {
                    all_ran = false;
                    let tail = node.log_tail();
                    eprintln!("flotilla-bench: scenario {} failed: {e:#}\nthe node's log ends:\n{tail}", s.name());
                }
            }
        }
        Ok(all_ran)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> anyhow::Result<Option<Args>> {
        parse_args(s.split_whitespace().map(str::to_string))
    }

    #[test]
    fn arguments() {
        let a = parse("all --iterations 3 --json").unwrap().unwrap();
        assert_eq!((a.scenarios.len(), a.iterations, a.json), (Scenario::ALL.len(), Some(3), true));
        let a = parse("--iterations=7 exec").unwrap().unwrap();
        assert_eq!((a.scenarios, a.iterations, a.json), (vec![Scenario::Exec], Some(7), false));
        assert!(parse("--help").unwrap().is_none());
        assert!(parse("bogus").is_err());
        assert!(parse("create --iterations 0").is_err());
        assert!(parse("create extra").is_err());
        assert!(parse("").is_err());
    }
}
