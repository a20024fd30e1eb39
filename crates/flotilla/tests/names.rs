//! Nodes publish themselves in the name table and are found by id; the
//! `names` CLI mounts, lists, resolves and unmounts.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use flotilla_names::{MemoryStore, NamesClient, ServerHandle};

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(common::BIN).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_publish_themselves_and_are_found_by_id() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let table = ServerHandle::spawn(listener, Arc::new(MemoryStore::new())).unwrap();
    let url = table.url();
    let mut env = common::env_with(&["--names", &url]);
    let id = env.client.info().await.unwrap().node_id;
    let names = NamesClient::connect(&url).unwrap();
    let sock = format!("unix://{}", env.node.socket().display());
    common::eventually(Duration::from_secs(10), "the node to publish itself", || async {
        let r = names.resolve(&format!("nodes/{id}")).await.ok()?;
        r.servers.contains(&sock).then_some(())
    })
    .await;

    // The CLI finds the node by its id.
    let out = cli(&["sandbox", "ls", "--json", "--node-id", &id, "--names", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["info", "--json", "--node-id", "nope", "--names", &url]);
    assert!(!out.status.success(), "an unknown node id is an error");

    // names ls / mount / resolve / unmount.
    let out = cli(&["names", "ls", "nodes/*", "--json", "--names", &url]);
    let listed: Vec<flotilla_api::names::MountEntry> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed.iter().any(|e| e.name == format!("nodes/{id}")), "{listed:?}");
    let out = cli(&["names", "mount", "apps/web", "http://127.0.0.1:9", "--ttl", "1m", "--names", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["names", "resolve", "apps/web/index.html", "--names", &url]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "http://127.0.0.1:9 index.html\n");
    let out = cli(&["names", "unmount", "apps/web", "http://127.0.0.1:9", "--names", &url]);
    assert!(out.status.success());
    assert!(names.resolve("apps/web").await.is_err(), "unmounted");

    // A node that stops unmounts itself.
    env.node.stop();
    common::eventually(Duration::from_secs(10), "the node's name to go", || async {
        names.resolve(&format!("nodes/{id}")).await.is_err().then_some(())
    })
    .await;
    table.shutdown().await.unwrap();
}
