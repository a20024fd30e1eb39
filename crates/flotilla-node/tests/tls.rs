//! The node API over TCP (issue 4, item 7): TLS with a self-signed
//! certificate made on first start, and a bearer token on every request.
//!
//! Each test serves a tiny router with [`serve_tls`] in-process and talks
//! to it through the real client (`HttpClient` with `Endpoint::Https`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ws::{Message as WsMessage, WebSocketUpgrade};
use axum::routing::get;
use bytes::Bytes;
use flotilla_agent::http::{ClientError, Endpoint, HttpClient, error_chain, read_body};
use flotilla_api::ErrorCode;
use flotilla_node::tls::{IdentitySource, TlsIdentity, load_or_generate_token, serve_tls};
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// How long any one step may take before the test fails.
const STEP: Duration = Duration::from_secs(10);

struct Server {
    addr: std::net::SocketAddr,
    identity: TlsIdentity,
    token: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(dir: &Path) -> Server {
        Server::start_on(dir, "127.0.0.1:0").await
    }

    async fn start_on(dir: &Path, bind: &str) -> Server {
        Server::start_with(TlsIdentity::load_or_generate(dir, None, None, &[]).unwrap(), dir, bind).await
    }

    async fn start_with(identity: TlsIdentity, dir: &Path, bind: &str) -> Server {
        let token = load_or_generate_token(dir).unwrap();
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let router = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/v1/ping", get(|| async { axum::Json(serde_json::json!({"pong": true})) }))
            .route("/v1/echo", get(echo));
        let task = tokio::spawn({
            let identity = identity.clone();
            let token = token.clone();
            async move {
                serve_tls(router, listener, &identity, token, async move {
                    let _ = stopped.await;
                })
                .await
            }
        });
        Server { addr, identity, token, stop: Some(stop), task }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Https(self.addr.to_string())
    }

    /// A client that trusts the node's certificate file.
    fn client(&self, token: Option<&str>) -> HttpClient {
        HttpClient::new(self.endpoint())
            .with_tls_ca(self.identity.cert_path())
            .unwrap()
            .with_token(token.map(String::from))
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(STEP, self.task).await.expect("serve_tls stops").unwrap().unwrap();
    }
}

/// A WebSocket that answers every text message with the same text.
async fn echo(ws: WebSocketUpgrade) -> axum::response::Response {
    ws.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if let WsMessage::Text(t) = msg
                && socket.send(WsMessage::Text(t)).await.is_err()
            {
                break;
            }
        }
    })
}

async fn ping(client: &HttpClient) -> Result<serde_json::Value, ClientError> {
    tokio::time::timeout(STEP, client.json(Method::GET, "/v1/ping", None::<&()>)).await.expect("answer in time")
}

fn assert_unauthorized(result: Result<serde_json::Value, ClientError>) {
    match result {
        Err(ClientError::Api(e)) => assert_eq!(e.code, ErrorCode::Unauthorized, "{e}"),
        other => panic!("expected an unauthorized error, got {other:?}"),
    }
}

#[tokio::test]
async fn requests_without_the_token_are_refused_with_the_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let client = server.client(None);

    let resp =
        client.send(client.request(Method::GET, "/v1/ping").body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers().get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");
    let body: serde_json::Value = serde_json::from_slice(&read_body(resp).await.unwrap()).unwrap();
    assert_eq!(body["code"], "unauthorized", "{body}");
    assert!(!body.to_string().contains(&server.token));

    // Unknown paths too: the check comes before routing.
    let resp =
        client.send(client.request(Method::GET, "/v1/nothing").body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_unauthorized(ping(&client).await);
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    assert_unauthorized(ping(&server.client(Some("0000000000000000000000000000"))).await);
    // A prefix of the right token is no better.
    assert_unauthorized(ping(&server.client(Some(&server.token[..40]))).await);
    server.stop().await;
}

#[tokio::test]
async fn the_right_token_passes_with_the_certificate_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let pong = ping(&server.client(Some(&server.token))).await.unwrap();
    assert_eq!(pong, serde_json::json!({"pong": true}));
    server.stop().await;
}

#[tokio::test]
async fn healthz_needs_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let client = server.client(None);
    let resp =
        client.send_ok(client.request(Method::GET, "/healthz").body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    assert_eq!(read_body(resp).await.unwrap(), "ok");
    server.stop().await;
}

