//! Real images for tests, built from Debian's packages by Debian's own
//! tools (`mmdebstrap`, `umoci`, `skopeo`, `apt-get download`), so the
//! image tests import what users have rather than what we wrote.
//!
//! Each builder caches its result under [`cache_root`] (one directory per
//! artifact, keyed by [`CACHE_VERSION`]): the first caller on a machine
//! builds it into a temporary directory beside the cache entry and renames
//! it into place, under an exclusive `flock` on the entry's lock file, so
//! parallel test processes (nextest runs each test in its own) build every
//! image once and never see half of one. A build that fails panics naming
//! the command and its stderr and leaves its temporary directory for the
//! next builder (who holds the lock) to remove.
//!
//! Needs root (`mmdebstrap` in root mode, `umoci unpack`, device nodes in
//! the unpacked bundle), network access to a Debian mirror, and
//! `mmdebstrap umoci skopeo docker-registry` installed (`.ci/run`).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Bump to rebuild every cached image (the cache directory's name).
pub const CACHE_VERSION: &str = "v1";
/// The Debian release every image is made of.
pub const SUITE: &str = "bookworm";
/// The tag of the Debian image in [`debian_oci_layout`].
pub const DEBIAN_TAG: &str = "bookworm";
/// The `name:tag` the [`debian_docker_archive`] records in its `RepoTags`.
pub const DEBIAN_ARCHIVE_NAME: &str = "flotilla-test/debian:bookworm";
/// The tag of the two-layer image in [`merged_usr_two_layer`].
pub const MERGED_USR_TAG: &str = "merged-usr";
/// The tar entry of the merged-usr image's second layer, literally through
/// the first layer's `lib -> usr/lib` symlink.
pub const MARKER_ENTRY: &str = "lib/x86_64-linux-gnu/flotilla-marker";
/// Where that entry lands when the symlink is resolved inside the root.
pub const MARKER_PATH: &str = "/usr/lib/x86_64-linux-gnu/flotilla-marker";
/// The marker's content.
pub const MARKER_CONTENT: &str = "written through lib -> usr/lib\n";
/// The package [`hello_deb`] holds: depends on libc6 only, and is not part
/// of the `apt` variant, so `dpkg -i` really installs something.
pub const HELLO_PACKAGE: &str = "hello";
/// What `hello` prints.
pub const HELLO_OUTPUT: &str = "Hello, world!\n";

/// How long one image build may take (mmdebstrap takes ~25 s here; a slow
/// mirror much longer), and so how long a waiter waits for the lock.
const BUILD_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// `$FLOTILLA_TEST_IMAGES/<version>`, by default
/// `/var/tmp/flotilla-test-images/<version>` (a disk, not a tmpfs, and kept
/// across runs and reboots).
pub fn cache_root() -> PathBuf {
    let base = std::env::var_os("FLOTILLA_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/flotilla-test-images"));
    base.join(CACHE_VERSION)
}

/// The Debian mirror images are built from: `$FLOTILLA_TEST_DEBIAN_MIRROR`,
/// else deb.debian.org.
fn mirror() -> String {
    std::env::var("FLOTILLA_TEST_DEBIAN_MIRROR").unwrap_or_else(|_| "http://deb.debian.org/debian".into())
}

/// `mmdebstrap --variant=apt --include=python3-minimal bookworm`: a Debian
/// root as a tarball, exactly as mmdebstrap writes it (device nodes in
/// `/dev`, absolute symlinks, `bin -> usr/bin` and friends, owners by
/// number).
pub fn debian_rootfs_tar() -> PathBuf {
    cached("debian-rootfs", |dir| {
        run(Command::new("mmdebstrap")
            .args(["--variant=apt", "--include=python3-minimal", "--format=tar", SUITE])
            .arg(dir.join("debian.tar"))
            .arg(mirror())
            .stdin(Stdio::null()));
    })
    .join("debian.tar")
}

/// The root of [`debian_rootfs_tar`] as an OCI image layout (one layer,
/// tag [`DEBIAN_TAG`]), made by `umoci`: the tarball unpacked as it comes
/// (device nodes and all) into an `umoci unpack`ed bundle, then `umoci
/// repack`ed.
pub fn debian_oci_layout() -> PathBuf {
    let tarball = debian_rootfs_tar();
    cached("debian-oci", |dir| {
        let image = format!("{}:{DEBIAN_TAG}", dir.join("oci").display());
        let bundle = dir.join("bundle");
        run(Command::new("umoci").args(["init", "--layout"]).arg(dir.join("oci")));
        run(Command::new("umoci").args(["new", "--image", &image]));
        run(Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle));
        run(Command::new("tar")
            .args(["-x", "--numeric-owner", "-p", "-f"])
            .arg(&tarball)
            .arg("-C")
            .arg(bundle.join("rootfs")));
        run(Command::new("umoci").args(["repack", "--image", &image]).arg(&bundle));
        remove_all(&bundle);
    })
    .join("oci")
}

