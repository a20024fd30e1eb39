//! A guest kernel of our own: Debian's `linux-source-6.1` built with a small
//! config ([`CONFIG`], merged over `make tinyconfig`).
//!
//! Why: under QEMU's software accelerator the distribution's cloud kernel
//! spends ~1.8 s reaching a trivial `/init` (ACPI, drivers probed for
//! hardware a microVM never has) and then ~0.2 s loading the virtio modules.
//! This kernel has exactly what the guest's init uses built in and reaches
//! the same `/init` in ~0.9 s (bench/README.md). It finds its devices from
//! the kernel command line rather than ACPI: QEMU runs with `acpi=off`, lists
//! the virtio-mmio devices there itself, and we add fw_cfg's ports
//! ([`FW_CFG_CMDLINE`]).
//!
//! `flotilla node setup-vm --build-kernel` builds it into `<home>/vm/kernel/`
//! (`vmlinux` and `vmlinux.json`, which says what it is); a node then
//! prefers it to the distribution's kernel. A build takes ~5 minutes on two
//! cores, so it is never started behind a user's `create`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The config fragment, merged over `make tinyconfig`.
pub const CONFIG: &str = include_str!("guest-kernel.config");
/// Where Debian's `linux-source-6.1` package puts the source.
pub const DEFAULT_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";
/// QEMU's fw_cfg on x86 (selector 0x510, data 0x511, DMA 0x514): without
/// ACPI the kernel learns where it is from this parameter.
pub const FW_CFG_CMDLINE: &str = "qemu_fw_cfg.ioport=12@0x510:0:1:4";
/// Options the guest's init cannot do without; a build whose `.config` lacks
/// one (a source tree whose Kconfig moved on) fails, naming them.
const REQUIRED: [&str; 13] = [
    "PVH",
    "VIRTIO_MMIO",
    "VIRTIO_MMIO_CMDLINE_DEVICES",
    "VIRTIO_BLK",
    "VIRTIO_CONSOLE",
    "VIRTIO_NET",
    "FW_CFG_SYSFS",
    "FW_CFG_SYSFS_CMDLINE",
    "EXT4_FS",
    "DEVTMPFS",
    "UNIX98_PTYS",
    "CGROUP_PIDS",
    // The agent's getrandom() must not wait for entropy.
    "RANDOM_TRUST_CPU",
];

