//! Workspace tarballs: import ([`extract`]), export ([`pack`]), listing
//! ([`list`]), removal ([`remove_all`]) and the `?dir=` check
//! ([`resolve_dir`], [`ensure_dir`]).
//!
//! # Threat model
//!
//! The body of `PUT /workspace` is hostile. [`extract`] must never create,
//! change or remove anything outside `dest`, whatever the archive says, and
//! must refuse (not silently skip) anything it will not extract, with an
//! error naming the member. Extraction is not transactional: members before
//! the refused one stay written. That is safe — they are inside `dest` —
//! and a client that wants a clean tree removes it and imports again.
//!
//! # How a member is extracted
//!
//! 1. The archive is read in *raw* mode: pax headers and GNU long names are
//!    read here, each capped at [`MAX_EXTENSION_BYTES`], instead of letting
//!    the `tar` crate buffer a long-name member of any size. A pax `size`
//!    that disagrees with the header is refused, so this reader and any
//!    other can never disagree about where a member ends.
//! 2. The member path is checked lexically (`normalize`): no absolute
//!    path, no `..`, no NUL, components within `NAME_MAX`. `.` components
//!    and a leading `./` are dropped; a member naming `dest` itself is
//!    skipped.
//! 3. Limits are counted before anything is written: every member, and
//!    every parent directory created for one, against `max_entries`; every
//!    member's data size against `max_bytes` (so data that is skipped still
//!    counts, which bounds decompression bombs too).
//! 4. Only regular files, directories, symlinks and hard links are accepted.
//!    Devices, fifos and sparse files are refused.
//! 5. Nothing is written through a symlink. Each parent directory is checked
//!    with `lstat` (and created if missing); a symlink or non-directory on
//!    the way refuses the member. Directories checked or created during this
//!    import are remembered, so a sorted archive costs one hash lookup per
//!    member; the memory is dropped whenever a directory is removed.
//! 6. The final path is created with `O_CREAT | O_EXCL | O_NOFOLLOW`. If
//!    something is already there it is removed first (a directory member
//!    keeps an existing directory), so an existing symlink or hard link in
//!    `dest` is replaced, never written through.
//! 7. Symlink targets must be relative and must not climb out of `dest`
//!    when resolved lexically from the link's directory. Hard link targets
//!    must be existing regular files in `dest`, reached without symlinks.
//! 8. File modes are applied with `fchmod` (so the agent's umask does not
//!    matter), minus setuid and setgid ([`MODE_MASK`]). Directories are
//!    created writable and get their own mode and mtime at the end, deepest
//!    first, after re-checking that they are still directories reached
//!    without symlinks — so read-only directories extract, and a directory
//!    later replaced by a symlink is not chmod-ed through it.
//!
//! # Races
//!
//! The checks are path based (std has no `openat`), so a process running in
//! the sandbox could swap a directory for a symlink between a check and the
//! write. The agent runs inside the sandbox with that process's privileges,
//! so winning the race gains it nothing it could not do directly; what the
//! checks defend against is the archive, which comes from outside.
//!
//! # Image layers
//!
//! [`extract_layer`] applies one layer of a container image with the same
//! checks, plus two things layers need: OCI whiteouts (`.wh.NAME` removes
//! `NAME` from the layers below, `.wh..wh..opq` empties its directory of
//! what the layers below put there; neither touches what this layer itself
//! created), and the owners recorded in the archive (the node extracts
//! images as root).
//!
//! Symlink targets are checked lexically only: a chain of in-tree symlinks
//! can still resolve outside `dest`. Extraction itself never follows a
//! symlink, and code in the sandbox can create any symlink it likes anyway,
//! so workspace symlinks are never trusted by anything outside it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use flotilla_api::limits::{DEFAULT_TAR_MAX_BYTES, DEFAULT_TAR_MAX_ENTRIES};
use flotilla_api::{EntryKind, ImportSummary, LsEntry};
use tar::{Archive, Builder, EntryType, Header, HeaderMode};

/// Mode bits kept from an archive: permissions and the sticky bit. Setuid
/// and setgid are dropped: a workspace has no use for them, and a setuid
/// binary planted by an upload is exactly what a sandbox should not grow.
pub const MODE_MASK: u32 = 0o1777;

/// Largest pax header or GNU long name/link member accepted. These are
/// buffered whole; Linux paths fit in 4 KiB, and 1 MiB leaves room for pax
/// records such as xattrs while keeping a hostile one from eating memory.
pub const MAX_EXTENSION_BYTES: u64 = 1 << 20;

/// Read buffer in front of the (decompressed) stream. Headers are read 512
/// bytes at a time; without it each would be a syscall or a decoder call.
/// Reads of file data this large or larger bypass it.
const READ_BUF_BYTES: usize = 256 << 10;

/// Buffer file contents are copied through, allocated once per import.
/// Large enough that big files go to disk in few writes.
const COPY_BUF_BYTES: usize = 256 << 10;

/// Write buffer for [`pack`], so 512-byte headers do not each become a
/// write on whatever the caller handed us.
const PACK_BUF_BYTES: usize = 256 << 10;

/// After the end-of-archive marker, at most this much more is read: enough
/// to consume record padding and let a compressed stream verify its
/// checksum, not enough for trailing junk to keep the import busy.
const MAX_TRAILER_BYTES: u64 = 1 << 20;

/// Symlinks followed while resolving one image-layer path inside the root
/// before it is refused, as the kernel's `ELOOP` (Linux allows 40).
const MAX_SYMLINK_HOPS: u32 = 40;

/// Longest path component Linux accepts (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// Longest path accepted from an archive or a caller (`PATH_MAX` minus the
/// terminating NUL).
const PATH_MAX: usize = 4095;

/// Cap on the memory of the known-directories cache (sum of path
/// lengths). It is only a cache: when full it is emptied and refilled.
const KNOWN_DIRS_MAX_BYTES: usize = 16 << 20;

/// Member names longer than this are shortened in errors, so a hostile
/// long name does not come back as a megabyte of error message.
const MAX_NAME_IN_ERROR: usize = PATH_MAX + 1;

/// Mode for directories while an import runs (implicit parents keep it,
/// minus the umask, as `tar -x` does): owner-writable so members can be
/// written into directories the archive marks read-only.
const WORK_DIR_MODE: u32 = 0o755;

/// Caps on what one import may create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TarLimits {
    /// Total data size of all members (file contents, plus any data carried
    /// by other members, which is read and discarded).
    pub max_bytes: u64,
    /// Number of members (files, directories, links, global pax headers)
    /// plus parent directories created because a member needed them.
    pub max_entries: u64,
}

impl Default for TarLimits {
    fn default() -> Self {
        TarLimits { max_bytes: DEFAULT_TAR_MAX_BYTES, max_entries: DEFAULT_TAR_MAX_ENTRIES }
    }
}

/// How the tar stream is compressed, from the request's `Content-Encoding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Maps a `Content-Encoding` value (case-insensitive, as HTTP says).
    pub fn from_content_encoding(v: Option<&str>) -> Result<Compression, ExtractError> {
        let Some(v) = v else {
            return Ok(Compression::None);
        };
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(Compression::None),
            "gzip" | "x-gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(ExtractError::UnsupportedEncoding(v.to_owned())),
        }
    }
}

/// Why an import (or a path check) failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The member could escape `dest` or is of a kind we never create.
    #[error("refusing tar entry {entry:?}: {reason}")]
    Hostile { entry: String, reason: String },
    /// Extracting the member would go over a [`TarLimits`] cap.
    #[error("tar entry {entry:?} goes over the limit of {limit} {what}")]
    OverLimit { entry: String, what: &'static str, limit: u64 },
    /// The stream is not a tar, is corrupt or truncated, or its compression
    /// is broken. Read errors from the underlying reader land here too.
    #[error("not a valid tar stream")]
    Format {
        #[source]
        source: io::Error,
    },
    /// Creating or writing something on our side failed.
    #[error("could not write {entry:?}")]
    Io {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("unsupported content encoding {0:?}")]
    UnsupportedEncoding(String),
}

impl ExtractError {
    /// The member (or caller-supplied path) the error is about, if any.
    pub fn entry(&self) -> Option<&str> {
        match self {
            ExtractError::Hostile { entry, .. }
            | ExtractError::OverLimit { entry, .. }
            | ExtractError::Io { entry, .. } => Some(entry),
            ExtractError::Format { .. } | ExtractError::UnsupportedEncoding(_) => None,
        }
    }
}

fn hostile(entry: &str, reason: impl Into<String>) -> ExtractError {
    ExtractError::Hostile { entry: entry.to_owned(), reason: reason.into() }
}

fn io_error(entry: &str, source: io::Error) -> ExtractError {
    ExtractError::Io { entry: entry.to_owned(), source }
}

/// A stream error, with the reader's message cut to its first line: the
/// `tar` crate quotes header bytes in some messages, and a file that is not
/// a tar at all (say `/etc/passwd` given as an image) must not come back to
/// the caller in the error.
fn format(source: io::Error) -> ExtractError {
    let text = source.to_string();
    let first = text.lines().next().unwrap_or("");
    if first.len() == text.len() && first.len() <= MAX_FORMAT_MESSAGE {
        return ExtractError::Format { source };
    }
    let mut short: String = first.chars().take(MAX_FORMAT_MESSAGE).collect();
    short.push('…');
    ExtractError::Format { source: io::Error::new(source.kind(), short) }
}

/// Longest reader message kept in a [`ExtractError::Format`].
const MAX_FORMAT_MESSAGE: usize = 80;

fn corrupt(kind: io::ErrorKind, msg: String) -> ExtractError {
    ExtractError::Format { source: io::Error::new(kind, msg) }
}

/// Extracts a tar stream into `dest` (which must exist). Returns what it
/// wrote: `entries` counts the members processed, `bytes` the file content
/// written. On error, members before the failing one remain in `dest`;
/// nothing is ever written outside it. See the module docs for the rules.
///
/// After the end-of-archive marker the rest of the stream is read (up to
/// 1 MiB) so a compressed stream's checksum is verified: a corrupt or
/// truncated trailer is a `Format` error even though every member was
/// written. Memory use is bounded except for the list of directory
/// members whose modes are applied at the end (as in GNU tar).
pub fn extract<R: Read>(
    reader: R,
    compression: Compression,
    dest: &Path,
    limits: &TarLimits,
) -> Result<ImportSummary, ExtractError> {
    extract_with(reader, compression, dest, limits, false)
}

