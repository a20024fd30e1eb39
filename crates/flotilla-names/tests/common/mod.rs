//! Shared by the integration tests: stores with their etcd, an in-process
//! name table server, and polling with deadlines (never a bare sleep).
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_names::testing::EtcdServer;
use flotilla_names::{EtcdConfig, EtcdStore, MemoryStore, NamesClient, ServerHandle, Store};

/// Starts a throwaway etcd, failing the test loudly if etcd is missing.
pub fn etcd() -> EtcdServer {
    match EtcdServer::start() {
        Ok(e) => e,
        Err(e) => panic!("cannot start a test etcd: {e}"),
    }
}

/// A store and whatever must live as long as it.
pub struct Fixture {
    pub store: Arc<dyn Store>,
    pub etcd: Option<EtcdServer>,
}

pub async fn memory() -> Fixture {
    Fixture { store: Arc::new(MemoryStore::new()), etcd: None }
}

pub async fn etcd_store_on(server: &EtcdServer) -> EtcdStore {
    let config = EtcdConfig::new(server.url()).with_prefix("/test/names/");
    let config =
        EtcdConfig { request_timeout: Duration::from_secs(2), connect_timeout: Duration::from_secs(1), ..config };
    EtcdStore::connect(&config).await.expect("connecting to the test etcd")
}

pub async fn etcd_fixture() -> Fixture {
    let server = etcd();
    let store = etcd_store_on(&server).await;
    Fixture { store: Arc::new(store), etcd: Some(server) }
}

/// A name table server on a free loopback port, and a client of it that
/// sends the table's write token.
pub async fn http_table(store: Arc<dyn Store>) -> (ServerHandle, NamesClient) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let handle = ServerHandle::spawn(listener, store).expect("serving");
    let client = NamesClient::connect(&handle.url()).expect("client").with_token(Some(handle.token().to_string()));
    (handle, client)
}

/// Polls `f` until it returns `Some`, or panics with `what` after
/// `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
