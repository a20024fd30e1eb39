//! The node's image store: root filesystems addressed `name:tag` and by
//! content digest.
//!
//! # Layout
//!
//! ```text
//! <home>/images/versions/<sha256 hex>/rootfs   one unpacked version, never changed
//! <home>/images/staging/<random>/              an import in progress (removed on failure
//!                                              and at start-up)
//! ```
//!
//! Tags live in the node's SQLite store (`images` table): `name:tag` →
//! digest plus where it came from. A sandbox records the version it booted
//! from as `name:tag@sha256:<hex>`, so promoting a tag to a new version never
//! changes a running sandbox's root, and deleting a tag whose version a
//! sandbox uses is refused (409).
//!
//! # Sources
//!
//! * a directory: packed as a tar stream, hashed, and unpacked (one pass, no
//!   temporary tarball); the digest is the hash of that stream;
//! * a plain rootfs tarball (`.tar`, `.tar.gz`, `.tar.zst`): unpacked as one
//!   layer while hashing the file;
//! * an OCI image layout (directory, or a tarball of one) and a `docker save`
//!   archive: the manifest's layers are applied in order with whiteouts,
//!   each layer's digest verified as it streams; the digest is the manifest's
//!   (OCI) or the config's, which is the image id (docker). A tarball of
//!   either is first unpacked into staging, since its blobs must be read in
//!   manifest order, not archive order.
//!
//! * an OCI registry ([`crate::registry`]): the platform manifest and its
//!   layers are downloaded into staging as an OCI layout (each layer hashed
//!   as it streams) and then applied by the same code as a local layout
//!   ([`Images::apply_pulled_blocking`]); the digest is the manifest's, so a
//!   pull and an import of the same layout give the same version.
//!
//! Every archive and layer goes through the agent's hostile-tar extractor
//! (`flotilla_agent::tarx`): absolute paths, `..`, links out of the tree,
//! devices and fifos are refused with the entry named.
//!
//! # Locks
//!
//! The images lock (DESIGN §5) serialises mutations of tags and versions:
//! the commit of an import, promote and delete. Unpacking happens in a
//! staging directory of its own, outside the lock, so a slow import never
//! blocks `ls`, `show` or another import's unpacking.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use flotilla_agent::tarx::{self, Compression, TarLimits};
use flotilla_api::{ApiError, ErrorCode, Image, ImportSummary, Timestamp};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError};

/// `name:tag` rules: lower-case name path, tag as in OCI.
pub fn parse_reference(r: &str) -> Result<(&str, &str), ApiError> {
    let bad = |why: &str| {
        ApiError::invalid(format!(
            "bad image reference {r:?}: {why} (write NAME:TAG, e.g. build-env:1 or team/debian:bookworm)"
        ))
    };
    let (name, tag) = r.rsplit_once(':').ok_or_else(|| bad("no tag"))?;
    if name.is_empty() || name.len() > 200 {
        return Err(bad("the name must be 1-200 characters"));
    }
    if name == "host" || name.starts_with("dir") && name.get(3..4) == Some(":") {
        return Err(bad("that name is reserved"));
    }
    let name_ok = name.split('/').all(|part| {
        !part.is_empty()
            && part.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
            && part.as_bytes()[0].is_ascii_alphanumeric()
    });
    if !name_ok {
        return Err(bad("the name takes lower-case letters, digits, '.', '_', '-' and '/' between parts"));
    }
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && tag.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        && tag.as_bytes()[0].is_ascii_alphanumeric();
    if !tag_ok {
        return Err(bad("the tag takes 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"));
    }
    Ok((name, tag))
}

/// The hex of a `sha256:<hex>` digest, checked.
pub fn digest_hex(d: &str) -> Option<&str> {
    let hex = d.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))).then_some(hex)
}

/// Progress of one import, as operation steps.
pub trait Progress: Sync {
    fn step(&self, name: &str, detail: Option<String>);
}

