//! `flotilla.toml`: a project's builders and triggers, read from the
//! repository at each change (DESIGN §5a).
//!
//! ```toml
//! [triggers]
//! branches = ["main"]        # commits on these branches are built (default: the project's branch)
//! try = true                 # `flotilla try` accepted (default true)
//!
//! [[builder]]
//! name = "linux-amd64"       # os-arch[-suffix]
//! image = "host"             # default "host"; or NAME:TAG of an image on the node
//! backend = "process"        # or "vm"
//! cpus = 2
//! memory = "2G"
//! pids = 512
//! network = "none"           # or "outbound"
//! timeout = "20m"            # default 20m
//! env = { CI = "true" }
//! steps = [{ name = "test", run = "make check" }]
//! known_issue = "https://github.com/org/repo/issues/123"   # optional: the dashboard dims the builder and links it
//! ```
//!
//! Unknown keys are refused, and every error says where it is
//! (`builder[1] "linux-amd64": steps[0]: run is empty`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use flotilla_api::{BackendKind, NetworkMode, Resources};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where the config lives in the repository.
pub const CONFIG_FILE: &str = "flotilla.toml";
/// A builder's timeout when it names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// The longest timeout a builder may ask for: a stranger's config must not
/// hold a node for ever.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);

/// Go's `GOOS` values: what a builder name's first part may be.
pub const KNOWN_OS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "illumos",
    "ios",
    "js",
    "linux",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "wasip1",
    "windows",
];
/// Go's `GOARCH` values: what its second part may be.
pub const KNOWN_ARCH: &[&str] = &[
    "386", "amd64", "arm", "arm64", "loong64", "mips", "mipsle", "mips64", "mips64le", "ppc64", "ppc64le", "riscv64",
    "s390x", "wasm",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A parsed `flotilla.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectConfig {
    pub triggers: Triggers,
    pub builders: Vec<Builder>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Triggers {
    /// Branches whose commits are built; empty means the project's branch.
    pub branches: Vec<String>,
    /// Whether `flotilla try` is accepted.
    pub try_enabled: bool,
    /// Which commits of a push get a run.
    pub commits: Commits,
}

/// Which commits of a push get a run (`[triggers] commits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Commits {
    /// Every commit, oldest first (`"all"`, the default).
    #[default]
    All,
    /// Only the branch's new head (`"head"`).
    Head,
}

impl Commits {
    pub fn as_str(self) -> &'static str {
        match self {
            Commits::All => "all",
            Commits::Head => "head",
        }
    }
}

/// Steps one builder may have: a `flotilla.toml` is a stranger's input, and
/// each step is a process, a timeline entry and a store row.
pub const MAX_STEPS: usize = 1000;

/// A named build configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Builder {
    pub name: BuilderName,
    pub image: String,
    pub backend: BackendKind,
    pub resources: Resources,
    pub network: NetworkMode,
    pub timeout: Duration,
    pub env: BTreeMap<String, String>,
    /// The project's secrets this builder's steps get as environment
    /// variables (`flotilla secret set`), in builds that may have them
    /// ([`crate::secrets::allowed`]).
    pub secrets: Vec<String>,
    pub steps: Vec<Step>,
    /// An http(s) link to an issue known to break this builder: the
    /// dashboard's grid dims the builder and links the issue (Go's
    /// `KnownIssues`). Its builds run as ever.
    pub known_issue: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub run: String,
}

/// `os-arch[-suffix]`, as Go's build farm names its builders.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BuilderName {
    pub os: String,
    pub arch: String,
    pub suffix: Option<String>,
}

