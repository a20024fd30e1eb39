//! The one seam between the store's logic and a database: a connection
//! that runs SQL with positional parameters (`$1`, `$2`, … in both
//! dialects) and returns rows of a few plain value kinds.
//!
//! Everything the coordinator stores is an integer, a string or bytes, so
//! the logic in [`super`] is written once and runs the same statements on
//! SQLite and PostgreSQL; only the schema's column types differ
//! ([`Dialect`]).

use std::path::Path;

/// A column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    pub fn int(&self) -> Result<i64, SqlError> {
        match self {
            Value::Int(i) => Ok(*i),
            Value::Null | Value::Text(_) | Value::Blob(_) => {
                Err(SqlError::Type(format!("expected an integer, got {self:?}")))
            }
        }
    }

    pub fn opt_int(&self) -> Result<Option<i64>, SqlError> {
        match self {
            Value::Null => Ok(None),
            Value::Int(i) => Ok(Some(*i)),
            Value::Text(_) | Value::Blob(_) => Err(SqlError::Type(format!("expected an integer, got {self:?}"))),
        }
    }

    pub fn text(&self) -> Result<String, SqlError> {
        match self {
            Value::Text(s) => Ok(s.clone()),
            Value::Null | Value::Int(_) | Value::Blob(_) => Err(SqlError::Type(format!("expected text, got {self:?}"))),
        }
    }

    pub fn opt_text(&self) -> Result<Option<String>, SqlError> {
        match self {
            Value::Null => Ok(None),
            Value::Text(s) => Ok(Some(s.clone())),
            Value::Int(_) | Value::Blob(_) => Err(SqlError::Type(format!("expected text, got {self:?}"))),
        }
    }

    pub fn blob(self) -> Result<Vec<u8>, SqlError> {
        match self {
            Value::Blob(b) => Ok(b),
            Value::Null | Value::Int(_) | Value::Text(_) => {
                Err(SqlError::Type(format!("expected bytes, got {self:?}")))
            }
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v as i64)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Value {
        Value::Blob(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

pub type Row = Vec<Value>;

/// Which SQL the schema is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("sqlite")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("unexpected column type: {0}")]
    Type(String),
    /// The database refused a transaction because another one conflicted
    /// (PostgreSQL serialisation failure, SQLite busy): try the step again.
    #[error("the transaction conflicted with another")]
    Conflict,
}

/// A database connection, used by one thread at a time.
pub trait Conn: Send {
    fn dialect(&self) -> Dialect;
    /// Runs a statement; returns the rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, SqlError>;
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, SqlError>;
    /// Runs several statements without parameters (the schema).
    fn batch(&mut self, sql: &str) -> Result<(), SqlError>;
    /// Starts a transaction that takes its write lock at once (SQLite's
    /// `BEGIN IMMEDIATE`), so two writers never deadlock upgrading.
    fn begin(&mut self) -> Result<(), SqlError>;
    fn commit(&mut self) -> Result<(), SqlError>;
    fn rollback(&mut self) -> Result<(), SqlError>;
}

/// SQLite: WAL, `synchronous=NORMAL`, one connection behind the store's
/// mutex (DESIGN §8 "durable, not slow").
pub struct SqliteConn {
    conn: rusqlite::Connection,
}

impl SqliteConn {
    pub fn open(path: &Path) -> Result<SqliteConn, SqlError> {
        let conn = rusqlite::Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(SqliteConn { conn })
    }

    /// `$N` placeholders become SQLite's `?N`.
    fn sql(sql: &str) -> String {
        sql.replace('$', "?")
    }
}

fn to_sqlite(v: &Value) -> rusqlite::types::Value {
    match v {
        Value::Null => rusqlite::types::Value::Null,
        Value::Int(i) => rusqlite::types::Value::Integer(*i),
        Value::Text(s) => rusqlite::types::Value::Text(s.clone()),
        Value::Blob(b) => rusqlite::types::Value::Blob(b.clone()),
    }
}

fn busy(e: rusqlite::Error) -> SqlError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => SqlError::Conflict,
        _ => SqlError::Sqlite(e),
    }
}

impl Conn for SqliteConn {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, SqlError> {
        let mut st = self.conn.prepare_cached(&Self::sql(sql))?;
        let n = st.execute(rusqlite::params_from_iter(params.iter().map(to_sqlite))).map_err(busy)?;
        Ok(n as u64)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, SqlError> {
        let mut st = self.conn.prepare_cached(&Self::sql(sql))?;
        let cols = st.column_count();
        let mut rows = st.query(rusqlite::params_from_iter(params.iter().map(to_sqlite))).map_err(busy)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(busy)? {
            let mut row = Vec::with_capacity(cols);
            for i in 0..cols {
                row.push(match r.get::<_, rusqlite::types::Value>(i)? {
                    rusqlite::types::Value::Null => Value::Null,
                    rusqlite::types::Value::Integer(i) => Value::Int(i),
                    rusqlite::types::Value::Real(f) => Value::Int(f as i64),
                    rusqlite::types::Value::Text(s) => Value::Text(s),
                    rusqlite::types::Value::Blob(b) => Value::Blob(b),
                });
            }
            out.push(row);
        }
        Ok(out)
    }

    fn batch(&mut self, sql: &str) -> Result<(), SqlError> {
        self.conn.execute_batch(sql).map_err(busy)
    }

    fn begin(&mut self) -> Result<(), SqlError> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(busy)
    }

    fn commit(&mut self) -> Result<(), SqlError> {
        self.conn.execute_batch("COMMIT").map_err(busy)
    }

    fn rollback(&mut self) -> Result<(), SqlError> {
        self.conn.execute_batch("ROLLBACK").map_err(busy)
    }
}