/// Applies one image layer onto `dest`: [`extract`] plus whiteouts and
/// owners (see the module docs).
pub fn extract_layer<R: Read>(
    reader: R,
    compression: Compression,
    dest: &Path,
    limits: &TarLimits,
) -> Result<ImportSummary, ExtractError> {
    extract_with(reader, compression, dest, limits, true)
}

fn extract_with<R: Read>(
    reader: R,
    compression: Compression,
    dest: &Path,
    limits: &TarLimits,
    layer: bool,
) -> Result<ImportSummary, ExtractError> {
    let started = Instant::now();
    let counts = match compression {
        Compression::None => extract_tar(BufReader::with_capacity(READ_BUF_BYTES, reader), dest, limits, layer),
        Compression::Gzip => {
            let decoder = flate2::read::MultiGzDecoder::new(reader);
            extract_tar(BufReader::with_capacity(READ_BUF_BYTES, decoder), dest, limits, layer)
        }
        Compression::Zstd => {
            let decoder = zstd::stream::read::Decoder::new(reader).map_err(format)?;
            extract_tar(BufReader::with_capacity(READ_BUF_BYTES, decoder), dest, limits, layer)
        }
    }?;
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(ImportSummary { duration_ms, ..counts })
}

fn extract_tar<R: Read>(
    reader: R,
    dest: &Path,
    limits: &TarLimits,
    layer: bool,
) -> Result<ImportSummary, ExtractError> {
    match fs::metadata(dest) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(io_error(".", io::Error::from(io::ErrorKind::NotADirectory)));
        }
        Err(e) => return Err(io_error(".", e)),
    }
    let mut archive = Archive::new(reader);
    let mut x = Extractor::new(dest, limits);
    if layer {
        x.layer = Some(HashSet::new());
    }
    for member in archive.entries().map_err(format)?.raw(true) {
        x.member(&mut member.map_err(format)?)?;
    }
    if x.pending.is_some() {
        return Err(corrupt(
            io::ErrorKind::UnexpectedEof,
            "archive ends after an extension header, without the member it describes".into(),
        ));
    }
    let mut rest = archive.into_inner();
    io::copy(&mut (&mut rest).take(MAX_TRAILER_BYTES), &mut io::sink()).map_err(format)?;
    x.apply_dir_metadata()?;
    Ok(ImportSummary {
        entries: x.entries,
        bytes: x.written,
        duration_ms: 0,
        skipped_special: x.skipped_special,
        dropped_xattrs: x.dropped_xattrs,
    })
}

/// Extension headers seen since the last real member.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Pending {
    fn is_some(&self) -> bool {
        self.long_name.is_some() || self.long_link.is_some() || self.pax.is_some()
    }
}

/// The pax records we act on.
#[derive(Default)]
struct PaxFields<'a> {
    path: Option<&'a [u8]>,
    linkpath: Option<&'a [u8]>,
    size: Option<&'a [u8]>,
    uid: Option<&'a [u8]>,
    gid: Option<&'a [u8]>,
    sparse: bool,
    /// Extended attribute records (`SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`):
    /// counted, never applied.
    xattrs: u64,
}

impl<'a> PaxFields<'a> {
    /// Parses `"<len> <key>=<value>\n"` records. Values may contain
    /// newlines (binary xattrs do), so records are split by their length,
    /// not by line. Later records override earlier ones; an empty value
    /// removes the field, as POSIX says.
    fn parse(mut data: &'a [u8]) -> Result<PaxFields<'a>, ExtractError> {
        let bad = || corrupt(io::ErrorKind::InvalidData, "malformed pax extended header".into());
        let mut f = PaxFields::default();
        while !data.is_empty() {
            if data.iter().all(|&b| b == 0) {
                break;
            }
            let space = data.iter().position(|&b| b == b' ').ok_or_else(bad)?;
            let len: usize = std::str::from_utf8(&data[..space])
                .ok()
                .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?;
            if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
                return Err(bad());
            }
            let record = &data[space + 1..len - 1];
            let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            let value = (!value.is_empty()).then_some(value);
            match key {
                b"path" => f.path = value,
                b"linkpath" => f.linkpath = value,
                b"size" => f.size = value,
                b"uid" => f.uid = value,
                b"gid" => f.gid = value,
                k if k.starts_with(b"GNU.sparse.") => f.sparse = true,
                k if k.starts_with(b"SCHILY.xattr.") || k.starts_with(b"LIBARCHIVE.xattr.") => f.xattrs += 1,
                _ => {}
            }
            data = &data[len..];
        }
        Ok(f)
    }
}

/// A directory whose mode and mtime are applied at the end.
struct DirMeta {
    rel: PathBuf,
    mode: u32,
    mtime: Option<SystemTime>,
}

/// How far a path could be walked without following a symlink.
enum Reach {
    /// Every component is a real directory.
    Dirs,
    /// A component is missing or is not a directory.
    Stopped,
    /// This prefix (relative) is a symlink.
    Symlink(PathBuf),
}

/// Walks `rel` under `root` with `lstat`, never following a symlink.
fn reach(root: &Path, rel: &Path) -> io::Result<Reach> {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                let prefix = cur.strip_prefix(root).unwrap_or(&cur).to_path_buf();
                return Ok(Reach::Symlink(prefix));
            }
            Ok(_) => return Ok(Reach::Stopped),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Reach::Stopped),
            Err(e) => return Err(e),
        }
    }
    Ok(Reach::Dirs)
}

/// Validates a member or caller path lexically and returns it relative to
/// the root, or `None` if it names the root itself. The error is the reason.
fn normalize(raw: &[u8]) -> Result<Option<PathBuf>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute paths are not allowed");
    }
    normalize_relative(raw)
}

/// [`normalize`] for image layers: a leading `/` is dropped, as Docker
/// does (some image builders write `/usr/bin/x`); `..` is still refused.
fn normalize_layer(raw: &[u8]) -> Result<Option<PathBuf>, &'static str> {
    let start = raw.iter().position(|&b| b != b'/').unwrap_or(raw.len());
    normalize_relative(&raw[start..])
}

fn normalize_relative(raw: &[u8]) -> Result<Option<PathBuf>, &'static str> {
    if raw.contains(&0) {
        return Err("path contains a NUL byte");
    }
    if raw.len() > PATH_MAX {
        return Err("path is longer than PATH_MAX");
    }
    let mut out = PathBuf::with_capacity(raw.len());
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("`..` path components are not allowed"),
            c if c.len() > NAME_MAX => return Err("a path component is longer than NAME_MAX"),
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Checks a symlink target. In image layers any target is kept as it is
/// (absolute ones too: they mean the image's root, and every path the
/// extractor opens is resolved inside it). In workspaces the target must be
/// relative and must not climb above the root when resolved lexically from
/// the directory of `rel` (the link itself).
fn check_symlink_target(rel: &Path, target: &[u8], layer: bool) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("symlink has an empty target");
    }
    if target.contains(&0) {
        return Err("symlink target contains a NUL byte");
    }
    if target.len() > PATH_MAX {
        return Err("symlink target is longer than PATH_MAX");
    }
    if layer {
        return Ok(());
    }
    if target[0] == b'/' {
        return Err("absolute symlink targets are not allowed");
    }
    let mut depth = rel.components().count().saturating_sub(1);
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                depth = depth.checked_sub(1).ok_or("symlink target escapes the destination")?;
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// A member name for errors: lossy UTF-8, shortened if absurdly long.
fn name_of(raw: &[u8]) -> String {
    if raw.len() <= MAX_NAME_IN_ERROR {
        return String::from_utf8_lossy(raw).into_owned();
    }
    let mut name = String::from_utf8_lossy(&raw[..MAX_NAME_IN_ERROR]).into_owned();
    name.push_str("...");
    name
}

/// GNU long names carry a terminating NUL (sometimes more).
fn trim_nuls(mut b: &[u8]) -> &[u8] {
    while let [rest @ .., 0] = b {
        b = rest;
    }
    b
}

fn mtime_of(header: &Header) -> Option<SystemTime> {
    let secs = header.mtime().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

struct Extractor<'a> {
    dest: &'a Path,
    limits: &'a TarLimits,
    /// Member parent paths known to lead to real directories, checked or
    /// created during this import, with the real directory each resolves
    /// to (the same path for workspaces; for image layers, the path after
    /// following symlinks inside the root). Cleared whenever a directory
    /// or a symlink is removed.
    known_dirs: HashMap<PathBuf, PathBuf>,
    known_dirs_bytes: usize,
    dirs: Vec<DirMeta>,
    pending: Pending,
    buf: Vec<u8>,
    /// Members counted against `max_entries` (and reported).
    entries: u64,
    /// Parent directories created for members, also counted against
    /// `max_entries`: otherwise one member could create ~2000 of them.
    implicit_dirs: u64,
    /// Member data counted against `max_bytes`.
    consumed: u64,
    /// File content written.
    written: u64,
    /// Image layer mode: whiteouts and owners apply, symlinks resolve
    /// inside the root. Holds every real path this layer created (and
    /// their parents), which whiteouts leave alone.
    layer: Option<HashSet<PathBuf>>,
    /// Device nodes and fifos skipped (image layers).
    skipped_special: u64,
    /// Extended attribute records dropped.
    dropped_xattrs: u64,
}

impl<'a> Extractor<'a> {
    fn new(dest: &'a Path, limits: &'a TarLimits) -> Self {
        Extractor {
            dest,
            limits,
            known_dirs: HashMap::new(),
            known_dirs_bytes: 0,
            dirs: Vec::new(),
            pending: Pending::default(),
            buf: vec![0; COPY_BUF_BYTES],
            entries: 0,
            implicit_dirs: 0,
            consumed: 0,
            written: 0,
            layer: None,
            skipped_special: 0,
            dropped_xattrs: 0,
        }
    }