impl FromStr for BuilderName {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<BuilderName, ConfigError> {
        let bad = |why: String| {
            ConfigError(format!(
                "{s:?}: a builder name is os-arch[-suffix] such as linux-amd64 or linux-arm64-race; {why}"
            ))
        };
        let mut parts = s.splitn(3, '-');
        let os = parts.next().unwrap_or_default();
        let Some(arch) = parts.next() else {
            return Err(bad(format!("{s:?} has no '-'")));
        };
        if !KNOWN_OS.contains(&os) {
            return Err(bad(format!("{os:?} is not an OS (one of {})", KNOWN_OS.join(", "))));
        }
        if !KNOWN_ARCH.contains(&arch) {
            return Err(bad(format!("{arch:?} is not an architecture (one of {})", KNOWN_ARCH.join(", "))));
        }
        let suffix = match parts.next() {
            None => None,
            Some(x) => {
                let ok = !x.is_empty()
                    && x.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
                if !ok {
                    return Err(bad(format!(
                        "the suffix {x:?} may hold only lowercase letters, digits, '-', '_' and '.'"
                    )));
                }
                Some(x.to_string())
            }
        };
        Ok(BuilderName { os: os.to_string(), arch: arch.to_string(), suffix })
    }
}

impl fmt::Display for BuilderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.os, self.arch)?;
        if let Some(s) = &self.suffix {
            write!(f, "-{s}")?;
        }
        Ok(())
    }
}

impl ProjectConfig {
    pub fn builder(&self, name: &str) -> Option<&Builder> {
        self.builders.iter().find(|b| b.name.to_string() == name)
    }

    /// Whether commits on `branch` are built (`default_branch` when the
    /// config names none).
    pub fn watches(&self, default_branch: &str, branch: &str) -> bool {
        if self.triggers.branches.is_empty() {
            branch == default_branch
        } else {
            self.triggers.branches.iter().any(|b| b == branch)
        }
    }
}

