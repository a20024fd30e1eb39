//! Command-line arguments, and dispatch to the command modules.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Fast, disposable, isolated sandboxes, and the system that runs builds on them.
///
/// Global options (`--home`, `--node`, `--json`, …) go before or after the
/// subcommand: `flotilla --home DIR sandbox ls` and `flotilla sandbox ls --home DIR`
/// are the same.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes, declared once here with `global = true`,
/// so they are accepted before or after the subcommand (as in git and docker).
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Print the result as JSON (commands that print a result).
    #[arg(long, global = true)]
    pub json: bool,
}

/// How a command finds its node (and, for `node` and `dev`, where it keeps its data).
#[derive(Debug, Clone, Default, Args)]
pub struct NodeArgs {
    /// Data directory (default: $XDG_DATA_HOME/flotilla); a node's socket is DIR/node.sock.
    #[arg(long, env = "FLOTILLA_HOME", global = true)]
    pub home: Option<PathBuf>,
    /// Node API address (unix:///path/node.sock or https://host:port); overrides --home.
    #[arg(long, env = "FLOTILLA_NODE", global = true)]
    pub node: Option<String>,
    /// Find the node by its id in the name table (`nodes/ID`) instead.
    #[arg(long, global = true, conflicts_with = "node")]
    pub node_id: Option<String>,
    /// Name table address (default: the one `flotilla dev` started, from HOME/names.url);
    /// `node` publishes itself there as `nodes/<id>`.
    #[arg(long, env = "FLOTILLA_NAMES", global = true)]
    pub names: Option<String>,
    /// Bearer token for writes to the name table (`names mount|unmount`, a node publishing itself;
    /// reads need none). Default: HOME/names.token with the table of HOME/names.url. For
    /// `names serve` and `dev`: the token writers must send (default: generated into HOME/names.token).
    #[arg(long, env = "FLOTILLA_NAMES_TOKEN", global = true, hide_env_values = true)]
    pub names_token: Option<String>,
    /// Bearer token of a remote node (`flotilla node --listen` prints where it is kept). For `node`
    /// and `dev`: the token clients must send (default: $FLOTILLA_NODE_TOKEN, else generated into
    /// HOME/tls/token; $FLOTILLA_TOKEN is the clients' and does not apply).
    #[arg(long, env = "FLOTILLA_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Coordinator API address: unix:///path/coordinator.sock, http://host:port (loopback), or
    /// https://host:port#sha256=FINGERPRINT as the coordinator prints it (without the fingerprint the
    /// system's CAs are trusted); default: HOME/coordinator.sock.
    #[arg(long, env = "FLOTILLA_COORDINATOR", global = true)]
    pub coordinator: Option<String>,
    /// Bearer token for changes through a coordinator's TCP address (its HOME/coordinator/token).
    #[arg(long, env = "FLOTILLA_COORDINATOR_TOKEN", global = true, hide_env_values = true)]
    pub coordinator_token: Option<String>,
    /// Trust this certificate (PEM) for an https node, e.g. a copy of the node's HOME/tls/cert.pem.
    #[arg(long, env = "FLOTILLA_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Trust the https node whose certificate has this SHA-256 fingerprint (printed at its start).
    #[arg(long, env = "FLOTILLA_CERT_SHA256", global = true)]
    pub cert_sha256: Option<String>,
    /// Show this client certificate (PEM) to https nodes: a node started with `--client-ca` takes
    /// a certificate its CA issued in place of its token, so one coordinator reaches every node.
    #[arg(long, env = "FLOTILLA_CLIENT_CERT", global = true, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(long, env = "FLOTILLA_CLIENT_KEY", global = true, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole system on this machine with embedded defaults: a node, its name table and
    /// a coordinator (SQLite).
    Dev(DevArgs),
    /// Run a coordinator on its own: projects, runs and builds, driving the node at --node.
    Coordinator(crate::coordinator::CoordinatorArgs),
    /// Repositories the coordinator watches and builds.
    #[command(subcommand)]
    Project(crate::project::ProjectCommand),
    /// Build a revision or a patch with a project's builders (a try run).
    Try(crate::project::TryArgs),
    /// A project's secrets: set (from stdin), list, remove.
    #[command(subcommand)]
    Secret(crate::secret::SecretCommand),
    /// Runs: one change verified by every builder.
    #[command(subcommand)]
    Run(crate::run::RunCommand),
    /// Builds: one builder's work on one change (timeline, log, cancel, retry).
    #[command(subcommand)]
    Build(crate::run::BuildCommand),
    /// The build queue: the nodes the scheduler places on, and every waiting build with the reason
    /// it waits ("no node can run ...: 1 node has no image X", "all 3 runnable nodes are full").
    Queue,
    /// Run a node daemon: owns the sandboxes on this machine.
    Node(NodeCmd),
    /// Create and use sandboxes.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Long-lived apps on the node: install an envelope, start instances, update, revert, logs.
    #[command(subcommand)]
    App(crate::app::AppCommand),
    /// The name table: where nodes (and later apps) can be reached.
    #[command(subcommand)]
    Names(NamesCommand),
    /// Root filesystems sandboxes start from: import, pull from a registry, list, promote, delete.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Check that this machine can run sandboxes, and say how to fix what is missing.
    Doctor,
    /// Long-running requests (create, start, image import, git import): list, show, wait.
    #[command(subcommand, alias = "op")]
    Operation(OperationCommand),
    /// Follow the node's events (state changes, operation steps, janitor reaps) as they happen.
    Events {
        /// Resume after this event id (printed with --json).
        #[arg(long)]
        after: Option<u64>,
        /// Whose events: the node's (sandboxes, operations, apps), or the coordinator's
        /// (projects, runs, builds with every timeline step).
        #[arg(long, value_parser = ["node", "coordinator"], default_value = "node")]
        source: String,
    },
    /// Describe the node: OS, CPUs, memory, backends, images, sandbox counts.
    Info,
    /// The in-sandbox agent (started by the node; useful by hand for debugging).
    Agent(AgentArgs),
}

