//! HTTP plumbing shared by every Flotilla client and server: the
//! transport (Unix socket, TCP, or TCP with TLS), the error envelope as a
//! response, and frame streams with dead-peer detection.
//!
//! Clients open one HTTP/1.1 connection per request over a Unix socket: a
//! connect there costs tens of microseconds, far below anything else in a
//! request, and it keeps streams (exec, tar) independent of each other.
//!
//! # TLS
//!
//! A remote node (`https://host:port`) usually has a self-signed
//! certificate, which no system CA vouches for. A client trusts it in one
//! of three ways ([`TlsClientConfig`]): the node's certificate (or the CA
//! that issued it) from a PEM file, checked like any web PKI chain including
//! the host name; the SHA-256 fingerprint of the node's certificate,
//! pinned (the name and dates are then not checked, since the operator
//! named the exact certificate, but the handshake signature still proves
//! the server holds its key); or, by default, the system CA bundle.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flotilla_api::{ApiError, ErrorCode, Frame, FrameDecoder};
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// How long a client waits for a TLS handshake to finish: a live server
/// answers within a round trip or two, so a stall means a wrong port or a
/// hung peer, reported instead of waited on forever.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the system CA bundle is looked for (Debian, Fedora, Alpine/BSD),
/// after `$SSL_CERT_FILE`.
const SYSTEM_CA_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
    /// `host:port`, spoken to over TLS.
    Https(String),
    /// A stream some code of ours opens (a microVM's multiplexed serial
    /// channel, say).
    Dial(Dialer),
}

/// A byte stream a [`Dial`] opens.
pub trait DialStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> DialStream for T {}

/// Opens connections to a server that is not at a socket address.
pub trait Dial: Send + Sync + 'static {
    /// A short name for errors and logs (`vm:ID`).
    fn name(&self) -> String;
    fn dial(&self) -> futures_util::future::BoxFuture<'_, std::io::Result<Box<dyn DialStream>>>;
}

/// A shared [`Dial`]; two are equal when they are the same dialer.
#[derive(Clone)]
pub struct Dialer(pub std::sync::Arc<dyn Dial>);

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dialer({})", self.0.name())
    }
}

impl PartialEq for Dialer {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Dialer {}

impl Endpoint {
    /// Parses `unix:///path`, `/path`, `http://host:port`, `https://host:port`.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        if let Some(hp) = s.strip_prefix("http://") {
            return Ok(Endpoint::Tcp(hp.trim_end_matches('/').to_string()));
        }
        if let Some(hp) = s.strip_prefix("https://") {
            let hp = hp.trim_end_matches('/');
            server_name(hp).map_err(|e| format!("bad endpoint {s:?}: {e}"))?;
            return Ok(Endpoint::Https(hp.to_string()));
        }
        Err(format!("bad endpoint {s:?}: use unix:///path/to/node.sock, http://host:port or https://host:port"))
    }

    fn host_header(&self) -> &str {
        match self {
            Endpoint::Unix(_) | Endpoint::Dial(_) => "localhost",
            Endpoint::Tcp(hp) | Endpoint::Https(hp) => hp,
        }
    }
}

/// The name a TLS server at `host:port` must prove it is: the host, or
/// the IP address (`[v6]:port` included).
fn server_name(host_port: &str) -> Result<ServerName<'static>, String> {
    let host = match host_port.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map(|(h, _)| h).ok_or("unclosed [ in the address")?,
        None => host_port.rsplit_once(':').map(|(h, _)| h).unwrap_or(host_port),
    };
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?} is not a host name or IP address: {e}"))
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(hp) => write!(f, "http://{hp}"),
            Endpoint::Https(hp) => write!(f, "https://{hp}"),
            Endpoint::Dial(d) => write!(f, "{}", d.0.name()),
        }
    }
}

/// A connected byte stream to an endpoint (for upgrades and raw use).
pub enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
    /// Boxed: a TLS session's state is some kilobytes, the others a few words.
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
    Dialed(Box<dyn DialStream>),
}

impl Conn {
    /// Connects; an `https` endpoint trusts the system CA bundle.
    pub async fn connect(ep: &Endpoint) -> std::io::Result<Conn> {
        Conn::connect_with(ep, None).await
    }

