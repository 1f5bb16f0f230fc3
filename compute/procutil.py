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
