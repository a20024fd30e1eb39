//! The seccomp policy every sandbox runs under.
//!
//! Default allow, with a deny list of what a build or an untrusted program
//! has no business doing and what has a history of kernel exploits: kernel
//! modules and kexec, BPF and perf, keyrings, mount and pivot_root, clocks,
//! reboot and swap, `open_by_handle_at` (the classic container escape),
//! io_uring, userfaultfd, and new user namespaces (nested namespaces are
//! the biggest kernel attack surface a sandbox could reach). These return
//! `EPERM`, which programs handle as "not allowed here".
//!
//! `clone3` is answered with `ENOSYS` by a second filter: its flags live in
//! memory that seccomp cannot inspect, so we make libc fall back to `clone`,
//! whose flags we can check. (The kernel applies the most restrictive
//! result of all installed filters, so they never conflict.)
//!
//! On x86-64 a third filter answers `ENOSYS` to every syscall number with
//! the x32 bit set: x32 calls carry the x86-64 audit arch and numbers of
//! their own, so a deny list by number would let `mount | 0x40000000`
//! through on a kernel built with `CONFIG_X86_X32_ABI`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// Syscalls refused outright.
const DENIED: &[i64] = &[
    libc::SYS_acct,
    libc::SYS_add_key,
    libc::SYS_bpf,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_settime,
    libc::SYS_adjtimex,
    libc::SYS_settimeofday,
    libc::SYS_delete_module,
    libc::SYS_finit_module,
    libc::SYS_init_module,
    libc::SYS_fanotify_init,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fsopen,
    libc::SYS_fspick,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_setup,
    libc::SYS_ioperm,
    libc::SYS_iopl,
    libc::SYS_kexec_file_load,
    libc::SYS_kexec_load,
    libc::SYS_keyctl,
    libc::SYS_lookup_dcookie,
    libc::SYS_mount,
    libc::SYS_mount_setattr,
    libc::SYS_move_mount,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_open_tree,
    libc::SYS_perf_event_open,
    libc::SYS_pivot_root,
    libc::SYS_quotactl,
    libc::SYS_reboot,
    libc::SYS_request_key,
    libc::SYS_setns,
    libc::SYS_swapoff,
    libc::SYS_swapon,
    libc::SYS_syslog,
    libc::SYS_umount2,
    libc::SYS_userfaultfd,
    libc::SYS_vhangup,
];

/// Why the filter could not be built (a bug, never a host condition).
#[derive(Debug, thiserror::Error)]
#[error("building the seccomp filter failed: {0}")]
pub struct SeccompError(String);

/// The compiled programs, in the order they must be installed.
pub fn sandbox_programs() -> Result<Vec<Vec<libc::sock_filter>>, SeccompError> {
    let arch = std::env::consts::ARCH.try_into().map_err(|e| SeccompError(format!("{e:?}")))?;
    let err = |e: seccompiler::BackendError| SeccompError(e.to_string());

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|&nr| (nr, vec![])).collect();
    // No new user namespaces, by either door.
    let newuser = libc::CLONE_NEWUSER as u64;
    let masked = |arg| SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(newuser), newuser);
    rules.insert(libc::SYS_unshare, vec![SeccompRule::new(vec![masked(0).map_err(err)?]).map_err(err)?]);
    rules.insert(libc::SYS_clone, vec![SeccompRule::new(vec![masked(0).map_err(err)?]).map_err(err)?]);
    let deny =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch).map_err(err)?;

    let clone3: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, vec![])].into_iter().collect();
    let enosys = SeccompFilter::new(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)
        .map_err(err)?;

    let a: BpfProgram = deny.try_into().map_err(|e: seccompiler::BackendError| err(e))?;
    let b: BpfProgram = enosys.try_into().map_err(|e: seccompiler::BackendError| err(e))?;
    let mut programs = vec![to_libc(a), to_libc(b)];
    if cfg!(target_arch = "x86_64") {
        programs.push(no_x32());
    }
    Ok(programs)
}

/// The x32 bit of an x86-64 syscall number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// `AUDIT_ARCH_X86_64`.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// `ENOSYS` for any x86-64 syscall number with [`X32_SYSCALL_BIT`] set,
/// allow for the rest (the other filters decide those).
fn no_x32() -> Vec<libc::sock_filter> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter { code: code as u16, jt, jf, k };
    let (ld, jeq, jge, ret) = (
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
        libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
        libc::BPF_RET | libc::BPF_K,
    );
    vec![
        // seccomp_data: nr at 0, arch at 4.
        op(ld, 0, 0, 4),
        op(jeq, 0, 3, AUDIT_ARCH_X86_64),
        op(ld, 0, 0, 0),
        op(jge, 0, 1, X32_SYSCALL_BIT),
        op(ret, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        op(ret, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

fn to_libc(p: BpfProgram) -> Vec<libc::sock_filter> {
    p.into_iter().map(|f| libc::sock_filter { code: f.code, jt: f.jt, jf: f.jf, k: f.k }).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn programs_compile() {
        let progs = super::sandbox_programs().unwrap();
        assert_eq!(progs.len(), if cfg!(target_arch = "x86_64") { 3 } else { 2 });
        assert!(progs.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }

    /// Runs a filter of loads, jumps and returns on (nr, arch), as the
    /// kernel would.
    fn run(prog: &[libc::sock_filter], nr: u32, arch: u32) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let f = prog[pc];
            let code = f.code as u32;
            match code & 0x07 {
                libc::BPF_LD => acc = if f.k == 0 { nr } else { arch },
                libc::BPF_JMP => {
                    let taken = match code & 0xf0 {
                        libc::BPF_JEQ => acc == f.k,
                        libc::BPF_JGE => acc >= f.k,
                        other => panic!("jump {other:#x}"),
                    };
                    pc += if taken { f.jt as usize } else { f.jf as usize };
                }
                libc::BPF_RET => return f.k,
                other => panic!("op {other:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn x32_calls_are_refused_and_the_rest_left_to_the_other_filters() {
        let p = super::no_x32();
        let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        let mount = libc::SYS_mount as u32;
        assert_eq!(run(&p, mount | super::X32_SYSCALL_BIT, super::AUDIT_ARCH_X86_64), enosys);
        assert_eq!(run(&p, super::X32_SYSCALL_BIT, super::AUDIT_ARCH_X86_64), enosys);
        assert_eq!(run(&p, mount, super::AUDIT_ARCH_X86_64), libc::SECCOMP_RET_ALLOW);
        assert_eq!(run(&p, mount | super::X32_SYSCALL_BIT, 0x4000_0003), libc::SECCOMP_RET_ALLOW, "other arches");
    }
}
