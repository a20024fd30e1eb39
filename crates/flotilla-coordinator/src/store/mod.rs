//! The coordinator's store: projects (with their offload record), the
//! project managers' state and event boxes, the outbox, runs, builds,
//! timelines and logs.
//!
//! The logic is written once over [`Conn`] and runs the same statements on
//! SQLite (the embedded default) and PostgreSQL (several coordinators on one
//! database). Each public method is one short transaction on a blocking
//! thread; the invariants that make crashes harmless live in them:
//!
//! - [`Store::commit_step`] checks the manager's `eversion`, pops the
//!   consumed events, saves the state, writes the log row and records the
//!   actions in the outbox, all or nothing.
//! - [`Store::create_run`] re-checks the offload record (status, config
//!   hash), is idempotent by operation id, deletes its outbox row and puts
//!   `run_created` in the box, all or nothing.
//! - [`Store::append_log`] stores a chunk of output together with the
//!   process offset it reaches, so a re-attach resumes exactly there: no
//!   gap, no repeat.
//! - [`Store::finish_build`] finishes the run when its last build finishes
//!   and puts `run_finished` in the box in the same transaction.

pub mod conn;
mod pg_tls;
mod postgres;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use flotilla_api::Timestamp;
use flotilla_api::coordinator::{
    Build, BuildFailure, Change, ChangeKind, Project, ProjectLogEntry, ProjectStatus, Run, RunState, TimelineEntry,
};
use tokio::sync::Semaphore;

pub use conn::{Conn, Dialect, Row, SqlError, SqliteConn, Value};

use crate::pm::{Action, Event, Listed, Outcome, State};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database")]
    Sql(#[from] SqlError),
    #[error("stored JSON is damaged")]
    Json(#[from] serde_json::Error),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the store's worker thread failed: {0}")]
    Join(String),
    /// The build is no longer this coordinator's (its lease lapsed and a
    /// peer adopted it): the write was refused.
    #[error("build {0} is run by another coordinator now")]
    Fenced(u64),
}

/// The schema, with `{serial}` (an auto-increment primary key) and `{blob}`
/// filled in per dialect. Column names avoid words reserved in either.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS projects (
    name TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    branch TEXT NOT NULL,
    status TEXT NOT NULL,
    poll_interval_ms BIGINT NOT NULL,
    webhook_secret TEXT,
    config_hash TEXT,
    config_error TEXT,
    builders TEXT NOT NULL DEFAULT '[]',
    branches TEXT NOT NULL DEFAULT '[]',
    heads TEXT NOT NULL DEFAULT '{}',
    polled_at BIGINT,
    poll_error TEXT,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS pm_state (
    project TEXT PRIMARY KEY,
    eversion BIGINT NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pm_events (
    seq {serial},
    project TEXT NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (project, id)
);
CREATE TABLE IF NOT EXISTS pm_log (
    project TEXT NOT NULL,
    eversion BIGINT NOT NULL,
    at BIGINT NOT NULL,
    reasons TEXT NOT NULL,
    PRIMARY KEY (project, eversion)
);
CREATE TABLE IF NOT EXISTS outbox (
    id {serial},
    project TEXT NOT NULL,
    action TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS configs (
    hash TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id {serial},
    project TEXT NOT NULL,
    op_id TEXT NOT NULL,
    change_id TEXT NOT NULL,
    change TEXT NOT NULL,
    state TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    error TEXT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT,
    UNIQUE (project, op_id)
);
CREATE TABLE IF NOT EXISTS builds (
    id {serial},
    run_id BIGINT NOT NULL,
    project TEXT NOT NULL,
    builder TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    retry_of BIGINT,
    retry_reason TEXT,
    superseded BIGINT NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    rev TEXT NOT NULL,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    sandbox TEXT,
    step TEXT,
    step_index BIGINT NOT NULL DEFAULT 0,
    proc_offset BIGINT NOT NULL DEFAULT 0,
    source_written BIGINT NOT NULL DEFAULT 0,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    owner TEXT,
    node TEXT,
    failure TEXT,
    log_bytes BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX IF NOT EXISTS builds_by_run ON builds (run_id);
CREATE INDEX IF NOT EXISTS builds_by_state ON builds (state);
CREATE TABLE IF NOT EXISTS timeline (
    seq {serial},
    build_id BIGINT NOT NULL,
    at BIGINT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS timeline_by_build ON timeline (build_id);
CREATE TABLE IF NOT EXISTS log_chunks (
    build_id BIGINT NOT NULL,
    start BIGINT NOT NULL,
    data {blob} NOT NULL,
    PRIMARY KEY (build_id, start)
);
CREATE TABLE IF NOT EXISTS node_locks (
    node TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS reservations (
    build_id BIGINT PRIMARY KEY,
    node TEXT NOT NULL,
    millicpus BIGINT NOT NULL,
    memory_bytes BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_node ON reservations (node);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    sealed {blob} NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (project, name)
);
CREATE TABLE IF NOT EXISTS try_patches (
    sha TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    base TEXT NOT NULL,
    patch TEXT NOT NULL,
    message TEXT NOT NULL,
    date BIGINT NOT NULL,
    at BIGINT NOT NULL
);
";

/// Columns added after a table was first created: (table, column, type).
/// `CREATE TABLE IF NOT EXISTS` leaves an existing table as it was, so a
/// store made by an older version gets them here.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("projects", "commits", "TEXT"),
    ("builds", "lease_until", "BIGINT"),
    // 1: `data` is a zstd frame; NULL or 0: the bytes as printed.
    ("log_chunks", "enc", "BIGINT"),
];

/// A log chunk's `enc` when its data is zstd-compressed.
const ENC_ZSTD: i64 = 1;

/// A log chunk as stored: zstd (level 1, a few hundred MB/s) when that
/// saves a tenth or more, else the bytes as they are.
fn encode_chunk(data: Vec<u8>) -> (Vec<u8>, i64) {
    match zstd::bulk::compress(&data, 1) {
        Ok(z) if z.len() < data.len() - data.len() / 10 => (z, ENC_ZSTD),
        _ => (data, 0),
    }
}

fn decode_chunk(data: Vec<u8>, enc: Option<i64>) -> Result<Vec<u8>, StoreError> {
    match enc {
        Some(ENC_ZSTD) => zstd::stream::decode_all(&data[..])
            .map_err(|e| StoreError::Invalid(format!("a log chunk does not decompress: {e}"))),
        _ => Ok(data),
    }
}

/// Adds the [`ADDED_COLUMNS`] a store lacks.
fn add_columns(c: &mut dyn Conn, d: Dialect) -> Result<(), SqlError> {
    for (table, column, ty) in ADDED_COLUMNS {
        match d {
            Dialect::Postgres => c.batch(&format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {ty}"))?,
            Dialect::Sqlite => {
                let has = c.query(
                    "SELECT 1 FROM pragma_table_info($1) WHERE name = $2",
                    &[table.to_string().into(), column.to_string().into()],
                )?;
                if has.is_empty() {
                    c.batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))?;
                }
            }
        }
    }
    Ok(())
}

fn schema(d: Dialect) -> String {
    let (serial, blob) = match d {
        Dialect::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB"),
        Dialect::Postgres => ("BIGSERIAL PRIMARY KEY", "BYTEA"),
    };
    SCHEMA.replace("{serial}", serial).replace("{blob}", blob)
}

type Opener = dyn Fn() -> Result<Box<dyn Conn>, SqlError> + Send + Sync;

/// The store: a small pool of connections, each call on a blocking thread.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Notification payloads ([`Store::listen`]): a project's box has events
/// (`box:PROJECT`), builds were queued or room freed, a cancel was asked.
pub const NOTE_BOX: &str = "box:";
pub const NOTE_QUEUE: &str = "queue";
pub const NOTE_CANCEL: &str = "cancel";

struct Inner {
    /// PostgreSQL's address, for [`Store::listen`]'s own connection.
    url: Option<String>,
    dialect: Dialect,
    idle: Mutex<Vec<Box<dyn Conn>>>,
    permits: Semaphore,
    open: Box<Opener>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dialect", &self.inner.dialect).finish()
    }
}

/// A build's share of its node and the node's capacity, reserved as it is
/// claimed ([`Store::claim_within`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub millicpus: u64,
    pub memory_bytes: u64,
    pub node_millicpus: u64,
    pub node_memory_bytes: u64,
}

/// How a claim ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Claimed,
    /// Not queued any more (claimed by another coordinator, canceled).
    Taken,
    /// The running builds reserved on the node leave no room for it.
    Full {
        used_millicpus: u64,
        used_memory_bytes: u64,
    },
}

/// What a new project starts with.
#[derive(Debug, Clone)]
pub struct NewProject {
    pub name: String,
    pub repo: String,
    pub branch: String,
    pub poll_interval_ms: u64,
    pub webhook_secret: Option<String>,
}

/// What the poller last saw of a project.
#[derive(Debug, Clone, Default)]
pub struct PollResult {
    pub heads: BTreeMap<String, String>,
    pub error: Option<String>,
    pub config_error: Option<String>,
    /// The current config's builders and watched branches, when it parsed.
    pub builders: Option<Vec<String>>,
    pub branches: Option<Vec<String>>,
    /// Which commits of a push get a run (`all` or `head`).
    pub commits: Option<String>,
}

/// A build to create with a run: its builder's name and spec (JSON, the
/// executor's input).
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub builder: String,
    pub spec: String,
}