/// [`debian_oci_layout`] as a `docker save` archive, written by `skopeo
/// copy oci:… docker-archive:…` with the name [`DEBIAN_ARCHIVE_NAME`].
pub fn debian_docker_archive() -> PathBuf {
    let layout = debian_oci_layout();
    cached("debian-docker-archive", |dir| {
        run(Command::new("skopeo")
            .arg("copy")
            .arg(format!("oci:{}:{DEBIAN_TAG}", layout.display()))
            .arg(format!("docker-archive:{}:{DEBIAN_ARCHIVE_NAME}", dir.join("debian.tar").display())));
    })
    .join("debian.tar")
}

/// A two-layer OCI layout (tag [`MERGED_USR_TAG`]) as merged-usr
/// distributions produce them. Layer 1 (`umoci repack`): Debian's static
/// busybox at `usr/bin/busybox` with its applets, `bin -> usr/bin`,
/// `lib -> usr/lib`, `usr/lib/x86_64-linux-gnu/`, `etc/passwd`. Layer 2
/// (`tar`, added verbatim with `umoci raw add-layer`): the single entry
/// [`MARKER_ENTRY`], whose path goes through the `lib` symlink; resolved
/// inside the root it lands at [`MARKER_PATH`] and `/lib` stays a symlink.
pub fn merged_usr_two_layer() -> PathBuf {
    let busybox = busybox_static();
    cached("merged-usr-oci", |dir| {
        let base = format!("{}:base", dir.join("oci").display());
        let bundle = dir.join("bundle");
        run(Command::new("umoci").args(["init", "--layout"]).arg(dir.join("oci")));
        run(Command::new("umoci").args(["new", "--image", &base]));
        run(Command::new("umoci").args(["unpack", "--image", &base]).arg(&bundle));
        let root = bundle.join("rootfs");
        for d in ["usr/bin", "usr/lib/x86_64-linux-gnu", "etc", "root", "tmp", "proc", "dev", "workspace"] {
            mkdir(&root.join(d));
        }
        install_busybox(&busybox, &root.join("usr/bin"), "busybox");
        link("usr/bin", &root.join("bin"));
        link("usr/lib", &root.join("lib"));
        write(&root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n");
        write(&root.join("etc/group"), "root:x:0:\n");
        run(Command::new("umoci").args(["repack", "--image", &base]).arg(&bundle));
        remove_all(&bundle);

        // Layer 2, by hand: a real directory `lib/x86_64-linux-gnu` in a
        // scratch tree gives tar the entry name through the symlink's path.
        let src = dir.join("layer2-src");
        mkdir(&src.join("lib/x86_64-linux-gnu"));
        write(&src.join(MARKER_ENTRY), MARKER_CONTENT);
        let layer = dir.join("layer2.tar");
        run(Command::new("tar")
            .args(["--format=pax", "--numeric-owner", "--owner=0", "--group=0", "--mtime=@0", "--no-recursion"])
            .arg("-C")
            .arg(&src)
            .arg("-cf")
            .arg(&layer)
            .arg(MARKER_ENTRY));
        let listed = run(Command::new("tar").arg("-tf").arg(&layer));
        assert_eq!(
            String::from_utf8_lossy(&listed.stdout),
            format!("{MARKER_ENTRY}\n"),
            "the second layer must hold exactly the entry through the symlink"
        );
        run(Command::new("umoci").args(["raw", "add-layer", "--image", &base, "--tag", MERGED_USR_TAG]).arg(&layer));
        remove_all(&src);
        fs::remove_file(&layer).unwrap_or_else(|e| panic!("removing {}: {e}", layer.display()));
    })
    .join("oci")
}

/// A root with nothing but Debian's static busybox at `/bin/busybox` and a
/// symlink for each of its applets (`busybox --install -s` style: `sh`,
/// `ls`, `cat`, `echo`, `id`, `mkdir`, `touch`, `stat`, …), the empty
/// directories a sandbox mounts on, and a one-line `/etc/passwd`. No
/// glibc, no loader: only a static agent can run in it. A directory.
pub fn busybox_root() -> PathBuf {
    let busybox = busybox_static();
    cached("busybox-root", |dir| {
        let root = dir.join("rootfs");
        for d in ["bin", "etc", "root", "tmp", "proc", "dev", "workspace"] {
            mkdir(&root.join(d));
        }
        install_busybox(&busybox, &root.join("bin"), "busybox");
        write(&root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n");
        write(&root.join("etc/group"), "root:x:0:\n");
    })
    .join("rootfs")
}

/// Debian's `busybox-static` binary, from the package fetched with
/// `apt-get download` and unpacked with `dpkg-deb -x` (the host's own
/// busybox may be the dynamic build, or absent).
pub fn busybox_static() -> PathBuf {
    cached("busybox-static", |dir| {
        let deb = apt_download("busybox-static", dir);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir.join("pkg")));
        let bin = dir.join("pkg/bin/busybox");
        assert!(bin.is_file(), "busybox-static has no /bin/busybox");
    })
    .join("pkg/bin/busybox")
}

