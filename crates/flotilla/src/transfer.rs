//! Workspace transfers: `sandbox put` sources and `sandbox get` sinks, with
//! a progress bar when stderr is a terminal. Bytes stream end to end; a
//! directory is tarred on the fly, never staged on disk or in memory.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, bail};
use bytes::Bytes;
use flotilla_agent::AgentClient;
use flotilla_api::{ImportSummary, WorkspaceQuery};
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::io::{ReaderStream, SyncIoBridge};

/// Bytes between the tar-building thread and the socket.
const PIPE_BYTES: usize = 256 * 1024;

fn progress(total: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = match total {
        Some(t) => ProgressBar::new(t).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}").expect("valid template"),
        ),
    };
    pb.set_message(what.to_string());
    pb
}

/// Compression named by a gzip or zstd magic number.
fn sniff(head: &[u8]) -> Option<&'static str> {
    match head {
        [0x1f, 0x8b, ..] => Some("gzip"),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some("zstd"),
        _ => None,
    }
}

fn encoding_for(path: &Path, head: &[u8]) -> Option<&'static str> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some("gzip")
    } else if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
        Some("zstd")
    } else {
        sniff(head)
    }
}

type ByteStream = std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

fn counted(stream: ByteStream, pb: ProgressBar) -> ByteStream {
    Box::pin(stream.map(move |chunk| {
        if let Ok(c) = &chunk {
            pb.inc(c.len() as u64);
        }
        chunk
    }))
}

/// Streams `src` (a directory, a tarball, or `-` for stdin) into the
/// workspace.
pub async fn put(agent: &AgentClient, src: &str, dir: Option<String>) -> anyhow::Result<ImportSummary> {
    let (stream, encoding, pb): (ByteStream, Option<&'static str>, ProgressBar) = if src == "-" {
        let mut stdin = tokio::io::stdin();
        let mut head = vec![0u8; 4];
        let n = read_up_to(&mut stdin, &mut head).await.context("reading stdin")?;
        head.truncate(n);
        let enc = sniff(&head);
        let rest = ReaderStream::with_capacity(stdin, 64 * 1024);
        let first = futures_util::stream::once(async move { Ok(Bytes::from(head)) });
        let pb = progress(None, "uploading stdin");
        (Box::pin(first.chain(rest)), enc, pb)
    } else {
        let path = Path::new(src);
        let meta = std::fs::metadata(path).with_context(|| format!("reading {src}"))?;
        if meta.is_dir() {
            let (reader, writer) = tokio::io::duplex(PIPE_BYTES);
            let root = path.to_path_buf();
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut b = tar::Builder::new(SyncIoBridge::new(writer));
                b.follow_symlinks(false);
                b.append_dir_all(".", &root)?;
                b.into_inner()?;
                Ok(())
            });
            let pb = progress(None, &format!("uploading {src}"));
            (Box::pin(ReaderStream::with_capacity(reader, 64 * 1024)), None, pb)
        } else if meta.is_file() {
            let mut f = tokio::fs::File::open(path).await.with_context(|| format!("opening {src}"))?;
            let mut head = [0u8; 4];
            let n = read_up_to(&mut f, &mut head).await?;
            let enc = encoding_for(path, &head[..n]);
            drop(f);
            let f = tokio::fs::File::open(path).await.with_context(|| format!("opening {src}"))?;
            let pb = progress(Some(meta.len()), &format!("uploading {src}"));
            (Box::pin(ReaderStream::with_capacity(f, 256 * 1024)), enc, pb)
        } else {
            bail!("{src} is neither a directory nor a file");
        }
    };
    let body = http_body_util::StreamBody::new(counted(stream, pb.clone()).map(|r| r.map(hyper::body::Frame::data)));
    let q = WorkspaceQuery { dir, ..Default::default() };
    let result = agent.put_workspace(body, encoding, &q).await;
    pb.finish_and_clear();
    Ok(result?)
}

async fn read_up_to(r: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Streams the workspace out to `output` (a file, or `-` for stdout).
pub async fn get(agent: &AgentClient, dir: Option<String>, output: Option<String>) -> anyhow::Result<u64> {
    let to_stdout = match output.as_deref() {
        Some("-") => true,
        None if std::io::stdout().is_terminal() => {
            bail!("refusing to write a tar archive to the terminal: use -o FILE, or -o - to force stdout")
        }
        None => true,
        Some(_) => false,
    };
    let q = WorkspaceQuery { dir, ..Default::default() };
    let mut body = agent.get_workspace(&q).await?;
    let mut out: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>> = if to_stdout {
        Box::pin(tokio::io::stdout())
    } else {
        let path = output.clone().expect("a path");
        Box::pin(tokio::fs::File::create(&path).await.with_context(|| format!("creating {path}"))?)
    };
    let pb = if to_stdout { ProgressBar::hidden() } else { progress(None, "downloading") };
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the workspace stream broke")?;
        if let Ok(data) = frame.into_data() {
            out.write_all(&data).await?;
            total += data.len() as u64;
            pb.inc(data.len() as u64);
        }
    }
    out.flush().await?;
    pb.finish_and_clear();
    Ok(total)
}