/// How a run creation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    Run(u64),
    /// The operation had already created this run.
    Existing(u64),
    /// The offload record says no (project removed, config changed); the
    /// manager is poked to decide again.
    Refused(String),
}

/// What an executor needs to resume a build.
#[derive(Debug, Clone)]
pub struct BuildWork {
    pub id: u64,
    pub run_id: u64,
    pub project: String,
    pub builder: String,
    pub attempt: u32,
    pub retry_reason: Option<String>,
    pub state: RunState,
    pub rev: String,
    pub kind: ChangeKind,
    pub spec: String,
    pub sandbox: Option<String>,
    pub step_index: usize,
    pub proc_offset: u64,
    pub source_written: bool,
    pub cancel_requested: bool,
    pub log_bytes: u64,
    /// The node it was placed on (by name in the coordinator's fleet).
    pub node: Option<String>,
    /// The coordinator running it.
    pub owner: Option<String>,
}

/// A running build this coordinator holds the lease of, as the renewal
/// found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewed {
    pub id: u64,
    /// Still ours: the lease was extended. When false, a peer adopted it
    /// (or it ended): the executor must stop acting on it.
    pub held: bool,
    /// A cancel was asked for, perhaps through another coordinator.
    pub cancel_requested: bool,
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub runs: u64,
    pub builds: u64,
    pub pm_log: u64,
    pub try_patches: u64,
}

/// A try patch as it was accepted: any coordinator makes the same commit
/// from it ([`crate::git::Mirror::apply_patch`]) when its mirror lacks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryPatch {
    /// The commit it made.
    pub sha: String,
    pub project: String,
    pub base: String,
    pub patch: String,
    pub message: String,
    /// The commit's date, Unix seconds.
    pub date: u64,
}

/// A slice of a build's log.
#[derive(Debug, Clone)]
pub struct LogSlice {
    pub data: Vec<u8>,
    /// Bytes stored so far.
    pub total: u64,
    /// The build is final: nothing more will be stored.
    pub done: bool,
}

fn now() -> i64 {
    Timestamp::now().0 as i64
}

fn ts(v: &Value) -> Result<Option<Timestamp>, SqlError> {
    Ok(v.opt_int()?.map(|t| Timestamp(t as u64)))
}

fn state_of(v: &Value) -> Result<RunState, StoreError> {
    let s = v.text()?;
    RunState::parse(&s).ok_or_else(|| StoreError::Invalid(format!("unknown state {s:?}")))
}

impl Store {
    /// The embedded store: SQLite at `path` (one connection; WAL).
    pub fn sqlite(path: &Path) -> Result<Store, StoreError> {
        let path = path.to_path_buf();
        Store::with_opener(
            Dialect::Sqlite,
            1,
            Box::new(move || Ok(Box::new(SqliteConn::open(&path)?) as Box<dyn Conn>)),
        )
    }

    /// PostgreSQL at `url` (`postgres://user@host:port/db`), with up to
    /// `max` connections.
    pub fn postgres(url: &str, max: usize) -> Result<Store, StoreError> {
        let open = url.to_string();
        let mut s = Store::with_opener(
            Dialect::Postgres,
            max,
            Box::new(move || Ok(Box::new(postgres::PgConn::connect(&open)?) as Box<dyn Conn>)),
        )?;
        Arc::get_mut(&mut s.inner).expect("a new store is not shared").url = Some(url.to_string());
        Ok(s)
    }

    /// What other coordinators on this database just did, as it commits
    /// (PostgreSQL `LISTEN`): [`NOTE_BOX`]`PROJECT`, [`NOTE_QUEUE`],
    /// [`NOTE_CANCEL`], and an empty note whenever the listening connection
    /// was (re)made, after which the receiver should look at everything.
    /// `None` on SQLite.
    pub fn listen(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        let url = self.inner.url.clone()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        postgres::listen(url, tx);
        Some(rx)
    }

