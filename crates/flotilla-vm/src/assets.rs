//! Guest assets the node makes for itself: the kernel (extracted from the
//! distribution's compressed `vmlinuz` into the `vmlinux` that microvm boots
//! fastest) and the initramfs (a `newc` cpio holding our static binary as
//! `/init`, the kernel modules the guest needs and the order to load them).
//! Both are cached under `<home>/vm/` and rebuilt when their inputs change.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::guest::{MODULE_LIST, NET_MODULE_LIST};

/// Modules the guest loads, dependencies first. Missing ones are fine
/// (built into the kernel). No `virtio_net` while guests have no network:
/// every module costs boot time under TCG.
pub const GUEST_MODULES: [&str; 4] = ["virtio_mmio", "virtio_blk", "virtio_console", "qemu_fw_cfg"];
/// Modules a guest with a NIC loads as well (only then: each module costs
/// boot time under TCG).
pub const NET_MODULES: [&str; 1] = ["virtio_net"];

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error(
        "no guest kernel found: install Debian's `linux-image-cloud-amd64` (apt-get install -y linux-image-cloud-amd64) \
         or set FLOTILLA_VM_KERNEL to a vmlinuz/vmlinux and FLOTILLA_VM_MODULES to its /lib/modules/<version>"
    )]
    NoKernel,
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} holds no kernel this node can unpack (lz4, gzip or zstd payload, or an ELF vmlinux)")]
    BadKernel(PathBuf),
    #[error(
        "the guest agent {0} is linked dynamically; a microVM needs a static build: \
         RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu -p flotilla, \
         then point FLOTILLA_GUEST_AGENT at target/x86_64-unknown-linux-gnu/release/flotilla"
    )]
    DynamicAgent(PathBuf),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AssetError + 'a {
    move |source| AssetError::Io { what, path: path.to_path_buf(), source }
}

/// A kernel on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSource {
    pub image: PathBuf,
    /// `/lib/modules/<release>`, when the kernel has modules.
    pub modules: Option<PathBuf>,
    pub release: String,
    /// Whether it finds its devices through ACPI (distribution kernels), or
    /// from the command line with QEMU's ACPI off (ours: [`crate::kernel`]).
    pub acpi: bool,
}

/// Finds the guest kernel: `FLOTILLA_VM_KERNEL` (+ `FLOTILLA_VM_MODULES`),
/// else the one `flotilla node setup-vm --build-kernel` built under
/// `assets` (`<home>/vm`), else the newest `/boot/vmlinuz-*-cloud-amd64`,
/// else the newest `/boot/vmlinuz-*`.
pub fn find_kernel(assets: &Path) -> Result<KernelSource, AssetError> {
    if let Some(k) = std::env::var_os("FLOTILLA_VM_KERNEL") {
        let image = PathBuf::from(k);
        if let Some(built) = crate::kernel::describe(&image) {
            return Ok(KernelSource { image, modules: None, release: built.release, acpi: built.acpi });
        }
        let modules = std::env::var_os("FLOTILLA_VM_MODULES").map(PathBuf::from);
        let release = modules
            .as_ref()
            .and_then(|m| m.file_name())
            .or_else(|| image.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok(KernelSource { image, modules, release, acpi: true });
    }
    if let Some((image, built)) = crate::kernel::installed(assets) {
        return Ok(KernelSource { image, modules: None, release: built.release, acpi: built.acpi });
    }
    distribution_kernel()
}

/// The distribution's newest kernel in `/boot`, cloud kernels first.
pub fn distribution_kernel() -> Result<KernelSource, AssetError> {
    let mut found: Vec<(bool, String)> = std::fs::read_dir("/boot")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("vmlinuz-").map(str::to_owned))
                .map(|r| (r.ends_with("-cloud-amd64"), r))
                .collect()
        })
        .unwrap_or_default();
    // Cloud kernels first, then by release, newest last.
    found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| version_key(&a.1).cmp(&version_key(&b.1))));
    let (_, release) = found.pop().ok_or(AssetError::NoKernel)?;
    let modules = Path::new("/lib/modules").join(&release);
    Ok(KernelSource {
        image: Path::new("/boot").join(format!("vmlinuz-{release}")),
        modules: modules.is_dir().then_some(modules),
        release,
        acpi: true,
    })
}