    fn count_entry(&mut self, name: &str) -> Result<(), ExtractError> {
        self.entries += 1;
        self.check_entries(name)
    }

    fn check_entries(&self, name: &str) -> Result<(), ExtractError> {
        if self.entries.saturating_add(self.implicit_dirs) > self.limits.max_entries {
            return Err(ExtractError::OverLimit {
                entry: name.to_owned(),
                what: "entries",
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    fn count_bytes(&mut self, name: &str, size: u64) -> Result<(), ExtractError> {
        match self.consumed.checked_add(size) {
            Some(total) if total <= self.limits.max_bytes => {
                self.consumed = total;
                Ok(())
            }
            _ => Err(ExtractError::OverLimit { entry: name.to_owned(), what: "bytes", limit: self.limits.max_bytes }),
        }
    }

    fn member<R: Read>(&mut self, member: &mut tar::Entry<'_, R>) -> Result<(), ExtractError> {
        let kind = member.header().entry_type();
        let size = member.size();
        match kind {
            EntryType::GNULongName | EntryType::GNULongLink | EntryType::XHeader => {
                let name = name_of(&member.header().path_bytes());
                self.count_bytes(&name, size)?;
                let data = read_extension(member, size)?;
                let slot = match kind {
                    EntryType::GNULongName => &mut self.pending.long_name,
                    EntryType::GNULongLink => &mut self.pending.long_link,
                    _ => &mut self.pending.pax,
                };
                if slot.is_some() {
                    return Err(corrupt(
                        io::ErrorKind::InvalidData,
                        "two extension headers of one kind describe the same member".into(),
                    ));
                }
                *slot = Some(data);
                Ok(())
            }
            EntryType::XGlobalHeader => {
                // Global pax records (git archive's commit id) carry nothing
                // we use; the data is skipped, but counted.
                let name = name_of(&member.header().path_bytes());
                self.count_entry(&name)?;
                self.count_bytes(&name, size)
            }
            _ => self.real_member(kind, size, member),
        }
    }

    fn real_member<R: Read>(
        &mut self,
        kind: EntryType,
        size: u64,
        member: &mut tar::Entry<'_, R>,
    ) -> Result<(), ExtractError> {
        let pending = std::mem::take(&mut self.pending);
        let pax = match &pending.pax {
            Some(data) => PaxFields::parse(data)?,
            None => PaxFields::default(),
        };
        if let Some(pax_size) = pax.size {
            let parsed = std::str::from_utf8(pax_size).ok().and_then(|s| s.parse::<u64>().ok());
            if parsed != Some(size) {
                return Err(corrupt(
                    io::ErrorKind::InvalidData,
                    "pax size differs from the header size (not supported)".into(),
                ));
            }
        }
        let header = member.header();
        let path: Vec<u8> = match (pax.path, &pending.long_name) {
            (Some(p), _) => p.to_vec(),
            (None, Some(long)) => trim_nuls(long).to_vec(),
            (None, None) => header.path_bytes().into_owned(),
        };
        let name = name_of(&path);
        self.count_entry(&name)?;
        self.count_bytes(&name, size)?;
        if pax.sparse || kind == EntryType::GNUSparse {
            return Err(hostile(&name, "sparse files are not supported"));
        }
        let layer = self.layer.is_some();
        let normalized = if layer { normalize_layer(&path) } else { normalize(&path) };
        let rel = match normalized {
            Ok(Some(rel)) => rel,
            Ok(None) => return Ok(()),
            Err(reason) => return Err(hostile(&name, reason)),
        };
        self.dropped_xattrs += pax.xattrs;
        if layer && matches!(kind, EntryType::Char | EntryType::Block | EntryType::Fifo) {
            // A sandbox gets its own /dev; nothing special is made on the host.
            self.skipped_special += 1;
            return Ok(());
        }
        let mode = header.mode().map_err(format)? & MODE_MASK;
        let mtime = mtime_of(header);
        if self.layer.is_some() {
            let id = |pax: Option<&[u8]>, hdr: io::Result<u64>| -> Result<u32, ExtractError> {
                let v = match pax {
                    Some(v) => std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok()),
                    // An empty numeric field (some writers leave it so) is 0.
                    None => Some(hdr.unwrap_or(0)),
                };
                v.and_then(|v| u32::try_from(v).ok()).ok_or_else(|| hostile(&name, "owner id out of range"))
            };
            let owner = (id(pax.uid, header.uid())?, id(pax.gid, header.gid())?);
            if self.whiteout(&rel, &name)? {
                return Ok(());
            }
            let Some(real) = self.create_member(kind, &rel, &name, mode, mtime, size, &path, &pax, &pending, member)?
            else {
                return Ok(());
            };
            let mut p = real.clone();
            let created = self.layer.as_mut().expect("layer mode");
            while created.insert(p.clone()) && p.pop() && !p.as_os_str().is_empty() {}
            return self.owned(&real, &name, kind, owner);
        }
        self.create_member(kind, &rel, &name, mode, mtime, size, &path, &pax, &pending, member).map(drop)
    }

    /// Creates a checked member's file, directory or link. Returns the real
    /// path it created (relative to the root), or `None` when an image
    /// layer's directory member names an existing symlink to a directory,
    /// which is kept (merged-usr's `lib -> usr/lib`).
    #[allow(clippy::too_many_arguments)]
    fn create_member<R: Read>(
        &mut self,
        kind: EntryType,
        rel: &Path,
        name: &str,
        mode: u32,
        mtime: Option<SystemTime>,
        size: u64,
        path: &[u8],
        pax: &PaxFields<'_>,
        pending: &Pending,
        member: &mut tar::Entry<'_, R>,
    ) -> Result<Option<PathBuf>, ExtractError> {
        let link = || -> Vec<u8> {
            match (pax.linkpath, &pending.long_link) {
                (Some(l), _) => l.to_vec(),
                (None, Some(long)) => trim_nuls(long).to_vec(),
                (None, None) => member.header().link_name_bytes().map(|l| l.into_owned()).unwrap_or_default(),
            }
        };
        match kind {
            EntryType::Regular | EntryType::Continuous if path.ends_with(b"/") => {
                self.dir(rel.to_path_buf(), name, mode, mtime)
            }
            EntryType::Regular | EntryType::Continuous => self.file(rel, name, mode, mtime, size, member).map(Some),
            EntryType::Directory => self.dir(rel.to_path_buf(), name, mode, mtime),
            EntryType::Symlink => {
                let target = link();
                self.symlink(rel, name, &target).map(Some)
            }
            EntryType::Link => {
                let target = link();
                self.hard_link(rel, name, &target).map(Some)
            }
            EntryType::Char | EntryType::Block => Err(hostile(name, "device nodes are not allowed")),
            EntryType::Fifo => Err(hostile(name, "fifos are not allowed")),
            other => Err(hostile(name, format!("unsupported entry type {:?}", char::from(other.as_byte())))),
        }
    }

    /// Applies a whiteout member; `false` if `rel` is not one.
    fn whiteout(&mut self, rel: &Path, name: &str) -> Result<bool, ExtractError> {
        let Some(file) = rel.file_name().and_then(|f| f.to_str()) else { return Ok(false) };
        let Some(hidden) = file.strip_prefix(".wh.") else { return Ok(false) };
        // The directory is resolved inside the root, like any layer path.
        let Some(parent) = self.walk(rel.parent().unwrap_or(Path::new("")), name, false)? else {
            return Ok(true); // nothing below to hide
        };
        let parent = parent.as_path();
        let created = self.layer.as_ref().expect("layer mode");
        let victims: Vec<PathBuf> = if hidden == ".wh..opq" {
            let dir = self.dest.join(parent);
            let children = fs::read_dir(&dir).map_err(|e| io_error(name, e))?;
            children
                .filter_map(|c| c.ok())
                .map(|c| parent.join(c.file_name()))
                .filter(|c| !created.contains(c))
                .collect()
        } else {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(hostile(name, "whiteout of nothing"));
            }
            let target = parent.join(hidden);
            if created.contains(&target) { vec![] } else { vec![target] }
        };
        for v in victims {
            let full = self.dest.join(&v);
            self.clear(&full, name)?;
        }
        Ok(true)
    }

    /// Gives a layer member (at its real path) the owner its archive records.
    fn owned(&mut self, rel: &Path, name: &str, kind: EntryType, (uid, gid): (u32, u32)) -> Result<(), ExtractError> {
        if kind == EntryType::Link {
            return Ok(()); // the same inode as its target, already owned
        }
        let path = self.dest.join(rel);
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(|e| io_error(name, e))
    }

    /// Where member `rel` goes: its real path relative to the root, after
    /// making sure every parent is a real directory (missing ones are
    /// created). The last component is not resolved: a member replaces
    /// whatever is at its own path, a symlink included, and never writes
    /// through it.
    fn place(&mut self, rel: &Path, name: &str) -> Result<PathBuf, ExtractError> {
        let file = rel.file_name().expect("normalized paths end in a name");
        let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) else {
            return Ok(PathBuf::from(file));
        };
        if let Some(real) = self.known_dirs.get(parent) {
            return Ok(real.join(file));
        }
        let real = self.walk(parent, name, true)?.expect("a creating walk always arrives");
        self.remember_dir(parent.to_path_buf(), real.clone());
        Ok(real.join(file))
    }

    /// Walks directory path `rel` down from the root, one component at a
    /// time with `lstat`, and returns the real path it arrives at. A missing
    /// component is created when `create` is set (and counted as an
    /// implicit directory), else the walk stops with `None`; a
    /// non-directory refuses the member.
    ///
    /// A symlink on the way refuses a workspace member. In an image layer it
    /// is followed *inside the root*, as `openat2(RESOLVE_IN_ROOT)` would:
    /// an absolute target starts again at the root and `..` never climbs
    /// above it, so a layer writing `lib/x86_64-linux-gnu/y` where
    /// `lib -> usr/lib` (or `-> /usr/lib`) lands in `usr/lib/...`, and no
    /// target can lead outside. Every path the walk touches is the root
    /// joined with real directory names, never a symlink. The node owns the
    /// staging tree while a layer is applied, so nothing can swap a
    /// directory between the walk and the write.
    fn walk(&mut self, rel: &Path, name: &str, create: bool) -> Result<Option<PathBuf>, ExtractError> {
        let mut todo: VecDeque<OsString> = rel.components().map(|c| c.as_os_str().to_owned()).collect();
        let mut real = PathBuf::with_capacity(rel.as_os_str().len());
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            if c.is_empty() || c == "." {
                continue;
            }
            if c == ".." {
                real.pop(); // at the root, stays at the root
                continue;
            }
            let next = real.join(&c);
            let full = self.dest.join(&next);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => real = next,
                Ok(m) if m.file_type().is_symlink() => {
                    if self.layer.is_none() {
                        let why = format!("{} is a symlink; refusing to write through it", next.display());
                        return Err(hostile(name, why));
                    }
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(hostile(name, format!("too many levels of symlinks at {}", next.display())));
                    }
                    let target = fs::read_link(&full).map_err(|e| io_error(name, e))?;
                    if target.has_root() {
                        real.clear();
                    }
                    for t in target.components().rev() {
                        match t {
                            Component::Normal(part) => todo.push_front(part.to_owned()),
                            Component::ParentDir => todo.push_front(OsString::from("..")),
                            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                        }
                    }
                }
                Ok(_) => return Err(hostile(name, format!("{} is not a directory", next.display()))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    self.implicit_dirs += 1;
                    self.check_entries(name)?;
                    fs::DirBuilder::new().mode(WORK_DIR_MODE).create(&full).map_err(|e| io_error(name, e))?;
                    real = next;
                }
                Err(e) => return Err(io_error(name, e)),
            }
        }
        Ok(Some(real))
    }

    fn remember_dir(&mut self, rel: PathBuf, real: PathBuf) {
        let bytes = rel.as_os_str().len() + real.as_os_str().len();
        self.known_dirs_bytes += bytes;
        if self.known_dirs_bytes > KNOWN_DIRS_MAX_BYTES {
            self.known_dirs.clear();
            self.known_dirs_bytes = bytes;
        }
        self.known_dirs.insert(rel, real);
    }

    fn forget_dirs(&mut self) {
        self.known_dirs.clear();
        self.known_dirs_bytes = 0;
    }

    /// Removes whatever is at `path` without following it.
    fn clear(&mut self, path: &Path, name: &str) -> Result<(), ExtractError> {
        let result = match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                // Directories under it may be in `known_dirs`.
                self.forget_dirs();
                remove_tree(path)
            }
            Ok(m) => {
                if m.file_type().is_symlink() {
                    // Layer paths may have resolved through it.
                    self.forget_dirs();
                }
                fs::remove_file(path)
            }
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(name, e)),
            Ok(()) | Err(_) => Ok(()),
        }
    }

    /// Runs `create` (which must fail with `AlreadyExists` rather than
    /// follow anything at `path`); if something is in the way, removes it
    /// and tries once more.
    fn create_new<T>(
        &mut self,
        path: &Path,
        name: &str,
        create: impl Fn(&Path) -> io::Result<T>,
    ) -> Result<T, ExtractError> {
        match create(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.clear(path, name)?;
                create(path).map_err(|e| io_error(name, e))
            }
            result => result.map_err(|e| io_error(name, e)),
        }
    }

    fn file<R: Read>(
        &mut self,
        rel: &Path,
        name: &str,
        mode: u32,
        mtime: Option<SystemTime>,
        size: u64,
        data: &mut tar::Entry<'_, R>,
    ) -> Result<PathBuf, ExtractError> {
        let real = self.place(rel, name)?;
        let path = self.dest.join(&real);
        let mut file = self.create_new(&path, name, |p| {
            OpenOptions::new().write(true).create_new(true).mode(mode & 0o777).custom_flags(libc::O_NOFOLLOW).open(p)
        })?;
        let mut copied = 0u64;
        loop {
            let n = match data.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format(e)),
            };
            file.write_all(&self.buf[..n]).map_err(|e| io_error(name, e))?;
            copied += n as u64;
        }
        if copied != size {
            return Err(corrupt(
                io::ErrorKind::UnexpectedEof,
                format!("archive ends inside {name:?} ({copied} of {size} bytes)"),
            ));
        }
        file.set_permissions(Permissions::from_mode(mode)).map_err(|e| io_error(name, e))?;
        if let Some(mtime) = mtime {
            file.set_modified(mtime).map_err(|e| io_error(name, e))?;
        }
        self.written += size;
        Ok(real)
    }

    fn dir(
        &mut self,
        rel: PathBuf,
        name: &str,
        mode: u32,
        mtime: Option<SystemTime>,
    ) -> Result<Option<PathBuf>, ExtractError> {
        let real = self.place(&rel, name)?;
        let path = self.dest.join(&real);
        let mkdir = |p: &Path| fs::DirBuilder::new().mode(WORK_DIR_MODE).create(p);
        match mkdir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(m) => {
                    // An image's `lib -> usr/lib` stays a link when a later
                    // layer lists `lib/` (GNU tar's --keep-directory-symlink):
                    // replacing it would hide everything under usr/lib.
                    if self.layer.is_some()
                        && m.file_type().is_symlink()
                        && let Ok(Some(target)) = self.walk(&real, name, false)
                    {
                        self.remember_dir(rel, target);
                        return Ok(None);
                    }
                    self.clear(&path, name)?;
                    mkdir(&path).map_err(|e| io_error(name, e))?;
                }
                Err(e) => return Err(io_error(name, e)),
            },
            Err(e) => return Err(io_error(name, e)),
        }
        self.remember_dir(rel, real.clone());
        self.dirs.push(DirMeta { rel: real.clone(), mode, mtime });
        Ok(Some(real))
    }

    fn symlink(&mut self, rel: &Path, name: &str, target: &[u8]) -> Result<PathBuf, ExtractError> {
        check_symlink_target(rel, target, self.layer.is_some()).map_err(|reason| hostile(name, reason))?;
        let real = self.place(rel, name)?;
        let path = self.dest.join(&real);
        let target = Path::new(OsStr::from_bytes(target));
        self.create_new(&path, name, |p| std::os::unix::fs::symlink(target, p))?;
        Ok(real)
    }

    /// A hard link's target must be an existing regular file inside the
    /// root (in image layers a symlink too, which `link` links as itself).
    /// In layers the target's directories resolve inside the root like any
    /// member path; in workspaces none of them may be a symlink.
    fn hard_link(&mut self, rel: &Path, name: &str, target: &[u8]) -> Result<PathBuf, ExtractError> {
        let layer = self.layer.is_some();
        let target_name = name_of(target);
        let bad = |reason: &str| hostile(name, format!("hard link target {target_name:?}: {reason}"));
        let normalized = if layer { normalize_layer(target) } else { normalize(target) };
        let target_rel = match normalized {
            Ok(Some(t)) => t,
            Ok(None) => return Err(bad("is the destination root")),
            Err(reason) => return Err(bad(reason)),
        };
        if target_rel != rel && target_rel.starts_with(rel) {
            return Err(bad("lies inside the link's own path"));
        }
        let parent = target_rel.parent().unwrap_or(Path::new(""));
        let real_parent = match self.walk(parent, name, false) {
            Ok(Some(p)) => p,
            Ok(None) => return Err(bad("does not exist")),
            Err(ExtractError::Hostile { reason, .. }) => return Err(bad(&reason)),
            Err(e) => return Err(e),
        };
        let real_target = real_parent.join(target_rel.file_name().expect("normalized paths end in a name"));
        let target_path = self.dest.join(&real_target);
        match fs::symlink_metadata(&target_path) {
            Ok(m) if m.is_file() || (layer && m.file_type().is_symlink()) => {}
            Ok(_) => return Err(bad("is not a regular file")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(bad("does not exist")),
            Err(e) => return Err(io_error(name, e)),
        }
        let real = self.place(rel, name)?;
        if real == real_target {
            return Ok(real);
        }
        let path = self.dest.join(&real);
        self.create_new(&path, name, |p| fs::hard_link(&target_path, p))?;
        Ok(real)
    }

    /// Applies directory modes and mtimes, deepest first, to directories
    /// that are still directories reached without symlinks.
    fn apply_dir_metadata(&mut self) -> Result<(), ExtractError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        // Descending byte order puts children before parents; the stable
        // sort keeps archive order for duplicates, so the last one wins.
        dirs.sort_by(|a, b| b.rel.as_os_str().as_bytes().cmp(a.rel.as_os_str().as_bytes()));
        for d in &dirs {
            let name = d.rel.to_string_lossy();
            match reach(self.dest, &d.rel).map_err(|e| io_error(&name, e))? {
                Reach::Dirs => {}
                // Replaced by a later member: its mode is not ours to set.
                Reach::Stopped | Reach::Symlink(_) => continue,
            }
            let dir = match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(self.dest.join(&d.rel))
            {
                Ok(dir) => dir,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(&name, e)),
            };
            dir.set_permissions(Permissions::from_mode(d.mode)).map_err(|e| io_error(&name, e))?;
            if let Some(mtime) = d.mtime {
                dir.set_modified(mtime).map_err(|e| io_error(&name, e))?;
            }
        }
        Ok(())
    }
}

