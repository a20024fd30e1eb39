//! Scenario `names`: name table mounts and resolves per second, for the
//! embedded store and for the etcd store, against raw `etcd-client` puts
//! and gets on the same loopback etcd in the same run.
//!
//! Samples are milliseconds per 1000 operations (one sample per batch), so
//! lower is better like every other scenario and a case's ratio is its
//! cost over its own baseline's; operations per second are in the targets,
//! notes and details. Cases run interleaved batch by batch.
//!
//! The etcd cases run at two depths of pipelining: one request in flight
//! (each operation pays a full round trip) and [`PIPELINED`] in flight over
//! the client's one HTTP/2 connection (what a busy server sees). etcd
//! fsyncs every write, so put and mount throughput says as much about the
//! disk under the data dir as about the code; both sides pay it alike.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_names::etcd_client::PutOptions;
use flotilla_names::testing::EtcdServer;
use flotilla_names::{EtcdConfig, EtcdStore, MemoryStore, Name, NamesClient, ServerHandle, Store};
use futures_util::StreamExt;
use serde_json::json;

use crate::report::{Case, Machine, Report, Target, Unit};
use crate::stats::Stats;

/// Operations per batch on the embedded store: enough that a batch lasts
/// tens of milliseconds, well above timer noise.
const MEMORY_BATCH: usize = 20_000;
/// Operations per batch against etcd, one in flight.
const ETCD_BATCH: usize = 500;
/// Operations per batch against etcd, pipelined.
const ETCD_PIPELINED_BATCH: usize = 2_000;
/// Requests in flight in the pipelined etcd cases.
const PIPELINED: usize = 32;
/// Resolves per batch through the HTTP server (a new connection each, as
/// the CLI makes them).
const HTTP_BATCH: usize = 500;
/// Distinct names mounted and resolved.
const NAMES: usize = 1_000;
/// TTL of every bench mount: long enough never to expire mid-run.
const TTL: Duration = Duration::from_secs(600);

fn now() -> String {
    flotilla_api::Timestamp::now().to_string()
}

/// Milliseconds per 1000 operations.
fn per_1000(elapsed: Duration, ops: usize) -> f64 {
    elapsed.as_secs_f64() * 1e3 * 1000.0 / ops as f64
}

/// Operations per second from a per-1000 figure.
fn ops_per_sec(ms_per_1000: f64) -> f64 {
    if ms_per_1000 > 0.0 { 1e6 / ms_per_1000 } else { f64::NAN }
}

/// Runs `op(0..n)` with `depth` in flight and returns the wall time.
async fn timed<F, Fut>(n: usize, depth: usize, op: F) -> anyhow::Result<Duration>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    let mut results = futures_util::stream::iter(0..n).map(op).buffer_unordered(depth);
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(started.elapsed())
}

/// One case's samples as it is filled.
struct Series {
    name: &'static str,
    description: String,
    baseline: bool,
    /// The case whose cost this one is compared with.
    against: Option<&'static str>,
    samples: Vec<f64>,
}

impl Series {
    fn new(name: &'static str, description: String, baseline: bool, against: Option<&'static str>) -> Series {
        Series { name, description, baseline, against, samples: Vec::new() }
    }

    fn push(&mut self, record: bool, elapsed: Duration, ops: usize) {
        if record {
            self.samples.push(per_1000(elapsed, ops));
        }
    }
}

fn names() -> anyhow::Result<Vec<Name>> {
    (0..NAMES).map(|i| Name::parse(&format!("bench/n{i}")).context("bench name")).collect()
}

