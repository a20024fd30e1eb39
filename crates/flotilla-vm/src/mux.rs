//! The host–guest channel: many HTTP connections over one virtio-serial
//! port.
//!
//! A virtio-serial port is a single byte stream (the host end is a QEMU
//! chardev socket, the guest end `/dev/vportNpM`), and it survives the host
//! side going away: a node that crashed and came back reconnects to the same
//! port of the same running guest. So each attachment starts with a
//! handshake that both sides can find in a stream that may hold leftovers of
//! an earlier attachment:
//!
//! ```text
//! host  -> guest   FLOTILLA-HELLO <nonce>\n     (repeated until answered)
//! guest -> host    FLOTILLA-READY <nonce>\n
//! host  -> guest   FLOTILLA-GO <nonce> <unix time ns> <32 random bytes, hex>\n
//! ```
//!
//! Each side skips everything before the line it waits for; then both run
//! yamux (host = client) and every HTTP connection is one yamux stream. The
//! hello is repeated because a guest whose previous host vanished (a node
//! killed with -9) may still be in that old session: it takes the first
//! hello for a broken frame, ends the session and only then listens for
//! hellos. Repeats that arrive after the guest answered are skipped while it
//! waits for `GO`, after which the host sends only yamux. The guest goes
//! back to waiting for a hello whenever its session breaks.
//!
//! `GO` also carries the host's clock and fresh randomness. A guest restored
//! from a snapshot wakes with the clock and the random-number state of the
//! moment the snapshot was taken, shared with every other guest restored
//! from it: on each attach it sets its clock and reseeds its RNG.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use flotilla_agent::http::{Dial, DialStream};
use flotilla_sandbox::sys::SharedFd;
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

const HELLO: &str = "FLOTILLA-HELLO ";
const READY: &str = "FLOTILLA-READY ";
const GO: &str = "FLOTILLA-GO ";
/// How often the host repeats its hello while the guest does not answer.
const HELLO_EVERY: Duration = Duration::from_millis(250);
/// How long one connection waits for an answer before a fresh one is made.
const CONNECTION_BUDGET: Duration = Duration::from_secs(2);
/// Longest handshake line we accept; anything longer is a leftover.
const MAX_LINE: usize = 160;

fn config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(512);
    c
}

/// Reads bytes until a line `prefix<rest>\n` arrives, returning `rest`.
/// Anything else (leftovers of an earlier session) is skipped. `Ok(None)`
/// at end of file.
async fn read_line_with<R: AsyncRead + Unpin>(r: &mut R, prefix: &str) -> io::Result<Option<String>> {
    Ok(read_line_with_any(r, &[prefix]).await?.map(|(_, rest)| rest))
}

/// [`read_line_with`] for several prefixes: which one matched, and the rest.
async fn read_line_with_any<R: AsyncRead + Unpin>(r: &mut R, prefixes: &[&str]) -> io::Result<Option<(usize, String)>> {
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    loop {
        if r.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        if byte[0] == b'\n' {
            for (i, prefix) in prefixes.iter().enumerate() {
                if let Some(rest) = line.strip_prefix(prefix.as_bytes()) {
                    return Ok(Some((i, String::from_utf8_lossy(rest).into_owned())));
                }
            }
            line.clear();
        } else if line.len() < MAX_LINE {
            line.push(byte[0]);
        } else {
            line.clear();
        }
    }
}

// ------------------------------------------------------------------ host

/// `GO` with the host's clock and 32 random bytes.
fn go_line(nonce: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut seed = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut seed);
    }
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    format!("{GO}{nonce} {now} {hex}\n")
}

type OpenReply = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// Dials the agent of one microVM through its serial port socket.
pub struct HostDialer {
    name: Mutex<String>,
    socket: Mutex<PathBuf>,
    /// How long one attach may take (the guest may still be booting: then
    /// the dial fails and the caller retries).
    attach_timeout: Duration,
    session: tokio::sync::Mutex<Option<mpsc::Sender<OpenReply>>>,
    nonce: Mutex<u64>,
}

impl HostDialer {
    pub fn new(name: String, socket: PathBuf, attach_timeout: Duration) -> Arc<HostDialer> {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
            as u64
            ^ u64::from(std::process::id()) << 32;
        Arc::new(HostDialer {
            name: Mutex::new(name),
            socket: Mutex::new(socket),
            attach_timeout,
            session: Default::default(),
            nonce: Mutex::new(seed),
        })
    }

