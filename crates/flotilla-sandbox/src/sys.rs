//! Every raw syscall Flotilla makes, behind safe functions.
//!
//! This is the only module in the workspace with `unsafe` code. Each block
//! says why it is sound. The two families here:
//!
//! * **Sandbox spawning** ([`spawn_sandbox`]): one `clone3` with new user,
//!   mount, pid, net, uts and ipc namespaces; the child waits on a pipe for
//!   the parent to write its id maps and cgroup, then mounts its root, pivots,
//!   drops every privilege, installs seccomp and `execveat`s the agent. The
//!   child runs in a copy of a multi-threaded process, so between `clone3`
//!   and `execveat` it must not allocate, lock or unwind: it only walks data
//!   prepared before the clone ([`ChildPlan`]) and makes raw syscalls. Errors
//!   travel back to the parent as `(step, errno)` on a close-on-exec pipe;
//!   end-of-file on that pipe means the exec succeeded.
//! * **Process helpers** for the agent and the CLI: `wait4` with rusage,
//!   signals, pidfds, pseudo-terminals, terminal raw mode.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

// ------------------------------------------------------------------ errors

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn cvt_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

// ------------------------------------------------------------------ pipes and fds

/// A close-on-exec pipe: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Duplicates `fd` to a close-on-exec descriptor numbered at least `min`.
pub fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a borrowed (hence open) fd returns a new fd
    // that nothing else owns.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: `new` was just returned by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Takes ownership of a descriptor this process inherited by number
/// (socket activation: the node passes the agent's listener as fd 3).
/// Fails if `fd` is not open. Call once per descriptor, at start-up.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: F_SETFD with plain flags; keeps it from leaking into children.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) })?;
    // SAFETY: the descriptor is open (checked above) and, by this
    // function's contract, owned by nothing else in the process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Clears close-on-exec, so `fd` survives an `execve` of this process (a
/// node handing its listening sockets to the version that replaces it).
pub fn keep_across_exec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a borrowed (hence open) fd only change its
    // descriptor flags.
    unsafe {
        let flags = cvt(libc::fcntl(fd.as_raw_fd(), libc::F_GETFD))?;
        cvt(libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags & !libc::FD_CLOEXEC))?;
    }
    Ok(())
}

/// Sets or clears `O_NONBLOCK`.
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an open fd have no memory effects.
    unsafe {
        let flags = cvt(libc::fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
        let flags = if on { flags | libc::O_NONBLOCK } else { flags & !libc::O_NONBLOCK };
        cvt(libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags))?;
    }
    Ok(())
}

/// A descriptor shared by reference count, so it provably stays open while
/// anything (such as an [`AsyncFd`](tokio::io::unix::AsyncFd)) uses it.
#[derive(Debug, Clone)]
pub struct SharedFd(pub std::sync::Arc<OwnedFd>);

impl AsRawFd for SharedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Registers a shared descriptor with tokio's reactor.
pub fn async_fd(fd: SharedFd, interest: tokio::io::Interest) -> io::Result<tokio::io::unix::AsyncFd<SharedFd>> {
    // SAFETY: `SharedFd` owns the descriptor through an `Arc<OwnedFd>` that
    // the AsyncFd keeps alive, so it stays open and names the same file
    // description until the AsyncFd is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into())
}

// ------------------------------------------------------------------ pidfds and signals