impl<F: Fn(&str, Option<String>) + Sync> Progress for F {
    fn step(&self, name: &str, detail: Option<String>) {
        self(name, detail)
    }
}

/// What an unpacked source turned out to be.
struct Unpacked {
    digest: String,
    format: &'static str,
    layers: Vec<String>,
    bytes: u64,
    /// Device nodes and fifos skipped, over all layers.
    skipped_special: u64,
    /// Extended attributes dropped, over all layers.
    dropped_xattrs: u64,
}

impl Unpacked {
    fn new(digest: String, format: &'static str, layers: Vec<String>) -> Unpacked {
        Unpacked { digest, format, layers, bytes: 0, skipped_special: 0, dropped_xattrs: 0 }
    }

    fn add(&mut self, s: &ImportSummary) {
        self.bytes += s.bytes;
        self.skipped_special += s.skipped_special;
        self.dropped_xattrs += s.dropped_xattrs;
    }
}

/// The image store.
#[derive(Debug)]
pub struct Images {
    root: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

/// One import's staging directory, `images/staging/<id>/`. Dropping it
/// removes the directory, so an error, a panic or a cancelled pull leaves
/// nothing behind (and whatever a crash leaves, [`Images::open`] removes).
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
}

impl Staging {
    /// Where the root filesystem is unpacked.
    pub fn rootfs(&self) -> PathBuf {
        self.path.join("rootfs")
    }

    /// Where a pull writes its OCI layout (`oci-layout`, `index.json`,
    /// `blobs/sha256/<hex>`); removed once applied.
    pub fn layout(&self) -> PathBuf {
        self.path.join("src")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            // Committed: renamed into `versions/`.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "could not remove a staging directory"),
        }
    }
}

fn store_err(e: StoreError) -> ApiError {
    ApiError::internal(format!("image records: {}", flotilla_agent::http::error_chain(&e)))
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ApiError {
    move |e| ApiError::internal(format!("{what}: {e}"))
}

fn tar_err(what: &str) -> impl FnOnce(tarx::ExtractError) -> ApiError + '_ {
    move |e| {
        let entry = e.entry().map(str::to_string);
        let mut err =
            ApiError::new(ErrorCode::UnprocessableTar, format!("{what}: {}", flotilla_agent::http::error_chain(&e)));
        if let Some(entry) = entry {
            err = err.with_details(serde_json::json!({ "entry": entry }));
        }
        err
    }
}

