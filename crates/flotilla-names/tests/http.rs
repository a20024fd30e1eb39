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
    let h = c.http_writes();
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

/// The raw answer to a write sent with `auth` (an `Authorization` value):
/// status, `WWW-Authenticate`, and the body as JSON.
async fn raw_write(url: &str, method: Method, auth: Option<&str>, body: Value) -> (u16, Option<String>, Value) {
    let h = flotilla_agent::http::HttpClient::new(flotilla_agent::http::Endpoint::parse(url).unwrap());
    let mut b = h.request(method, "/v1/mounts").header(http::header::CONTENT_TYPE, "application/json");
    if let Some(a) = auth {
        b = b.header(http::header::AUTHORIZATION, a);
    }
    let req = b.body(http_body_util::Full::new(bytes::Bytes::from(body.to_string()))).unwrap();
    let resp = h.send(req).await.unwrap();
    let status = resp.status().as_u16();
    let www = resp.headers().get(http::header::WWW_AUTHENTICATE).map(|v| v.to_str().unwrap().to_string());
    let body = flotilla_agent::http::read_body(resp).await.unwrap();
    (status, www, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// A 401 with the envelope: `{code: "unauthorized", message, ...}`.
fn assert_refused((status, www, body): (u16, Option<String>, Value), what: &str) {
    assert_eq!(status, 401, "{what}: {body}");
    assert_eq!(www.as_deref(), Some("Bearer"), "{what}");
    assert_eq!(body["code"], "unauthorized", "{what}: {body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
}

#[tokio::test]
async fn names_mount_without_token_is_refused() {
    let f = common::memory().await;
    let (server, c) = common::http_table(f.store.clone()).await;
    let url = server.url();
    let mount = json!({"name": "nodes/n1", "server": "https://evil.example:1", "ttl_s": 60});
    assert_refused(raw_write(&url, Method::PUT, None, mount.clone()).await, "no header");
    assert_refused(raw_write(&url, Method::PUT, Some("Basic Zm9vOmJhcg=="), mount.clone()).await, "basic auth");
    // Through the client without a token: the same envelope.
    let anonymous = flotilla_names::NamesClient::connect(&url).unwrap();
    assert_eq!(code(anonymous.mount("nodes/n1", "https://evil.example:1", TTL).await), ErrorCode::Unauthorized);
    // Nothing reached the table.
    assert_eq!(code(c.resolve("nodes/n1").await), ErrorCode::NotFound);
    assert!(c.glob("...").await.unwrap().is_empty());
    // Any other write is refused the same way, even on no route.
    let (status, _, body) = raw_write(&url, Method::POST, None, json!({})).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
}

#[tokio::test]
async fn names_unmount_without_token_is_refused() {
    let f = common::memory().await;
    let (server, c) = common::http_table(f.store.clone()).await;
    c.mount("nodes/n1", "https://n1:7443", TTL).await.unwrap();
    let pair = json!({"name": "nodes/n1", "server": "https://n1:7443"});
    assert_refused(raw_write(&server.url(), Method::DELETE, None, pair).await, "no header");
    let anonymous = flotilla_names::NamesClient::connect(&server.url()).unwrap();
    assert_eq!(code(anonymous.unmount("nodes/n1", "https://n1:7443").await), ErrorCode::Unauthorized);
    assert_eq!(c.resolve("nodes/n1").await.unwrap().servers, ["https://n1:7443"], "still mounted");
}

#[tokio::test]
async fn names_writes_with_a_wrong_token_are_refused() {
    let f = common::memory().await;
    let (server, c) = common::http_table(f.store.clone()).await;
    let url = server.url();
    c.mount("nodes/n1", "https://n1:7443", TTL).await.unwrap();
    let wrong = format!("{}x", server.token());
    let mount = json!({"name": "nodes/n1", "server": "https://evil.example:1", "ttl_s": 60});
    assert_refused(raw_write(&url, Method::PUT, Some(&format!("Bearer {wrong}")), mount).await, "wrong token");
    let pair = json!({"name": "nodes/n1", "server": "https://n1:7443"});
    assert_refused(raw_write(&url, Method::DELETE, Some("Bearer 0123456789abcdef0123"), pair).await, "wrong");
    let impostor = flotilla_names::NamesClient::connect(&url).unwrap().with_token(Some(wrong));
    assert_eq!(code(impostor.mount("nodes/n1", "https://evil.example:1", TTL).await), ErrorCode::Unauthorized);
    assert_eq!(code(impostor.unmount("nodes/n1", "https://n1:7443").await), ErrorCode::Unauthorized);
    assert_eq!(c.resolve("nodes/n1").await.unwrap().servers, ["https://n1:7443"], "unchanged");
    // The right token, in any case of `Bearer`, works.
    let pair = json!({"name": "nodes/n1", "server": "https://n1:7443"});
    let (status, _, body) = raw_write(&url, Method::DELETE, Some(&format!("bearer {}", server.token())), pair).await;
    assert_eq!((status, body["removed"].as_bool()), (200, Some(true)), "{body}");
}

#[tokio::test]
async fn names_reads_need_no_token() {
    let f = common::memory().await;
    let (server, c) = common::http_table(f.store.clone()).await;
    c.mount("nodes/n1", "https://n1:7443", TTL).await.unwrap();
    let anonymous = flotilla_names::NamesClient::connect(&server.url()).unwrap();
    assert_eq!(anonymous.resolve("nodes/n1/x").await.unwrap().servers, ["https://n1:7443"]);
    assert_eq!(anonymous.glob("nodes/*").await.unwrap().len(), 1);
    anonymous.health().await.unwrap();
    assert!(anonymous.metrics().await.unwrap().contains("flotilla_names_requests_total"));
    let doc: Value = anonymous.http().json(Method::GET, "/openapi.json", None::<&()>).await.unwrap();
    assert!(doc["paths"]["/v1/mounts"]["put"]["responses"]["401"].is_object());
    // The handle's own client carries the token.
    assert!(server.client().unmount("nodes/n1", "https://n1:7443").await.unwrap());
    assert!(!format!("{server:?}").contains(server.token()), "the token stays out of Debug");
}
