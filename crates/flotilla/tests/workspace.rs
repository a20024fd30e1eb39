//! Workspace import and export through the real daemon: formats, hostile
//! tarballs refused with the entry named, nothing written outside, stop
//! during a stalled import, persistence across stop/start, directory images.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_agent::http::ClientError;
use flotilla_api::{CreateSandboxRequest, ErrorCode, WorkspaceQuery};

on_both_backends!(
    tarballs_in_every_encoding_round_trip,
    stop_never_waits_for_a_stalled_import,
    hostile_tarballs_are_refused_and_nothing_escapes,
    the_workspace_survives_stop_and_start,
);

/// One raw entry with any name (the tar crate's builder refuses `..`).
fn raw_entry(name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    let bytes = name.as_bytes();
    h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    if let Some(l) = link {
        h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn archive(entries: Vec<Vec<u8>>) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

async fn tarballs_in_every_encoding_round_trip(kind: common::Kind) {
    let env = common::env_for(kind);
    let s = env.sandbox().await;
    let agent = env.client.sandbox(&s.id);
    let plain = common::tar_of(&[("a/hello.txt", b"hello"), ("b.txt", b"bee")]);
    let q = WorkspaceQuery::default();
    let sum = agent.put_workspace(common::body(plain.clone()), None, &q).await.unwrap();
    assert_eq!((sum.entries, sum.bytes), (2, 8));
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &common::tar_of(&[("gz.txt", b"gzip")])).unwrap();
        e.finish().unwrap()
    };
    agent
        .put_workspace(common::body(gz), Some("gzip"), &WorkspaceQuery { dir: Some("sub".into()), ..q.clone() })
        .await
        .unwrap();
    assert_eq!(
        env.ok(&s.id, "cat /workspace/a/hello.txt /workspace/b.txt /workspace/sub/gz.txt").await,
        "hellobeegzip"
    );
    // Listing and export.
    let names: Vec<String> = agent.ls(None).await.unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["a", "b.txt", "sub"]);
    let body = agent.get_workspace(&WorkspaceQuery { dir: Some("a".into()), ..Default::default() }).await.unwrap();
    let bytes = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
    let mut ar = tar::Archive::new(&bytes[..]);
    let got: Vec<String> = ar.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
    assert_eq!(got, ["hello.txt"]);
    agent.remove_all(vec!["sub".into()]).await.unwrap();
    assert_eq!(agent.ls(None).await.unwrap().len(), 2);
}

async fn hostile_tarballs_are_refused_and_nothing_escapes(kind: common::Kind) {
    let env = common::env_for(kind);
    let s = env.sandbox().await;
    let agent = env.client.sandbox(&s.id);
    let ok = raw_entry("fine.txt", tar::EntryType::Regular, None, b"ok");
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("/abs-pwned", vec![ok.clone(), raw_entry("/abs-pwned", tar::EntryType::Regular, None, b"x")]),
        ("../dotdot-pwned", vec![raw_entry("../dotdot-pwned", tar::EntryType::Regular, None, b"x")]),
        ("a/../../deep-pwned", vec![raw_entry("a/../../deep-pwned", tar::EntryType::Regular, None, b"x")]),
        ("esc", vec![raw_entry("esc", tar::EntryType::Symlink, Some("/"), b"")]),
        ("up", vec![raw_entry("up", tar::EntryType::Symlink, Some("../.."), b"")]),
        ("hl", vec![raw_entry("hl", tar::EntryType::Link, Some("/etc/passwd"), b"")]),
        ("dev", vec![raw_entry("dev", tar::EntryType::Char, None, b"")]),
        ("fifo", vec![raw_entry("fifo", tar::EntryType::Fifo, None, b"")]),
    ];
    for (entry, entries) in cases {
        let err = agent.put_workspace(common::body(archive(entries)), None, &WorkspaceQuery::default()).await;
        match err {
            Err(ClientError::Api(e)) => {
                assert_eq!(e.code, ErrorCode::UnprocessableTar, "{entry}: {e:?}");
                assert_eq!(e.details.as_ref().and_then(|d| d["entry"].as_str()), Some(entry), "{e:?}");
            }
            other => panic!("{entry}: expected a 422, got {other:?}"),
        }
    }
    // A symlink inside the tree, then a file through it, is refused too.
    let through = archive(vec![
        raw_entry("link", tar::EntryType::Symlink, Some("sub"), b""),
        raw_entry("link/../../through-pwned", tar::EntryType::Regular, None, b"x"),
    ]);
    assert!(agent.put_workspace(common::body(through), None, &WorkspaceQuery::default()).await.is_err());
    // Nothing landed outside the workspace, in the sandbox or on the host.
    let out = env.ok(&s.id, "ls / /tmp; ls -a /workspace").await;
    assert!(!out.contains("pwned"), "{out}");
    if kind == common::Kind::Process {
        let sbx_dir = env.node.home().join("sandboxes").join(&s.id);
        for e in std::fs::read_dir(&sbx_dir).unwrap() {
            assert!(!e.unwrap().file_name().to_string_lossy().contains("pwned"));
        }
    }
    assert!(!std::path::Path::new("/abs-pwned").exists());
    // Garbage is a 422 as well, never a 500.
    let e =
        agent.put_workspace(common::body(b"not a tar at all, not at all".repeat(40)), None, &Default::default()).await;
    assert!(matches!(e, Err(ClientError::Api(ref a)) if a.code == ErrorCode::UnprocessableTar), "{e:?}");
}

