//! The node's durable state: SQLite in WAL mode in the data directory.
//!
//! One short transaction per state change, written before the side effect
//! it describes is carried out, so a crashed node restarts knowing at least
//! what it was about to do. `synchronous=NORMAL` in WAL mode keeps commits
//! durable across a process crash without an fsync per write.
//!
//! The database holds sandbox env and operation records, which may carry
//! secrets: `node.db` is created 0600 before SQLite opens it, and SQLite
//! gives its `-wal` and `-shm` files the database's mode. A database (or
//! companion) left readable by others by an older node is made 0600 at open.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use flotilla_api::{Image, Operation, Sandbox};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// A sandbox as the node remembers it: the API view plus what only the
/// node needs (its process and uid range).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub sandbox: Sandbox,
    /// Index of the sandbox's uid range (see `flotilla_sandbox::process`).
    pub uid_slot: u32,
    /// The running init's pid and start time, for re-adoption.
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub start_time: Option<u64>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the state database {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("making the state database {path} private (mode 0600)")]
    Private {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state database query failed")]
    Query(#[from] rusqlite::Error),
    #[error("state database holds a record that does not parse")]
    Corrupt(#[from] serde_json::Error),
}

/// Creates the database file 0600 if it is absent, so SQLite (which gives
/// its `-wal` and `-shm` files the database's mode) never makes a file
/// others can read; narrows the database and its companions to 0600 if an
/// earlier node left them wider.
fn make_private(path: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let mut companions = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        companions.push(p.into());
    }
    for p in companions {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The node's SQLite store.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open { path: path.display().to_string(), source };
        make_private(path).map_err(|source| StoreError::Private { path: path.display().to_string(), source })?;
        let conn = Connection::open(path).map_err(open_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS sandboxes (
                 id TEXT PRIMARY KEY,
                 name TEXT NOT NULL,
                 state TEXT NOT NULL,
                 record TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS operations (
                 id TEXT PRIMARY KEY,
                 state TEXT NOT NULL,
                 created_ms INTEGER NOT NULL,
                 record TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS images (
                 reference TEXT PRIMARY KEY,
                 digest TEXT NOT NULL,
                 record TEXT NOT NULL
             );",
        )
        .map_err(open_err)?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    pub fn put(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(rec)?;
        self.conn.lock().expect("store lock").execute(
            "INSERT INTO sandboxes (id, name, state, record) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET name = ?2, state = ?3, record = ?4",
            params![rec.sandbox.id, rec.sandbox.name, rec.sandbox.state.as_str(), json],
        )?;
        Ok(())
    }

    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.conn.lock().expect("store lock").execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
        Ok(())
    }

    pub fn load_all(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        self.load_json("SELECT record FROM sandboxes ORDER BY id")
    }

    pub fn put_operation(&self, op: &Operation) -> Result<(), StoreError> {
        let json = serde_json::to_string(op)?;
        self.conn.lock().expect("store lock").execute(
            "INSERT INTO operations (id, state, created_ms, record) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET state = ?2, record = ?4",
            params![op.id, op.state.as_str(), op.created_at.0 as i64, json],
        )?;
        Ok(())
    }

    pub fn load_operations(&self) -> Result<Vec<Operation>, StoreError> {
        self.load_json("SELECT record FROM operations ORDER BY created_ms")
    }

    /// Forgets finished operations created before `before_ms`.
    pub fn prune_operations(&self, before_ms: u64) -> Result<usize, StoreError> {
        Ok(self.conn.lock().expect("store lock").execute(
            "DELETE FROM operations WHERE state != 'running' AND created_ms < ?1",
            params![before_ms as i64],
        )?)
    }

    pub fn put_image(&self, img: &Image) -> Result<(), StoreError> {
        let json = serde_json::to_string(img)?;
        self.conn.lock().expect("store lock").execute(
            "INSERT INTO images (reference, digest, record) VALUES (?1, ?2, ?3)
             ON CONFLICT(reference) DO UPDATE SET digest = ?2, record = ?3",
            params![img.reference, img.digest, json],
        )?;
        Ok(())
    }

    pub fn delete_image(&self, reference: &str) -> Result<(), StoreError> {
        self.conn.lock().expect("store lock").execute("DELETE FROM images WHERE reference = ?1", params![reference])?;
        Ok(())
    }

    pub fn image(&self, reference: &str) -> Result<Option<Image>, StoreError> {
        let conn = self.conn.lock().expect("store lock");
        let json: Option<String> = conn
            .query_row("SELECT record FROM images WHERE reference = ?1", params![reference], |r| r.get(0))
            .optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    pub fn load_images(&self) -> Result<Vec<Image>, StoreError> {
        self.load_json("SELECT record FROM images ORDER BY reference")
    }

    fn load_json<T: serde::de::DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>, StoreError> {
        let conn = self.conn.lock().expect("store lock");
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(serde_json::from_str(&row?)?);
        }
        Ok(out)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let conn = self.conn.lock().expect("store lock");
        Ok(conn.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get(0)).optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.lock().expect("store lock").execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
            params![key, value],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::{BackendKind, NetworkMode, Resources, SandboxState, Timestamp};

    fn rec(id: &str) -> SandboxRecord {
        SandboxRecord {
            sandbox: Sandbox {
                id: id.into(),
                name: format!("n-{id}"),
                image: "host".into(),
                backend: BackendKind::Process,
                state: SandboxState::Running,
                resources: Resources::default(),
                labels: Default::default(),
                env: Default::default(),
                network: NetworkMode::None,
                created_at: Timestamp(5),
                delete_at: None,
                idle_ttl_s: None,
                error: None,
                steps: vec![],
            },
            uid_slot: 3,
            pid: Some(42),
            start_time: Some(7),
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn node_db_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let s = Store::open(&path).unwrap();
        s.put(&rec("a")).unwrap();
        for f in ["node.db", "node.db-wal", "node.db-shm"] {
            assert_eq!(mode(&dir.path().join(f)), 0o600, "{f}");
        }
    }

    #[test]
    fn an_existing_world_readable_node_db_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        {
            let s = Store::open(&path).unwrap();
            s.put(&rec("a")).unwrap();
        }
        // As an older node left it (and a crash may leave a WAL behind).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let wal = dir.path().join("node.db-wal");
        std::fs::write(&wal, b"").unwrap();
        std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load_all().unwrap().len(), 1);
        for f in ["node.db", "node.db-wal", "node.db-shm"] {
            assert_eq!(mode(&dir.path().join(f)), 0o600, "{f}");
        }
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        {
            let s = Store::open(&path).unwrap();
            s.put(&rec("a")).unwrap();
            let mut b = rec("b");
            s.put(&b).unwrap();
            b.sandbox.state = SandboxState::Stopped;
            s.put(&b).unwrap();
            s.delete("a").unwrap();
            s.set_meta("node_id", "xyz").unwrap();
        }
        let s = Store::open(&path).unwrap();
        let all = s.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].sandbox.state, SandboxState::Stopped);
        assert_eq!(s.meta("node_id").unwrap().as_deref(), Some("xyz"));
        assert_eq!(s.meta("nope").unwrap(), None);
    }
}