impl Images {
    /// Opens the store under `<home>/images`, removing staging left by a
    /// crash.
    pub fn open(home: &Path) -> Result<Images, ApiError> {
        let root = home.join("images");
        // The node's alone: an image may hold what its importer would not
        // show other users of the host (sandboxes get the trees the node
        // opens for them, never these paths).
        use std::os::unix::fs::PermissionsExt;
        for d in [root.clone(), root.join("versions"), root.join("staging")] {
            fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700))
                .map_err(io_err(format!("making {} private", d.display())))?;
        }
        if let Ok(rd) = fs::read_dir(root.join("staging")) {
            for e in rd.flatten() {
                tracing::info!(path = %e.path().display(), "removing an image import a crash interrupted");
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(Images { root, lock: tokio::sync::Mutex::new(()) })
    }

    /// The root filesystem of a stored version.
    pub fn rootfs(&self, hex: &str) -> PathBuf {
        self.root.join("versions").join(hex).join("rootfs")
    }

    /// `name:tag` → the canonical `name:tag@sha256:<hex>` a sandbox records.
    pub fn resolve(&self, store: &Store, reference: &str) -> Result<String, ApiError> {
        let img = self.get(store, reference)?;
        Ok(format!("{}@{}", img.reference, img.digest))
    }

    pub fn get(&self, store: &Store, reference: &str) -> Result<Image, ApiError> {
        store
            .image(reference)
            .map_err(store_err)?
            .ok_or_else(|| ApiError::not_found(format!("no image {reference:?} (see `flotilla image ls`)")))
    }

    /// Every tag, with the sandboxes using its version and its aliases.
    pub fn list(&self, store: &Store, in_use: &[(String, String)]) -> Result<Vec<Image>, ApiError> {
        let mut all = store.load_images().map_err(store_err)?;
        let copy = all.clone();
        for img in &mut all {
            img.used_by = in_use.iter().filter(|(_, d)| *d == img.digest).map(|(sandbox, _)| sandbox.clone()).collect();
            img.aliases = copy
                .iter()
                .filter(|o| o.digest == img.digest && o.reference != img.reference)
                .map(|o| o.reference.clone())
                .collect();
        }
        Ok(all)
    }

    /// A fresh staging directory (with an empty `rootfs`), removed when the
    /// returned guard drops unless [`Images`] committed it first.
    pub fn stage(&self) -> Result<Staging, ApiError> {
        let staging = Staging { path: self.root.join("staging").join(crate::node::new_id()) };
        fs::create_dir_all(staging.rootfs()).map_err(io_err("creating the staging directory"))?;
        Ok(staging)
    }

    /// Imports `source` (a path on this host) as `reference`. Blocking: run
    /// it on a blocking thread.
    pub fn import_blocking(
        &self,
        store: &Store,
        reference: &str,
        source: &Path,
        progress: &dyn Progress,
    ) -> Result<Image, ApiError> {
        parse_reference(reference)?;
        if !source.is_absolute() {
            return Err(ApiError::invalid(format!("image source {} must be an absolute path", source.display())));
        }
        let meta =
            fs::metadata(source).map_err(|e| ApiError::invalid(format!("image source {}: {e}", source.display())))?;
        let staging = self.stage()?;
        let rootfs = staging.rootfs();
        let unpacked = if meta.is_dir() {
            if source.join("oci-layout").is_file() {
                oci_layout(source, &rootfs, reference, "layer", progress)?
            } else {
                directory(source, &rootfs, progress)?
            }
        } else {
            archive(source, &staging.path, &rootfs, reference, progress)?
        };
        self.commit(store, staging, reference, &source.display().to_string(), unpacked, progress)
    }

    /// Applies what a registry pull left in `staging` (an OCI layout at
    /// [`Staging::layout`] holding one manifest and its layers) and commits
    /// it as `reference`, through the same layer code as a local OCI layout.
    /// `source` is the remote reference, recorded as the image's source.
    /// Blocking: run it on a blocking thread.
    pub fn apply_pulled_blocking(
        &self,
        store: &Store,
        staging: Staging,
        reference: &str,
        source: &str,
        progress: &dyn Progress,
    ) -> Result<Image, ApiError> {
        parse_reference(reference)?;
        let layout = staging.layout();
        let mut unpacked = oci_layout(&layout, &staging.rootfs(), reference, "applying", progress)?;
        unpacked.format = "oci_registry";
        // The blobs are applied: only the root filesystem is kept.
        fs::remove_dir_all(&layout).map_err(io_err("removing the downloaded layers"))?;
        self.commit(store, staging, reference, source, unpacked, progress)
    }

    /// Moves an unpacked staging directory into `versions/` (unless the same
    /// content is there already) and points `reference` at it.
    fn commit(
        &self,
        store: &Store,
        staging: Staging,
        reference: &str,
        source: &str,
        unpacked: Unpacked,
        progress: &dyn Progress,
    ) -> Result<Image, ApiError> {
        let hex = digest_hex(&unpacked.digest).expect("digests are made here").to_string();
        progress.step("committing", Some(unpacked.digest.clone()));
        let img = Image {
            reference: reference.to_string(),
            digest: unpacked.digest,
            source_format: unpacked.format.to_string(),
            source: source.to_string(),
            size_bytes: unpacked.bytes,
            layers: unpacked.layers,
            skipped_special: unpacked.skipped_special,
            dropped_xattrs: unpacked.dropped_xattrs,
            created_at: Timestamp::now(),
            used_by: vec![],
            aliases: vec![],
        };
        let _guard = self.lock.blocking_lock();
        let version = self.root.join("versions").join(&hex);
        // The same content imported before keeps its first copy; the
        // staging guard removes this one.
        if !version.exists() {
            fs::rename(&staging.path, &version).map_err(io_err("moving the image into place"))?;
        }
        drop(staging);
        let previous = self.get(store, reference).ok();
        store.put_image(&img).map_err(store_err)?;
        if let Some(prev) = previous {
            self.collect_locked(store, &prev.digest, &[]);
        }
        Ok(img)
    }

    /// Points `to` at the version `from` names.
    pub async fn promote(
        &self,
        store: &Store,
        from: &str,
        to: &str,
        in_use: &[(String, String)],
    ) -> Result<Image, ApiError> {
        parse_reference(to)?;
        let _guard = self.lock.lock().await;
        let src = self.get(store, from)?;
        let previous = self.get(store, to).ok();
        let img = Image { reference: to.to_string(), created_at: Timestamp::now(), ..src };
        store.put_image(&img).map_err(store_err)?;
        if let Some(prev) = previous {
            self.collect_locked(store, &prev.digest, in_use);
        }
        Ok(img)
    }

    /// Deletes a tag; its version goes too once nothing names or uses it.
    /// Refused while a sandbox uses the version.
    pub async fn delete(&self, store: &Store, reference: &str, in_use: &[(String, String)]) -> Result<(), ApiError> {
        let _guard = self.lock.lock().await;
        let img = self.get(store, reference)?;
        let users: Vec<&str> = in_use.iter().filter(|(_, d)| *d == img.digest).map(|(s, _)| s.as_str()).collect();
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "image {reference} is in use by sandbox(es) {}; delete them first",
                users.join(", ")
            ))
            .with_details(serde_json::json!({ "used_by": users })));
        }
        store.delete_image(reference).map_err(store_err)?;
        self.collect_locked(store, &img.digest, in_use);
        Ok(())
    }

    /// Removes a version no tag names and no sandbox uses. Images lock held.
    fn collect_locked(&self, store: &Store, digest: &str, in_use: &[(String, String)]) {
        let named = store.load_images().map(|all| all.iter().any(|i| i.digest == digest)).unwrap_or(true);
        let used = in_use.iter().any(|(_, d)| d == digest);
        if named || used {
            return;
        }
        if let Some(hex) = digest_hex(digest) {
            let dir = self.root.join("versions").join(hex);
            match fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(digest, "removed an image version nothing uses"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(digest, error = %e, "could not remove an unused image version"),
            }
        }
    }

    /// Versions on disk that no tag names (left when a sandbox kept one
    /// alive past its tag's deletion, or by a crash mid-commit).
    pub async fn collect_unused(&self, store: &Store, in_use: &[(String, String)]) {
        let _guard = self.lock.lock().await;
        let named: BTreeSet<String> =
            store.load_images().map(|all| all.into_iter().map(|i| i.digest).collect()).unwrap_or_default();
        let Ok(rd) = fs::read_dir(self.root.join("versions")) else { return };
        for e in rd.flatten() {
            let digest = format!("sha256:{}", e.file_name().to_string_lossy());
            if !named.contains(&digest) && !in_use.iter().any(|(_, d)| *d == digest) {
                self.collect_locked(store, &digest, in_use);
            }
        }
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing { inner, hash: Sha256::new(), bytes: 0 }
    }

    /// Reads to the end (a tar's padding after its trailer counts too) and
    /// returns `sha256:<hex>`.
    fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((format!("sha256:{}", hex(&self.hash.finalize())), self.bytes))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Image layers can be large; the workspace's default caps apply.
