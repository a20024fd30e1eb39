//! Networks for microVMs, host side and guest side.
//!
//! - `outbound`: the guest's NIC is one end of a socketpair whose other end
//!   belongs to `passt` (user-mode NAT without a TAP, running as `nobody`
//!   in its own sandbox). `--no-map-gw` keeps the host's loopback out of
//!   reach, as `pasta --no-map-gw` does for process sandboxes, and the
//!   node's egress policy (`flotilla_sandbox::egress`) holds its sockets
//!   away from the host, the LAN and the metadata service. passt ends by
//!   itself when QEMU's end closes, so it can outlive neither the VM nor a
//!   launch that failed: nothing to reap, even after the node is killed.
//! - `tap`: one TAP device per sandbox on the node's bridge [`BRIDGE`]
//!   (`10.213.0.1/24`). The node opens the TAP (not persistent), attaches it
//!   to the bridge and hands the fd to QEMU; the device vanishes when QEMU
//!   exits. Each sandbox leases an address, written to `net.json` in its
//!   directory under the backend's network lock: a lease ends when the
//!   directory goes (delete, or the janitor after a crash), and a
//!   stop/start keeps it.
//!
//! The guest side configures the NIC with plain ioctls (no DHCP client in
//! the guest, no netlink crate): address, netmask, up, default route.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The node's bridge for `tap` sandboxes.
pub const BRIDGE: &str = "flotilla0";
/// The bridge's address (the host) and its /24.
pub const BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
/// The guest's address plan under passt (the one QEMU's user-mode NAT made
/// familiar): guest .15, gateway .2, DNS forwarded from .3.
pub const OUTBOUND_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const OUTBOUND_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const OUTBOUND_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

/// How the guest configures its NIC; part of the guest's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNet {
    pub address: Ipv4Addr,
    pub prefix: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Written to the guest's `/etc/resolv.conf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Ipv4Addr>,
}

/// The host side of a VM's NIC, made anew for each launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostNet {
    /// passt on a socketpair, running with the node's egress group (see
    /// `flotilla_sandbox::egress`) when it has one.
    Passt { egress_gid: Option<u32> },
    /// A TAP device named `tap` on [`BRIDGE`].
    Tap { tap: String, mac: String },
}

impl HostNet {
    /// Opens the host side and returns the fd QEMU gets (`-netdev ...,fd=`).
    /// `log` receives passt's start-up errors.
    pub async fn open(&self, log: &Path) -> io::Result<OwnedFd> {
        match self {
            HostNet::Passt { egress_gid } => start_passt(log, *egress_gid).await,
            HostNet::Tap { tap, .. } => {
                let tap = tap.clone();
                tokio::task::spawn_blocking(move || open_tap(&tap))
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?
            }
        }
    }

    /// The guest MAC QEMU sets, where it matters (many NICs on one bridge).
    pub fn mac(&self) -> Option<&str> {
        match self {
            HostNet::Passt { .. } => None,
            HostNet::Tap { mac, .. } => Some(mac),
        }
    }
}

/// The `passt` binary on PATH.
pub fn passt() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("passt")).find(|p| p.is_file())
}

/// Why `tap` cannot work here, if it cannot.
pub fn tap_unavailable() -> Option<String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("`tap` needs the node to run as root (it creates a bridge and TAP devices)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("`tap` needs /dev/net/tun (the tun module)".into());
    }
    None
}

/// The guest's config for `outbound`.
pub fn outbound_guest() -> GuestNet {
    GuestNet { address: OUTBOUND_ADDR, prefix: 24, gateway: Some(OUTBOUND_GATEWAY), dns: Some(OUTBOUND_DNS) }
}

