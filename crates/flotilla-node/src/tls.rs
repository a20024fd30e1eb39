//! The node API over TCP: TLS with a bearer token.
//!
//! The Unix socket is guarded by its file mode (0600); a TCP port has no
//! such guard, so every request on it must carry `Authorization: Bearer
//! <token>` inside a TLS connection. Only `GET /healthz` stays open, so a
//! load balancer or a probe can see that the node is up without a secret.
//!
//! With a client CA ([`TlsIdentity::with_client_ca`], the node's
//! `--client-ca`), the handshake asks for a client certificate: one that
//! chains to that CA stands in for the token, so one coordinator holding a
//! certificate from the fleet's CA reaches every node with no per-node
//! secret. A certificate from any other CA fails the handshake; a client
//! with none still gets in with the token.
//!
//! # Identity
//!
//! [`TlsIdentity::load_or_generate`] takes the operator's certificate and
//! key when given. Otherwise it keeps a self-signed certificate in the
//! node's TLS directory (`cert.pem`, `key.pem`), generated on the first
//! start and reused afterwards, so that clients that trust it (with `--ca
//! cert.pem` or `--cert-sha256 FINGERPRINT`) keep working across restarts.
//! Delete both files to make a new one. The key and the token are created
//! with mode 0600 from the start, never widened afterwards, and refused if
//! someone made them readable by others.
//!
//! # Serving
//!
//! [`serve_tls`] runs its own accept loop rather than `axum::serve`,
//! because a TLS handshake is a network round trip under the client's
//! control: each connection gets its own task, the handshake a deadline
//! ([`HANDSHAKE_TIMEOUT`]), and the number of handshakes in flight a cap
//! ([`MAX_PENDING_HANDSHAKES`]), so a slow or hostile client never holds up
//! the next `accept`; open connections are capped as on every TCP port
//! ([`flotilla_agent::serve::MAX_OPEN_TCP`]: past it, new ones wait in the
//! kernel's backlog). Each connection is served as HTTP/1.1 with upgrades
//! (WebSocket sessions are tunnelled through the node). On shutdown the
//! loop stops accepting, asks open connections to finish the request in
//! hand, and drops whatever is still open after [`SHUTDOWN_GRACE`].
//! Connections already upgraded (sessions) belong to the handlers that
//! took them over: they end when their sandbox stops.
//!
//! No secret is ever logged: not the token, not the key.

use std::convert::Infallible;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse;
use flotilla_agent::http::{HttpError, cert_fingerprint};
use flotilla_agent::serve::accept_error;
use flotilla_agent::token::{AuthFailure, BearerToken};
use flotilla_api::{ApiError, ErrorCode};
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// How long a client has to finish the TLS handshake. A real client needs
/// one or two round trips; ten seconds covers a slow link and still frees
/// the slot of a client that connects and says nothing.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in flight at once; past this, new connections are closed at
/// once instead of queued, so a flood of silent clients costs us at most
/// this many tasks for [`HANDSHAKE_TIMEOUT`] and never blocks `accept`.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// How long a connection may take to send a request's headers (the
/// slow-loris guard of HTTP/1; bodies are streamed and may take longer).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long shutdown waits for open connections to finish before dropping
/// them: long enough for an ordinary request, short enough that stopping a
/// node is not held up by a client streaming a large tarball.
pub use flotilla_agent::serve::SHUTDOWN_GRACE;

/// Shortest token accepted from an operator (see `flotilla_agent::token`).
pub use flotilla_agent::token::MIN_TOKEN_LEN;

/// File names inside the TLS directory.
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";
const TOKEN_FILE: &str = "token";

