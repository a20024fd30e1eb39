//! Hostile tarballs: extraction must never panic and never write outside
//! its destination.
//!
//! The input is extracted (uncompressed, small limits) into `tmp/dest`.
//! Whether it succeeds or not, `tmp` must then hold nothing but `dest`, and
//! `dest` only what extraction may create: files, directories and relative
//! symlinks, with no setuid or setgid bits.
#![no_main]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use flotilla_agent::tarx::{self, Compression, TarLimits};
use libfuzzer_sys::fuzz_target;

/// Small enough that each run is quick, large enough for interesting trees.
const LIMITS: TarLimits = TarLimits { max_bytes: 1 << 20, max_entries: 256 };

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().expect("create a temp dir");
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).expect("create dest");

    let _ = tarx::extract(data, Compression::None, &dest, &LIMITS);

    let names: Vec<_> =
        fs::read_dir(tmp.path()).expect("read tmp").map(|e| e.expect("tmp entry").file_name()).collect();
    assert_eq!(names, ["dest"], "extraction wrote next to dest");
    check_and_unlock(&dest);
});

/// Walks `dir` without following symlinks, checking what extraction left
/// and making directories writable again so the temp dir can be removed
/// (archives may create read-only ones).
fn check_and_unlock(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let meta = fs::symlink_metadata(&dir).expect("stat dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode((meta.mode() & 0o7777) | 0o700))
            .expect("make dir writable");
        for entry in fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("dir entry").path();
            let meta = fs::symlink_metadata(&path).expect("stat entry");
            let kind = meta.file_type();
            assert_eq!(meta.mode() & 0o6000, 0, "setuid/setgid bit on {path:?}");
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_symlink() {
                let target = fs::read_link(&path).expect("read link");
                assert!(target.is_relative(), "absolute symlink {path:?} -> {target:?}");
            } else {
                assert!(kind.is_file(), "special file {path:?} ({kind:?})");
            }
        }
    }
}