async fn start_passt(log: &Path, egress_gid: Option<u32>) -> io::Result<OwnedFd> {
    let passt = passt()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "`outbound` needs passt: apt-get install -y passt"))?;
    let (qemu_end, passt_end) = std::os::unix::net::UnixStream::pair()?;
    let mut cmd = std::process::Command::new(passt);
    cmd.args(["--quiet", "--foreground"]).args(["--fd", "3"]);
    let ip = |a: Ipv4Addr| a.to_string();
    cmd.args(["--address", &ip(OUTBOUND_ADDR), "--netmask", "24", "--gateway", &ip(OUTBOUND_GATEWAY)]);
    cmd.args(["--no-map-gw", "--dns-forward", &ip(OUTBOUND_DNS)]);
    // No IPv6 plan in the guest: keep passt to IPv4.
    cmd.arg("--ipv4-only");
    // As `nobody`, in the node's egress group: the host's netfilter holds
    // its sockets to the egress policy.
    if let Some(gid) = egress_gid {
        cmd.args(["--runas", &format!("65534:{gid}")]);
    }
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
    cmd.stderr(std::fs::File::create(log)?);
    flotilla_sandbox::sys::command_pass_fd(&mut cmd, passt_end.as_raw_fd(), 3);
    // Its own session: passt must outlive a node that is killed, as the VM
    // does. It exits when QEMU's end of the socket closes.
    flotilla_sandbox::sys::command_new_session(&mut cmd, false);
    let mut child = tokio::process::Command::from(cmd).spawn()?;
    drop(passt_end);
    // Reap it whenever it ends; it is no child of ours to wait on now.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(qemu_end.into())
}

// ---------------------------------------------------------------- tap

/// Leases the address of sandbox `id`: the one in its `net.json`, or the
/// lowest that no other VM directory under `vms` holds. The caller holds
/// the backend's network lock.
pub fn lease(vms: &Path, id: &str) -> io::Result<(GuestNet, HostNet)> {
    let mine = vms.join(id).join("net.json");
    let host = |n: u8| (format!("fltap{n}"), format!("52:54:00:d5:00:{n:02x}"));
    if let Ok(raw) = std::fs::read(&mine)
        && let Ok(net) = serde_json::from_slice::<GuestNet>(&raw)
    {
        let (tap, mac) = host(net.address.octets()[3]);
        return Ok((net, HostNet::Tap { tap, mac }));
    }
    let mut taken = [false; 256];
    taken[0] = true;
    taken[1] = true;
    taken[255] = true;
    for e in std::fs::read_dir(vms).into_iter().flatten().flatten() {
        if let Ok(raw) = std::fs::read(e.path().join("net.json"))
            && let Ok(net) = serde_json::from_slice::<GuestNet>(&raw)
        {
            taken[net.address.octets()[3] as usize] = true;
        }
    }
    let n = (2..255u8).find(|&n| !taken[n as usize]).ok_or_else(|| {
        io::Error::new(io::ErrorKind::AddrNotAvailable, format!("all 253 addresses on {BRIDGE} are leased"))
    })?;
    let [a, b, c, _] = BRIDGE_ADDR.octets();
    let net = GuestNet { address: Ipv4Addr::new(a, b, c, n), prefix: 24, gateway: Some(BRIDGE_ADDR), dns: None };
    std::fs::create_dir_all(vms.join(id))?;
    let tmp = mine.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&net).map_err(io::Error::other)?)?;
    std::fs::rename(&tmp, &mine)?;
    let (tap, mac) = host(n);
    Ok((net, HostNet::Tap { tap, mac }))
}

const SIOCBRADDBR: libc::c_ulong = 0x89a0;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn ioctl(fd: &OwnedFd, req: libc::c_ulong, arg: *mut libc::c_void, what: &str) -> io::Result<()> {
    // SAFETY: each caller passes the argument type `req` expects.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn sockaddr(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the
    // ioctls take an IPv4 address.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) })
}

/// Sets `name`'s IPv4 address and brings it up.
fn set_addr_up(s: &OwnedFd, name: &str, addr: Option<(Ipv4Addr, u8)>) -> io::Result<()> {
    if let Some((a, prefix)) = addr {
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_addr = sockaddr(a);
        ioctl(s, libc::SIOCSIFADDR, (&raw mut r).cast(), &format!("setting {name}'s address"))?;
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_netmask = sockaddr(netmask(prefix));
        ioctl(s, libc::SIOCSIFNETMASK, (&raw mut r).cast(), &format!("setting {name}'s netmask"))?;
    }
    let mut r = ifreq(name)?;
    ioctl(s, libc::SIOCGIFFLAGS, (&raw mut r).cast(), &format!("reading {name}'s flags"))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(s, libc::SIOCSIFFLAGS, (&raw mut r).cast(), &format!("bringing {name} up"))
}

