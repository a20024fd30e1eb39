//! Scenarios of the durable node: restart with many sandboxes to re-adopt,
//! and image import from an OCI layout.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_api::{ImportImageRequest, OperationState};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::data::Workload;
use crate::node::Node;
use crate::report::{Case, Machine, Report, Unit};
use crate::scenarios::{TAR_PIPE, now, sync, tar_x, target, warm};

/// Sandboxes running while the node restarts.
pub const RESTART_SANDBOXES: usize = 100;

/// Node restart (kill -9, start again) until it answers with every sandbox
/// re-adopted: with 100 running sandboxes, against the same node with none.
pub async fn restart(node: &mut Node, bin: &Path, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    let mut empty = Vec::new();
    for _ in 0..iterations {
        empty.push(ms(node.crash_and_restart(bin, 0).await?));
    }
    for i in 0..RESTART_SANDBOXES {
        crate::scenarios::new_sandbox(node).await.with_context(|| format!("creating sandbox {i}"))?;
    }
    let mut full = Vec::new();
    for _ in 0..iterations {
        full.push(ms(node.crash_and_restart(bin, RESTART_SANDBOXES).await?));
    }
    for s in node.client().list().await? {
        node.client().delete(&s.id).await.with_context(|| format!("deleting {}", s.id))?;
    }
    let mut report = Report {
        scenario: "restart",
        description: format!(
            "kill -9 of the node, then start to answering `ls` with all {RESTART_SANDBOXES} sandboxes re-adopted"
        ),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: 0,
        cases: vec![
            Case::measured(
                "restart_100",
                "spawn of `flotilla node` until GET /v1/sandboxes lists 100 running sandboxes",
                false,
                &full,
            ),
            Case::measured(
                "restart_empty",
                "the same node with no sandboxes (process start, store, socket)",
                true,
                &empty,
            ),
        ],
        targets: vec![],
        notes: vec!["each re-adoption checks the init's pid and start time and opens a pidfd".into()],
        details: json!({ "sandboxes": RESTART_SANDBOXES }),
    };
    report.set_ratios("restart_empty");
    let median = report.case("restart_100").and_then(|c| c.median());
    report.targets = vec![target(
        "restart with 100 sandboxes to ready: reported (the issue sets no bound)",
        None,
        median.map(|m| format!("{m:.1} ms")).unwrap_or_default(),
    )];
    Ok(report)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Builds an OCI image layout whose one layer is the workload tar
/// (uncompressed, hard-linked when on the same filesystem).
fn oci_layout(w: &Workload, dir: &Path) -> anyhow::Result<()> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(&w.tar)?, &mut hasher)?;
    let layer = hex(&hasher.finalize());
    let dest = blobs.join(&layer);
    if std::fs::hard_link(&w.tar, &dest).is_err() {
        std::fs::copy(&w.tar, &dest)?;
    }
    let write_blob = |data: Vec<u8>| -> anyhow::Result<(String, usize)> {
        let digest = hex(&Sha256::digest(&data));
        std::fs::write(blobs.join(&digest), &data)?;
        Ok((format!("sha256:{digest}"), data.len()))
    };
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer}")] },
        "config": {}
    }))?;
    let (config_digest, config_size) = write_blob(config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{layer}"), "size": w.tar_bytes }]
    }))?;
    let (manifest_digest, manifest_size) = write_blob(manifest)?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{ "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                            "size": manifest_size, "annotations": { "org.opencontainers.image.ref.name": "bench" } }]
        }))?,
    )?;
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Image import from an OCI layout (layer digest verified while it
/// unpacks), against `cat layer | tar -x` of the same bytes.
pub async fn oci_import(node: &Node, machine: &Machine, iterations: usize, w: &Workload) -> anyhow::Result<Report> {
    let layout = node.scratch("oci-layout");
    oci_layout(w, &layout).context("building the OCI layout")?;
    warm(&w.tar).context("reading the layer into the page cache")?;
    let mb = w.tar_bytes as f64 / 1e6;
    let (mut flotilla, mut tar_pipe) = (Vec::new(), Vec::new());
    for i in 0..iterations {
        let reference = format!("bench/oci:{i}");
        sync()?;
        let t = Instant::now();
        let req = ImportImageRequest { reference: reference.clone(), path: layout.display().to_string() };
        let op = node.client().import_image(&req).await.context("starting the import")?;
        let op = node.client().wait_operation(&op.id, Some(Duration::from_secs(1800)), |_| {}).await?;
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(op.state == OperationState::Succeeded, "the import failed: {:?}", op.error);
        node.client().delete_image(&reference).await.context("deleting the image")?;
        flotilla.push(mb / secs);
        tar_pipe.push(mb / tar_x(node, &w.tar, TAR_PIPE, i)?);
    }
    let _ = std::fs::remove_dir_all(&layout);
    let mut report = Report {
        scenario: "oci-import",
        description: format!(
            "image import of an OCI layout with one {:.2} GB uncompressed layer ({} files); warm",
            w.tar_bytes as f64 / 1e9,
            w.files
        ),
        date: now(),
        machine: machine.clone(),
        unit: Unit::MegabytesPerSec,
        warmups: 0,
        cases: vec![
            Case::measured(
                "flotilla_oci_import",
                "POST /v1/images {path: layout} until the operation succeeds (parse, verify sha256, unpack, commit)",
                false,
                &flotilla,
            ),
            Case::measured("tar_x_pipe", "sh -c 'cat LAYER | tar -x -C DIR' beside the node home", true, &tar_pipe),
        ],
        targets: vec![],
        notes: vec!["MB/s = layer bytes / 10^6 / seconds; the import also hashes every byte".into()],
        details: json!({ "workload": w }),
    };
    report.set_ratios("tar_x_pipe");
    let ratio = report.case("flotilla_oci_import").and_then(|c| c.ratio_to_baseline);
    report.targets = vec![target(
        "OCI import throughput against tar -x: reported (the issue sets no bound)",
        None,
        ratio.map(|r| format!("{:.0}% of tar -x", r * 100.0)).unwrap_or_default(),
    )];
    Ok(report)
}
