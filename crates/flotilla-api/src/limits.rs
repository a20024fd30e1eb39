//! Named limits shared by the node and the agent. Each says why it is the
//! size it is; change them here, not at the call sites.

use std::time::Duration;

/// Largest frame payload we send or accept. Big enough that 100 MB of output
/// moves in few frames, small enough that a hostile peer cannot make us
/// allocate much by lying in a header.
pub const MAX_FRAME_PAYLOAD: usize = 1 << 20;

/// How often a stream with nothing else to say sends a heartbeat frame, so
/// idle execs and sessions stay open through proxies and a dead peer shows.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// A stream that has seen no frame at all for this long is declared dead:
/// five missed heartbeats, so a busy machine does not cause false alarms but
/// a hung agent is still noticed within seconds.
pub const STREAM_DEAD_AFTER: Duration = Duration::from_secs(10);

/// Default cap on the bytes a workspace tarball may expand to.
pub const DEFAULT_TAR_MAX_BYTES: u64 = 16 << 30;

/// Default cap on the number of entries in a workspace tarball: far above
/// any real source tree, far below what exhausts inodes.
pub const DEFAULT_TAR_MAX_ENTRIES: u64 = 2_000_000;

/// Response header of a frame stream that may end cleanly without an exit
/// or error frame (a detached process's output read with `follow=false`
/// or a `limit`): a clean end of such a stream is not a broken agent.
pub const STREAM_MAY_END_HEADER: &str = "x-flotilla-stream-may-end";

/// Output a detached process keeps for re-attaching clients. Older output is
/// dropped (a client asking for it learns where the ring starts), except
/// for a process started with `hold`: it keeps up to this many bytes its
/// reader has not acknowledged, then blocks its writer.
pub const PROCESS_RING_BYTES: usize = 8 << 20;

/// How long the node waits for a new sandbox's agent to say it is ready.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the node waits for a killed sandbox's init to be reaped before
/// it reports the stop as failed (the kernel normally takes microseconds).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Default page size for list endpoints, and the largest a client may ask.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

/// Longest TTL or idle TTL a sandbox may ask for (ten years). Anything
/// longer is a mistake or an attack on the timestamp arithmetic.
pub const MAX_TTL_S: u64 = 10 * 31_557_600;

/// Bounds on resources, checked where a request is parsed so that nothing
/// out of range is accepted and fails later at a cgroup write. The
/// maxima are what the kernel accepts with room to spare: pids up to
/// `PID_MAX_LIMIT` on 64-bit, memory and disk up to a pebibyte.
pub const MIN_PIDS: u64 = 8;
pub const MAX_PIDS: u64 = 4_194_304;
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;
pub const MAX_MEMORY_BYTES: u64 = 1 << 50;
pub const MAX_DISK_BYTES: u64 = 1 << 50;
pub const MAX_CPUS: f64 = 1024.0;

/// Largest JSON request body any route accepts. Requests are small
/// objects; a megabyte leaves room for a big environment.
pub const MAX_JSON_BODY: usize = 1 << 20;

/// How long a client has to send a whole JSON request body once its
/// headers arrived. A client that declares a body and never sends it
/// gets a 408 instead of holding a connection and a task forever.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a streamed request body (a workspace tarball, stdin) may go
/// without a byte before the request ends with a 408. Streams stay open as
/// long as bytes flow.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