fn limits() -> TarLimits {
    TarLimits::default()
}

/// Sniffs gzip and zstd by their magic numbers.
fn sniff(path: &Path) -> io::Result<Compression> {
    let mut magic = [0u8; 4];
    let n = File::open(path)?.read(&mut magic)?;
    Ok(match &magic[..n.min(4)] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    })
}

/// Applies one layer file, verifying its digest when one is expected.
fn apply_layer(
    path: &Path,
    expect: Option<&str>,
    rootfs: &Path,
    label: &str,
) -> Result<(String, ImportSummary), ApiError> {
    let compression = sniff(path).map_err(io_err(format!("reading layer {label}")))?;
    let file = File::open(path).map_err(io_err(format!("opening layer {label}")))?;
    let mut reader = Hashing::new(io::BufReader::with_capacity(1 << 20, file));
    let summary =
        tarx::extract_layer(&mut reader, compression, rootfs, &limits()).map_err(tar_err(&format!("layer {label}")))?;
    let (digest, _) = reader.finish().map_err(io_err(format!("reading layer {label}")))?;
    if let Some(expect) = expect
        && expect != digest
    {
        return Err(ApiError::new(
            ErrorCode::UnprocessableTar,
            format!("layer {label} does not match its digest: expected {expect}, read {digest}"),
        ));
    }
    Ok((digest, summary))
}

