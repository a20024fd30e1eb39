//! One suite, two stores: every case runs against `MemoryStore` and against
//! `EtcdStore` on a throwaway etcd, so the two cannot drift apart.

mod common;

use std::time::Duration;

use flotilla_api::names::MountEntry;
use flotilla_names::{MountEvent, Name, NameError, Pattern, Store, StoreError};

fn n(s: &str) -> Name {
    Name::parse(s).unwrap()
}

const TTL: Duration = Duration::from_secs(60);

/// Names and servers of glob entries (expiries differ run to run).
fn shape(entries: &[MountEntry]) -> Vec<(String, Vec<String>)> {
    entries.iter().map(|e| (e.name.clone(), e.servers.iter().map(|s| s.server.clone()).collect())).collect()
}

async fn glob(store: &dyn Store, pattern: &str) -> Vec<String> {
    store.glob(&Pattern::parse(pattern).unwrap()).await.unwrap().into_iter().map(|e| e.name).collect()
}

async fn mount_resolve_unmount(store: &dyn Store) {
    assert_eq!(store.mount(&n("a/b"), "s1", TTL).await.unwrap(), TTL);
    let r = store.resolve(&n("a/b")).await.unwrap();
    assert_eq!((r.name.as_str(), r.mount_point.as_str(), r.suffix.as_str()), ("a/b", "a/b", ""));
    assert_eq!(r.servers, ["s1"]);
    let r = store.resolve(&n("a/b/c/d")).await.unwrap();
    assert_eq!((r.mount_point.as_str(), r.suffix.as_str()), ("a/b", "c/d"));
    assert!(matches!(store.resolve(&n("a")).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(store.resolve(&n("a/bc")).await, Err(StoreError::NotFound { .. })), "prefixes are whole elements");
    assert!(store.unmount(&n("a/b"), "s1").await.unwrap());
    assert!(!store.unmount(&n("a/b"), "s1").await.unwrap(), "unmount is idempotent");
    assert!(matches!(store.resolve(&n("a/b")).await, Err(StoreError::NotFound { .. })));
}

async fn longest_prefix_wins(store: &dyn Store) {
    store.mount(&n("a"), "s0", TTL).await.unwrap();
    store.mount(&n("a/b"), "s1", TTL).await.unwrap();
    store.mount(&n("a/b/c/d"), "s3", TTL).await.unwrap();
    let r = store.resolve(&n("a/b/c")).await.unwrap();
    assert_eq!((r.mount_point.as_str(), r.suffix.as_str(), r.servers.clone()), ("a/b", "c", vec!["s1".into()]));
    let r = store.resolve(&n("a/x/y")).await.unwrap();
    assert_eq!((r.mount_point.as_str(), r.suffix.as_str()), ("a", "x/y"));
    assert_eq!(store.resolve(&n("a/b/c/d/e")).await.unwrap().mount_point, "a/b/c/d");
    store.unmount(&n("a/b"), "s1").await.unwrap();
    let r = store.resolve(&n("a/b/c")).await.unwrap();
    assert_eq!((r.mount_point.as_str(), r.suffix.as_str()), ("a", "b/c"));
}

async fn servers_coexist_and_remounts_refresh(store: &dyn Store) {
    store.mount(&n("svc"), "s2", TTL).await.unwrap();
    store.mount(&n("svc"), "s1", TTL).await.unwrap();
    store.mount(&n("svc"), "s1", TTL).await.unwrap();
    assert_eq!(store.resolve(&n("svc/x")).await.unwrap().servers, ["s1", "s2"], "sorted, no duplicates");
    store.unmount(&n("svc"), "s1").await.unwrap();
    assert_eq!(store.resolve(&n("svc")).await.unwrap().servers, ["s2"]);
    // Servers are opaque strings: slashes and colons are fine.
    store.mount(&n("svc"), "http://127.0.0.1:7000/x", TTL).await.unwrap();
    assert_eq!(store.resolve(&n("svc")).await.unwrap().servers, ["http://127.0.0.1:7000/x", "s2"]);
}

async fn globs_match_elements(store: &dyn Store) {
    for name in ["nodes/n1", "nodes/n2", "nodes/n2/x", "nodesx/n9", "apps/web/i-1", "apps/web/i-2", "apps/db/i-1"] {
        store.mount(&n(name), "s", TTL).await.unwrap();
    }
    store.mount(&n("nodes/n1"), "t", TTL).await.unwrap();
    assert_eq!(glob(store, "nodes/*").await, ["nodes/n1", "nodes/n2"]);
    assert_eq!(glob(store, "nodes/...").await, ["nodes/n1", "nodes/n2", "nodes/n2/x"]);
    assert_eq!(glob(store, "apps/*/i-1").await, ["apps/db/i-1", "apps/web/i-1"]);
    assert_eq!(glob(store, ".../i-2").await, ["apps/web/i-2"]);
    assert_eq!(glob(store, "node*/n*").await, ["nodes/n1", "nodes/n2", "nodesx/n9"]);
    assert_eq!(glob(store, "nodes/n2/x").await, ["nodes/n2/x"]);
    assert!(glob(store, "nothing/...").await.is_empty());
    let all = store.glob(&Pattern::parse("...").unwrap()).await.unwrap();
    let names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "glob is sorted by name");
    assert_eq!(names.len(), 7);
    let n1 = &shape(&all)[3];
    assert_eq!(n1, &("nodes/n1".to_string(), vec!["s".to_string(), "t".to_string()]));
    for e in &all {
        for s in &e.servers {
            // etcd may keep a mount up to its lease-reuse window longer.
            assert!(s.expires_in_s > 50.0 && s.expires_in_s <= 61.0, "{e:?}");
        }
    }
}

