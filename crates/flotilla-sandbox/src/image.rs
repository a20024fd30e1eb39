//! Root filesystems a sandbox can start from.
//!
//! * `host`: the host's system directories (`/usr`, `/bin`, `/sbin`,
//!   `/lib*`, `/opt`), bound read-only, with a generated `/etc` that holds
//!   only what programs need: users and groups of the sandbox, hosts,
//!   resolver and name-service config, the dynamic linker's files,
//!   `alternatives` and CA certificates. Never the host's secrets
//!   (`shadow`, ssh keys, `ssl/private`), and never `/root`, `/home`,
//!   `/run`, `/var` or the node's data directory.
//! * `dir:/path`: a root filesystem directory used as the read-only lower
//!   layer of an overlay; writes land in the sandbox's own upper layer.
//! * `name:tag@sha256:<hex>`: a version in the node's image store (the node
//!   resolves `name:tag` to this form at create), used like a directory.

use std::io;
use std::path::{Path, PathBuf};

/// Where a sandbox's root comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    Host,
    Dir(PathBuf),
    /// A stored image version: its reference and its unpacked root.
    Stored {
        reference: String,
        rootfs: PathBuf,
    },
}

/// Why an image reference was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image {0:?}: use `host`, `dir:/absolute/path` or an imported NAME:TAG (see `flotilla image ls`)")]
    Unknown(String),
    #[error("image directory {0} must be an absolute path")]
    NotAbsolute(PathBuf),
    #[error("image directory {path} is not usable")]
    Missing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image directory {0} is inside the node's data directory")]
    InsideDataDir(PathBuf),
}

impl Image {
    /// Parses `host` or `dir:/abs/path`, checking the directory exists and
    /// is not part of the node's own data.
    pub fn parse(s: &str, data_dir: &Path) -> Result<Image, ImageError> {
        if s == "host" || s.is_empty() {
            return Ok(Image::Host);
        }
        if let Some((_, digest)) = s.split_once('@') {
            let hex = digest
                .strip_prefix("sha256:")
                .filter(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
                .ok_or_else(|| ImageError::Unknown(s.to_string()))?;
            let rootfs = data_dir.join("images/versions").join(hex).join("rootfs");
            if !rootfs.is_dir() {
                let source = io::Error::new(io::ErrorKind::NotFound, "no such image version on this node");
                return Err(ImageError::Missing { path: rootfs, source });
            }
            return Ok(Image::Stored { reference: s.to_string(), rootfs });
        }
        let Some(p) = s.strip_prefix("dir:") else {
            return Err(ImageError::Unknown(s.to_string()));
        };
        let path = PathBuf::from(p);
        if !path.is_absolute() {
            return Err(ImageError::NotAbsolute(path));
        }
        let canon = path.canonicalize().map_err(|source| ImageError::Missing { path: path.clone(), source })?;
        if !canon.is_dir() {
            let source = io::Error::new(io::ErrorKind::NotADirectory, "not a directory");
            return Err(ImageError::Missing { path, source });
        }
        if let Ok(data) = data_dir.canonicalize()
            && (canon.starts_with(&data) || data.starts_with(&canon))
        {
            return Err(ImageError::InsideDataDir(canon));
        }
        Ok(Image::Dir(canon))
    }

    /// The reference as users write it.
    pub fn reference(&self) -> String {
        match self {
            Image::Host => "host".into(),
            Image::Dir(p) => format!("dir:{}", p.display()),
            Image::Stored { reference, .. } => reference.clone(),
        }
    }

    /// The directory an overlay uses as its lower layer, if any.
    pub fn lower_dir(&self) -> Option<&Path> {
        match self {
            Image::Host => None,
            Image::Dir(p) | Image::Stored { rootfs: p, .. } => Some(p),
        }
    }
}

/// Host directories a `host` image exposes, read-only.
pub const HOST_SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "opt"];

/// Files copied from the host's `/etc` into the generated one, if present.
/// Nothing secret is on this list, and it is a list, not a filter, so a new
/// secret file on the host never leaks by default.
const HOST_ETC_FILES: &[&str] = &[
    "resolv.conf",
    "ld.so.cache",
    "ld.so.conf",
    "localtime",
    "os-release",
    "debian_version",
    "profile",
    "bash.bashrc",
    "shells",
    "inputrc",
    "mime.types",
    "protocols",
    "services",
    "ethertypes",
    "host.conf",
    "gai.conf",
    "environment",
    "timezone",
];

