//! `flotilla build sandbox`: a sandbox set up exactly like one of a
//! project's builders (its image, backend, resources, network and env) with
//! the source at a revision in `/workspace`, to debug a build by hand. Go's
//! build farm calls this a gomote. It is placed by the scheduler at the
//! interactive level and deleted after a while without use.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::CreateSandboxRequest;
use flotilla_api::coordinator::{BuilderSandbox, BuilderSandboxRequest};
use futures_util::StreamExt;

use crate::build::BuildSpec;
use crate::runtime::Coordinator;
use crate::sched::{self, Priority, Queued};

/// Without use for this long, the sandbox is deleted.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(30 * 60);
/// Its label: the revision it was made at.
pub const LABEL: &str = "flotilla.builder-sandbox";

/// What failed, for the API's status: the request (400) or the machinery.
#[derive(Debug)]
pub enum Refused {
    Invalid(String),
    Unavailable(String),
}

/// Makes the sandbox: reads `flotilla.toml` at the revision, places the
/// builder's need, creates the sandbox and streams the source in.
pub async fn builder_sandbox(
    c: &Arc<Coordinator>,
    project: &str,
    req: &BuilderSandboxRequest,
) -> Result<BuilderSandbox, Refused> {
    use Refused::{Invalid, Unavailable};
    let p = c
        .store
        .project(project)
        .await
        .map_err(|e| Unavailable(crate::error_chain(&e)))?
        .ok_or_else(|| Invalid(format!("project {project} not found")))?;
    let mirror = c.mirror(project).await.map_err(|e| Unavailable(crate::error_chain(&*e)))?;
    mirror.fetch().await.map_err(|e| Unavailable(crate::error_chain(&e)))?;
    let rev = match &req.rev {
        Some(r) => r.clone(),
        None => p.branches.first().cloned().unwrap_or_else(|| "HEAD".into()),
    };
    let sha =
        mirror.resolve(&rev).await.map_err(|e| Invalid(format!("revision {rev:?}: {}", crate::error_chain(&e))))?;
    let (_, parsed) = crate::poller::config_at(c, &mirror, &sha).await.map_err(Unavailable)?;
    let config = parsed.map_err(Invalid)?;
    let Some(builder) = config.builder(&req.builder) else {
        let names: Vec<String> = config.builders.iter().map(|b| b.name.to_string()).collect();
        return Err(Invalid(format!(
            "no builder {:?} in flotilla.toml at {}; it has: {}",
            req.builder,
            &sha[..12.min(sha.len())],
            names.join(", ")
        )));
    };
    let spec = BuildSpec::from_builder(builder);
    let need = spec.need().map_err(Invalid)?;

    // The scheduler decides, at the interactive level: a node that can run
    // the builder and has room now.
    let fleet: Vec<_> = c.describe_fleet().await.into_iter().filter_map(|(n, cl, i)| Some((n, cl, i.ok()?))).collect();
    let mut nodes: Vec<_> = fleet.iter().map(|(name, _, info)| sched::view_of(name, info)).collect();
    let ask = Queued { id: 0, project: project.to_string(), priority: Priority::Interactive, order: 0, need };
    let plan = sched::place(&mut nodes, &[ask], &BTreeMap::new());
    if let Some(w) = plan.waiting.first() {
        return Err(Unavailable(format!("no room for a {} sandbox: {}", req.builder, w.reason)));
    }
    let (node_name, node, _) = &fleet[plan.placements[0].node];

    let n =
        c.store.next_counter(&format!("sandbox:{project}")).await.map_err(|e| Unavailable(crate::error_chain(&e)))?;
    let mut name = format!("{project}-{}-{n}", req.builder);
    if name.len() > 63 {
        name = format!("gomote-{n}");
    }
    let idle = req.idle_ttl_s.map_or(DEFAULT_IDLE, Duration::from_secs);
    let create = CreateSandboxRequest {
        image: Some(spec.image.clone()),
        backend: spec.backend,
        name: Some(name.clone()),
        resources: spec.resources.clone(),
        idle_ttl_s: Some(idle.as_secs().max(1)),
        labels: [
            (LABEL.to_string(), sha.clone()),
            ("flotilla.project".to_string(), project.to_string()),
            ("flotilla.builder".to_string(), req.builder.clone()),
        ]
        .into(),
        env: spec.env.clone(),
        network: spec.network,
        ..Default::default()
    };
    let created = node
        .create(&create)
        .await
        .map_err(|e| Unavailable(format!("creating the sandbox failed: {}", crate::error_chain(&e))))?;
    let mut child = mirror.archive(&sha).map_err(|e| Unavailable(crate::error_chain(&e)))?;
    let stdout = child.stdout.take().expect("piped");
    let stream = tokio_util::io::ReaderStream::with_capacity(stdout, 256 << 10);
    let body = http_body_util::StreamBody::new(stream.map(|r| r.map(hyper::body::Frame::data)));
    let put = node.sandbox(&created.id).put_workspace(body, None, &Default::default()).await;
    let finished = crate::git::Mirror::finish(child).await;
    if let Err(e) =
        put.map(|_| ()).map_err(|e| crate::error_chain(&e)).and(finished.map_err(|e| crate::error_chain(&e)))
    {
        let _ = node.delete(&created.id).await;
        return Err(Unavailable(format!("writing the source at {sha} into the sandbox failed: {e}")));
    }
    // Every use pushes `delete_at` on: read it after the import.
    let delete_at = node.get(&created.id).await.ok().and_then(|s| s.delete_at).or(created.delete_at);
    Ok(BuilderSandbox {
        sandbox_id: created.id,
        name,
        node: node_name.clone(),
        project: project.to_string(),
        builder: req.builder.clone(),
        rev: sha,
        image: spec.image,
        backend: spec.backend.as_str().to_string(),
        delete_at,
    })
}