/// What `vmlinux.json` beside a built kernel says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltKernel {
    /// `uname -r` inside the guest.
    pub release: String,
    /// sha256 of [`CONFIG`] it was built with.
    pub config_sha256: String,
    /// The source tarball.
    pub source: PathBuf,
    /// Whether it finds devices through ACPI (ours does not).
    pub acpi: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelBuildError {
    #[error(
        "no kernel source at {0}: apt-get install -y linux-source-6.1 bc bison flex libelf-dev build-essential \
         (or pass --kernel-source)"
    )]
    NoSource(PathBuf),
    #[error("{step} failed; the last lines of {log}:\n{tail}")]
    Step { step: &'static str, log: PathBuf, tail: String },
    #[error("the kernel's .config lacks {0:?} after merging our config (a newer source tree?)")]
    Missing(Vec<&'static str>),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> KernelBuildError + 'a {
    move |source| KernelBuildError::Io { what, path: path.to_path_buf(), source }
}

/// `<assets>/kernel`: where a built kernel lives.
pub fn kernel_dir(assets: &Path) -> PathBuf {
    assets.join("kernel")
}

/// sha256 of [`CONFIG`], hex.
pub fn config_sha256() -> String {
    Sha256::digest(CONFIG.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// What the sidecar `<image>.json` says, if the kernel at `image` is one we
/// built.
pub fn describe(image: &Path) -> Option<BuiltKernel> {
    let mut side = image.as_os_str().to_owned();
    side.push(".json");
    serde_json::from_slice(&std::fs::read(side).ok()?).ok()
}

/// The kernel built into `<assets>/kernel/`, if there is one.
pub fn installed(assets: &Path) -> Option<(PathBuf, BuiltKernel)> {
    let image = kernel_dir(assets).join("vmlinux");
    let built = describe(&image)?;
    image.is_file().then_some((image, built))
}

/// Builds the guest kernel from `source` into `<assets>/kernel/`, calling
/// `progress` with what it is doing. The build tree (~1 GB) is removed
/// afterwards; the log stays as `build.log`.
pub fn build(
    assets: &Path,
    source: &Path,
    jobs: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<(PathBuf, BuiltKernel), KernelBuildError> {
    if !source.is_file() {
        return Err(KernelBuildError::NoSource(source.to_path_buf()));
    }
    let dir = kernel_dir(assets);
    let work = dir.join("build");
    let log_path = dir.join("build.log");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io_err("creating", &work))?;
    let mut log = std::fs::File::create(&log_path).map_err(io_err("creating", &log_path))?;
    let mut run = |step: &'static str, cmd: &mut Command, progress: &mut dyn FnMut(&str)| {
        progress(step);
        let _ = writeln!(log, "== {step}: {cmd:?}");
        let out = log.try_clone().map_err(io_err("opening", &log_path))?;
        let err = log.try_clone().map_err(io_err("opening", &log_path))?;
        let mut child = cmd
            .current_dir(&work)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| KernelBuildError::Io { what: step, path: work.clone(), source })?;
        // The compile takes minutes: say how far it has got.
        let status = loop {
            if let Some(st) = child.try_wait().map_err(io_err("waiting for", &work))? {
                break st;
            }
            if step == "compiling" {
                progress(&format!("compiling ({} files)", compiled(&log_path)));
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        if status.success() {
            Ok(())
        } else {
            Err(KernelBuildError::Step { step, log: log_path.clone(), tail: tail(&log_path, 15) })
        }
    };
    let mut tar = Command::new("tar");
    tar.arg("-xf").arg(source).args(["--strip-components=1", "-C"]).arg(&work);
    run("unpacking the source", &mut tar, progress)?;
    run("configuring (tinyconfig)", Command::new("make").arg("tinyconfig"), progress)?;
    let frag = work.join("flotilla.config");
    std::fs::write(&frag, CONFIG).map_err(io_err("writing", &frag))?;
    run(
        "configuring (our options)",
        Command::new("sh").args(["scripts/kconfig/merge_config.sh", "-m", ".config", "flotilla.config"]),
        progress,
    )?;
    run("configuring (olddefconfig)", Command::new("make").arg("olddefconfig"), progress)?;
    let config = std::fs::read_to_string(work.join(".config")).map_err(io_err("reading", &work.join(".config")))?;
    let missing: Vec<_> =
        REQUIRED.into_iter().filter(|o| !config.lines().any(|l| l == format!("CONFIG_{o}=y"))).collect();
    if !missing.is_empty() {
        return Err(KernelBuildError::Missing(missing));
    }
    run("compiling", Command::new("make").arg(format!("-j{}", jobs.max(1))).arg("vmlinux"), progress)?;
    let release = Command::new("make")
        .args(["-s", "kernelrelease"])
        .current_dir(&work)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "6.1-flotilla".into());
    progress("installing");
    let image = dir.join("vmlinux");
    let tmp = dir.join("vmlinux.tmp");
    std::fs::copy(work.join("vmlinux"), &tmp).map_err(io_err("copying the kernel to", &tmp))?;
    let built = BuiltKernel { release, config_sha256: config_sha256(), source: source.to_path_buf(), acpi: false };
    let side = dir.join("vmlinux.json");
    let json = serde_json::to_vec_pretty(&built).map_err(|e| io_err("encoding", &side)(e.into()))?;
    std::fs::write(&side, json).map_err(io_err("writing", &side))?;
    std::fs::rename(&tmp, &image).map_err(io_err("moving into place", &image))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok((image, built))
}

/// Objects compiled so far, from the build log (`  CC      path.o`).
fn compiled(log: &Path) -> usize {
    std::fs::File::open(log)
        .map(|f| std::io::BufReader::new(f).lines().map_while(Result::ok).filter(|l| l.starts_with("  CC ")).count())
        .unwrap_or(0)
}

fn tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_builds_in_what_the_guest_init_needs() {
        for o in REQUIRED {
            assert!(CONFIG.lines().any(|l| l == format!("CONFIG_{o}=y")), "guest-kernel.config lacks CONFIG_{o}=y");
        }
        // No modules: the init loads none from a kernel of ours.
        assert!(CONFIG.lines().any(|l| l == "CONFIG_MODULES=n"));
    }

    #[test]
    fn a_sidecar_names_a_built_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let image = kernel_dir(dir.path()).join("vmlinux");
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        assert!(installed(dir.path()).is_none());
        std::fs::write(&image, b"\x7fELF").unwrap();
        assert!(installed(dir.path()).is_none(), "a vmlinux without its json is not ours");
        let b = BuiltKernel {
            release: "6.1.1-flotilla".into(),
            config_sha256: config_sha256(),
            source: "/x".into(),
            acpi: false,
        };
        std::fs::write(kernel_dir(dir.path()).join("vmlinux.json"), serde_json::to_vec(&b).unwrap()).unwrap();
        assert_eq!(installed(dir.path()), Some((image.clone(), b.clone())));
        assert_eq!(describe(&image), Some(b));
    }
}