fn version_key(r: &str) -> Vec<u64> {
    r.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok()).collect()
}

/// The kernel and initramfs a microVM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub release: String,
    /// As [`KernelSource::acpi`]: QEMU's `acpi=off` when false.
    pub acpi: bool,
}

/// Makes (or finds cached) the guest assets under `dir`.
pub fn prepare(dir: &Path, kernel: &KernelSource, agent: &Path) -> Result<GuestAssets, AssetError> {
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    // Named by the kernel file too (path, size, mtime): a rebuilt kernel of
    // the same release is a new file.
    let mut kh = Sha256::new();
    hash_file_identity(&mut kh, &kernel.image).map_err(io_err("reading the kernel", &kernel.image))?;
    let kkey: String = kh.finalize().iter().take(4).map(|b| format!("{b:02x}")).collect();
    let vmlinux = dir.join(format!("vmlinux-{}-{kkey}", sanitize(&kernel.release)));
    if !vmlinux.exists() {
        let packed = std::fs::read(&kernel.image).map_err(io_err("reading the kernel", &kernel.image))?;
        let elf = unpack_kernel(&packed).ok_or_else(|| AssetError::BadKernel(kernel.image.clone()))?;
        write_atomic(&vmlinux, &elf)?;
    }
    if !is_static(agent).map_err(io_err("reading the guest agent", agent))? {
        return Err(AssetError::DynamicAgent(agent.to_path_buf()));
    }
    let (modules, net_modules): (Vec<PathBuf>, Vec<PathBuf>) = match &kernel.modules {
        Some(m) => {
            let base = module_closure(m, &GUEST_MODULES).map_err(io_err("reading modules.dep in", m))?;
            let all = [&GUEST_MODULES[..], &NET_MODULES[..]].concat();
            let all = module_closure(m, &all).map_err(io_err("reading modules.dep in", m))?;
            let net = all.into_iter().filter(|p| !base.contains(p)).collect();
            (base, net)
        }
        None => Default::default(),
    };
    // The initramfs is named by what goes in: the agent (by size and
    // mtime: hashing 20 MB per boot would cost more than the boot saves),
    // the kernel release and the module list.
    let mut h = Sha256::new();
    hash_file_identity(&mut h, agent).map_err(io_err("reading the guest agent", agent))?;
    h.update(kernel.release.as_bytes());
    for m in modules.iter().chain(&net_modules) {
        h.update(m.as_os_str().as_encoded_bytes());
    }
    let key: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let initramfs = dir.join(format!("initramfs-{key}.cpio"));
    if !initramfs.exists() {
        let cpio = build_initramfs(agent, &modules, &net_modules)?;
        write_atomic(&initramfs, &cpio)?;
    }
    Ok(GuestAssets { vmlinux, initramfs, release: kernel.release.clone(), acpi: kernel.acpi })
}

/// Feeds a file's identity (path, size, mtime) to `h`: what names a cached
/// asset made from it, without hashing megabytes on every boot.
fn hash_file_identity(h: &mut Sha256, path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    h.update(path.as_os_str().as_encoded_bytes());
    h.update(meta.len().to_le_bytes());
    h.update(format!("{:?}", meta.modified().ok()).as_bytes());
    Ok(())
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AssetError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("moving into place", path))
}

