"""Each process of the tree has its own title in `ps` (`/proc/PID/cmdline`) and its name as comm.

Our Python programs are forked from compute-ctl without exec (compute/tree/warmfork.py), so they
would all show compute-ctl's command line; compute-ctl's own may hold a spec (`-s`) or a
connstr. Each program's entry calls `set_title` once: `compute-ctl: PROGRAM (runtime dir DIR)`,
the runtime dir telling computes on one host apart. No secret is ever part of a title. postgres
and the programs that exec keep their own command lines (postgres sets its own titles).

setproctitle (a pinned dependency) rewrites the argv area as ps reads it; it also sets comm to
the title's first 15 bytes, so comm is set again to the program's short name (what `ps -o comm`,
`pgrep` and the kernel's messages show)."""

from __future__ import annotations

import ctypes

PREFIX = "compute-ctl"
PR_SET_NAME = 15


def title(program: str, runtime_dir: str | None) -> str:
    return f"{PREFIX}: {program}" + (f" (runtime dir {runtime_dir})" if runtime_dir else "")


def set_title(program: str, runtime_dir: str | None, comm: str | None = None) -> None:
    """This process' title, and comm (default: the program's first word, at most 15 bytes)."""
    try:
        from setproctitle import setproctitle
        setproctitle(title(program, runtime_dir))
    except ImportError:  # a checkout run without the dependency: the titles are cosmetic
        pass
    set_comm(comm or program.split()[0])


def set_comm(name: str) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