    /// Connects; an `https` endpoint is trusted as `tls` says (the system
    /// CA bundle when `None`). `tls` is ignored for other endpoints.
    pub async fn connect_with(ep: &Endpoint, tls: Option<&TlsClientConfig>) -> std::io::Result<Conn> {
        Ok(match ep {
            Endpoint::Unix(p) => Conn::Unix(tokio::net::UnixStream::connect(p).await?),
            Endpoint::Tcp(hp) => Conn::Tcp(tcp_connect(hp).await?),
            Endpoint::Dial(d) => Conn::Dialed(d.0.dial().await?),
            Endpoint::Https(hp) => {
                let config = match tls {
                    Some(t) => t.config.clone(),
                    None => TlsClientConfig::system_cached().map_err(std::io::Error::other)?.config,
                };
                let name = server_name(hp).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tcp = tcp_connect(hp).await?;
                let connector = tokio_rustls::TlsConnector::from(config);
                let tls = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await.map_err(
                    |_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}"),
                        )
                    },
                )??;
                Conn::Tls(Box::new(tls))
            }
        })
    }
}

async fn tcp_connect(host_port: &str) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpStream::connect(host_port).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

macro_rules! delegate_io {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Unix($s) => $e,
            Conn::Tcp($s) => $e,
            Conn::Tls($s) => $e,
            Conn::Dialed($s) => $e,
        }
    };
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, s => std::pin::Pin::new(s).poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate_io!(self, s => std::pin::Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, s => std::pin::Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, s => std::pin::Pin::new(s).poll_shutdown(cx))
    }
}

/// Why a TLS client configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("reading certificates from {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no usable certificate")]
    NoCertificate { path: PathBuf },
    #[error("no system CA bundle found (looked at $SSL_CERT_FILE and {})", SYSTEM_CA_BUNDLES.join(", "))]
    NoSystemBundle,
    #[error("bad certificate fingerprint {0:?}: want 64 hex digits (SHA-256), colons allowed")]
    BadFingerprint(String),
    #[error("setting up TLS")]
    Rustls(#[source] rustls::Error),
    #[error("the client certificate {cert} and key {key} do not go together")]
    ClientIdentity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// Which server certificates a client trusts. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TlsClientConfig {
    config: Arc<rustls::ClientConfig>,
}

impl TlsClientConfig {
    /// Trusts the certificates in a PEM file: the node's own self-signed
    /// certificate, or the CA that issued it. The host name is checked.
    pub fn from_ca_file(path: &Path) -> Result<TlsClientConfig, TlsConfigError> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsConfigError::Read { path: path.to_path_buf(), source })?;
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TlsConfigError::NoCertificate { path: path.to_path_buf() });
        }
        TlsClientConfig::finish(client_builder()?.with_root_certificates(roots))
    }

    /// Trusts exactly the server certificate whose SHA-256 is `fingerprint`
    /// (hex, any case, colons allowed, optional `sha256:` prefix).
    pub fn pinned(fingerprint: &str) -> Result<TlsClientConfig, TlsConfigError> {
        let pin = parse_fingerprint(fingerprint)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(PinnedCert { pin, algorithms: provider.signature_verification_algorithms });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsConfigError::Rustls)?;
        TlsClientConfig::finish(builder.dangerous().with_custom_certificate_verifier(verifier))
    }

    /// Trusts the system CA bundle (`$SSL_CERT_FILE` or the usual paths):
    /// for a node whose certificate a real CA issued.
    pub fn system() -> Result<TlsClientConfig, TlsConfigError> {
        TlsClientConfig::from_ca_file(&system_ca_bundle().ok_or(TlsConfigError::NoSystemBundle)?)
    }

    /// The same trust, and this client certificate (PEM chain, leaf first)
    /// and its key shown to servers that ask for one: a node started with
    /// `--client-ca` takes it in place of its bearer token.
    pub fn with_client_cert(self, cert: &Path, key: &Path) -> Result<TlsClientConfig, TlsConfigError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsConfigError::Read { path: cert.to_path_buf(), source })?;
        if chain.is_empty() {
            return Err(TlsConfigError::NoCertificate { path: cert.to_path_buf() });
        }
        let der = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
            .map_err(|source| TlsConfigError::Read { path: key.to_path_buf(), source })?;
        let mut config = (*self.config).clone();
        let certified =
            rustls::sign::CertifiedKey::from_der(chain, der, config.crypto_provider()).map_err(|source| {
                TlsConfigError::ClientIdentity { cert: cert.to_path_buf(), key: key.to_path_buf(), source }
            })?;
        config.client_auth_cert_resolver = Arc::new(ClientCert(Arc::new(certified)));
        Ok(TlsClientConfig { config: Arc::new(config) })
    }

    /// [`TlsClientConfig::system`], read once per process.
    fn system_cached() -> Result<TlsClientConfig, String> {
        static SYSTEM: OnceLock<Result<TlsClientConfig, String>> = OnceLock::new();
        SYSTEM.get_or_init(|| TlsClientConfig::system().map_err(|e| error_chain(&e))).clone()
    }

    fn finish(
        builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    ) -> Result<TlsClientConfig, TlsConfigError> {
        let mut config = builder.with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsClientConfig { config: Arc::new(config) })
    }
}

