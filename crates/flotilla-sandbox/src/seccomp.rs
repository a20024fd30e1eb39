//! The seccomp policy every sandbox runs under.
//!
//! On x86-64 it is an **allow list**: [`decide`] gives every syscall number
//! of the x86-64 table we reviewed (through [`LAST_REVIEWED`], Linux 6.16's
//! `removexattrat`) its answer, and [`allow_list`] compiles those answers
//! into one BPF program that finds a number's answer by binary search over
//! runs of equal answers (about 8 comparisons, where a linear list of ~330
//! rules would take hundreds per syscall). What is allowed: everything a
//! program of an ordinary Linux image uses, as in Docker's default profile.
//! What is refused with `EPERM` ([`DENIED`], [`OBSOLETE`]): what a build or
//! an untrusted program has no business doing and what has a history of
//! kernel exploits: kernel modules and kexec, BPF and perf, keyrings, mount
//! and pivot_root, the mount API and mount listing, clocks, reboot and
//! swap, `open_by_handle_at` (the classic container escape), io_uring,
//! userfaultfd, `modify_ldt`, quotas, and syscalls the kernel keeps only
//! for old binaries. `EPERM` reads as "not allowed here". Everything else
//! (numbers past the reviewed table, its gaps, every x32 number) answers
//! `ENOSYS`, so that a libc built for a newer kernel falls back to an older
//! call instead of failing: a syscall added after this list is refused
//! until someone reviews it, never allowed by default.
//!
//! `clone3` answers `ENOSYS` too: its flags live in memory that seccomp
//! cannot inspect, so libc falls back to `clone`, whose flags a second
//! filter (seccompiler) checks: no new user namespaces by `clone` or
//! `unshare` (nested namespaces are the biggest kernel attack surface a
//! sandbox could reach). The kernel applies the most restrictive answer of
//! all installed filters, so they never conflict.
//!
//! Other architectures keep the deny list ([`DENIED`] plus the same
//! argument rules) until someone reviews their tables.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// Syscalls refused outright (`EPERM`).
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

/// x86-64 syscalls refused as Docker's default profile refuses them: kept
/// by the kernel for old binaries or for administrators, or a known attack
/// surface (`modify_ldt`), and the mount-listing calls of Linux 6.8 (the
/// mount API is refused whole). Numbers the `libc` crate does not name are
/// written out.
#[cfg(target_arch = "x86_64")]
const OBSOLETE: &[i64] = &[
    libc::SYS_modify_ldt,
    libc::SYS_uselib,
    libc::SYS_ustat,
    libc::SYS_sysfs,
    libc::SYS__sysctl,
    174, // create_module
    177, // get_kernel_syms
    178, // query_module
    libc::SYS_nfsservctl,
    libc::SYS_getpmsg,
    libc::SYS_putpmsg,
    libc::SYS_afs_syscall,
    libc::SYS_tuxcall,
    libc::SYS_security,
    libc::SYS_vserver,
    libc::SYS_quotactl_fd,
    457, // statmount
    458, // listmount
    460, // lsm_set_self_attr
];

/// The last x86-64 syscall number reviewed (`removexattrat`, Linux 6.16).
#[cfg(target_arch = "x86_64")]
pub const LAST_REVIEWED: u32 = 465;

/// What a syscall gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Allow,
    /// Refused: not allowed here.
    Eperm,
    /// Refused as if the kernel had no such call (libc falls back).
    Enosys,
}

impl Answer {
    fn ret(self) -> u32 {
        match self {
            Answer::Allow => libc::SECCOMP_RET_ALLOW,
            Answer::Eperm => libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            Answer::Enosys => libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        }
    }
}

/// The answer to x86-64 syscall `nr` (the argument rules of `clone` and
/// `unshare` are the second filter's).
#[cfg(target_arch = "x86_64")]
pub fn decide(nr: u32) -> Answer {
    let n = i64::from(nr);
    // 0..=334 is the table up to rseq; 335..=423 were never used on x86-64
    // (the x32 numbers start at 512 with the x32 bit set).
    let in_table = nr <= 334 || (424..=LAST_REVIEWED).contains(&nr);
    if !in_table || n == libc::SYS_clone3 {
        Answer::Enosys
    } else if DENIED.contains(&n) || OBSOLETE.contains(&n) {
        Answer::Eperm
    } else {
        Answer::Allow
    }
}

/// Why the filter could not be built (a bug, never a host condition).
#[derive(Debug, thiserror::Error)]
#[error("building the seccomp filter failed: {0}")]
pub struct SeccompError(String);

/// The compiled programs, in the order they must be installed.
pub fn sandbox_programs() -> Result<Vec<Vec<libc::sock_filter>>, SeccompError> {
    let arch = std::env::consts::ARCH.try_into().map_err(|e| SeccompError(format!("{e:?}")))?;
    let err = |e: seccompiler::BackendError| SeccompError(e.to_string());

    // The allow list decides by number on x86-64; elsewhere the deny list.
    let denied: &[i64] = if cfg!(target_arch = "x86_64") { &[] } else { DENIED };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = denied.iter().map(|&nr| (nr, vec![])).collect();
    // No new user namespaces, by either door.
    let newuser = libc::CLONE_NEWUSER as u64;
    let masked = |arg| SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(newuser), newuser);
    rules.insert(libc::SYS_unshare, vec![SeccompRule::new(vec![masked(0).map_err(err)?]).map_err(err)?]);
    rules.insert(libc::SYS_clone, vec![SeccompRule::new(vec![masked(0).map_err(err)?]).map_err(err)?]);
    let deny =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch).map_err(err)?;

    let a: BpfProgram = deny.try_into().map_err(|e: seccompiler::BackendError| err(e))?;
    let mut programs = vec![to_libc(a)];
    #[cfg(target_arch = "x86_64")]
    programs.push(allow_list()?);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let clone3: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, vec![])].into_iter().collect();
        let enosys = SeccompFilter::new(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)
            .map_err(err)?;
        let b: BpfProgram = enosys.try_into().map_err(|e: seccompiler::BackendError| err(e))?;
        programs.push(to_libc(b));
    }
    Ok(programs)
}

