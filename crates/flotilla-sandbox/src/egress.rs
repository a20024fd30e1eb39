//! The egress policy of `outbound` sandboxes.
//!
//! An outbound sandbox (process or microVM) reaches the network only
//! through a user-mode helper on the host (slirp4netns, pasta, passt): its
//! packets become the helper's own sockets. So the policy is the host's
//! netfilter deciding about those sockets. Every helper of a node runs with
//! the node's *egress group* ([`EgressPolicy::gid`], a gid no host user
//! has), and one rule at the top of the host's `OUTPUT` chain sends every
//! socket of that group through the node's chain:
//!
//! 1. operator-allowed ranges (`--egress-allow CIDR`) return at once;
//! 2. DNS (port 53) to the host's own resolvers (from `/etc/resolv.conf`,
//!    which are often private or loopback addresses) returns;
//! 3. anything to an address the host holds (`addrtype LOCAL`: loopback,
//!    every interface, bridges) is refused, and so is every private,
//!    shared, link-local (the cloud metadata service), multicast and
//!    reserved range, IPv4 and IPv6 ([`DENIED_V4`], [`DENIED_V6`]);
//! 4. the rest (the internet) returns to the host's own rules.
//!
//! TCP is refused with a reset, the rest with ICMP unreachable, so a
//! refused connect fails at once instead of timing out.
//!
//! The sandbox cannot touch any of this: the rules live in the host's
//! network namespace, where the sandbox has no privilege (and inside its
//! own it has no `CAP_NET_ADMIN`). The chain is installed in one
//! `iptables-restore` transaction per family when the node starts, and it
//! stays when the node stops: helpers of sandboxes that outlive a node
//! stay filtered.
//!
//! The jump names the node's data directory (`-m comment --comment
//! flotilla-home=PATH`), so a starting node sweeps away the chains of
//! nodes whose directory is gone ([`sweep_stale`]): a node killed with -9
//! whose home was then removed (a test's, a throwaway `--home`) leaves
//! nothing behind for long. A chain whose home still exists is kept: its
//! node may come back to the sandboxes it left running.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

/// IPv4 destinations an outbound sandbox never reaches (besides every
/// address the host holds).
pub const DENIED_V4: &[&str] = &[
    "0.0.0.0/8",      // "this network"
    "10.0.0.0/8",     // RFC 1918
    "100.64.0.0/10",  // CGNAT (RFC 6598)
    "127.0.0.0/8",    // loopback
    "169.254.0.0/16", // link-local: the cloud metadata service
    "172.16.0.0/12",  // RFC 1918
    "192.0.0.0/24",   // IETF protocol assignments
    "192.168.0.0/16", // RFC 1918
    "224.0.0.0/4",    // multicast
    "240.0.0.0/4",    // reserved, broadcast
];

/// IPv6 destinations an outbound sandbox never reaches.
pub const DENIED_V6: &[&str] = &[
    "::/127",         // unspecified, loopback
    "::ffff:0:0/96",  // IPv4-mapped
    "64:ff9b::/96",   // NAT64: would reach private IPv4 through a gateway
    "64:ff9b:1::/48", // local-use NAT64
    "fc00::/7",       // unique local (ULA)
    "fe80::/10",      // link-local
    "fec0::/10",      // site-local (deprecated, still routed by some)
    "ff00::/8",       // multicast
];

/// Where egress groups start: just below the sandboxes' uid ranges, far
/// above the ids `/etc/subuid` and distributions hand out.
pub const EGRESS_GID_BASE: u32 = crate::process::UID_BASE - (1 << 16);

/// A range an operator allows, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not a CIDR range (like 10.1.2.0/24 or fd00:1::/64)");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One node's egress policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    /// The group every network helper of this node runs with.
    pub gid: u32,
    /// Ranges the operator allows on top of the public internet.
    pub allow: Vec<Cidr>,
    /// The host's resolvers: DNS to them is allowed.
    pub nameservers: Vec<IpAddr>,
    /// The node's data directory, named on the jump for [`sweep_stale`].
    pub home: Option<std::path::PathBuf>,
}

