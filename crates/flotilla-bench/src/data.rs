//! The import workload: a deterministic ~1 GiB tar of a mixed tree,
//! generated once and cached.
//!
//! The tree is 20,000 files of 1-64 KiB in 200 directories plus 4 files of
//! 100 MiB, with pseudo-random (incompressible) content. It is written
//! straight into the tar: the tree itself is never needed on disk, only the
//! tarball both sides of the comparison read.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Where the tarball is cached between runs.
pub const DATA_DIR: &str = "/tmp/flotilla-bench-data";
/// Bump when the generated content changes, so stale caches are ignored.
const VERSION: u32 = 1;
const SMALL_FILES: u64 = 20_000;
const FILES_PER_DIR: u64 = 100;
const SMALL_MIN: u64 = 1 << 10;
const SMALL_MAX: u64 = 64 << 10;
const BIG_FILES: u64 = 4;
const BIG_SIZE: u64 = 100 << 20;
/// A fixed mtime keeps the tarball byte-for-byte reproducible.
const MTIME: u64 = 1_767_225_600;

/// The cached tarball and what it holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workload {
    pub tar: PathBuf,
    /// Size of the tar file: the bytes streamed by both sides.
    pub tar_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    /// Bytes of file content in the tree.
    pub content_bytes: u64,
}

/// Returns the cached workload, generating it first if absent.
pub fn ensure() -> anyhow::Result<Workload> {
    let dir = Path::new(DATA_DIR);
    let tar = dir.join(format!("workspace-v{VERSION}.tar"));
    let manifest = dir.join(format!("workspace-v{VERSION}.json"));
    if let Ok(text) = std::fs::read_to_string(&manifest)
        && let Ok(w) = serde_json::from_str::<Workload>(&text)
        && std::fs::metadata(&w.tar).map(|m| m.len()).ok() == Some(w.tar_bytes)
    {
        eprintln!("flotilla-bench: reusing {} ({:.2} GB)", w.tar.display(), w.tar_bytes as f64 / 1e9);
        return Ok(w);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!("flotilla-bench: generating {} (once; cached for later runs)", tar.display());
    let t = Instant::now();
    let partial = tar.with_extension("tar.partial");
    let (files, dirs, content_bytes) = generate(&partial).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &tar)?;
    let w = Workload { tar_bytes: std::fs::metadata(&tar)?.len(), tar, files, dirs, content_bytes };
    std::fs::write(&manifest, serde_json::to_vec_pretty(&w)?)?;
    eprintln!("flotilla-bench: generated {:.2} GB in {:.1} s", w.tar_bytes as f64 / 1e9, t.elapsed().as_secs_f64());
    Ok(w)
}

/// Writes the tar; returns (files, dirs, content bytes).
fn generate(path: &Path) -> anyhow::Result<(u64, u64, u64)> {
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, File::create(path)?));
    let mut sizes = SplitMix64(0x5eed_f10d_111a);
    let (mut files, mut dirs, mut content) = (0, 0, 0);
    for d in 0..SMALL_FILES / FILES_PER_DIR {
        append_dir(&mut tar, &format!("src/d{d:03}/"))?;
        dirs += 1;
    }
    append_dir(&mut tar, "big/")?;
    dirs += 1;
    let big_every = SMALL_FILES / BIG_FILES;
    for i in 0..SMALL_FILES {
        let size = SMALL_MIN + sizes.next() % (SMALL_MAX - SMALL_MIN + 1);
        let name = format!("src/d{:03}/f{:03}.bin", i / FILES_PER_DIR, i % FILES_PER_DIR);
        append_file(&mut tar, &name, size, i + 1)?;
        (files, content) = (files + 1, content + size);
        // Spread the big files through the stream rather than at one end.
        if (i + 1) % big_every == 0 {
            let b = (i + 1) / big_every - 1;
            append_file(&mut tar, &format!("big/blob{b}.bin"), BIG_SIZE, 1_000_000 + b)?;
            (files, content) = (files + 1, content + BIG_SIZE);
        }
    }
    let mut out = tar.into_inner()?;
    out.flush()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok((files, dirs, content))
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, name: &str) -> std::io::Result<()> {
    tar.append_data(&mut header(tar::EntryType::Directory, 0, 0o755), name, std::io::empty())
}

fn append_file<W: Write>(tar: &mut tar::Builder<W>, name: &str, size: u64, seed: u64) -> std::io::Result<()> {
    let noise = Noise { rng: SplitMix64(seed), left: size };
    tar.append_data(&mut header(tar::EntryType::Regular, size, 0o644), name, noise)
}

/// SplitMix64: tiny, fast, deterministic; good enough to defeat compression.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `left` pseudo-random bytes.
struct Noise {
    rng: SplitMix64,
    left: u64,
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.left as usize);
        for chunk in buf[..n].chunks_mut(8) {
            let word = self.rng.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}