/// Why the TLS identity or the token could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("creating directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    #[error("parsing PEM in {path}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("give both a certificate and its key, or neither")]
    HalfIdentity,
    #[error(
        "{path} has mode {mode:o}, readable by others: run `chmod 600 {path}` (and replace the secret if others read it)"
    )]
    InsecureMode { path: PathBuf, mode: u32 },
    #[error("generating a self-signed certificate")]
    Generate(#[source] rcgen::Error),
    #[error("the certificate and key are not usable together")]
    Config(#[source] rustls::Error),
    #[error("{path} holds no CA certificate to check clients' certificates against")]
    NoClientCa { path: PathBuf },
    #[error("checking client certificates against {path}")]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("reading random bytes for a token")]
    Random(#[source] std::io::Error),
    #[error("bad token: {0}")]
    BadToken(&'static str),
}

/// Where a [`TlsIdentity`] came from, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// The operator's `--tls-cert` and `--tls-key`.
    Given,
    /// The self-signed certificate from an earlier start.
    Reused,
    /// A self-signed certificate made just now.
    Generated,
}

/// The node's TLS certificate and key, ready to serve.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    config: Arc<ServerConfig>,
    leaf: CertificateDer<'static>,
    fingerprint: String,
    cert_path: PathBuf,
    key_path: PathBuf,
    source: IdentitySource,
}

impl TlsIdentity {
    /// Loads `cert` and `key` (PEM) when both are given; otherwise reuses
    /// or generates the self-signed pair in `dir`. `extra_names` are added
    /// to a generated certificate's subject alternative names (DNS names or
    /// IP addresses the node is reached by) besides `localhost`,
    /// `127.0.0.1`, `::1` and the host name. A reused certificate keeps the
    /// names it was made with.
    pub fn load_or_generate(
        dir: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
        extra_names: &[String],
    ) -> Result<TlsIdentity, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => TlsIdentity::load(cert, key, IdentitySource::Given),
            (Some(_), None) | (None, Some(_)) => Err(TlsError::HalfIdentity),
            (None, None) => {
                create_private_dir(dir)?;
                let cert = dir.join(CERT_FILE);
                let key = dir.join(KEY_FILE);
                // Both or nothing: a key without its certificate is what a
                // crash between the two writes leaves, and is replaced.
                if cert.exists() && key.exists() {
                    check_private_mode(&key)?;
                    return TlsIdentity::load(&cert, &key, IdentitySource::Reused);
                }
                generate(dir, &cert, &key, extra_names)?;
                TlsIdentity::load(&cert, &key, IdentitySource::Generated)
            }
        }
    }

    /// The same identity, asking clients for a certificate: one that
    /// chains to a CA in `ca` (PEM) stands in for the bearer token (see
    /// [`serve_tls`]); a client without one still may send the token.
    pub fn with_client_ca(self, ca: &Path) -> Result<TlsIdentity, TlsError> {
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|source| pem_error(ca, source))?;
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TlsError::NoClientCa { path: ca.to_path_buf() });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|source| TlsError::ClientCa { path: ca.to_path_buf(), source })?;
        let (chain, key) = read_pair(&self.cert_path, &self.key_path)?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsIdentity { config: Arc::new(config), ..self })
    }

    fn load(cert_path: &Path, key_path: &Path, source: IdentitySource) -> Result<TlsIdentity, TlsError> {
        let (chain, key) = read_pair(cert_path, key_path)?;
        let leaf = chain[0].clone();
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsIdentity {
            config: Arc::new(config),
            fingerprint: cert_fingerprint(&leaf),
            leaf,
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            source,
        })
    }

    /// SHA-256 of the (leaf) certificate, lowercase hex: what a client pins
    /// with `--cert-sha256`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The certificate file: what a client trusts with `--ca`.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The leaf certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.leaf
    }

    pub fn source(&self) -> IdentitySource {
        self.source
    }

    /// The rustls configuration serving this identity.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }
}

/// A certificate chain (leaf first, never empty) and its key, from PEM.
fn read_pair(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| pem_error(cert_path, source))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_path.to_path_buf() });
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| pem_error(key_path, source))?;
    Ok((chain, key))
}

fn pem_error(path: &Path, source: rustls::pki_types::pem::Error) -> TlsError {
    match source {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Read { path: path.to_path_buf(), source },
        source => TlsError::Pem { path: path.to_path_buf(), source },
    }
}

/// Makes a self-signed ECDSA P-256 certificate for this host and writes the
/// key (0600, created that way) before the certificate (0644).
fn generate(dir: &Path, cert_path: &Path, key_path: &Path, extra_names: &[String]) -> Result<(), TlsError> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(hostname());
    for n in extra_names {
        if !n.is_empty() && !names.contains(n) {
            names.push(n.clone());
        }
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(TlsError::Generate)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "flotilla node");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().map_err(TlsError::Generate)?;
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
    write_file_atomically(dir, key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file_atomically(dir, cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed TLS certificate");
    Ok(())
}

/// The kernel's host name, when it is one a certificate can carry.
fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then(|| name.to_string())
}

/// Creates `dir` (and parents) as 0700 if it does not exist.
fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TlsError::CreateDir { path: dir.to_path_buf(), source })
}