/// An uncompressed ELF kernel from a bzImage (or the ELF itself).
pub fn unpack_kernel(data: &[u8]) -> Option<Vec<u8>> {
    if data.starts_with(b"\x7fELF") {
        return Some(data.to_vec());
    }
    type Unpack = fn(&[u8]) -> Option<Vec<u8>>;
    let candidates: [(&[u8], Unpack); 3] =
        [(b"\x02\x21\x4c\x18", lz4_legacy), (b"\x1f\x8b\x08", gunzip), (b"\x28\xb5\x2f\xfd", unzstd)];
    for (magic, unpack) in candidates {
        let mut from = 0;
        while let Some(i) = find(&data[from..], magic) {
            if let Some(out) = unpack(&data[from + i..])
                && out.starts_with(b"\x7fELF")
            {
                return Some(out);
            }
            from += i + 1;
        }
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The LZ4 "legacy" frame the kernel uses: the magic, then blocks of at
/// most 8 MiB, each preceded by its compressed length.
fn lz4_legacy(data: &[u8]) -> Option<Vec<u8>> {
    const BLOCK: usize = 8 << 20;
    let mut out = Vec::new();
    let mut pos = 4;
    let mut buf = vec![0u8; BLOCK];
    while pos + 4 <= data.len() {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().ok()?) as usize;
        if len == 0x184c_2102 {
            pos += 4;
            continue;
        }
        if len == 0 || pos + 4 + len > data.len() {
            break;
        }
        match lz4_flex::block::decompress_into(&data[pos + 4..pos + 4 + len], &mut buf) {
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // Past the payload: the bzImage's trailer.
            Err(_) if !out.is_empty() => break,
            Err(_) => return None,
        }
        pos += 4 + len;
    }
    (!out.is_empty()).then_some(out)
}

fn gunzip(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let _ = flate2::read::GzDecoder::new(data).read_to_end(&mut out);
    (!out.is_empty()).then_some(out)
}

fn unzstd(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut d = zstd::stream::read::Decoder::new(data).ok()?.single_frame();
    let _ = d.read_to_end(&mut out);
    (!out.is_empty()).then_some(out)
}

/// Whether an ELF executable has no program interpreter (static or
/// static-pie).
pub fn is_static(path: &Path) -> io::Result<bool> {
    let mut f = std::fs::File::open(path)?;
    let mut hdr = [0u8; 64];
    f.read_exact(&mut hdr)?;
    if &hdr[..4] != b"\x7fELF" || hdr[4] != 2 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a 64-bit ELF file"));
    }
    let phoff = u64::from_le_bytes(hdr[32..40].try_into().expect("8 bytes"));
    let phentsize = u16::from_le_bytes([hdr[54], hdr[55]]) as u64;
    let phnum = u16::from_le_bytes([hdr[56], hdr[57]]) as u64;
    let mut ph = vec![0u8; (phentsize * phnum) as usize];
    use std::io::Seek;
    f.seek(io::SeekFrom::Start(phoff))?;
    f.read_exact(&mut ph)?;
    const PT_INTERP: u32 = 3;
    Ok(!ph.chunks(phentsize.max(4) as usize).any(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]) == PT_INTERP))
}