    /// The VM's directory was renamed: later attaches use the new socket
    /// path; a session already up carries on.
    pub fn moved(&self, name: String, socket: PathBuf) {
        *self.name.lock().expect("name lock") = name;
        *self.socket.lock().expect("socket lock") = socket;
    }

    fn next_nonce(&self) -> String {
        let mut n = self.nonce.lock().expect("nonce lock");
        *n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        format!("{:016x}", *n)
    }

    /// Attaches now if not attached, waiting up to `within` for the guest
    /// to answer (a booting guest answers once its init serves: one
    /// connection that waits is faster than many that give up).
    pub async fn attach_within(&self, within: Duration) -> io::Result<()> {
        let mut session = self.session.lock().await;
        if session.as_ref().is_some_and(|tx| !tx.is_closed()) {
            return Ok(());
        }
        *session = Some(self.attach(within).await?);
        Ok(())
    }

    async fn attach(&self, within: Duration) -> io::Result<mpsc::Sender<OpenReply>> {
        let path = self.socket.lock().expect("socket lock").clone();
        let deadline = tokio::time::Instant::now() + within;
        // Each connection gets a few seconds; one that goes unanswered is
        // replaced by a fresh one. After a node kill -9, a guest was seen
        // (about one CI run in two) never answering hellos on the first
        // connection for 10 s: a new connection is a new open event for
        // QEMU's chardev and the guest's port.
        let (rd, wr, nonce) = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.hello(&path, left.min(CONNECTION_BUDGET)).await {
                Ok(answered) => break answered,
                Err(e) if e.kind() == io::ErrorKind::TimedOut && left > CONNECTION_BUDGET => {
                    tracing::debug!(vm = %self.name(), "no answer on this connection; reconnecting");
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the guest agent did not answer on its serial port within {within:?}"),
                    ));
                }
                Err(e) => return Err(e),
            }
        };
        let mut wr = wr;
        wr.write_all(go_line(&nonce).as_bytes()).await?;
        let sock = rd.reunite(wr).map_err(io::Error::other)?;
        let conn = yamux::Connection::new(sock.compat(), config(), yamux::Mode::Client);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(drive_client(conn, rx));
        Ok(tx)
    }

    /// Connects and repeats a hello until the guest answers it, within
    /// `within`; the connection's halves and the nonce it was answered on.
    async fn hello(
        &self,
        path: &std::path::Path,
        within: Duration,
    ) -> io::Result<(tokio::net::unix::OwnedReadHalf, tokio::net::unix::OwnedWriteHalf, String)> {
        let sock = tokio::net::UnixStream::connect(path).await?;
        let nonce = self.next_nonce();
        let hello = format!("\n{HELLO}{nonce}\n");
        let (mut rd, mut wr) = sock.into_split();
        let wait = async {
            let answered = async {
                loop {
                    match read_line_with(&mut rd, READY).await? {
                        Some(n) if n == nonce => return Ok(()),
                        Some(_) => continue,
                        None => {
                            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the VM's serial port closed"));
                        }
                    }
                }
            };
            tokio::pin!(answered);
            loop {
                wr.write_all(hello.as_bytes()).await?;
                tokio::select! {
                    r = &mut answered => return r,
                    _ = tokio::time::sleep(HELLO_EVERY) => {}
                }
            }
        };
        tokio::time::timeout(within, wait)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer on this connection"))??;
        Ok((rd, wr, nonce))
    }

    async fn open(&self) -> io::Result<yamux::Stream> {
        let mut session = self.session.lock().await;
        for attempt in 0..2 {
            let tx = match session.as_ref() {
                Some(tx) if !tx.is_closed() => tx.clone(),
                _ => {
                    let tx = self.attach(self.attach_timeout).await?;
                    *session = Some(tx.clone());
                    tx
                }
            };
            let (reply, answer) = oneshot::channel();
            if tx.send(reply).await.is_ok()
                && let Ok(Ok(stream)) = answer.await
            {
                return Ok(stream);
            }
            // The session broke (the guest restarted its side): attach anew.
            *session = None;
            if attempt == 1 {
                break;
            }
        }
        Err(io::Error::new(io::ErrorKind::ConnectionReset, "the VM's agent channel broke"))
    }
}

impl Dial for HostDialer {
    fn name(&self) -> String {
        self.name.lock().expect("name lock").clone()
    }