/// The system's CA bundle: `$SSL_CERT_FILE`, else the first of the usual
/// paths that exists.
pub fn system_ca_bundle() -> Option<PathBuf> {
    let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    env.into_iter().chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from)).find(|p| p.is_file())
}

fn client_builder() -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, TlsConfigError> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Rustls)
}

/// The one certificate a client shows whenever a server asks.
#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// An `https://host:port#sha256=HEX` address, as a node publishes itself
/// in the name table: the address, and the fingerprint of the certificate
/// it serves (`None` when the address carries none).
pub fn split_pin(url: &str) -> (&str, Option<&str>) {
    match url.split_once("#sha256=") {
        Some((addr, pin)) => (addr, Some(pin)),
        None => (url, None),
    }
}

/// The SHA-256 of a certificate (DER) as lowercase hex: the fingerprint
/// the node logs and clients pin.
pub fn cert_fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a SHA-256 fingerprint as printed by the node or by
/// `openssl x509 -fingerprint -sha256` (colons, any case, `sha256:` prefix).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], TlsConfigError> {
    let bad = || TlsConfigError::BadFingerprint(text.to_string());
    let trimmed = text.trim();
    let trimmed = trimmed.get(..7).filter(|p| p.eq_ignore_ascii_case("sha256:")).map_or(trimmed, |_| &trimmed[7..]);
    let digits: Vec<u8> = trimmed.bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Accepts exactly one server certificate, named by its SHA-256, and
/// still checks the handshake signatures, so a server that merely replays
/// the certificate without its key is refused.
#[derive(Debug)]
struct PinnedCert {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

/// The certificate a server presented is not the pinned one. rustls shows
/// this error with `Debug`, so the names are chosen to read as the message.
#[derive(Debug, thiserror::Error)]
#[error("the server presented a certificate with SHA-256 {presented}, not the pinned {pinned}")]
struct CertificateNotPinned {
    presented: String,
    pinned: String,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity).into();
        if got == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(
            CertificateNotPinned { presented: hex(&got), pinned: hex(&self.pin) },
        )))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Errors a client sees.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with {endpoint} failed")]
    Http {
        endpoint: String,
        #[source]
        source: hyper::Error,
    },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("bad response from server: {0}")]
    Decode(String),
    #[error("no data from {0} for {1:?}: the peer is gone or hung")]
    Dead(String, Duration),
}

impl ClientError {
    /// The error as an envelope, for servers relaying a client error.
    pub fn to_api(&self) -> ApiError {
        match self {
            ClientError::Api(e) => e.clone(),
            ClientError::Dead(..) => ApiError::new(ErrorCode::AgentUnreachable, self.to_string()),
            other => ApiError::new(ErrorCode::AgentUnreachable, error_chain(other)),
        }
    }
}

/// `error: cause: cause` in one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A minimal HTTP/1.1 client for one endpoint.
#[derive(Clone)]
pub struct HttpClient {
    endpoint: Endpoint,
    token: Option<String>,
    tls: Option<TlsClientConfig>,
}

