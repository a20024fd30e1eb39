//! Apps on disk: the seed's layout, with every state change an atomic
//! rename or an exclusive create.
//!
//! ```text
//! HOME/apps/app-<hash(title)>/title
//!   installation-<id>/state/{active|uninstalled}
//!   installation-<id>/v<N>/{envelope.json,origin,bin?}
//!   installation-<id>/{current,previous} -> v<N>
//!   installation-<id>/instances/instance-<id>/{state/<state>,version,run.json,logs/}
//! ```
//!
//! A state is an empty file whose *name* is the state, alone in `state/`.
//! A transition renames it; when the source is gone someone else moved it
//! first, and the loser re-reads to say why. Links are replaced by writing
//! `NAME.new` and renaming it over `NAME`. Nothing here waits or spawns;
//! the callers serialise their own decisions.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::Digest;

/// Where apps live under a node's data dir.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// An installation's address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstKey {
    pub title: String,
    pub inst: String,
}

/// An instance's address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceKey {
    pub title: String,
    pub inst: String,
    pub n: String,
}

impl InstKey {
    pub fn address(&self) -> String {
        format!("{}/{}", self.title, self.inst)
    }
    pub fn instance(&self, n: &str) -> InstanceKey {
        InstanceKey { title: self.title.clone(), inst: self.inst.clone(), n: n.to_string() }
    }
}

impl InstanceKey {
    pub fn address(&self) -> String {
        format!("{}/{}/{}", self.title, self.inst, self.n)
    }
    pub fn installation(&self) -> InstKey {
        InstKey { title: self.title.clone(), inst: self.inst.clone() }
    }
    /// The sandbox that runs it: unique per instance, at most 63 bytes.
    pub fn sandbox_name(&self) -> String {
        format!("{}.{}.{}", self.title, self.inst, self.n)
    }
}

/// The directory name of an app: a hash, so any title maps to one safe name.
pub fn app_dir_name(title: &str) -> String {
    let h = sha2::Sha256::digest(title.as_bytes());
    format!("app-{}", h.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>())
}

impl Layout {
    pub fn new(home: &Path) -> Layout {
        Layout { root: home.join("apps") }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn app(&self, title: &str) -> PathBuf {
        self.root.join(app_dir_name(title))
    }

    pub fn installation(&self, k: &InstKey) -> PathBuf {
        self.app(&k.title).join(format!("installation-{}", k.inst))
    }

    pub fn instance(&self, k: &InstanceKey) -> PathBuf {
        self.installation(&k.installation()).join("instances").join(format!("instance-{}", k.n))
    }

    /// Every installation on disk: `(key, dir)`, in order.
    pub fn installations(&self) -> Vec<(InstKey, PathBuf)> {
        let mut out = Vec::new();
        for app in children(&self.root, "app-") {
            let Ok(title) = std::fs::read_to_string(app.1.join("title")) else { continue };
            for (inst, dir) in children(&app.1, "installation-") {
                out.push((InstKey { title: title.clone(), inst }, dir));
            }
        }
        out.sort_by(|a, b| (&a.0.title, num(&a.0.inst)).cmp(&(&b.0.title, num(&b.0.inst))));
        out
    }

    /// The instances of an installation: `(id, dir)`, in order.
    pub fn instances(&self, k: &InstKey) -> Vec<(String, PathBuf)> {
        let mut v = children(&self.installation(k).join("instances"), "instance-");
        v.sort_by_key(|(n, _)| num(n));
        v
    }
}

fn num(s: &str) -> u64 {
    s.parse().unwrap_or(u64::MAX)
}

/// Entries of `dir` named `PREFIX<id>`, as `(id, path)`.
fn children(dir: &Path, prefix: &str) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    rd.filter_map(|e| {
        let e = e.ok()?;
        let name = e.file_name().into_string().ok()?;
        let id = name.strip_prefix(prefix)?.to_string();
        Some((id, e.path()))
    })
    .collect()
}

/// Creates `parent/PREFIX<n>` for the lowest free `n` above every existing
/// one, exclusively: of two racing callers each gets its own. Returns `n`.
pub fn create_numbered(parent: &Path, prefix: &str) -> io::Result<(String, PathBuf)> {
    std::fs::create_dir_all(parent)?;
    let mut n = children(parent, prefix).iter().filter_map(|(id, _)| id.parse::<u64>().ok()).max().unwrap_or(0) + 1;
    loop {
        let dir = parent.join(format!("{prefix}{n}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok((n.to_string(), dir)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Why a state could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct Damaged(pub String);

/// Creates `dir/state/<state>`: the first state of a new object.
pub fn init_state(dir: &Path, state: &str) -> io::Result<()> {
    std::fs::create_dir_all(dir.join("state"))?;
    std::fs::OpenOptions::new().write(true).create_new(true).open(dir.join("state").join(state))?;
    Ok(())
}

/// Reads the state of `dir`: the one file in `dir/state` whose name is in
/// `known`.
pub fn read_state<'a>(dir: &Path, known: &[&'a str]) -> Result<&'a str, Damaged> {
    let sd = dir.join("state");
    let rd = std::fs::read_dir(&sd).map_err(|e| Damaged(format!("cannot read {}: {e}", sd.display())))?;
    let mut found = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Damaged(format!("cannot read {}: {e}", sd.display())))?;
        let name = e.file_name().to_string_lossy().into_owned();
        match known.iter().find(|k| **k == name) {
            Some(k) => found.push(*k),
            None => return Err(Damaged(format!("unknown state file {name:?} in {}", sd.display()))),
        }
    }
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(Damaged(format!("no state file in {}", sd.display()))),
        many => Err(Damaged(format!("{} state files in {}: {}", many.len(), sd.display(), many.join(", ")))),
    }
}