    fn dial(&self) -> BoxFuture<'_, io::Result<Box<dyn DialStream>>> {
        Box::pin(async move {
            let s = self.open().await?;
            Ok(Box::new(s.compat()) as Box<dyn DialStream>)
        })
    }
}

/// Runs a client session: opens the streams asked for, refuses inbound
/// ones, until the connection ends or every sender is gone.
async fn drive_client<T>(mut conn: yamux::Connection<T>, mut rx: mpsc::Receiver<OpenReply>)
where
    T: futures_util::AsyncRead + futures_util::AsyncWrite + Unpin,
{
    let mut waiting: VecDeque<OpenReply> = VecDeque::new();
    let mut senders_gone = false;
    std::future::poll_fn(|cx| {
        loop {
            while !senders_gone {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(r)) => waiting.push_back(r),
                    Poll::Ready(None) => senders_gone = true,
                    Poll::Pending => break,
                }
            }
            while !waiting.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(r) => {
                        let failed = r.is_err();
                        let _ = waiting.pop_front().expect("not empty").send(r);
                        if failed {
                            return Poll::Ready(());
                        }
                    }
                    Poll::Pending => break,
                }
            }
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(_refused))) => continue,
                Poll::Ready(_) => return Poll::Ready(()),
                // Open streams keep the connection driven from here, even
                // once nobody can ask for new ones.
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    tracing::debug!("VM agent channel session ended");
}

// ------------------------------------------------------------------ guest

/// The guest side: waits for a host, then serves every stream it opens
/// with `serve`, forever (re-attaching whenever a host goes away).
pub async fn serve_port<F>(path: PathBuf, serve: F) -> io::Result<()>
where
    F: Fn(Box<dyn DialStream>) -> BoxFuture<'static, ()> + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    loop {
        let mut port = match open_port(&path) {
            Ok(p) => p,
            Err(e) => {
                // Busy for a moment while the last session's descriptor
                // closes: try again rather than take the guest down.
                tracing::warn!(error = %e, "opening the agent port");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match guest_handshake(&mut port).await {
            Ok(Some(go)) => take_host_state(&go),
            Ok(None) => {
                // No host attached: the port reads end-of-file until one is.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "handshake on the agent port");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let mut conn = yamux::Connection::new(port.compat(), config(), yamux::Mode::Server);
        loop {
            let next = std::future::poll_fn(|cx| conn.poll_next_inbound(cx)).await;
            match next {
                Some(Ok(stream)) => {
                    let serve = serve.clone();
                    tokio::spawn(async move { serve(Box::new(stream.compat())).await });
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, "host session ended");
                    break;
                }
                None => break,
            }
        }
    }
}

/// The guest's half of the handshake: answers each hello whose nonce is new
/// with `READY`, and returns the `GO` line of the last nonce it answered.
/// Repeats of that hello are skipped, so no `READY` follows the host's
/// switch to yamux. A hello with a *new* nonce is answered even while a
/// `GO` is awaited: that is a host that gave up on its connection and
/// made a fresh one. (Waiting only for the first nonce's `GO` lost the
/// guest after a node kill -9: when the host's new connection came before
/// the guest read end-of-file from the old one, the guest skipped every
/// new hello forever, waiting for a `GO` that no host would send.)
/// `Ok(None)` at end of file: no host is attached.
async fn guest_handshake<P: AsyncRead + AsyncWrite + Unpin>(port: &mut P) -> io::Result<Option<String>> {
    let mut answered: Option<String> = None;
    loop {
        let Some((which, rest)) = read_line_with_any(port, &[HELLO, GO]).await? else {
            return Ok(None);
        };
        if which == 0 {
            if answered.as_deref() != Some(rest.as_str()) {
                port.write_all(format!("{READY}{rest}\n").as_bytes()).await?;
                answered = Some(rest);
            }
        } else if answered.is_some() && rest.split(' ').next() == answered.as_deref() {
            return Ok(Some(rest));
        }
    }
}

/// Sets the guest's clock from the host's and mixes the host's random bytes
/// into the guest's pool, then forces a reseed so that guests restored from
/// one snapshot stop sharing random numbers.
fn take_host_state(go: &str) {
    let mut words = go.split(' ').skip(1);
    if let Some(ns) = words.next().and_then(|w| w.parse::<u128>().ok()) {
        let ts = libc::timespec { tv_sec: (ns / 1_000_000_000) as libc::time_t, tv_nsec: (ns % 1_000_000_000) as _ };
        // SAFETY: a valid timespec for the duration of the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "setting the clock from the host");
        }
    }
    let Some(hex) = words.next() else { return };
    let seed: Vec<u8> =
        (0..hex.len() / 2).filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect();
    let reseed = || -> io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
        f.write_all(&seed)?;
        // RNDRESEEDCRNG: reseed the kernel's CRNG from the pool now.
        // SAFETY: an argument-less ioctl on an open /dev/urandom.
        if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), 0x5207) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    if let Err(e) = reseed() {
        tracing::warn!(error = %e, "reseeding the guest's RNG");
    }
}