/// Why the policy could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("the egress policy needs {0} (apt-get install -y iptables)")]
    Missing(&'static str),
    #[error("the egress policy needs the node to run as root (it writes the host's netfilter rules)")]
    NotRoot,
    #[error("installing the egress policy with {tool}: {detail}")]
    Install { tool: &'static str, detail: String },
}

impl EgressPolicy {
    /// The policy of the node whose data directory is `home`: its group
    /// comes from the directory ([`crate::home_hash`]), so nodes sharing a
    /// host keep apart.
    pub fn for_home(home: &Path, allow: Vec<Cidr>) -> EgressPolicy {
        let h = crate::home_hash(home);
        let nameservers = std::fs::read_to_string("/etc/resolv.conf").map(|s| nameservers(&s)).unwrap_or_default();
        EgressPolicy {
            gid: EGRESS_GID_BASE + (h % (1 << 16)) as u32,
            allow,
            nameservers,
            home: Some(home.to_path_buf()),
        }
    }

    /// The node's chain in the host's filter table.
    pub fn chain(&self) -> String {
        format!("flotilla-egress-{:04x}", self.gid - EGRESS_GID_BASE)
    }

    /// The `iptables-restore` input for one family: the node's chain,
    /// emptied and filled in one transaction.
    pub fn restore_input(&self, v6: bool) -> String {
        let chain = self.chain();
        let mut s = format!("*filter\n:{chain} - [0:0]\n-F {chain}\n");
        let family = |a: &IpAddr| a.is_ipv6() == v6;
        for c in self.allow.iter().filter(|c| family(&c.addr)) {
            let _ = writeln!(s, "-A {chain} -d {c} -j RETURN");
        }
        for ns in self.nameservers.iter().filter(|a| family(a)) {
            for proto in ["udp", "tcp"] {
                let _ = writeln!(s, "-A {chain} -d {ns} -p {proto} --dport 53 -j RETURN");
            }
        }
        let refuse = |s: &mut String, what: &str| {
            let _ = writeln!(s, "-A {chain} -p tcp {what} -j REJECT --reject-with tcp-reset");
            let _ = writeln!(s, "-A {chain} {what} -j REJECT");
        };
        refuse(&mut s, "-m addrtype --dst-type LOCAL");
        for range in if v6 { DENIED_V6 } else { DENIED_V4 } {
            refuse(&mut s, &format!("-d {range}"));
        }
        s.push_str("COMMIT\n");
        s
    }

    /// The jump that sends this node's helpers' sockets through its chain,
    /// naming the node's home when it can be named in a comment.
    fn jump(&self) -> Vec<String> {
        let gid = self.gid.to_string();
        let mut j: Vec<String> = ["OUTPUT", "-m", "owner", "--gid-owner", &gid].map(str::to_string).to_vec();
        if let Some(home) = self.home.as_deref().and_then(Path::to_str).filter(|h| nameable(h)) {
            j.extend(["-m", "comment", "--comment", &format!("{HOME_TAG}{home}")].map(str::to_string));
        }
        j.extend(["-j".to_string(), self.chain()]);
        j
    }

    /// Puts the policy in place (again): the chain for IPv4 and IPv6, and
    /// the jump to it at the top of `OUTPUT` unless it is there.
    pub fn install(&self) -> Result<(), EgressError> {
        if crate::sys::euid() != 0 {
            return Err(EgressError::NotRoot);
        }
        for (v6, restore, tables) in [(false, "iptables-restore", "iptables"), (true, "ip6tables-restore", "ip6tables")]
        {
            let input = self.restore_input(v6);
            run(restore, &["-w", "5", "--noflush"], Some(&input))?;
            let jump = self.jump();
            let mut check = vec!["-w".to_string(), "5".into(), "-C".into()];
            check.extend(jump.iter().cloned());
            if run(tables, &check.iter().map(String::as_str).collect::<Vec<_>>(), None).is_err() {
                let mut insert = vec!["-w".to_string(), "5".into(), "-I".into(), jump[0].clone(), "1".into()];
                insert.extend(jump[1..].iter().cloned());
                run(tables, &insert.iter().map(String::as_str).collect::<Vec<_>>(), None)?;
            }
        }
        Ok(())
    }

    /// Takes the policy away (tests, and a node whose home is removed).
    pub fn remove(&self) {
        for tables in ["iptables", "ip6tables"] {
            let chain = self.chain();
            let mut del = vec!["-w".to_string(), "5".into(), "-D".into()];
            del.extend(self.jump());
            while run(tables, &del.iter().map(String::as_str).collect::<Vec<_>>(), None).is_ok() {}
            let _ = run(tables, &["-w", "5", "-F", &chain], None);
            let _ = run(tables, &["-w", "5", "-X", &chain], None);
        }
    }
}

/// What starts the comment of a node's jump.
const HOME_TAG: &str = "flotilla-home=";

/// A home that fits a netfilter comment and reads back unchanged.
fn nameable(home: &str) -> bool {
    home.starts_with('/') && home.len() + HOME_TAG.len() <= 255 && !home.contains(['"', '\\', '\n'])
}

/// A node's jump as `iptables -S OUTPUT` prints it: its gid, home and chain.
#[derive(Debug, PartialEq, Eq)]
struct Jump {
    gid: String,
    home: String,
    chain: String,
}

fn parse_jump(line: &str) -> Option<Jump> {
    let rest = line.strip_prefix("-A OUTPUT ")?;
    let gid = rest.split("--gid-owner ").nth(1)?.split_whitespace().next()?.to_string();
    let comment = rest.split("--comment ").nth(1)?;
    let (home, after) = match comment.strip_prefix('"') {
        Some(quoted) => quoted.split_once('"')?,
        None => comment.split_once(' ')?,
    };
    let home = home.strip_prefix(HOME_TAG)?.to_string();
    let chain = after.split("-j ").nth(1)?.split_whitespace().next()?.to_string();
    chain.starts_with("flotilla-egress-").then_some(Jump { gid, home, chain })
}

/// Removes the jumps and chains of nodes whose home no longer exists (both
/// families); returns the chains removed. Best effort: without iptables,
/// or not root, nothing happens.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for tables in ["iptables", "ip6tables"] {
        let Ok(out) = Command::new(tables).args(["-w", "5", "-S", "OUTPUT"]).stderr(Stdio::null()).output() else {
            continue;
        };
        for jump in String::from_utf8_lossy(&out.stdout).lines().filter_map(parse_jump) {
            if Path::new(&jump.home).exists() {
                continue;
            }
            let comment = format!("{HOME_TAG}{}", jump.home);
            let del = ["-w", "5", "-D", "OUTPUT", "-m", "owner", "--gid-owner", &jump.gid, "-m", "comment"];
            let del: Vec<&str> = del.into_iter().chain(["--comment", &comment, "-j", &jump.chain]).collect();
            if run(tables, &del, None).is_ok() {
                let _ = run(tables, &["-w", "5", "-F", &jump.chain], None);
                let _ = run(tables, &["-w", "5", "-X", &jump.chain], None);
                removed.push(format!("{tables} {}", jump.chain));
            }
        }
    }
    removed
}

