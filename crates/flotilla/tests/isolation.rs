//! A sandbox sees its image, its workspace and nothing else of the host:
//! not host files outside the image, not other sandboxes, not the node's
//! socket or data, not host processes, not the host's loopback.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;

use flotilla_api::{CreateSandboxRequest, NetworkMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_cannot_see_the_host_or_each_other() {
    let env = common::env();
    let a = env.sandbox().await;
    let b = env.sandbox().await;
    env.ok(&b.id, "echo b-secret > /workspace/secret").await;

    // A host file outside the image (host /tmp is not part of it).
    let host_secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(host_secret.path(), "host-secret").unwrap();
    let home = env.node.home().display().to_string();
    let sock = env.node.socket().display().to_string();
    let probe = format!(
        "set -u
         test ! -e {secret} || echo LEAK host tmp file
         test ! -e {home} || echo LEAK node home
         test ! -e {sock} || echo LEAK node socket
         test ! -e /workspace/secret || echo LEAK other sandbox workspace
         for d in /home /var /run /srv /mnt /media; do test ! -e $d || echo LEAK $d; done
         test -z \"$(ls -A /root)\" || echo LEAK /root not empty
         test ! -e /etc/shadow || echo LEAK shadow
         test ! -e /etc/ssh || echo LEAK ssh
         test ! -e /etc/ssl/private || echo LEAK ssl private
         n=$(ls /proc | grep -c '^[0-9]')
         test $n -le 6 || echo LEAK $n processes visible
         grep -q flotilla-agent /proc/1/cmdline || echo LEAK pid 1 is not our agent
         echo done",
        secret = host_secret.path().display(),
    );
    let out = env.ok(&a.id, &probe).await;
    assert_eq!(out.trim(), "done", "isolation leaks:\n{out}");

    // Privileges: root keeps only the sandbox's capability set (scoped to
    // its user namespace), a user it switches to keeps none; no_new_privs,
    // seccomp on; root inside is an unprivileged uid outside.
    let status = env.ok(&a.id, "grep -E '^(CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status").await;
    let caps = format!("{:016x}", flotilla_sandbox::sys::sandbox_cap_mask());
    for field in ["CapEff", "CapBnd", "CapAmb"] {
        assert!(status.contains(&format!("{field}:\t{caps}")), "{field} is not {caps}: {status}");
    }
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let drop_to_user = r#"perl -e '$( = $) = "1000 1000"; $< = $> = 1000; exec "grep", "-E", "^Cap(Eff|Prm|Amb):", "/proc/self/status"'"#;
    let user = env.ok(&a.id, drop_to_user).await;
    assert_eq!(user.matches("0000000000000000").count(), 3, "a non-root user kept capabilities: {user}");
    // Host files stay out of reach: their owners are not mapped, so the
    // capabilities do not apply to them.
    let (_, _, st) = env.sh(&a.id, "cat /proc/1/root/../../etc/shadow || chown 0 /dev/null").await;
    assert!(!st.success());
    let denied = env.sh(&a.id, "unshare -U true; echo rc=$?; mount -t tmpfs x /tmp; echo rc=$?").await.0;
    assert_eq!(denied.matches("rc=1").count() + denied.matches("rc=32").count(), 2, "{denied}");
    env.ok(&a.id, "touch /workspace/mine").await;
    let host_path = env.node.home().join("sandboxes").join(&a.id).join("workspace/mine");
    let uid = std::fs::metadata(&host_path).unwrap().uid();
    assert!(uid >= 1 << 30, "sandbox root is host uid {uid}, expected an unprivileged range");
    // The image is read-only.
    let (_, _, st) = env.sh(&a.id, "touch /usr/pwned").await;
    assert!(!st.success());
}

on_both_backends!(
    the_hosts_loopback_is_out_of_reach,
    outbound_reaches_the_internet_but_not_the_host_the_lan_or_metadata
);

/// `bash -c script`, with a deadline (a connect that hangs must not).
fn bash(script: String) -> flotilla_api::ExecRequest {
    flotilla_api::ExecRequest {
        argv: vec!["bash".into(), "-c".into(), script],
        timeout_ms: Some(10_000),
        ..Default::default()
    }
}

async fn the_hosts_loopback_is_out_of_reach(kind: common::Kind) {
    let env = common::env_for(kind);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = env.sandbox().await;
    // `sh` is dash here, without /dev/tcp: bash, which both images have.
    let (out, err, st) = env.exec(&s.id, bash(format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo CONNECTED"))).await;
    assert!(!st.success(), "connected to the host's loopback: {out} {err}");
    assert!(listener.accept().is_err(), "the host listener saw a connection");
    let nics = env.ok(&s.id, "cat /proc/net/dev | grep -c ':'").await;
    assert_eq!(nics.trim(), "1", "only loopback exists");
    // ... and the sandbox's own loopback is up: a closed port refuses
    // (a loopback that is down would be "unreachable").
    let (_, err, _) = env.exec(&s.id, bash("exec 3<>/dev/tcp/127.0.0.1/9".into())).await;
    assert!(err.contains("refused"), "the sandbox's loopback is not up: {err}");
}

/// The egress policy: an outbound sandbox reaches the internet (a public
/// package registry, and an address outside every denied range) and a
/// range the operator allowed, but nothing the host holds, no private,
/// shared or link-local range, and it cannot change that from inside.
async fn outbound_reaches_the_internet_but_not_the_host_the_lan_or_metadata(kind: common::Kind) {
    use flotilla_testkit::testhosts::{PORT, TestHosts};
    let hosts = TestHosts::new(&[
        "198.51.100.{i}", // "the internet": outside every denied range
        "10.202.{i}.1",   // RFC 1918, but allowed by the operator (below)
        "10.201.{i}.1",   // RFC 1918
        "172.29.{i}.1",   // RFC 1918
        "192.168.250.{i}",
        "100.80.{i}.1",  // CGNAT
        "169.254.{i}.1", // link-local: where the metadata service lives (never .169.254)
    ]);
    let allow = format!("10.202.{}.0/24", hosts.index());
    let args = ["--egress-allow", &allow];
    let env = match kind {
        common::Kind::Process => common::env_with(&args),
        common::Kind::Vm => common::vm_env_with(common::VmKernel::Built, &args),
    };
    let s = env.create(CreateSandboxRequest { network: NetworkMode::Outbound, ..env.request().await }).await;
    let reach = |addr: &str, port: u16| format!("exec 3<>/dev/tcp/{addr}/{port} && head -1 <&3");
    for a in &hosts.addrs[..2] {
        let (out, err, st) = env.exec(&s.id, bash(reach(a, PORT))).await;
        assert!(st.success() && out.trim() == format!("HELLO {a}"), "{kind:?} did not reach allowed {a}: {out} {err}");
    }
    for a in &hosts.addrs[2..] {
        let (out, err, st) = env.exec(&s.id, bash(reach(a, PORT))).await;
        assert!(!st.success() && !out.contains("HELLO"), "{kind:?} reached denied {a}: {out} {err}");
    }
    // Every address of the host itself, loopback and the gateway's mapping
    // of it included.
    let host_ip = std::process::Command::new("hostname").arg("-I").output().unwrap();
    let host_ips: Vec<String> =
        String::from_utf8_lossy(&host_ip.stdout).split_whitespace().map(str::to_string).collect();
    let local = TcpListener::bind("0.0.0.0:0").unwrap();
    local.set_nonblocking(true).unwrap();
    let lport = local.local_addr().unwrap().port();
    for a in host_ips.iter().map(String::as_str).chain(["10.0.2.2", "127.0.0.1"]).filter(|a| !a.contains(':')) {
        let (out, _, st) = env.exec(&s.id, bash(format!("echo hi >/dev/tcp/{a}/{lport} && echo SENT"))).await;
        assert!(!st.success() && !out.contains("SENT"), "{kind:?} reached the host at {a}");
    }
    assert!(local.accept().is_err(), "a host listener saw a connection");
    // A public package registry answers, by name (DNS works under the policy).
    let registry = "exec 3<>/dev/tcp/deb.debian.org/80 && \
                    printf 'HEAD /debian/dists/bookworm/Release HTTP/1.0\\r\\nHost: deb.debian.org\\r\\n\\r\\n' >&3 && \
                    head -1 <&3";
    let (out, err, st) = env.exec(&s.id, bash(registry.into())).await;
    assert!(st.success() && out.starts_with("HTTP/1."), "{kind:?} could not reach deb.debian.org: {out} {err}");
    if kind == common::Kind::Vm {
        // The guest was told where DNS is (passt forwards it to the host's resolver).
        let resolv = env.ok(&s.id, "cat /etc/resolv.conf").await;
        assert_eq!(resolv.trim(), "nameserver 10.0.2.3");
        return;
    }
    // The sandbox cannot rewrite its own network (no CAP_NET_ADMIN), and
    // the rules are the host's anyway.
    let denied = &hosts.addrs[2];
    let change = format!("ip addr add {denied}/32 dev lo; echo rc=$?; ip route add 10.0.0.0/8 dev lo; echo rc=$?");
    let (out, _, _) = env.sh(&s.id, &change).await;
    assert_eq!(out.matches("rc=2").count(), 2, "the sandbox changed its network: {out}");
    let (_, _, st) = env.exec(&s.id, bash(reach(denied, PORT))).await;
    assert!(!st.success());
    // No raw sockets (CAP_NET_RAW is gone), but ICMP echo sockets, which
    // `ping` uses, are open to every group of the sandbox.
    let sockets = "import socket
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); print('raw')
except PermissionError: print('no raw')
socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP); print('echo')";
    let out = env.ok(&s.id, &format!("python3 -c \"{sockets}\"")).await;
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["no", "raw", "echo"], "{out}");
}