/// The scenario: see the module doc. Starts (and always stops) its own etcd.
pub async fn names_scenario(machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    const WARMUPS: usize = 1;
    let etcd = EtcdServer::start().context("starting a loopback etcd (apt-get install etcd-server)")?;
    let etcd_fs = std::process::Command::new("df")
        .args(["--output=fstype"])
        .arg(etcd.scratch())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().nth(1).map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let store = EtcdStore::connect(&EtcdConfig::new(etcd.url()).with_prefix("/bench/names/"))
        .await
        .context("connecting to etcd")?;
    let raw = store.client().clone();
    let memory = MemoryStore::new();
    let names = names()?;
    let deep: Vec<Name> = (0..NAMES)
        .map(|i| Name::parse(&format!("bench/n{i}/sandboxes/x")).context("bench name"))
        .collect::<anyhow::Result<_>>()?;
    let raw_keys: Vec<String> = (0..NAMES).map(|i| format!("/bench/raw/n{i}")).collect();
    let raw_lease_keys: Vec<String> = (0..NAMES).map(|i| format!("/bench/raw-leased/n{i}")).collect();
    let lease = raw.lease_client().grant(TTL.as_secs() as i64, None).await.context("granting a lease")?.id();
    // A value the size of the store's record, so both sides move the same bytes.
    let raw_value = format!("{{\"expires_at_ms\":{}}}", flotilla_api::Timestamp::now().millis());
    const SERVER: &str = "http://127.0.0.1:7000";

    // The HTTP front of the embedded store, for the informational case.
    let shared: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the name table")?;
    let http = ServerHandle::spawn(listener, shared.clone()).context("serving the name table")?;
    let client = NamesClient::connect(&http.url()).context("name table client")?;
    for n in &names {
        shared.mount(n, SERVER, TTL).await.context("mounting for the HTTP case")?;
    }

    let mut mem_mount = Series::new(
        "memory_mount",
        format!("MemoryStore::mount of {NAMES} names round-robin, {MEMORY_BATCH} per batch, one thread"),
        false,
        None,
    );
    let mut mem_resolve = Series::new(
        "memory_resolve",
        format!("MemoryStore::resolve of `bench/nI/sandboxes/x` (3 prefixes looked up), {MEMORY_BATCH} per batch"),
        false,
        None,
    );
    let mut raw_put =
        Series::new("etcd_raw_put", format!("etcd-client put, 1 in flight, {ETCD_BATCH} per batch"), true, None);
    let mut raw_put_lease = Series::new(
        "etcd_raw_put_lease",
        format!(
            "etcd-client put attached to a lease (what any TTL'd write costs), 1 in flight, {ETCD_BATCH} per batch"
        ),
        true,
        None,
    );
    let mut store_mount = Series::new(
        "etcd_mount",
        format!("EtcdStore::mount (put with a shared lease), 1 in flight, {ETCD_BATCH} per batch"),
        false,
        Some("etcd_raw_put"),
    );
    let mut raw_get =
        Series::new("etcd_raw_get", format!("etcd-client get, 1 in flight, {ETCD_BATCH} per batch"), true, None);
    let mut store_resolve = Series::new(
        "etcd_resolve",
        format!("EtcdStore::resolve of `bench/nI` (one txn, 2 range reads), 1 in flight, {ETCD_BATCH} per batch"),
        false,
        Some("etcd_raw_get"),
    );
    let mut raw_put_p = Series::new(
        "etcd_raw_put_p32",
        format!("etcd-client put, {PIPELINED} in flight, {ETCD_PIPELINED_BATCH} per batch"),
        true,
        None,
    );
    let mut raw_put_lease_p = Series::new(
        "etcd_raw_put_lease_p32",
        format!("etcd-client put attached to a lease, {PIPELINED} in flight, {ETCD_PIPELINED_BATCH} per batch"),
        true,
        None,
    );
    let mut store_mount_p = Series::new(
        "etcd_mount_p32",
        format!("EtcdStore::mount, {PIPELINED} in flight, {ETCD_PIPELINED_BATCH} per batch"),
        false,
        Some("etcd_raw_put_p32"),
    );
    let mut raw_get_p = Series::new(
        "etcd_raw_get_p32",
        format!("etcd-client get, {PIPELINED} in flight, {ETCD_PIPELINED_BATCH} per batch"),
        true,
        None,
    );
    let mut store_resolve_p = Series::new(
        "etcd_resolve_p32",
        format!("EtcdStore::resolve, {PIPELINED} in flight, {ETCD_PIPELINED_BATCH} per batch"),
        false,
        Some("etcd_raw_get_p32"),
    );
    let mut http_resolve = Series::new(
        "http_resolve_memory",
        format!(
            "NamesClient::resolve over loopback HTTP (new connection each) to a MemoryStore, {HTTP_BATCH} per batch"
        ),
        false,
        None,
    );

    for i in 0..WARMUPS + iterations {
        let record = i >= WARMUPS;

        let t = Instant::now();
        for k in 0..MEMORY_BATCH {
            memory.mount(&names[k % NAMES], SERVER, TTL).await?;
        }
        mem_mount.push(record, t.elapsed(), MEMORY_BATCH);

        let t = Instant::now();
        for k in 0..MEMORY_BATCH {
            memory.resolve(&deep[k % NAMES]).await?;
        }
        mem_resolve.push(record, t.elapsed(), MEMORY_BATCH);

        for (depth, batch, put, put_lease, mount, get, resolve) in [
            (1, ETCD_BATCH, &mut raw_put, &mut raw_put_lease, &mut store_mount, &mut raw_get, &mut store_resolve),
            (
                PIPELINED,
                ETCD_PIPELINED_BATCH,
                &mut raw_put_p,
                &mut raw_put_lease_p,
                &mut store_mount_p,
                &mut raw_get_p,
                &mut store_resolve_p,
            ),
        ] {
            let d = timed(batch, depth, |k| {
                let mut kv = raw.kv_client();
                let (key, value) = (raw_keys[k % NAMES].clone(), raw_value.clone());
                async move {
                    kv.put(key, value, None).await.context("raw put")?;
                    Ok(())
                }
            })
            .await?;
            put.push(record, d, batch);

            let d = timed(batch, depth, |k| {
                let mut kv = raw.kv_client();
                let (key, value) = (raw_lease_keys[k % NAMES].clone(), raw_value.clone());
                async move {
                    kv.put(key, value, Some(PutOptions::new().with_lease(lease))).await.context("raw leased put")?;
                    Ok(())
                }
            })
            .await?;
            put_lease.push(record, d, batch);

            let d = timed(batch, depth, |k| {
                let (store, name) = (&store, &names[k % NAMES]);
                async move {
                    store.mount(name, SERVER, TTL).await.context("store mount")?;
                    Ok(())
                }
            })
            .await?;
            mount.push(record, d, batch);

            let d = timed(batch, depth, |k| {
                let mut kv = raw.kv_client();
                let key = raw_keys[k % NAMES].clone();
                async move {
                    let got = kv.get(key, None).await.context("raw get")?;
                    anyhow::ensure!(!got.kvs().is_empty(), "raw get found nothing");
                    Ok(())
                }
            })
            .await?;
            get.push(record, d, batch);

            let d = timed(batch, depth, |k| {
                let (store, name) = (&store, &names[k % NAMES]);
                async move {
                    store.resolve(name).await.context("store resolve")?;
                    Ok(())
                }
            })
            .await?;
            resolve.push(record, d, batch);
        }

        let d = timed(HTTP_BATCH, 1, |k| {
            let (client, name) = (&client, &names[k % NAMES]);
            async move {
                client.resolve(name.as_str()).await.context("HTTP resolve")?;
                Ok(())
            }
        })
        .await?;
        http_resolve.push(record, d, HTTP_BATCH);
    }

    let etcdctl = etcdctl_baseline(&etcd.url());
    http.shutdown().await.context("stopping the name table server")?;
    drop(store);
    drop(etcd);

    let series = vec![
        mem_mount,
        mem_resolve,
        raw_put,
        raw_put_lease,
        store_mount,
        raw_get,
        store_resolve,
        raw_put_p,
        raw_put_lease_p,
        store_mount_p,
        raw_get_p,
        store_resolve_p,
        http_resolve,
    ];
    let mut cases: Vec<Case> =
        series.iter().map(|s| Case::measured(s.name, &s.description, s.baseline, &s.samples)).collect();
    for (case, s) in cases.iter_mut().zip(&series) {
        let reference = s.against.and_then(|a| series.iter().find(|b| b.name == a));
        case.ratio_to_baseline =
            match (Stats::from_samples(&s.samples), reference.and_then(|r| Stats::from_samples(&r.samples))) {
                (Some(m), Some(r)) if r.median > 0.0 => Some(m.median / r.median),
                _ => None,
            };
    }
    let mut report = Report {
        scenario: "names",
        description: "name table mounts and resolves: embedded store, etcd store vs raw etcd-client (ms per 1000 ops)"
            .into(),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: WARMUPS,
        cases,
        targets: vec![],
        notes: vec![],
        details: serde_json::Value::Null,
    };
    let rate = |name: &str| report.case(name).and_then(Case::median).map(ops_per_sec);
    let at_least = |what: &str, name: &str, goal: f64| {
        let r = rate(name);
        Target {
            description: format!("embedded ≥ {}k {what}/s on one core", goal / 1e3),
            met: r.map(|r| r >= goal),
            observed: r.map_or("no samples".into(), |r| format!("{:.0}k {what}/s", r / 1e3)),
        }
    };
    let within = |name: &str, of: &str| {
        let median = |n: &str| report.case(n).and_then(Case::median);
        let r = match (median(name), median(of)) {
            (Some(m), Some(b)) if b > 0.0 => Some(m / b),
            _ => None,
        };
        Target {
            description: format!("{name} within 1.5x of {of}"),
            met: r.map(|r| r <= 1.5),
            observed: r.map_or("no samples".into(), |r| {
                format!("{r:.2}x ({:.0} vs {:.0} ops/s)", rate(name).unwrap_or(f64::NAN), rate(of).unwrap_or(f64::NAN))
            }),
        }
    };
    let targets = vec![
        at_least("resolves", "memory_resolve", 100_000.0),
        at_least("mounts", "memory_mount", 50_000.0),
        within("etcd_mount", "etcd_raw_put"),
        within("etcd_resolve", "etcd_raw_get"),
        within("etcd_mount_p32", "etcd_raw_put_p32"),
        within("etcd_mount", "etcd_raw_put_lease"),
        within("etcd_mount_p32", "etcd_raw_put_lease_p32"),
        within("etcd_resolve_p32", "etcd_raw_get_p32"),
    ];
    let rates: serde_json::Map<String, serde_json::Value> =
        report.cases.iter().map(|c| (c.name.clone(), json!(c.median().map(ops_per_sec)))).collect();
    report.notes.push(format!(
        "ops/s (medians): {}",
        report
            .cases
            .iter()
            .map(|c| format!("{} {:.0}", c.name, c.median().map(ops_per_sec).unwrap_or(f64::NAN)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report.notes.push(format!("etcd data dir on {etcd_fs}; etcd fsyncs each write, both sides alike"));
    match &etcdctl {
        Ok((put, get)) => report.notes.push(format!(
            "etcdctl (a process per operation): put median {:.1} ms, get median {:.1} ms",
            put.median, get.median
        )),
        Err(why) => report.notes.push(format!("etcdctl baseline unavailable: {why}")),
    }
    report.targets = targets;
    report.details = json!({
        "ops_per_sec_median": rates,
        "batch": {"memory": MEMORY_BATCH, "etcd": ETCD_BATCH, "etcd_pipelined": ETCD_PIPELINED_BATCH, "http": HTTP_BATCH},
        "pipelined_in_flight": PIPELINED,
        "distinct_names": NAMES,
        "etcd_data_dir_fs": etcd_fs,
        "etcdctl_ms": etcdctl.as_ref().ok().map(|(p, g)| json!({"put": p, "get": g})),
    });
    Ok(report)
}

/// `etcdctl put` and `get`, one process each, timed spawn → exit.
fn etcdctl_baseline(url: &str) -> Result<(Stats, Stats), String> {
    const RUNS: usize = 20;
    if !EtcdServer::etcdctl_available() {
        return Err("`etcdctl` is not installed (Debian package etcd-client)".into());
    }
    let run = |args: &[&str]| -> Result<f64, String> {
        let t = Instant::now();
        let st = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(url)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("running etcdctl: {e}"))?;
        if !st.success() {
            return Err(format!("etcdctl {} failed: {st}", args.join(" ")));
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let (mut puts, mut gets) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        puts.push(run(&["put", "/bench/etcdctl", "v"])?);
        gets.push(run(&["get", "/bench/etcdctl"])?);
    }
    match (Stats::from_samples(&puts), Stats::from_samples(&gets)) {
        (Some(p), Some(g)) => Ok((p, g)),
        _ => Err("no samples".into()),
    }
}