fn directory(source: &Path, rootfs: &Path, progress: &dyn Progress) -> Result<Unpacked, ApiError> {
    progress.step("packing_directory", Some(source.display().to_string()));
    let (reader, writer) = io::pipe().map_err(io_err("making a pipe"))?;
    let src = source.to_path_buf();
    let packer = std::thread::spawn(move || tarx::pack(&src, writer).map(drop));
    let mut hashing = Hashing::new(reader);
    let extracted = tarx::extract_layer(&mut hashing, Compression::None, rootfs, &limits());
    let finished = hashing.finish();
    let packed = packer.join().map_err(|_| ApiError::internal("packing the directory panicked"))?;
    packed.map_err(io_err(format!("reading {}", source.display())))?;
    let summary = extracted.map_err(tar_err("directory"))?;
    let (digest, _) = finished.map_err(io_err("hashing the directory"))?;
    let mut unpacked = Unpacked::new(digest.clone(), "dir", vec![digest]);
    unpacked.add(&summary);
    Ok(unpacked)
}

fn archive(
    source: &Path,
    staging: &Path,
    rootfs: &Path,
    reference: &str,
    progress: &dyn Progress,
) -> Result<Unpacked, ApiError> {
    progress.step("reading_archive", Some(source.display().to_string()));
    // Unpack into `src` first; a plain rootfs is then moved into place,
    // a layout or docker archive is read from there.
    let src = staging.join("src");
    fs::create_dir_all(&src).map_err(io_err("creating the staging directory"))?;
    let compression = sniff(source).map_err(io_err(format!("reading {}", source.display())))?;
    let file = File::open(source).map_err(io_err(format!("opening {}", source.display())))?;
    let mut reader = Hashing::new(io::BufReader::with_capacity(1 << 20, file));
    let summary = tarx::extract_layer(&mut reader, compression, &src, &limits()).map_err(tar_err("image archive"))?;
    let (digest, _) = reader.finish().map_err(io_err(format!("reading {}", source.display())))?;
    // Image layers may hold any symlink, so from here on every file of the
    // unpacked archive is opened only when no symlink leads to it.
    let plain = |rel: &str| plain_file_inside(&src, Path::new(rel)).is_some();
    let unpacked = if plain("oci-layout") && plain("index.json") {
        oci_layout(&src, rootfs, reference, "layer", progress)?
    } else if plain("manifest.json") && fs::symlink_metadata(src.join("etc")).is_err() {
        docker_archive(&src, rootfs, reference, progress)?
    } else {
        fs::remove_dir(rootfs).map_err(io_err("replacing the staging root"))?;
        fs::rename(&src, rootfs).map_err(io_err("moving the root filesystem into place"))?;
        let mut unpacked = Unpacked::new(digest.clone(), "rootfs_tar", vec![digest]);
        unpacked.add(&summary);
        return Ok(unpacked);
    };
    let _ = fs::remove_dir_all(&src);
    Ok(unpacked)
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// A blob of an OCI layout, by digest, checked to be a plain file inside.
fn blob(layout: &Path, digest: &str) -> Result<PathBuf, ApiError> {
    let hex = digest_hex(digest)
        .ok_or_else(|| ApiError::new(ErrorCode::UnprocessableTar, format!("unsupported digest {digest:?}")))?;
    plain_file_inside(layout, &Path::new("blobs/sha256").join(hex))
        .ok_or_else(|| ApiError::new(ErrorCode::UnprocessableTar, format!("blob {digest} is missing from the layout")))
}

/// `root/rel` if it is a regular file reached without any symlink (every
/// component checked with `lstat`): an unpacked archive's symlinks may
/// point anywhere on the host, and a layout's files are never read
/// through one.
fn plain_file_inside(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut cur = root.to_path_buf();
    let mut parts = rel.components().peekable();
    while let Some(c) = parts.next() {
        let std::path::Component::Normal(name) = c else { return None };
        cur.push(name);
        let m = fs::symlink_metadata(&cur).ok()?;
        let ok = if parts.peek().is_some() { m.is_dir() } else { m.is_file() };
        if !ok {
            return None;
        }
    }
    Some(cur)
}

/// Reads a small JSON blob, verifying its digest.
fn json_blob<T: serde::de::DeserializeOwned>(path: &Path, expect: Option<&str>, what: &str) -> Result<T, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::UnprocessableTar, m);
    let meta = fs::metadata(path).map_err(|e| bad(format!("{what}: {e}")))?;
    if meta.len() > 16 << 20 {
        return Err(bad(format!("{what} is {} bytes; refusing a JSON document that large", meta.len())));
    }
    let data = fs::read(path).map_err(|e| bad(format!("{what}: {e}")))?;
    if let Some(expect) = expect {
        let got = format!("sha256:{}", hex(&Sha256::digest(&data)));
        if got != expect {
            return Err(bad(format!("{what} does not match its digest: expected {expect}, read {got}")));
        }
    }
    serde_json::from_slice(&data).map_err(|e| bad(format!("{what} is not valid: {e}")))
}