/// Refuses a secret file that group or others may read or write.
fn check_private_mode(path: &Path) -> Result<(), TlsError> {
    let mode = std::fs::metadata(path)
        .map_err(|source| TlsError::Read { path: path.to_path_buf(), source })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::InsecureMode { path: path.to_path_buf(), mode });
    }
    Ok(())
}

/// Writes `data` to a temporary file created with `mode` (so a secret is
/// never readable by others, not even for a moment), syncs it and renames
/// it over `path`: a crash leaves the old file or the new one, never half.
fn write_file_atomically(dir: &Path, path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    let err = |source| TlsError::Write { path: path.to_path_buf(), source };
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(err)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)?;
    // Make the rename durable; a failure here loses nothing we rely on.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The token in `<dir>/token`, created (0600, 32 random bytes as hex) if
/// there is none. Use it when the operator gives no token of their own.
pub fn load_or_generate_token(dir: &Path) -> Result<String, TlsError> {
    create_private_dir(dir)?;
    let path = dir.join(TOKEN_FILE);
    if path.exists() {
        check_private_mode(&path)?;
        let text = std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path: path.clone(), source })?;
        let token = text.trim().to_string();
        check_token(&token)?;
        return Ok(token);
    }
    let token = flotilla_agent::token::generate_token().map_err(TlsError::Random)?;
    write_file_atomically(dir, &path, format!("{token}\n").as_bytes(), 0o600)?;
    tracing::info!(path = %path.display(), "generated an API token");
    Ok(token)
}

/// Checks that a token can travel in a header and is not trivially short.
/// The error never contains the token.
pub fn check_token(token: &str) -> Result<(), TlsError> {
    flotilla_agent::token::check_token(token).map_err(TlsError::BadToken)
}

/// The API token, checked in constant time ([`BearerToken`]); only
/// `GET /healthz` passes without it.
struct BearerAuth {
    expected: BearerToken,
}

impl BearerAuth {
    fn new(token: &str) -> BearerAuth {
        BearerAuth { expected: BearerToken::new(token) }
    }

    /// Whether a request may pass: `GET /healthz` always, everything else
    /// with the right `Authorization: Bearer` header.
    fn check(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), AuthFailure> {
        if method == Method::GET && path == "/healthz" {
            return Ok(());
        }
        self.expected.check(headers)
    }
}

fn unauthorized(failure: AuthFailure) -> Response<Body> {
    let message = match failure {
        AuthFailure::Missing => "this API needs an `Authorization: Bearer <token>` header",
        AuthFailure::Wrong => "the bearer token is not valid",
    };
    let mut resp = HttpError(ApiError::new(ErrorCode::Unauthorized, message)).into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Serves `router` on `listener` over TLS with `identity`, requiring
/// `token` as a bearer token on every request but `GET /healthz`, until
/// `shutdown` resolves. Fails only if the token is unusable; accept and
/// connection errors are logged and survived.
pub async fn serve_tls(
    router: axum::Router,
    listener: TcpListener,
    identity: &TlsIdentity,
    token: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    check_token(&token).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let auth = BearerAuth::new(&token);
    drop(token);
    serve(router, listener, identity, Some(auth), shutdown).await
}

/// [`serve_tls`] with no bearer token: `router` guards itself (the name
/// table, whose reads are open and whose writes check their own token).
pub async fn serve_tls_open(
    router: axum::Router,
    listener: TcpListener,
    identity: &TlsIdentity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve(router, listener, identity, None, shutdown).await
}

async fn serve(
    router: axum::Router,
    listener: TcpListener,
    identity: &TlsIdentity,
    auth: Option<BearerAuth>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        acceptor: TlsAcceptor::from(identity.server_config()),
        service: TowerToHyperService::new(router),
        auth,
        handshakes: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
    });
    let open = Arc::new(Semaphore::new(flotilla_agent::serve::MAX_OPEN_TCP));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, fingerprint = identity.fingerprint(), "serving over TLS");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let (tcp, peer, open) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Reap finished connections so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = async {
                let permit = open.clone().acquire_owned().await.expect("never closed");
                (listener.accept().await, permit)
            } => match accepted {
                (Ok((tcp, peer)), permit) => (tcp, peer, permit),
                (Err(e), _) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many TLS handshakes in flight; closing the connection");
            continue;
        };
        let conn = serve_connection(shared.clone(), tcp, peer, permit, stop_rx.clone());
        connections.spawn(async move {
            conn.await;
            drop(open);
        });
    }
    drop(listener);
    flotilla_agent::serve::drain(stop_tx, connections).await;
    Ok(())
}