/// The `.ko` files for `wanted` and everything they depend on, in load
/// order, from `modules.dep`.
pub fn module_closure(dir: &Path, wanted: &[&str]) -> io::Result<Vec<PathBuf>> {
    let dep = std::fs::read_to_string(dir.join("modules.dep"))?;
    let mut deps: std::collections::HashMap<String, (String, Vec<String>)> = Default::default();
    for line in dep.lines() {
        let Some((m, rest)) = line.split_once(':') else { continue };
        let name = module_name(m);
        deps.insert(name, (m.to_string(), rest.split_whitespace().map(str::to_owned).collect()));
    }
    let by_path: std::collections::HashMap<&str, &str> =
        deps.iter().map(|(n, (p, _))| (p.as_str(), n.as_str())).collect();
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    fn visit(
        name: &str,
        deps: &std::collections::HashMap<String, (String, Vec<String>)>,
        by_path: &std::collections::HashMap<&str, &str>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_string()) {
            return;
        }
        let Some((path, ds)) = deps.get(name) else { return };
        // modules.dep lists a module's dependencies in removal order:
        // load them from the back.
        for d in ds.iter().rev() {
            if let Some(n) = by_path.get(d.as_str()) {
                visit(n, deps, by_path, seen, order);
            }
        }
        order.push(path.clone());
    }
    for w in wanted {
        visit(w, &deps, &by_path, &mut seen, &mut order);
    }
    Ok(order.into_iter().map(|p| dir.join(p)).collect())
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// A `newc` cpio archive.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [self.ino, mode, 0, 0, 1, 0, size as u32, 0, 0, rdev.0, rdev.1, namesize as u32, 0];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.header(name, 0o040755, 0, (0, 0));
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.header(name, 0o100000 | mode, data.len(), (0, 0));
        self.out.extend_from_slice(data);
        self.pad();
    }

    pub fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) {
        self.header(name, 0o020000 | mode, 0, (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, (0, 0));
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

/// The agent without symbols and debug sections when binutils' `strip` is
/// there (a release build with line tables is ~5x its stripped size, and
/// every byte of the initramfs is copied by an emulated CPU under TCG).
fn stripped(agent: &Path) -> io::Result<Vec<u8>> {
    let tmp = std::env::temp_dir().join(format!("flotilla-init-{}", std::process::id()));
    let ok = std::process::Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&tmp)
        .arg(agent)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let data = if ok { std::fs::read(&tmp) } else { std::fs::read(agent) };
    let _ = std::fs::remove_file(&tmp);
    data
}

fn build_initramfs(agent: &Path, modules: &[PathBuf], net_modules: &[PathBuf]) -> Result<Vec<u8>, AssetError> {
    let mut c = Cpio::default();
    for d in ["dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 0o600, 5, 1);
    let bin = stripped(agent).map_err(io_err("reading the guest agent", agent))?;
    c.file("init", 0o755, &bin);
    for (mods, list_path) in [(modules, MODULE_LIST), (net_modules, NET_MODULE_LIST)] {
        let mut list = String::new();
        for m in mods {
            let data = std::fs::read(m).map_err(io_err("reading module", m))?;
            let name = m.file_name().and_then(|n| n.to_str()).unwrap_or("module.ko");
            c.file(&format!("lib/modules/{name}"), 0o644, &data);
            list.push_str(&format!("/lib/modules/{name}\n"));
        }
        c.file(list_path.trim_start_matches('/'), 0o644, list.as_bytes());
    }
    Ok(c.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closure_loads_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/a/virtio_mmio.ko: kernel/a/virtio_ring.ko kernel/a/virtio.ko\n\
             kernel/a/virtio_ring.ko: kernel/a/virtio.ko\n\
             kernel/a/virtio.ko:\n\
             kernel/b/virtio_blk.ko: kernel/a/virtio_ring.ko kernel/a/virtio.ko\n",
        )
        .unwrap();
        let got = module_closure(dir.path(), &["virtio_mmio", "virtio_blk", "not_there"]).unwrap();
        let names: Vec<_> = got.iter().map(|p| p.strip_prefix(dir.path()).unwrap().to_str().unwrap()).collect();
        assert_eq!(
            names,
            ["kernel/a/virtio.ko", "kernel/a/virtio_ring.ko", "kernel/a/virtio_mmio.ko", "kernel/b/virtio_blk.ko"]
        );
    }

    #[test]
    fn lz4_legacy_payload_is_found_in_a_bzimage() {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend((0..200_000u32).map(|i| (i % 251) as u8));
        let block = lz4_flex::block::compress(&elf);
        let mut image = vec![0xEBu8; 3000];
        image.extend_from_slice(b"\x02\x21\x4c\x18");
        image.extend_from_slice(&(block.len() as u32).to_le_bytes());
        image.extend_from_slice(&block);
        image.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]);
        assert_eq!(unpack_kernel(&image).unwrap(), elf);
        assert!(unpack_kernel(b"not a kernel at all").is_none());
    }

    #[test]
    fn cpio_is_newc_and_padded() {
        let mut c = Cpio::default();
        c.dir("dev");
        c.file("init", 0o755, b"abc");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 512, 0);
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("init\0") && s.contains("abc") && s.contains("TRAILER!!!"));
    }

    #[test]
    fn our_test_binary_is_dynamic_or_static_but_readable() {
        let exe = std::env::current_exe().unwrap();
        assert!(is_static(&exe).is_ok());
        assert!(is_static(Path::new("/etc/hostname")).is_err());
    }
}