/// Applies the manifest of an OCI layout that `reference`'s tag names (else
/// this machine's platform, else the only one), each layer reported as step
/// `step` with detail `i/n digest`.
fn oci_layout(
    layout: &Path,
    rootfs: &Path,
    reference: &str,
    step: &str,
    progress: &dyn Progress,
) -> Result<Unpacked, ApiError> {
    let index_path = plain_file_inside(layout, Path::new("index.json"))
        .ok_or_else(|| ApiError::new(ErrorCode::UnprocessableTar, "index.json is missing or not a plain file"))?;
    let index: Index = json_blob(&index_path, None, "index.json")?;
    let tag = reference.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
    let pick = |ds: &[Descriptor]| -> Option<usize> {
        let named = ds.iter().position(|d| {
            d.annotations
                .get("org.opencontainers.image.ref.name")
                .is_some_and(|n| n == tag || n.ends_with(&format!(":{tag}")))
        });
        let platform =
            ds.iter().position(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == go_arch()));
        named.or(platform).or((ds.len() == 1).then_some(0)).or((!ds.is_empty()).then_some(0))
    };
    let first = pick(&index.manifests)
        .ok_or_else(|| ApiError::new(ErrorCode::UnprocessableTar, "index.json lists no manifests"))?;
    let mut digest = index.manifests[first].digest.clone();
    // An index may point at another index (multi-platform): descend.
    let manifest = loop {
        let m: Manifest = json_blob(&blob(layout, &digest)?, Some(&digest), "the manifest")?;
        if m.manifests.is_empty() {
            break m;
        }
        let i = pick(&m.manifests)
            .ok_or_else(|| ApiError::new(ErrorCode::UnprocessableTar, "an image index lists no manifests"))?;
        digest = m.manifests[i].digest.clone();
    };
    let n = manifest.layers.len();
    let mut unpacked = Unpacked::new(digest, "oci_layout", Vec::new());
    for (i, l) in manifest.layers.iter().enumerate() {
        progress.step(step, Some(format!("{}/{n} {}", i + 1, l.digest)));
        let (_, summary) = apply_layer(&blob(layout, &l.digest)?, Some(&l.digest), rootfs, &l.digest)?;
        unpacked.add(&summary);
        unpacked.layers.push(l.digest.clone());
    }
    Ok(unpacked)
}

