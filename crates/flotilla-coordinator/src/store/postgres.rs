//! PostgreSQL connections for the store: several coordinators on one
//! database.
//!
//! [`PgConn`] is the synchronous `postgres` client (its own small tokio
//! runtime per connection) behind the store's [`Conn`] seam; the store runs
//! every call on a blocking thread, where that client may block.
//!
//! - Parameters are encoded by the type the server inferred for them
//!   ([`Param`]), so the store's `Value`s need no casts in the SQL.
//! - Rows come back as `Value`s by column type ([`column`]).
//! - Statements are prepared once per connection ([`PgConn::prepared`]).
//! - Transactions are READ COMMITTED: the store's guards are conditional
//!   updates (`UPDATE … WHERE eversion = $2`) and unique keys, which that
//!   level makes safe; serialisation failures and deadlocks come back as
//!   [`SqlError::Conflict`] for the caller to try again.
//!
//! TLS is asked for as libpq asks for it (`sslmode=verify-full&sslrootcert=…`
//! in the address; see [`super::pg_tls`]).

use std::collections::HashMap;
use std::error::Error as StdError;
use std::panic::resume_unwind;
use std::str::FromStr;
use std::thread::ThreadId;
use std::time::Duration;

use bytes::BytesMut;
use postgres::config::SslMode as PgSslMode;
use postgres::error::SqlState;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, Config, NoTls, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::pg_tls::SslMode;

use super::conn::{Conn, Dialect, Row, SqlError, Value};

/// How long a connection attempt may take before it fails: long enough for
/// a busy server, short enough that a wrong address is reported promptly.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server shows in `pg_stat_activity` for our sessions.
const APPLICATION_NAME: &str = "flotilla-coordinator";

/// Prepared statements kept per connection. The store's SQL is a fixed set
/// of a few dozen statements; the bound only guards against a caller that
/// formats values into SQL.
const STATEMENT_CACHE: usize = 256;

/// The types tried for a NULL parameter the server cannot type (see
/// [`PgConn::prepared`]): the store's column types.
const NULL_CANDIDATES: &[Type] = &[Type::TEXT, Type::INT8, Type::BYTEA];

/// A bound on the combinations tried: 3^4, four such parameters.
const MAX_DECLARED_TRIES: usize = 81;

/// How often `batch` runs again after losing a race to create the same
/// catalog object (two coordinators creating the schema at once).
const BATCH_RACE_RETRIES: usize = 3;

/// A PostgreSQL connection.
pub struct PgConn {
    /// Always `Some` until `Drop` takes it.
    client: Option<Client>,
    statements: HashMap<String, Statement>,
    /// The async worker thread this connection was made on, if it was
    /// (see [`PgConn::call`]).
    async_thread: Option<ThreadId>,
}

impl PgConn {
    /// Connects to `url`: `postgres://user[:password]@host:port/db` or the
    /// keyword form (`host=… port=… user=… dbname=…`), with TLS as its
    /// `sslmode` asks (libpq's default, `prefer`, when it says nothing).
    ///
    /// Safe to call from async code too (the store opens its first
    /// connection, and creates the schema with it, on the caller's thread):
    /// the synchronous client blocks on a runtime of its own, which tokio
    /// forbids on another runtime's worker, so there the work is done on a
    /// scoped thread of its own ([`PgConn::call`]).
    pub fn connect(url: &str) -> Result<PgConn, SqlError> {
        let invalid = |e: String| SqlError::Postgres(format!("invalid PostgreSQL address: {e}"));
        let (url, tls) = super::pg_tls::split(url).map_err(invalid)?;
        let mut config = Config::from_str(&url).map_err(|e| invalid(chain(&e)))?;
        let tls = match tls.mode {
            SslMode::Disable => None,
            mode => {
                config.ssl_mode(if mode == SslMode::Prefer { PgSslMode::Prefer } else { PgSslMode::Require });
                Some(MakeRustlsConnect::new(tls.client_config().map_err(invalid)?))
            }
        };
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        let connect = move || {
            match tls {
                Some(tls) => config.connect(tls),
                None => config.connect(NoTls),
            }
            .map_err(|e| {
                SqlError::Postgres(format!("connecting to PostgreSQL at {}: {}", where_to(&config), message(&e)))
            })
        };
        let async_thread = tokio::runtime::Handle::try_current().is_ok().then(|| std::thread::current().id());
        let client = match async_thread {
            Some(_) => std::thread::scope(|s| s.spawn(connect).join()).unwrap_or_else(|p| resume_unwind(p))?,
            None => connect()?,
        };
        Ok(PgConn { client: Some(client), statements: HashMap::new(), async_thread })
    }

