//! PostgreSQL connections for the store.

use super::conn::{Conn, Dialect, Row, SqlError, Value};

/// A PostgreSQL connection (to be written).
pub struct PgConn;

impl PgConn {
    pub fn connect(_url: &str) -> Result<PgConn, SqlError> {
        Err(SqlError::Postgres("not built yet".into()))
    }
}

impl Conn for PgConn {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }
    fn execute(&mut self, _sql: &str, _params: &[Value]) -> Result<u64, SqlError> {
        Err(SqlError::Postgres("not built yet".into()))
    }
    fn query(&mut self, _sql: &str, _params: &[Value]) -> Result<Vec<Row>, SqlError> {
        Err(SqlError::Postgres("not built yet".into()))
    }
    fn batch(&mut self, _sql: &str) -> Result<(), SqlError> {
        Err(SqlError::Postgres("not built yet".into()))
    }
    fn begin(&mut self) -> Result<(), SqlError> {
        Err(SqlError::Postgres("not built yet".into()))
    }
    fn commit(&mut self) -> Result<(), SqlError> {
        Err(SqlError::Postgres("not built yet".into()))
    }
    fn rollback(&mut self) -> Result<(), SqlError> {
        Err(SqlError::Postgres("not built yet".into()))
    }
}