/// Reads a pax header or GNU long name/link member, bounded.
fn read_extension<R: Read>(member: &mut tar::Entry<'_, R>, size: u64) -> Result<Vec<u8>, ExtractError> {
    if size > MAX_EXTENSION_BYTES {
        return Err(corrupt(
            io::ErrorKind::InvalidData,
            format!("extension header of {size} bytes is over the {MAX_EXTENSION_BYTES}-byte cap"),
        ));
    }
    let mut data = Vec::with_capacity(size as usize);
    member.read_to_end(&mut data).map_err(format)?;
    if data.len() as u64 != size {
        return Err(corrupt(io::ErrorKind::UnexpectedEof, "archive ends inside an extension header".into()));
    }
    Ok(data)
}

/// `remove_dir_all`, which also copes with read-only directories in the
/// tree (as an archive may create) when not running as root.
fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path);
            fs::remove_dir_all(path)
        }
        result => result,
    }
}

/// Best effort: adds owner `rwx` to every directory under `root`, never
/// following symlinks. Errors surface when the caller retries.
fn make_dirs_writable(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let _ = fs::set_permissions(&dir, Permissions::from_mode((meta.mode() & 0o7777) | 0o700));
        let Ok(children) = fs::read_dir(&dir) else {
            continue;
        };
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(child.path());
            }
        }
    }
}