impl Command {
    pub fn is_daemon(&self) -> bool {
        matches!(
            self,
            Command::Dev(_)
                | Command::Coordinator(_)
                | Command::Node(NodeCmd { command: None, .. })
                | Command::Agent(_)
                | Command::Names(NamesCommand::Serve { .. })
        )
    }
}

/// `flotilla dev`: a node's options and the coordinator's.
#[derive(Debug, Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub coordinator: crate::coordinator::CoordinatorArgs,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeCmd {
    #[command(subcommand)]
    pub command: Option<NodeSub>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Keep SIZE microVMs of this image and shape booted; a matching `sandbox create --backend vm`
    /// (same image, --memory, --cpus, --disk; no --env, no network) claims one in milliseconds.
    /// SIZE 0 removes the pool.
    Set {
        /// `NAME:TAG` (pinned to its current version) or `dir:/path`.
        image: String,
        #[arg(long)]
        size: u32,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List warm pools: shape, size, ready and booting members.
    #[command(alias = "list")]
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum NodeSub {
    /// Warm pools of booted microVMs.
    #[command(subcommand)]
    Pool(Box<PoolCommand>),
    /// Prepare microVM guest assets now (kernel, initramfs, accelerator probe) instead of at the first
    /// `sandbox create --backend vm`.
    SetupVm {
        /// First build the guest kernel from Debian's linux-source-6.1 with Flotilla's small config
        /// (~5 minutes on 2 cores, once): it boots about twice as fast as the distribution's kernel.
        /// Nodes on this data directory use it from then on.
        #[arg(long)]
        build_kernel: bool,
        /// The kernel source tarball for --build-kernel.
        #[arg(long, default_value = flotilla_vm::kernel::DEFAULT_SOURCE, requires = "build_kernel")]
        kernel_source: PathBuf,
    },
    /// Replace the running node's binary without stopping a sandbox.
    ///
    /// The node stages the binary (checking --sha256), tries it in test mode, switches
    /// HOME/current to it and re-executes itself (same pid; sandboxes are re-adopted). If the new
    /// version fails its check after the switch, the previous one comes back by itself.
    Update(crate::update::UpdateArgs),
    /// Go back to the previous version (HOME/previous), handing over the same way.
    Revert(crate::update::RevertArgs),
    /// List the binary versions kept in the node's data directory, and the last hand-over.
    Versions,
    /// Guard a hand-over (started by the node itself): bring the old version back if the new one
    /// does not commit in time.
    #[command(hide = true)]
    Watchdog(crate::update::WatchdogArgs),
}

/// A node's own options. `--home`, `--names` and `--token` are global
/// options (see [`GlobalArgs`]); [`parse`] copies them in.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Data directory: the global `--home`.
    #[arg(skip)]
    pub home: Option<PathBuf>,
    /// Static flotilla binary to run as each microVM's init and as the agent of process sandboxes
    /// from images, so images without glibc work (default: this binary when it is static; for
    /// microVMs, else a static build in the cargo target directory).
    #[arg(long, env = "FLOTILLA_GUEST_AGENT")]
    pub guest_agent: Option<PathBuf>,
    /// Also serve the API over TCP with TLS and a bearer token on this address (e.g. 0.0.0.0:7443).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// TLS certificate (PEM) for --listen; a self-signed one is made in HOME/tls when absent.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Extra host name or address for the self-signed certificate (repeatable).
    #[arg(long = "tls-name")]
    pub tls_names: Vec<String>,
    /// Take a client certificate issued by this CA (PEM) in place of the bearer token, so a
    /// coordinator holding one (`--client-cert`) reaches this node with no per-node secret.
    #[arg(long, requires = "listen")]
    pub client_ca: Option<PathBuf>,
    /// Publish this node as `nodes/<id>` in the name table at this URL (`flotilla dev` runs its own):
    /// the global `--names`.
    #[arg(skip)]
    pub names: Option<String>,
    /// Bearer token for writes to the name table (the global `--names-token`): what the node
    /// publishes with, or for `dev`, what its own table requires.
    #[arg(skip)]
    pub names_token: Option<String>,
    /// Bearer token clients must send; generated into HOME/tls/token when absent: the global
    /// `--token` given on the command line, else $FLOTILLA_NODE_TOKEN.
    #[arg(skip)]
    pub token: Option<String>,
    /// At shutdown stop app instances' sandboxes too (by default they keep running, and the next
    /// start re-adopts them; other sandboxes are always stopped).
    #[arg(long)]
    pub stop_apps: bool,
    /// Let `outbound` sandboxes reach this range too (repeatable; e.g. a private package mirror,
    /// 10.1.2.0/24). By default they reach the internet and nothing of the host, the LAN
    /// (RFC 1918, CGNAT, ULA), link-local (the cloud metadata service) or multicast.
    #[arg(long = "egress-allow", value_name = "CIDR")]
    pub egress_allow: Vec<flotilla_sandbox::egress::Cidr>,
    /// Let sandboxes use a host directory under ROOT as their image (`--image dir:ROOT/...`;
    /// repeatable). Without it, `dir:` images are refused: import the directory instead.
    #[arg(long = "allow-image-dir", value_name = "ROOT")]
    pub allow_image_dirs: Vec<PathBuf>,
    /// Sandboxes this node keeps at once, stopped ones included (at most 16384: each has a uid
    /// range of its own); creates past it are refused until some are deleted.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=16384))]
    pub max_sandboxes: u32,
    /// Try this binary as an update candidate: serve only `GET /v1/node` and a self-test on --socket,
    /// touching no sandbox, store or cgroup (the node runs its candidates so).
    #[arg(long, hide = true, requires = "socket")]
    pub test_mode: bool,
    /// The side socket of --test-mode.
    #[arg(long, hide = true, requires = "test_mode")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Run as the sandbox's init (reap every orphan).
    #[arg(long)]
    pub init: bool,
    /// Serve on this inherited listening socket.
    #[arg(long)]
    pub listen_fd: Option<i32>,
    /// Serve on this Unix socket path.
    #[arg(long, conflicts_with = "listen_fd")]
    pub listen: Option<PathBuf>,
    /// Write one byte to this inherited fd once serving.
    #[arg(long)]
    pub ready_fd: Option<i32>,
    /// The workspace directory.
    #[arg(long, default_value = "/workspace")]
    pub workspace: PathBuf,
    /// Run as a microVM's PID 1: mount the disks, serve on the virtio-serial port.
    #[arg(long, requires = "init")]
    pub vm: bool,
    /// With --vm: only prove the kernel reached init, then power off (accelerator probe).
    #[arg(long, requires = "vm")]
    pub probe: bool,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and wait until its agent is up; prints its id.
    Create(CreateArgs),
    /// List sandboxes.
    #[command(alias = "list")]
    Ls,
    /// Show one sandbox, with the steps of its last boot.
    Show {
        /// Sandbox id or name.
        id: String,
    },
    /// Run a command in a sandbox, streaming its output; exits with its status, or with 125 when the
    /// sandbox stopped or its agent became unreachable before the command ended (the reason is printed).
    Exec(ExecArgs),
    /// Re-attach to a detached process's output (resumes after dropped connections); exits with the
    /// process's status, or 125 when the sandbox stopped or its agent became unreachable.
    Attach {
        id: String,
        /// Process id from `exec --detach` or `ps`.
        process: String,
        /// Output byte offset to resume from, counting stdout and stderr bytes (printed when a
        /// connection drops; `ps` shows the range kept).
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// List a sandbox's detached processes, with the range of output bytes kept (OUTPUT start..end:
    /// `attach --from` resumes at any offset in it).
    Ps { id: String },
    /// Send a signal to a detached process.
    Kill {
        id: String,
        process: String,
        #[arg(long, short, default_value = "TERM")]
        signal: String,
    },
    /// Open an interactive shell in a sandbox.
    Shell {
        id: String,
        /// Run this command on the terminal instead of a login shell.
        #[arg(long)]
        cmd: Option<String>,
    },
    /// Stream files into the workspace: a directory, .tar, .tar.gz, .tar.zst, or - (tar on stdin).
    Put {
        id: String,
        /// Destination directory inside the workspace.
        #[arg(long)]
        dir: Option<String>,
        #[arg(required_unless_present = "git")]
        src: Option<String>,
        /// Export a git revision instead: REPO[@REV], REPO a path or URL the node can read (REV default HEAD).
        #[arg(long, conflicts_with = "src")]
        git: Option<String>,
    },
    /// Stream the workspace (or a directory of it) out as a tar.
    Get {
        id: String,
        /// Directory inside the workspace.
        #[arg(long)]
        dir: Option<String>,
        /// Output file, or - for stdout (the default when stdout is not a terminal).
        #[arg(short = 'o', long)]
        output: Option<String>,
    },
    /// List a directory of the workspace.
    Files {
        id: String,
        #[arg(long)]
        dir: Option<String>,
    },
    /// Stop a sandbox; its workspace is kept. Always works, and repeating it is harmless.
    Stop(IdArgs),
    /// Start a stopped sandbox.
    Start(IdArgs),
    /// Stop and start a sandbox.
    Restart(IdArgs),
    /// Delete a sandbox and its workspace.
    #[command(alias = "delete")]
    Rm(IdArgs),
    /// Change labels, deadline or limits (limits apply live).
    Set(SetArgs),
}

#[derive(Debug, Subcommand)]
pub enum NamesCommand {
    /// Serve a name table over HTTP (in memory, or on etcd with --etcd). Reads are open; writes need
    /// the bearer token (--names-token, else generated into HOME/names.token).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
        /// etcd endpoints (repeatable); TTLs become etcd leases. In memory when absent.
        #[arg(long = "etcd")]
        etcd: Vec<String>,
        /// Key prefix in etcd.
        #[arg(long, default_value = "/flotilla/names/")]
        etcd_prefix: String,
        /// For `https://` etcd endpoints: the CA (PEM) that issued etcd's certificate (default: the
        /// system's bundle).
        #[arg(long, value_name = "FILE")]
        etcd_ca: Option<PathBuf>,
        /// The client certificate (PEM) to show etcd (`etcd --client-cert-auth`); with --etcd-key.
        #[arg(long, value_name = "FILE", requires = "etcd_key")]
        etcd_cert: Option<PathBuf>,
        /// The private key (PEM) of --etcd-cert.
        #[arg(long, value_name = "FILE", requires = "etcd_cert")]
        etcd_key: Option<PathBuf>,
        /// Serve over TLS even on loopback (beyond loopback it always does, unless --no-tls): a
        /// self-signed certificate in HOME/tls unless --tls-cert/--tls-key are given. Clients use the
        /// printed `https://ADDR#sha256=FINGERPRINT` as --names.
        #[arg(long, conflicts_with = "no_tls")]
        tls: bool,
        /// Plain HTTP beyond loopback (behind a proxy that terminates TLS): the write token then
        /// crosses the network in clear.
        #[arg(long)]
        no_tls: bool,
        /// TLS certificate (PEM) to serve instead of the self-signed one.
        #[arg(long, requires = "tls_key", conflicts_with = "no_tls")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM) for --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// List mounted names matching PATTERN (`*` one element, `...` any number; default `...`).
    #[command(alias = "list")]
    Ls { pattern: Option<String> },
    /// Resolve NAME: the servers at its longest mounted prefix, and the rest of the name.
    Resolve { name: String },
    /// Mount SERVER under NAME for --ttl.
    Mount {
        name: String,
        server: String,
        #[arg(long, value_parser = parse_duration, default_value = "1m")]
        ttl: std::time::Duration,
    },
    /// Unmount SERVER from NAME.
    Unmount { name: String, server: String },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List images (tags, their digests and which sandboxes use them).
    #[command(alias = "list")]
    Ls,
    /// Show one image.
    Show { reference: String },
    /// Import NAME:TAG from a directory, a rootfs tarball (.tar/.tar.gz/.tar.zst),
    /// an OCI image layout (directory or tar) or a `docker save` archive on the node's host.
    Import {
        reference: String,
        path: PathBuf,
        /// Print the operation id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Pull an image from an OCI registry (Docker Registry v2 / OCI distribution).
    ///
    /// SOURCE is HOST[:PORT]/REPOSITORY[:TAG] or HOST[:PORT]/REPOSITORY@sha256:HEX; without a
    /// host it is Docker Hub, without a tag `latest`. The node downloads it (over HTTPS, checked
    /// against the system's trust store), picks the linux manifest for its architecture from a
    /// multi-platform index, verifies every layer's digest and stores it as NAME:TAG (default:
    /// the repository's last part and the tag, e.g. registry.example.com/team/app:1 → app:1).
    ///
    /// Credentials: --username plus the password on standard input (--password-stdin) or in
    /// FLOTILLA_REGISTRY_PASSWORD. They are used for this pull only and never stored or logged.
    #[command(after_help = "Examples:\n  \
        flotilla image pull registry.example.com/team/app:1\n  \
        flotilla image pull --plain-http 127.0.0.1:5000/team/app:1 --as app:dev\n  \
        echo \"$TOKEN\" | flotilla image pull ghcr.io/org/img:2 --username bot --password-stdin")]
    Pull {
        /// HOST[:PORT]/REPOSITORY[:TAG|@sha256:HEX].
        source: String,
        /// Store it as NAME:TAG instead of the default.
        #[arg(long = "as", value_name = "NAME:TAG")]
        reference: Option<String>,
        /// Speak plain HTTP to this registry (a local registry without TLS).
        #[arg(long)]
        plain_http: bool,
        /// Registry user name; the password comes from --password-stdin or FLOTILLA_REGISTRY_PASSWORD.
        #[arg(long, value_name = "USER")]
        username: Option<String>,
        /// Read the registry password from standard input (one line).
        #[arg(long, requires = "username")]
        password_stdin: bool,
        /// Print the operation id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Point another tag (default NAME:latest) at the version NAME:TAG names.
    Promote {
        reference: String,
        /// The tag to move.
        #[arg(long)]
        to: Option<String>,
    },
    /// Delete tags (refused while a sandbox uses the version).
    #[command(alias = "delete")]
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum OperationCommand {
    /// Operations the node keeps (24 hours), newest first.
    #[command(alias = "list")]
    Ls,
    /// Show one operation with its steps.
    Show { id: String },
    /// Wait for an operation to finish (also across a node restart); exits 1 if it failed.
    Wait {
        id: String,
        /// Give up after this long.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<std::time::Duration>,
    },
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// Sandbox ids or names.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// `host` (the host's system directories, read-only), `dir:/path` (a root filesystem directory)
    /// or an imported image `NAME:TAG`. A `vm` needs an image with its own root filesystem.
    #[arg(long, default_value = "host")]
    pub image: String,
    /// Isolation backend: `process` (namespaces, cgroups, seccomp) or `vm` (a QEMU microVM with its own kernel).
    #[arg(long, default_value = "process", value_parser = ["process", "vm"])]
    pub backend: String,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Delete the sandbox after this long (e.g. 30m, 2h).
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<std::time::Duration>,
    /// Delete the sandbox after this long without an exec, put, get or session.
    #[arg(long, value_parser = parse_duration)]
    pub idle_ttl: Option<std::time::Duration>,
    /// Print the operation id and return at once instead of waiting for the agent.
    #[arg(long)]
    pub no_wait: bool,
    /// A unique name; usable wherever an id is.
    #[arg(long)]
    pub name: Option<String>,
    /// Label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_kv)]
    pub labels: Vec<(String, String)>,
    /// Environment KEY=VALUE for every command in the sandbox (repeatable).
    #[arg(long = "env", value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// `none` (loopback only), `outbound` (NAT: pasta or slirp4netns for processes, passt for microVMs) or `tap`
    /// (microVMs: a TAP on the node bridge flotilla0, 10.213.0.0/24, reachable from the host).
    #[arg(long, default_value = "none", value_parser = ["none", "outbound", "tap"])]
    pub network: String,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    pub id: String,
    /// Working directory (default /workspace).
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Kill the command (and everything it started) after this long.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Start it in the background; prints its process id for `attach`.
    #[arg(long)]
    pub detach: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    pub id: String,
    /// New deadline counted from now; 0 removes it.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<std::time::Duration>,
    /// New idle TTL (renews the deadline now); 0 removes it.
    #[arg(long, value_parser = parse_duration)]
    pub idle_ttl: Option<std::time::Duration>,
    /// Label KEY=VALUE; KEY= removes it (repeatable).
    #[arg(long = "label", value_parser = parse_kv)]
    pub labels: Vec<(String, String)>,
    /// New limits, applied live to a running sandbox.
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Resource limits, shared by `create` and `set`.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// CPU quota in cores (e.g. 0.5, 2).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory limit (e.g. 512M, 2G).
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Maximum number of processes and threads.
    #[arg(long)]
    pub pids: Option<u64>,
    /// What the sandbox may write (e.g. 8G; sparse): a microVM's workspace disk; for a process
    /// sandbox a filesystem of that size under its workspace and copy-on-write root, and the cap
    /// of each tmpfs (/tmp, /root, /dev/shm). Past it, writes fail with ENOSPC.
    #[arg(long, value_parser = parse_size)]
    pub disk: Option<u64>,
}

impl LimitArgs {
    /// The limits as the API takes them; `None` when none was given.
    pub fn resources(&self) -> Option<flotilla_api::Resources> {
        (self.cpus.is_some() || self.memory.is_some() || self.pids.is_some() || self.disk.is_some()).then_some(
            flotilla_api::Resources {
                cpus: self.cpus,
                memory_bytes: self.memory,
                pids: self.pids,
                disk_bytes: self.disk,
            },
        )
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if k.is_empty() {
        return Err(format!("empty key in {s:?}"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn parse_size(s: &str) -> Result<u64, String> {
    flotilla_api::units::parse_size(s)
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    flotilla_api::units::parse_duration(s)
}

/// Parses the command line (as `Cli::parse_from`), then hands a node
/// (`node`, `dev`) the global options it shares: `--home` and `--names`
/// as given, and `--token` only when given on the command line: from the
/// environment a node reads `$FLOTILLA_NODE_TOKEN`, never the clients'
/// `$FLOTILLA_TOKEN`.
pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches_from(args);
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut Cli::command()).exit());
    let token_given = matches.value_source("token") == Some(clap::parser::ValueSource::CommandLine);
    let g = &cli.global.node;
    if let Command::Dev(DevArgs { daemon: d, .. }) | Command::Node(NodeCmd { command: None, daemon: d }) =
        &mut cli.command
    {
        d.home = g.home.clone();
        d.names = g.names.clone();
        d.names_token = g.names_token.clone();
        d.token = if token_given {
            g.token.clone()
        } else {
            std::env::var("FLOTILLA_NODE_TOKEN").ok().filter(|t| !t.is_empty())
        };
    }
    cli
}

/// Runs a command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let GlobalArgs { node, json } = cli.global;
    match cli.command {
        Command::Dev(DevArgs { daemon, coordinator }) => crate::daemon::node(daemon, Some(coordinator)),
        Command::Coordinator(a) => crate::coordinator::run(a, node),
        Command::Project(cmd) => crate::sandbox::block_on(crate::project::run(cmd, node, json)),
        Command::Try(a) => crate::sandbox::block_on(crate::project::try_change(a, node, json)),
        Command::Secret(cmd) => crate::sandbox::block_on(crate::secret::run(cmd, node, json)),
        Command::Run(cmd) => crate::sandbox::block_on(crate::run::run(cmd, node, json)),
        Command::Build(cmd) => crate::sandbox::block_on(crate::run::build(cmd, node, json)),
        Command::Queue => crate::sandbox::block_on(crate::queue::show(node, json)),
        Command::Node(NodeCmd { command: None, daemon }) => crate::daemon::node(daemon, None),
        Command::Node(NodeCmd { command: Some(NodeSub::SetupVm { build_kernel, kernel_source }), .. }) => {
            crate::daemon::setup_vm(default_home(node.home), build_kernel.then_some(kernel_source), json)
        }
        Command::Node(NodeCmd { command: Some(NodeSub::Pool(cmd)), .. }) => {
            crate::sandbox::block_on(crate::sandbox::pool(*cmd, node, json))
        }
        Command::Node(NodeCmd { command: Some(NodeSub::Update(a)), .. }) => {
            crate::sandbox::block_on(crate::update::update(a, node, json))
        }
        Command::Node(NodeCmd { command: Some(NodeSub::Revert(a)), .. }) => {
            crate::sandbox::block_on(crate::update::revert(a, node, json))
        }
        Command::Node(NodeCmd { command: Some(NodeSub::Versions), .. }) => crate::update::versions(&node, json),
        Command::Node(NodeCmd { command: Some(NodeSub::Watchdog(a)), .. }) => {
            crate::update::watchdog(a, default_home(node.home))
        }
        Command::Agent(a) => crate::daemon::agent(a),
        Command::Info => crate::sandbox::block_on(crate::sandbox::info(node, json)),
        Command::Operation(cmd) => crate::sandbox::block_on(crate::ops::run(cmd, node, json)),
        Command::Image(cmd) => crate::sandbox::block_on(crate::image::run(cmd, node, json)),
        Command::Names(NamesCommand::Serve {
            listen,
            etcd,
            etcd_prefix,
            etcd_ca,
            etcd_cert,
            etcd_key,
            tls,
            no_tls,
            tls_cert,
            tls_key,
        }) => {
            // As the coordinator's listener: TLS unless it stays on loopback.
            let on = tls || tls_cert.is_some() || (!no_tls && !listen.ip().is_loopback());
            if !on && !listen.ip().is_loopback() {
                eprintln!(
                    "flotilla: warning: the name table serves plain HTTP on {listen} (--no-tls): its write token crosses the network in clear"
                );
            }
            let tls = on.then_some(crate::names::Tls { cert: tls_cert, key: tls_key });
            let etcd_tls = flotilla_names::EtcdTls { ca: etcd_ca, identity: etcd_cert.zip(etcd_key) };
            crate::names::serve(listen, etcd, etcd_prefix, etcd_tls, tls, &node)
        }
        Command::Names(cmd) => crate::sandbox::block_on(crate::names::run(cmd, node, json)),
        Command::Doctor => crate::doctor::run(&default_home(node.home), json),
        Command::Events { after, source } => {
            crate::sandbox::block_on(crate::ops::events(node, after, source == "coordinator", json))
        }
        Command::Sandbox(cmd) => crate::sandbox::block_on(crate::sandbox::run(cmd, node, json)),
        Command::App(cmd) => crate::sandbox::block_on(crate::app::run(cmd, node, json)),
    }
}

/// The data directory: `--home`, `$FLOTILLA_HOME`, else the XDG data dir.
pub fn default_home(home: Option<PathBuf>) -> PathBuf {
    if let Some(h) = home {
        return h;
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("flotilla");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/flotilla")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Cli {
        super::parse(args.split(' ').map(std::ffi::OsString::from))
    }

    #[test]
    fn the_parser_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_before_or_after_the_subcommand() {
        for line in [
            "flotilla --home /h --json sandbox ls",
            "flotilla sandbox ls --home /h --json",
            "flotilla sandbox --json ls --home /h",
            "flotilla --json sandbox ls --home /h",
        ] {
            let cli = parse(line);
            assert!(matches!(cli.command, Command::Sandbox(SandboxCommand::Ls)), "{line}");
            assert_eq!(cli.global.node.home.as_deref(), Some(std::path::Path::new("/h")), "{line}");
            assert!(cli.global.json, "{line}");
        }
        let cli = parse("flotilla --node unix:///n.sock --token t image ls");
        assert_eq!(cli.global.node.node.as_deref(), Some("unix:///n.sock"));
        assert_eq!(cli.global.node.token.as_deref(), Some("t"));
        let cli = parse("flotilla doctor --home /d");
        assert_eq!(cli.global.node.home.as_deref(), Some(std::path::Path::new("/d")));
        assert!(!cli.global.json);
    }

    #[test]
    fn a_node_gets_its_home_names_and_token_from_the_global_options() {
        for line in [
            "flotilla node --home /h --names http://n:1 --token t --names-token nt",
            "flotilla --home /h --names http://n:1 --names-token nt --token t dev",
        ] {
            let (Command::Node(NodeCmd { daemon: d, .. }) | Command::Dev(DevArgs { daemon: d, .. })) =
                parse(line).command
            else {
                panic!("{line}: not a node");
            };
            assert_eq!(d.home.as_deref(), Some(std::path::Path::new("/h")), "{line}");
            assert_eq!(d.names.as_deref(), Some("http://n:1"), "{line}");
            assert_eq!(d.token.as_deref(), Some("t"), "{line}");
            assert_eq!(d.names_token.as_deref(), Some("nt"), "{line}");
        }
        let cli = parse("flotilla names mount a s --names-token nt");
        assert_eq!(cli.global.node.names_token.as_deref(), Some("nt"));
    }
}
