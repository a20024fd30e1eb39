//! Workspace from git: a revision of a local or remote repository exported
//! into a sandbox's workspace (the coordinator's "inspect repo, write tar"
//! steps).
//!
//! `git archive` streams the tree as a tar straight into the agent: nothing
//! is checked out on the host. A remote repository is fetched shallowly
//! (`--depth 1`) into a temporary bare repository first. Git runs with
//! transports limited to file, git, http(s) and ssh (never `ext::`, which
//! runs commands), without system config, and non-interactively.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use flotilla_api::{ApiError, ErrorCode};
use tokio::process::Command;

/// A revision ready to export.
#[derive(Debug)]
pub struct Revision {
    /// The repository to run `git archive` in.
    pub repo: PathBuf,
    /// The full commit id.
    pub commit: String,
    /// Removed when dropped (remote fetches only).
    _tmp: Option<TempDir>,
}

/// A directory removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `git [-C dir]` as Flotilla runs it on repositories it does not trust
/// (the node's workspaces, the coordinator's mirrors): no system config,
/// only the file, git, http(s) and ssh transports, never a prompt (ssh in
/// batch mode), no stdin, killed when dropped. Callers add their own
/// config on top.
pub fn hardened(dir: Option<&Path>) -> Command {
    let mut c = Command::new("git");
    if let Some(d) = dir {
        c.arg("-C").arg(d);
    }
    c.env("GIT_ALLOW_PROTOCOL", "file:git:http:https:ssh")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

fn git(dir: Option<&Path>) -> Command {
    let mut c = hardened(dir);
    // Root reads repositories owned by others; only read-only commands run.
    c.args(["-c", "safe.directory=*", "-c", "core.fsmonitor=false"]);
    c
}

async fn output(mut cmd: Command, what: &str) -> Result<String, ApiError> {
    let out = cmd.output().await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound { " (install git: apt-get install -y git)" } else { "" };
        ApiError::internal(format!("{what}: running git: {e}{hint}"))
    })?;
    if !out.status.success() {
        return Err(ApiError::invalid(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("git failed")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Finds `rev` in `repo` (a local path or a URL), fetching it if remote.
pub async fn inspect(repo: &str, rev: &str, scratch: &Path) -> Result<Revision, ApiError> {
    if rev.starts_with('-') || repo.starts_with('-') {
        return Err(ApiError::invalid("a repository or revision may not start with '-'"));
    }
    let local = Path::new(repo);
    if local.is_absolute() && local.exists() {
        let mut c = git(Some(local));
        c.args(["rev-parse", "--verify", "--end-of-options", &format!("{rev}^{{commit}}")]);
        let commit = output(c, &format!("finding {rev} in {repo}")).await?;
        return Ok(Revision { repo: local.to_path_buf(), commit, _tmp: None });
    }
    if !(repo.contains("://") || repo.contains('@')) {
        return Err(ApiError::invalid(format!(
            "repository {repo:?} is neither an absolute path on the node nor a URL"
        )));
    }
    let tmp = TempDir(scratch.join(format!("git-{}", crate::node::new_id())));
    std::fs::create_dir_all(&tmp.0).map_err(|e| ApiError::internal(format!("creating {}: {e}", tmp.0.display())))?;
    let mut c = git(None);
    c.args(["init", "-q", "--bare"]).arg(&tmp.0);
    output(c, "preparing a fetch").await?;
    let mut c = git(Some(&tmp.0));
    c.args(["fetch", "-q", "--depth", "1", "--end-of-options", repo, rev]);
    output(c, &format!("fetching {rev} from {repo}")).await?;
    let mut c = git(Some(&tmp.0));
    c.args(["rev-parse", "--verify", "FETCH_HEAD^{commit}"]);
    let commit = output(c, "reading the fetched commit").await?;
    Ok(Revision { repo: tmp.0.clone(), commit, _tmp: Some(tmp) })
}

/// Starts `git archive` of the revision; its stdout is the tar.
pub fn archive(rev: &Revision) -> Result<tokio::process::Child, ApiError> {
    let mut c = git(Some(&rev.repo));
    c.args(["archive", "--format=tar", &rev.commit]).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().map_err(|e| ApiError::internal(format!("running git archive: {e}")))
}

/// Waits for `git archive` and turns a failure into an error.
pub async fn finish(child: tokio::process::Child) -> Result<(), ApiError> {
    let out = child.wait_with_output().await.map_err(|e| ApiError::internal(format!("git archive: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::Internal,
            format!("git archive failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        ))
    }
}