async fn mounts_expire_and_refreshes_keep_them(store: &dyn Store) {
    let short = Duration::from_millis(1000);
    assert!(store.mount(&n("gone"), "s", short).await.unwrap() >= short);
    store.mount(&n("kept"), "s", short).await.unwrap();
    assert!(store.resolve(&n("gone")).await.is_ok());
    // Refresh `kept` well inside its TTL until `gone` has expired: the
    // etcd store may keep `gone` up to one lease window (1 s) past its TTL,
    // and etcd checks leases every 500 ms.
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(8);
    loop {
        store.mount(&n("kept"), "s", short).await.unwrap();
        if store.resolve(&n("gone")).await.is_err() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "`gone` outlived its 1 s TTL by 7 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(900), "expired early: {:?}", started.elapsed());
    assert!(store.resolve(&n("kept")).await.is_ok(), "refreshed mount expired");
    assert!(glob(store, "...").await.contains(&"kept".to_string()));
    assert!(!glob(store, "...").await.contains(&"gone".to_string()));
}

async fn bad_input_is_refused(store: &dyn Store) {
    assert!(matches!(store.mount(&n("a"), "", TTL).await, Err(StoreError::Invalid(NameError::BadServer))));
    assert!(matches!(store.mount(&n("a"), "x\ny", TTL).await, Err(StoreError::Invalid(NameError::BadServer))));
    assert!(matches!(store.unmount(&n("a"), "").await, Err(StoreError::Invalid(_))));
    store.health().await.unwrap();
}

async fn watch_reports_new_removed_and_expired_mounts(store: &dyn Store) {
    let mut w = store.watch(&Pattern::parse("svc/*").unwrap()).await.unwrap();
    store.mount(&n("svc/a"), "s1", TTL).await.unwrap();
    store.mount(&n("svc/a"), "s1", TTL).await.unwrap();
    store.mount(&n("other/x"), "s1", TTL).await.unwrap();
    store.mount(&n("svc/a/deeper"), "s1", TTL).await.unwrap();
    store.unmount(&n("svc/a"), "s1").await.unwrap();
    store.unmount(&n("svc/a"), "s1").await.unwrap();
    store.mount(&n("svc/b"), "s2", Duration::from_secs(1)).await.unwrap();
    let ev = |mounted: bool, name: &str, server: &str| match mounted {
        true => MountEvent::Mounted { name: name.into(), server: server.into() },
        false => MountEvent::Unmounted { name: name.into(), server: server.into() },
    };
    // The refresh, the non-matching names and the second unmount say
    // nothing; the expiry of svc/b does (etcd: within its lease window).
    for want in [ev(true, "svc/a", "s1"), ev(false, "svc/a", "s1"), ev(true, "svc/b", "s2"), ev(false, "svc/b", "s2")] {
        let got = tokio::time::timeout(Duration::from_secs(8), w.recv()).await;
        assert_eq!(got.expect("an event in time").expect("watch open"), want);
    }
}

macro_rules! suite {
    ($store:ident, $fixture:path) => {
        mod $store {
            use super::*;

            #[tokio::test]
            async fn mount_resolve_unmount() {
                let f = $fixture().await;
                super::mount_resolve_unmount(&*f.store).await;
            }

            #[tokio::test]
            async fn longest_prefix_wins() {
                let f = $fixture().await;
                super::longest_prefix_wins(&*f.store).await;
            }

            #[tokio::test]
            async fn servers_coexist_and_remounts_refresh() {
                let f = $fixture().await;
                super::servers_coexist_and_remounts_refresh(&*f.store).await;
            }

            #[tokio::test]
            async fn globs_match_elements() {
                let f = $fixture().await;
                super::globs_match_elements(&*f.store).await;
            }

            #[tokio::test]
            async fn mounts_expire_and_refreshes_keep_them() {
                let f = $fixture().await;
                super::mounts_expire_and_refreshes_keep_them(&*f.store).await;
            }

            #[tokio::test]
            async fn watch_reports_new_removed_and_expired_mounts() {
                let f = $fixture().await;
                super::watch_reports_new_removed_and_expired_mounts(&*f.store).await;
            }

            #[tokio::test]
            async fn bad_input_is_refused() {
                let f = $fixture().await;
                super::bad_input_is_refused(&*f.store).await;
            }
        }
    };
}

suite!(memory, common::memory);
suite!(etcd, common::etcd_fixture);

/// Only etcd can lose a lease under a store: mounting must grant a new one.
#[tokio::test]
async fn etcd_store_survives_a_revoked_lease() {
    let f = common::etcd_fixture().await;
    f.store.mount(&n("x"), "s", TTL).await.unwrap();
    let server = f.etcd.as_ref().unwrap();
    let mut raw = etcd_client::Client::connect([server.url()], None).await.unwrap();
    for lease in raw.leases().await.unwrap().leases() {
        raw.lease_revoke(lease.id()).await.unwrap();
    }
    assert!(f.store.resolve(&n("x")).await.is_err(), "revoking the lease removed the key");
    f.store.mount(&n("x"), "s", TTL).await.unwrap();
    assert_eq!(f.store.resolve(&n("x")).await.unwrap().servers, ["s"]);
}

/// Keys are laid out as documented, so operators can read them with etcdctl.
#[tokio::test]
async fn etcd_keys_are_prefix_name_nul_server() {
    let f = common::etcd_fixture().await;
    f.store.mount(&n("nodes/n1"), "http://h:1", TTL).await.unwrap();
    let mut raw = etcd_client::Client::connect([f.etcd.as_ref().unwrap().url()], None).await.unwrap();
    let got = raw.get("/test/names/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    let keys: Vec<&[u8]> = got.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(keys, [b"/test/names/nodes/n1\0http://h:1".as_slice()]);
    assert!(got.kvs()[0].lease() != 0, "mounts are attached to a lease");
}

/// etcd over TLS that takes only clients with a certificate from its CA:
/// the store with the CA and a client certificate mounts and resolves; one
/// without the certificate, or trusting another CA, is refused.
#[tokio::test]
async fn etcd_over_tls_takes_only_certified_clients() {
    use flotilla_names::testing::{EtcdServer, EtcdServerTls};
    use flotilla_names::{EtcdConfig, EtcdStore, EtcdTls};
    let pki = flotilla_testkit::pki::Pki::new();
    let server = pki.server("etcd", &["127.0.0.1"]);
    let client = pki.client("client", "flotilla");
    let tls = EtcdServerTls { cert: server.cert, key: server.key, client_ca: pki.ca() };
    let etcd = EtcdServer::start_tls_on(std::net::Ipv4Addr::LOCALHOST.into(), tls).expect("etcd over TLS");
    assert!(etcd.url().starts_with("https://"), "{}", etcd.url());
    let config = |tls: EtcdTls| EtcdConfig {
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        tls,
        ..EtcdConfig::new(etcd.url()).with_prefix("/test/names/")
    };

    let ok = EtcdTls { ca: Some(pki.ca()), identity: Some((client.cert.clone(), client.key.clone())) };
    let store = EtcdStore::connect(&config(ok)).await.expect("connecting over TLS");
    store.mount(&n("x"), "s", TTL).await.unwrap();
    assert_eq!(store.resolve(&n("x")).await.unwrap().servers, ["s"]);

    let refused = |store: Result<EtcdStore, StoreError>| async move {
        match store {
            Err(_) => (),
            Ok(s) => assert!(s.mount(&n("y"), "s", TTL).await.is_err(), "a write got through"),
        }
    };
    refused(EtcdStore::connect(&config(EtcdTls { ca: Some(pki.ca()), identity: None })).await).await;
    let other = flotilla_testkit::pki::Pki::new();
    let stranger = EtcdTls { ca: Some(other.ca()), identity: Some((client.cert, client.key)) };
    refused(EtcdStore::connect(&config(stranger)).await).await;
    // Nothing reached etcd but the one mount.
    assert_eq!(store.resolve(&n("y")).await.map(|r| r.servers).ok(), None);
}
