"""Helpers for the fault-injection tests (tests/fault/, tests/e2e/) and bench/footprint.py: the
process tree of a booted `Compute` read from /proc, a /status poller that runs while things are
being killed, and per-process memory (PSS).

Nothing here talks to supervisord's control socket unless asked to: every request on that
socket ends supervisord's 1 s poll() early, which would make restarts look faster than they are
in production, where nobody is polling it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from compute.tree import reaper

# The supervised programs, recognised by their command line (see supervisor/supervisord.conf.tmpl)
# when exec'd, or, forked from compute-ctl's warm image (compute/tree/warmfork.py: the command line is
# compute-ctl's), by the process name (comm) the fork gives them: the program's name.
PROGRAM_MARKERS = {
    "lifecycle": "-m compute.lifecycle.driver",
    "monitor": "-m compute.programs.monitor",
    "api": "-m gunicorn",
}


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    comm: str
    cmdline: str
    pgrp: int = 0


def read_proc(pid: int) -> Proc | None:
    """The product's reading of /proc/PID/stat (compute/tree/reaper.py), plus the command line."""
    p = reaper.read_proc(pid)
    if p is None:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\x00", b" ").decode("utf-8", "replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return Proc(p.pid, p.ppid, p.state, p.comm, cmdline, p.pgrp)


def proc_table() -> dict[int, Proc]:
    return reaper.proc_table(read_proc)


def descendants(root: int, table: dict[int, Proc] | None = None) -> list[Proc]:
    """Every live process under `root` (not `root` itself), parents before children."""
    return reaper.descendants(table if table is not None else proc_table(), root)


def alive(pid: int) -> bool:
    p = read_proc(pid)
    return p is not None and p.state != "Z"


def program_of(p: Proc) -> str | None:
    for name, marker in PROGRAM_MARKERS.items():
        if marker in p.cmdline or p.comm == name:
            return name
    return None


def role_of(p: Proc, postmaster: int | None, table: dict[int, Proc]) -> str:
    """What a process of the tree is: compute-ctl, supervisord, a program, a gunicorn worker,
    postgres (the postmaster or one of its children)."""
    forked = program_of(p) if "compute-ctl" in p.cmdline else None
    if forked == "api":
        parent = table.get(p.ppid)
        return "api worker" if parent is not None and program_of(parent) == "api" else "api master"
    if forked:
        return forked
    if "compute-ctl" in p.cmdline and "supervisord" not in p.cmdline:
        return "compute-ctl"
    if any(m in p.cmdline for m in ("supervisor.supervisord", "supervisord_main")) or p.cmdline.endswith("supervisord"):
        return "supervisord"
    if p.pid == postmaster or p.ppid == postmaster or p.comm.startswith("postgres"):
        return "postgres"
    for name, marker in PROGRAM_MARKERS.items():
        if marker in p.cmdline:
            if name == "api":
                parent = table.get(p.ppid)
                if parent is not None and "-m gunicorn" in parent.cmdline:
                    return "api worker"
                return "api master"
            return name
    return p.comm


def tree(compute_pid: int) -> list[tuple[str, Proc]]:
    """(role, process) for compute-ctl and everything under it."""
    table = proc_table()
    root = table.get(compute_pid)
    if root is None:
        return []
    procs = [root, *descendants(compute_pid, table)]
    postmaster = next((p.pid for p in procs if p.comm == "postgres" and "-D" in p.cmdline
                       and table.get(p.ppid) is not None
                       and ("supervisord" in table[p.ppid].cmdline or table[p.ppid].pid == compute_pid)), None)
    return [(role_of(p, postmaster, table), p) for p in procs]


def supervisord_pid(runtime_dir: str) -> int:
    with open(os.path.join(runtime_dir, "supervisord.pid")) as f:
        return int(f.read().strip())


def program_child(supervisord: int, name: str, table: dict[int, Proc] | None = None) -> int | None:
    """The pid of program `name` from /proc alone: a direct child of supervisord that leads its
    own process group (supervisord makes one per program). compute-ctl is supervisord and a
    subreaper, so a killed api master's orphaned workers become its children too, in the dead
    master's group."""
    marker = PROGRAM_MARKERS[name]
    table = table if table is not None else proc_table()
    for p in table.values():
        if p.ppid == supervisord and p.pgrp == p.pid and (marker in p.cmdline or p.comm == name) \
                and p.state != "Z":
            return p.pid
    return None


def pss_kib(pid: int) -> int | None:
    """Proportional set size from /proc/<pid>/smaps_rollup (kB), None if gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def kill_leftovers(pids, sig: int = signal.SIGKILL) -> list[int]:
    """Kill (by pid) whichever of `pids` still runs; returns those that did. Used by tests to
    clean up after a product bug left processes behind."""
    survivors = [p for p in pids if alive(p)]
    for p in survivors:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    return survivors


# -- /status while things are killed ---------------------------------------------------------

@dataclass
class Sample:
    t: float  # monotonic
    ok: bool
    latency: float
    body: dict | None = None
    error: str | None = None


@dataclass
class StatusPoller:
    """GET /status every `period` seconds in a thread, each with `timeout`; keeps every answer."""

    port: int
    period: float = 0.02
    timeout: float = 1.0
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _once(self) -> Sample:
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=self.timeout) as r:
                body = json.loads(r.read())
                return Sample(t0, r.status == 200, time.monotonic() - t0, body)
        except urllib.error.HTTPError as e:
            return Sample(t0, False, time.monotonic() - t0, error=f"HTTP {e.code}")
        except (OSError, ValueError, http.client.HTTPException) as e:  # a cut answer too: never die
            return Sample(t0, False, time.monotonic() - t0, error=f"{type(e).__name__}: {e}")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._once())
            self._stop.wait(self.period)

    def __enter__(self) -> "StatusPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    # -- analysis -----------------------------------------------------------------------------
    def failures(self) -> list[Sample]:
        return [s for s in self.samples if not s.ok]

    def longest_outage(self) -> float:
        """Longest time between the start of a failed poll and the next successful answer."""
        worst, down_since = 0.0, None
        for s in self.samples:
            if not s.ok and down_since is None:
                down_since = s.t
            elif s.ok and down_since is not None:
                worst = max(worst, s.t + s.latency - down_since)
                down_since = None
        if down_since is not None and self.samples:
            last = self.samples[-1]
            worst = max(worst, last.t + last.latency - down_since)
        return worst

    def bodies(self) -> list[dict]:
        return [s.body for s in self.samples if s.ok and s.body is not None]


# -- who holds a listening socket -------------------------------------------------------------

def listening_inode(port: int) -> str:
    """The inode of the socket listening on `port` (/proc/net/tcp{,6})."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                    return fields[9]
    raise AssertionError(f"nothing listens on port {port}")


def holds(pid: int, inode: str) -> bool:
    """Whether process `pid` has the socket `inode` open (False once it is gone)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                return True
        except OSError:
            pass
    return False


def holders(c, inode: str) -> dict[int, str]:
    """pid -> role of every process of the tree of `c` (a tests.support.tree.Compute) that has
    the socket `inode` open."""
    return {p.pid: role for role, p in tree(c.proc.pid) if holds(p.pid, inode)}