/// Written out so that the token never reaches a log.
impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl HttpClient {
    pub fn new(endpoint: Endpoint) -> HttpClient {
        HttpClient { endpoint, token: None, tls: None }
    }

    pub fn with_token(mut self, token: Option<String>) -> HttpClient {
        self.token = token;
        self
    }

    /// Trusts `https` servers as `tls` says (instead of the system CAs).
    pub fn with_tls(mut self, tls: TlsClientConfig) -> HttpClient {
        self.tls = Some(tls);
        self
    }

    /// Trusts `https` servers whose certificate chains to one in `ca_file`.
    pub fn with_tls_ca(self, ca_file: &Path) -> Result<HttpClient, TlsConfigError> {
        Ok(self.with_tls(TlsClientConfig::from_ca_file(ca_file)?))
    }

    /// Trusts only the `https` server certificate with this SHA-256.
    pub fn with_cert_sha256(self, fingerprint: &str) -> Result<HttpClient, TlsConfigError> {
        Ok(self.with_tls(TlsClientConfig::pinned(fingerprint)?))
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Builds a request with the host and auth headers set.
    pub fn request(&self, method: Method, path_and_query: &str) -> http::request::Builder {
        let mut b =
            Request::builder().method(method).uri(path_and_query).header(header::HOST, self.endpoint.host_header());
        if let Some(t) = &self.token
            && let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}"))
        {
            b = b.header(header::AUTHORIZATION, v);
        }
        b
    }

    /// Sends a request on a fresh connection.
    pub async fn send<B>(&self, req: Request<B>) -> Result<http::Response<Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let ep = self.endpoint.to_string();
        let conn = Conn::connect_with(&self.endpoint, self.tls.as_ref())
            .await
            .map_err(|source| ClientError::Connect { endpoint: ep.clone(), source })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
            .await
            .map_err(|source| ClientError::Http { endpoint: ep.clone(), source })?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        sender.send_request(req).await.map_err(|source| ClientError::Http { endpoint: ep, source })
    }

    /// Sends a request and turns a non-2xx response into its `ApiError`.
    pub async fn send_ok<B>(&self, req: Request<B>) -> Result<http::Response<Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let resp = self.send(req).await?;
        if resp.status().is_success() || resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp);
        }
        Err(ClientError::Api(read_error(resp).await))
    }

    /// A JSON request with a JSON answer.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let bytes = read_body(self.json_raw(method, path, body).await?).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// A JSON request whose answer body is ignored.
    pub async fn json_empty(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<(), ClientError> {
        read_body(self.json_raw(method, path, body).await?).await.map(|_| ())
    }

    async fn json_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let b = self.request(method, path);
        let req = match body {
            Some(v) => b
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(serde_json::to_vec(v).expect("serialisable"))))
                .expect("valid request"),
            None => b.body(Full::new(Bytes::new())).expect("valid request"),
        };
        self.send_ok(req).await
    }
}

/// Reads a whole (small) body.
pub async fn read_body(resp: http::Response<Incoming>) -> Result<Bytes, ClientError> {
    resp.into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ClientError::Decode(format!("reading body: {e}")))
}

/// Turns an error response into its envelope (or a synthetic one).
pub async fn read_error(resp: http::Response<Incoming>) -> ApiError {
    let status = resp.status().as_u16();
    match read_body(resp).await {
        Ok(b) => serde_json::from_slice::<ApiError>(&b).unwrap_or_else(|_| {
            ApiError::new(
                ErrorCode::from_http_status(status),
                format!("HTTP {status}: {}", String::from_utf8_lossy(&b)),
            )
        }),
        Err(e) => ApiError::new(ErrorCode::from_http_status(status), format!("HTTP {status}: {e}")),
    }
}

/// Reads frames from a response body, failing if the peer goes silent for
/// longer than [`flotilla_api::limits::STREAM_DEAD_AFTER`] (heartbeats keep
/// a live but idle stream talking).
pub struct FrameStream {
    body: Incoming,
    decoder: FrameDecoder,
    peer: String,
    /// Offset of the next output byte: the stream's start offset plus the
    /// stdout and stderr bytes read so far (what a detached process's
    /// output is resumed from; frame headers do not count).
    pub offset: u64,
    dead_after: Duration,
}