/// Opens a pidfd for `pid` (works for processes that are not our children,
/// which is how a restarted node re-adopts sandboxes).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers and returns a new fd or -1.
    let fd = cvt_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the kernel returned a fresh fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` through a pidfd: race-free even if the pid was reused.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> io::Result<()> {
    // SAFETY: null siginfo is allowed; the fd is open for the call.
    cvt_long(unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, std::ptr::null::<u8>(), 0) })?;
    Ok(())
}

/// Reaps the process behind `pidfd` if it is our child and has exited.
/// Returns `None` while it runs, `Some(None)` if it was not ours to reap.
pub fn pidfd_try_reap(pidfd: BorrowedFd<'_>) -> io::Result<Option<Option<WaitStatus>>> {
    // SAFETY: siginfo_t is plain data; zeroed is a valid initial value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid out-pointer; P_PIDFD with an open pidfd.
    let r = unsafe {
        libc::waitid(libc::P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG)
    };
    if r == -1 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ECHILD) { Ok(Some(None)) } else { Err(e) };
    }
    // SAFETY: waitid filled `info`; si_pid is 0 when nothing had exited.
    let pid = unsafe { info.si_pid() };
    if pid == 0 {
        return Ok(None);
    }
    // SAFETY: for a CLD_* child event si_status is valid.
    let status = unsafe { info.si_status() };
    Ok(Some(Some(match info.si_code {
        libc::CLD_EXITED => WaitStatus::Exited(status),
        _ => WaitStatus::Signaled(status),
    })))
}

/// Whether the process behind a pidfd still exists.
pub fn process_alive_fd(pidfd: &OwnedFd) -> bool {
    pidfd_send_signal(std::os::fd::AsFd::as_fd(pidfd), 0).is_ok()
}

/// Whether a process exists (signal 0).
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Sends `sig` to a process.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain integers; no memory is touched.
    cvt(unsafe { libc::kill(pid, sig) })?;
    Ok(())
}

/// Sends `sig` to every process in group `pgid`.
pub fn kill_group(pgid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain integers; no memory is touched.
    cvt(unsafe { libc::killpg(pgid, sig) })?;
    Ok(())
}

/// Parses `TERM`, `SIGTERM`, `term` or `15`.
pub fn signal_from_str(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "WINCH" => libc::SIGWINCH,
        "ALRM" => libc::SIGALRM,
        _ => return None,
    })
}

// ------------------------------------------------------------------ wait4

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    Exited(i32),
    Signaled(i32),
}

/// What `wait4` reports about a reaped child.
#[derive(Debug, Clone, Copy)]
pub struct Reaped {
    pub pid: i32,
    pub status: WaitStatus,
    pub user_ms: u64,
    pub system_ms: u64,
    pub max_rss_kb: u64,
}

/// Non-blocking `wait4(pid)`; `pid = -1` reaps any child. `Ok(None)` when
/// nothing has exited (or there are no children).
pub fn wait4_nohang(pid: i32) -> io::Result<Option<Reaped>> {
    let mut status = 0;
    // SAFETY: rusage is plain data; zeroed is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointers for status and rusage.
    let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
    if r == -1 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ECHILD) { Ok(None) } else { Err(e) };
    }
    if r == 0 {
        return Ok(None);
    }
    let st = if libc::WIFEXITED(status) {
        WaitStatus::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        WaitStatus::Signaled(libc::WTERMSIG(status))
    } else {
        // Stopped/continued are not requested (no WUNTRACED); treat as exit.
        WaitStatus::Exited(255)
    };
    let ms = |tv: libc::timeval| tv.tv_sec as u64 * 1000 + tv.tv_usec as u64 / 1000;
    Ok(Some(Reaped {
        pid: r,
        status: st,
        user_ms: ms(ru.ru_utime),
        system_ms: ms(ru.ru_stime),
        max_rss_kb: ru.ru_maxrss as u64,
    }))
}

// ------------------------------------------------------------------ commands

/// Makes `cmd` start in a new session (and so a new process group whose id
/// is its pid), so that the whole tree can be signalled with `killpg`. With
/// `ctty`, its stdin (a pty slave) becomes the controlling terminal.
pub fn command_new_session(cmd: &mut Command, ctty: bool) {
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe syscalls (setsid, ioctl); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            if ctty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `fd` appear as descriptor `target` in the command's process (for
/// helpers such as slirp4netns that report readiness on a numbered fd).
pub fn command_pass_fd(cmd: &mut Command, fd: RawFd, target: RawFd) {
    // SAFETY: the closure runs between fork and exec and only calls dup2 or
    // fcntl, which are async-signal-safe; `fd` is kept open by the caller until
    // spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it instead.
            let r = if fd == target { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, target) };
            if r == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

// ------------------------------------------------------------------ ptys and terminals

/// Opens a pseudo-terminal pair `(master, slave)`, both close-on-exec.
pub fn openpty(cols: u16, rows: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let master = cvt(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: freshly opened fd we own.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: grantpt/unlockpt on an open master fd.
    unsafe {
        cvt(libc::grantpt(master.as_raw_fd()))?;
        cvt(libc::unlockpt(master.as_raw_fd()))?;
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `name` is a writable buffer of the length passed.
    let r = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path into `name`.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) };
    // SAFETY: open with a valid C string; returns a new fd or -1.
    let slave = cvt(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: freshly opened fd we own.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    set_window_size(master.as_fd_borrow(), cols, rows)?;
    Ok((master, slave))
}

trait AsFdBorrow {
    fn as_fd_borrow(&self) -> BorrowedFd<'_>;
}
impl AsFdBorrow for OwnedFd {
    fn as_fd_borrow(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

/// Sets a terminal's size (TIOCSWINSZ).
pub fn set_window_size(fd: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// A terminal's size `(cols, rows)` (TIOCGWINSZ), if `fd` is a terminal.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into a valid pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Puts a terminal in raw mode until the guard is dropped.
pub struct RawModeGuard {
    fd: RawFd,
    saved: libc::termios,
}

impl RawModeGuard {
    pub fn enable(fd: BorrowedFd<'_>) -> io::Result<RawModeGuard> {
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out-pointer.
        cvt(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut saved) })?;
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: valid fd and pointer to an initialised termios.
        cvt(unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &raw) })?;
        Ok(RawModeGuard { fd: fd.as_raw_fd(), saved })
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved from the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

// ------------------------------------------------------------------ misc host facts

/// `uname -r`.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates its fields.
    unsafe { CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy().into_owned()
}

/// Effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Changes the owner of a path without following a final symlink.
pub fn lchown(path: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid C string; plain integers.
    cvt(unsafe { libc::lchown(path.as_ptr(), uid, gid) })?;
    Ok(())
}

/// Detaches the mount at `path` (`umount2(MNT_DETACH)`): gone from the
/// tree at once, released when its last user lets go.
pub fn umount_detach(path: &CStr) -> io::Result<()> {
    // SAFETY: valid C string; a plain flag.
    cvt(unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) })?;
    Ok(())
}

/// `LOOP_CTL_GET_FREE` on `/dev/loop-control`.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
/// `LOOP_CONFIGURE` (Linux 5.8): file, flags and all in one ioctl.
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
/// The loop device lets go of its file when its last user (the mount)
/// does: nothing to detach at removal, nothing leaked by a crash.
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Mounts the filesystem image `image` (ext4) at `target` through a free
/// loop device set to clear itself when unmounted: what `mount -o loop`
/// does, without starting `mount(8)` (a few milliseconds of every create
/// with a disk). Fails with `ENOTTY`/`EINVAL` on a kernel without
/// `LOOP_CONFIGURE`, where the caller can still run `mount`.
pub fn loop_mount(image: &Path, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(image)?;
    let control = std::fs::OpenOptions::new().read(true).write(true).open("/dev/loop-control")?;
    // Another process may take the free device between asking and
    // configuring it: ask again.
    for _ in 0..16 {
        // SAFETY: an ioctl without an argument on our open fd.
        let n = cvt(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) })?;
        let dev = format!("/dev/loop{n}");
        let loopdev = match std::fs::OpenOptions::new().read(true).write(true).open(&dev) {
            Ok(f) => f,
            // udev has not made the node yet, or it went: ask again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: all-zero is a valid loop_config.
        let mut config: LoopConfig = unsafe { std::mem::zeroed() };
        config.fd = file.as_raw_fd() as u32;
        config.info.flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: LOOP_CONFIGURE reads the struct we pass, of its size.
        match cvt(unsafe { libc::ioctl(loopdev.as_raw_fd(), LOOP_CONFIGURE as _, &config as *const LoopConfig) }) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
            Err(e) => return Err(e),
        }
        let (source, target) = (cstring(&dev)?, cstring_path(target)?);
        // The image file is sparse, so its inode tables read as zeros
        // already: no background thread zeroing them after the mount.
        let data = c"noinit_itable";
        // SAFETY: valid C strings. The loop device stays open until after
        // the mount holds it (autoclear acts on the last close).
        let mounted = cvt(unsafe {
            libc::mount(source.as_ptr(), target.as_ptr(), c"ext4".as_ptr(), flags, data.as_ptr().cast())
        });
        drop(loopdev);
        return mounted.map(|_| ());
    }
    Err(io::Error::other("no free loop device after 16 tries"))
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
}

fn cstring_path(p: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
}

// ================================================================== sandbox spawning

/// One filesystem action the child performs before pivoting, in order.
#[derive(Debug)]
pub enum ChildOp {
    /// `mount(source, target, fstype, flags, data)`.
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// `mkdir(path, mode)`; an existing directory is fine.
    Mkdir { path: CString, mode: libc::mode_t },
    /// `symlink(target, path)`; an existing entry is fine.
    Symlink { target: CString, path: CString },
    /// Creates an empty file to bind a device node onto.
    Touch { path: CString },
    /// Writes `data` to an existing file (a sysctl of the new namespaces).
    Write { path: CString, data: CString },
    /// Bind-mounts an existing file/dir, then remounts it read-only if
    /// asked (a bind can't be made read-only in one call).
    Bind { source: CString, target: CString, readonly: bool, recursive: bool },
    /// Attaches the detached mount the parent sent with the release
    /// ([`PendingChild::release_with`], e.g. an [`idmapped_tree`]) at
    /// `target`; when none came, binds `fallback` there instead (or fails
    /// without one).
    AttachMount { target: CString, fallback: Option<CString> },
}

/// Everything the child needs, prepared before `clone3` so that the child
/// allocates nothing.
#[derive(Debug)]
pub struct ChildPlan {
    /// Where the new root is assembled (an empty directory on the host).
    pub root: CString,
    /// Filesystem actions in order; `root` itself is mounted by the first.
    pub ops: Vec<ChildOp>,
    /// Make `/` read-only after pivoting (host image roots).
    pub readonly_root: bool,
    /// Working directory after pivoting.
    pub cwd: CString,
    pub hostname: CString,
    /// The agent executable, opened on the host (exec'd by fd).
    pub exe: OwnedFd,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// fd 0, 1, 2 and 3, 4 of the agent: stdin, stdout, stderr, the
    /// listening socket, the readiness pipe.
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub listener: OwnedFd,
    pub ready: OwnedFd,
    /// Seccomp programs, installed in order (see `seccomp`).
    pub seccomp: Vec<Vec<libc::sock_filter>>,
}

/// The setup step a child failed at, reported over the error pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ChildStep {
    WaitParent = 1,
    SetIds,
    Unshare,
    MakePrivate,
    Op,
    Pivot,
    ReadonlyRoot,
    Chdir,
    Hostname,
    Loopback,
    NoNewPrivs,
    DropCaps,
    Fds,
    Seccomp,
    Exec,
}

impl ChildStep {
    const ALL: [ChildStep; 15] = [
        ChildStep::WaitParent,
        ChildStep::SetIds,
        ChildStep::Unshare,
        ChildStep::MakePrivate,
        ChildStep::Op,
        ChildStep::Pivot,
        ChildStep::ReadonlyRoot,
        ChildStep::Chdir,
        ChildStep::Hostname,
        ChildStep::Loopback,
        ChildStep::NoNewPrivs,
        ChildStep::DropCaps,
        ChildStep::Fds,
        ChildStep::Seccomp,
        ChildStep::Exec,
    ];

    fn from_u32(v: u32) -> Option<ChildStep> {
        Self::ALL.into_iter().find(|s| *s as u32 == v)
    }

    pub fn describe(self) -> &'static str {
        match self {
            ChildStep::WaitParent => "wait for the node",
            ChildStep::SetIds => "become root of the user namespace",
            ChildStep::Unshare => "unshare the cgroup namespace",
            ChildStep::MakePrivate => "make mounts private",
            ChildStep::Op => "set up the root filesystem",
            ChildStep::Pivot => "pivot_root into the sandbox root",
            ChildStep::ReadonlyRoot => "make the root read-only",
            ChildStep::Chdir => "enter the working directory",
            ChildStep::Hostname => "set the hostname",
            ChildStep::Loopback => "bring up loopback",
            ChildStep::NoNewPrivs => "set no_new_privs",
            ChildStep::DropCaps => "limit capabilities",
            ChildStep::Fds => "arrange file descriptors",
            ChildStep::Seccomp => "install the seccomp filter",
            ChildStep::Exec => "exec the agent",
        }
    }
}

/// Why a sandbox child failed to start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("clone3 with new namespaces failed")]
    Clone(#[source] io::Error),
    #[error("sandbox setup failed at step `{}` (operation {op})", step.describe())]
    Child {
        step: ChildStep,
        op: u32,
        #[source]
        source: io::Error,
    },
    #[error("writing the id maps of pid {pid} failed")]
    IdMap {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("talking to the sandbox child failed")]
    Pipe(#[source] io::Error),
}

/// A cloned child that waits for [`PendingChild::release`].
#[derive(Debug)]
pub struct PendingChild {
    pub pid: i32,
    pub pidfd: OwnedFd,
    sync_w: Option<OwnedFd>,
    err_r: OwnedFd,
}

impl PendingChild {
    /// Maps uid and gid 0..count of the child's user namespace to
    /// `base..base+count` on the host.
    pub fn write_id_maps(&self, base: u32, count: u32) -> Result<(), SpawnError> {
        let line = format!("0 {base} {count}\n");
        for file in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{}/{file}", self.pid), &line)
                .map_err(|source| SpawnError::IdMap { pid: self.pid, source })?;
        }
        Ok(())
    }

    /// Lets the child go on and blocks until it has exec'd the agent (or
    /// failed, in which case the error names its step). On error the child
    /// is killed and reaped.
    pub fn release(self) -> Result<(i32, OwnedFd), SpawnError> {
        self.release_with(None)
    }

    /// [`release`](Self::release), handing the child a detached mount for
    /// its [`ChildOp::AttachMount`].
    pub fn release_with(mut self, mount: Option<OwnedFd>) -> Result<(i32, OwnedFd), SpawnError> {
        let sync = self.sync_w.take().expect("released once");
        let r = send_byte_with_fd(sync.as_fd(), mount.as_ref().map(|m| m.as_fd()));
        drop(sync);
        drop(mount);
        if let Err(e) = r {
            self.abort();
            return Err(SpawnError::Pipe(e));
        }
        let mut buf = [0u8; 12];
        let n = match read_full(self.err_r.as_raw_fd(), &mut buf) {
            Ok(n) => n,
            Err(e) => {
                self.abort();
                return Err(SpawnError::Pipe(e));
            }
        };
        if n == 0 {
            return Ok((self.pid, self.pidfd));
        }
        let step = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes"));
        let op = u32::from_ne_bytes(buf[4..8].try_into().expect("4 bytes"));
        let errno = i32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes"));
        self.abort();
        Err(SpawnError::Child {
            step: ChildStep::from_u32(step).unwrap_or(ChildStep::Exec),
            op,
            source: io::Error::from_raw_os_error(errno),
        })
    }

    /// Kills and reaps the child.
    pub fn abort(&self) {
        let _ = pidfd_send_signal(std::os::fd::AsFd::as_fd(&self.pidfd), libc::SIGKILL);
        // SAFETY: waitpid on our own child with a valid status pointer.
        unsafe {
            let mut st = 0;
            libc::waitpid(self.pid, &mut st, 0);
        }
    }
}

/// A close-on-exec Unix stream socket pair.
fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a valid two-element array for socketpair to fill.
    cvt(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) })?;
    // SAFETY: socketpair succeeded, so both descriptors are open and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Room for one fd in a control message (`CMSG_SPACE(sizeof(int))` is 24
/// on 64-bit Linux; 64 leaves margin), 8-aligned as cmsghdr needs.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Sends one byte on a Unix socket, with `fd` attached when given.
fn send_byte_with_fd(sock: BorrowedFd<'_>, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut byte = [1u8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut cmsg = CmsgBuf([0; 64]);
    // SAFETY: an all-zero msghdr is valid (no name, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic; the buffer is
        // large and aligned enough for one header and one int, so
        // CMSG_FIRSTHDR is non-null and CMSG_DATA points inside it.
        unsafe {
            let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            msg.msg_control = cmsg.0.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let hdr = libc::CMSG_FIRSTHDR(&msg);
            (*hdr).cmsg_level = libc::SOL_SOCKET;
            (*hdr).cmsg_type = libc::SCM_RIGHTS;
            (*hdr).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(hdr).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: msg points at live buffers built above.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n == 1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if n < 0 && e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(e);
    }
}

// ================================================================== idmapped mounts

/// `mount_setattr`'s argument (`struct mount_attr`, first version).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// A detached, read-only copy of the mount at `path` whose owners are seen
/// through the id mapping of process `pid`'s user namespace: a file owned
/// by uid `k` on disk appears owned by whatever host uid that namespace
/// maps `k` to. A sandbox's namespace maps `0..65536` to its own range, so
/// inside it the image's root owns what the image's root owns, and files
/// it writes (copied up by the overlay) land in its range, never as host
/// root. Attach it with [`ChildOp::AttachMount`]. Needs a kernel with
/// idmapped mounts (5.12+) and a filesystem that supports them (ext4, xfs,
/// btrfs, tmpfs since 6.3).
///
/// Where the id mapping cannot be had, the same detached tree without it
/// (read-only, nosuid, nodev), and the reason in the second half: the
/// child still attaches a tree the node opened, so it never needs to reach
/// the image's path itself (the image store is the node's alone, 0700).
pub fn image_tree(path: &CStr, pid: i32) -> io::Result<(OwnedFd, Option<io::Error>)> {
    match idmapped_tree(path, pid) {
        Ok(tree) => Ok((tree, None)),
        Err(why) => {
            let tree = open_tree_clone(path)?;
            set_tree_attr(&tree, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, None)?;
            Ok((tree, Some(why)))
        }
    }
}

/// A detached copy of the mount at `path` (`open_tree(OPEN_TREE_CLONE)`).
fn open_tree_clone(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: open_tree with a valid C string; the result is a new fd.
    let tree = cvt_long(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            (OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint) as libc::c_ulong,
        )
    })?;
    // SAFETY: open_tree succeeded: the fd is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(tree as RawFd) })
}

/// `mount_setattr` on a detached tree: `set`, and the id mapping of
/// `userns` when given.
fn set_tree_attr(tree: &OwnedFd, set: u64, userns: Option<&std::fs::File>) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: set | if userns.is_some() { MOUNT_ATTR_IDMAP } else { 0 },
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map(|f| f.as_raw_fd() as u64).unwrap_or(0),
    };
    // SAFETY: mount_setattr on our detached tree with a valid attr struct
    // of the size we pass.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(())
}

/// [`image_tree`] with the id mapping or nothing.
pub fn idmapped_tree(path: &CStr, pid: i32) -> io::Result<OwnedFd> {
    let tree = open_tree_clone(path)?;
    let userns = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
    set_tree_attr(&tree, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, Some(&userns))?;
    Ok(tree)
}

fn read_full(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: buf[got..] is a valid writable slice.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    Ok(got)
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Namespaces every sandbox gets.
const NS_FLAGS: u64 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC) as u64;

/// Clones a child into new namespaces. The child blocks until
/// [`PendingChild::release`], then carries out `plan` and execs the agent.
pub fn spawn_sandbox(plan: &ChildPlan) -> Result<PendingChild, SpawnError> {
    // A socket, not a pipe: the release may carry a mount's fd.
    let (sync_r, sync_w) = socketpair().map_err(SpawnError::Pipe)?;
    let (err_r, err_w) = pipe().map_err(SpawnError::Pipe)?;
    // Null-terminated pointer arrays, built before the clone.
    let argv: Vec<*const libc::c_char> =
        plan.argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let envp: Vec<*const libc::c_char> =
        plan.envp.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let progs: Vec<libc::sock_fprog> = plan
        .seccomp
        .iter()
        .map(|p| libc::sock_fprog { len: p.len() as u16, filter: p.as_ptr() as *mut libc::sock_filter })
        .collect();

    let mut pidfd: RawFd = -1;
    let sync_w_fd = sync_w.as_raw_fd();
    let args = CloneArgs {
        flags: NS_FLAGS | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM behaves like fork: the child gets a
    // copy of the address space and continues here with return value 0. The
    // child then runs only `child_main`, which makes raw syscalls on data
    // prepared above and never returns (it execs or _exits).
    let ret = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if ret == -1 {
        return Err(SpawnError::Clone(io::Error::last_os_error()));
    }
    if ret == 0 {
        // SAFETY: we are the child; see `child_main`'s contract.
        unsafe { child_main(plan, sync_r.as_raw_fd(), sync_w_fd, err_w.as_raw_fd(), &argv, &envp, &progs) }
    }
    drop(sync_r);
    drop(err_w);
    // SAFETY: CLONE_PIDFD stored a new fd that we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(PendingChild { pid: ret as i32, pidfd, sync_w: Some(sync_w), err_r })
}

/// Reports `(step, op, errno)` and exits. Async-signal-safe.
fn child_fail(err_fd: RawFd, step: ChildStep, op: u32) -> ! {
    // SAFETY: errno location is thread-local and valid.
    let errno = unsafe { *libc::__errno_location() };
    let mut buf = [0u8; 12];
    buf[0..4].copy_from_slice(&(step as u32).to_ne_bytes());
    buf[4..8].copy_from_slice(&op.to_ne_bytes());
    buf[8..12].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: writing a stack buffer to a pipe, then exiting without
    // running any destructors or atexit handlers.
    unsafe {
        libc::write(err_fd, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// The child side of [`spawn_sandbox`].
///
/// # Safety
/// Must only be called in the child of `clone3`, before exec. It relies on
/// every pointer in its arguments staying valid, which holds because the
/// child owns a copy of the parent's memory and nothing frees it.
unsafe fn child_main(
    plan: &ChildPlan,
    sync_fd: RawFd,
    sync_w_fd: RawFd,
    err_fd: RawFd,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    progs: &[libc::sock_fprog],
) -> ! {
    // SAFETY: the whole body makes only raw syscalls on pointers into
    // `plan`, `argv`, `envp` and `progs`, which live for the child's whole
    // life (it owns a copy of the parent's memory and never frees it).
    unsafe {
        let fail = |step: ChildStep, op: u32| -> ! { child_fail(err_fd, step, op) };

        // 0. Never outlive a node that dies before releasing us: drop our
        //    copy of the release pipe's write end (else the read below would
        //    never see EOF when the node dies), and die with the parent
        //    until we exec (covering a sibling child that holds a copy).
        //    `getppid` is 0 in our new pid namespace, so a parent that died
        //    before the prctl shows as EOF on the pipe instead.
        libc::close(sync_w_fd);
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            libc::_exit(127);
        }

        // 1. Wait until the parent has written our id maps and cgroup; the
        //    release may carry a mount for `AttachMount`.
        let mut b = [0u8; 1];
        let mut iov = libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: 1 };
        let mut cmsg = CmsgBuf([0; 64]);
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = cmsg.0.len();
        loop {
            let n = libc::recvmsg(sync_fd, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n == 1 {
                break;
            }
            if n == -1 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            fail(ChildStep::WaitParent, 0);
        }
        let mut mount_fd: RawFd = -1;
        let hdr = libc::CMSG_FIRSTHDR(&msg);
        if !hdr.is_null() && (*hdr).cmsg_level == libc::SOL_SOCKET && (*hdr).cmsg_type == libc::SCM_RIGHTS {
            mount_fd = std::ptr::read_unaligned(libc::CMSG_DATA(hdr).cast::<RawFd>());
        }

        // 2. Become root of the namespace; shed the host's supplementary
        //    groups so host group permissions never apply inside.
        //    Raw syscalls, not glibc's wrappers: those broadcast the change
        //    to every thread glibc believes exists, taking a lock another
        //    parent thread may have held at clone time (creating a thread
        //    does), and the child then waits on that futex forever. We
        //    cloned with a raw clone3, so glibc never learnt that the child
        //    has one thread.
        let (gid0, uid0): (libc::c_long, libc::c_long) = (0, 0);
        if libc::syscall(libc::SYS_setresgid, gid0, gid0, gid0) != 0
            || libc::syscall(libc::SYS_setgroups, 0 as libc::c_long, std::ptr::null::<libc::gid_t>()) != 0
            || libc::syscall(libc::SYS_setresuid, uid0, uid0, uid0) != 0
        {
            fail(ChildStep::SetIds, 0);
        }
        // 3. A cgroup namespace rooted at the cgroup the parent put us in.
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            fail(ChildStep::Unshare, 0);
        }
        // 4. Nothing we mount may propagate back to the host.
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(ChildStep::MakePrivate, 0);
        }
        // 5. Assemble the root.
        for (i, op) in plan.ops.iter().enumerate() {
            let i = i as u32;
            match op {
                ChildOp::Mount { source, target, fstype, flags, data } => {
                    let p = |o: &Option<CString>| o.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
                    if libc::mount(p(source), target.as_ptr(), p(fstype), *flags, p(data).cast()) != 0 {
                        fail(ChildStep::Op, i);
                    }
                }
                ChildOp::Mkdir { path, mode } => {
                    if libc::mkdir(path.as_ptr(), *mode) != 0 && *libc::__errno_location() != libc::EEXIST {
                        fail(ChildStep::Op, i);
                    }
                }
                ChildOp::Symlink { target, path } => {
                    if libc::symlink(target.as_ptr(), path.as_ptr()) != 0 && *libc::__errno_location() != libc::EEXIST {
                        fail(ChildStep::Op, i);
                    }
                }
                ChildOp::AttachMount { target, fallback } => {
                    if mount_fd < 0 {
                        let Some(source) = fallback else {
                            *libc::__errno_location() = libc::EBADF;
                            fail(ChildStep::Op, i);
                        };
                        let flags = libc::MS_BIND | libc::MS_REC;
                        if libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), flags, std::ptr::null()) != 0
                        {
                            fail(ChildStep::Op, i);
                        }
                        continue;
                    }
                    if libc::syscall(
                        libc::SYS_move_mount,
                        mount_fd,
                        c"".as_ptr(),
                        libc::AT_FDCWD,
                        target.as_ptr(),
                        MOVE_MOUNT_F_EMPTY_PATH,
                    ) != 0
                    {
                        fail(ChildStep::Op, i);
                    }
                    libc::close(mount_fd);
                    mount_fd = -1;
                }
                ChildOp::Write { path, data } => {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    let len = data.as_bytes().len();
                    if fd < 0 || libc::write(fd, data.as_ptr().cast(), len) != len as isize {
                        fail(ChildStep::Op, i);
                    }
                    libc::close(fd);
                }
                ChildOp::Touch { path } => {
                    let fd = libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o666);
                    if fd < 0 {
                        fail(ChildStep::Op, i);
                    }
                    libc::close(fd);
                }
                ChildOp::Bind { source, target, readonly, recursive } => {
                    let rec = if *recursive { libc::MS_REC } else { 0 };
                    if libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | rec,
                        std::ptr::null(),
                    ) != 0
                    {
                        fail(ChildStep::Op, i);
                    }
                    if *readonly {
                        // Keep the flags the kernel locks on binds made in
                        // a user namespace (nosuid/nodev/noexec of the
                        // source), or the remount is refused.
                        let mut sfs: libc::statvfs = std::mem::zeroed();
                        if libc::statvfs(target.as_ptr(), &mut sfs) != 0 {
                            fail(ChildStep::Op, i);
                        }
                        let keep = sfs.f_flag
                            & (libc::ST_NOSUID
                                | libc::ST_NODEV
                                | libc::ST_NOEXEC
                                | libc::ST_NOATIME
                                | libc::ST_NODIRATIME
                                | libc::ST_RELATIME);
                        let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID;
                        if keep & libc::ST_NODEV != 0 {
                            flags |= libc::MS_NODEV;
                        }
                        if keep & libc::ST_NOEXEC != 0 {
                            flags |= libc::MS_NOEXEC;
                        }
                        if keep & libc::ST_NOATIME != 0 {
                            flags |= libc::MS_NOATIME;
                        }
                        if keep & libc::ST_NODIRATIME != 0 {
                            flags |= libc::MS_NODIRATIME;
                        }
                        if keep & libc::ST_RELATIME != 0 {
                            flags |= libc::MS_RELATIME;
                        }
                        if libc::mount(std::ptr::null(), target.as_ptr(), std::ptr::null(), flags, std::ptr::null())
                            != 0
                        {
                            fail(ChildStep::Op, i);
                        }
                    }
                }
            }
        }
        // 6. Pivot into the new root and let go of the host's tree.
        if libc::chdir(plan.root.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
            || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
            || libc::chdir(c"/".as_ptr()) != 0
        {
            fail(ChildStep::Pivot, 0);
        }
        if plan.readonly_root
            && libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                std::ptr::null(),
            ) != 0
        {
            fail(ChildStep::ReadonlyRoot, 0);
        }
        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            fail(ChildStep::Chdir, 0);
        }
        let hn = plan.hostname.as_bytes();
        if libc::sethostname(hn.as_ptr().cast(), hn.len()) != 0 {
            fail(ChildStep::Hostname, 0);
        }
        // 7. Loopback up (the net namespace starts with it down).
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            fail(ChildStep::Loopback, 0);
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        if libc::ioctl(sock, libc::SIOCGIFFLAGS as _, &mut ifr) != 0 {
            fail(ChildStep::Loopback, 1);
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock, libc::SIOCSIFFLAGS as _, &ifr) != 0 {
            fail(ChildStep::Loopback, 2);
        }
        libc::close(sock);

        // 8. No new privileges, ever; capabilities cut to the sandbox's set.
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(ChildStep::NoNewPrivs, 0);
        }
        limit_capabilities().unwrap_or_else(|op| fail(ChildStep::DropCaps, op));

        // 9. fds: 0 stdin, 1+2 log, 3 listener, 4 ready; everything else
        //    closes at exec (the error pipe included, which tells the
        //    parent the exec happened).
        let fds = [
            (plan.stdin.as_raw_fd(), 0),
            (plan.stdout.as_raw_fd(), 1),
            (plan.stdout.as_raw_fd(), 2),
            (plan.listener.as_raw_fd(), 3),
            (plan.ready.as_raw_fd(), 4),
        ];
        for (i, (from, to)) in fds.into_iter().enumerate() {
            if libc::dup2(from, to) != to {
                fail(ChildStep::Fds, i as u32);
            }
        }
        if libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) != 0 {
            fail(ChildStep::Fds, 9);
        }

        // The sandbox outlives the node from here on (a crashed node
        // re-adopts it): no more death signal.
        if libc::prctl(libc::PR_SET_PDEATHSIG, 0 as libc::c_ulong, 0, 0, 0) != 0 {
            fail(ChildStep::Fds, 10);
        }

        // 10. Seccomp last: from here on only execveat is needed.
        for (i, prog) in progs.iter().enumerate() {
            if libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, prog as *const libc::sock_fprog) != 0
            {
                fail(ChildStep::Seccomp, i as u32);
            }
        }
        libc::syscall(
            libc::SYS_execveat,
            plan.exe.as_raw_fd(),
            c"".as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
        fail(ChildStep::Exec, 0)
    }
}

/// Capabilities a sandbox's root keeps, all of them scoped to its own user
/// namespace: Docker's default set without `MKNOD` and `AUDIT_WRITE`
/// (useless there) and `NET_RAW` (raw and packet sockets, a surface rich
/// in kernel bugs; `ping` uses ICMP echo sockets instead, which the
/// sandbox's `net.ipv4.ping_group_range` opens to all its groups). They only act on what that namespace owns (the image's
/// files seen through the idmapped lower layer, the copy-up layer, the
/// workspace, its own processes and network namespace), never on host files
/// (their owners are not mapped) or read-only mounts. Without them root
/// cannot `chown` to another user or write where another user owns, so
/// `dpkg` and `apt-get install` of real packages, `useradd` and `su` fail.
/// `CAP_SYS_ADMIN` is not among them, and seccomp refuses mount and new
/// namespaces regardless.
pub const SANDBOX_CAPS: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    18, // CAP_SYS_CHROOT
    31, // CAP_SETFCAP
];

/// [`SANDBOX_CAPS`] as a capability bit mask (as `/proc/PID/status` shows).
pub fn sandbox_cap_mask() -> u64 {
    SANDBOX_CAPS.iter().fold(0, |m, c| m | (1u64 << c))
}

/// Limits every capability set to [`SANDBOX_CAPS`]: the bounding set
/// loses the rest for good, and the kept ones are raised as ambient so
/// they survive `exec` for processes that stay root. Root does not regain
/// anything through exec (`SECBIT_NOROOT`, locked), and a process that
/// switches to another uid loses them all (the kernel's setuid fixup stays
/// on, and keep-caps is locked off). Returns the failing sub-step on
/// error. Async-signal-safe.
fn limit_capabilities() -> Result<(), u32> {
    let keep = sandbox_cap_mask();
    // SAFETY: prctl/capset with plain integers and stack structs.
    unsafe {
        // SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_KEEP_CAPS_LOCKED.
        let bits = 0x23;
        if libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) != 0 {
            return Err(1);
        }
        let mut cap: u32 = 0;
        while libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) >= 0 {
            if keep & (1u64 << cap.min(63)) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
            {
                return Err(2);
            }
            cap += 1;
        }
        if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 {
            return Err(3);
        }
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let hdr = Header { version: 0x2008_0522, pid: 0 }; // _LINUX_CAPABILITY_VERSION_3
        let word = |w: u32| {
            let m = (keep >> (32 * w)) as u32;
            Data { effective: m, permitted: m, inheritable: m }
        };
        let data = [word(0), word(1)];
        if libc::syscall(libc::SYS_capset, &hdr as *const Header, data.as_ptr()) != 0 {
            return Err(4);
        }
        for &c in SANDBOX_CAPS {
            if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, c as libc::c_ulong, 0, 0) != 0 {
                return Err(5);
            }
        }
    }
    Ok(())
}

/// The pid's start time in clock ticks since boot (field 22 of
/// `/proc/PID/stat`): with the pid, it names a process uniquely, so a
/// restarted node can tell its sandbox from a stranger that reused the pid.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// The real uid of a process (`Uid:` in `/proc/PID/status`).
pub fn process_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(signal_from_str("TERM"), Some(libc::SIGTERM));
        assert_eq!(signal_from_str("sigkill"), Some(libc::SIGKILL));
        assert_eq!(signal_from_str("2"), Some(2));
        assert_eq!(signal_from_str("NOPE"), None);
        assert_eq!(signal_from_str("0"), None);
    }

    #[test]
    fn start_time_of_self_is_stable() {
        let me = std::process::id() as i32;
        let a = process_start_time(me).unwrap();
        assert_eq!(process_start_time(me), Some(a));
        assert_eq!(process_start_time(i32::MAX), None);
    }

    #[test]
    fn ptys_open_and_resize() {
        let (m, s) = openpty(100, 40).unwrap();
        assert_eq!(window_size(std::os::fd::AsFd::as_fd(&s)), Some((100, 40)));
        assert!(is_terminal(std::os::fd::AsFd::as_fd(&m)));
    }
}
