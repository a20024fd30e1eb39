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
//! result of all installed filters, so the two never conflict.)

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
    Ok(vec![to_libc(a), to_libc(b)])
}

fn to_libc(p: BpfProgram) -> Vec<libc::sock_filter> {
    p.into_iter().map(|f| libc::sock_filter { code: f.code, jt: f.jt, jf: f.jf, k: f.k }).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn programs_compile() {
        let progs = super::sandbox_programs().unwrap();
        assert_eq!(progs.len(), 2);
        assert!(progs.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }
}