/// `AUDIT_ARCH_X86_64`.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// [`decide`] as one BPF program: another arch is killed (as the second
/// filter does), then the number is looked up by binary search over the
/// runs of equal answers in `0..=LAST_REVIEWED`; anything above answers
/// `ENOSYS` (x32 numbers included: they carry the x32 bit).
#[cfg(target_arch = "x86_64")]
fn allow_list() -> Result<Vec<libc::sock_filter>, SeccompError> {
    // Runs: (first number, answer), ascending, each until the next's start.
    let mut runs: Vec<(u32, Answer)> = Vec::new();
    for nr in 0..=LAST_REVIEWED + 1 {
        let answer = if nr > LAST_REVIEWED { Answer::Enosys } else { decide(nr) };
        if runs.last().is_none_or(|&(_, a)| a != answer) {
            runs.push((nr, answer));
        }
    }
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter { code: code as u16, jt, jf, k };
    let ld = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let mut prog = vec![
        // seccomp_data: nr at 0, arch at 4.
        op(ld, 0, 0, 4),
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 1, 0, AUDIT_ARCH_X86_64),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        op(ld, 0, 0, 0),
    ];
    prog.extend(search(&runs)?);
    Ok(prog)
}

/// The search over `runs` (the accumulator holds the number): the first
/// run's answer below the second's start, and so on; a subtree is placed
/// right after its test's "no" branch, so every jump is forward.
#[cfg(target_arch = "x86_64")]
fn search(runs: &[(u32, Answer)]) -> Result<Vec<libc::sock_filter>, SeccompError> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter { code: code as u16, jt, jf, k };
    if let [(_, answer)] = runs {
        return Ok(vec![op(libc::BPF_RET | libc::BPF_K, 0, 0, answer.ret())]);
    }
    let mid = runs.len() / 2;
    let (below, above) = (search(&runs[..mid])?, search(&runs[mid..])?);
    let jump = u8::try_from(below.len()).map_err(|_| SeccompError("the allow list's search is too deep".into()))?;
    let mut prog = vec![op(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, jump, 0, runs[mid].0)];
    prog.extend(below);
    prog.extend(above);
    Ok(prog)
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_allow_list_program_answers_as_decide_does() {
        use super::{AUDIT_ARCH_X86_64, Answer, LAST_REVIEWED, allow_list, decide};
        let p = allow_list().unwrap();
        for nr in 0..=LAST_REVIEWED + 100 {
            let want = if nr > LAST_REVIEWED { Answer::Enosys } else { decide(nr) };
            assert_eq!(run(&p, nr, AUDIT_ARCH_X86_64), want.ret(), "syscall {nr}");
        }
        // Every x32 number, and anything huge.
        let x32 = 0x4000_0000;
        for nr in [x32, x32 | libc::SYS_mount as u32, x32 | libc::SYS_read as u32, u32::MAX] {
            assert_eq!(run(&p, nr, AUDIT_ARCH_X86_64), Answer::Enosys.ret(), "syscall {nr:#x}");
        }
        assert_eq!(run(&p, libc::SYS_read as u32, 0x4000_0003), libc::SECCOMP_RET_KILL_PROCESS, "i386 calls");
        // A lookup costs a handful of comparisons, not one per rule.
        assert!(p.len() < 400, "{} instructions", p.len());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn what_programs_use_is_allowed_and_the_rest_refused() {
        use super::{Answer, decide};
        let allowed = [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_mmap,
            libc::SYS_futex,
            libc::SYS_clone,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_wait4,
            libc::SYS_ptrace,
            libc::SYS_unshare,
            libc::SYS_chroot,
            libc::SYS_socket,
            libc::SYS_io_setup,
            libc::SYS_rseq,
            libc::SYS_pidfd_open,
            libc::SYS_close_range,
            libc::SYS_openat2,
            libc::SYS_faccessat2,
            libc::SYS_epoll_pwait2,
            libc::SYS_futex_waitv,
            libc::SYS_fchmodat2,
            libc::SYS_mseal,
            libc::SYS_memfd_create,
            libc::SYS_copy_file_range,
            libc::SYS_statx,
            libc::SYS_getrandom,
        ];
        for nr in allowed {
            assert_eq!(decide(nr as u32), Answer::Allow, "syscall {nr}");
        }
        let refused = [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_keyctl,
            libc::SYS_init_module,
            libc::SYS_kexec_load,
            libc::SYS_open_by_handle_at,
            libc::SYS_io_uring_setup,
            libc::SYS_userfaultfd,
            libc::SYS_modify_ldt,
            libc::SYS_fsopen,
            libc::SYS_setns,
            libc::SYS_quotactl_fd,
            libc::SYS__sysctl,
            457,
            458,
        ];
        for nr in refused {
            assert_eq!(decide(nr as u32), Answer::Eperm, "syscall {nr}");
        }
        for nr in [libc::SYS_clone3 as u32, 335, 423, 466, 1000] {
            assert_eq!(decide(nr), Answer::Enosys, "syscall {nr}");
        }
    }
}
