//! The HTTP API through its typed client: routes, pagination, the error
//! envelope, health, metrics and the OpenAPI document.

mod common;

use std::time::Duration;

use flotilla_agent::http::ClientError;
use flotilla_api::ErrorCode;
use http::Method;
use serde_json::{Value, json};

const TTL: Duration = Duration::from_secs(30);

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Api(e)) => e.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn mount_resolve_glob_unmount_over_http() {
    let f = common::memory().await;
    let (server, c) = common::http_table(f.store.clone()).await;
    let m = c.mount("nodes/n1", "http://10.0.0.1:7000", TTL).await.unwrap();
    assert_eq!((m.name.as_str(), m.ttl_s), ("nodes/n1", 30.0));
    c.mount("/nodes/n2/", "http://10.0.0.2:7000", TTL).await.unwrap();
    c.mount("nodes/n3", "s", Duration::from_millis(1500)).await.unwrap();

    let r = c.resolve("nodes/n1/sandboxes/x").await.unwrap();
    assert_eq!(r.mount_point, "nodes/n1");
    assert_eq!(r.suffix, "sandboxes/x");
    assert_eq!(r.servers, ["http://10.0.0.1:7000"]);

    let p1 = c.glob_page("nodes/*", None, Some(2)).await.unwrap();
    assert_eq!(p1.entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["nodes/n1", "nodes/n2"]);
    let p2 = c.glob_page("nodes/*", p1.next_page_token.as_deref(), Some(2)).await.unwrap();
    assert_eq!(p2.entries.len(), 1);
    assert_eq!(p2.next_page_token, None);
    assert_eq!(c.glob("...").await.unwrap().len(), 3);

    assert!(c.unmount("nodes/n1", "http://10.0.0.1:7000").await.unwrap());
    assert!(!c.unmount("nodes/n1", "http://10.0.0.1:7000").await.unwrap());
    assert_eq!(code(c.resolve("nodes/n1").await), ErrorCode::NotFound);

    c.health().await.unwrap();
    let metrics = c.metrics().await.unwrap();
    assert!(metrics.contains("flotilla_names_requests_total{op=\"mount\",outcome=\"ok\"} 3\n"), "{metrics}");
    assert!(metrics.contains("flotilla_names_requests_total{op=\"resolve\",outcome=\"client_error\"} 1\n"));
    assert!(metrics.contains("flotilla_names_store_info{kind=\"memory\"} 1\n"));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_the_envelope() {
    let f = common::memory().await;
    let (_server, c) = common::http_table(f.store.clone()).await;
    let h = c.http();
    let put = |body: Value| async move { h.json::<Value>(Method::PUT, "/v1/mounts", Some(&body)).await };
    assert_eq!(
        code(put(json!({"name": "a", "server": "s", "ttl_s": 1, "extra": 1})).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(code(put(json!({"name": "a//b", "server": "s", "ttl_s": 1})).await), ErrorCode::InvalidArgument);
    assert_eq!(code(put(json!({"name": "a", "server": "", "ttl_s": 1})).await), ErrorCode::InvalidArgument);
    assert_eq!(code(put(json!({"name": "a", "server": "s", "ttl_s": 0})).await), ErrorCode::InvalidArgument);
    assert_eq!(code(put(json!({"name": "a", "server": "s", "ttl_s": 1e9})).await), ErrorCode::InvalidArgument);
    assert_eq!(code(put(json!("not an object")).await), ErrorCode::InvalidArgument);
    assert_eq!(code(c.resolve("a/*").await), ErrorCode::InvalidArgument);
    assert_eq!(code(c.glob_page("a/b c", None, None).await), ErrorCode::InvalidArgument);
    assert_eq!(code(c.glob_page("...", None, Some(0)).await), ErrorCode::InvalidArgument);
    assert_eq!(code(c.glob_page("...", None, Some(100_000)).await), ErrorCode::InvalidArgument);
    assert_eq!(code(h.json::<Value>(Method::GET, "/v1/glob/x?bogus=1", None::<&()>).await), ErrorCode::InvalidArgument);
    assert_eq!(code(h.json::<Value>(Method::GET, "/v1/nothing", None::<&()>).await), ErrorCode::NotFound);
    // Names with `+`, `=` and `:` travel in paths and page tokens intact.
    for name in ["apps/a+b/x=1", "apps/a+b/x=2", "apps/a+b/y:3"] {
        c.mount(name, "s", TTL).await.unwrap();
    }
    assert_eq!(c.resolve("apps/a+b/x=1/more").await.unwrap().mount_point, "apps/a+b/x=1");
    let p1 = c.glob_page("apps/...", None, Some(1)).await.unwrap();
    let p2 = c.glob_page("apps/...", p1.next_page_token.as_deref(), Some(1)).await.unwrap();
    assert_eq!(p2.entries[0].name, "apps/a+b/x=2");
}

#[tokio::test]
async fn openapi_document_is_served() {
    let f = common::memory().await;
    let (_server, c) = common::http_table(f.store.clone()).await;
    let doc: Value = c.http().json(Method::GET, "/openapi.json", None::<&()>).await.unwrap();
    assert_eq!(doc["info"]["title"], "Flotilla name table");
    for (path, method) in [("/v1/mounts", "put"), ("/v1/mounts", "delete"), ("/v1/resolve/{name}", "get")] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    let schema = &doc["components"]["schemas"]["MountRequest"]["properties"];
    assert!(schema["ttl_s"].is_object() && schema["name"].is_object(), "{schema}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_is_503_not_a_hang() {
    let mut f = common::etcd_fixture().await;
    let (_server, c) = common::http_table(f.store.clone()).await;
    c.health().await.unwrap();
    c.mount("a", "s", TTL).await.unwrap();
    f.etcd.as_mut().unwrap().kill();
    let started = std::time::Instant::now();
    assert_eq!(code(c.health().await), ErrorCode::NotReady);
    assert_eq!(code(c.mount("a", "s", TTL).await), ErrorCode::NotReady);
    assert_eq!(code(c.resolve("a").await), ErrorCode::NotReady);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    f.etcd.as_mut().unwrap().restart().unwrap();
    common::eventually(Duration::from_secs(15), "etcd back", || async { c.health().await.ok() }).await;
    assert_eq!(c.resolve("a").await.unwrap().servers, ["s"]);
}