/// Makes the bridge if it is missing and gives it its address.
fn ensure_bridge(s: &OwnedFd) -> io::Result<()> {
    let name = CString::new(BRIDGE).expect("no NUL");
    match ioctl(s, SIOCBRADDBR, name.as_ptr() as *mut libc::c_void, &format!("creating bridge {BRIDGE}")) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    set_addr_up(s, BRIDGE, Some((BRIDGE_ADDR, 24)))
}

/// Opens TAP `name` (not persistent: it goes when the last fd closes),
/// attaches it to the bridge and brings it up.
fn open_tap(name: &str) -> io::Result<OwnedFd> {
    let s = inet_socket()?;
    ensure_bridge(&s)?;
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/net/tun: {e}")))?;
    let tun = OwnedFd::from(tun);
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    ioctl(&tun, libc::TUNSETIFF as libc::c_ulong, (&raw mut r).cast(), &format!("creating TAP {name}"))?;
    let mut r = ifreq(name)?;
    ioctl(&s, libc::SIOCGIFINDEX, (&raw mut r).cast(), &format!("finding TAP {name}"))?;
    // SAFETY: SIOCGIFINDEX filled the index member.
    let index = unsafe { r.ifr_ifru.ifru_ifindex };
    let mut r = ifreq(BRIDGE)?;
    r.ifr_ifru.ifru_ifindex = index;
    ioctl(&s, SIOCBRADDIF, (&raw mut r).cast(), &format!("attaching {name} to {BRIDGE}"))?;
    set_addr_up(&s, name, None)?;
    Ok(tun)
}

// ---------------------------------------------------------------- guest

/// Brings the loopback up: a guest's own services talk over it.
pub fn loopback_up() -> io::Result<()> {
    set_addr_up(&inet_socket()?, "lo", Some((Ipv4Addr::LOCALHOST, 8)))
}

/// The guest's first NIC (`eth0` on microvm), waiting for the driver.
fn guest_nic(within: std::time::Duration) -> io::Result<String> {
    let start = std::time::Instant::now();
    loop {
        let nic = std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n != "lo")
            .min();
        if let Some(n) = nic {
            return Ok(n);
        }
        if start.elapsed() > within {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no network interface appeared"));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Configures the guest's NIC as `net` says.
pub fn configure_guest(net: &GuestNet) -> io::Result<()> {
    let nic = guest_nic(std::time::Duration::from_secs(5))?;
    let s = inet_socket()?;
    set_addr_up(&s, &nic, Some((net.address, net.prefix)))?;
    if let Some(gw) = net.gateway {
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr(gw),
            rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        ioctl(&s, libc::SIOCADDRT, (&raw mut rt).cast(), &format!("adding the default route via {gw}"))?;
    }
    Ok(())
}

/// Points the guest's resolver at `net.dns` (the root disk is the
/// sandbox's own copy-on-write overlay; a symlink there is replaced).
pub fn write_resolv_conf(net: &GuestNet) -> io::Result<()> {
    let Some(dns) = net.dns else { return Ok(()) };
    let path = Path::new("/etc/resolv.conf");
    if path.symlink_metadata().is_ok_and(|m| !m.is_file()) {
        std::fs::remove_file(path)?;
    }
    std::fs::create_dir_all("/etc")?;
    std::fs::write(path, format!("nameserver {dns}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(8), Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn leases_are_unique_and_sticky_and_end_with_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let (a, ha) = lease(d.path(), "a").unwrap();
        let (b, _) = lease(d.path(), "b").unwrap();
        assert_eq!(a.address, Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(b.address, Ipv4Addr::new(10, 213, 0, 3));
        assert_eq!(ha, HostNet::Tap { tap: "fltap2".into(), mac: "52:54:00:d5:00:02".into() });
        // A restart keeps its address.
        assert_eq!(lease(d.path(), "a").unwrap().0, a);
        // Deleting the sandbox's directory ends the lease.
        std::fs::remove_dir_all(d.path().join("a")).unwrap();
        assert_eq!(lease(d.path(), "c").unwrap().0.address, a.address);
    }
}
