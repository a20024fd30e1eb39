//! Real-image scenarios, on Debian's own root (`mmdebstrap --variant=apt
//! --include=python3-minimal bookworm`, built once per machine by
//! `flotilla_testkit::images`): `images-import` (image import MB/s of the
//! tarball as it comes, against `tar -x -f` of it beside the node home) and
//! `images-create` (create → agent ready of a process sandbox from the
//! imported image, against `--image host`). `images` runs both.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_api::{CreateSandboxRequest, ImportImageRequest, OperationState, SandboxState};
use serde_json::json;

use crate::node::Node;
use crate::report::{Case, Machine, Report, Unit};
use crate::scenarios::{now, sync, tar_x, target, warm};

/// The baseline: GNU tar reading the file itself, as root (owners, modes,
/// the /dev nodes: everything the tarball holds).
const TAR_X: &str = "tar -x -f \"$1\" -C \"$2\"";
/// The image `images-create` boots.
const IMAGE: &str = "bench/debian:bookworm";
/// How long one import may take.
const IMPORT_DEADLINE: Duration = Duration::from_secs(1800);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The mmdebstrap tarball, built on first use (~25-60 s; needs root and a
/// Debian mirror). The testkit panics on failure: turned into an error here.
fn debian_tarball() -> anyhow::Result<PathBuf> {
    std::panic::catch_unwind(flotilla_testkit::images::debian_rootfs_tar).map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        anyhow::anyhow!("building the Debian rootfs with mmdebstrap failed: {why}")
    })
}

/// Imports `tar` as `reference` and waits; returns the image's digest.
async fn import(node: &Node, reference: &str, tar: &Path) -> anyhow::Result<String> {
    let req = ImportImageRequest { reference: reference.into(), path: tar.display().to_string() };
    let op = node.client().import_image(&req).await.context("starting the import")?;
    let op = node.client().wait_operation(&op.id, Some(IMPORT_DEADLINE), |_| {}).await?;
    anyhow::ensure!(op.state == OperationState::Succeeded, "the import of {reference} failed: {:?}", op.error);
    let img: flotilla_api::Image = serde_json::from_value(op.result.context("the import has no result")?)?;
    Ok(img.digest)
}

/// Image import of the mmdebstrap tarball through the node, against
/// `tar -x -f` of it into a fresh directory on the same filesystem;
/// interleaved, warm.
pub async fn images_import(node: &Node, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    let tar = debian_tarball()?;
    let bytes = std::fs::metadata(&tar).with_context(|| format!("{}", tar.display()))?.len();
    let mb = bytes as f64 / 1e6;
    warm(&tar).context("reading the tarball into the page cache")?;
    let (mut flotilla, mut tar_side) = (Vec::new(), Vec::new());
    let mut skipped = 0;
    for i in 0..iterations {
        let reference = format!("bench/debian-import:{i}");
        sync()?;
        let t = Instant::now();
        let digest = import(node, &reference, &tar).await?;
        let secs = t.elapsed().as_secs_f64();
        flotilla.push(mb / secs);
        if i == 0 {
            skipped = node.client().image(&reference).await.map(|img| img.skipped_special).unwrap_or(0);
        }
        // Untimed: the tag goes and its version with it, so the next
        // import unpacks everything again.
        node.client().delete_image(&reference).await.context("deleting the image")?;
        let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
        let version = node.home().join("images/versions").join(hex);
        if version.exists() {
            bail!("{} is still there after its only tag was deleted", version.display());
        }
        tar_side.push(mb / tar_x(node, &tar, TAR_X, i)?);
    }
    let mut report = Report {
        scenario: "images-import",
        description: format!(
            "image import of the mmdebstrap tarball (--variant=apt --include=python3-minimal bookworm, {mb:.0} MB, \
             /dev nodes and absolute symlinks as they come); warm"
        ),
        date: now(),
        machine: machine.clone(),
        unit: Unit::MegabytesPerSec,
        warmups: 0,
        cases: vec![
            Case::measured(
                "flotilla_image_import",
                "POST /v1/images {path: tarball} until the operation succeeds (hash, unpack resolving in the root, commit)",
                false,
                &flotilla,
            ),
            Case::measured(
                "tar_x_file",
                "sh -c 'tar -x -f TARBALL -C DIR' beside the node home, as root",
                true,
                &tar_side,
            ),
        ],
        targets: vec![],
        notes: vec![
            "MB/s = tarball bytes / 10^6 / seconds; the import also hashes every byte".into(),
            format!("the import skipped {skipped} device nodes/fifos, which tar -x creates"),
        ],
        details: json!({ "tarball_bytes": bytes, "skipped_special": skipped }),
    };
    report.set_ratios("tar_x_file");
    let ratio = report.case("flotilla_image_import").and_then(|c| c.ratio_to_baseline);
    report.targets = vec![target(
        "real-image import throughput against tar -x: reported (the issue sets no bound)",
        None,
        ratio.map(|r| format!("{:.0}% of tar -x", r * 100.0)).unwrap_or_default(),
    )];
    Ok(report)
}

