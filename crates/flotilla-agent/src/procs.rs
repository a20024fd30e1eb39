//! Processes the agent runs: spawning, reaping, output pumping, and the
//! registry of detached processes.
//!
//! **Reaping.** As a sandbox's init the agent inherits every orphan, so it
//! reaps with `wait4(-1)` on each `SIGCHLD` and hands statuses of processes
//! it started to their waiters. A process is registered under the reaper's
//! lock *while* it is spawned, so its exit can never be reaped before its
//! waiter exists. Outside a sandbox (tests, `flotilla agent` by hand) the
//! agent reaps only its own pids, leaving other children of the host
//! process alone.
//!
//! **Output.** Each process's stdout and stderr are read in 64 KiB chunks
//! and turned into frames in the order they were read. An attached exec
//! sends them through a bounded channel, so a slow client slows the process
//! (pipe backpressure) instead of growing memory. A detached process writes
//! them into a ring of [`PROCESS_RING_BYTES`]; clients re-attach from a byte
//! offset (counting stdout and stderr bytes, so any byte can be resumed
//! from), and the exit frame is stored last. A process started with `hold`
//! never loses a byte: the ring keeps what its reader has not acknowledged,
//! and once that fills the ring the pump stops reading its pipes, so the
//! process blocks in `write` until the reader catches up (back-pressure).

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use flotilla_api::limits::{HEARTBEAT_INTERVAL, PROCESS_RING_BYTES};
use flotilla_api::{ApiError, ExecRequest, ExitStatus, Frame, FrameKind, ProcessInfo, ProcessState, Timestamp};
use flotilla_sandbox::sys;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};

/// After a process exits, how long to keep draining pipes that a
/// background child still holds open before giving up on them.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// How many exited detached processes are remembered.
const KEEP_EXITED: usize = 64;

/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 64 * 1024;

/// Delivers exit statuses to the tasks waiting for them.
#[derive(Debug)]
pub struct Reaper {
    init: bool,
    waiters: Mutex<HashMap<i32, oneshot::Sender<sys::Reaped>>>,
}

impl Reaper {
    /// Starts the reaper task. With `init`, orphans are reaped too.
    pub fn start(init: bool) -> Arc<Reaper> {
        let r = Arc::new(Reaper { init, waiters: Mutex::new(HashMap::new()) });
        let me = r.clone();
        tokio::spawn(async move {
            let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
            loop {
                me.reap_now();
                // Signals coalesce, and one may land between the wait and
                // the next listen: the periodic tick covers that gap.
                match &mut sig {
                    Some(s) => {
                        let _ = tokio::time::timeout(Duration::from_millis(500), s.recv()).await;
                    }
                    None => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        r
    }

    fn reap_now(&self) {
        let mut waiters = self.waiters.lock().expect("reaper lock");
        if self.init {
            while let Ok(Some(r)) = sys::wait4_nohang(-1) {
                if let Some(tx) = waiters.remove(&r.pid) {
                    let _ = tx.send(r);
                }
            }
        } else {
            let pids: Vec<i32> = waiters.keys().copied().collect();
            for pid in pids {
                if let Ok(Some(r)) = sys::wait4_nohang(pid)
                    && let Some(tx) = waiters.remove(&pid)
                {
                    let _ = tx.send(r);
                }
            }
        }
    }

    /// Spawns `cmd` and registers its pid atomically with respect to
    /// reaping. Returns the child and a receiver for its exit.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(std::process::Child, oneshot::Receiver<sys::Reaped>)> {
        let mut waiters = self.waiters.lock().expect("reaper lock");
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }
}

/// A spawned process with its pipes.
pub struct Spawned {
    pub pid: i32,
    pub started: Instant,
    pub started_at: Timestamp,
    pub stdin: Option<tokio::net::unix::pipe::Sender>,
    pub stdout: tokio::net::unix::pipe::Receiver,
    pub stderr: tokio::net::unix::pipe::Receiver,
    pub exit: oneshot::Receiver<sys::Reaped>,
}

/// Starts `req.argv` in its own session (so its whole tree can be killed),
/// with piped stdio.
pub fn spawn(reaper: &Reaper, req: &ExecRequest, default_cwd: &str, keep_stdin: bool) -> Result<Spawned, ApiError> {
    let Some(prog) = req.argv.first() else {
        return Err(ApiError::invalid("argv is empty"));
    };
    let cwd = req.cwd.as_deref().unwrap_or(default_cwd);
    check_cwd(cwd)?;
    let mut cmd = Command::new(prog);
    cmd.args(&req.argv[1..])
        .envs(&req.env)
        .current_dir(cwd)
        .stdin(if req.stdin.is_some() || keep_stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    sys::command_new_session(&mut cmd, false);
    let (mut child, exit) = reaper.spawn(&mut cmd).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            flotilla_api::ErrorCode::NotFound
        } else {
            flotilla_api::ErrorCode::InvalidArgument
        };
        ApiError::new(code, format!("cannot start {prog:?} in {cwd}: {e}"))
    })?;
    let pid = child.id() as i32;
    let pipe_err = |e: std::io::Error| ApiError::internal(format!("wiring pipes of pid {pid}: {e}"));
    let stdout = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(child.stdout.take().expect("piped")))
        .map_err(pipe_err)?;
    let stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(child.stderr.take().expect("piped")))
        .map_err(pipe_err)?;
    let stdin = match child.stdin.take() {
        Some(s) => Some(tokio::net::unix::pipe::Sender::from_owned_fd(OwnedFd::from(s)).map_err(pipe_err)?),
        None => None,
    };
    Ok(Spawned { pid, started: Instant::now(), started_at: Timestamp::now(), stdin, stdout, stderr, exit })
}