    /// A store over connections from `open`; creates the schema.
    pub fn with_opener(dialect: Dialect, max: usize, open: Box<Opener>) -> Result<Store, StoreError> {
        let mut first = open()?;
        first.batch(&schema(dialect)).or_else(|e| match (dialect, &e) {
            // Two coordinators creating the schema at once on PostgreSQL:
            // the loser's CREATE races the winner's; the schema is there.
            (Dialect::Postgres, SqlError::Postgres(m)) if m.contains("already exists") => Ok(()),
            _ => Err(e),
        })?;
        add_columns(first.as_mut(), dialect).or_else(|e| match (dialect, &e) {
            // The same race for an added column.
            (Dialect::Postgres, SqlError::Postgres(m)) if m.contains("already exists") => Ok(()),
            _ => Err(e),
        })?;
        Ok(Store {
            inner: Arc::new(Inner {
                url: None,
                dialect,
                idle: Mutex::new(vec![first]),
                permits: Semaphore::new(max.max(1)),
                open,
            }),
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.inner.dialect
    }

    /// Runs `f` with a connection on a blocking thread.
    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Conn) -> Result<T, StoreError> + Send + 'static,
    {
        let _permit = self.inner.permits.acquire().await.map_err(|e| StoreError::Join(e.to_string()))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let taken = inner.idle.lock().expect("idle connections").pop();
            let mut conn = match taken {
                Some(c) => c,
                None => (inner.open)()?,
            };
            let out = f(conn.as_mut());
            // A connection whose transaction failed half-way is rolled back
            // before it is reused; one that cannot be is dropped.
            let healthy = match &out {
                Ok(_) => true,
                Err(StoreError::Sql(SqlError::Postgres(_))) => conn.rollback().is_ok(),
                Err(_) => true,
            };
            if healthy {
                inner.idle.lock().expect("idle connections").push(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Runs `f` in a transaction: committed if it returns `Ok`, rolled back
    /// otherwise.
    async fn tx<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Conn) -> Result<T, StoreError> + Send + 'static,
    {
        self.with(move |c| {
            c.begin()?;
            match f(c) {
                Ok(v) => {
                    c.commit()?;
                    Ok(v)
                }
                Err(e) => {
                    let _ = c.rollback();
                    Err(e)
                }
            }
        })
        .await
    }

    // ------------------------------------------------------------ projects

    pub async fn add_project(&self, p: NewProject) -> Result<Project, StoreError> {
        let name = p.name.clone();
        self.tx(move |c| {
            let n = c.execute(
                "INSERT INTO projects (name, repo, branch, status, poll_interval_ms, webhook_secret, created_at, branches)
                 VALUES ($1, $2, $3, 'enabled', $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
                &[
                    p.name.as_str().into(),
                    p.repo.as_str().into(),
                    p.branch.as_str().into(),
                    p.poll_interval_ms.into(),
                    p.webhook_secret.clone().into(),
                    now().into(),
                    serde_json::to_string(&[&p.branch])?.into(),
                ],
            )?;
            if n == 0 {
                // A removed project's name can be taken again.
                let st = c.query("SELECT status FROM projects WHERE name = $1", &[p.name.as_str().into()])?;
                if st.first().map(|r| r[0].text()).transpose()?.as_deref() != Some("removed") {
                    return Err(StoreError::Exists(format!("project {}", p.name)));
                }
                c.execute(
                    "UPDATE projects SET repo = $2, branch = $3, status = 'enabled', poll_interval_ms = $4,
                     webhook_secret = $5, config_hash = NULL, config_error = NULL, builders = '[]', branches = $6,
                     heads = '{}', polled_at = NULL, poll_error = NULL WHERE name = $1",
                    &[
                        p.name.as_str().into(),
                        p.repo.as_str().into(),
                        p.branch.as_str().into(),
                        p.poll_interval_ms.into(),
                        p.webhook_secret.clone().into(),
                        serde_json::to_string(&[&p.branch])?.into(),
                    ],
                )?;
                // The manager starts afresh, its eversion (and log) going on.
                c.execute("UPDATE pm_state SET state = '{}' WHERE project = $1", &[p.name.as_str().into()])?;
                c.execute("DELETE FROM pm_events WHERE project = $1", &[p.name.as_str().into()])?;
            }
            c.execute(
                "INSERT INTO pm_state (project, eversion, state) VALUES ($1, 0, '{}') ON CONFLICT (project) DO NOTHING",
                &[p.name.as_str().into()],
            )?;
            Ok(())
        })
        .await?;
        self.project(&name).await?.ok_or_else(|| StoreError::NotFound(format!("project {name}")))
    }

    const PROJECT_COLS: &str = "p.name, p.repo, p.branch, p.status, p.poll_interval_ms, p.webhook_secret, p.config_hash, \
        p.config_error, p.builders, p.branches, p.heads, p.polled_at, p.poll_error, p.created_at, s.eversion, p.commits";

    fn project_row(r: &Row) -> Result<Project, StoreError> {
        Ok(Project {
            name: r[0].text()?,
            repo: r[1].text()?,
            status: match r[3].text()?.as_str() {
                "removed" => ProjectStatus::Removed,
                _ => ProjectStatus::Enabled,
            },
            poll_interval_s: (r[4].int()? as u64).div_ceil(1000),
            webhook: r[5].opt_text()?.is_some(),
            config_hash: r[6].opt_text()?,
            config_error: r[7].opt_text()?,
            builders: serde_json::from_str(&r[8].text()?)?,
            branches: serde_json::from_str(&r[9].text()?)?,
            heads: serde_json::from_str(&r[10].text()?)?,
            polled_at: ts(&r[11])?,
            poll_error: r[12].opt_text()?,
            created_at: Timestamp(r[13].int()? as u64),
            eversion: r[14].opt_int()?.unwrap_or(0) as u64,
            commits: r[15].opt_text()?,
        })
    }

    pub async fn project(&self, name: &str) -> Result<Option<Project>, StoreError> {
        let name = name.to_string();
        self.with(move |c| {
            let rows = c.query(
                &format!(
                    "SELECT {} FROM projects p LEFT JOIN pm_state s ON s.project = p.name WHERE p.name = $1",
                    Self::PROJECT_COLS
                ),
                &[name.into()],
            )?;
            rows.first().map(Self::project_row).transpose()
        })
        .await
    }

    /// Every project (removed ones too, so `ls` can say so).
    pub async fn projects(&self) -> Result<Vec<Project>, StoreError> {
        self.with(move |c| {
            let rows = c.query(
                &format!(
                    "SELECT {} FROM projects p LEFT JOIN pm_state s ON s.project = p.name ORDER BY p.name",
                    Self::PROJECT_COLS
                ),
                &[],
            )?;
            rows.iter().map(Self::project_row).collect()
        })
        .await
    }

    /// The project's default branch and poll interval, for its poller.
    pub async fn project_branch(&self, name: &str) -> Result<Option<(String, u64)>, StoreError> {
        let name = name.to_string();
        self.with(move |c| {
            let rows = c.query("SELECT branch, poll_interval_ms FROM projects WHERE name = $1", &[name.into()])?;
            rows.first().map(|r| Ok((r[0].text()?, r[1].int()? as u64))).transpose()
        })
        .await
    }

    pub async fn webhook_secret(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = name.to_string();
        self.with(move |c| {
            let rows = c.query("SELECT webhook_secret FROM projects WHERE name = $1", &[name.into()])?;
            Ok(rows.first().map(|r| r[0].opt_text()).transpose()?.flatten())
        })
        .await
    }

    /// `project rm`: no new runs (the offload record's status).
    pub async fn remove_project(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_string();
        self.tx(move |c| {
            let n = c.execute(
                "UPDATE projects SET status = 'removed' WHERE name = $1 AND status = 'enabled'",
                &[name.as_str().into()],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("project {name}")));
            }
            // Its secrets go with it: a project added again under this name
            // (by anyone) starts with none.
            c.execute("DELETE FROM secrets WHERE project = $1", &[name.as_str().into()])?;
            Ok(())
        })
        .await
    }

    /// Sets a project's secret (sealed by the caller: the store never sees
    /// a value). At most `max` per project.
    pub async fn put_secret(&self, project: &str, name: &str, sealed: Vec<u8>, max: usize) -> Result<(), StoreError> {
        let (project, name) = (project.to_string(), name.to_string());
        self.tx(move |c| {
            let live = c.query(
                "SELECT name FROM projects WHERE name = $1 AND status = 'enabled'",
                &[project.as_str().into()],
            )?;
            if live.is_empty() {
                return Err(StoreError::NotFound(format!("project {project}")));
            }
            let n = c.query(
                "SELECT COUNT(*) FROM secrets WHERE project = $1 AND name <> $2",
                &[project.as_str().into(), name.as_str().into()],
            )?;
            if n.first().map(|r| r[0].clone().int()).transpose()?.unwrap_or(0) as usize >= max {
                return Err(StoreError::Invalid(format!("project {project} has {max} secrets, the most it may")));
            }
            c.execute(
                "INSERT INTO secrets (project, name, sealed, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (project, name) DO UPDATE SET sealed = $3, updated_at = $4",
                &[project.into(), name.into(), sealed.into(), now().into()],
            )?;
            Ok(())
        })
        .await
    }

    /// A project's secret names and when each was set (ms), by name.
    pub async fn secret_names(&self, project: &str) -> Result<Vec<(String, i64)>, StoreError> {
        let project = project.to_string();
        self.with(move |c| {
            let rows =
                c.query("SELECT name, updated_at FROM secrets WHERE project = $1 ORDER BY name", &[project.into()])?;
            rows.into_iter().map(|r| Ok((r[0].clone().text()?, r[1].clone().int()?))).collect()
        })
        .await
    }

    /// The sealed values of `names` that the project has (others are
    /// left out: the caller names what is missing).
    pub async fn sealed_secrets(
        &self,
        project: &str,
        names: Vec<String>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let project = project.to_string();
        self.with(move |c| {
            let mut out = Vec::new();
            for name in names {
                let rows = c.query(
                    "SELECT sealed FROM secrets WHERE project = $1 AND name = $2",
                    &[project.as_str().into(), name.as_str().into()],
                )?;
                if let Some(r) = rows.into_iter().next() {
                    out.push((name, r[0].clone().blob()?));
                }
            }
            Ok(out)
        })
        .await
    }

    /// Removes a project's secret; false if it had none by that name.
    pub async fn delete_secret(&self, project: &str, name: &str) -> Result<bool, StoreError> {
        let (project, name) = (project.to_string(), name.to_string());
        self.with(move |c| {
            Ok(c.execute("DELETE FROM secrets WHERE project = $1 AND name = $2", &[project.into(), name.into()])? > 0)
        })
        .await
    }

    pub async fn set_poll(&self, name: &str, r: PollResult) -> Result<(), StoreError> {
        let name = name.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE projects SET heads = $2, polled_at = $3, poll_error = $4, config_error = $5,
                 builders = COALESCE($6, builders), branches = COALESCE($7, branches),
                 commits = COALESCE($8, commits) WHERE name = $1",
                &[
                    name.into(),
                    serde_json::to_string(&r.heads)?.into(),
                    now().into(),
                    r.error.into(),
                    r.config_error.into(),
                    r.builders.map(|b| serde_json::to_string(&b)).transpose()?.into(),
                    r.branches.map(|b| serde_json::to_string(&b)).transpose()?.into(),
                    r.commits.into(),
                ],
            )?;
            Ok(())
        })
        .await
    }

    // ------------------------------------------------------------- configs

    /// Stores a config text by its hash (immutable; idempotent).
    pub async fn put_config(&self, hash: &str, body: &str) -> Result<(), StoreError> {
        let (hash, body) = (hash.to_string(), body.to_string());
        self.with(move |c| {
            c.execute(
                "INSERT INTO configs (hash, body) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING",
                &[hash.into(), body.into()],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn config(&self, hash: &str) -> Result<Option<String>, StoreError> {
        let hash = hash.to_string();
        self.with(move |c| {
            let rows = c.query("SELECT body FROM configs WHERE hash = $1", &[hash.into()])?;
            rows.first().map(|r| r[0].text().map_err(StoreError::from)).transpose()
        })
        .await
    }

    // ----------------------------------------------------------- event box

    /// Puts an event in a project's box. Idempotent by `id`: returns false
    /// if an event with that id is already waiting.
    pub async fn send(&self, project: &str, id: &str, event: &Event) -> Result<bool, StoreError> {
        let (project, id, body) = (project.to_string(), id.to_string(), serde_json::to_string(event)?);
        self.with(move |c| Ok(send(c, &project, &id, &body)? > 0)).await
    }

    /// The manager's state, its eversion and the events waiting, read
    /// outside any transaction (the commit checks the eversion).
    pub async fn load(&self, project: &str) -> Result<(State, u64, Vec<Listed>), StoreError> {
        let project = project.to_string();
        self.with(move |c| {
            let st = c.query("SELECT eversion, state FROM pm_state WHERE project = $1", &[project.as_str().into()])?;
            let Some(r) = st.first() else {
                return Err(StoreError::NotFound(format!("project {project}")));
            };
            let eversion = r[0].int()? as u64;
            let state: State = serde_json::from_str(&r[1].text()?)?;
            let rows = c.query(
                "SELECT id, body FROM pm_events WHERE project = $1 ORDER BY seq LIMIT 10000",
                &[project.as_str().into()],
            )?;
            let mut events = Vec::with_capacity(rows.len());
            for r in rows {
                events.push(Listed { id: r[0].text()?, event: serde_json::from_str(&r[1].text()?)? });
            }
            Ok((state, eversion, events))
        })
        .await
    }

    /// Commits a step: `None` if another step committed first (the eversion
    /// moved), else the new eversion and the outbox ids of the actions.
    pub async fn commit_step(
        &self,
        project: &str,
        eversion: u64,
        outcome: &Outcome,
    ) -> Result<Option<(u64, Vec<u64>)>, StoreError> {
        let project = project.to_string();
        let state = serde_json::to_string(&outcome.state)?;
        let reasons = serde_json::to_string(&outcome.reasons)?;
        let actions: Vec<String> = outcome.actions.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
        let consumed = outcome.consumed.clone();
        let new_config = outcome.new_config.clone();
        self.tx(move |c| {
            let p = project.as_str();
            let next = eversion + 1;
            let n = c.execute(
                "UPDATE pm_state SET eversion = $3, state = $4 WHERE project = $1 AND eversion = $2",
                &[p.into(), eversion.into(), next.into(), state.into()],
            )?;
            if n == 0 {
                return Ok(None);
            }
            // One statement per hundred ids: a round trip each on PostgreSQL.
            for chunk in consumed.chunks(100) {
                let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
                let mut params: Vec<Value> = vec![p.into()];
                params.extend(chunk.iter().map(Value::from));
                c.execute(
                    &format!("DELETE FROM pm_events WHERE project = $1 AND id IN ({})", marks.join(", ")),
                    &params,
                )?;
            }
            c.execute(
                "INSERT INTO pm_log (project, eversion, at, reasons) VALUES ($1, $2, $3, $4)",
                &[p.into(), next.into(), now().into(), reasons.into()],
            )?;
            let mut ids = Vec::new();
            for a in actions {
                let r = c.query(
                    "INSERT INTO outbox (project, action, created_at) VALUES ($1, $2, $3) RETURNING id",
                    &[p.into(), a.into(), now().into()],
                )?;
                ids.push(r[0][0].int()? as u64);
            }
            if let Some(h) = new_config {
                c.execute("UPDATE projects SET config_hash = $2 WHERE name = $1", &[p.into(), h.into()])?;
            }
            Ok(Some((next, ids)))
        })
        .await
    }

    /// Actions recorded and not yet carried out, oldest first.
    pub async fn outbox(&self, project: &str) -> Result<Vec<(u64, Action)>, StoreError> {
        let project = project.to_string();
        self.with(move |c| {
            let rows = c.query("SELECT id, action FROM outbox WHERE project = $1 ORDER BY id", &[project.into()])?;
            rows.iter().map(|r| Ok((r[0].int()? as u64, serde_json::from_str(&r[1].text()?)?))).collect()
        })
        .await
    }

    /// Carries out a `CreateRun` from the outbox (see the module doc).
    pub async fn create_run(
        &self,
        outbox_id: u64,
        project: &str,
        action: &Action,
        builds: Vec<NewBuild>,
        error: Option<String>,
    ) -> Result<Created, StoreError> {
        let Action::CreateRun { op_id, change, config_hash, project_config } = action.clone();
        let project = project.to_string();
        self.tx(move |c| {
            notify(c, NOTE_QUEUE)?;
            let p = project.as_str();
            let off = c.query("SELECT status, config_hash FROM projects WHERE name = $1", &[p.into()])?;
            // (why, whether the manager should decide again): a removed
            // project has nothing to decide, and a poke would only make the
            // same refused action again, for ever.
            let refused = match off.first() {
                None => Some(("the project is gone".to_string(), false)),
                Some(r) if r[0].text()? != "enabled" => Some(("the project was removed".to_string(), false)),
                Some(r) if r[1].opt_text()?.unwrap_or_default() != project_config => {
                    Some((format!("the project config changed since (now {:?})", r[1].opt_text()?), true))
                }
                Some(_) => None,
            };
            c.execute("DELETE FROM outbox WHERE id = $1", &[outbox_id.into()])?;
            if let Some((why, again)) = refused {
                if again {
                    send(c, p, &format!("poke:refused:{op_id}"), &serde_json::to_string(&Event::Poke)?)?;
                }
                return Ok(Created::Refused(why));
            }
            let state = if error.is_some() || builds.is_empty() { RunState::Failed } else { RunState::Queued };
            let finished = state.is_final().then(now);
            // Idempotent by operation id, also when two coordinators carry
            // out the same action at once: the second insert finds the
            // first's row (the unique key waits for its commit).
            let r = c.query(
                "INSERT INTO runs (project, op_id, change_id, change, state, config_hash, error, created_at, finished_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (project, op_id) DO NOTHING RETURNING id",
                &[
                    p.into(),
                    op_id.as_str().into(),
                    change.id.as_str().into(),
                    serde_json::to_string(&change)?.into(),
                    state.as_str().into(),
                    config_hash.as_str().into(),
                    error.clone().or_else(|| builds.is_empty().then(|| "flotilla.toml has no builders".into())).into(),
                    now().into(),
                    finished.into(),
                ],
            )?;
            if r.is_empty() {
                let existing =
                    c.query("SELECT id FROM runs WHERE project = $1 AND op_id = $2", &[p.into(), op_id.as_str().into()])?;
                let id = existing.first().ok_or_else(|| StoreError::Invalid(format!("run of {op_id} vanished")))?[0].int()?
                    as u64;
                let ev = Event::RunCreated { change_id: change.id.clone(), run_id: id };
                send(c, p, &format!("run_created:{id}"), &serde_json::to_string(&ev)?)?;
                return Ok(Created::Existing(id));
            }
            let run_id = r[0][0].int()? as u64;
            let kind = match change.kind {
                ChangeKind::Branch => "branch",
                ChangeKind::Try => "try",
            };
            for b in builds {
                c.execute(
                    "INSERT INTO builds (run_id, project, builder, attempt, state, rev, kind, spec, created_at)
                     VALUES ($1, $2, $3, 1, 'queued', $4, $5, $6, $7)",
                    &[run_id.into(), p.into(), b.builder.into(), change.rev.as_str().into(), kind.into(), b.spec.into(), now().into()],
                )?;
            }
            let ev = Event::RunCreated { change_id: change.id.clone(), run_id };
            send(c, p, &format!("run_created:{run_id}"), &serde_json::to_string(&ev)?)?;
            if state.is_final() {
                let ev = Event::RunFinished { run_id, state };
                send(c, p, &format!("run_finished:{run_id}"), &serde_json::to_string(&ev)?)?;
            }
            Ok(Created::Run(run_id))
        })
        .await
    }

    /// The project log, newest first.
    pub async fn project_log(&self, project: &str, limit: u64) -> Result<Vec<ProjectLogEntry>, StoreError> {
        let project = project.to_string();
        self.with(move |c| {
            let rows = c.query(
                "SELECT eversion, at, reasons FROM pm_log WHERE project = $1 ORDER BY eversion DESC LIMIT $2",
                &[project.into(), limit.into()],
            )?;
            rows.iter()
                .map(|r| {
                    Ok(ProjectLogEntry {
                        eversion: r[0].int()? as u64,
                        at: Timestamp(r[1].int()? as u64),
                        reasons: serde_json::from_str(&r[2].text()?)?,
                    })
                })
                .collect()
        })
        .await
    }

    /// Projects with events waiting or actions not yet carried out (to step
    /// at start-up).
    pub async fn projects_with_work(&self) -> Result<Vec<String>, StoreError> {
        self.with(move |c| {
            let rows =
                c.query("SELECT DISTINCT project FROM pm_events UNION SELECT DISTINCT project FROM outbox", &[])?;
            rows.iter().map(|r| r[0].text().map_err(StoreError::from)).collect()
        })
        .await
    }

    // ------------------------------------------------------- runs & builds

    /// The next value of a named counter (1, 2, …), atomically.
    pub async fn next_counter(&self, name: &str) -> Result<u64, StoreError> {
        let name = name.to_string();
        self.tx(move |c| {
            let r = c.query(
                "INSERT INTO counters (name, value) VALUES ($1, 1)
                 ON CONFLICT (name) DO UPDATE SET value = counters.value + 1 RETURNING value",
                &[name.into()],
            )?;
            Ok(r[0][0].int()? as u64)
        })
        .await
    }

    /// The run of a change, if it has one yet.
    pub async fn run_of_change(&self, project: &str, change_id: &str) -> Result<Option<u64>, StoreError> {
        let (project, change_id) = (project.to_string(), change_id.to_string());
        self.with(move |c| {
            let r = c.query(
                "SELECT id FROM runs WHERE project = $1 AND change_id = $2 ORDER BY id DESC LIMIT 1",
                &[project.into(), change_id.into()],
            )?;
            Ok(r.first().map(|r| r[0].int()).transpose()?.map(|v| v as u64))
        })
        .await
    }

    const BUILD_COLS: &str = "id, run_id, project, builder, attempt, retry_of, retry_reason, state, rev, sandbox, step, \
        failure, log_bytes, created_at, started_at, finished_at, node";

    fn build_row(r: &Row) -> Result<Build, StoreError> {
        Ok(Build {
            id: r[0].int()? as u64,
            run_id: r[1].int()? as u64,
            project: r[2].text()?,
            builder: r[3].text()?,
            attempt: r[4].int()? as u32,
            retry_of: r[5].opt_int()?.map(|v| v as u64),
            retry_reason: r[6].opt_text()?,
            state: state_of(&r[7])?,
            rev: r[8].text()?,
            sandbox: r[9].opt_text()?,
            step: r[10].opt_text()?,
            failure: r[11].opt_text()?.map(|f| serde_json::from_str(&f)).transpose()?,
            log_bytes: r[12].int()? as u64,
            created_at: Timestamp(r[13].int()? as u64),
            started_at: ts(&r[14])?,
            finished_at: ts(&r[15])?,
            node: r[16].opt_text()?,
            timeline: Vec::new(),
        })
    }

    fn run_row(r: &Row) -> Result<Run, StoreError> {
        let change: Change = serde_json::from_str(&r[2].text()?)?;
        Ok(Run {
            id: r[0].int()? as u64,
            project: r[1].text()?,
            change,
            state: state_of(&r[3])?,
            config_hash: r[4].text()?,
            error: r[5].opt_text()?,
            created_at: Timestamp(r[6].int()? as u64),
            finished_at: ts(&r[7])?,
            builds: Vec::new(),
        })
    }

    const RUN_COLS: &str = "id, project, change, state, config_hash, error, created_at, finished_at";

    fn timeline_of(c: &mut dyn Conn, build: u64) -> Result<Vec<TimelineEntry>, StoreError> {
        let rows =
            c.query("SELECT at, event, detail FROM timeline WHERE build_id = $1 ORDER BY seq", &[build.into()])?;
        rows.iter().map(Self::timeline_row).collect()
    }

    /// A timeline row: `at, event, detail`.
    fn timeline_row(r: &Row) -> Result<TimelineEntry, StoreError> {
        Ok(TimelineEntry { at: Timestamp(r[0].int()? as u64), event: r[1].text()?, detail: r[2].opt_text()? })
    }

    /// Runs, newest first, each with the latest attempt of each builder.
    pub async fn runs(&self, project: Option<String>, limit: u64, before: Option<u64>) -> Result<Vec<Run>, StoreError> {
        self.with(move |c| {
            let rows = c.query(
                &format!(
                    "SELECT {} FROM runs WHERE (CAST($1 AS TEXT) IS NULL OR project = $1)
                     AND (CAST($2 AS BIGINT) IS NULL OR id < $2)
                     ORDER BY id DESC LIMIT $3",
                    Self::RUN_COLS
                ),
                &[project.into(), before.into(), limit.into()],
            )?;
            let mut runs: Vec<Run> = rows.iter().map(Self::run_row).collect::<Result<_, _>>()?;
            for run in &mut runs {
                let b = c.query(
                    &format!(
                        "SELECT {} FROM builds WHERE run_id = $1 AND superseded = 0 ORDER BY builder",
                        Self::BUILD_COLS
                    ),
                    &[run.id.into()],
                )?;
                run.builds = b.iter().map(Self::build_row).collect::<Result<_, _>>()?;
            }
            Ok(runs)
        })
        .await
    }

    /// One run with every attempt of every build, with timelines.
    pub async fn run(&self, id: u64) -> Result<Option<Run>, StoreError> {
        self.with(move |c| {
            let rows = c.query(&format!("SELECT {} FROM runs WHERE id = $1", Self::RUN_COLS), &[id.into()])?;
            let Some(r) = rows.first() else { return Ok(None) };
            let mut run = Self::run_row(r)?;
            let b = c.query(
                &format!("SELECT {} FROM builds WHERE run_id = $1 ORDER BY builder, attempt", Self::BUILD_COLS),
                &[id.into()],
            )?;
            run.builds = b.iter().map(Self::build_row).collect::<Result<_, _>>()?;
            for b in &mut run.builds {
                b.timeline = Self::timeline_of(c, b.id)?;
            }
            Ok(Some(run))
        })
        .await
    }

    pub async fn build(&self, id: u64) -> Result<Option<Build>, StoreError> {
        self.with(move |c| {
            let rows = c.query(&format!("SELECT {} FROM builds WHERE id = $1", Self::BUILD_COLS), &[id.into()])?;
            let Some(r) = rows.first() else { return Ok(None) };
            let mut b = Self::build_row(r)?;
            b.timeline = Self::timeline_of(c, id)?;
            Ok(Some(b))
        })
        .await
    }

    /// A build as its change event carries it: its fields now and only
    /// its newest timeline entry (what just happened), so an event costs
    /// the same at step 1,000 as at step 1.
    pub async fn build_change(&self, id: u64) -> Result<Option<Build>, StoreError> {
        self.with(move |c| {
            let rows = c.query(&format!("SELECT {} FROM builds WHERE id = $1", Self::BUILD_COLS), &[id.into()])?;
            let Some(r) = rows.first() else { return Ok(None) };
            let mut b = Self::build_row(r)?;
            let newest = c.query(
                "SELECT at, event, detail FROM timeline WHERE build_id = $1 ORDER BY seq DESC LIMIT 1",
                &[id.into()],
            )?;
            b.timeline = newest.iter().map(Self::timeline_row).collect::<Result<_, StoreError>>()?;
            Ok(Some(b))
        })
        .await
    }

    fn work_row(r: &Row) -> Result<BuildWork, StoreError> {
        Ok(BuildWork {
            id: r[0].int()? as u64,
            run_id: r[1].int()? as u64,
            project: r[2].text()?,
            builder: r[3].text()?,
            attempt: r[4].int()? as u32,
            retry_reason: r[5].opt_text()?,
            state: state_of(&r[6])?,
            rev: r[7].text()?,
            kind: if r[8].text()? == "try" { ChangeKind::Try } else { ChangeKind::Branch },
            spec: r[9].text()?,
            sandbox: r[10].opt_text()?,
            step_index: r[11].int()? as usize,
            proc_offset: r[12].int()? as u64,
            source_written: r[13].int()? != 0,
            cancel_requested: r[14].int()? != 0,
            log_bytes: r[15].int()? as u64,
            node: r[16].opt_text()?,
            owner: r[17].opt_text()?,
        })
    }

    const WORK_COLS: &str = "id, run_id, project, builder, attempt, retry_reason, state, rev, kind, spec, sandbox, \
        step_index, proc_offset, source_written, cancel_requested, log_bytes, node, owner";

    pub async fn work(&self, id: u64) -> Result<Option<BuildWork>, StoreError> {
        self.with(move |c| {
            let rows = c.query(&format!("SELECT {} FROM builds WHERE id = $1", Self::WORK_COLS), &[id.into()])?;
            rows.first().map(Self::work_row).transpose()
        })
        .await
    }

    /// How many current builds are queued and running, by state and kind
    /// (the coordinator's `/metrics`).
    pub async fn active_counts(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                "SELECT state, kind, COUNT(*) FROM builds
                 WHERE state IN ('queued', 'running') AND superseded = 0 GROUP BY state, kind",
                &[],
            )?;
            rows.iter().map(|r| Ok((r[0].text()?, r[1].text()?, r[2].int()? as u64))).collect()
        })
        .await
    }

    /// The queue for the scheduler: up to `limit` queued builds, what they
    /// need (their stored spec) and where they rank.
    pub async fn queue(&self, limit: u64) -> Result<Vec<QueuedBuild>, StoreError> {
        self.with(move |c| {
            let rows = c.query(
                // In the scheduler's order before the limit: try builds
                // (oldest first), then commits newest first, so a backlog
                // of commits never hides a try build past the limit.
                "SELECT id, run_id, project, builder, kind, spec, created_at FROM builds WHERE state = 'queued'
                 ORDER BY CASE WHEN kind = 'try' THEN 0 ELSE 1 END, CASE WHEN kind = 'try' THEN id ELSE -id END
                 LIMIT $1",
                &[limit.into()],
            )?;
            rows.iter()
                .map(|r| {
                    Ok(QueuedBuild {
                        id: r[0].int()? as u64,
                        run: r[1].int()? as u64,
                        project: r[2].text()?,
                        builder: r[3].text()?,
                        kind: r[4].text()?,
                        spec: r[5].text()?,
                        created_at: r[6].int()? as u64,
                    })
                })
                .collect()
        })
        .await
    }

    /// What builds running under `owner` hold: (project, node, spec).
    pub async fn running_load(&self, owner: &str) -> Result<Vec<(String, Option<String>, String)>, StoreError> {
        let owner = owner.to_string();
        self.with(move |c| {
            let rows = c.query(
                "SELECT project, node, spec FROM builds WHERE state = 'running' AND owner = $1",
                &[owner.into()],
            )?;
            rows.iter().map(|r| Ok((r[0].text()?, r[1].opt_text()?, r[2].text()?))).collect()
        })
        .await
    }

    /// How many builds run per project, under any coordinator (the
    /// scheduler's fair shares).
    pub async fn running_per_project(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.with(move |c| {
            let rows = c.query(
                "SELECT project, COUNT(*) FROM builds WHERE state = 'running' AND superseded = 0 GROUP BY project",
                &[],
            )?;
            rows.iter().map(|r| Ok((r[0].text()?, r[1].int()? as u64))).collect()
        })
        .await
    }

    /// Builds running under `owner` (to resume after a restart).
    pub async fn running(&self, owner: &str) -> Result<Vec<u64>, StoreError> {
        let owner = owner.to_string();
        self.with(move |c| {
            let rows =
                c.query("SELECT id FROM builds WHERE state = 'running' AND owner = $1 ORDER BY id", &[owner.into()])?;
            rows.iter().map(|r| Ok(r[0].int()? as u64)).collect()
        })
        .await
    }

    /// Takes a queued build for `owner` to run on `node`; false if another
    /// took it first.
    /// Claims a queued build for `owner` on `node`, with no reservation.
    pub async fn claim(&self, id: u64, owner: &str, node: &str) -> Result<bool, StoreError> {
        let lease = Timestamp::now().plus(std::time::Duration::from_secs(60));
        Ok(self.claim_within(id, owner, node, None, lease).await? == Claim::Claimed)
    }

    /// Claims a queued build for `owner` on `node` and, with `reserve`,
    /// reserves its share of the node in the same transaction: the claims
    /// on one node take turns (a row lock in PostgreSQL; SQLite's writes
    /// take turns anyway), and one that would take the running builds of
    /// every coordinator sharing this store past the node's capacity is
    /// refused. Two coordinators never place two builds on its last room.
    pub async fn claim_within(
        &self,
        id: u64,
        owner: &str,
        node: &str,
        reserve: Option<Reservation>,
        lease_until: Timestamp,
    ) -> Result<Claim, StoreError> {
        let (owner, node) = (owner.to_string(), node.to_string());
        self.tx(move |c| {
            if let Some(r) = reserve {
                c.execute("INSERT INTO node_locks (node) VALUES ($1) ON CONFLICT (node) DO NOTHING", &[node.as_str().into()])?;
                c.execute("UPDATE node_locks SET node = node WHERE node = $1", &[node.as_str().into()])?;
                let used = c.query(
                    "SELECT CAST(COALESCE(SUM(r.millicpus), 0) AS BIGINT), CAST(COALESCE(SUM(r.memory_bytes), 0) AS BIGINT)
                     FROM reservations r JOIN builds b ON b.id = r.build_id
                     WHERE r.node = $1 AND b.state = 'running'",
                    &[node.as_str().into()],
                )?;
                let (cpu, mem) = (used[0][0].int()? as u64, used[0][1].int()? as u64);
                if cpu + r.millicpus > r.node_millicpus || mem + r.memory_bytes > r.node_memory_bytes {
                    return Ok(Claim::Full { used_millicpus: cpu, used_memory_bytes: mem });
                }
            }
            let n = c.execute(
                "UPDATE builds SET state = 'running', owner = $2, started_at = $3, node = $4, lease_until = $5
                 WHERE id = $1 AND state = 'queued'",
                &[id.into(), owner.into(), now().into(), node.as_str().into(), (lease_until.0 as i64).into()],
            )?;
            if n == 0 {
                return Ok(Claim::Taken);
            }
            if let Some(r) = reserve {
                c.execute("DELETE FROM reservations WHERE build_id = $1", &[id.into()])?;
                c.execute(
                    "INSERT INTO reservations (build_id, node, millicpus, memory_bytes) VALUES ($1, $2, $3, $4)",
                    &[id.into(), node.as_str().into(), r.millicpus.into(), r.memory_bytes.into()],
                )?;
            }
            let run = c.query("SELECT run_id FROM builds WHERE id = $1", &[id.into()])?;
            let run_id = run[0][0].int()?;
            c.execute("UPDATE runs SET state = 'running' WHERE id = $1 AND state = 'queued'", &[run_id.into()])?;
            Ok(Claim::Claimed)
        })
        .await
    }

    /// Retention: deletes up to `batch` finished runs that ended before
    /// `cutoff`, with their builds, logs, timelines and reservations, and
    /// up to `batch` × 10 project-manager log rows older than it, in one
    /// transaction. Call until it deletes nothing; a janitor does.
    pub async fn purge_before(&self, cutoff: Timestamp, batch: u64) -> Result<Purged, StoreError> {
        self.tx(move |c| {
            let cut = cutoff.0 as i64;
            let runs = c.query(
                "SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < $1 ORDER BY id LIMIT $2",
                &[cut.into(), batch.into()],
            )?;
            let mut out = Purged::default();
            for r in runs {
                let run = r[0].int()?;
                // Only runs whose every build is final (a retry reopens a run).
                let open = c.query(
                    "SELECT 1 FROM builds WHERE run_id = $1 AND state IN ('queued', 'running') LIMIT 1",
                    &[run.into()],
                )?;
                if !open.is_empty() {
                    continue;
                }
                for table in ["log_chunks", "timeline", "reservations"] {
                    c.execute(
                        &format!("DELETE FROM {table} WHERE build_id IN (SELECT id FROM builds WHERE run_id = $1)"),
                        &[run.into()],
                    )?;
                }
                out.builds += c.execute("DELETE FROM builds WHERE run_id = $1", &[run.into()])?;
                out.runs += c.execute("DELETE FROM runs WHERE id = $1", &[run.into()])?;
            }
            let old = c.query(
                "SELECT project, eversion FROM pm_log WHERE at < $1 ORDER BY at LIMIT $2",
                &[cut.into(), (batch * 10).into()],
            )?;
            for r in old {
                out.pm_log += c.execute(
                    "DELETE FROM pm_log WHERE project = $1 AND eversion = $2",
                    &[r[0].clone(), r[1].clone()],
                )?;
            }
            out.try_patches = c.execute(
                "DELETE FROM try_patches WHERE sha IN (SELECT sha FROM try_patches WHERE at < $1 ORDER BY at LIMIT $2)",
                &[cut.into(), batch.into()],
            )?;
            Ok(out)
        })
        .await
    }

    /// Keeps a try patch (once: the same commit twice is the same patch).
    pub async fn put_try_patch(&self, p: TryPatch) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                "INSERT INTO try_patches (sha, project, base, patch, message, date, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (sha) DO NOTHING",
                &[
                    p.sha.into(),
                    p.project.into(),
                    p.base.into(),
                    p.patch.into(),
                    p.message.into(),
                    p.date.into(),
                    now().into(),
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// The try patch that made commit `sha`, if one did.
    pub async fn try_patch(&self, sha: &str) -> Result<Option<TryPatch>, StoreError> {
        let sha = sha.to_string();
        self.with(move |c| {
            let rows = c.query(
                "SELECT sha, project, base, patch, message, date FROM try_patches WHERE sha = $1",
                &[sha.into()],
            )?;
            rows.first()
                .map(|r| {
                    Ok(TryPatch {
                        sha: r[0].text()?,
                        project: r[1].text()?,
                        base: r[2].text()?,
                        patch: r[3].text()?,
                        message: r[4].text()?,
                        date: r[5].int()? as u64,
                    })
                })
                .transpose()
        })
        .await
    }

    /// Runs one statement with one id parameter (tests set up states the
    /// API does not reach).
    #[cfg(test)]
    pub async fn execute_for_test(&self, sql: &'static str, id: u64) {
        self.with(move |c| Ok(c.execute(sql, &[id.into()])?)).await.expect(sql);
    }

    /// Extends `owner`'s leases on `ids` (the builds its executors run) to
    /// `until`, and says of each whether it is still `owner`'s and whether
    /// a cancel was asked for.
    pub async fn renew_leases(&self, owner: &str, ids: Vec<u64>, until: Timestamp) -> Result<Vec<Renewed>, StoreError> {
        let owner = owner.to_string();
        self.tx(move |c| {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let rows = c.query(
                    "UPDATE builds SET lease_until = $3 WHERE id = $1 AND owner = $2 AND state = 'running'
                     RETURNING cancel_requested",
                    &[id.into(), owner.as_str().into(), (until.0 as i64).into()],
                )?;
                out.push(match rows.first() {
                    Some(r) => Renewed { id, held: true, cancel_requested: r[0].int()? != 0 },
                    None => Renewed { id, held: false, cancel_requested: false },
                });
            }
            Ok(out)
        })
        .await
    }

    /// Takes over, for `owner`, up to `limit` running builds whose lease
    /// lapsed before `now` (their coordinator died, hung or lost the
    /// database), leasing them until `until`. Each take is conditional on
    /// the lapsed lease it saw, so of two coordinators adopting at once
    /// exactly one gets each build. Returns (build, previous owner).
    pub async fn adopt_lapsed(
        &self,
        owner: &str,
        now: Timestamp,
        until: Timestamp,
        limit: u64,
    ) -> Result<Vec<(u64, Option<String>)>, StoreError> {
        let owner = owner.to_string();
        self.tx(move |c| {
            let rows = c.query(
                "SELECT id, owner, lease_until FROM builds
                 WHERE state = 'running' AND lease_until IS NOT NULL AND lease_until < $1 ORDER BY id LIMIT $2",
                &[(now.0 as i64).into(), limit.into()],
            )?;
            let mut adopted = Vec::new();
            for r in rows {
                let (id, was, lease) = (r[0].int()? as u64, r[1].opt_text()?, r[2].int()?);
                let n = c.execute(
                    "UPDATE builds SET owner = $2, lease_until = $3 WHERE id = $1 AND state = 'running' AND lease_until = $4",
                    &[id.into(), owner.as_str().into(), (until.0 as i64).into(), lease.into()],
                )?;
                if n == 1 {
                    c.execute(
                        "INSERT INTO timeline (build_id, at, event, detail) VALUES ($1, $2, 'adopted', $3)",
                        &[
                            id.into(),
                            (now.0 as i64).into(),
                            format!("by {owner}: the lease of {} lapsed", was.as_deref().unwrap_or("no coordinator"))
                                .into(),
                        ],
                    )?;
                    adopted.push((id, was));
                }
            }
            Ok(adopted)
        })
        .await
    }

    pub async fn timeline(&self, build: u64, event: &str, detail: Option<String>) -> Result<TimelineEntry, StoreError> {
        let event = event.to_string();
        self.with(move |c| {
            let at = now();
            c.execute(
                "INSERT INTO timeline (build_id, at, event, detail) VALUES ($1, $2, $3, $4)",
                &[build.into(), at.into(), event.as_str().into(), detail.clone().into()],
            )?;
            Ok(TimelineEntry { at: Timestamp(at as u64), event, detail })
        })
        .await
    }

    pub async fn set_sandbox(&self, build: u64, sandbox: &str) -> Result<(), StoreError> {
        let sandbox = sandbox.to_string();
        self.with(move |c| {
            c.execute("UPDATE builds SET sandbox = $2 WHERE id = $1", &[build.into(), sandbox.into()])?;
            Ok(())
        })
        .await
    }

    pub async fn set_source_written(&self, build: u64) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute("UPDATE builds SET source_written = 1 WHERE id = $1", &[build.into()])?;
            Ok(())
        })
        .await
    }

    /// Records that step `index` (named `name`) is about to start, its
    /// process offset at zero; written before the exec. False if the build
    /// is already at that step (a resumed executor re-attaches instead).
    pub async fn begin_step(&self, build: u64, index: usize, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.with(move |c| {
            let n = c.execute(
                "UPDATE builds SET step_index = $2, step = $3, proc_offset = 0
                 WHERE id = $1 AND (step IS NULL OR step_index < $2)",
                &[build.into(), (index as u64).into(), name.into()],
            )?;
            Ok(n > 0)
        })
        .await
    }

    /// Moves the current step's offset past output the agent no longer
    /// keeps (the timeline says so). False unless the stored offset is `from`.
    pub async fn skip_to(&self, build: u64, from: u64, to: u64) -> Result<bool, StoreError> {
        self.with(move |c| {
            let n = c.execute(
                "UPDATE builds SET proc_offset = $3 WHERE id = $1 AND proc_offset = $2",
                &[build.into(), from.into(), to.into()],
            )?;
            Ok(n > 0)
        })
        .await
    }

    /// Replaces a build whose sandbox was lost by a new attempt, in one
    /// transaction: the old one fails with `failure` and is superseded, the
    /// new one is queued with `reason`; the run stays open.
    pub async fn replace(&self, build: u64, failure: BuildFailure, reason: &str) -> Result<u64, StoreError> {
        let reason = reason.to_string();
        let failure = serde_json::to_string(&failure)?;
        self.tx(move |c| {
            let n = c.execute(
                "UPDATE builds SET state = 'failed', failure = $2, finished_at = $3
                 WHERE id = $1 AND state IN ('queued', 'running')",
                &[build.into(), failure.into(), now().into()],
            )?;
            if n == 0 {
                return Err(StoreError::Invalid(format!("build {build} already finished")));
            }
            new_attempt(c, build, &reason)
        })
        .await
    }

    /// Appends output of the current step: the bytes between process
    /// offsets `from` and `from + data.len()`. Refused (false) unless the
    /// stored offset is `from`: so a chunk is never stored twice; refused
    /// with [`StoreError::Fenced`] when the build is no longer `owner`'s.
    ///
    /// At most `cap` log bytes are stored per build: the append that
    /// crosses it stores what fits and a line saying where the log was
    /// cut (and a `log_cut` timeline entry); later ones store nothing but
    /// still move the offset, so the step is never held back by a log
    /// nobody keeps.
    pub async fn append_log(
        &self,
        build: u64,
        owner: &str,
        from: u64,
        mut data: Vec<u8>,
        cap: u64,
    ) -> Result<bool, StoreError> {
        let owner = owner.to_string();
        self.tx(move |c| {
            let to = from + data.len() as u64;
            let cur = c.query("SELECT owner, proc_offset, log_bytes FROM builds WHERE id = $1", &[build.into()])?;
            let Some(cur) = cur.first() else { return Ok(false) };
            if cur[0].opt_text()?.as_deref() != Some(owner.as_str()) {
                return Err(StoreError::Fenced(build));
            }
            if cur[1].int()? as u64 != from {
                return Ok(false);
            }
            let stored = cur[2].int()? as u64;
            if stored + data.len() as u64 > cap {
                data.truncate(cap.saturating_sub(stored) as usize);
                if stored <= cap {
                    data.extend_from_slice(
                        format!(
                            "\n[flotilla: the log is cut here, at {cap} bytes (the coordinator's --max-log); \
                             the step's further output is not kept]\n"
                        )
                        .as_bytes(),
                    );
                    c.execute(
                        "INSERT INTO timeline (build_id, at, event, detail) VALUES ($1, $2, 'log_cut', $3)",
                        &[build.into(), now().into(), format!("at {cap} bytes (--max-log)").into()],
                    )?;
                }
            }
            let rows = c.query(
                "UPDATE builds SET proc_offset = $3, log_bytes = log_bytes + $4
                 WHERE id = $1 AND proc_offset = $2 AND owner = $5 RETURNING log_bytes",
                &[build.into(), from.into(), to.into(), (data.len() as u64).into(), owner.as_str().into()],
            )?;
            let Some(r) = rows.first() else { return Ok(false) };
            if data.is_empty() {
                return Ok(true);
            }
            let end = r[0].int()? as u64;
            let start = end - data.len() as u64;
            let (data, enc) = encode_chunk(data);
            c.execute(
                "INSERT INTO log_chunks (build_id, start, data, enc) VALUES ($1, $2, $3, $4)",
                &[build.into(), start.into(), data.into(), enc.into()],
            )?;
            Ok(true)
        })
        .await
    }

    /// Up to `max` bytes of the log from byte `from`.
    pub async fn log(&self, build: u64, from: u64, max: u64) -> Result<Option<LogSlice>, StoreError> {
        self.with(move |c| {
            let b = c.query("SELECT log_bytes, state FROM builds WHERE id = $1", &[build.into()])?;
            let Some(b) = b.first() else { return Ok(None) };
            let total = b[0].int()? as u64;
            let done = state_of(&b[1])?.is_final();
            // The chunk holding `from` is the last one starting at or
            // before it: found through the primary key, so reading on from
            // any offset costs the same however long the log is (a filter
            // on `start + length(data)` scanned every earlier chunk).
            let mut data = Vec::new();
            let mut at = from;
            'read: while (data.len() as u64) < max && at < total {
                let rows = c.query(
                    "SELECT start, data, enc FROM log_chunks WHERE build_id = $1 AND start >= COALESCE(
                       (SELECT MAX(start) FROM log_chunks WHERE build_id = $1 AND start <= $2), 0)
                     ORDER BY start LIMIT 8",
                    &[build.into(), at.into()],
                )?;
                let mut moved = false;
                for r in rows {
                    let start = r[0].int()? as u64;
                    let chunk = decode_chunk(r[1].clone().blob()?, r[2].opt_int()?)?;
                    let skip = at.saturating_sub(start) as usize;
                    if skip < chunk.len() {
                        data.extend_from_slice(&chunk[skip..]);
                        at = start + chunk.len() as u64;
                        moved = true;
                    }
                    if data.len() as u64 >= max {
                        break 'read;
                    }
                }
                if !moved {
                    break;
                }
            }
            data.truncate(max.min(data.len() as u64) as usize);
            Ok(Some(LogSlice { data, total, done }))
        })
        .await
    }

    /// The last `n` lines of a build's log (for a failure's summary).
    pub async fn tail(&self, build: u64, n: usize) -> Result<Vec<String>, StoreError> {
        let Some(s) = self.log(build, 0, 0).await? else { return Ok(Vec::new()) };
        let from = s.total.saturating_sub(16 * 1024);
        let Some(s) = self.log(build, from, 16 * 1024).await? else { return Ok(Vec::new()) };
        let text = String::from_utf8_lossy(&s.data);
        let lines: Vec<&str> = text.lines().collect();
        Ok(lines[lines.len().saturating_sub(n)..].iter().map(|l| l.to_string()).collect())
    }

    /// Ends a build; when it was the last of its run, ends the run and puts
    /// `run_finished` in the project's box, in the same transaction.
    /// Returns the run's new state when it finished.
    pub async fn finish_build(
        &self,
        build: u64,
        state: RunState,
        failure: Option<BuildFailure>,
    ) -> Result<Option<RunState>, StoreError> {
        self.finish_build_as(build, None, state, failure).await
    }

    /// [`Store::finish_build`] by the executor of `owner`: refused with
    /// [`StoreError::Fenced`] when the build runs under another owner now.
    pub async fn finish_build_as(
        &self,
        build: u64,
        owner: Option<&str>,
        state: RunState,
        failure: Option<BuildFailure>,
    ) -> Result<Option<RunState>, StoreError> {
        let failure = failure.map(|f| serde_json::to_string(&f)).transpose()?;
        let owner = owner.map(str::to_string);
        self.tx(move |c| {
            // Room freed on a node: peers may place there now.
            notify(c, NOTE_QUEUE)?;
            if let Some(o) = &owner {
                let r = c.query("SELECT owner, state FROM builds WHERE id = $1", &[build.into()])?;
                if let Some(r) = r.first()
                    && state_of(&r[1])? == RunState::Running
                    && r[0].opt_text()?.as_deref() != Some(o.as_str())
                {
                    return Err(StoreError::Fenced(build));
                }
            }
            let n = c.execute(
                "UPDATE builds SET state = $2, failure = $3, finished_at = $4
                 WHERE id = $1 AND state IN ('queued', 'running')",
                &[build.into(), state.as_str().into(), failure.into(), now().into()],
            )?;
            if n == 0 {
                return Ok(None);
            }
            let r = c.query("SELECT run_id, project FROM builds WHERE id = $1", &[build.into()])?;
            let (run_id, project) = (r[0][0].int()? as u64, r[0][1].text()?);
            finish_run_if_done(c, run_id, &project)
        })
        .await
    }

    /// Asks a run's (or one build's) unfinished builds to stop: queued ones
    /// end at once, running ones are flagged for their executor. Returns the
    /// running builds flagged.
    pub async fn cancel(&self, run: Option<u64>, build: Option<u64>) -> Result<Vec<u64>, StoreError> {
        self.tx(move |c| {
            notify(c, NOTE_CANCEL)?;
            let (filter, id) = match (run, build) {
                (_, Some(b)) => ("id = $1", b),
                (Some(r), None) => ("run_id = $1", r),
                (None, None) => return Ok(Vec::new()),
            };
            let rows = c.query(
                &format!("SELECT id, state, run_id, project FROM builds WHERE {filter} AND state IN ('queued', 'running')"),
                &[id.into()],
            )?;
            let mut running = Vec::new();
            let mut touched = None;
            for r in &rows {
                let bid = r[0].int()? as u64;
                touched = Some((r[2].int()? as u64, r[3].text()?));
                // Conditional: a claim between the read and this write makes
                // it a running build, flagged below like any other.
                let canceled = state_of(&r[1])? == RunState::Queued
                    && c.execute(
                        "UPDATE builds SET state = 'canceled', finished_at = $2 WHERE id = $1 AND state = 'queued'",
                        &[bid.into(), now().into()],
                    )? == 1;
                if canceled {
                    c.execute(
                        "INSERT INTO timeline (build_id, at, event, detail) VALUES ($1, $2, 'canceled', 'before it started')",
                        &[bid.into(), now().into()],
                    )?;
                } else {
                    c.execute("UPDATE builds SET cancel_requested = 1 WHERE id = $1", &[bid.into()])?;
                    running.push(bid);
                }
            }
            if let Some((run_id, project)) = touched {
                finish_run_if_done(c, run_id, &project)?;
            }
            Ok(running)
        })
        .await
    }

    /// Retries a finished build as a new attempt (visible as such), and
    /// reopens its run. Returns the new build's id.
    pub async fn retry(&self, build: u64, reason: &str) -> Result<u64, StoreError> {
        let reason = reason.to_string();
        self.tx(move |c| {
            let r = c.query(
                "SELECT run_id, project, builder, attempt, state, rev, kind, spec, superseded FROM builds WHERE id = $1",
                &[build.into()],
            )?;
            let Some(r) = r.first() else { return Err(StoreError::NotFound(format!("build {build}"))) };
            if !state_of(&r[4])?.is_final() {
                return Err(StoreError::Invalid(format!("build {build} is {}: only a finished build is retried", r[4].text()?)));
            }
            if r[8].int()? != 0 {
                let newer = c.query("SELECT id FROM builds WHERE retry_of = $1", &[build.into()])?;
                let n = newer.first().map(|x| x[0].int()).transpose()?.unwrap_or(0);
                return Err(StoreError::Invalid(format!("build {build} was already retried as build {n}")));
            }
            new_attempt(c, build, &reason)
        })
        .await
    }
}