/// Moves `dir` from state `from` to `to` by renaming its state file.
/// `Ok(false)`: `from` was not the state (someone else moved it).
pub fn transition(dir: &Path, from: &str, to: &str) -> io::Result<bool> {
    if from == to {
        return Ok(dir.join("state").join(from).exists());
    }
    let sd = dir.join("state");
    if sd.join(to).exists() {
        // Never clobber: a second state file would be damage, not a change.
        return Ok(false);
    }
    match std::fs::rename(sd.join(from), sd.join(to)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `path` atomically: a temporary file beside it, then a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
    }
    std::fs::rename(&tmp, path)
}

/// Points the symlink `dir/name` at `target` (a sibling name): `name.new`
/// first, then a rename over `name`, so readers see the old or the new.
pub fn swap_link(dir: &Path, name: &str, target: &str) -> io::Result<()> {
    let new = dir.join(format!("{name}.new"));
    let _ = std::fs::remove_file(&new);
    std::os::unix::fs::symlink(target, &new)?;
    std::fs::rename(&new, dir.join(name))
}

/// Removes what a crash can leave beside an object's files: a link that
/// was written (`NAME.new`) but not yet renamed into place, and a file
/// written (`NAME.tmp`) but not yet renamed. Neither was ever the truth.
pub fn remove_leftovers(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".new") || name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Where the symlink `dir/name` points (a version name), if it exists.
pub fn read_link(dir: &Path, name: &str) -> Option<String> {
    let t = std::fs::read_link(dir.join(name)).ok()?;
    Some(t.to_string_lossy().into_owned())
}

/// Completed version dirs of an installation (`v<N>` holding an
/// `envelope.json`), oldest first.
pub fn versions(inst_dir: &Path) -> Vec<String> {
    let mut v: Vec<(u64, String)> = children(inst_dir, "v")
        .into_iter()
        .filter(|(n, p)| n.parse::<u64>().is_ok() && p.join("envelope.json").is_file())
        .map(|(n, _)| (num(&n), format!("v{n}")))
        .collect();
    v.sort();
    v.into_iter().map(|(_, s)| s).collect()
}

/// Version dirs a crash left half-written (no `envelope.json`), which
/// nothing can point at.
pub fn incomplete_versions(inst_dir: &Path) -> Vec<PathBuf> {
    children(inst_dir, "v")
        .into_iter()
        .filter(|(n, p)| n.parse::<u64>().is_ok() && !p.join("envelope.json").is_file())
        .map(|(_, p)| p)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [&str; 3] = ["running", "dying", "not-running"];

    #[test]
    fn of_racing_transitions_exactly_one_wins() {
        let d = tempfile::tempdir().unwrap();
        init_state(d.path(), "running").unwrap();
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> =
                (0..20).map(|_| s.spawn(|| transition(d.path(), "running", "dying").unwrap() as usize)).collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
        assert_eq!(read_state(d.path(), &STATES), Ok("dying"));
        assert!(!transition(d.path(), "running", "not-running").unwrap(), "a stale source loses");
    }

    #[test]
    fn damaged_states_are_named() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_state(d.path(), &STATES).unwrap_err().0.contains("cannot read"));
        init_state(d.path(), "running").unwrap();
        std::fs::write(d.path().join("state/dying"), "").unwrap();
        assert!(read_state(d.path(), &STATES).unwrap_err().0.contains("2 state files"));
        assert!(!transition(d.path(), "running", "dying").unwrap(), "never clobbers a second state file");
        std::fs::remove_file(d.path().join("state/dying")).unwrap();
        std::fs::write(d.path().join("state/garbage"), "").unwrap();
        assert!(read_state(d.path(), &STATES).unwrap_err().0.contains("unknown state file"));
    }

    #[test]
    fn numbered_dirs_are_exclusive_and_links_swap_whole() {
        let d = tempfile::tempdir().unwrap();
        let ids: std::collections::BTreeSet<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..10).map(|_| s.spawn(|| create_numbered(d.path(), "v").unwrap().0)).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ids.len(), 10);
        assert!(versions(d.path()).is_empty(), "no envelope yet: incomplete");
        assert_eq!(incomplete_versions(d.path()).len(), 10);
        std::fs::write(d.path().join("v2/envelope.json"), "{}").unwrap();
        std::fs::write(d.path().join("v10/envelope.json"), "{}").unwrap();
        assert_eq!(versions(d.path()), ["v2", "v10"]);
        swap_link(d.path(), "current", "v2").unwrap();
        swap_link(d.path(), "current", "v10").unwrap();
        assert_eq!(read_link(d.path(), "current").as_deref(), Some("v10"));
        assert!(!d.path().join("current.new").exists());
    }
}