/// Refuses a working directory that is missing or not a directory, so the
/// error names it: `spawn` would report the `chdir` failure as the
/// program's (`cannot start "ls" … No such file or directory`).
fn check_cwd(cwd: &str) -> Result<(), ApiError> {
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(ApiError::invalid(format!("working directory {cwd:?} is not a directory"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ApiError::not_found(format!("working directory {cwd:?} does not exist")))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Err(ApiError::not_found(format!(
            "working directory {cwd:?} does not exist (a part of it is not a directory)"
        ))),
        Err(e) => Err(ApiError::invalid(format!("working directory {cwd:?}: {e}"))),
    }
}

fn exit_status(r: &sys::Reaped, started: Instant, timed_out: bool) -> ExitStatus {
    let (code, signal) = match r.status {
        sys::WaitStatus::Exited(c) => (Some(c), None),
        sys::WaitStatus::Signaled(s) => (None, Some(s)),
    };
    ExitStatus {
        code,
        signal,
        timed_out,
        duration_ms: started.elapsed().as_millis() as u64,
        rusage: flotilla_api::frame::Rusage { user_ms: r.user_ms, system_ms: r.system_ms, max_rss_kb: r.max_rss_kb },
    }
}

/// Where pumped frames go.
pub trait FrameSink: Send + 'static {
    /// Delivers a frame; `false` means the receiver is gone.
    fn send(&mut self, frame: Frame) -> impl std::future::Future<Output = bool> + Send;
    /// Resolves when the receiver is gone (never, for sinks that can't go).
    fn closed(&self) -> impl std::future::Future<Output = ()> + Send;
    /// Whether the sink takes more output now; while it does not, the pump
    /// leaves the pipes unread (the process blocks once they fill).
    fn has_room(&self) -> bool {
        true
    }
    /// Resolves once the sink has room again.
    fn room(&self) -> impl std::future::Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// Attached exec: a bounded channel to the HTTP response.
pub struct ChannelSink(pub mpsc::Sender<Bytes>);

impl FrameSink for ChannelSink {
    async fn send(&mut self, frame: Frame) -> bool {
        self.0.send(frame.to_bytes()).await.is_ok()
    }
    async fn closed(&self) {
        self.0.closed().await
    }
}

/// Pumps a process's output into `sink` until it exits, then sends the
/// exit frame. Kills the process group on timeout, or when the sink's
/// receiver goes away if `kill_on_close`.
pub async fn pump(
    mut sp: Spawned,
    timeout: Option<Duration>,
    mut sink: impl FrameSink,
    kill_on_close: bool,
) -> ExitStatus {
    let pid = sp.pid;
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let (mut out_open, mut err_open) = (true, true);
    let mut out_buf = vec![0u8; READ_CHUNK];
    let mut err_buf = vec![0u8; READ_CHUNK];
    let mut exit: Option<sys::Reaped> = None;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut timed_out = false;
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeat.tick().await;
    let mut client_gone = false;
    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
    loop {
        if exit.is_some() && !out_open && !err_open {
            break;
        }
        // A full sink stops the reads, and the drain's clock with them:
        // what waits in the pipes after an exit is still read, once the
        // reader makes room.
        let room = sink.has_room();
        if let Some(d) = drain_until
            && room
            && tokio::time::Instant::now() >= d
        {
            break;
        }
        let sleep_until = match (drain_until, room) {
            (Some(d), true) => d,
            (Some(_), false) => far(),
            (None, _) => deadline.unwrap_or_else(far),
        };
        tokio::select! {
            () = sink.room(), if !room => {
                if drain_until.is_some() {
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
                }
            },
            r = sp.stdout.read(&mut out_buf), if out_open && room => match r {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => {
                    heartbeat.reset();
                    if !sink.send(Frame::new(FrameKind::Stdout, Bytes::copy_from_slice(&out_buf[..n]))).await {
                        client_gone = true;
                    }
                }
            },
            r = sp.stderr.read(&mut err_buf), if err_open && room => match r {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => {
                    heartbeat.reset();
                    if !sink.send(Frame::new(FrameKind::Stderr, Bytes::copy_from_slice(&err_buf[..n]))).await {
                        client_gone = true;
                    }
                }
            },
            r = &mut sp.exit, if exit.is_none() => {
                exit = Some(r.unwrap_or(sys::Reaped { pid, status: sys::WaitStatus::Exited(255), user_ms: 0, system_ms: 0, max_rss_kb: 0 }));
                drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
            },
            _ = tokio::time::sleep_until(sleep_until) => {
                if drain_until.is_none() && !timed_out {
                    timed_out = true;
                    let _ = sys::kill_group(pid, libc::SIGKILL);
                }
            },
            _ = heartbeat.tick() => {
                if !sink.send(Frame::heartbeat()).await {
                    client_gone = true;
                }
            },
            _ = sink.closed(), if kill_on_close && !client_gone => client_gone = true,
        }
        if client_gone && kill_on_close && exit.is_none() {
            let _ = sys::kill_group(pid, libc::SIGKILL);
        }
    }
    let reaped = match exit {
        Some(r) => r,
        None => sys::Reaped { pid, status: sys::WaitStatus::Exited(255), user_ms: 0, system_ms: 0, max_rss_kb: 0 },
    };
    let status = exit_status(&reaped, sp.started, timed_out);
    sink.send(Frame::exit(&status)).await;
    status
}

/// Writes `data` to a process's stdin and closes it (exec's `stdin` field).
pub fn feed_stdin(stdin: Option<tokio::net::unix::pipe::Sender>, data: Option<String>) {
    if let (Some(mut w), Some(data)) = (stdin, data) {
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = w.write_all(data.as_bytes()).await;
        });
    }
}

