//! Regression tests for the two-lock discipline (DESIGN §5, seed 001):
//! a stalled import never holds the lifecycle lock; imports into one
//! sandbox never overlap; an export waits for an import in flight.
//!
//! They drive the real node core with a fake backend whose import blocks
//! on a gate the test controls.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use flotilla_agent::AgentClient;
use flotilla_agent::http::{ClientError, Endpoint, HttpClient};
use flotilla_api::{
    ApiError, BackendInfo, BackendKind, CreateSandboxRequest, ImportSummary, Resources, SandboxState, WorkspaceQuery,
};
use flotilla_node::store::SandboxRecord;
use flotilla_node::{Backend, Node, NodeConfig};
use tokio::sync::{Notify, Semaphore};

struct Fake {
    active: AtomicUsize,
    max_active: AtomicUsize,
    started: Notify,
    gate: Semaphore,
    log: Mutex<Vec<String>>,
}

impl Default for Fake {
    fn default() -> Self {
        Fake {
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            started: Notify::new(),
            gate: Semaphore::new(0),
            log: Mutex::new(Vec::new()),
        }
    }
}

#[derive(Clone)]
struct FakeHandle;

struct FakeBackend(Arc<Fake>);

impl Backend for FakeBackend {
    type Handle = FakeHandle;

    async fn boot(
        &self,
        _: &SandboxRecord,
        step: &(dyn Fn(&str, Option<String>) + Send + Sync),
    ) -> Result<FakeHandle, ApiError> {
        step("created", None);
        Ok(FakeHandle)
    }
    fn adopt(&self, _: &SandboxRecord) -> Option<FakeHandle> {
        None
    }
    fn identity(&self, _: &FakeHandle) -> (i32, u64) {
        (1, 1)
    }
    async fn exited(&self, _: &FakeHandle) -> (bool, String) {
        std::future::pending().await
    }
    async fn kill(&self, _: &str, _: &FakeHandle) -> Result<(), ApiError> {
        self.0.log.lock().unwrap().push("kill".into());
        Ok(())
    }
    async fn cleanup(&self, _: &str) {}
    fn destroy(&self, _: &str) -> Result<(), ApiError> {
        Ok(())
    }
    fn set_limits(&self, _: &str, _: &Resources) -> Result<(), ApiError> {
        Ok(())
    }
    fn agent(&self, _: &FakeHandle) -> AgentClient {
        AgentClient::direct(HttpClient::new(Endpoint::Unix("/nonexistent/agent.sock".into())))
    }
    async fn import(
        &self,
        _: AgentClient,
        _: Body,
        _: Option<String>,
        _: WorkspaceQuery,
    ) -> Result<ImportSummary, ClientError> {
        let f = &self.0;
        let now = f.active.fetch_add(1, Ordering::SeqCst) + 1;
        f.max_active.fetch_max(now, Ordering::SeqCst);
        f.log.lock().unwrap().push("import_start".into());
        f.started.notify_one();
        f.gate.acquire().await.expect("gate open").forget();
        f.log.lock().unwrap().push("import_end".into());
        f.active.fetch_sub(1, Ordering::SeqCst);
        Ok(ImportSummary::default())
    }
    async fn export(&self, _: AgentClient, _: WorkspaceQuery) -> Result<Body, ClientError> {
        self.0.log.lock().unwrap().push("export".into());
        Ok(Body::from("tar"))
    }
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::Process,
            available: true,
            reason: None,
            accelerator: None,
            accelerator_reason: None,
            network_modes: vec![flotilla_api::NetworkMode::None],
        }
    }
    fn cgroup_version(&self) -> String {
        "none".into()
    }
    fn network_modes(&self) -> Vec<flotilla_api::NetworkMode> {
        vec![flotilla_api::NetworkMode::None]
    }
    fn images(&self) -> Vec<String> {
        vec!["host".into()]
    }
    fn check_image(&self, image: &str) -> Result<String, ApiError> {
        Ok(image.into())
    }
}

async fn node() -> (Arc<Node<FakeBackend>>, Arc<Fake>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let node = Node::open(FakeBackend(fake.clone()), NodeConfig::new(dir.path().to_path_buf())).await.unwrap();
    (node, fake, dir)
}

