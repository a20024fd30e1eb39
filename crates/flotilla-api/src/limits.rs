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

/// Output a detached process keeps for re-attaching clients. Older output is
/// dropped; a client asking for it learns where the ring starts.
pub const PROCESS_RING_BYTES: usize = 8 << 20;

/// How long the node waits for a new sandbox's agent to say it is ready.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the node waits for a killed sandbox's init to be reaped before
/// it reports the stop as failed (the kernel normally takes microseconds).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Default page size for list endpoints, and the largest a client may ask.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;