// ------------------------------------------------------------------ detached

/// Stored output of a detached process.
///
/// Offsets count output bytes: the payloads of the stdout and stderr
/// frames in the order they were read, headers excluded. A reader resuming
/// at offset `N` gets exactly the bytes from `N` on, with the chunk that
/// holds `N` cut to its tail, so a client that counts the bytes it wrote
/// out can resume at any byte. Whole chunks are dropped from the front
/// once the ring is over [`PROCESS_RING_BYTES`]; the exit frame is kept
/// apart and sent last.
#[derive(Debug, Default)]
struct Ring {
    /// Output chunks (stdout or stderr), each with the offset of its first byte.
    chunks: VecDeque<(u64, Frame)>,
    /// Offset of the oldest byte kept.
    start: u64,
    /// Offset just past the newest byte.
    end: u64,
    /// Bytes kept (`end - start`).
    size: usize,
    /// The encoded exit frame, once the process has exited.
    exit: Option<Bytes>,
    /// Keep bytes until they are acknowledged (the process's `hold`).
    hold: bool,
    /// With `hold`: every byte before this offset is acknowledged.
    acked: u64,
}

impl Ring {
    /// Stores a stdout or stderr frame; empty ones carry no bytes and are
    /// not kept.
    fn push_output(&mut self, frame: Frame) {
        debug_assert!(matches!(frame.kind, FrameKind::Stdout | FrameKind::Stderr));
        let len = frame.payload.len();
        if len == 0 {
            return;
        }
        self.chunks.push_back((self.end, frame));
        self.end += len as u64;
        self.size += len;
        self.trim();
    }