/// Bound on any single step here: generous, because the property under
/// test is "does not wait for the import at all", which holds or hangs.
const STEP: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_import_leaves_the_lifecycle_lock_free() {
    let (node, fake, _dir) = node().await;
    let sb = node.create(CreateSandboxRequest::default()).await.unwrap();
    let n2 = node.clone();
    let id = sb.id.clone();
    let import = tokio::spawn(async move { n2.import(&id, Body::empty(), None, None).await });
    tokio::time::timeout(STEP, fake.started.notified()).await.expect("import started");

    // While the import is stalled inside guest I/O, every lifecycle
    // operation on the same sandbox goes through.
    let upd = flotilla_api::UpdateSandboxRequest { ttl_s: Some(60), ..Default::default() };
    tokio::time::timeout(STEP, node.update(&sb.id, upd)).await.expect("set is not blocked").unwrap();
    let s = tokio::time::timeout(STEP, node.restart(&sb.id)).await.expect("restart is not blocked").unwrap();
    assert_eq!(s.state, SandboxState::Running);
    let s = tokio::time::timeout(STEP, node.stop(&sb.id)).await.expect("stop is not blocked").unwrap();
    assert_eq!(s.state, SandboxState::Stopped);
    tokio::time::timeout(STEP, node.delete(&sb.id)).await.expect("delete is not blocked").unwrap();
    assert_eq!(fake.active.load(Ordering::SeqCst), 1, "the import is still in flight");

    fake.gate.add_permits(1);
    tokio::time::timeout(STEP, import).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_imports_into_one_sandbox_never_overlap() {
    let (node, fake, _dir) = node().await;
    let sb = node.create(CreateSandboxRequest::default()).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let n = node.clone();
        let id = sb.id.clone();
        tasks.push(tokio::spawn(async move { n.import(&id, Body::empty(), None, None).await }));
    }
    for i in 0..3 {
        tokio::time::timeout(STEP, fake.started.notified()).await.unwrap_or_else(|_| panic!("import {i} started"));
        assert_eq!(fake.active.load(Ordering::SeqCst), 1, "exactly one import runs at a time");
        fake.gate.add_permits(1);
    }
    for t in tasks {
        tokio::time::timeout(STEP, t).await.unwrap().unwrap().unwrap();
    }
    assert_eq!(fake.max_active.load(Ordering::SeqCst), 1, "imports overlapped");
    let log = fake.log.lock().unwrap().clone();
    assert_eq!(
        log,
        ["import_start", "import_end", "import_start", "import_end", "import_start", "import_end"],
        "imports interleaved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_waits_for_an_import_in_flight() {
    let (node, fake, _dir) = node().await;
    let sb = node.create(CreateSandboxRequest::default()).await.unwrap();
    let (n1, n2, id1, id2) = (node.clone(), node.clone(), sb.id.clone(), sb.id.clone());
    let import = tokio::spawn(async move { n1.import(&id1, Body::empty(), None, None).await });
    tokio::time::timeout(STEP, fake.started.notified()).await.expect("import started");
    let export = tokio::spawn(async move { n2.export(&id2, None).await.map(|_| ()) });
    // Give the export every chance to run early; it must not.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert!(!fake.log.lock().unwrap().contains(&"export".to_string()), "export ran during the import");
    fake.gate.add_permits(1);
    tokio::time::timeout(STEP, import).await.unwrap().unwrap().unwrap();
    tokio::time::timeout(STEP, export).await.unwrap().unwrap().unwrap();
    assert_eq!(*fake.log.lock().unwrap(), ["import_start", "import_end", "export"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_on_a_stopped_sandbox_is_a_conflict_not_a_hang() {
    let (node, _fake, _dir) = node().await;
    let sb = node.create(CreateSandboxRequest::default()).await.unwrap();
    node.stop(&sb.id).await.unwrap();
    let err = node.import(&sb.id, Body::empty(), None, None).await.unwrap_err();
    assert_eq!(err.code, flotilla_api::ErrorCode::Conflict, "{err:?}");
    // Stop and delete are idempotent.
    node.stop(&sb.id).await.unwrap();
    node.delete(&sb.id).await.unwrap();
    assert_eq!(node.get(&sb.id).unwrap_err().code, flotilla_api::ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_unique_and_resolve_like_ids() {
    let (node, _fake, _dir) = node().await;
    let req = CreateSandboxRequest { name: Some("build-1".into()), ..Default::default() };
    let a = node.create(req.clone()).await.unwrap();
    assert_eq!(node.create(req).await.unwrap_err().code, flotilla_api::ErrorCode::Conflict);
    assert_eq!(node.get("build-1").unwrap().id, a.id);
    let bad = CreateSandboxRequest { name: Some("../x".into()), ..Default::default() };
    assert_eq!(node.create(bad).await.unwrap_err().code, flotilla_api::ErrorCode::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn janitor_deletes_expired_sandboxes_and_pages_list() {
    let (node, _fake, _dir) = node().await;
    for _ in 0..5 {
        node.create(CreateSandboxRequest::default()).await.unwrap();
    }
    let page = node.list(&flotilla_api::PageQuery { limit: Some(2), page_token: None });
    assert_eq!(page.items.len(), 2);
    let next = node.list(&flotilla_api::PageQuery { limit: Some(10), page_token: page.next_page_token.clone() });
    assert_eq!(next.items.len(), 3);
    assert!(next.next_page_token.is_none());
    let victim = page.items[0].id.clone();
    // A deadline of one second from now; the janitor acts once it passes.
    node.update(&victim, flotilla_api::UpdateSandboxRequest { ttl_s: Some(1), ..Default::default() }).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        if node.reap_expired().await.contains(&victim) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "janitor never reaped {victim}");
    }
    assert_eq!(node.list(&Default::default()).items.len(), 4);
}