/// A character device opened non-blocking and driven by the reactor.
pub struct Port(tokio::io::unix::AsyncFd<SharedFd>);

fn open_port(path: &std::path::Path) -> io::Result<Port> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let fd = SharedFd(Arc::new(std::os::fd::OwnedFd::from(f)));
    Ok(Port(flotilla_sandbox::sys::async_fd(fd, tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE)?))
}

impl AsyncRead for Port {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = std::task::ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| nix::unistd::read(&*f.get_ref().0, unfilled).map_err(io::Error::from)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = std::task::ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|f| nix::unistd::write(&*f.get_ref().0, data).map_err(io::Error::from)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handshake_skips_leftovers() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"garbage\x00\x01 from an old session\nFLOTILLA-READY 12\nFLOTILLA-READY abc\n").await.unwrap();
        assert_eq!(read_line_with(&mut b, READY).await.unwrap().as_deref(), Some("12"));
        assert_eq!(read_line_with(&mut b, READY).await.unwrap().as_deref(), Some("abc"));
        drop(a);
        assert_eq!(read_line_with(&mut b, READY).await.unwrap(), None);
    }

    #[test]
    fn go_carries_the_nonce_the_clock_and_randomness() {
        let line = go_line("00ff");
        assert!(line.len() < MAX_LINE, "{line}");
        let rest = line.strip_prefix(GO).unwrap().trim_end();
        let words: Vec<&str> = rest.split(' ').collect();
        assert_eq!(words[0], "00ff");
        assert!(words[1].parse::<u128>().unwrap() > 1_700_000_000_000_000_000);
        assert_eq!(words[2].len(), 64);
        assert_ne!(go_line("00ff"), line, "fresh randomness each time");
    }

    /// A host that gives up on its connection and makes a new one (with a
    /// new nonce) before the guest ever saw the old one close is answered:
    /// the guest must not keep waiting for the old nonce's `GO`.
    #[tokio::test]
    async fn a_new_hello_restarts_the_handshake() {
        let (mut host, mut guest) = tokio::io::duplex(4096);
        let g = tokio::spawn(async move { guest_handshake(&mut guest).await });
        host.write_all(b"\nFLOTILLA-HELLO 1\n\nFLOTILLA-HELLO 1\n").await.unwrap();
        assert_eq!(read_line_with(&mut host, READY).await.unwrap().as_deref(), Some("1"));
        // The first connection's answer was lost; a fresh connection says hello.
        host.write_all(b"\nFLOTILLA-HELLO 2\n\nFLOTILLA-HELLO 2\n").await.unwrap();
        let ready = tokio::time::timeout(Duration::from_secs(10), read_line_with(&mut host, READY)).await;
        assert_eq!(ready.expect("the new hello was answered").unwrap().as_deref(), Some("2"));
        host.write_all(b"FLOTILLA-GO 1 5 ab\nFLOTILLA-GO 2 7 cd\n").await.unwrap();
        let go = tokio::time::timeout(Duration::from_secs(10), g).await.expect("handshake finished").unwrap();
        assert_eq!(go.unwrap().as_deref(), Some("2 7 cd"), "only the last nonce's GO counts");
        // Exactly one READY per nonce: nothing trails into the yamux session.
        drop(host.write_all(b"").await);
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_millis(50), host.read_to_end(&mut rest)).await;
        assert!(rest.is_empty(), "extra bytes after the handshake: {rest:?}");
    }

    #[tokio::test]
    async fn overlong_lines_are_dropped() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let mut junk = vec![b'x'; 300];
        junk.extend_from_slice(b"FLOTILLA-HELLO 1\n");
        a.write_all(&junk).await.unwrap();
        drop(a);
        // The hello is glued to a 300-byte line: not a hello.
        assert_eq!(read_line_with(&mut b, HELLO).await.unwrap(), None);
    }
}
