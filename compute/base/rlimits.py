"""The resource limits supervisord requires of compute-ctl's process, checked before anything
is touched (issue 21). supervisord checks them itself only once its loop starts, after the bind,
the runtime dir and the state file: there a too low limit was a usage text and exit 2.

supervisord needs RLIMIT_NOFILE >= its `minfds` (it closes fds 3..minfds-1 in every child it
forks) and RLIMIT_NPROC >= `minprocs`; it raises a soft limit below them itself, so do we (a
limit of this process only: nothing is touched). A hard limit below them cannot be raised once
root is dropped: a one-line error, exit 1. supervisord.conf is rendered with the same values.
Standard library only: used by the flag checks, before the bind.
"""

from __future__ import annotations

import resource

MIN_FDS = 1024  # supervisord's own default `minfds`
MIN_PROCS = 200  # supervisord's own default `minprocs`
# (resource name, minimum, what it counts, the shell's ulimit flag)
REQUIRED = (("RLIMIT_NOFILE", MIN_FDS, "open files", "-n"), ("RLIMIT_NPROC", MIN_PROCS, "processes", "-u"))


def shortfall(name: str, soft: int, hard: int, minimum: int, what: str, flag: str) -> tuple[int | None, str | None]:
    """Decide about one limit: (the soft limit to set or None, the error or None)."""
    def enough(limit: int) -> bool:
        return limit == resource.RLIM_INFINITY or limit >= minimum
    if enough(soft):
        return None, None
    if not enough(hard):
        return None, (f"{name} is {soft} (hard limit {hard}): compute-ctl needs at least {minimum} {what} "
                      f"(raise it: ulimit {flag} {minimum}, prlimit, or the container's ulimits)")
    return minimum, None


def ensure_limits() -> str | None:
    """Raise soft limits below the minimums; the error for one that cannot be, else None."""
    for name, minimum, what, flag in REQUIRED:
        res = getattr(resource, name)
        soft, hard = resource.getrlimit(res)
        new_soft, error = shortfall(name, soft, hard, minimum, what, flag)
        if error:
            return error
        if new_soft is not None:
            resource.setrlimit(res, (new_soft, hard))
    return None