    /// Drops whole chunks from the front while over budget; with `hold`,
    /// only chunks every byte of which is acknowledged.
    fn trim(&mut self) {
        while self.size > PROCESS_RING_BYTES && self.chunks.len() > 1 {
            let (off, f) = self.chunks.front().expect("non-empty");
            let len = f.payload.len();
            if self.hold && off + len as u64 > self.acked {
                break;
            }
            self.chunks.pop_front();
            self.size -= len;
            self.start += len as u64;
        }
    }

    /// Whether more output may be stored: always, unless `hold` and the
    /// unacknowledged bytes fill the budget.
    fn has_room(&self) -> bool {
        !self.hold || self.end - self.acked.min(self.end) < PROCESS_RING_BYTES as u64
    }

    /// The reader has stored every byte before `upto`.
    fn ack(&mut self, upto: u64) {
        self.acked = self.acked.max(upto.min(self.end));
        self.trim();
    }

    /// Stores the exit frame (the last thing a process sends).
    fn push_exit(&mut self, frame: &Frame) {
        self.exit = Some(frame.to_bytes());
    }

    /// The output from byte `from` on (from the oldest byte kept if `from`
    /// is older), encoded as frames, followed by the exit frame if the
    /// process has exited. Returns the frames, the offset to continue from,
    /// and whether the exit frame is included (nothing more will come).
    fn read_from(&self, from: u64) -> (Bytes, u64, bool) {
        let mut out = BytesMut::new();
        let from = from.max(self.start);
        let mut next = from;
        // Chunks before the one holding `from` are skipped without a look.
        let first = self.chunks.partition_point(|(off, f)| off + f.payload.len() as u64 <= from);
        for (off, f) in self.chunks.range(first..) {
            let skip = (from.saturating_sub(*off)) as usize;
            Frame::new(f.kind, f.payload.slice(skip..)).encode(&mut out);
            next = off + f.payload.len() as u64;
        }
        let done = match &self.exit {
            Some(exit) => {
                out.extend_from_slice(exit);
                true
            }
            None => false,
        };
        (out.freeze(), next, done)
    }
}

/// A detached process.
#[derive(Debug)]
pub struct Detached {
    pub id: String,
    pub argv: Vec<String>,
    pub pid: i32,
    pub started_at: Timestamp,
    ring: Mutex<Ring>,
    exit: Mutex<Option<ExitStatus>>,
    /// Bumped on every new frame; watchers wait on it.
    changed: watch::Sender<u64>,
    /// Woken by acknowledgements: a held process's pump waits on it.
    acked: tokio::sync::Notify,
    stdin: tokio::sync::Mutex<Option<tokio::net::unix::pipe::Sender>>,
}

impl Detached {
    pub fn info(&self) -> ProcessInfo {
        let ring = self.ring.lock().expect("ring lock");
        let exit = self.exit.lock().expect("exit lock").clone();
        ProcessInfo {
            id: self.id.clone(),
            argv: self.argv.clone(),
            pid: self.pid,
            state: if exit.is_some() { ProcessState::Exited } else { ProcessState::Running },
            started_at: self.started_at,
            exit,
            output_start: ring.start,
            output_end: ring.end,
        }
    }