    /// Runs `f` with the client: directly on a plain thread (the store's
    /// blocking threads), on a scoped thread when this is the async thread
    /// the connection was made on. Tokio offers no way to ask whether a
    /// thread may block, so the thread is remembered instead: the only
    /// calls made from async code are the store constructor's.
    fn call<T: Send>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send,
    ) -> Result<T, postgres::Error> {
        let client = self.client.as_mut().expect("PgConn's client is only taken by Drop");
        if self.async_thread == Some(std::thread::current().id()) {
            std::thread::scope(|s| s.spawn(|| f(client)).join()).unwrap_or_else(|p| resume_unwind(p))
        } else {
            f(client)
        }
    }

    /// The statement for `sql`, prepared on this connection the first time.
    ///
    /// A parameter the server cannot type from the SQL alone (one only
    /// tested with `IS NULL`, as in `$1 IS NULL OR project = $1`) is
    /// declared instead: by its value's type, or, for a NULL (which any
    /// type can carry), as the first candidate type with which the
    /// statement prepares. Such a statement is cached per pattern of
    /// NULLs. Outside a transaction only: a failed prepare aborts one, and
    /// the server's error is returned then.
    fn prepared(&mut self, sql: &str, values: &[Value]) -> Result<Statement, SqlError> {
        if let Some(st) = self.statements.get(sql) {
            return Ok(st.clone());
        }
        let typed_key = format!("{sql}\0{}", values.iter().map(kind).collect::<Vec<_>>().join(","));
        if let Some(st) = self.statements.get(&typed_key) {
            return Ok(st.clone());
        }
        let (key, st) = match self.call(|c| c.prepare(sql)) {
            Ok(st) => (sql.to_string(), st),
            // "could not determine data type of parameter" comes as
            // 42P08 (ambiguous) or 42P18 (indeterminate).
            Err(e) if matches!(e.code(), Some(c) if *c == SqlState::AMBIGUOUS_PARAMETER || *c == SqlState::INDETERMINATE_DATATYPE) => {
                (typed_key, self.prepare_declared(sql, values).ok_or_else(|| pg(e))?)
            }
            Err(e) => return Err(pg(e)),
        };
        if self.statements.len() >= STATEMENT_CACHE {
            self.statements.clear();
        }
        self.statements.insert(key, st.clone());
        Ok(st)
    }

    /// Prepares `sql` with every parameter's type declared (see
    /// [`PgConn::prepared`]); `None` if no candidate prepares.
    fn prepare_declared(&mut self, sql: &str, values: &[Value]) -> Option<Statement> {
        let candidates: Vec<&[Type]> = values
            .iter()
            .map(|v| match v {
                Value::Null => NULL_CANDIDATES,
                Value::Int(_) => &[Type::INT8][..],
                Value::Text(_) => &[Type::TEXT][..],
                Value::Blob(_) => &[Type::BYTEA][..],
            })
            .collect();
        let tries: usize = candidates.iter().map(|c| c.len()).product();
        for n in 0..tries.min(MAX_DECLARED_TRIES) {
            // The n-th combination, counting in mixed radix.
            let mut rest = n;
            let types: Vec<Type> = candidates
                .iter()
                .map(|c| {
                    let t = c[rest % c.len()].clone();
                    rest /= c.len();
                    t
                })
                .collect();
            if let Ok(st) = self.call(|c| c.prepare_typed(sql, &types)) {
                return Some(st);
            }
        }
        None
    }

    fn simple(&mut self, sql: &str) -> Result<(), SqlError> {
        self.call(|c| c.batch_execute(sql)).map_err(pg)
    }
}