/// Creates a process sandbox from `image` and returns how long until it was
/// running (the agent answered); deletes it after, untimed.
async fn create_ready(node: &Node, image: &str) -> anyhow::Result<f64> {
    let req = CreateSandboxRequest { image: Some(image.into()), ..Default::default() };
    create_ready_as(node, &req).await
}

/// How long `req` takes from create until the sandbox runs; deleted after,
/// untimed.
pub(crate) async fn create_ready_as(node: &Node, req: &CreateSandboxRequest) -> anyhow::Result<f64> {
    let image = req.image.as_deref().unwrap_or("host");
    let t = Instant::now();
    let sb = node.client().create(req).await.with_context(|| format!("creating a sandbox from {image}"))?;
    let elapsed = ms(t.elapsed());
    node.client().delete(&sb.id).await.with_context(|| format!("deleting sandbox {}", sb.id))?;
    if sb.state != SandboxState::Running {
        bail!("sandbox {} from {image} came back {} (error: {:?})", sb.id, sb.state, sb.error);
    }
    Ok(elapsed)
}

/// Create → agent ready of a process sandbox from the imported Debian
/// image (overlay on an idmapped lower layer), against `--image host`;
/// interleaved.
pub async fn images_create(node: &Node, machine: &Machine, iterations: usize) -> anyhow::Result<Report> {
    const WARMUPS: usize = 2;
    let tar = debian_tarball()?;
    if node.client().image(IMAGE).await.is_err() {
        import(node, IMAGE, &tar).await?;
    }
    let (mut debian, mut host) = (Vec::new(), Vec::new());
    for i in 0..WARMUPS + iterations {
        let d = create_ready(node, IMAGE).await?;
        let h = create_ready(node, "host").await?;
        if i >= WARMUPS {
            debian.push(d);
            host.push(h);
        }
    }
    node.client().delete_image(IMAGE).await.context("deleting the image")?;
    let mut report = Report {
        scenario: "images-create",
        description: "sandbox create → agent ready from the imported mmdebstrap image, against --image host".into(),
        date: now(),
        machine: machine.clone(),
        unit: Unit::Millis,
        warmups: WARMUPS,
        cases: vec![
            Case::measured(
                "flotilla_create_debian",
                "client.create(image bench/debian:bookworm) until the sandbox is returned; delete after, untimed",
                false,
                &debian,
            ),
            Case::measured(
                "flotilla_create_host",
                "client.create(image host) until the sandbox is returned; delete after, untimed",
                true,
                &host,
            ),
        ],
        targets: vec![],
        notes: vec!["the image's tree is attached through an idmapped mount under an overlay; host binds the host's system dirs".into()],
        details: serde_json::Value::Null,
    };
    report.set_ratios("flotilla_create_host");
    let ratio = report.case("flotilla_create_debian").and_then(|c| c.ratio_to_baseline);
    report.targets = vec![target(
        "create from a real image against --image host: reported (the issue sets no bound)",
        None,
        ratio.map(|r| format!("{r:.2}x --image host")).unwrap_or_default(),
    )];
    Ok(report)
}