/// The `.deb` of [`HELLO_PACKAGE`], fetched with `apt-get download` (the
/// host's package lists must be current: `apt-get update`).
pub fn hello_deb() -> PathBuf {
    cached("hello-deb", |dir| {
        let deb = apt_download(HELLO_PACKAGE, dir);
        fs::rename(&deb, dir.join("hello.deb")).unwrap_or_else(|e| panic!("renaming {}: {e}", deb.display()));
    })
    .join("hello.deb")
}

/// `apt-get download PACKAGE` into `dir`; the one `.deb` it wrote.
fn apt_download(package: &str, dir: &Path) -> PathBuf {
    // As root, apt drops to `_apt` to download unless told not to, and
    // warns that `_apt` cannot write here.
    run(Command::new("apt-get")
        .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
        .current_dir(dir)
        .stdin(Stdio::null()));
    let debs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "deb")
                && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .collect();
    assert_eq!(debs.len(), 1, "apt-get download {package} wrote {debs:?}");
    debs.into_iter().next().expect("one .deb")
}

/// Copies the static busybox to `dir/name` (0755) and links every applet
/// it lists beside it.
fn install_busybox(busybox: &Path, dir: &Path, name: &str) {
    let dst = dir.join(name);
    fs::copy(busybox, &dst).unwrap_or_else(|e| panic!("copying {} to {}: {e}", busybox.display(), dst.display()));
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod busybox");
    let list = run(Command::new(busybox).arg("--list"));
    let applets = String::from_utf8_lossy(&list.stdout).into_owned();
    let mut n = 0;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty() && *a != name) {
        assert!(!applet.contains('/'), "odd applet name {applet:?}");
        link(name, &dir.join(applet));
        n += 1;
    }
    for needed in ["sh", "ls", "cat", "echo", "id", "mkdir", "touch", "stat", "readlink", "test"] {
        assert!(dir.join(needed).is_symlink(), "busybox has no {needed} applet ({n} applets)");
    }
}

/// Returns `cache_root()/name`, building it with `build(tmp)` first if it
/// is not there: `tmp` is a fresh directory renamed to `name` once `build`
/// returns, all under an exclusive lock on `.name.lock`.
fn cached(name: &str, build: impl FnOnce(&Path)) -> PathBuf {
    let root = cache_root();
    let done = root.join(name);
    if done.is_dir() {
        return done;
    }
    fs::create_dir_all(&root).unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
    let lock_path = root.join(format!(".{name}.lock"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", lock_path.display()));
    // Poll rather than block, so a builder that hangs is reported.
    let deadline = Instant::now() + BUILD_DEADLINE;
    let mut pause = Duration::from_millis(10);
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(fs::TryLockError::WouldBlock) => {
                assert!(
                    Instant::now() < deadline,
                    "another process has been building {} for over {BUILD_DEADLINE:?} (holds {})",
                    done.display(),
                    lock_path.display()
                );
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(fs::TryLockError::Error(e)) => panic!("locking {}: {e}", lock_path.display()),
        }
    }
    // Built by whoever held the lock before us?
    if done.is_dir() {
        return done;
    }
    // Leftovers of builds that failed or were killed: no one else can be
    // building this name while we hold the lock.
    let prefix = format!(".{name}.tmp-");
    for e in fs::read_dir(&root).unwrap_or_else(|e| panic!("{}: {e}", root.display())).flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            remove_all(&e.path());
        }
    }
    let tmp = root.join(format!("{prefix}{}", std::process::id()));
    mkdir(&tmp);
    let started = Instant::now();
    eprintln!("flotilla-testkit: building test image {name} in {}", tmp.display());
    build(&tmp);
    fs::rename(&tmp, &done).unwrap_or_else(|e| panic!("renaming {} to {}: {e}", tmp.display(), done.display()));
    eprintln!("flotilla-testkit: built {name} in {:.1} s", started.elapsed().as_secs_f64());
    drop(lock);
    done
}