/// The resolvers a `resolv.conf` names.
pub fn nameservers(resolv: &str) -> Vec<IpAddr> {
    resolv
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().split('%').next()?.parse().ok())
        .collect()
}

fn run(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<(), EgressError> {
    let mut cmd = Command::new(tool);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => EgressError::Missing(tool),
        _ => EgressError::Install { tool, detail: e.to_string() },
    })?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(input.as_bytes()).map_err(|e| EgressError::Install { tool, detail: e.to_string() })?;
    }
    let out = child.wait_with_output().map_err(|e| EgressError::Install { tool, detail: e.to_string() })?;
    if out.status.success() {
        Ok(())
    } else {
        let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(EgressError::Install { tool, detail: format!("{} ({})", detail, out.status) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_refuse_nonsense() {
        assert_eq!("10.1.0.0/16".parse::<Cidr>().unwrap().to_string(), "10.1.0.0/16");
        assert_eq!("fd00::1".parse::<Cidr>().unwrap().to_string(), "fd00::1/128");
        for bad in ["10.1.0.0/33", "fd00::/129", "example.org", "10.1/8", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_chain_allows_first_then_refuses_the_host_and_private_ranges() {
        let p = EgressPolicy {
            gid: EGRESS_GID_BASE + 0x1234,
            allow: vec!["10.9.0.0/16".parse().unwrap(), "fd09::/64".parse().unwrap()],
            nameservers: nameservers("# x\nnameserver 10.255.255.53\nnameserver fe80::1%eth0\n"),
            home: Some("/var/lib/flotilla node".into()),
        };
        assert_eq!(
            p.jump().join(" "),
            format!(
                "OUTPUT -m owner --gid-owner {} -m comment --comment flotilla-home=/var/lib/flotilla node -j \
                 flotilla-egress-1234",
                p.gid
            )
        );
        assert_eq!(p.chain(), "flotilla-egress-1234");
        let v4 = p.restore_input(false);
        let lines: Vec<&str> = v4.lines().collect();
        assert_eq!(lines[..3], ["*filter", ":flotilla-egress-1234 - [0:0]", "-F flotilla-egress-1234"]);
        assert_eq!(lines[3], "-A flotilla-egress-1234 -d 10.9.0.0/16 -j RETURN");
        assert_eq!(lines[4], "-A flotilla-egress-1234 -d 10.255.255.53 -p udp --dport 53 -j RETURN");
        assert!(lines[6].contains("addrtype --dst-type LOCAL"));
        for range in DENIED_V4 {
            assert!(v4.contains(&format!("-d {range} -j REJECT\n")), "{range}");
        }
        assert!(!v4.contains("fd09"), "IPv6 ranges stay out of the IPv4 table");
        let v6 = p.restore_input(true);
        assert!(v6.contains("-d fd09::/64 -j RETURN") && v6.contains("-d fe80::1 -p udp --dport 53"));
        assert!(v6.contains("-d fc00::/7 -j REJECT") && v6.ends_with("COMMIT\n"));
    }
}

#[cfg(test)]
mod sweep_tests {
    use super::*;

    #[test]
    fn jumps_read_back_as_iptables_prints_them() {
        let quoted = "-A OUTPUT -m owner --gid-owner 1073741901 -m comment --comment \"flotilla-home=/tmp/a b\" -j \
                      flotilla-egress-004d";
        assert_eq!(
            parse_jump(quoted),
            Some(Jump { gid: "1073741901".into(), home: "/tmp/a b".into(), chain: "flotilla-egress-004d".into() })
        );
        let bare = "-A OUTPUT -m owner --gid-owner 7 -m comment --comment flotilla-home=/tmp/x -j flotilla-egress-0007";
        assert_eq!(parse_jump(bare).map(|j| j.home), Some("/tmp/x".into()));
        // Another's rules, and jumps of older nodes without a home, are left alone.
        for other in [
            "-A OUTPUT -m comment --comment flotilla-home=/tmp/x -j ACCEPT",
            "-A OUTPUT -m owner --gid-owner 7 -j flotilla-egress-0007",
            "-A OUTPUT -m owner --gid-owner 7 -m comment --comment docker -j flotilla-egress-0007",
            "-P OUTPUT ACCEPT",
        ] {
            assert_eq!(parse_jump(other), None, "{other}");
        }
        assert!(nameable("/tmp/x") && !nameable("relative") && !nameable("/a\"b"));
    }

    /// A node's rules outlive it while its home exists, and are swept once
    /// the home is gone (the real iptables; root, as CI runs).
    #[test]
    fn a_gone_homes_chain_is_swept_and_a_present_ones_kept() {
        if crate::sys::euid() != 0 || Command::new("iptables").arg("-V").output().is_err() {
            panic!("this test needs root and iptables (as .ci/run has)");
        }
        let kept = tempfile::tempdir().unwrap();
        let gone = tempfile::tempdir().unwrap();
        let (pk, pg) = (EgressPolicy::for_home(kept.path(), vec![]), EgressPolicy::for_home(gone.path(), vec![]));
        pk.install().unwrap();
        pg.install().unwrap();
        let chains = || {
            let out = Command::new("iptables").args(["-w", "5", "-S"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        drop(gone);
        let removed = sweep_stale();
        let now = chains();
        assert!(removed.contains(&format!("iptables {}", pg.chain())), "{removed:?}");
        assert!(!now.contains(&pg.chain()), "{now}");
        assert!(now.contains(&format!("-N {}", pk.chain())), "{now}");
        pk.remove();
        assert!(!chains().contains(&pk.chain()));
    }
}