/// The channel coordinators wake each other on (`NOTIFY flotilla, …`).
pub const CHANNEL: &str = "flotilla";

/// How long the listener waits for a notification before it looks at
/// whether its connection is still there.
const LISTEN_CHECK: Duration = Duration::from_secs(2);

/// Listens on [`CHANNEL`] over a connection of its own, on a thread of its
/// own, until `tx` is closed: each notification's payload goes to `tx`.
/// Whenever the connection is (re)made, an empty payload goes first: the
/// receiver catches up on whatever it may have missed meanwhile. A lost
/// connection is made again with back-off (100 ms to 5 s).
pub fn listen(url: String, tx: tokio::sync::mpsc::UnboundedSender<String>) {
    let spawned = std::thread::Builder::new().name("flotilla-pg-listen".into()).spawn(move || {
        let mut pause = Duration::from_millis(100);
        while !tx.is_closed() {
            if let Ok(mut conn) = PgConn::connect(&url) {
                let client = conn.client.as_mut().expect("a new connection has its client");
                if client.batch_execute(&format!("LISTEN {CHANNEL}")).is_ok() {
                    pause = Duration::from_millis(100);
                    if tx.send(String::new()).is_err() {
                        return;
                    }
                    loop {
                        let mut notes = client.notifications();
                        let mut it = notes.timeout_iter(LISTEN_CHECK);
                        while let Ok(Some(n)) = postgres::fallible_iterator::FallibleIterator::next(&mut it) {
                            if tx.send(n.payload().to_string()).is_err() {
                                return;
                            }
                        }
                        drop(it);
                        drop(notes);
                        if client.is_closed() || tx.is_closed() {
                            break;
                        }
                    }
                }
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread for PostgreSQL notifications: peers are heard by polling alone");
    }
}

impl Drop for PgConn {
    /// The client's own runtime must not be shut down (nor its goodbye
    /// sent) from inside an async task, which panics: a store dropped in
    /// async code drops its idle connections there. Such a client is closed
    /// on a thread of its own.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                std::thread::spawn(move || drop(client));
            } else {
                drop(client);
            }
        }
    }
}

/// Where a config points, for error messages: hosts and ports, never the
/// password.
fn where_to(config: &Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            // One port for all hosts, one per host, or the default.
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    let db = config.get_dbname().unwrap_or("(the user's database)");
    let user = config.get_user().unwrap_or("(no user)");
    if hosts.is_empty() {
        format!("(no host), database {db}, user {user}")
    } else {
        format!("{}, database {db}, user {user}", hosts.join(", "))
    }
}

/// An error and its causes on one line.
fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The server's own words (with the SQLSTATE) when it answered, else the
/// client's error and its causes. Neither ever holds the password: the
/// client never prints its config.
fn message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = format!("{} {}: {}", db.code().code(), db.severity(), db.message());
            if let Some(d) = db.detail() {
                m.push_str(" (");
                m.push_str(d);
                m.push(')');
            }
            m
        }
        None => chain(e),
    }
}

/// Maps a client error: the conflicts a retry resolves apart, everything
/// else with its message.
fn pg(e: postgres::Error) -> SqlError {
    match e.code() {
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED => {
            SqlError::Conflict
        }
        _ => SqlError::Postgres(message(&e)),
    }
}

/// Whether `e` is a lost race to create a catalog object that another
/// session created at the same moment. `CREATE … IF NOT EXISTS` only skips
/// objects it can already see: one committed while it waited shows up as a
/// unique violation on a catalog index (`pg_type_typname_nsp_index`,
/// `pg_class_relname_nsp_index`) or as "already exists".
fn lost_create_race(e: &postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else { return false };
    let code = db.code();
    (*code == SqlState::UNIQUE_VIOLATION && db.constraint().is_some_and(|c| c.starts_with("pg_")))
        || *code == SqlState::DUPLICATE_TABLE
        || *code == SqlState::DUPLICATE_OBJECT
}

/// A store value as a statement parameter, encoded by the type the server
/// expects there.
#[derive(Debug)]
struct Param<'a>(&'a Value);

