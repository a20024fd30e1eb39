//! The project's repository, through the `git` CLI: a bare mirror per
//! project that the poller fetches, reads configs from, archives revisions
//! of, and commits try patches into (under `refs/flotilla/try/`, which
//! fetches never touch).
//!
//! Git runs non-interactively, without system config, with transports
//! limited to file, git, http(s) and ssh (never `ext::`, which runs
//! commands), and with a global config of our own (`GIT_CONFIG_GLOBAL`,
//! next to the mirrors) that says `safe.directory = *`, so a coordinator
//! running as root can read a repository another user owns. (Not `-c` or
//! `GIT_CONFIG_COUNT`: git clears those for the `upload-pack` it runs on a
//! local repository.)

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Largest `flotilla.toml` read.
pub const MAX_FILE: usize = 1 << 20;
/// How long a clone or fetch may take before it is killed and reported: a
/// poller is never stuck behind a remote that stopped answering.
pub const NETWORK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("running git ({what}): {source}{hint}")]
    Spawn {
        what: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {stderr}")]
    Failed { what: String, stderr: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: no answer within {}s", .after.as_secs())]
    TimedOut { what: String, after: std::time::Duration },
}

/// [`run`] with [`NETWORK_TIMEOUT`] (the child is killed on drop).
async fn run_remote(cmd: Command, what: &str) -> Result<String, GitError> {
    match tokio::time::timeout(NETWORK_TIMEOUT, run(cmd, what)).await {
        Ok(r) => r,
        Err(_) => Err(GitError::TimedOut { what: what.to_string(), after: NETWORK_TIMEOUT }),
    }
}

/// A commit: its full id and subject line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub sha: String,
    pub subject: String,
}

/// A bare mirror of a project's repository.
#[derive(Debug)]
pub struct Mirror {
    dir: PathBuf,
    config: PathBuf,
    /// Held while git writes refs (fetch, a try commit): two fetches of
    /// one mirror at once (the poller's timer, a webhook, `try`) would race
    /// for the ref locks and one would fail.
    writing: tokio::sync::Mutex<()>,
}