/// Writes `dir` as an uncompressed tar to `out` and returns `out`. Member
/// paths are relative to `dir` (no `./` prefix), in byte order, each
/// directory before its contents; symlinks are stored as symlinks, never
/// followed; sockets, fifos and devices are skipped. Entries that vanish
/// while packing are skipped, and a file that changes size is cut or
/// zero-padded to the size in its header, so the archive stays valid.
pub fn pack<W: Write>(dir: &Path, out: W) -> io::Result<W> {
    let mut builder = Builder::new(BufWriter::with_capacity(PACK_BUF_BYTES, out));
    let mut stack = Vec::new();
    push_children(dir, Path::new(""), &mut stack)?;
    while let Some(rel) = stack.pop() {
        let full = dir.join(&rel);
        let meta = match fs::symlink_metadata(&full) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            let mut header = header_for(&meta, 0);
            builder.append_data(&mut header, &rel, io::empty())?;
            match push_children(dir, &rel, &mut stack) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                result => result?,
            }
        } else if ft.is_symlink() {
            let target = match fs::read_link(&full) {
                Ok(target) => target,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut header = header_for(&meta, 0);
            builder.append_link(&mut header, &rel, target)?;
        } else if ft.is_file() {
            let file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&full) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let meta = file.metadata()?;
            if !meta.is_file() {
                continue;
            }
            let size = meta.len();
            let mut header = header_for(&meta, size);
            let data = (&file).take(size).chain(io::repeat(0)).take(size);
            builder.append_data(&mut header, &rel, data)?;
        }
    }
    let out = builder.into_inner()?;
    out.into_inner().map_err(io::IntoInnerError::into_error)
}

fn header_for(meta: &fs::Metadata, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_metadata_in_mode(meta, HeaderMode::Complete);
    header.set_mode(meta.mode() & 0o7777);
    header.set_mtime(meta.mtime().max(0).unsigned_abs());
    header.set_size(size);
    header
}

/// Pushes the children of `dir/rel` onto `stack` so that they pop in byte
/// order.
fn push_children(dir: &Path, rel: &Path, stack: &mut Vec<PathBuf>) -> io::Result<()> {
    let mut names =
        fs::read_dir(dir.join(rel))?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<Vec<OsString>>>()?;
    names.sort_unstable_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    stack.extend(names.into_iter().map(|n| rel.join(n)));
    Ok(())
}

/// Lists a directory for `GET /ls`, sorted by name. Symlinks are reported
/// as symlinks, not followed; `mode` holds the permission bits only.
pub fn list(dir: &Path) -> io::Result<Vec<LsEntry>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        // `DirEntry::metadata` does not follow symlinks.
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_file() {
            EntryKind::File
        } else {
            EntryKind::Other
        };
        out.push(LsEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            kind,
            size: meta.len(),
            mode: meta.mode() & 0o7777,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes `paths` (relative to `root`, checked like tar members)
/// recursively. Missing paths are fine. A symlink named by a path is
/// removed itself; a symlink on the way to a path is refused. The root
/// itself (`""`, `.`) is refused. All paths are checked before any is
/// removed.
pub fn remove_all(root: &Path, paths: &[String]) -> Result<(), ExtractError> {
    let mut rels = Vec::with_capacity(paths.len());
    for p in paths {
        match normalize(p.as_bytes()) {
            Ok(Some(rel)) => rels.push((p, rel)),
            Ok(None) => return Err(hostile(p, "refusing to remove the workspace root")),
            Err(reason) => return Err(hostile(p, reason)),
        }
    }
    for (name, rel) in rels {
        if let Some(parent) = rel.parent() {
            match reach(root, parent).map_err(|e| io_error(name, e))? {
                Reach::Dirs => {}
                Reach::Stopped => continue,
                Reach::Symlink(p) => {
                    return Err(hostile(name, format!("{} is a symlink; refusing to go through it", p.display())));
                }
            }
        }
        let full = root.join(&rel);
        let result = match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => remove_tree(&full),
            Ok(_) => fs::remove_file(&full),
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error(name, e)),
            Ok(()) | Err(_) => {}
        }
    }
    Ok(())
}

/// Validates a caller-supplied relative directory (`?dir=src/x`) like a tar
/// member and returns it joined to `root`; `None`, `""` and `.` give `root`.
/// Existing components must not be symlinks. The directory need not exist
/// (callers get `NotFound` or `NotADirectory` when they use it); see
/// [`ensure_dir`] to create it.
pub fn resolve_dir(root: &Path, rel: Option<&str>) -> Result<PathBuf, ExtractError> {
    let Some(raw) = rel else {
        return Ok(root.to_path_buf());
    };
    let rel = match normalize(raw.as_bytes()) {
        Ok(Some(rel)) => rel,
        Ok(None) => return Ok(root.to_path_buf()),
        Err(reason) => return Err(hostile(raw, reason)),
    };
    match reach(root, &rel).map_err(|e| io_error(raw, e))? {
        Reach::Dirs | Reach::Stopped => Ok(root.join(rel)),
        Reach::Symlink(p) => Err(hostile(raw, format!("{} is a symlink; refusing to go through it", p.display()))),
    }
}