impl ToSql for Param<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match (self.0, ty) {
            (Value::Null, _) => Ok(IsNull::Yes),
            (Value::Int(i), &Type::INT8) => i.to_sql(ty, out),
            (Value::Int(i), &Type::INT4) => i32::try_from(*i)?.to_sql(ty, out),
            (Value::Int(i), &Type::INT2) => i16::try_from(*i)?.to_sql(ty, out),
            (Value::Int(i), &Type::BOOL) => (*i != 0).to_sql(ty, out),
            (Value::Int(i), &Type::TEXT | &Type::VARCHAR) => i.to_string().to_sql(ty, out),
            (Value::Text(s), &Type::TEXT | &Type::VARCHAR | &Type::NAME | &Type::BPCHAR) => s.as_str().to_sql(ty, out),
            (Value::Blob(b), &Type::BYTEA) => b.as_slice().to_sql(ty, out),
            (v, ty) => Err(format!("cannot send {} as {ty}", kind(v)).into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Any type: `to_sql` refuses the combinations it cannot encode.
        true
    }

    to_sql_checked!();
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "NULL",
        Value::Int(_) => "an integer",
        Value::Text(_) => "text",
        Value::Blob(_) => "bytes",
    }
}

/// Column `i` of `row` as a store value, by its type.
fn column(row: &postgres::Row, i: usize) -> Result<Value, SqlError> {
    let col = &row.columns()[i];
    let ty = col.type_();
    let get = |e: postgres::Error| SqlError::Type(format!("column {} ({ty}): {}", col.name(), chain(&e)));
    let v = if *ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i).map_err(get)?.map(Value::Int)
    } else if *ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i).map_err(get)?.map(|v| Value::Int(v.into()))
    } else if *ty == Type::INT2 {
        row.try_get::<_, Option<i16>>(i).map_err(get)?.map(|v| Value::Int(v.into()))
    } else if *ty == Type::BOOL {
        row.try_get::<_, Option<bool>>(i).map_err(get)?.map(|v| Value::Int(v.into()))
    } else if [Type::TEXT, Type::VARCHAR, Type::NAME, Type::BPCHAR].contains(ty) {
        row.try_get::<_, Option<String>>(i).map_err(get)?.map(Value::Text)
    } else if *ty == Type::BYTEA {
        row.try_get::<_, Option<Vec<u8>>>(i).map_err(get)?.map(Value::Blob)
    } else {
        return Err(SqlError::Type(format!("column {} has type {ty}, which the store does not read", col.name())));
    };
    Ok(v.unwrap_or(Value::Null))
}

fn params(values: &[Value]) -> Vec<Param<'_>> {
    values.iter().map(Param).collect()
}

fn refs<'a>(params: &'a [Param<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

impl Conn for PgConn {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&mut self, sql: &str, values: &[Value]) -> Result<u64, SqlError> {
        let st = self.prepared(sql, values)?;
        let p = params(values);
        self.call(|c| c.execute(&st, &refs(&p))).map_err(pg)
    }

    fn query(&mut self, sql: &str, values: &[Value]) -> Result<Vec<Row>, SqlError> {
        let st = self.prepared(sql, values)?;
        let p = params(values);
        let rows = self.call(|c| c.query(&st, &refs(&p))).map_err(pg)?;
        rows.iter().map(|r| (0..r.len()).map(|i| column(r, i)).collect()).collect()
    }

    /// Runs `sql` (several statements, one implicit transaction). A lost
    /// race to create the same object runs it again: by then the winner's
    /// objects are visible and `IF NOT EXISTS` skips them.
    fn batch(&mut self, sql: &str) -> Result<(), SqlError> {
        let mut tries = 0;
        loop {
            match self.call(|c| c.batch_execute(sql)) {
                Ok(()) => return Ok(()),
                Err(e) if tries < BATCH_RACE_RETRIES && lost_create_race(&e) => tries += 1,
                Err(e) => return Err(pg(e)),
            }
        }
    }

    fn begin(&mut self) -> Result<(), SqlError> {
        self.simple("BEGIN")
    }

    fn commit(&mut self) -> Result<(), SqlError> {
        self.simple("COMMIT")
    }

    fn rollback(&mut self) -> Result<(), SqlError> {
        self.simple("ROLLBACK")
    }
}
