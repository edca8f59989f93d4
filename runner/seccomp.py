"""The seccomp profile of every function container, as data.

Default deny (EPERM) with an allowlist taken from Docker's default profile
(moby/moby ``profiles/seccomp/default.json``): the big list of syscalls that are harmless
without privileges, the argument filters on ``socket`` and ``personality``, and the rule
that ``clone`` may not create namespaces. Everything Docker allows only to a container
holding some capability is left out, because a function container holds none.

Where this profile is stricter than Docker's, on purpose:

* ``ptrace``, ``process_vm_readv`` and ``process_vm_writev``: Docker allows them on
  kernels >= 4.8; a handler never needs to trace anything, so they stay denied.
* ``io_uring_setup``, ``io_uring_enter``, ``io_uring_register``: a large kernel attack
  surface that Docker itself stopped allowing in its default profile (Docker 25).

``clone3`` fails with ENOSYS rather than EPERM, as in Docker: seccomp cannot look into its
struct argument to check the namespace flags, and ENOSYS makes libc fall back to
``clone``, whose flags it can check.

Every name here must be known to libseccomp (the tests resolve each one): runc 1.1.5 and
crun 1.8.1 silently skip a name libseccomp does not know, so a typo would quietly change
the policy instead of failing.
"""

from __future__ import annotations

import copy
import platform
from typing import Any

EPERM = 1
ENOSYS = 38

# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
# CLONE_NEWPID | CLONE_NEWNET: clone is allowed only when none of these bits is set.
CLONE_NAMESPACE_FLAGS = 0x7E020000

# personality(2) values Docker allows: PER_LINUX, PER_LINUX32, UNAME26,
# UNAME26|PER_LINUX32, and 0xffffffff (query the current persona).
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

AF_VSOCK = 40  # the one socket family Docker refuses: it reaches the hypervisor

# The seccomp architectures a filter must cover on each host architecture (the native
# one and the compat ABIs a process can switch to), as in Docker's archMap.
ARCH_MAP: dict[str, tuple[str, ...]] = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "aarch64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
}
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

# Docker's unconditional allowlist, less the io_uring calls (see the module docstring).
ALLOWED: tuple[str, ...] = (
    "accept", "accept4", "access", "adjtimex", "alarm", "bind", "brk", "capget", "capset",
    "chdir", "chmod", "chown", "chown32", "clock_adjtime", "clock_adjtime64",
    "clock_getres", "clock_getres_time64", "clock_gettime", "clock_gettime64",
    "clock_nanosleep", "clock_nanosleep_time64", "close", "close_range", "connect",
    "copy_file_range", "creat", "dup", "dup2", "dup3", "epoll_create", "epoll_create1",
    "epoll_ctl", "epoll_ctl_old", "epoll_pwait", "epoll_pwait2", "epoll_wait",
    "epoll_wait_old", "eventfd", "eventfd2", "execve", "execveat", "exit", "exit_group",
    "faccessat", "faccessat2", "fadvise64", "fadvise64_64", "fallocate", "fanotify_mark",
    "fchdir", "fchmod", "fchmodat", "fchown", "fchown32", "fchownat", "fcntl", "fcntl64",
    "fdatasync", "fgetxattr", "flistxattr", "flock", "fork", "fremovexattr", "fsetxattr",
    "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate",
    "ftruncate64", "futex", "futex_time64", "futex_waitv", "futimesat", "getcpu", "getcwd",
    "getdents", "getdents64", "getegid", "getegid32", "geteuid", "geteuid32", "getgid",
    "getgid32", "getgroups", "getgroups32", "getitimer", "getpeername", "getpgid",
    "getpgrp", "getpid", "getppid", "getpriority", "getrandom", "getresgid", "getresgid32",
    "getresuid", "getresuid32", "getrlimit", "get_robust_list", "getrusage", "getsid",
    "getsockname", "getsockopt", "get_thread_area", "gettid", "gettimeofday", "getuid",
    "getuid32", "getxattr", "inotify_add_watch", "inotify_init", "inotify_init1",
    "inotify_rm_watch", "io_cancel", "ioctl", "io_destroy", "io_getevents",
    "io_pgetevents", "io_pgetevents_time64", "ioprio_get", "ioprio_set", "io_setup",
    "io_submit", "ipc", "kill", "landlock_add_rule", "landlock_create_ruleset",
    "landlock_restrict_self", "lchown", "lchown32", "lgetxattr", "link", "linkat",
    "listen", "listxattr", "llistxattr", "_llseek", "lremovexattr", "lseek", "lsetxattr",
    "lstat", "lstat64", "madvise", "membarrier", "memfd_create", "memfd_secret", "mincore",
    "mkdir", "mkdirat", "mknod", "mknodat", "mlock", "mlock2", "mlockall", "mmap", "mmap2",
    "mprotect", "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive",
    "mq_timedreceive_time64", "mq_timedsend", "mq_timedsend_time64", "mq_unlink", "mremap",
    "msgctl", "msgget", "msgrcv", "msgsnd", "msync", "munlock", "munlockall", "munmap",
    "name_to_handle_at", "nanosleep", "newfstatat", "_newselect", "open", "openat",
    "openat2", "pause", "pidfd_open", "pidfd_send_signal", "pipe", "pipe2", "pkey_alloc",
    "pkey_free", "pkey_mprotect", "poll", "ppoll", "ppoll_time64", "prctl", "pread64",
    "preadv", "preadv2", "prlimit64", "process_mrelease", "pselect6", "pselect6_time64",
    "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink", "readlinkat",
    "readv", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg",
    "remap_file_pages", "removexattr", "rename", "renameat", "renameat2",
    "restart_syscall", "rmdir", "rseq", "rt_sigaction", "rt_sigpending", "rt_sigprocmask",
    "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sched_getaffinity", "sched_getattr",
    "sched_getparam", "sched_get_priority_max", "sched_get_priority_min",
    "sched_getscheduler", "sched_rr_get_interval", "sched_rr_get_interval_time64",
    "sched_setaffinity", "sched_setattr", "sched_setparam", "sched_setscheduler",
    "sched_yield", "seccomp", "select", "semctl", "semget", "semop", "semtimedop",
    "semtimedop_time64", "send", "sendfile", "sendfile64", "sendmmsg", "sendmsg", "sendto",
    "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "setgid", "setgid32", "setgroups",
    "setgroups32", "setitimer", "setpgid", "setpriority", "setregid", "setregid32",
    "setresgid", "setresgid32", "setresuid", "setresuid32", "setreuid", "setreuid32",
    "setrlimit", "set_robust_list", "setsid", "setsockopt", "set_thread_area",
    "set_tid_address", "setuid", "setuid32", "setxattr", "shmat", "shmctl", "shmdt",
    "shmget", "shutdown", "sigaltstack", "signalfd", "signalfd4", "sigprocmask",
    "sigreturn", "socketcall", "socketpair", "splice", "stat", "stat64", "statfs",
    "statfs64", "statx", "symlink", "symlinkat", "sync", "sync_file_range", "syncfs",
    "sysinfo", "tee", "tgkill", "time", "timer_create", "timer_delete",
    "timer_getoverrun", "timer_gettime", "timer_gettime64", "timer_settime",
    "timer_settime64", "timerfd_create", "timerfd_gettime", "timerfd_gettime64",
    "timerfd_settime", "timerfd_settime64", "times", "tkill", "truncate", "truncate64",
    "ugetrlimit", "umask", "uname", "unlink", "unlinkat", "utime", "utimensat",
    "utimensat_time64", "utimes", "vfork", "vmsplice", "wait4", "waitid", "waitpid",
    "write", "writev",
)