/// What every connection task needs.
struct Shared {
    acceptor: TlsAcceptor,
    service: TowerToHyperService<axum::Router>,
    /// `None`: the router checks its own requests.
    auth: Option<BearerAuth>,
    handshakes: Arc<Semaphore>,
}

/// One connection: the handshake under a deadline, then HTTP/1.1 with
/// upgrades until the client is done or the server stops.
async fn serve_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, shared.acceptor.accept(tcp));
    let tls = tokio::select! {
        done = handshake => match done {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        // Nothing was asked on this connection yet: nothing to finish.
        _ = stop.wait_for(|stopping| *stopping) => return,
    };
    drop(permit);
    // A client certificate is only ever present once the verifier of
    // `--client-ca` has checked its chain: it stands in for the token.
    let certified = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
    let svc_shared = shared.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = svc_shared.clone();
        async move {
            let Some(auth) = shared.auth.as_ref().filter(|_| !certified) else {
                return shared.service.call(req).await;
            };
            if let Err(failure) = auth.check(req.method(), req.uri().path(), req.headers()) {
                tracing::debug!(%peer, method = %req.method(), path = req.uri().path(), "refused: {failure:?} token");
                return Ok::<_, Infallible>(unauthorized(failure));
            }
            shared.service.call(req).await
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(flotilla_agent::extract::header_timeout());
    let mut conn = pin!(builder.serve_connection(TokioIo::new(tls), service).with_upgrades());
    tokio::select! {
        done = conn.as_mut() => {
            if let Err(e) = done {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        }
        _ = stop.wait_for(|stopping| *stopping) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn bearer_tokens_are_checked() {
        let auth = BearerAuth::new("0123456789abcdef0123");
        let get = Method::GET;
        assert_eq!(auth.check(&get, "/v1/node", &headers(None)), Err(AuthFailure::Missing));
        assert_eq!(auth.check(&get, "/v1/node", &headers(Some("Basic abc"))), Err(AuthFailure::Missing));
        assert_eq!(auth.check(&get, "/v1/node", &headers(Some("Bearer nope"))), Err(AuthFailure::Wrong));
        assert_eq!(auth.check(&get, "/v1/node", &headers(Some("Bearer 0123456789abcdef012"))), Err(AuthFailure::Wrong));
        assert_eq!(auth.check(&get, "/v1/node", &headers(Some("Bearer 0123456789abcdef0123"))), Ok(()));
        assert_eq!(auth.check(&get, "/v1/node", &headers(Some("bearer 0123456789abcdef0123"))), Ok(()));
    }

    #[test]
    fn only_get_healthz_is_open() {
        let auth = BearerAuth::new("0123456789abcdef0123");
        assert_eq!(auth.check(&Method::GET, "/healthz", &headers(None)), Ok(()));
        assert_eq!(auth.check(&Method::POST, "/healthz", &headers(None)), Err(AuthFailure::Missing));
        assert_eq!(auth.check(&Method::GET, "/healthz/x", &headers(None)), Err(AuthFailure::Missing));
    }

    #[test]
    fn short_or_unprintable_tokens_are_refused() {
        assert!(check_token("").is_err());
        assert!(check_token("short").is_err());
        assert!(check_token("0123456789abcdef 0123").is_err());
        assert!(check_token("0123456789abcdef").is_ok());
    }

    #[test]
    fn generated_token_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let t1 = load_or_generate_token(dir.path()).unwrap();
        assert_eq!(t1.len(), 64);
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_generate_token(dir.path()).unwrap(), t1);
        std::fs::set_permissions(dir.path().join(TOKEN_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_or_generate_token(dir.path()), Err(TlsError::InsecureMode { .. })));
    }

    #[test]
    fn half_an_identity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        assert!(matches!(
            TlsIdentity::load_or_generate(dir.path(), Some(&cert), None, &[]),
            Err(TlsError::HalfIdentity)
        ));
    }

    #[test]
    fn a_key_without_its_certificate_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let first = TlsIdentity::load_or_generate(dir.path(), None, None, &[]).unwrap();
        std::fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let second = TlsIdentity::load_or_generate(dir.path(), None, None, &[]).unwrap();
        assert_eq!(second.source(), IdentitySource::Generated);
        assert_ne!(first.fingerprint(), second.fingerprint());
    }
}