/// `url` without a password or token in it (for messages).
pub fn redact(url: &str) -> String {
    // The userinfo ends at the last '@' before the path.
    let Some(s) = url.find("://") else { return url.to_string() };
    let rest = &url[s + 3..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{}://…@{}", &url[..s], &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// The global config every git we run reads.
const GITCONFIG: &str = "[safe]\n\tdirectory = *\n[core]\n\tfsmonitor = false\n";

/// Writes the global config beside the mirrors (once).
fn gitconfig(mirrors: &Path) -> Result<PathBuf, GitError> {
    let f = mirrors.join("gitconfig");
    if std::fs::read_to_string(&f).is_ok_and(|t| t == GITCONFIG) {
        return Ok(f);
    }
    std::fs::create_dir_all(mirrors).map_err(|e| spawn_error("creating the mirrors directory", e))?;
    let tmp = mirrors.join("gitconfig.tmp");
    std::fs::write(&tmp, GITCONFIG)
        .and_then(|()| std::fs::rename(&tmp, &f))
        .map_err(|e| spawn_error("writing the mirrors' git config", e))?;
    Ok(f)
}

/// The node's hardened git, reading the mirrors' own global config.
fn git(dir: Option<&Path>, config: &Path) -> Command {
    let mut c = flotilla_node::git::hardened(dir);
    c.env("GIT_CONFIG_GLOBAL", config);
    c
}

fn spawn_error(what: &str, e: std::io::Error) -> GitError {
    let hint = if e.kind() == std::io::ErrorKind::NotFound { " (install git: apt-get install -y git)" } else { "" };
    GitError::Spawn { what: what.to_string(), hint, source: e }
}

/// Runs `cmd`; its stdout, trimmed, or an error with the last lines of
/// stderr.
async fn run(mut cmd: Command, what: &str) -> Result<String, GitError> {
    let out = cmd.output().await.map_err(|e| spawn_error(what, e))?;
    if !out.status.success() {
        return Err(failed(what, &out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn failed(what: &str, stderr: &[u8]) -> GitError {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.trim().lines().collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
    GitError::Failed { what: what.to_string(), stderr: if tail.is_empty() { "git failed".into() } else { tail } }
}

fn check_rev(rev: &str) -> Result<(), GitError> {
    if rev.is_empty() || rev.starts_with('-') {
        return Err(GitError::Invalid(format!("revision {rev:?}: may not be empty or start with '-'")));
    }
    Ok(())
}

impl Mirror {
    /// The mirror in `dir`, made by cloning `url` if it is not there yet
    /// (into `dir.tmp`, renamed when complete: a crash never leaves half).
    pub async fn open_or_clone(dir: &Path, url: &str) -> Result<Mirror, GitError> {
        if url.is_empty() || url.starts_with('-') {
            return Err(GitError::Invalid(format!("repository {url:?}: may not be empty or start with '-'")));
        }
        let parent = dir.parent().unwrap_or(Path::new("/"));
        let m = Mirror { dir: dir.to_path_buf(), config: gitconfig(parent)?, writing: tokio::sync::Mutex::new(()) };
        if dir.join("HEAD").exists() {
            let mut c = git(Some(dir), &m.config);
            c.args(["remote", "set-url", "origin", url]);
            run(c, "updating the mirror's origin").await?;
            return Ok(m);
        }
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let mut c = git(None, &m.config);
        c.args(["clone", "--quiet", "--bare", "--no-tags", "--", url]).arg(&tmp);
        let what = format!("cloning {}", redact(url));
        if let Err(e) = run_remote(c, &what).await {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        // A bare clone has no fetch refspec: set one that mirrors branches
        // and tags and leaves refs/flotilla alone.
        let mut c = git(Some(&tmp), &m.config);
        c.args(["config", "remote.origin.fetch", "+refs/heads/*:refs/heads/*"]);
        run(c, "configuring the mirror").await?;
        std::fs::rename(&tmp, dir).map_err(|e| spawn_error("placing the mirror", e))?;
        Ok(m)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Updates branches and tags from origin (forced, pruned); never
    /// touches `refs/flotilla/*`.
    pub async fn fetch(&self) -> Result<(), GitError> {
        let _writing = self.writing.lock().await;
        let mut c = git(Some(&self.dir), &self.config);
        c.args([
            "fetch",
            "--quiet",
            "--prune",
            "--force",
            "origin",
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
        ]);
        run_remote(c, "fetching the repository").await.map(|_| ())
    }

    /// Origin's default branch (what its HEAD points at).
    pub async fn default_branch(&self) -> Result<Option<String>, GitError> {
        let mut c = git(Some(&self.dir), &self.config);
        c.args(["symbolic-ref", "--quiet", "HEAD"]);
        match run(c, "reading HEAD").await {
            Ok(r) => Ok(r.strip_prefix("refs/heads/").map(str::to_string)),
            Err(GitError::Failed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The commit at the tip of `branch`, if it exists.
    pub async fn head(&self, branch: &str) -> Result<Option<String>, GitError> {
        check_rev(branch)?;
        let mut c = git(Some(&self.dir), &self.config);
        c.args(["rev-parse", "--verify", "--quiet", "--end-of-options", &format!("refs/heads/{branch}^{{commit}}")]);
        let out = c.output().await.map_err(|e| spawn_error("reading a branch", e))?;
        let sha = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok((out.status.success() && !sha.is_empty()).then_some(sha))
    }

    /// The full commit id of `rev` (a sha or its prefix, branch, tag).
    pub async fn resolve(&self, rev: &str) -> Result<String, GitError> {
        check_rev(rev)?;
        let mut c = git(Some(&self.dir), &self.config);
        c.args(["rev-parse", "--verify", "--end-of-options", &format!("{rev}^{{commit}}")]);
        run(c, &format!("finding revision {rev:?}")).await
    }

    /// Commits reachable from `to` and not from `from`, newest first, at
    /// most `limit`. Without `from`, or when `from` is unknown or not an
    /// ancestor of `to` (a force push), just `to`.
    pub async fn new_commits(&self, from: Option<&str>, to: &str, limit: usize) -> Result<Vec<Commit>, GitError> {
        check_rev(to)?;
        let ancestor = match from {
            Some(f) if check_rev(f).is_ok() => {
                let mut c = git(Some(&self.dir), &self.config);
                c.args(["merge-base", "--is-ancestor", "--end-of-options", f, to]);
                c.output().await.map_err(|e| spawn_error("comparing revisions", e))?.status.success()
            }
            Some(_) | None => false,
        };
        if !ancestor {
            return Ok(vec![self.commit(to).await?]);
        }
        let mut c = git(Some(&self.dir), &self.config);
        c.args(["log", "--format=%H %s", &format!("--max-count={}", limit.max(1)), "--end-of-options"])
            .arg(format!("{}..{to}", from.unwrap_or_default()));
        let out = run(c, "listing new commits").await?;
        Ok(out.lines().filter_map(parse_commit).collect())
    }

    /// The commit `rev`: full id and subject.
    pub async fn commit(&self, rev: &str) -> Result<Commit, GitError> {
        check_rev(rev)?;
        let mut c = git(Some(&self.dir), &self.config);
        c.args(["log", "-1", "--format=%H %s", "--end-of-options", rev]);
        let out = run(c, &format!("reading commit {rev:?}")).await?;
        parse_commit(&out).ok_or_else(|| GitError::Invalid(format!("no commit {rev:?}")))
    }

    /// `path` at `rev`, or `None` when the file is not there.
    pub async fn read_file(&self, rev: &str, path: &str) -> Result<Option<String>, GitError> {
        check_rev(rev)?;
        let spec = format!("{rev}:{path}");
        // Its size first (from the object's header, nothing inflated): a
        // blob that would be gigabytes once decompressed is refused unread.
        let mut c = git(Some(&self.dir), &self.config);
        c.args(["cat-file", "-s", &spec]);
        let sized = c.output().await.map_err(|e| spawn_error("looking for a file", e))?;
        if !sized.status.success() {
            return Ok(None);
        }
        let size: u64 = String::from_utf8_lossy(&sized.stdout).trim().parse().unwrap_or(u64::MAX);
        if size > MAX_FILE as u64 {
            return Err(GitError::Invalid(format!("{path} at {rev} is {size} bytes, over the {MAX_FILE} read")));
        }
        let mut c = git(Some(&self.dir), &self.config);
        c.args(["cat-file", "blob", &spec]);
        let out = c.output().await.map_err(|e| spawn_error("reading a file", e))?;
        if !out.status.success() {
            return Err(failed(&format!("reading {path} at {rev}"), &out.stderr));
        }
        if out.stdout.len() > MAX_FILE {
            return Err(GitError::Invalid(format!("{path} at {rev} is over {MAX_FILE} bytes")));
        }
        String::from_utf8(out.stdout).map(Some).map_err(|_| GitError::Invalid(format!("{path} at {rev} is not UTF-8")))
    }

    /// Starts `git archive` of `rev`; its stdout is the tar (streamed by
    /// the caller), then [`Mirror::finish`].
    pub fn archive(&self, rev: &str) -> Result<tokio::process::Child, GitError> {
        check_rev(rev)?;
        let mut c = git(Some(&self.dir), &self.config);
        c.args(["archive", "--format=tar", "--end-of-options", rev]).stdout(Stdio::piped()).stderr(Stdio::piped());
        c.spawn().map_err(|e| spawn_error("git archive", e))
    }

    /// Waits for `git archive`; a failure is an error with its stderr.
    pub async fn finish(child: tokio::process::Child) -> Result<(), GitError> {
        let out = child.wait_with_output().await.map_err(|e| spawn_error("git archive", e))?;
        if out.status.success() { Ok(()) } else { Err(failed("git archive", &out.stderr)) }
    }

    /// Commits `patch` applied on `base` without a work tree (a temporary
    /// index), keeps it under `refs/flotilla/try/<sha>`, and returns its id.
    /// The commit of `patch` applied to `base`, dated `date` (Unix
    /// seconds): the same arguments give the same commit in any mirror,
    /// so a coordinator that did not accept a try can make its commit
    /// again from what the store keeps ([`crate::store::TryPatch`]).
    pub async fn apply_patch(&self, base: &str, patch: &str, message: &str, date: u64) -> Result<String, GitError> {
        check_rev(base)?;
        let _writing = self.writing.lock().await;
        let scratch = tempfile_in(&self.dir)?;
        let index = scratch.join("index");
        let patch_file = scratch.join("patch");
        std::fs::write(&patch_file, patch).map_err(|e| spawn_error("writing the patch", e))?;
        let result = async {
            let mut c = git(Some(&self.dir), &self.config);
            c.env("GIT_INDEX_FILE", &index).args(["read-tree", "--end-of-options", base]);
            run(c, "reading the base tree").await?;
            let mut c = git(Some(&self.dir), &self.config);
            c.env("GIT_INDEX_FILE", &index).args(["apply", "--cached", "--whitespace=nowarn"]).arg(&patch_file);
            run(c, "applying the patch").await?;
            let mut c = git(Some(&self.dir), &self.config);
            c.env("GIT_INDEX_FILE", &index).args(["write-tree"]);
            let tree = run(c, "writing the patched tree").await?;
            let mut c = git(Some(&self.dir), &self.config);
            c.env("GIT_AUTHOR_NAME", "flotilla try")
                .env("GIT_AUTHOR_EMAIL", "try@flotilla.invalid")
                .env("GIT_COMMITTER_NAME", "flotilla try")
                .env("GIT_COMMITTER_EMAIL", "try@flotilla.invalid")
                .env("GIT_AUTHOR_DATE", format!("{date} +0000"))
                .env("GIT_COMMITTER_DATE", format!("{date} +0000"))
                .args(["commit-tree", &tree, "-p", base, "-m", message]);
            let sha = run(c, "committing the patch").await?;
            let mut c = git(Some(&self.dir), &self.config);
            c.args(["update-ref", &format!("refs/flotilla/try/{sha}"), &sha]);
            run(c, "keeping the try commit").await?;
            Ok(sha)
        }
        .await;
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }
}

/// A fresh scratch directory inside the mirror.
fn tempfile_in(dir: &Path) -> Result<PathBuf, GitError> {
    let base = dir.join("flotilla-scratch");
    std::fs::create_dir_all(&base).map_err(|e| spawn_error("making a scratch directory", e))?;
    for n in 0..1000u32 {
        let p = base.join(format!("{}-{n}", std::process::id()));
        if std::fs::create_dir(&p).is_ok() {
            return Ok(p);
        }
    }
    Err(GitError::Invalid("no scratch directory could be made".into()))
}

fn parse_commit(line: &str) -> Option<Commit> {
    let (sha, subject) = line.split_once(' ').unwrap_or((line, ""));
    (sha.len() >= 40).then(|| Commit { sha: sha.to_string(), subject: subject.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn commit(dir: &Path, file: &str, body: &str, msg: &str) -> String {
        std::fs::write(dir.join(file), body).unwrap();
        sh(dir, &["add", file]);
        sh(dir, &["commit", "-q", "-m", msg]);
        sh(dir, &["rev-parse", "HEAD"])
    }

    /// A file past MAX_FILE is refused by its size, before it is read.
    #[tokio::test]
    async fn a_file_too_big_to_read_is_refused_by_its_size() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        sh(&src, &["init", "-q"]);
        let big = commit(&src, "flotilla.toml", &"x".repeat(MAX_FILE + 1), "big");
        let m = Mirror::open_or_clone(&t.path().join("m.git"), src.to_str().unwrap()).await.unwrap();
        let e = m.read_file(&big, "flotilla.toml").await.unwrap_err().to_string();
        assert!(e.contains(&format!("{} bytes, over", MAX_FILE + 1)), "{e}");
    }

    #[tokio::test]
    async fn a_mirror_follows_its_repository() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        sh(&src, &["init", "-q"]);
        let a = commit(&src, "flotilla.toml", "x = 1\n", "first");
        let m = Mirror::open_or_clone(&t.path().join("m.git"), src.to_str().unwrap()).await.unwrap();
        assert_eq!(m.default_branch().await.unwrap().as_deref(), Some("main"));
        assert_eq!(m.head("main").await.unwrap().as_deref(), Some(a.as_str()));
        assert_eq!(m.head("nope").await.unwrap(), None);
        assert_eq!(m.new_commits(None, &a, 5).await.unwrap(), vec![Commit { sha: a.clone(), subject: "first".into() }]);
        assert_eq!(m.read_file(&a, "flotilla.toml").await.unwrap().as_deref(), Some("x = 1\n"));
        assert_eq!(m.read_file(&a, "missing").await.unwrap(), None);

        let b = commit(&src, "a.txt", "a\n", "second");
        let c = commit(&src, "b.txt", "b\n", "third");
        m.fetch().await.unwrap();
        assert_eq!(m.head("main").await.unwrap().as_deref(), Some(c.as_str()));
        let new: Vec<String> = m.new_commits(Some(&a), &c, 10).await.unwrap().into_iter().map(|x| x.sha).collect();
        assert_eq!(new, [c.clone(), b.clone()], "newest first");
        assert_eq!(m.new_commits(Some(&a), &c, 1).await.unwrap().len(), 1);
        assert_eq!(m.resolve(&c[..10]).await.unwrap(), c);
        assert!(m.resolve("--upload-pack=x").await.is_err());
        assert!(m.resolve("nosuchrev").await.unwrap_err().to_string().contains("nosuchrev"));

        // A force push: only the new head.
        sh(&src, &["reset", "-q", "--hard", &a]);
        let d = commit(&src, "c.txt", "c\n", "rewritten");
        m.fetch().await.unwrap();
        let new: Vec<String> = m.new_commits(Some(&c), &d, 10).await.unwrap().into_iter().map(|x| x.sha).collect();
        assert_eq!(new, std::slice::from_ref(&d));

        // A patch becomes a commit on its base, kept across fetches.
        std::fs::write(src.join("c.txt"), "patched\n").unwrap();
        let diff = sh(&src, &["diff"]);
        sh(&src, &["checkout", "--", "."]);
        let p = m.apply_patch(&d, &format!("{diff}\n"), "try: a patch", 1_700_000_000).await.unwrap();
        assert_eq!(m.read_file(&p, "c.txt").await.unwrap().as_deref(), Some("patched\n"));
        assert_eq!(m.commit(&p).await.unwrap().subject, "try: a patch");
        m.fetch().await.unwrap();
        assert_eq!(m.resolve(&p).await.unwrap(), p);
        // Another mirror makes the very same commit from the same patch,
        // base and date (how a peer coordinator builds a try it did not take).
        let other = Mirror::open_or_clone(&t.path().join("other.git"), src.to_str().unwrap()).await.unwrap();
        assert!(other.commit(&p).await.is_err());
        assert_eq!(other.apply_patch(&d, &format!("{diff}\n"), "try: a patch", 1_700_000_000).await.unwrap(), p);
        let e = m.apply_patch(&d, "--- a/zz\n+++ b/zz\n@@ -1 +1 @@\n-q\n+r\n", "bad", 1_700_000_000).await.unwrap_err();
        assert!(e.to_string().contains("zz"), "{e}");

        // The archive holds the tree of the revision.
        let mut child = m.archive(&d).unwrap();
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(child.stdout.as_mut().unwrap(), &mut out).await.unwrap();
        Mirror::finish(child).await.unwrap();
        let names: Vec<String> = tar::Archive::new(&out[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"c.txt".to_string()) && names.contains(&"flotilla.toml".to_string()), "{names:?}");
        assert!(!names.contains(&"b.txt".to_string()));
    }

    #[tokio::test]
    async fn a_repository_owned_by_another_user_is_read() {
        if !flotilla_testkit::is_root() {
            eprintln!("SKIPPED one assertion: only root can chown the repository to another user");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        sh(&src, &["init", "-q"]);
        let a = commit(&src, "f", "x\n", "first");
        let status = std::process::Command::new("chown").args(["-R", "65534:65534"]).arg(&src).status().unwrap();
        assert!(status.success());
        let m = Mirror::open_or_clone(&t.path().join("m.git"), src.to_str().unwrap()).await.unwrap();
        m.fetch().await.unwrap();
        assert_eq!(m.head("main").await.unwrap().as_deref(), Some(a.as_str()));
    }

    /// The poller's timer, a webhook and `try` may all fetch one mirror at
    /// once; git's ref locks made all but one fail ("cannot lock ref").
    #[tokio::test]
    async fn concurrent_fetches_of_one_mirror_all_succeed() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        sh(&src, &["init", "-q"]);
        commit(&src, "f", "1\n", "one");
        let m =
            std::sync::Arc::new(Mirror::open_or_clone(&t.path().join("m.git"), src.to_str().unwrap()).await.unwrap());
        for round in 0..5 {
            let head = commit(&src, "f", &format!("{round}\n"), "next");
            let fetches: Vec<_> = (0..4)
                .map(|_| {
                    let m = m.clone();
                    tokio::spawn(async move { m.fetch().await })
                })
                .collect();
            for f in fetches {
                f.await.unwrap().unwrap();
            }
            assert_eq!(m.head("main").await.unwrap().as_deref(), Some(head.as_str()));
        }
    }

    #[test]
    fn urls_lose_their_secrets_in_messages() {
        assert_eq!(redact("https://user:tok@github.com/o/r.git"), "https://…@github.com/o/r.git");
        assert_eq!(redact("/srv/repo"), "/srv/repo");
        assert_eq!(redact("https://u:p@ss@host/a@b.git"), "https://…@host/a@b.git");
        assert_eq!(redact("https://host/a@b.git"), "https://host/a@b.git");
        assert_eq!(redact("git@github.com:o/r.git"), "git@github.com:o/r.git");
    }
}