# Docker's per-architecture additions.
ALLOWED_BY_MACHINE: dict[str, tuple[str, ...]] = {
    "x86_64": ("arch_prctl", "modify_ldt"),
    "aarch64": ("arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2",
                "breakpoint", "cacheflush", "set_tls"),
}


def _rule(names: list[str], action: str = "SCMP_ACT_ALLOW", **extra: Any) -> dict[str, Any]:
    return {"names": names, "action": action, **extra}


def _arg(index: int, value: int, op: str, value_two: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def host_machine(machine: str | None = None) -> str:
    """This host's architecture as a key of :data:`ARCH_MAP` (ValueError if unsupported)."""
    name = machine or platform.machine()
    name = _MACHINE_ALIASES.get(name, name)
    if name not in ARCH_MAP:
        raise ValueError(f"no seccomp profile for architecture {name!r}: "
                         f"faasd supports {', '.join(sorted(ARCH_MAP))}")
    return name


def profile_for(machine: str | None = None) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` object for ``machine`` (default: this host)."""
    arch = host_machine(machine)
    rules = [
        _rule(sorted(ALLOWED + ALLOWED_BY_MACHINE[arch])),
        _rule(["socket"], args=[_arg(0, AF_VSOCK, "SCMP_CMP_NE")]),
        # One rule per value: the rules of one name are ORed, the args of one rule ANDed.
        *(_rule(["personality"], args=[_arg(0, p, "SCMP_CMP_EQ")]) for p in PERSONALITIES),
        _rule(["clone"], args=[_arg(0, CLONE_NAMESPACE_FLAGS, "SCMP_CMP_MASKED_EQ", 0)]),
        _rule(["clone3"], "SCMP_ACT_ERRNO", errnoRet=ENOSYS),
    ]
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": list(ARCH_MAP[arch]),
        "syscalls": rules,
    }


# The profile for this host; build_config hands each container its own deep copy.
PROFILE: dict[str, Any] = profile_for()


def profile() -> dict[str, Any]:
    """A fresh copy of :data:`PROFILE`, safe for the caller to modify."""
    return copy.deepcopy(PROFILE)
