//! `flotilla image ...`: the node's image store from the shell.

use std::io::IsTerminal;

use anyhow::{Context, anyhow};
use flotilla_api::{Image, ImportImageRequest, OperationState, PullImageRequest};

use crate::cli::{ImageCommand, NodeArgs};
use crate::output;
use crate::sandbox::client;

pub async fn run(cmd: ImageCommand, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    match cmd {
        ImageCommand::Ls => {
            let list = client(&node).await?.images().await?;
            if json {
                output::json(&list)?
            } else {
                rows(&list)
            }
            Ok(0)
        }
        ImageCommand::Show { reference } => {
            let img = client(&node).await?.image(&reference).await?;
            if json {
                output::json(&img)?
            } else {
                detail(&img)
            }
            Ok(0)
        }
        ImageCommand::Import { reference, path, no_wait } => {
            // The node reads the path on its own host: make it absolute here,
            // where the user's working directory means something.
            let path = std::path::absolute(&path).with_context(|| format!("resolving {}", path.display()))?;
            let c = client(&node).await?;
            let req = ImportImageRequest { reference: reference.clone(), path: path.display().to_string() };
            let op = c.import_image(&req).await.with_context(|| format!("importing {reference}"))?;
            follow(&c, op, &format!("the import of {reference}"), no_wait, json).await
        }
        ImageCommand::Pull { source, reference, plain_http, username, password_stdin, no_wait } => {
            let password = match (&username, password_stdin) {
                (None, _) => None,
                (Some(_), true) => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).context("reading the password from standard input")?;
                    Some(line.trim_end_matches(['\n', '\r']).to_string())
                }
                (Some(_), false) => Some(std::env::var(PASSWORD_ENV).map_err(|_| {
                    anyhow!("--username needs a password: pipe it to --password-stdin or set {PASSWORD_ENV}")
                })?),
            };
            let c = client(&node).await?;
            let req = PullImageRequest { source: source.clone(), reference, plain_http, username, password };
            let op = c.pull_image(&req).await.with_context(|| format!("pulling {source}"))?;
            drop(req);
            follow(&c, op, &format!("the pull of {source}"), no_wait, json).await
        }
        ImageCommand::Promote { reference, to } => {
            let to = match to {
                Some(t) => t,
                None => {
                    let name = reference.rsplit_once(':').map(|(n, _)| n).unwrap_or(&reference);
                    format!("{name}:latest")
                }
            };
            let img = client(&node).await?.promote_image(&reference, &to).await?;
            if json {
                output::json(&img)?
            } else {
                println!("{} -> {}", img.reference, img.digest)
            }
            Ok(0)
        }
        ImageCommand::Rm { references } => {
            let c = client(&node).await?;
            let mut code = 0;
            for r in &references {
                match c.delete_image(r).await {
                    Ok(()) => println!("{r}"),
                    Err(e) => {
                        eprintln!("error: deleting {r}: {}", flotilla_agent::http::error_chain(&e));
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
    }
}

/// The environment variable `image pull --username` reads the password
/// from when `--password-stdin` is not given.
const PASSWORD_ENV: &str = "FLOTILLA_REGISTRY_PASSWORD";

/// Follows an import or pull operation with a progress bar (on a terminal)
/// and prints the image it made.
async fn follow(
    c: &flotilla_node::NodeClient,
    op: flotilla_api::Operation,
    what: &str,
    no_wait: bool,
    json: bool,
) -> anyhow::Result<i32> {
    if no_wait {
        if json {
            output::json(&op)?
        } else {
            println!("{}", op.id)
        }
        return Ok(0);
    }
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:30}] {pos}/{len} layers  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });
    let op = c
        .wait_operation(&op.id, None, |op| {
            let (Some(bar), Some(st)) = (&bar, op.steps.last()) else { return };
            // Per-layer steps (`layer` of an import, `pulling_layer` and
            // `applying` of a pull) read "i/n digest ...".
            if matches!(st.name.as_str(), "layer" | "pulling_layer" | "applying")
                && let Some((i, n)) = st.detail.as_deref().and_then(|d| d.split_whitespace().next()?.split_once('/'))
            {
                bar.set_length(n.parse().unwrap_or(1));
                bar.set_position(i.parse::<u64>().unwrap_or(1).saturating_sub(1));
            }
            bar.set_message(format!("{} {}", st.name, st.detail.as_deref().unwrap_or("")));
        })
        .await
        .with_context(|| format!("waiting for {what}"))?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if op.state != OperationState::Succeeded {
        let e = op.error.clone().unwrap_or_else(|| flotilla_api::ApiError::internal("no result"));
        return Err(anyhow!("{}", output::operation_error(&op, &e)));
    }
    let img: Image = serde_json::from_value(op.result.unwrap_or_default()).context("reading the result")?;
    if json {
        output::json(&img)?
    } else {
        println!("{} {}", img.reference, img.digest);
        if img.skipped_special > 0 || img.dropped_xattrs > 0 {
            eprintln!(
                "skipped {} device nodes and fifos and {} extended attributes (never made on the host; a sandbox has its own /dev)",
                img.skipped_special, img.dropped_xattrs
            );
        }
    }
    Ok(0)
}

fn short(digest: &str) -> String {
    digest.strip_prefix("sha256:").map(|h| h[..12.min(h.len())].to_string()).unwrap_or_else(|| digest.to_string())
}

fn rows(list: &[Image]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            vec![
                i.reference.clone(),
                short(&i.digest),
                i.source_format.clone(),
                flotilla_api::units::format_size(i.size_bytes),
                i.layers.len().to_string(),
                i.used_by.len().to_string(),
                output::relative(i.created_at),
            ]
        })
        .collect();
    output::table(&["REFERENCE", "DIGEST", "FORMAT", "SIZE", "LAYERS", "SANDBOXES", "CREATED"], &rows);
}

fn detail(i: &Image) {
    println!("reference:  {}", i.reference);
    println!("digest:     {}", i.digest);
    println!("format:     {}", i.source_format);
    println!("source:     {}", i.source);
    println!("size:       {}", flotilla_api::units::format_size(i.size_bytes));
    if i.skipped_special > 0 || i.dropped_xattrs > 0 {
        // Real root filesystems carry /dev nodes and file capabilities;
        // neither is ever made on the host.
        println!(
            "skipped:    {} device nodes and fifos, {} extended attributes (a sandbox has its own /dev)",
            i.skipped_special, i.dropped_xattrs
        );
    }
    println!("created:    {} ({})", i.created_at, output::relative(i.created_at));
    for l in &i.layers {
        println!("layer:      {l}");
    }
    if !i.aliases.is_empty() {
        println!("aliases:    {}", i.aliases.join(", "));
    }
    println!("used by:    {}", if i.used_by.is_empty() { "-".to_string() } else { i.used_by.join(", ") });
}