/// Supersedes `build` with a new queued attempt that says why, and
/// reopens its run.
fn new_attempt(c: &mut dyn Conn, build: u64, reason: &str) -> Result<u64, StoreError> {
    notify(c, NOTE_QUEUE)?;
    let r = c.query(
        "SELECT run_id, project, builder, attempt, rev, kind, spec FROM builds WHERE id = $1",
        &[build.into()],
    )?;
    let Some(r) = r.first() else { return Err(StoreError::NotFound(format!("build {build}"))) };
    let run_id = r[0].int()?;
    // Conditional: of two retries racing (on two coordinators) one
    // supersedes the build; the other is refused.
    if c.execute("UPDATE builds SET superseded = 1 WHERE id = $1 AND superseded = 0", &[build.into()])? == 0 {
        return Err(StoreError::Invalid(format!("build {build} was already retried")));
    }
    let n = c.query(
        "INSERT INTO builds (run_id, project, builder, attempt, retry_of, retry_reason, state, rev, kind, spec, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $9, $10) RETURNING id",
        &[
            run_id.into(),
            r[1].clone(),
            r[2].clone(),
            (r[3].int()? + 1).into(),
            build.into(),
            reason.into(),
            r[4].clone(),
            r[5].clone(),
            r[6].clone(),
            now().into(),
        ],
    )?;
    let id = n[0][0].int()? as u64;
    c.execute(
        "INSERT INTO timeline (build_id, at, event, detail) VALUES ($1, $2, 'retried', $3)",
        &[build.into(), now().into(), format!("{reason}: attempt {} is build {id}", r[3].int()? + 1).into()],
    )?;
    c.execute("UPDATE runs SET state = 'running', finished_at = NULL WHERE id = $1", &[run_id.into()])?;
    Ok(id)
}