/// The lock regression of DESIGN §5 through the real daemon: an import
/// that stalls mid-file holds only the workspace lock, so `stop` (which
/// takes only the lifecycle lock) answers at once, and the import fails.
async fn stop_never_waits_for_a_stalled_import(kind: common::Kind) {
    let env = common::env_for(kind);
    let s = env.sandbox().await;
    let agent = env.client.sandbox(&s.id);
    // A tar whose one big file never finishes arriving. The channel holds
    // 4 chunks: once 12 have been sent, at least 8 MiB have left it for the
    // node and the sandbox, so the import is under way in either backend.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(4);
    let mut h = tar::Header::new_gnu();
    h.set_path("huge.bin").unwrap();
    h.set_size(1 << 30);
    h.set_mode(0o644);
    h.set_cksum();
    tx.send(Ok(hyper::body::Frame::data(Bytes::copy_from_slice(h.as_bytes())))).await.unwrap();
    let body = http_body_util::StreamBody::new(tokio_stream(rx));
    let import = tokio::spawn(async move { agent.put_workspace(body, None, &WorkspaceQuery::default()).await });
    let feeding = tx.clone();
    tokio::time::timeout(Duration::from_secs(60), async move {
        for _ in 0..12 {
            feeding.send(Ok(hyper::body::Frame::data(Bytes::from(vec![7u8; 1 << 20])))).await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the sandbox never took 8 MiB of the import\nnode log:\n{}", env.node.log()));
    let started = Instant::now();
    let stopped = env.client.action(&s.id, "stop").await.unwrap();
    let took = started.elapsed();
    assert_eq!(stopped.state, flotilla_api::SandboxState::Stopped);
    // A microVM is halted first (a few seconds under TCG), never held up
    // by the import; a process sandbox stops in milliseconds.
    assert!(took < Duration::from_secs(15), "stop waited {took:?} for the import");
    let r = tokio::time::timeout(Duration::from_secs(20), import).await.expect("import ended").unwrap();
    assert!(r.is_err(), "the import cannot succeed once the sandbox is stopped");
    drop(tx);
}

fn tokio_stream<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn the_workspace_survives_stop_and_start(kind: common::Kind) {
    let env = common::env_for(kind);
    let s = env.sandbox().await;
    env.ok(&s.id, "echo kept > /workspace/state; echo gone > /tmp/scratch").await;
    env.client.action(&s.id, "stop").await.unwrap();
    let started = env.client.action(&s.id, "start").await.unwrap();
    assert_eq!(started.state, flotilla_api::SandboxState::Running);
    assert_eq!(
        env.ok(&s.id, "cat /workspace/state; test ! -e /tmp/scratch && echo fresh-tmp").await,
        "kept\nfresh-tmp\n"
    );
    let restarted = env.client.action(&s.id, "restart").await.unwrap();
    assert_eq!(restarted.state, flotilla_api::SandboxState::Running);
    assert_eq!(env.ok(&s.id, "cat /workspace/state").await, "kept\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_image_is_copy_on_write() {
    let img = tempfile::tempdir().unwrap();
    let root = img.path().to_str().unwrap();
    let env = common::env_with(&["--allow-image-dir", root]);
    common::minimal_rootfs(img.path());
    let image = format!("dir:{}", img.path().display());
    // Outside the roots the node was given: refused, saying how.
    let e = env.client.create(&CreateSandboxRequest { image: Some("dir:/usr".into()), ..Default::default() }).await;
    let shown = format!("{e:?}");
    assert!(shown.contains("--allow-image-dir") && shown.contains("image import"), "{shown}");
    let a = env.create(CreateSandboxRequest { image: Some(image.clone()), ..Default::default() }).await;
    let b = env.create(CreateSandboxRequest { image: Some(image), ..Default::default() }).await;
    let out = env.ok(&a.id, "echo a > /newfile; cat /newfile; ls /bin").await;
    assert!(out.starts_with("a\n") && out.contains("cat"), "{out}");
    assert!(!img.path().join("newfile").exists(), "the image was written to");
    let (_, _, st) = env.sh(&b.id, "cat /newfile").await;
    assert!(!st.success(), "sandbox b saw a's write");
    // Bad image references are refused before anything is made.
    let e =
        env.client.create(&CreateSandboxRequest { image: Some("dir:/no/such/dir".into()), ..Default::default() }).await;
    assert!(matches!(e, Err(ClientError::Api(ref a)) if a.code == ErrorCode::InvalidArgument), "{e:?}");
}
