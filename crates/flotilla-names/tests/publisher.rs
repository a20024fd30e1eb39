//! The publisher against real tables: refreshes keep names alive, a killed
//! publisher's names expire, failed unmounts are retried, stop unmounts
//! everything, publishers share names, and etcd restarts are survived.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flotilla_api::names::Resolution;
use flotilla_names::publisher::Want;
use flotilla_names::{
    Name, NameTable, NamesClient, Pattern, Publisher, PublisherConfig, Store, StoreError, StoreTable, TableError,
};

const CHILD_URL: &str = "FLOTILLA_NAMES_TEST_CHILD_URL";
const CHILD_NAME: &str = "FLOTILLA_NAMES_TEST_CHILD_NAME";
const CHILD_SERVER: &str = "FLOTILLA_NAMES_TEST_CHILD_SERVER";
const CHILD_TOKEN: &str = "FLOTILLA_NAMES_TEST_CHILD_TOKEN";

/// The child's publisher: 100 ms period, 400 ms slack.
fn child_config() -> PublisherConfig {
    PublisherConfig::new(Duration::from_millis(100)).with_slack(Duration::from_millis(400))
}

/// Not a test by itself: the body of the publisher process that
/// `a_killed_publishers_names_expire_*` start by running this test binary
/// again with the environment set. Without it, it returns at once.
#[test]
fn publisher_child_process() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let name = std::env::var(CHILD_NAME).expect("child name");
    let server = std::env::var(CHILD_SERVER).expect("child server");
    let token = std::env::var(CHILD_TOKEN).expect("child token");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NamesClient::connect(&url).expect("client").with_token(Some(token));
        let p = Publisher::new(Arc::new(client), child_config());
        p.add_server(&server).await.expect("server");
        p.add_name(&name).await.expect("name");
        // Publish until killed.
        std::future::pending::<()>().await;
    });
}

/// The child process, killed with -9 on drop if the test did not.
struct ChildPublisher(Child);