#[tokio::test]
async fn the_right_token_passes_with_a_pinned_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let client = HttpClient::new(server.endpoint())
        .with_cert_sha256(server.identity.fingerprint())
        .unwrap()
        .with_token(Some(server.token.clone()));
    assert_eq!(ping(&client).await.unwrap(), serde_json::json!({"pong": true}));
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_pin_fails_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let client = HttpClient::new(server.endpoint())
        .with_cert_sha256(&"ab".repeat(32))
        .unwrap()
        .with_token(Some(server.token.clone()));
    match ping(&client).await {
        Err(e @ ClientError::Connect { .. }) => {
            let text = error_chain(&e);
            assert!(text.contains(server.identity.fingerprint()) && text.contains("pinned"), "{text}");
        }
        other => panic!("expected a failed handshake, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn the_certificate_file_checks_the_host_name() {
    // 127.0.0.2 is loopback too, but not among the certificate's names.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(dir.path(), "127.0.0.2:0").await;
    match ping(&server.client(Some(&server.token))).await {
        Err(e @ ClientError::Connect { .. }) => assert!(error_chain(&e).contains("certificate"), "{}", error_chain(&e)),
        other => panic!("expected a name mismatch, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn a_client_with_no_trust_configured_refuses_the_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let client = HttpClient::new(server.endpoint()).with_token(Some(server.token.clone()));
    assert!(matches!(ping(&client).await, Err(ClientError::Connect { .. })));
    server.stop().await;
}

#[test]
fn the_key_is_private_and_the_identity_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let first = TlsIdentity::load_or_generate(dir.path(), None, None, &["node1.example".into()]).unwrap();
    assert_eq!(first.source(), IdentitySource::Generated);
    let mode = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("key.pem"), 0o600);
    assert_eq!(mode("cert.pem") & 0o600, 0o600);
    assert_eq!(mode("cert.pem") & 0o022, 0);

    let second = TlsIdentity::load_or_generate(dir.path(), None, None, &[]).unwrap();
    assert_eq!(second.source(), IdentitySource::Reused);
    assert_eq!(second.fingerprint(), first.fingerprint());
    assert_eq!(second.certificate(), first.certificate());

    // The operator's own pair loads from anywhere.
    let given = TlsIdentity::load_or_generate(
        Path::new("/nonexistent"),
        Some(&dir.path().join("cert.pem")),
        Some(&dir.path().join("key.pem")),
        &[],
    )
    .unwrap();
    assert_eq!(given.source(), IdentitySource::Given);
    assert_eq!(given.fingerprint(), first.fingerprint());

    // A key others can read is refused rather than served.
    std::fs::set_permissions(dir.path().join("key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = TlsIdentity::load_or_generate(dir.path(), None, None, &[]).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[tokio::test]
async fn a_websocket_works_through_tls() {
    use tokio_tungstenite::tungstenite::handshake::client::generate_key;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let client = server.client(Some(&server.token));
    let req = client
        .request(Method::GET, "/v1/echo")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, generate_key())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.send_ok(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    ws.send(Message::text("hello through tls")).await.unwrap();
    let back = tokio::time::timeout(STEP, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(back, Message::text("hello through tls"));
    ws.close(None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_silent_client_does_not_hold_up_others() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    // Connected but never starting a handshake (nor a plain-HTTP client
    // on the TLS port, which fails its handshake at once).
    let _silent: Vec<tokio::net::TcpStream> =
        futures_util::future::try_join_all((0..8).map(|_| tokio::net::TcpStream::connect(server.addr))).await.unwrap();
    let plain = HttpClient::new(Endpoint::Tcp(server.addr.to_string()));
    assert!(ping(&plain).await.is_err());

    let started = Instant::now();
    ping(&server.client(Some(&server.token))).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    server.stop().await;
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let addr = server.addr;
    ping(&server.client(Some(&server.token))).await.unwrap();
    server.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
}

/// A CA and a client certificate it issued (with `clientAuth`), as PEM
/// files in `dir`: `NAME-ca.pem`, `NAME-client.pem`, `NAME-client.key`.
fn client_pki(dir: &Path, name: &str) {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf.distinguished_name.push(rcgen::DnType::CommonName, "coordinator");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join(format!("{name}-ca.pem")), ca_cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}-client.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}-client.key")), key.serialize_pem()).unwrap();
}

#[tokio::test]
async fn a_certificate_from_the_client_ca_stands_in_for_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    client_pki(d, "fleet");
    client_pki(d, "other");
    let identity =
        TlsIdentity::load_or_generate(d, None, None, &[]).unwrap().with_client_ca(&d.join("fleet-ca.pem")).unwrap();
    let server = Server::start_with(identity, d, "127.0.0.1:0").await;
    let with_cert = |name: &str| {
        let tls = flotilla_agent::http::TlsClientConfig::pinned(server.identity.fingerprint())
            .unwrap()
            .with_client_cert(&d.join(format!("{name}-client.pem")), &d.join(format!("{name}-client.key")))
            .unwrap();
        HttpClient::new(server.endpoint()).with_tls(tls)
    };
    // The fleet's certificate, no token: in.
    assert_eq!(ping(&with_cert("fleet")).await.unwrap(), serde_json::json!({"pong": true}));
    // No certificate: the token is still asked for, and still works.
    assert_unauthorized(ping(&server.client(None)).await);
    assert_eq!(ping(&server.client(Some(&server.token))).await.unwrap(), serde_json::json!({"pong": true}));
    // Another CA's certificate: the handshake fails, token or not.
    match ping(&with_cert("other").with_token(Some(server.token.clone()))).await {
        Err(ClientError::Connect { .. } | ClientError::Http { .. }) => {}
        other => panic!("expected a refused handshake, got {other:?}"),
    }
    server.stop().await;
}

#[test]
fn a_client_ca_file_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let identity = TlsIdentity::load_or_generate(dir.path(), None, None, &[]).unwrap();
    let err = identity.with_client_ca(&dir.path().join("empty.pem")).unwrap_err();
    assert!(err.to_string().contains("empty.pem"), "{err}");
}
