"""Linux process plumbing (prctl) that keeps the tree from leaving orphans behind."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# The pid each process of the tree expects as its parent, exported to it by that parent:
# compute-ctl's to supervisord, supervisord's to the programs.
COMPUTE_CTL_PID_ENV = "COMPUTE_CTL_PID"
SUPERVISORD_PID_ENV = "COMPUTE_SUPERVISORD_PID"


def _prctl(option: int, arg: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGTERM, parent_env: str = SUPERVISORD_PID_ENV) -> bool:
    """Ask the kernel to send us `sig` when our parent dies, even by SIGKILL.

    A parent that died before this call sends nothing: when the environment names the parent
    we were started by (`parent_env`) and our parent is no longer that process, we send
    ourselves `sig` at once."""
    ok = _prctl(PR_SET_PDEATHSIG, int(sig))
    expected = os.environ.get(parent_env, "")
    if expected.isdigit() and os.getppid() != int(expected):
        os.kill(os.getpid(), sig)
    return ok


def dies_with_us(sig: int = signal.SIGTERM) -> None:
    """preexec_fn for a child a program runs itself (pg_basebackup, --sync-safekeepers): it
    gets `sig` when we die. No parent check: its parent is us, not the supervisord that
    die_with_parent expects."""
    _prctl(PR_SET_PDEATHSIG, int(sig))


def become_subreaper() -> bool:
    """Orphans of our descendants are reparented to us instead of init."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def scrub_initial_environment(names) -> int:
    """Overwrite the entries `NAME=value` of `names` in this process's initial environment
    block (what /proc/PID/environ shows, for us and for every child forked from us) with NUL
    bytes. os.environ is a copy made at start-up and stays as it is. Returns how many were
    scrubbed. Call it while /proc/self is readable (before dropping root: a process that is
    not dumpable has a /proc/self owned by root)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # fields[0] is field 3 of proc(5)
        env_start, env_end = int(fields[50 - 3]), int(fields[51 - 3])
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except (OSError, IndexError, ValueError):
        return 0
    wanted = {n.encode() + b"=" for n in names}
    scrubbed, offset = 0, 0
    for entry in block.split(b"\0"):
        prefix = next((w for w in wanted if entry.startswith(w)), None)
        if prefix is not None:
            start = env_start + offset
            if start + len(entry) <= env_end:
                ctypes.memset(start, 0, len(entry))
                scrubbed += 1
        offset += len(entry) + 1
    return scrubbed
