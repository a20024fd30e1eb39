//! Interactive sessions: a pseudo-terminal over a WebSocket.
//!
//! Every WebSocket message is one frame (see `flotilla_api::frame`). The
//! client sends `Stdin` and `Resize`; the agent sends `Stdout` (the
//! terminal merges stderr into it), `Heartbeat` when idle, and `Exit` when
//! the program ends. Closing the socket hangs up the terminal and kills the
//! session's process group.

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use flotilla_api::limits::HEARTBEAT_INTERVAL;
use flotilla_api::{ApiError, ExitStatus, Frame, FrameKind, SessionQuery};
use flotilla_sandbox::sys;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::server::Agent;

pub async fn run(agent: Arc<Agent>, q: SessionQuery, socket: WebSocket) {
    let (mut ws_tx, mut ws_rx) = socket.split();
    let send = |f: Frame| Message::Binary(f.to_bytes());
    let (cols, rows) = (q.cols.unwrap_or(80), q.rows.unwrap_or(24));
    let (master, slave) = match sys::openpty(cols, rows) {
        Ok(p) => p,
        Err(e) => {
            let _ = ws_tx.send(send(Frame::error(&ApiError::internal(format!("opening a pty: {e}"))))).await;
            return;
        }
    };
    let mut cmd = match &q.cmd {
        Some(c) => {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(c);
            cmd
        }
        None => {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-l");
            cmd
        }
    };
    let stdio = |fd: &std::os::fd::OwnedFd| fd.try_clone().map(Stdio::from);
    let (Ok(i), Ok(o), Ok(e)) = (stdio(&slave), stdio(&slave), stdio(&slave)) else {
        let _ = ws_tx.send(send(Frame::error(&ApiError::internal("duplicating the pty")))).await;
        return;
    };
    cmd.stdin(i).stdout(o).stderr(e).current_dir(&agent.workspace);
    cmd.env("TERM", q.term.as_deref().unwrap_or("xterm-256color"));
    sys::command_new_session(&mut cmd, true);
    let started = std::time::Instant::now();
    let (child, exit) = match agent.reaper.spawn(&mut cmd) {
        Ok(v) => v,
        Err(e) => {
            let _ = ws_tx.send(send(Frame::error(&ApiError::internal(format!("starting the shell: {e}"))))).await;
            return;
        }
    };
    // The Command holds copies of the slave: drop them, or the master
    // never reads end-of-file when the program exits.
    drop(cmd);
    drop(slave);
    let pid = child.id() as i32;
    // Two independent handles, so a pending read never blocks a write.
    let (reader, writer) = match (master.try_clone(), master.try_clone()) {
        (Ok(r), Ok(w)) => (r, w),
        _ => {
            let _ = sys::kill_group(pid, libc::SIGKILL);
            return;
        }
    };
    let mut reader = tokio::fs::File::from_std(std::fs::File::from(reader));
    let mut writer = tokio::fs::File::from_std(std::fs::File::from(writer));

    let mut buf = vec![0u8; 32 * 1024];
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut exit = Box::pin(exit);
    let mut exited: Option<sys::Reaped> = None;
    // Once the program has exited, keep reading only until its last output
    // is out (a background child may hold the terminal open forever).
    let mut drain_deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(drain_deadline) => break,
            r = reader.read(&mut buf) => match r {
                // EIO once the last slave handle is closed: the program ended.
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    heartbeat.reset();
                    if ws_tx.send(send(Frame::new(FrameKind::Stdout, Bytes::copy_from_slice(&buf[..n])))).await.is_err() {
                        break;
                    }
                }
            },
            msg = ws_rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    for f in flotilla_api::frame::decode_all(&b).unwrap_or_default() {
                        match f.kind {
                            FrameKind::Stdin => {
                                if writer.write_all(&f.payload).await.is_err() {
                                    break;
                                }
                                let _ = writer.flush().await;
                            }
                            FrameKind::Resize => {
                                if let Some((c, r)) = f.as_resize() {
                                    let _ = sys::set_window_size(master.as_fd(), c, r);
                                }
                            }
                            FrameKind::Stdout
                            | FrameKind::Stderr
                            | FrameKind::Exit
                            | FrameKind::Error
                            | FrameKind::Heartbeat => {}
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
            },
            r = &mut exit, if exited.is_none() => {
                exited = r.ok();
                drain_deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(300);
            },
            _ = heartbeat.tick() => {
                if ws_tx.send(send(Frame::heartbeat())).await.is_err() {
                    break;
                }
            }
        }
    }
    // Hang up: the session's processes get SIGHUP, then are killed.
    let _ = sys::kill_group(pid, libc::SIGHUP);
    let reaped = match exited {
        Some(r) => Some(r),
        None => match tokio::time::timeout(std::time::Duration::from_millis(200), &mut exit).await {
            Ok(Ok(r)) => Some(r),
            _ => {
                let _ = sys::kill_group(pid, libc::SIGKILL);
                tokio::time::timeout(std::time::Duration::from_secs(2), &mut exit).await.ok().and_then(|r| r.ok())
            }
        },
    };
    let status = match reaped.map(|r| r.status) {
        Some(sys::WaitStatus::Exited(c)) => ExitStatus { code: Some(c), ..Default::default() },
        Some(sys::WaitStatus::Signaled(s)) => ExitStatus { signal: Some(s), ..Default::default() },
        None => ExitStatus { signal: Some(libc::SIGKILL), ..Default::default() },
    };
    let status = ExitStatus { duration_ms: started.elapsed().as_millis() as u64, ..status };
    let _ = ws_tx.send(send(Frame::exit(&status))).await;
    let _ = ws_tx.close().await;
}
