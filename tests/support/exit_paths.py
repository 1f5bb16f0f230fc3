"""Watching a booted tree end (tests/fault/test_fault_exit.py): which of its processes are left, read
from /proc (with the product's parser, compute/tree/reaper.py read_proc, tested on its own in
tests/integration/test_reaper.py; the decisions are made here, independently of the reaper's), and
whether its ports are still listened on.

A process is recorded by (pid, start time), so a recycled pid is never mistaken for one of the
tree's. compute-ctl is supervisord, and supervisord puts every program in a process group of
its own; what a program starts stays in that group even when re-parented to init: survivors
are the recorded processes still alive plus any live member of those groups.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from compute.tree.reaper import proc_table, read_proc
from tests.support.fault_tree import tree


class TreeRecord:
    """The processes of a booted `Compute` (compute-ctl itself excluded)."""

    def __init__(self, compute_pid: int):
        self.compute_pid = compute_pid
        self.members: dict[tuple[int, int], str] = {}  # (pid, start) -> role
        self.groups: set[int] = set()  # the programs' process groups (not compute-ctl's own)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> "TreeRecord":
        own = read_proc(self.compute_pid)
        for role, p in tree(self.compute_pid):
            if p.pid == self.compute_pid or not p.cmdline:
                continue  # an exiting process has no command line left to name it by
            s = read_proc(p.pid)
            if s is None:
                continue
            self.members[(s.pid, s.start)] = role  # the latest: a fork is named after its exec
            if own is not None and s.pgrp != own.pgrp:
                self.groups.add(s.pgrp)
        return self

    def roles(self) -> set[str]:
        return set(self.members.values())

    def keep_recording(self, period: float = 0.25) -> "TreeRecord":
        """Record in a thread until `stop()`: short-lived processes (initdb) are seen too."""
        def run():
            while not self._stop.wait(period):
                self.record()
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def survivors(self) -> list[str]:
        """'role (pid N, state S, parent P)' for each live process of the tree."""
        left = {}
        for s in proc_table().values():
            if s.state == "Z" or s.pid == self.compute_pid:
                continue
            role = self.members.get((s.pid, s.start))
            if role is None and s.pgrp in self.groups:
                role = f"{s.comm} (in a program's process group)"
            if role is not None:
                left[s.pid] = f"{role} (pid {s.pid}, state {s.state}, parent {s.ppid})"
        return [left[p] for p in sorted(left)]

    def wait_gone(self, timeout: float) -> tuple[float, list[str]]:
        """Poll until no survivor is left or `timeout` has passed: (seconds waited, survivors)."""
        t0 = time.monotonic()
        while True:
            left = self.survivors()
            waited = time.monotonic() - t0
            if not left or waited >= timeout:
                return waited, left
            time.sleep(0.02)

    def kill_survivors(self) -> None:
        """Cleanup after a failed test: a regression must not leak into the rest of the run."""
        for s in proc_table().values():
            if s.state != "Z" and s.pid != self.compute_pid and (
                    (s.pid, s.start) in self.members or s.pgrp in self.groups):
                try:
                    os.kill(s.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def listening_inodes(port: int) -> set[int]:
    """The inodes of the sockets that listen on TCP `port` (any address, IPv4 or IPv6), from
    /proc/net."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[9]))
    return found


def listening(port: int) -> bool:
    """Some socket listens on TCP `port` (any address, IPv4 or IPv6), from /proc/net."""
    return bool(listening_inodes(port))


def _thread_state(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def port_holders(port: int) -> list[str]:
    """Who holds the sockets listening on `port`: for each process with such a descriptor, its
    pid, state, parent, process group, threads (tid:state) and command line. The descriptor
    table is looked up per thread (/proc/PID/task/TID/fd): a process whose leader thread has
    exited (state Z) while its other threads are still on their way out shows no /proc/PID/fd."""
    inodes = listening_inodes(port)
    if not inodes:
        return []
    wanted = {f"socket:[{i}]" for i in inodes}
    holders = []
    for pid in sorted(int(d) for d in os.listdir("/proc") if d.isdigit()):
        try:
            tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
        held = []
        for tid in tids:
            try:
                fds = os.listdir(f"/proc/{pid}/task/{tid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/task/{tid}/fd/{fd}") in wanted:
                        held.append(int(fd))
                except OSError:
                    continue
            if held:
                break  # the threads of a process share one table (bar CLONE_FILES oddities)
        if not held:
            continue
        s = read_proc(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\x00", b" ").decode("utf-8", "replace").strip()
        except OSError:
            cmdline = "?"
        threads = " ".join(f"{t}:{_thread_state(pid, t)}" for t in tids)
        who = (f"pid {pid} ({s.comm}), state {s.state}, parent {s.ppid}, pgrp {s.pgrp}" if s
               else f"pid {pid} (gone)")
        holders.append(f"{who}, fds {sorted(set(held))}, threads [{threads}], cmdline {cmdline!r}")
    if not holders:
        holders.append(f"no process holds socket(s) {sorted(inodes)} (closing, or held in flight)")
    return holders


def port_report(port: int) -> str:
    """`ss -ltnp` for `port` and the holders found in /proc, for an assertion message."""
    import subprocess
    try:
        ss = subprocess.run(["ss", "-ltnpe", f"sport = :{port}"], capture_output=True, text=True,
                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        ss = f"(ss: {e})"
    return "held by:\n  " + "\n  ".join(port_holders(port)) + f"\nss -ltnpe:\n{ss}"