impl FrameStream {
    pub fn new(body: Incoming, peer: impl Into<String>, start_offset: u64) -> FrameStream {
        FrameStream {
            body,
            decoder: FrameDecoder::new(),
            peer: peer.into(),
            offset: start_offset,
            dead_after: flotilla_api::limits::STREAM_DEAD_AFTER,
        }
    }

    pub fn with_dead_after(mut self, d: Duration) -> FrameStream {
        self.dead_after = d;
        self
    }

    /// The next frame (heartbeats included), `None` at a clean end.
    pub async fn next(&mut self) -> Result<Option<Frame>, ClientError> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => {
                    if matches!(f.kind, flotilla_api::FrameKind::Stdout | flotilla_api::FrameKind::Stderr) {
                        self.offset += f.payload.len() as u64;
                    }
                    return Ok(Some(f));
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Decode(e.to_string())),
            }
            let frame = match tokio::time::timeout(self.dead_after, self.body.frame()).await {
                Err(_) => return Err(ClientError::Dead(self.peer.clone(), self.dead_after)),
                Ok(None) => {
                    return match self.decoder.finish() {
                        Ok(()) => Ok(None),
                        Err(e) => Err(ClientError::Decode(e.to_string())),
                    };
                }
                Ok(Some(Err(e))) => return Err(ClientError::Decode(format!("stream from {} broke: {e}", self.peer))),
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                self.decoder.push(&data);
            }
        }
    }
}

/// An `ApiError` as an HTTP response (the orphan rule keeps the impl here).
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}

/// Content type of frame streams.
pub const FRAMES_CONTENT_TYPE: &str = "application/vnd.flotilla.frames";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(Endpoint::parse("/a/node.sock").unwrap(), Endpoint::Unix("/a/node.sock".into()));
        assert_eq!(Endpoint::parse("unix:///a/b").unwrap(), Endpoint::Unix("/a/b".into()));
        assert_eq!(Endpoint::parse("http://127.0.0.1:7000/").unwrap(), Endpoint::Tcp("127.0.0.1:7000".into()));
        assert!(Endpoint::parse("ftp://x").is_err());
        assert_eq!(Endpoint::parse("https://node1:7443/").unwrap(), Endpoint::Https("node1:7443".into()));
        assert_eq!(Endpoint::parse("https://[::1]:7443").unwrap(), Endpoint::Https("[::1]:7443".into()));
        assert_eq!(Endpoint::parse("https://node1:7443").unwrap().to_string(), "https://node1:7443");
        assert!(Endpoint::parse("https://bad name:1").is_err());
    }

    #[test]
    fn tls_server_names_come_from_the_host() {
        let ip = |s: &str| ServerName::IpAddress(s.parse::<std::net::IpAddr>().unwrap().into());
        assert_eq!(server_name("127.0.0.1:7443").unwrap(), ip("127.0.0.1"));
        assert_eq!(server_name("[::1]:7443").unwrap(), ip("::1"));
        assert_eq!(server_name("node1.example:7443").unwrap(), ServerName::try_from("node1.example").unwrap());
        assert!(server_name("[::1:7443").is_err());
    }

    #[test]
    fn fingerprints_parse_in_common_spellings() {
        let der = b"not really a certificate";
        let fp = cert_fingerprint(der);
        assert_eq!(fp.len(), 64);
        let want: [u8; 32] = Sha256::digest(der).into();
        assert_eq!(parse_fingerprint(&fp).unwrap(), want);
        assert_eq!(parse_fingerprint(&fp.to_uppercase()).unwrap(), want);
        let colons: Vec<String> = fp.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        assert_eq!(parse_fingerprint(&format!("SHA256:{}", colons.join(":"))).unwrap(), want);
        assert!(parse_fingerprint(&fp[..62]).is_err());
        assert!(parse_fingerprint(&format!("{}zz", &fp[..62])).is_err());
        assert!(parse_fingerprint("").is_err());
    }

    #[test]
    fn debug_output_hides_the_token() {
        let c = HttpClient::new(Endpoint::Tcp("h:1".into())).with_token(Some("s3cret-s3cret-s3cret".into()));
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