    /// Offset of the oldest output byte kept.
    pub fn output_start(&self) -> u64 {
        self.ring.lock().expect("ring lock").start
    }

    /// Returns the stored output from byte `from` on as frames (the exit
    /// frame last once the process has exited), the offset to continue
    /// from, and whether the exit frame was included (so no more will come).
    pub fn read_from(&self, from: u64) -> (Bytes, u64, bool) {
        self.ring.lock().expect("ring lock").read_from(from)
    }

    /// Like [`Detached::read_from`], but `None` if bytes from `from` on
    /// were dropped: a following reader must not skip them unannounced.
    pub fn read_exactly_from(&self, from: u64) -> Option<(Bytes, u64, bool)> {
        let ring = self.ring.lock().expect("ring lock");
        (from >= ring.start).then(|| ring.read_from(from))
    }

    /// The reader has stored every byte before `upto` (only a process
    /// started with `hold` cares).
    pub fn ack(&self, upto: u64) {
        self.ring.lock().expect("ring lock").ack(upto);
        self.acked.notify_waiters();
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Writes to stdin; `close` closes it afterwards.
    pub async fn write_stdin(&self, data: &[u8], close: bool) -> Result<(), ApiError> {
        use tokio::io::AsyncWriteExt;
        let mut guard = self.stdin.lock().await;
        let Some(w) = guard.as_mut() else {
            return Err(ApiError::conflict(format!("stdin of process {} is closed", self.id)));
        };
        if !data.is_empty() {
            w.write_all(data)
                .await
                .map_err(|e| ApiError::conflict(format!("writing stdin of process {}: {e}", self.id)))?;
        }
        if close {
            *guard = None;
        }
        Ok(())
    }

    pub fn signal(&self, sig: i32) -> Result<(), ApiError> {
        if self.exit.lock().expect("exit lock").is_some() {
            return Err(ApiError::conflict(format!("process {} has exited", self.id)));
        }
        sys::kill_group(self.pid, sig)
            .or_else(|_| sys::kill(self.pid, sig))
            .map_err(|e| ApiError::internal(format!("signalling process {}: {e}", self.id)))
    }
}

struct RingSink(Arc<Detached>);

impl FrameSink for RingSink {
    async fn send(&mut self, frame: Frame) -> bool {
        match frame.kind {
            FrameKind::Stdout | FrameKind::Stderr => self.0.ring.lock().expect("ring lock").push_output(frame),
            FrameKind::Exit => {
                // The status first: whoever sees the exit frame in the ring
                // also sees the process as exited.
                *self.0.exit.lock().expect("exit lock") = frame.as_exit();
                self.0.ring.lock().expect("ring lock").push_exit(&frame);
            }
            FrameKind::Heartbeat | FrameKind::Stdin | FrameKind::Error | FrameKind::Resize => return true,
        }
        self.0.changed.send_modify(|v| *v += 1);
        true
    }
    async fn closed(&self) {
        std::future::pending().await
    }
    fn has_room(&self) -> bool {
        self.0.ring.lock().expect("ring lock").has_room()
    }
    async fn room(&self) {
        loop {
            // Registered before the check, so an ack between the two is
            // not missed.
            let acked = self.0.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            if self.has_room() {
                return;
            }
            acked.await;
        }
    }
}

/// The registry of detached processes.
#[derive(Debug, Default)]
pub struct Registry {
    procs: Mutex<VecDeque<Arc<Detached>>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Registry {
    /// Starts a detached process; it runs until it exits or is signalled.
    pub fn start(&self, reaper: &Reaper, req: &ExecRequest, default_cwd: &str) -> Result<Arc<Detached>, ApiError> {
        // A chosen id is claimed under the lock, so of two starts with the
        // same id exactly one spawns.
        let mut procs = self.procs.lock().expect("registry lock");
        if let Some(id) = &req.id
            && procs.iter().any(|p| &p.id == id)
        {
            return Err(ApiError::conflict(format!("a process with id {id:?} exists")));
        }
        let mut sp = spawn(reaper, req, default_cwd, true)?;
        let id = match &req.id {
            Some(id) => id.clone(),
            None => loop {
                let n = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let id = format!("p{n}");
                if !procs.iter().any(|p| p.id == id) {
                    break id;
                }
            },
        };
        let stdin = sp.stdin.take();
        let d = Arc::new(Detached {
            id,
            argv: req.argv.clone(),
            pid: sp.pid,
            started_at: sp.started_at,
            ring: Mutex::new(Ring { hold: req.hold, ..Ring::default() }),
            exit: Mutex::new(None),
            changed: watch::channel(0).0,
            acked: tokio::sync::Notify::new(),
            stdin: tokio::sync::Mutex::new(stdin),
        });
        if let Some(data) = &req.stdin {
            let d2 = d.clone();
            let data = data.clone();
            tokio::spawn(async move {
                let _ = d2.write_stdin(data.as_bytes(), true).await;
            });
        }
        let timeout = req.timeout_ms.map(Duration::from_millis);
        tokio::spawn(pump(sp, timeout, RingSink(d.clone()), false));
        procs.push_back(d.clone());
        // Forget the oldest exited processes beyond the cap.
        let exited = procs.iter().filter(|p| p.exit.lock().expect("exit lock").is_some()).count();
        if exited > KEEP_EXITED {
            let mut drop_n = exited - KEEP_EXITED;
            procs.retain(|p| {
                if drop_n > 0 && p.exit.lock().expect("exit lock").is_some() {
                    drop_n -= 1;
                    false
                } else {
                    true
                }
            });
        }
        Ok(d)
    }

    pub fn get(&self, id: &str) -> Result<Arc<Detached>, ApiError> {
        self.procs
            .lock()
            .expect("registry lock")
            .iter()
            .find(|p| p.id == id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no process {id:?}")))
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        self.procs.lock().expect("registry lock").iter().map(|p| p.info()).collect()
    }

    pub fn running(&self) -> usize {
        self.procs.lock().expect("registry lock").iter().filter(|p| p.exit.lock().expect("exit lock").is_none()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output bytes of a frame stream, stdout and stderr as delivered, and
    /// the exit frame if there is one (it must be the last frame).
    fn output_of(frames: &[u8]) -> (Vec<u8>, Option<ExitStatus>) {
        let frames = flotilla_api::frame::decode_all(frames).expect("whole frames");
        let mut out = Vec::new();
        let mut exit = None;
        for (i, f) in frames.iter().enumerate() {
            match f.kind {
                FrameKind::Stdout | FrameKind::Stderr => {
                    assert!(!f.payload.is_empty(), "empty output frame");
                    out.extend_from_slice(&f.payload);
                }
                FrameKind::Exit => {
                    assert_eq!(i, frames.len() - 1, "exit frame not last");
                    exit = f.as_exit();
                }
                k => panic!("unexpected {k:?} frame"),
            }
        }
        (out, exit)
    }

    fn status(code: i32) -> ExitStatus {
        ExitStatus {
            code: Some(code),
            signal: None,
            timed_out: false,
            duration_ms: 1,
            rusage: flotilla_api::frame::Rusage { user_ms: 0, system_ms: 0, max_rss_kb: 0 },
        }
    }

    /// Numbered lines written in several frames of uneven sizes, on both
    /// streams: `line-1\nline-2\n…`.
    fn numbered_ring() -> (Ring, Vec<u8>) {
        let text: String = (1..=40).map(|i| format!("line-{i}\n")).collect();
        let bytes = text.into_bytes();
        let mut r = Ring::default();
        let mut at = 0;
        for (i, len) in [1, 6, 7, 13, 40, 2, 100, 3].into_iter().cycle().enumerate() {
            if at == bytes.len() {
                break;
            }
            let end = (at + len).min(bytes.len());
            let kind = if i % 3 == 2 { FrameKind::Stderr } else { FrameKind::Stdout };
            r.push_output(Frame::new(kind, Bytes::copy_from_slice(&bytes[at..end])));
            at = end;
        }
        assert!(r.chunks.len() > 5);
        (r, bytes)
    }

    #[test]
    fn resuming_at_every_byte_gives_exactly_the_rest() {
        let (mut r, output) = numbered_ring();
        let len = output.len() as u64;
        assert_eq!((r.start, r.end), (0, len));
        for done in [false, true] {
            if done {
                r.push_exit(&Frame::exit(&status(3)));
            }
            for n in 0..=len {
                let (frames, next, finished) = r.read_from(n);
                let (got, exit) = output_of(&frames);
                assert_eq!(got, &output[n as usize..], "resumed at {n}");
                assert_eq!(next, len, "resumed at {n}");
                assert_eq!(finished, done);
                assert_eq!(exit.map(|e| e.code), done.then_some(Some(3)));
            }
        }
        // `--from 7` on `line-1\nline-2\n…` starts inside `line-2`.
        let (frames, _, _) = r.read_from(7);
        assert!(output_of(&frames).0.starts_with(b"line-2\nline-3\n"));
    }

    #[test]
    fn kinds_are_kept_when_a_frame_is_cut() {
        let mut r = Ring::default();
        r.push_output(Frame::new(FrameKind::Stdout, &b"out"[..]));
        r.push_output(Frame::new(FrameKind::Stderr, &b"err"[..]));
        r.push_output(Frame::new(FrameKind::Stdout, Bytes::new()));
        assert_eq!(r.end, 6);
        let (frames, next, _) = r.read_from(4);
        assert_eq!(next, 6);
        assert_eq!(flotilla_api::frame::decode_all(&frames).unwrap(), vec![Frame::new(FrameKind::Stderr, &b"rr"[..])]);
        let (frames, next, _) = r.read_from(1);
        assert_eq!(next, 6);
        assert_eq!(
            flotilla_api::frame::decode_all(&frames).unwrap(),
            vec![Frame::new(FrameKind::Stdout, &b"ut"[..]), Frame::new(FrameKind::Stderr, &b"err"[..])]
        );
    }

    #[test]
    fn reading_at_or_past_the_end_waits_for_more() {
        let (r, output) = numbered_ring();
        let len = output.len() as u64;
        for from in [len, len + 10] {
            let (frames, next, done) = r.read_from(from);
            assert!(frames.is_empty() && !done);
            assert_eq!(next, from);
        }
    }

    #[test]
    fn ring_keeps_at_most_its_budget() {
        let mut r = Ring::default();
        let big = Frame::new(FrameKind::Stdout, vec![7; 1 << 20]);
        for _ in 0..20 {
            r.push_output(big.clone());
        }
        assert!(r.size <= PROCESS_RING_BYTES);
        assert_eq!(r.size as u64, r.end - r.start);
        assert!(r.start > 0);
        assert_eq!(r.end, 20 << 20);
        // Asking for dropped output starts at the oldest byte kept.
        let (frames, next, _) = r.read_from(0);
        assert_eq!(output_of(&frames).0.len(), r.size);
        assert_eq!(next, r.end);
        // Inside the kept part, resuming is still exact.
        let (frames, _, _) = r.read_from(r.start + 5);
        assert_eq!(output_of(&frames).0.len(), r.size - 5);
    }

    #[test]
    fn a_held_ring_keeps_every_unacknowledged_byte() {
        let mut r = Ring { hold: true, ..Ring::default() };
        let mib = Frame::new(FrameKind::Stdout, vec![7; 1 << 20]);
        let fits = PROCESS_RING_BYTES >> 20;
        for _ in 0..fits - 1 {
            assert!(r.has_room());
            r.push_output(mib.clone());
        }
        assert!(r.has_room());
        r.push_output(mib.clone());
        assert!(!r.has_room(), "a full ring of unacknowledged bytes takes no more");
        // What the pump had already read is stored all the same: nothing
        // unacknowledged is ever dropped.
        r.push_output(mib.clone());
        assert_eq!((r.start, r.size), (0, (fits + 1) << 20));
        // An acknowledgement makes room and lets the acknowledged bytes go.
        r.ack(3 << 20);
        assert!(r.has_room());
        assert_eq!(r.start, 1 << 20, "trimmed back to the budget, acknowledged bytes only");
        let (frames, next, _) = r.read_from(3 << 20);
        assert_eq!(output_of(&frames).0.len(), (fits - 2) << 20);
        assert_eq!(next, r.end);
        // An ack past the end counts only what exists.
        r.ack(u64::MAX);
        assert_eq!(r.acked, r.end);
    }

    #[tokio::test]
    async fn a_held_process_blocks_instead_of_losing_output_and_finishes_once_read() {
        let reaper = Reaper::start(false);
        let registry = Registry::default();
        // 3 rings' worth, more than a pipe and the ring hold together.
        let total = 3 * PROCESS_RING_BYTES;
        let req = ExecRequest {
            argv: vec!["sh".into(), "-c".into(), format!("head -c {total} /dev/zero | tr '\\0' x")],
            hold: true,
            ..Default::default()
        };
        let d = registry.start(&reaper, &req, "/").unwrap();
        // Unread, it stalls: the ring holds its budget and the process runs.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let end = d.ring.lock().unwrap().end;
            if end >= PROCESS_RING_BYTES as u64 {
                break;
            }
            assert!(Instant::now() < deadline, "the process never filled the ring ({end} bytes)");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Given time, it still has not gone past its budget (plus a read).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(d.ring.lock().unwrap().end <= (PROCESS_RING_BYTES + READ_CHUNK) as u64);
        assert!(d.info().exit.is_none(), "a held process blocks while its output is unread");
        assert_eq!(d.output_start(), 0);
        // A reader that acknowledges as it goes gets every byte.
        let mut got = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (frames, next, done) = d.read_exactly_from(got).expect("nothing dropped");
            let (out, exit) = output_of(&frames);
            assert!(out.iter().all(|b| *b == b'x'));
            assert_eq!(next, got + out.len() as u64);
            got = next;
            d.ack(got);
            if done {
                assert_eq!(exit.and_then(|e| e.code), Some(0));
                break;
            }
            assert!(Instant::now() < deadline, "stalled at {got} of {total}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(got, total as u64);
    }

    #[test]
    fn a_missing_working_directory_is_named() {
        let reaper = Reaper { init: false, waiters: Mutex::new(HashMap::new()) };
        let req = |cwd: &str| ExecRequest { argv: vec!["ls".into()], cwd: Some(cwd.into()), ..Default::default() };
        let e = spawn(&reaper, &req("/no/such/dir"), "/", false).err().expect("refused");
        assert_eq!(e.code, flotilla_api::ErrorCode::NotFound);
        assert_eq!(e.message, "working directory \"/no/such/dir\" does not exist");
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_str().unwrap().to_string();
        let e = spawn(&reaper, &req(&path), "/", false).err().expect("refused");
        assert_eq!(e.code, flotilla_api::ErrorCode::InvalidArgument);
        assert_eq!(e.message, format!("working directory {path:?} is not a directory"));
        let e = spawn(&reaper, &req(&format!("{path}/x")), "/", false).err().expect("refused");
        assert_eq!(e.code, flotilla_api::ErrorCode::NotFound);
        assert!(e.message.contains("does not exist"), "{}", e.message);
        // A missing program is still reported as before.
        let e = spawn(
            &reaper,
            &ExecRequest { argv: vec!["no-such-program".into()], cwd: Some("/".into()), ..Default::default() },
            "/",
            false,
        )
        .err()
        .expect("refused");
        assert_eq!(e.code, flotilla_api::ErrorCode::NotFound);
        assert!(e.message.starts_with("cannot start \"no-such-program\" in /: "), "{}", e.message);
    }
}
