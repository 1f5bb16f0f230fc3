"""Linux process plumbing (prctl) that keeps the tree from leaving orphans behind."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, arg: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send us `sig` when supervisord (our parent) dies, even by SIGKILL."""
    return _prctl(PR_SET_PDEATHSIG, int(sig))


def become_subreaper() -> bool:
    """Orphans of our descendants are reparented to us instead of init."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)