/// The config's identity: lowercase hex SHA-256 of its text.
pub fn config_hash(text: &str) -> String {
    // All 256 bits: configs are stored by this key across projects, and a
    // stranger's flotilla.toml must not be able to collide with another
    // project's (64 bits fall to a birthday search).
    let d = Sha256::digest(text.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    triggers: Option<RawTriggers>,
    #[serde(default)]
    builder: Vec<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTriggers {
    #[serde(default)]
    branches: Vec<String>,
    #[serde(default, rename = "try")]
    try_enabled: Option<bool>,
    #[serde(default)]
    commits: Option<Commits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuilder {
    name: String,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    backend: Option<BackendKind>,
    #[serde(default)]
    cpus: Option<f64>,
    #[serde(default)]
    memory: Option<String>,
    #[serde(default)]
    pids: Option<u64>,
    #[serde(default)]
    network: Option<NetworkMode>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    steps: Vec<toml::Value>,
    #[serde(default)]
    known_issue: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    run: String,
}

/// Parses a `flotilla.toml`.
pub fn parse(text: &str) -> Result<ProjectConfig, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError(e.to_string().trim_end().to_string()))?;
    let triggers = match raw.triggers {
        Some(t) => {
            for (i, b) in t.branches.iter().enumerate() {
                if b.is_empty() || b.starts_with('-') || b.contains("..") || b.contains(char::is_whitespace) {
                    return Err(ConfigError(format!("triggers.branches[{i}]: {b:?} is not a branch name")));
                }
            }
            Triggers {
                branches: t.branches,
                try_enabled: t.try_enabled.unwrap_or(true),
                commits: t.commits.unwrap_or_default(),
            }
        }
        None => Triggers { branches: Vec::new(), try_enabled: true, commits: Commits::All },
    };
    if raw.builder.is_empty() {
        return Err(ConfigError("no [[builder]]: a project needs at least one".into()));
    }
    let mut builders: Vec<Builder> = Vec::new();
    for (i, v) in raw.builder.into_iter().enumerate() {
        let label = v.get("name").and_then(|n| n.as_str()).map(|n| format!("builder[{i}] {n:?}"));
        let label = label.unwrap_or_else(|| format!("builder[{i}]"));
        let b = builder(v).map_err(|e| ConfigError(format!("{label}: {e}")))?;
        if builders.iter().any(|o| o.name == b.name) {
            return Err(ConfigError(format!("{label}: a builder named {} is already defined", b.name)));
        }
        builders.push(b);
    }
    Ok(ProjectConfig { triggers, builders })
}

fn builder(v: toml::Value) -> Result<Builder, String> {
    let raw: RawBuilder = v.try_into().map_err(|e: toml::de::Error| e.message().to_string())?;
    let name: BuilderName = raw.name.parse().map_err(|e: ConfigError| format!("name {}", e.0))?;
    let memory_bytes = match &raw.memory {
        Some(m) => Some(flotilla_api::units::parse_size(m).map_err(|e| format!("memory {m:?}: {e}"))?),
        None => None,
    };
    if let Some(c) = raw.cpus
        && !(c > 0.0 && c <= 1024.0)
    {
        return Err(format!("cpus {c}: between 0 and 1024"));
    }
    let timeout = match &raw.timeout {
        Some(t) => flotilla_api::units::parse_duration(t).map_err(|e| format!("timeout {t:?}: {e}"))?,
        None => DEFAULT_TIMEOUT,
    };
    if timeout.is_zero() {
        return Err("timeout: must be more than zero".into());
    }
    if timeout > MAX_TIMEOUT {
        return Err(format!("timeout {:?}: at most 7d", raw.timeout.as_deref().unwrap_or_default()));
    }
    if raw.steps.is_empty() {
        return Err("steps: a builder needs at least one step".into());
    }
    if raw.steps.len() > MAX_STEPS {
        return Err(format!("steps: {} steps, more than the {MAX_STEPS} a builder may have", raw.steps.len()));
    }
    let mut steps: Vec<Step> = Vec::new();
    for (j, s) in raw.steps.into_iter().enumerate() {
        let s: RawStep = s.try_into().map_err(|e: toml::de::Error| format!("steps[{j}]: {}", e.message()))?;
        if s.name.trim().is_empty() {
            return Err(format!("steps[{j}]: name is empty"));
        }
        if s.run.trim().is_empty() {
            return Err(format!("steps[{j}] {:?}: run is empty", s.name));
        }
        if steps.iter().any(|o| o.name == s.name) {
            return Err(format!("steps[{j}]: a step named {:?} is already defined", s.name));
        }
        steps.push(Step { name: s.name, run: s.run });
    }
    // A repository (or a stranger's try patch) names images from the node's
    // store, never a directory of the node's host.
    if let Some(dir) = raw.image.as_deref().and_then(|i| i.strip_prefix("dir:")) {
        return Err(format!(
            "image = \"dir:{dir}\": a repository may not name a host directory; import it on the node as an \
             image (`flotilla image import NAME:TAG {dir}`) and give image = \"NAME:TAG\""
        ));
    }
    if raw.secrets.len() > crate::secrets::MAX_PER_PROJECT {
        return Err(format!("secrets: more than the {} a project may have", crate::secrets::MAX_PER_PROJECT));
    }
    for (j, s) in raw.secrets.iter().enumerate() {
        crate::secrets::check_name(s).map_err(|e| format!("secrets[{j}]: {e}"))?;
        if raw.env.contains_key(s) {
            return Err(format!("secrets[{j}]: {s} is also set in env; a variable comes from one or the other"));
        }
    }
    if let Some(url) = &raw.known_issue
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        return Err(format!("known_issue {url:?}: give the issue's http(s) address"));
    }
    Ok(Builder {
        name,
        image: raw.image.unwrap_or_else(|| "host".into()),
        backend: raw.backend.unwrap_or_default(),
        resources: Resources { cpus: raw.cpus, memory_bytes, pids: raw.pids, ..Default::default() },
        network: raw.network.unwrap_or_default(),
        timeout,
        env: raw.env,
        secrets: raw.secrets,
        steps,
        known_issue: raw.known_issue,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN: &str = r#"
[triggers]
branches = ["main"]
try = true

[[builder]]
name = "linux-amd64"
image = "host"
backend = "process"
cpus = 2
memory = "2G"
timeout = "20m"
env = { CI = "true" }
steps = [
  { name = "deps", run = "pip install --target /workspace/.deps -r requirements.txt" },
  { name = "test", run = "python3 -m pytest -q" },
]

[[builder]]
name = "linux-amd64-vm"
image = "debian:12"
backend = "vm"
steps = [{ name = "test", run = "make check" }]
"#;

    #[test]
    fn the_design_example_parses() {
        let c = parse(DESIGN).unwrap();
        assert_eq!(c.triggers, Triggers { branches: vec!["main".into()], try_enabled: true, commits: Commits::All });
        assert_eq!(c.builders.len(), 2);
        let a = &c.builders[0];
        assert_eq!(a.name.to_string(), "linux-amd64");
        assert_eq!(a.resources.memory_bytes, Some(2 << 30));
        assert_eq!(a.resources.cpus, Some(2.0));
        assert_eq!(a.timeout, Duration::from_secs(1200));
        assert_eq!(a.env["CI"], "true");
        assert_eq!(a.steps[1], Step { name: "test".into(), run: "python3 -m pytest -q".into() });
        let b = c.builder("linux-amd64-vm").unwrap();
        assert_eq!(b.backend, BackendKind::Vm);
        assert_eq!(b.timeout, DEFAULT_TIMEOUT);
        assert!(c.watches("trunk", "main"));
        assert!(!c.watches("trunk", "trunk"));
    }

    #[test]
    fn defaults() {
        let c = parse("[[builder]]\nname = \"linux-arm64\"\nsteps = [{ name = \"t\", run = \"true\" }]\n").unwrap();
        assert_eq!(c.triggers, Triggers { branches: vec![], try_enabled: true, commits: Commits::All });
        let b = &c.builders[0];
        assert_eq!((b.image.as_str(), b.backend), ("host", BackendKind::Process));
        assert!(c.watches("trunk", "trunk"));
        assert!(!c.watches("trunk", "main"));
    }

    #[test]
    fn builder_names() {
        for good in
            ["linux-amd64", "linux-arm64-race", "linux-amd64-longtest-vm", "windows-386-2008", "darwin-arm64-13.x"]
        {
            let n: BuilderName = good.parse().unwrap();
            assert_eq!(n.to_string(), good);
        }
        let n: BuilderName = "linux-amd64-race".parse().unwrap();
        assert_eq!((n.os.as_str(), n.arch.as_str(), n.suffix.as_deref()), ("linux", "amd64", Some("race")));
        for (bad, says) in [
            ("linux_amd64", "has no '-'"),
            ("linux", "has no '-'"),
            ("linx-amd64", "\"linx\" is not an OS"),
            ("linux-x86", "\"x86\" is not an architecture"),
            ("linux-amd64-", "suffix \"\""),
            ("linux-amd64-Race", "suffix \"Race\""),
            ("", "has no '-'"),
        ] {
            let e = bad.parse::<BuilderName>().unwrap_err().0;
            assert!(e.contains(says) && e.contains("os-arch[-suffix]"), "{bad}: {e}");
        }
    }

    #[test]
    fn every_error_says_where() {
        let b = |body: &str| format!("[[builder]]\n{body}\n");
        for (text, says) in [
            (String::new(), "no [[builder]]".to_string()),
            (b("name = \"linux-amd64\"\nsteps = []"), "builder[0] \"linux-amd64\": steps: a builder needs".into()),
            (
                b("name = \"linux-amd64\"\nsteps = [{ name = \"t\", run = \" \" }]"),
                "builder[0] \"linux-amd64\": steps[0] \"t\": run is empty".into(),
            ),
            (
                b("name = \"linux_amd64\"\nsteps = [{ name = \"t\", run = \"x\" }]"),
                "builder[0] \"linux_amd64\": name".into(),
            ),
            (
                b("name = \"linux-amd64\"\nmemory = \"lots\"\nsteps = [{ name = \"t\", run = \"x\" }]"),
                "memory \"lots\"".into(),
            ),
            (
                b("name = \"linux-amd64\"\ntimeout = \"0s\"\nsteps = [{ name = \"t\", run = \"x\" }]"),
                "timeout: must be".into(),
            ),
            (
                b("name = \"linux-amd64\"\ncommand = \"x\"\nsteps = [{ name = \"t\", run = \"x\" }]"),
                "unknown field `command`".into(),
            ),
            (
                b("name = \"linux-amd64\"\nsteps = [{ name = \"t\", run = \"x\" }, { name = \"t\", run = \"y\" }]"),
                "steps[1]: a step named \"t\" is already defined".into(),
            ),
            (
                b(&format!(
                    "name = \"linux-amd64\"\nsteps = [{}]",
                    (0..=MAX_STEPS)
                        .map(|i| format!("{{ name = \"s{i}\", run = \"x\" }}"))
                        .collect::<Vec<_>>()
                        .join(",")
                )),
                "builder[0] \"linux-amd64\": steps: 1001 steps, more than the 1000 a builder may have".into(),
            ),
            (
                "[triggers]\ncommits = \"some\"\n".to_string()
                    + &b("name = \"linux-amd64\"\nsteps = [{ name = \"t\", run = \"x\" }]"),
                "unknown variant `some`".into(),
            ),
            (
                format!(
                    "{}{}",
                    b("name = \"linux-amd64\"\nsteps = [{ name = \"t\", run = \"x\" }]"),
                    b("name = \"linux-amd64\"\nsteps = [{ name = \"t\", run = \"x\" }]")
                ),
                "builder[1] \"linux-amd64\": a builder named linux-amd64 is already defined".into(),
            ),
            (
                b("name = \"linux-amd64\"\nknown_issue = \"#12\"\nsteps = [{ name = \"t\", run = \"x\" }]"),
                "builder[0] \"linux-amd64\": known_issue \"#12\": give the issue's http(s) address".into(),
            ),
            (
                b(
                    "name = \"linux-amd64\"\nimage = \"dir:/usr\"\nsteps = [{ name = \"t\", run = \"cat /etc/shadow\" }]",
                ),
                "builder[0] \"linux-amd64\": image = \"dir:/usr\": a repository may not name a host directory; \
                 import it on the node as an image (`flotilla image import NAME:TAG /usr`)"
                    .into(),
            ),
            (
                b("name = \"linux-amd64\"\nsecrets = [\"pypi-token\"]\nsteps = [{ name = \"t\", run = \"x\" }]"),
                "builder[0] \"linux-amd64\": secrets[0]: secret name \"pypi-token\": use 1 to 128 uppercase".into(),
            ),
            (
                b(
                    "name = \"linux-amd64\"\nsecrets = [\"T\"]\nenv = { T = \"x\" }\nsteps = [{ name = \"t\", run = \"x\" }]",
                ),
                "secrets[0]: T is also set in env".into(),
            ),
            (
                b("name = \"linux-amd64\"\ntimeout = \"1000000000000000d\"\nsteps = [{ name = \"t\", run = \"x\" }]"),
                "timeout \"1000000000000000d\": duration \"1000000000000000d\" is too long".into(),
            ),
            (
                b("name = \"linux-amd64\"\ntimeout = \"8d\"\nsteps = [{ name = \"t\", run = \"x\" }]"),
                "timeout \"8d\": at most 7d".into(),
            ),
            ("[triggers]\nbranch = [\"main\"]\n".into(), "unknown field `branch`".into()),
            ("[[builder]\n".into(), "TOML parse error".into()),
        ] {
            let e = parse(&text).unwrap_err().0;
            assert!(e.contains(&says), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_hash_names_the_text() {
        assert_eq!(config_hash("a"), config_hash("a"));
        assert_ne!(config_hash("a"), config_hash("b"));
        assert_eq!(config_hash("a").len(), 64);
    }
}