#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// A path named inside a docker archive: relative, no `..`, a plain file.
fn inside(root: &Path, rel: &str) -> Result<PathBuf, ApiError> {
    let bad = |why: &str| ApiError::new(ErrorCode::UnprocessableTar, format!("manifest.json names {rel:?}: {why}"));
    let p = Path::new(rel);
    if p.is_absolute() || p.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return Err(bad("not a plain relative path"));
    }
    match plain_file_inside(root, p) {
        Some(full) => Ok(full),
        None if fs::symlink_metadata(root.join(p)).is_ok() => Err(bad("not a regular file reached without symlinks")),
        None => Err(bad("missing from the archive")),
    }
}

fn docker_archive(src: &Path, rootfs: &Path, reference: &str, progress: &dyn Progress) -> Result<Unpacked, ApiError> {
    let entries: Vec<DockerEntry> = json_blob(&inside(src, "manifest.json")?, None, "manifest.json")?;
    let entry = entries
        .iter()
        .find(|e| {
            e.repo_tags
                .as_ref()
                .is_some_and(|t| t.iter().any(|t| t == reference || t.ends_with(&format!("/{reference}"))))
        })
        .or_else(|| entries.first())
        .ok_or_else(|| ApiError::new(ErrorCode::UnprocessableTar, "manifest.json lists no images"))?;
    let config = inside(src, &entry.config)?;
    let config_bytes = fs::read(&config).map_err(io_err("reading the image config"))?;
    let digest = format!("sha256:{}", hex(&Sha256::digest(&config_bytes)));
    let n = entry.layers.len();
    let mut unpacked = Unpacked::new(digest, "docker_archive", Vec::new());
    for (i, rel) in entry.layers.iter().enumerate() {
        let path = inside(src, rel)?;
        // Newer docker writes layers as blobs/sha256/<hex>: verify those.
        let expect = rel.strip_prefix("blobs/sha256/").map(|h| format!("sha256:{h}"));
        progress.step("layer", Some(format!("{}/{n} {rel}", i + 1)));
        let (d, summary) = apply_layer(&path, expect.as_deref(), rootfs, rel)?;
        unpacked.add(&summary);
        unpacked.layers.push(d);
    }
    Ok(unpacked)
}

/// This machine's architecture as OCI names it.
pub(crate) fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_checked() {
        assert_eq!(parse_reference("build-env:1").unwrap(), ("build-env", "1"));
        assert_eq!(parse_reference("team/debian:bookworm").unwrap(), ("team/debian", "bookworm"));
        for bad in ["nodigits", ":1", "a:", "Up:1", "host:1", "a/../b:1", "a//b:1", "a:-x", "x y:1", "a:b/c"] {
            assert!(parse_reference(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn digests_are_checked() {
        let ok = format!("sha256:{}", "ab".repeat(32));
        assert!(digest_hex(&ok).is_some());
        assert!(digest_hex("sha256:../../etc").is_none());
        assert!(digest_hex(&format!("sha512:{}", "ab".repeat(32))).is_none());
    }

    #[test]
    fn docker_archive_paths_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("ok.tar"), b"").unwrap();
        assert!(inside(dir.path(), "ok.tar").is_ok());
        for bad in ["../x", "/etc/passwd", "a/../../x", "missing.tar", "."] {
            assert!(inside(dir.path(), bad).is_err(), "{bad} accepted");
        }
    }
}