/// Directories copied (with their symlinks kept as symlinks).
const HOST_ETC_DIRS: &[&str] = &["ld.so.conf.d", "alternatives", "ssl/certs", "ca-certificates", "profile.d"];

/// Builds the `/etc` every `host` sandbox sees, at `dest` (replacing it).
/// `host_etc` is normally `/etc`; tests pass a fake.
pub fn build_host_etc(host_etc: &Path, dest: &Path) -> io::Result<()> {
    let staging = dest.with_extension("new");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    std::fs::write(
        staging.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )?;
    std::fs::write(staging.join("group"), "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")?;
    std::fs::write(staging.join("hosts"), "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")?;
    std::fs::write(staging.join("nsswitch.conf"), "passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\n")?;
    for f in HOST_ETC_FILES {
        let src = host_etc.join(f);
        if let Ok(meta) = std::fs::symlink_metadata(&src) {
            copy_entry(&src, &staging.join(f), &meta)?;
        }
    }
    for d in HOST_ETC_DIRS {
        let src = host_etc.join(d);
        if src.is_dir() {
            copy_tree(&src, &staging.join(d))?;
        }
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest)?;
    }
    std::fs::rename(&staging, dest)
}

fn copy_entry(src: &Path, dst: &Path, meta: &std::fs::Metadata) -> io::Result<()> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src)?;
        // A relative link would point somewhere else from the new /etc; keep
        // absolute ones (they resolve inside the sandbox), copy the rest.
        if target.is_absolute() {
            std::os::unix::fs::symlink(&target, dst)?;
        } else if std::fs::metadata(src).is_ok_and(|m| m.is_file()) {
            std::fs::copy(src, dst)?;
        }
    } else if meta.is_file() {
        std::fs::copy(src, dst)?;
    }
    Ok(())
}

fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let to = dst.join(entry.file_name());
        if meta.file_type().is_symlink() {
            // Certificates are symlinks into /usr/share: keep them as links.
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &to)?;
        } else if meta.is_dir() {
            copy_tree(&entry.path(), &to)?;
        } else if meta.is_file() {
            std::fs::copy(entry.path(), &to)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let data = tempfile::tempdir().unwrap();
        let img = tempfile::tempdir().unwrap();
        assert_eq!(Image::parse("host", data.path()).unwrap(), Image::Host);
        let d = Image::parse(&format!("dir:{}", img.path().display()), data.path()).unwrap();
        assert!(matches!(d, Image::Dir(_)));
        assert!(matches!(Image::parse("dir:relative", data.path()), Err(ImageError::NotAbsolute(_))));
        assert!(matches!(Image::parse("dir:/nonexistent/x", data.path()), Err(ImageError::Missing { .. })));
        assert!(matches!(Image::parse("ubuntu", data.path()), Err(ImageError::Unknown(_))));
        let inside = data.path().join("images");
        std::fs::create_dir(&inside).unwrap();
        let r = Image::parse(&format!("dir:{}", inside.display()), data.path());
        assert!(matches!(r, Err(ImageError::InsideDataDir(_))), "{r:?}");
    }

    #[test]
    fn generated_etc_keeps_secrets_out() {
        let host = tempfile::tempdir().unwrap();
        let h = host.path();
        std::fs::write(h.join("shadow"), "root:$6$secret").unwrap();
        std::fs::write(h.join("resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        std::fs::create_dir_all(h.join("ssl/private")).unwrap();
        std::fs::write(h.join("ssl/private/key.pem"), "KEY").unwrap();
        std::fs::create_dir_all(h.join("ssl/certs")).unwrap();
        std::os::unix::fs::symlink("/usr/share/ca-certificates/x.crt", h.join("ssl/certs/x.pem")).unwrap();
        std::fs::create_dir_all(h.join("ssh")).unwrap();
        std::fs::write(h.join("ssh/ssh_host_rsa_key"), "KEY").unwrap();
        let out = tempfile::tempdir().unwrap();
        let etc = out.path().join("etc");
        build_host_etc(h, &etc).unwrap();
        assert!(etc.join("passwd").exists());
        assert_eq!(std::fs::read_to_string(etc.join("resolv.conf")).unwrap(), "nameserver 10.0.0.1\n");
        assert!(std::fs::symlink_metadata(etc.join("ssl/certs/x.pem")).unwrap().file_type().is_symlink());
        assert!(!etc.join("shadow").exists());
        assert!(!etc.join("ssl/private").exists());
        assert!(!etc.join("ssh").exists());
        // Rebuilding replaces it in place.
        build_host_etc(h, &etc).unwrap();
        assert!(etc.join("group").exists());
    }
}