impl ChildPublisher {
    fn spawn(url: &str, token: &str, name: &str, server: &str) -> ChildPublisher {
        let exe = std::env::current_exe().expect("test binary");
        let child = Command::new(exe)
            .args(["--exact", "publisher_child_process", "--nocapture", "--test-threads=1"])
            .env(CHILD_URL, url)
            .env(CHILD_NAME, name)
            .env(CHILD_SERVER, server)
            .env(CHILD_TOKEN, token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawning the publisher process");
        ChildPublisher(child)
    }

    fn kill9(&mut self) {
        // `Child::kill` is SIGKILL on Unix: the publisher gets no chance to
        // unmount anything.
        self.0.kill().expect("kill -9");
        self.0.wait().expect("reaping");
    }
}

impl Drop for ChildPublisher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn resolves_to(store: &dyn Store, name: &str) -> Option<Vec<String>> {
    store.resolve(&Name::parse(name).unwrap()).await.ok().map(|r| r.servers)
}

/// Checks every 20 ms for `how_long` that `name` stays resolvable.
async fn stays_resolvable(store: &dyn Store, name: &str, how_long: Duration) {
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        assert!(resolves_to(store, name).await.is_some(), "{name} lapsed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_killed_publishers_names_expire(f: common::Fixture, expiry_bound: Duration) {
    let (server, _client) = common::http_table(f.store.clone()).await;
    let mut child = ChildPublisher::spawn(&server.url(), server.token(), "nodes/child", "http://child:1");
    common::eventually(Duration::from_secs(20), "the child to publish", || async {
        resolves_to(&*f.store, "nodes/child").await
    })
    .await;
    // Several TTLs: only the child's refreshes can keep it.
    stays_resolvable(&*f.store, "nodes/child", Duration::from_secs(2)).await;
    child.kill9();
    let killed = Instant::now();
    common::eventually(expiry_bound + Duration::from_secs(5), "the name to expire", || async {
        resolves_to(&*f.store, "nodes/child").await.is_none().then_some(())
    })
    .await;
    assert!(killed.elapsed() < expiry_bound, "expired after {:?}", killed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_publishers_names_expire_memory() {
    // TTL 0.5 s: gone within it, with room for a busy machine.
    a_killed_publishers_names_expire(common::memory().await, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_publishers_names_expire_etcd() {
    // TTL rounds up to 1 s, plus up to 1 s of lease reuse, plus etcd's
    // 500 ms lease checks.
    a_killed_publishers_names_expire(common::etcd_fixture().await, Duration::from_secs(4)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_keeps_names_alive_across_many_periods() {
    // Over HTTP to a memory table: TTL 400 ms, 2.5 s of checks.
    let f = common::memory().await;
    let (_server, c) = common::http_table(f.store.clone()).await;
    let config = PublisherConfig::new(Duration::from_millis(100)).with_slack(Duration::from_millis(300));
    let p = Publisher::new(Arc::new(c), config);
    p.add_server("s").await.unwrap();
    p.add_name("kept").await.unwrap();
    stays_resolvable(&*f.store, "kept", Duration::from_millis(2500)).await;
    assert!(p.metrics().mounts_ok >= 10, "{:?}", p.metrics());
    assert_eq!(p.metrics().mounts_failed, 0);
    assert!(p.published().await[0].ends_with("/kept"));

    // Directly on etcd: TTL rounds up to 1 s, 3 s of checks.
    let e = common::etcd_fixture().await;
    let config = PublisherConfig::new(Duration::from_millis(200)).with_slack(Duration::from_millis(300));
    let p = Publisher::new(Arc::new(StoreTable::new(e.store.clone())), config);
    p.add_server("s").await.unwrap();
    p.add_name("kept").await.unwrap();
    stays_resolvable(&*e.store, "kept", Duration::from_secs(3)).await;
    assert_eq!(p.published().await, ["etcd/kept"]);
}

/// A table that fails the next `fail_unmounts` unmounts and can slow them.
struct FlakyTable {
    inner: StoreTable,
    fail_unmounts: AtomicUsize,
    unmount_calls: AtomicUsize,
    unmount_delay: Duration,
}

impl FlakyTable {
    fn new(store: Arc<dyn Store>, unmount_delay: Duration) -> Arc<FlakyTable> {
        Arc::new(FlakyTable {
            inner: StoreTable::new(store),
            fail_unmounts: AtomicUsize::new(0),
            unmount_calls: AtomicUsize::new(0),
            unmount_delay,
        })
    }
}

#[async_trait]
impl NameTable for FlakyTable {
    async fn mount(&self, name: &str, server: &str, ttl: Duration) -> Result<(), TableError> {
        self.inner.mount(name, server, ttl).await
    }

    async fn unmount(&self, name: &str, server: &str) -> Result<(), TableError> {
        self.unmount_calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.unmount_delay).await;
        let failing = self.fail_unmounts.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(StoreError::Unavailable("injected unmount failure".into()).into());
        }
        self.inner.unmount(name, server).await
    }

    async fn resolve(&self, name: &str) -> Result<Resolution, TableError> {
        self.inner.resolve(name).await
    }

    fn root(&self) -> String {
        "flaky".into()
    }
}

#[tokio::test]
async fn a_failed_unmount_is_retried_until_it_succeeds() {
    let f = common::memory().await;
    let table = FlakyTable::new(f.store.clone(), Duration::ZERO);
    // A long slack: the mount must go because it is unmounted, not expire.
    let config = PublisherConfig::new(Duration::from_millis(100)).with_slack(Duration::from_secs(30));
    let p = Publisher::new(table.clone(), config);
    p.add_server("s").await.unwrap();
    p.add_name("x").await.unwrap();
    assert!(resolves_to(&*f.store, "x").await.is_some());

    table.fail_unmounts.store(3, Ordering::SeqCst);
    p.remove_name("x").await;
    let st = p.status().await;
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].want, Want::Unmounted);
    assert!(st[0].last_unmount_error.as_deref().unwrap().contains("injected"), "{st:?}");
    assert!(resolves_to(&*f.store, "x").await.is_some(), "the failed unmount left the mount");
    assert!(p.debug_string().await.contains("injected unmount failure"));

    common::eventually(Duration::from_secs(10), "the retried unmount to succeed", || async {
        (resolves_to(&*f.store, "x").await.is_none() && p.status().await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(table.unmount_calls.load(Ordering::SeqCst), 4);
    let m = p.metrics();
    assert_eq!((m.unmounts_failed, m.unmounts_ok), (3, 1), "{m:?}");
    // Gone means gone: later refreshes do not bring it back.
    stays_unresolvable(&*f.store, "x", Duration::from_millis(400)).await;
}

async fn stays_unresolvable(store: &dyn Store, name: &str, how_long: Duration) {
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        assert!(resolves_to(store, name).await.is_none(), "{name} came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stop_unmounts_everything_before_wait_for_stop_returns() {
    let f = common::memory().await;
    let table = FlakyTable::new(f.store.clone(), Duration::from_millis(100));
    let config = PublisherConfig::new(Duration::from_millis(100)).with_slack(Duration::from_secs(30));
    let p = Publisher::new(table.clone(), config);
    for s in ["s1", "s2"] {
        p.add_server(s).await.unwrap();
    }
    for n in ["a", "b/c"] {
        p.add_name(n).await.unwrap();
    }
    let everything = Pattern::parse("...").unwrap();
    assert_eq!(f.store.glob(&everything).await.unwrap().len(), 2);
    table.fail_unmounts.store(2, Ordering::SeqCst);

    p.stop().await;
    // Unmounting takes 100 ms a call and two calls fail: it is under way.
    assert!(!f.store.glob(&everything).await.unwrap().is_empty());
    p.add_name("late").await.unwrap();
    p.add_server("late").await.unwrap();
    p.stop().await;
    p.wait_for_stop().await;
    assert!(f.store.glob(&everything).await.unwrap().is_empty(), "wait_for_stop returned with mounts left");
    assert!(table.unmount_calls.load(Ordering::SeqCst) >= 6, "4 unmounts + 2 retries");
    assert_eq!(p.debug_string().await, "stopped");
    assert!(p.published().await.is_empty());
    p.wait_for_stop().await;
    stays_unresolvable(&*f.store, "late", Duration::from_millis(300)).await;
}

async fn publishers_share_a_name(store: Arc<dyn Store>, table_for: impl Fn() -> Arc<dyn NameTable>) {
    let config = PublisherConfig::new(Duration::from_millis(100)).with_slack(Duration::from_millis(900));
    let a = Publisher::new(table_for(), config);
    let b = Publisher::new(table_for(), config);
    let (ra, rb) = tokio::join!(
        async {
            a.add_server("http://a:1").await.unwrap();
            a.add_name("svc").await
        },
        async {
            b.add_server("http://b:1").await.unwrap();
            b.add_name("svc").await
        }
    );
    ra.unwrap();
    rb.unwrap();
    assert_eq!(resolves_to(&*store, "svc/x").await.unwrap(), ["http://a:1", "http://b:1"]);
    assert_eq!(a.published().await.len(), 1);
    assert_eq!(b.published().await.len(), 1);
    a.stop().await;
    a.wait_for_stop().await;
    assert_eq!(resolves_to(&*store, "svc").await.unwrap(), ["http://b:1"]);
    // The survivor keeps refreshing on its own.
    let end = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < end {
        assert_eq!(resolves_to(&*store, "svc").await.unwrap(), ["http://b:1"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.stop().await;
    b.wait_for_stop().await;
    assert!(resolves_to(&*store, "svc").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_one_name_coexist_memory_over_http() {
    let f = common::memory().await;
    let (_server, c) = common::http_table(f.store.clone()).await;
    publishers_share_a_name(f.store.clone(), || Arc::new(c.clone())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_one_name_coexist_etcd() {
    let f = common::etcd_fixture().await;
    let store = f.store.clone();
    publishers_share_a_name(f.store.clone(), || Arc::new(StoreTable::new(store.clone()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_remounts_after_an_etcd_restart() {
    let mut f = common::etcd_fixture().await;
    let (_server, c) = common::http_table(f.store.clone()).await;
    let config = PublisherConfig::new(Duration::from_millis(200)).with_slack(Duration::from_millis(800));
    let p = Publisher::new(Arc::new(c), config);
    p.add_server("http://n1:7000").await.unwrap();
    p.add_name("nodes/n1").await.unwrap();
    assert!(resolves_to(&*f.store, "nodes/n1").await.is_some());

    let etcd = f.etcd.as_mut().unwrap();
    etcd.kill();
    common::eventually(Duration::from_secs(10), "a refresh to fail while etcd is down", || async {
        (p.metrics().mounts_failed > 0).then_some(())
    })
    .await;
    let st = p.status().await;
    assert!(st[0].last_mount_error.is_some(), "{st:?}");
    etcd.restart().unwrap();

    common::eventually(Duration::from_secs(15), "refreshes to succeed again", || async {
        p.status().await.iter().all(|m| m.last_mount_error.is_none()).then_some(())
    })
    .await;
    // Prove the publisher writes again: remove the key behind its back.
    let mut raw = etcd_client::Client::connect([etcd.url()], None).await.unwrap();
    raw.delete("/test/names/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    assert!(resolves_to(&*f.store, "nodes/n1").await.is_none());
    common::eventually(Duration::from_secs(10), "the publisher to mount again", || async {
        resolves_to(&*f.store, "nodes/n1").await
    })
    .await;
    p.stop().await;
    p.wait_for_stop().await;
    assert!(resolves_to(&*f.store, "nodes/n1").await.is_none());
}