/// Like [`resolve_dir`], but creates missing directories (mode 0755 minus
/// the umask), for `PUT /workspace?dir=`. A component that exists and is
/// not a directory is refused.
pub fn ensure_dir(root: &Path, rel: Option<&str>) -> Result<PathBuf, ExtractError> {
    let Some(raw) = rel else {
        return Ok(root.to_path_buf());
    };
    let rel = match normalize(raw.as_bytes()) {
        Ok(Some(rel)) => rel,
        Ok(None) => return Ok(root.to_path_buf()),
        Err(reason) => return Err(hostile(raw, reason)),
    };
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(hostile(raw, "a component is a symlink; refusing to go through it"));
            }
            Ok(_) => return Err(hostile(raw, "a component is not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match fs::DirBuilder::new().mode(WORK_DIR_MODE).create(&cur) {
                    Ok(()) => {}
                    // Raced with someone else: accept it only if it is a
                    // real directory.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        if !fs::symlink_metadata(&cur).is_ok_and(|m| m.is_dir()) {
                            return Err(hostile(raw, "a component changed while creating it"));
                        }
                    }
                    Err(e) => return Err(io_error(raw, e)),
                }
            }
            Err(e) => return Err(io_error(raw, e)),
        }
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;

    use tar::{Builder, EntryType, Header};

    use super::*;

    /// `root/dest` is extracted into; `root/outside` is a sibling that
    /// must stay empty, and `root` must hold nothing else.
    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        dest: PathBuf,
        outside: PathBuf,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let dest = root.join("dest");
        let outside = root.join("outside");
        fs::create_dir(&dest).unwrap();
        fs::create_dir(&outside).unwrap();
        Fixture { _tmp: tmp, root, dest, outside }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            // Archives create read-only directories; without this a
            // non-root run could not remove the temp dir.
            make_dirs_writable(&self.root);
        }
    }

    impl Fixture {
        fn extract(&self, tar: &[u8]) -> Result<ImportSummary, ExtractError> {
            extract(tar, Compression::None, &self.dest, &TarLimits::default())
        }

        fn assert_contained(&self) {
            let mut names: Vec<_> = fs::read_dir(&self.root).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            assert_eq!(names, ["dest", "outside"], "something was written next to dest");
            assert_eq!(fs::read_dir(&self.outside).unwrap().count(), 0, "something was written outside dest");
        }
    }

    fn archive(build: impl FnOnce(&mut Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    /// Appends a member with exactly these name and link bytes, bypassing
    /// the Builder's path checks (it refuses `..` and absolute paths).
    fn raw(b: &mut Builder<Vec<u8>>, kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == EntryType::Directory { 0o755 } else { 0o644 });
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn file(b: &mut Builder<Vec<u8>>, name: &str, data: &[u8]) {
        raw(b, EntryType::Regular, name.as_bytes(), b"", data);
    }

    #[test]
    fn a_file_that_is_not_a_tar_is_not_quoted_back() {
        let f = fixture();
        let text = "root:x:0:0:root:/root:/bin/bash\n".repeat(40);
        let err = f.extract(text.as_bytes()).unwrap_err();
        assert!(matches!(err, ExtractError::Format { .. }), "{err:?}");
        let msg = crate::http::error_chain(&err);
        assert!(!msg.contains('\n') && !msg.contains("/bin/bash"), "{msg}");
        f.assert_contained();
    }

    fn layer(f: &Fixture, tar: &[u8]) -> Result<ImportSummary, ExtractError> {
        extract_layer(tar, Compression::None, &f.dest, &TarLimits::default())
    }

    #[test]
    fn layers_apply_whiteouts_to_lower_layers_only() {
        let f = fixture();
        layer(
            &f,
            &archive(|b| {
                file(b, "etc/keep", b"k");
                file(b, "etc/gone", b"g");
                file(b, "opq/old1", b"1");
                file(b, "opq/sub/old2", b"2");
                file(b, "d/x", b"x");
            }),
        )
        .unwrap();
        layer(
            &f,
            &archive(|b| {
                file(b, "etc/.wh.gone", b"");
                file(b, "opq/new", b"n");
                file(b, "opq/.wh..wh..opq", b"");
                file(b, "d/.wh.x", b"");
                file(b, "nowhere/.wh.thing", b"");
            }),
        )
        .unwrap();
        assert!(f.dest.join("etc/keep").exists());
        assert!(!f.dest.join("etc/gone").exists());
        assert!(!f.dest.join("etc/.wh.gone").exists(), "whiteouts themselves are not written");
        assert!(!f.dest.join("opq/old1").exists() && !f.dest.join("opq/sub").exists(), "opaque dir emptied");
        assert_eq!(
            fs::read(f.dest.join("opq/new")).unwrap(),
            b"n",
            "this layer's own entry survives its opaque marker"
        );
        assert!(f.dest.join("d").is_dir() && !f.dest.join("d/x").exists());
        assert!(!f.dest.join("nowhere").exists());
        f.assert_contained();
    }

    #[test]
    fn layers_keep_owners_and_contain_whiteouts_through_symlinks() {
        let f = fixture();
        let mut b = Builder::new(Vec::new());
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(1);
        h.set_uid(1234);
        h.set_gid(4321);
        b.append_data(&mut h, "owned", &b"o"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        layer(&f, &tar).unwrap();
        let m = fs::symlink_metadata(f.dest.join("owned")).unwrap();
        if crate::tarx::tests::is_root() {
            assert_eq!((m.uid(), m.gid()), (1234, 4321));
        }
        // The link resolves inside the root, where there is nothing to hide.
        symlink(&f.outside, f.dest.join("link")).unwrap();
        symlink("../outside", f.dest.join("rel")).unwrap();
        fs::write(f.outside.join("victim"), b"v").unwrap();
        layer(&f, &archive(|b| file(b, "link/.wh.victim", b""))).unwrap();
        layer(&f, &archive(|b| file(b, "rel/.wh.victim", b""))).unwrap();
        assert!(f.outside.join("victim").exists(), "a whiteout removed something outside");
        fs::remove_file(f.outside.join("victim")).unwrap();
        fs::remove_file(f.dest.join("link")).unwrap();
        fs::remove_file(f.dest.join("rel")).unwrap();
        let err = layer(&f, &archive(|b| file(b, "../.wh.dest", b""))).unwrap_err();
        assert!(matches!(err, ExtractError::Hostile { .. }), "{err:?}");
        f.assert_contained();
    }

    fn is_root() -> bool {
        fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
    }

    #[test]
    fn layers_keep_symlinks_and_write_through_them_inside_the_root() {
        let f = fixture();
        let outside = f.outside.to_str().unwrap().to_owned();
        layer(
            &f,
            &archive(|b| {
                raw(b, EntryType::Directory, b"usr/lib/", b"", b"");
                raw(b, EntryType::Symlink, b"lib", b"usr/lib", b"");
                raw(b, EntryType::Symlink, b"lib64", b"/usr/lib", b"");
                raw(b, EntryType::Symlink, b"etc/alternatives/pager", b"/bin/more", b"");
                raw(b, EntryType::Symlink, b"out", outside.as_bytes(), b"");
                raw(b, EntryType::Symlink, b"up", b"../../..", b"");
            }),
        )
        .unwrap();
        assert_eq!(fs::read_link(f.dest.join("lib64")).unwrap(), Path::new("/usr/lib"));
        assert_eq!(fs::read_link(f.dest.join("etc/alternatives/pager")).unwrap(), Path::new("/bin/more"));
        // A second layer writes through the links: relative, absolute, one
        // that names a host path and one that climbs: all land inside.
        let summary = layer(
            &f,
            &archive(|b| {
                raw(b, EntryType::Directory, b"lib/", b"", b"");
                file(b, "lib/x86_64-linux-gnu/libz.so", b"z");
                file(b, "lib64/ld.so", b"ld");
                file(b, "out/x", b"contained");
                file(b, "up/etc/passwd", b"contained");
                raw(b, EntryType::Link, b"hard", b"lib/x86_64-linux-gnu/libz.so", b"");
            }),
        )
        .unwrap();
        assert_eq!(summary.entries, 6);
        assert!(fs::symlink_metadata(f.dest.join("lib")).unwrap().file_type().is_symlink(), "lib stays a link");
        assert_eq!(fs::read(f.dest.join("usr/lib/x86_64-linux-gnu/libz.so")).unwrap(), b"z");
        assert_eq!(fs::read(f.dest.join("usr/lib/ld.so")).unwrap(), b"ld");
        let inside = f.dest.join(outside.trim_start_matches('/')).join("x");
        assert_eq!(fs::read(inside).unwrap(), b"contained");
        assert_eq!(fs::read(f.dest.join("etc/passwd")).unwrap(), b"contained");
        let (a, h) = (f.dest.join("usr/lib/x86_64-linux-gnu/libz.so"), f.dest.join("hard"));
        assert_eq!(fs::metadata(a).unwrap().ino(), fs::metadata(h).unwrap().ino());
        f.assert_contained();
    }

    #[test]
    fn layers_skip_special_files_drop_xattrs_and_strip_leading_slashes() {
        let f = fixture();
        let tar = archive(|b| {
            raw(b, EntryType::Directory, b"dev/", b"", b"");
            raw(b, EntryType::Char, b"dev/console", b"", b"");
            raw(b, EntryType::Block, b"dev/sda", b"", b"");
            raw(b, EntryType::Fifo, b"run/initctl", b"", b"");
            b.append_pax_extensions([
                ("SCHILY.xattr.security.capability", &b"\x01\x00\x00\x02"[..]),
                ("SCHILY.xattr.user.x", &b"y"[..]),
            ])
            .unwrap();
            file(b, "usr/bin/ping", b"ping");
            file(b, "/etc/hostname", b"h");
            file(b, "//etc//hosts", b"127.0.0.1 localhost");
        });
        let summary = layer(&f, &tar).unwrap();
        assert_eq!((summary.skipped_special, summary.dropped_xattrs), (3, 2));
        assert_eq!(fs::read_dir(f.dest.join("dev")).unwrap().count(), 0, "no device node is created");
        assert!(!f.dest.join("run/initctl").exists());
        assert_eq!(fs::read(f.dest.join("etc/hostname")).unwrap(), b"h");
        assert_eq!(fs::read(f.dest.join("etc/hosts")).unwrap(), b"127.0.0.1 localhost");
        let caps = std::process::Command::new("getfattr").arg("-d").arg(f.dest.join("usr/bin/ping")).output();
        if let Ok(out) = caps {
            assert!(out.stdout.is_empty(), "an xattr was applied: {}", String::from_utf8_lossy(&out.stdout));
        }
        f.assert_contained();
        // Workspaces stay strict.
        assert_hostile(f.extract(&archive(|b| raw(b, EntryType::Char, b"null", b"", b""))), "null");
    }

    #[test]
    fn layers_refuse_symlink_loops_by_name() {
        let f = fixture();
        let tar = archive(|b| {
            raw(b, EntryType::Symlink, b"a", b"b", b"");
            raw(b, EntryType::Symlink, b"b", b"a", b"");
            file(b, "a/x", b"x");
        });
        assert_hostile(layer(&f, &tar), "a/x");
        f.assert_contained();
    }

    /// Every case of the workspace suite, applied as an image layer, is
    /// refused or lands inside the root: nothing outside changes and no
    /// device node or fifo exists anywhere under the root.
    #[test]
    fn hostile_layers_are_refused_or_contained() {
        for (what, case) in hostile_cases() {
            let f = fixture();
            let (tar, _) = case(&f);
            let _ = layer(&f, &tar);
            f.assert_contained();
            let mut stack = vec![f.dest.clone()];
            while let Some(dir) = stack.pop() {
                for e in fs::read_dir(&dir).unwrap() {
                    let e = e.unwrap();
                    let t = e.file_type().unwrap();
                    assert!(t.is_dir() || t.is_file() || t.is_symlink(), "{what}: special file {:?}", e.path());
                    if t.is_dir() {
                        stack.push(e.path());
                    }
                }
            }
        }
    }

    fn dir_mode(b: &mut Builder<Vec<u8>>, name: &str, mode: u32) {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        h.set_mtime(1_500_000_000);
        b.append_data(&mut h, name, io::empty()).unwrap();
    }

    #[track_caller]
    fn assert_hostile(result: Result<ImportSummary, ExtractError>, entry: &str) {
        match result {
            Err(ExtractError::Hostile { entry: e, .. }) if e == entry => {}
            other => panic!("expected Hostile for {entry:?}, got {other:?}"),
        }
    }

    #[track_caller]
    fn assert_format<T: std::fmt::Debug>(result: Result<T, ExtractError>) {
        match result {
            Err(ExtractError::Format { .. }) => {}
            other => panic!("expected Format, got {other:?}"),
        }
    }

    #[derive(Debug, PartialEq)]
    enum Node {
        File { mode: u32, data: Vec<u8>, mtime: i64 },
        Dir { mode: u32 },
        Link(PathBuf),
    }

    fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
        let mut out = BTreeMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            for e in fs::read_dir(root.join(&rel)).unwrap() {
                let e = e.unwrap();
                let rel = rel.join(e.file_name());
                let path = root.join(&rel);
                let meta = fs::symlink_metadata(&path).unwrap();
                let node = if meta.is_dir() {
                    stack.push(rel.clone());
                    Node::Dir { mode: meta.mode() & 0o7777 }
                } else if meta.file_type().is_symlink() {
                    Node::Link(fs::read_link(&path).unwrap())
                } else {
                    Node::File { mode: meta.mode() & 0o7777, data: fs::read(&path).unwrap(), mtime: meta.mtime() }
                };
                out.insert(rel, node);
            }
        }
        out
    }

    fn write_file(path: &Path, data: &[u8], mode: u32) {
        fs::write(path, data).unwrap();
        let f = fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_234_567_890)).unwrap();
        fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    /// A tree with the awkward parts: modes, a read-only directory, an
    /// empty directory, symlinks (one dangling), a path over 100 bytes.
    fn sample_tree(root: &Path) {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        fs::create_dir_all(root.join("deep/er/still")).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::create_dir_all(root.join("bin")).unwrap();
        write_file(&root.join("a.txt"), b"hello\n", 0o644);
        write_file(&root.join("bin/run.sh"), b"#!/bin/sh\n", 0o755);
        write_file(&root.join("deep/er/still/x.bin"), &big, 0o600);
        write_file(&root.join("empty-file"), b"", 0o640);
        let long_dir = root.join("l".repeat(80));
        fs::create_dir(&long_dir).unwrap();
        write_file(&long_dir.join(format!("{}.txt", "m".repeat(90))), b"long", 0o644);
        symlink("deep/er", root.join("link")).unwrap();
        symlink("nowhere", root.join("dangling")).unwrap();
        fs::create_dir(root.join("ro")).unwrap();
        write_file(&root.join("ro/f"), b"read only", 0o444);
        fs::set_permissions(root.join("ro"), Permissions::from_mode(0o555)).unwrap();
        fs::create_dir(root.join("shared")).unwrap();
        fs::set_permissions(root.join("shared"), Permissions::from_mode(0o1777)).unwrap();
    }

    fn round_trip(compress: impl Fn(Vec<u8>) -> Vec<u8>, compression: Compression) {
        let src = tempfile::tempdir().unwrap();
        sample_tree(src.path());
        let tar = pack(src.path(), Vec::new()).unwrap();
        let names: Vec<String> = Archive::new(&tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with("./") && !n.starts_with('/')), "{names:?}");
        assert!(names.windows(2).all(|w| w[0] < w[1]), "not in byte order: {names:?}");

        let f = fixture();
        let summary = extract(&compress(tar)[..], compression, &f.dest, &TarLimits::default()).unwrap();
        let want = snapshot(src.path());
        assert_eq!(snapshot(&f.dest), want);
        assert_eq!(summary.entries, want.len() as u64);
        let bytes: u64 = want
            .values()
            .map(|n| match n {
                Node::File { data, .. } => data.len() as u64,
                Node::Dir { .. } | Node::Link(_) => 0,
            })
            .sum();
        assert_eq!(summary.bytes, bytes);
        f.assert_contained();
        make_dirs_writable(src.path());
    }

    #[test]
    fn round_trip_plain() {
        round_trip(|t| t, Compression::None);
    }

    #[test]
    fn round_trip_gzip() {
        round_trip(
            |t| {
                let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(&t).unwrap();
                enc.finish().unwrap()
            },
            Compression::Gzip,
        );
    }

    #[test]
    fn round_trip_zstd() {
        round_trip(|t| zstd::stream::encode_all(&t[..], 3).unwrap(), Compression::Zstd);
    }

    #[test]
    fn import_over_an_existing_tree_replaces_entries() {
        let f = fixture();
        f.extract(&archive(|b| {
            file(b, "a", b"one");
            file(b, "d/x", b"x");
        }))
        .unwrap();
        // A file where a directory was, a directory where a file was.
        f.extract(&archive(|b| {
            file(b, "d", b"now a file");
            raw(b, EntryType::Directory, b"a/", b"", b"");
            file(b, "a/y", b"under a dir");
        }))
        .unwrap();
        // A file is never turned into a directory implicitly, as with tar -x.
        assert_hostile(f.extract(&archive(|b| file(b, "d/z", b"z"))), "d/z");
        assert_eq!(fs::read(f.dest.join("d")).unwrap(), b"now a file");
        assert_eq!(fs::read(f.dest.join("a/y")).unwrap(), b"under a dir");
        f.assert_contained();
    }

    #[test]
    fn dot_entries_are_skipped_and_dot_slash_is_stripped() {
        let f = fixture();
        let s = f
            .extract(&archive(|b| {
                raw(b, EntryType::Directory, b"./", b"", b"");
                raw(b, EntryType::Directory, b".", b"", b"");
                file(b, "./x", b"x");
                file(b, "./a/./b", b"b");
            }))
            .unwrap();
        assert_eq!(s.entries, 4);
        assert_eq!(fs::read(f.dest.join("x")).unwrap(), b"x");
        assert_eq!(fs::read(f.dest.join("a/b")).unwrap(), b"b");
    }

    #[test]
    fn hostile_members_are_refused_by_name() {
        for (what, case) in hostile_cases() {
            let f = fixture();
            let (tar, entry) = case(&f);
            let result = f.extract(&tar);
            match &result {
                Err(ExtractError::Hostile { entry: e, .. }) if *e == entry => {}
                other => panic!("{what}: expected Hostile for {entry:?}, got {other:?}"),
            }
            assert_eq!(result.unwrap_err().entry(), Some(entry.as_str()));
            f.assert_contained();
        }
    }

    type HostileCase = (&'static str, Box<dyn Fn(&Fixture) -> (Vec<u8>, String)>);

    /// Archives a workspace import must refuse, each with the member named.
    fn hostile_cases() -> Vec<HostileCase> {
        let outside_abs = |f: &Fixture| format!("{}/abs", f.outside.display());
        vec![
            (
                "absolute path",
                Box::new(move |f| {
                    let name = outside_abs(f);
                    (archive(|b| file(b, &name, b"pwned")), name)
                }),
            ),
            ("dotdot", Box::new(|_| (archive(|b| file(b, "../x", b"pwned")), "../x".into()))),
            ("dotdot deeper", Box::new(|_| (archive(|b| file(b, "a/../../x", b"pwned")), "a/../../x".into()))),
            (
                "dotdot after ok members",
                Box::new(|_| {
                    let tar = archive(|b| {
                        file(b, "fine", b"ok");
                        file(b, "./../outside/x", b"pwned");
                    });
                    (tar, "./../outside/x".into())
                }),
            ),
            (
                "symlink to /etc",
                Box::new(|_| (archive(|b| raw(b, EntryType::Symlink, b"etc", b"/etc", b"")), "etc".into())),
            ),
            (
                "symlink to an absolute path outside",
                Box::new(|f| {
                    let target = f.outside.to_str().unwrap().to_owned();
                    let tar = archive(|b| {
                        raw(b, EntryType::Symlink, b"out", target.as_bytes(), b"");
                        file(b, "out/x", b"pwned");
                    });
                    (tar, "out".into())
                }),
            ),
            (
                "symlink climbing out",
                Box::new(|_| {
                    let tar = archive(|b| {
                        raw(b, EntryType::Symlink, b"a", b"../..", b"");
                        file(b, "a/passwd", b"pwned");
                    });
                    (tar, "a".into())
                }),
            ),
            (
                "nested symlink climbing out",
                Box::new(|_| {
                    let tar = archive(|b| raw(b, EntryType::Symlink, b"s/up", b"x/../../..", b""));
                    (tar, "s/up".into())
                }),
            ),
            (
                "write through an in-archive symlink",
                Box::new(|_| {
                    let tar = archive(|b| {
                        raw(b, EntryType::Directory, b"d/", b"", b"");
                        raw(b, EntryType::Symlink, b"lnk", b"d", b"");
                        file(b, "lnk/passwd", b"pwned");
                    });
                    (tar, "lnk/passwd".into())
                }),
            ),
            (
                "hardlink to /etc/passwd",
                Box::new(|_| (archive(|b| raw(b, EntryType::Link, b"h", b"/etc/passwd", b"")), "h".into())),
            ),
            ("hardlink to ../x", Box::new(|_| (archive(|b| raw(b, EntryType::Link, b"h", b"../x", b"")), "h".into()))),
            (
                "hardlink to a symlink",
                Box::new(|_| {
                    let tar = archive(|b| {
                        file(b, "f", b"f");
                        raw(b, EntryType::Symlink, b"s", b"f", b"");
                        raw(b, EntryType::Link, b"h", b"s", b"");
                    });
                    (tar, "h".into())
                }),
            ),
            (
                "hardlink to a missing file",
                Box::new(|_| (archive(|b| raw(b, EntryType::Link, b"h", b"nope", b"")), "h".into())),
            ),
            ("char device", Box::new(|_| (archive(|b| raw(b, EntryType::Char, b"null", b"", b"")), "null".into()))),
            ("block device", Box::new(|_| (archive(|b| raw(b, EntryType::Block, b"sda", b"", b"")), "sda".into()))),
            ("fifo", Box::new(|_| (archive(|b| raw(b, EntryType::Fifo, b"pipe", b"", b"")), "pipe".into()))),
            ("gnu sparse", Box::new(|_| (archive(|b| raw(b, EntryType::GNUSparse, b"sp", b"", b"")), "sp".into()))),
            (
                "pax path with dotdot",
                Box::new(|_| {
                    let tar = archive(|b| {
                        b.append_pax_extensions([("path", &b"../pax-evil"[..])]).unwrap();
                        file(b, "innocent", b"pwned");
                    });
                    (tar, "../pax-evil".into())
                }),
            ),
            (
                "gnu long name with dotdot",
                Box::new(|_| {
                    let long = format!("{}/../../../x", "d".repeat(120));
                    let mut data = long.clone().into_bytes();
                    data.push(0);
                    let tar = archive(|b| {
                        raw(b, EntryType::GNULongName, b"././@LongLink", b"", &data);
                        file(b, "innocent", b"pwned");
                    });
                    (tar, long)
                }),
            ),
        ]
    }

    #[test]
    fn refuses_to_write_through_a_symlink_already_in_dest() {
        let f = fixture();
        symlink(&f.outside, f.dest.join("pre")).unwrap();
        assert_hostile(f.extract(&archive(|b| file(b, "pre/x", b"pwned"))), "pre/x");
        f.assert_contained();
        // A member at the symlink's own path replaces the link.
        f.extract(&archive(|b| file(b, "pre", b"replaced"))).unwrap();
        assert!(fs::symlink_metadata(f.dest.join("pre")).unwrap().is_file());
        f.assert_contained();
    }

    #[test]
    fn replaces_an_existing_hard_link_instead_of_writing_through_it() {
        let f = fixture();
        let secret = f.root.join("secret");
        fs::write(&secret, b"keep").unwrap();
        fs::hard_link(&secret, f.dest.join("f")).unwrap();
        f.extract(&archive(|b| file(b, "f", b"new"))).unwrap();
        assert_eq!(fs::read(&secret).unwrap(), b"keep");
        assert_eq!(fs::read(f.dest.join("f")).unwrap(), b"new");
    }

    #[test]
    fn hard_links_inside_dest_work() {
        let f = fixture();
        f.extract(&archive(|b| {
            file(b, "a", b"same");
            raw(b, EntryType::Link, b"sub/b", b"a", b"");
            raw(b, EntryType::Link, b"a", b"a", b"");
        }))
        .unwrap();
        let a = fs::metadata(f.dest.join("a")).unwrap();
        let b = fs::metadata(f.dest.join("sub/b")).unwrap();
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
        assert_eq!(fs::read(f.dest.join("a")).unwrap(), b"same");
    }

    #[test]
    fn directory_replaced_by_a_symlink_is_not_chmod_ed_through_it() {
        let f = fixture();
        fs::create_dir(f.outside.join("target")).unwrap();
        fs::set_permissions(f.outside.join("target"), Permissions::from_mode(0o750)).unwrap();
        let tar = archive(|b| {
            dir_mode(b, "e", 0o700);
            dir_mode(b, "d", 0o500);
            raw(b, EntryType::Symlink, b"d", b"e", b"");
        });
        f.extract(&tar).unwrap();
        assert_eq!(fs::read_link(f.dest.join("d")).unwrap(), Path::new("e"));
        assert_eq!(fs::metadata(f.dest.join("e")).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(fs::metadata(f.outside.join("target")).unwrap().mode() & 0o7777, 0o750);
    }

    #[test]
    fn read_only_directories_extract() {
        let f = fixture();
        let tar = archive(|b| {
            dir_mode(b, "ro", 0o555);
            file(b, "ro/f", b"f");
            dir_mode(b, "ro/sub", 0o500);
            file(b, "ro/sub/g", b"g");
        });
        f.extract(&tar).unwrap();
        assert_eq!(fs::read(f.dest.join("ro/sub/g")).unwrap(), b"g");
        let ro = fs::metadata(f.dest.join("ro")).unwrap();
        assert_eq!(ro.mode() & 0o7777, 0o555);
        assert_eq!(ro.mtime(), 1_500_000_000);
        assert_eq!(fs::metadata(f.dest.join("ro/sub")).unwrap().mode() & 0o7777, 0o500);
        // And they can be removed again.
        remove_all(&f.dest, &["ro".to_owned()]).unwrap();
        assert!(!f.dest.join("ro").exists());
    }

    #[test]
    fn setuid_and_setgid_bits_are_dropped() {
        let f = fixture();
        let mut h = Header::new_gnu();
        h.set_mode(0o6755);
        h.set_size(1);
        let mut b = Builder::new(Vec::new());
        b.append_data(&mut h, "suid", &b"x"[..]).unwrap();
        f.extract(&b.into_inner().unwrap()).unwrap();
        assert_eq!(fs::metadata(f.dest.join("suid")).unwrap().mode() & 0o7777, 0o755);
    }

    #[test]
    fn over_the_byte_limit_is_refused_before_writing() {
        let f = fixture();
        let limits = TarLimits { max_bytes: 10, max_entries: 100 };
        let tar = archive(|b| {
            file(b, "a", b"123456");
            file(b, "b", b"123456");
        });
        match extract(&tar[..], Compression::None, &f.dest, &limits) {
            Err(ExtractError::OverLimit { entry, what: "bytes", limit: 10 }) => assert_eq!(entry, "b"),
            other => panic!("expected OverLimit bytes, got {other:?}"),
        }
        assert!(f.dest.join("a").exists());
        assert!(!f.dest.join("b").exists());
    }

    #[test]
    fn over_the_entry_limit_is_refused_before_writing() {
        let f = fixture();
        let limits = TarLimits { max_bytes: 1 << 20, max_entries: 2 };
        let tar = archive(|b| {
            file(b, "a", b"1");
            file(b, "b", b"2");
            file(b, "c", b"3");
        });
        match extract(&tar[..], Compression::None, &f.dest, &limits) {
            Err(ExtractError::OverLimit { entry, what: "entries", limit: 2 }) => {
                assert_eq!(entry, "c");
            }
            other => panic!("expected OverLimit entries, got {other:?}"),
        }
        assert!(!f.dest.join("c").exists());

        // Parent directories a member makes us create count too.
        let f = fixture();
        let deep = archive(|b| file(b, "a/b/c/f", b"f"));
        let limits = TarLimits { max_bytes: 1 << 20, max_entries: 3 };
        match extract(&deep[..], Compression::None, &f.dest, &limits) {
            Err(ExtractError::OverLimit { entry, what: "entries", .. }) => assert_eq!(entry, "a/b/c/f"),
            other => panic!("expected OverLimit entries, got {other:?}"),
        }
        let limits = TarLimits { max_bytes: 1 << 20, max_entries: 4 };
        assert_eq!(extract(&deep[..], Compression::None, &f.dest, &limits).unwrap().entries, 1);
    }

    #[test]
    fn oversized_extension_headers_are_refused_unread() {
        let f = fixture();
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::GNULongName);
        h.set_size(MAX_EXTENSION_BYTES + 1);
        h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        h.set_cksum();
        // Only the header: the claimed data never arrives.
        assert_format(f.extract(h.as_bytes()));
    }

    #[test]
    fn pax_size_disagreeing_with_the_header_is_refused() {
        let f = fixture();
        let tar = archive(|b| {
            b.append_pax_extensions([("size", &b"2048"[..])]).unwrap();
            file(b, "f", b"short");
        });
        assert_format(f.extract(&tar));
    }

    #[test]
    fn garbage_and_truncated_streams_are_format_errors() {
        let f = fixture();
        assert_format(f.extract(&[0x41; 1024]));
        assert_format(f.extract(b"short"));
        let tar = archive(|b| file(b, "big", &[7; 10_000]));
        assert_format(f.extract(&tar[..512 + 1000]));
        assert_format(extract(&[0x41; 100][..], Compression::Gzip, &f.dest, &TarLimits::default()));
        assert_format(extract(&[0x41; 100][..], Compression::Zstd, &f.dest, &TarLimits::default()));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        assert_format(extract(&gz[..gz.len() - 4], Compression::Gzip, &f.dest, &TarLimits::default()));
        // An empty body is an empty archive.
        assert_eq!(f.extract(&[]).unwrap().entries, 0);
    }

    #[test]
    fn content_encodings() {
        let ce = Compression::from_content_encoding;
        assert_eq!(ce(None).unwrap(), Compression::None);
        assert_eq!(ce(Some("")).unwrap(), Compression::None);
        assert_eq!(ce(Some("identity")).unwrap(), Compression::None);
        assert_eq!(ce(Some("gzip")).unwrap(), Compression::Gzip);
        assert_eq!(ce(Some("X-GZIP")).unwrap(), Compression::Gzip);
        assert_eq!(ce(Some("zstd")).unwrap(), Compression::Zstd);
        assert!(matches!(ce(Some("br")), Err(ExtractError::UnsupportedEncoding(v)) if v == "br"));
    }

    #[test]
    fn resolve_dir_and_remove_all_reject_escapes() {
        let f = fixture();
        fs::write(f.outside.join("keep"), b"keep").unwrap();
        symlink(&f.outside, f.dest.join("out")).unwrap();
        for bad in ["..", "../outside", "a/../..", "/etc", "out", "out/x"] {
            assert!(
                matches!(resolve_dir(&f.dest, Some(bad)), Err(ExtractError::Hostile { ref entry, .. }) if entry == bad),
                "resolve_dir accepted {bad:?}"
            );
            assert!(
                matches!(ensure_dir(&f.dest, Some(bad)), Err(ExtractError::Hostile { ref entry, .. }) if entry == bad),
                "ensure_dir accepted {bad:?}"
            );
        }
        for bad in ["..", "../outside/keep", "a/../../outside", "/etc/passwd", "out/keep", "", "."] {
            assert!(
                matches!(remove_all(&f.dest, &[bad.to_owned()]), Err(ExtractError::Hostile { ref entry, .. }) if entry == bad),
                "remove_all accepted {bad:?}"
            );
        }
        // One bad path means nothing is removed.
        fs::write(f.dest.join("victim"), b"v").unwrap();
        assert!(remove_all(&f.dest, &["victim".into(), "../x".into()]).is_err());
        assert!(f.dest.join("victim").exists());
        assert_eq!(fs::read(f.outside.join("keep")).unwrap(), b"keep");

        assert_eq!(resolve_dir(&f.dest, None).unwrap(), f.dest);
        assert_eq!(resolve_dir(&f.dest, Some("./")).unwrap(), f.dest);
        assert_eq!(resolve_dir(&f.dest, Some("./a//b/")).unwrap(), f.dest.join("a/b"));
        assert_eq!(ensure_dir(&f.dest, Some("new/sub")).unwrap(), f.dest.join("new/sub"));
        assert!(f.dest.join("new/sub").is_dir());
    }

    #[test]
    fn remove_all_removes_files_dirs_and_links_but_not_link_targets() {
        let f = fixture();
        fs::write(f.outside.join("keep"), b"keep").unwrap();
        fs::create_dir_all(f.dest.join("d/e")).unwrap();
        fs::write(f.dest.join("d/e/f"), b"f").unwrap();
        fs::write(f.dest.join("file"), b"f").unwrap();
        symlink(&f.outside, f.dest.join("out")).unwrap();
        remove_all(&f.dest, &["d".into(), "./file".into(), "out".into(), "missing/x".into()]).unwrap();
        assert_eq!(fs::read_dir(&f.dest).unwrap().count(), 0);
        assert_eq!(fs::read(f.outside.join("keep")).unwrap(), b"keep");
    }

    #[test]
    fn list_reports_kinds_without_following_links() {
        let f = fixture();
        fs::create_dir(f.dest.join("d")).unwrap();
        write_file(&f.dest.join("f"), b"12345", 0o640);
        symlink("d", f.dest.join("l")).unwrap();
        let got: Vec<(String, EntryKind)> = list(&f.dest).unwrap().into_iter().map(|e| (e.name, e.kind)).collect();
        assert_eq!(
            got,
            [("d".to_owned(), EntryKind::Dir), ("f".to_owned(), EntryKind::File), ("l".to_owned(), EntryKind::Symlink)]
        );
        let fe = list(&f.dest).unwrap().into_iter().find(|e| e.name == "f").unwrap();
        assert_eq!((fe.size, fe.mode), (5, 0o640));
    }
}