/// Runs `cmd`; panics naming it with its stderr unless it succeeds.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (is it installed? .ci/run installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstderr: {}\nstdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

fn mkdir(p: &Path) {
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
}

fn write(p: &Path, data: &str) {
    fs::write(p, data).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
}

fn link(target: &str, at: &Path) {
    symlink(target, at).unwrap_or_else(|e| panic!("linking {} -> {target}: {e}", at.display()));
}

fn remove_all(p: &Path) {
    if let Err(e) = fs::remove_dir_all(p)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        panic!("removing {}: {e}", p.display());
    }
}

/// How long a registry may take to answer its first request.
const REGISTRY_START: Duration = Duration::from_secs(20);

/// Debian's `docker-registry` (distribution v2) on 127.0.0.1, anonymous or
/// with basic auth, its storage in a temporary directory; killed and reaped
/// on drop, also when the test fails.
pub struct LoopbackRegistry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// A user of a registry with basic auth: name, password, and the
/// password's bcrypt hash for the htpasswd file (so no `htpasswd` tool is
/// needed).
#[derive(Debug, Clone, Copy)]
pub struct BasicAuth {
    pub user: &'static str,
    pub password: &'static str,
    pub bcrypt: &'static str,
}

impl LoopbackRegistry {
    /// An anonymous registry.
    pub fn start() -> LoopbackRegistry {
        LoopbackRegistry::start_with(None)
    }

    /// A registry that requires `auth` (basic auth over plain HTTP, which
    /// distribution accepts with a warning) when given.
    pub fn start_with(auth: Option<BasicAuth>) -> LoopbackRegistry {
        // A port the kernel just handed out; should another process take
        // it before the registry binds, the registry exits and we retry.
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("flotilla-registry-").tempdir().expect("tempdir");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            let mut config = format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("storage").display()
            );
            if let Some(a) = auth {
                write(&dir.path().join("htpasswd"), &format!("{}:{}\n", a.user, a.bcrypt));
                config += &format!(
                    "auth:\n  htpasswd:\n    realm: flotilla-test\n    path: {}\n",
                    dir.path().join("htpasswd").display()
                );
            }
            write(&dir.path().join("config.yml"), &config);
            let log = File::create(dir.path().join("registry.log")).expect("registry log");
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(dir.path().join("config.yml"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("registry log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting docker-registry: {e} (.ci/run installs it)"));
            // The guard owns the process from here: a panic kills it.
            let mut reg = LoopbackRegistry { child, port, dir };
            if reg.wait_ready() {
                return reg;
            }
            // It exited (the port was taken): the guard reaps it.
        }
        panic!("docker-registry exited at start five times (ports taken?)")
    }

    /// Polls `GET /v2/` until it answers; `false` if the process exited.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + REGISTRY_START;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            // 401: up, and asking for credentials.
            if self.probe().is_some_and(|status| status == "200" || status == "401") {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer within {REGISTRY_START:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// The status code of `GET /v2/`, if it answers.
    fn probe(&self) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n]).split_whitespace().nth(1).map(str::to_string)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the registry logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `skopeo copy oci:LAYOUT:TAG docker://ADDR/REPO_TAG` over plain HTTP.
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str) {
        self.push_as(layout, tag, repo_tag, None);
    }

    /// [`push`](Self::push) with `auth`'s credentials.
    pub fn push_as(&self, layout: &Path, tag: &str, repo_tag: &str, auth: Option<BasicAuth>) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--dest-tls-verify=false"]);
        if let Some(a) = auth {
            cmd.arg("--dest-creds").arg(format!("{}:{}", a.user, a.password));
        }
        run(cmd.arg(format!("oci:{}:{tag}", layout.display())).arg(format!("docker://{}/{repo_tag}", self.addr())));
    }

    /// Where the registry keeps a blob's bytes (to corrupt them in a test).
    pub fn blob(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.dir.path().join("storage/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

impl Drop for LoopbackRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
