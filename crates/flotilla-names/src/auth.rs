//! The name table's write token.
//!
//! Reads (resolve, glob, health, metrics, the OpenAPI document) are open:
//! a name table exists to be read. Every write (mount, unmount, and any
//! other method but `GET`/`HEAD`) must carry `Authorization: Bearer
//! <token>`, as the node's TCP listener asks (`flotilla_node::tls`), so
//! that whoever can reach the table cannot mount `nodes/<id>` on their own
//! address. A missing or wrong token is a 401 with the `unauthorized`
//! envelope.
//!
//! The token is the operator's (`--names-token`, `$FLOTILLA_NAMES_TOKEN`)
//! or generated once into a file ([`load_or_generate_token`]) created 0600
//! and refused if someone made it readable by others. It is compared in
//! constant time ([`WriteAuth`]) and never logged.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flotilla_agent::token::BearerToken;
use flotilla_api::{ApiError, ErrorCode};
use http::{HeaderMap, Method};

pub use flotilla_agent::token::{AuthFailure, MIN_TOKEN_LEN};

/// Why a token could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has mode {mode:o}, readable by others: run `chmod 600 {path}` (and replace the token if others read it)"
    )]
    InsecureMode { path: PathBuf, mode: u32 },
    #[error("reading random bytes for a token")]
    Random(#[source] std::io::Error),
    #[error("bad token: {0}")]
    Bad(&'static str),
}

/// Checks that a token can travel in a header and is not trivially short.
/// The error never contains the token.
pub fn check_token(token: &str) -> Result<(), TokenError> {
    flotilla_agent::token::check_token(token).map_err(TokenError::Bad)
}

/// A fresh token: 32 random bytes as hex.
pub fn generate_token() -> Result<String, TokenError> {
    flotilla_agent::token::generate_token().map_err(TokenError::Random)
}

/// The token in `path`, created (0600, see [`generate_token`]) if there is
/// none. The file is written whole under a temporary name and linked into
/// place, so a reader never sees half a token and two processes starting
/// at once agree on one. An existing file readable by group or others is
/// refused.
pub fn load_or_generate_token(path: &Path) -> Result<String, TokenError> {
    if let Some(t) = read_private(path)? {
        return Ok(t);
    }
    let token = generate_token()?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let err = |source| TokenError::Write { path: path.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("token");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            tracing::info!(path = %path.display(), "generated a name table token");
            Ok(token)
        }
        // Someone else made it first: theirs is the token.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_private(path)?.ok_or_else(|| err(std::io::Error::other("the token file vanished")))
        }
        Err(e) => Err(err(e)),
    }
}

/// The token in `path` when there is one: `None` if the file is absent,
/// an error if it is readable by others or holds an unusable token.
fn read_private(path: &Path) -> Result<Option<String>, TokenError> {
    let read_err = |source| TokenError::Read { path: path.to_path_buf(), source };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::InsecureMode { path: path.to_path_buf(), mode });
    }
    let token = std::fs::read_to_string(path).map_err(read_err)?.trim().to_string();
    check_token(&token)?;
    Ok(Some(token))
}

/// The envelope of the 401 for a refused write.
pub fn refusal(failure: AuthFailure) -> ApiError {
    let message = match failure {
        AuthFailure::Missing => "writes to the name table need an `Authorization: Bearer <token>` header",
        AuthFailure::Wrong => "the bearer token is not valid",
    };
    ApiError::new(ErrorCode::Unauthorized, message)
}

/// Checks the bearer token of writes without leaking, through timing, how
/// much of a guess was right: both sides are hashed first, so the
/// comparison always covers 32 bytes whatever the lengths, and it never
/// stops early (the same check as the node's TCP listener).
#[derive(Clone, Debug)]
pub struct WriteAuth {
    expected: BearerToken,
}

impl WriteAuth {
    /// Requires `token` on writes; refuses a token [`check_token`] refuses.
    pub fn new(token: &str) -> Result<WriteAuth, TokenError> {
        check_token(token)?;
        Ok(WriteAuth { expected: BearerToken::new(token) })
    }

    /// Whether a request is a read, open to all: `GET` and `HEAD`.
    pub fn is_read(method: &Method) -> bool {
        method == Method::GET || method == Method::HEAD
    }

    /// Whether a request may pass: reads always, writes with the right
    /// `Authorization: Bearer` header.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), AuthFailure> {
        if WriteAuth::is_read(method) {
            return Ok(());
        }
        self.expected.check(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, header};

    const TOKEN: &str = "0123456789abcdef0123";

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn writes_need_the_bearer_token() {
        let auth = WriteAuth::new(TOKEN).unwrap();
        for m in [Method::PUT, Method::DELETE, Method::POST, Method::PATCH] {
            assert_eq!(auth.check(&m, &headers(None)), Err(AuthFailure::Missing), "{m}");
            assert_eq!(auth.check(&m, &headers(Some("Basic abc"))), Err(AuthFailure::Missing), "{m}");
            assert_eq!(auth.check(&m, &headers(Some("Bearer nope"))), Err(AuthFailure::Wrong), "{m}");
            assert_eq!(auth.check(&m, &headers(Some("Bearer 0123456789abcdef012"))), Err(AuthFailure::Wrong));
            assert_eq!(auth.check(&m, &headers(Some(&format!("Bearer {TOKEN}")))), Ok(()), "{m}");
            assert_eq!(auth.check(&m, &headers(Some(&format!("bearer {TOKEN}")))), Ok(()), "{m}");
        }
    }

    #[test]
    fn reads_are_open() {
        let auth = WriteAuth::new(TOKEN).unwrap();
        assert_eq!(auth.check(&Method::GET, &headers(None)), Ok(()));
        assert_eq!(auth.check(&Method::HEAD, &headers(Some("Bearer wrong"))), Ok(()));
    }

    #[test]
    fn short_or_unprintable_tokens_are_refused() {
        assert!(WriteAuth::new("").is_err());
        assert!(WriteAuth::new("short").is_err());
        assert!(WriteAuth::new("0123456789abcdef 0123").is_err());
        assert!(WriteAuth::new("0123456789abcdef").is_ok());
        assert!(format!("{:?}", WriteAuth::new(TOKEN).unwrap()).contains("redacted"));
    }

    #[test]
    fn names_token_file_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/names.token");
        let t1 = load_or_generate_token(&path).unwrap();
        assert_eq!(t1.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_generate_token(&path).unwrap(), t1);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_or_generate_token(&path), Err(TokenError::InsecureMode { .. })));
    }
}