fn send(c: &mut dyn Conn, project: &str, id: &str, body: &str) -> Result<u64, StoreError> {
    let n = c.execute(
        "INSERT INTO pm_events (project, id, body) VALUES ($1, $2, $3) ON CONFLICT (project, id) DO NOTHING",
        &[project.into(), id.into(), body.into()],
    )?;
    if n > 0 {
        notify(c, &format!("{NOTE_BOX}{project}"))?;
    }
    Ok(n)
}

/// Wakes every coordinator listening on PostgreSQL (see
/// [`Store::listen`]) when the transaction commits; nothing on SQLite,
/// whose one coordinator wakes itself.
fn notify(c: &mut dyn Conn, payload: &str) -> Result<(), StoreError> {
    if c.dialect() == Dialect::Postgres {
        c.execute("SELECT pg_notify($1, $2)", &[postgres::CHANNEL.into(), payload.into()])?;
    }
    Ok(())
}

/// A run is over when every latest attempt is: failed if any failed, else
/// canceled if any was, else passed.
fn finish_run_if_done(c: &mut dyn Conn, run_id: u64, project: &str) -> Result<Option<RunState>, StoreError> {
    // Take the run's row lock before reading its builds. Two builds of a run
    // finishing at once in PostgreSQL (READ COMMITTED) would otherwise each
    // see the other still running, and neither would finish the run. With
    // the lock the second waits for the first to commit, and its read then
    // sees both. (SQLite runs one writer at a time: a no-op there.)
    c.execute("UPDATE runs SET state = state WHERE id = $1", &[run_id.into()])?;
    let rows = c.query("SELECT state FROM builds WHERE run_id = $1 AND superseded = 0", &[run_id.into()])?;
    let states: Vec<RunState> = rows.iter().map(|r| state_of(&r[0])).collect::<Result<_, _>>()?;
    if states.iter().any(|s| !s.is_final()) {
        return Ok(None);
    }
    let state = if states.contains(&RunState::Failed) {
        RunState::Failed
    } else if states.contains(&RunState::Canceled) {
        RunState::Canceled
    } else {
        RunState::Passed
    };
    let n = c.execute(
        "UPDATE runs SET state = $2, finished_at = $3 WHERE id = $1 AND state IN ('queued', 'running')",
        &[run_id.into(), state.as_str().into(), now().into()],
    )?;
    if n == 0 {
        return Ok(None);
    }
    // One id per finish: a retried run that finishes again notifies again.
    let seq = c.query("SELECT COUNT(*) FROM builds WHERE run_id = $1", &[run_id.into()])?;
    let ev = Event::RunFinished { run_id, state };
    send(c, project, &format!("run_finished:{run_id}:{}", seq[0][0].int()?), &serde_json::to_string(&ev)?)?;
    Ok(Some(state))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod pg_tests;

/// A queued build as the scheduler reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedBuild {
    pub id: u64,
    pub run: u64,
    pub project: String,
    pub builder: String,
    /// `branch` or `try` (the change's kind).
    pub kind: String,
    /// The stored [`crate::build::BuildSpec`], as JSON.
    pub spec: String,
    pub created_at: u64,
}
