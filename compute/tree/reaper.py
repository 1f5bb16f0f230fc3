"""The last step of every exit path: nothing of the tree outlives compute-ctl.

compute-ctl is a child subreaper (and PID 1 in a container), so every process of the tree that
loses its parent is re-parented to it: the tree is exactly compute-ctl's descendants. Once
supervisord has exited, whether it stopped everything in order or was killed, compute-ctl reads
the process table, decides which signal each remaining descendant is due (`due_signals`, a pure
function of the snapshot and the time spent), sends those it has not sent yet, reaps, and
repeats until no descendant is left. For `term_after` seconds it only waits (what is already
stopping, stops); then postgres is treated as postgres: fast shutdown (SIGINT) first, immediate
shutdown (SIGQUIT) next, its own children left to it; everything else gets SIGTERM; whatever
is still there after `kill_after` seconds gets SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

log = logging.getLogger("compute.tree.reaper")

T = TypeVar("T")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    # The one-letter state of /proc/PID/stat; "Z": dead (every thread), waiting to be reaped.
    # A process whose main thread has exited while others have not is not dead: it has the
    # state of a thread still running (process_state).
    state: str
    start: int  # start time in clock ticks since boot: (pid, start) names one process, ever
    comm: str = ""
    pgrp: int = 0
    session: int = 0


@dataclass(frozen=True)
class Escalation:
    """Seconds since the cleanup began at which each signal is due."""
    # Before that, only reap: after a SIGKILL of supervisord every program and postgres already
    # got their parent-death signal and are on their way out, in their own orderly fashion.
    term_after: float = 0.5
    quit_postmaster_after: float = 2.0  # fast shutdown took too long: immediate shutdown
    kill_after: float = 3.0  # SIGKILL whatever is left (the 5 s budget of a killed supervisord)


def descendants(table: Mapping[int, Proc], root: int) -> list[Proc]:
    """Every process under `root` in `table` (not `root` itself), parents before children."""
    children: dict[int, list[Proc]] = {}
    for p in table.values():
        if p.pid != root:
            children.setdefault(p.ppid, []).append(p)
    out, todo = [], [root]
    while todo:
        for child in sorted(children.get(todo.pop(0), ()), key=lambda p: p.pid):
            out.append(child)
            todo.append(child.pid)
    return out


def due_signals(table: Mapping[int, Proc], root: int, postmaster: int | None, elapsed: float,
                escalation: Escalation = Escalation()) -> dict[int, int]:
    """pid -> the signal each live descendant of `root` is due `elapsed` seconds into the
    cleanup (0: none yet; a postmaster's children: none, it stops them). Empty: nothing of the
    tree is left alive (zombies only need reaping)."""
    due: dict[int, int] = {}
    for p in descendants(table, root):
        if p.state == "Z":
            continue
        if elapsed < escalation.term_after:
            due[p.pid] = 0  # alive, nothing to send yet
        elif elapsed >= escalation.kill_after:
            due[p.pid] = signal.SIGKILL
        elif p.pid == postmaster:
            due[p.pid] = signal.SIGQUIT if elapsed >= escalation.quit_postmaster_after else signal.SIGINT
        elif postmaster is not None and p.ppid == postmaster:
            due[p.pid] = 0  # backends and auxiliary processes: the postmaster stops them
        else:
            due[p.pid] = signal.SIGTERM
    return due


def process_state(leader: str, threads: list[str]) -> str:
    """A process's state from its main thread's (`leader`, what /proc/PID/stat shows) and its
    threads' (/proc/PID/task/*/stat, the main thread's included). /proc/PID/stat says Z as soon
    as the main thread has exited, while the other threads may still be running, or on their
    way out of a kill: they still hold the process's descriptors (a listening socket), so the
    process is dead only once every thread is."""
    if leader not in ("Z", "X"):
        return leader
    return next((t for t in threads if t not in ("Z", "X")), leader)


# -- the thin layer that reads /proc, signals and reaps ---------------------------------------

def _stat_state(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:][:1].decode() or None


def thread_states(pid: int) -> list[str]:
    """The states of `pid`'s threads (those gone meanwhile left out)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    return [st for tid in tids if (st := _stat_state(f"/proc/{pid}/task/{tid}/stat")) is not None]


def read_proc(pid: int) -> Proc | None:
    """/proc/PID/stat as a Proc; None if the process is gone (the tests read the tree with it too).
    A zombie main thread is looked behind: the state is process_state's."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("utf-8", "replace")
    except OSError:  # gone meanwhile
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    rest = stat[stat.rindex(")") + 2:].split()  # rest[0] is field 3 (state) of proc(5)
    state = rest[0]
    if state in ("Z", "X"):  # only then are the threads read: one more look per zombie
        state = process_state(state, thread_states(pid))
    return Proc(pid=pid, ppid=int(rest[1]), state=state, start=int(rest[19]), comm=comm,
                pgrp=int(rest[2]), session=int(rest[3]))


def proc_table(read: Callable[[int], T | None] = read_proc) -> dict[int, T]:
    """pid -> read(pid) for every process in /proc (those gone meanwhile left out)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = read(int(name))
            if p is not None:
                table[p.pid] = p
    return table


def postmaster_pid(pgdata: str | None) -> int | None:
    """The pid in PGDATA/postmaster.pid; it only matters if it is one of our descendants."""
    if not pgdata:
        return None
    try:
        with open(os.path.join(pgdata, "postmaster.pid")) as f:
            return int(f.readline().strip())
    except (OSError, ValueError):
        return None


def reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_descendants(pgdata: str | None = None, *, escalation: Escalation = Escalation(),
                     give_up_after: float = 10.0, period: float = 0.02,
                     snapshot: Callable[[], dict[int, Proc]] = proc_table) -> list[Proc]:
    """Signal, wait for and reap every descendant of this process until none is left. Returns
    those still there after `give_up_after` seconds (only an unkillable process: one stuck in
    the kernel), logged as an error."""
    me = os.getpid()
    t0 = time.monotonic()
    sent: set[tuple[int, int, int]] = set()  # (pid, start, signal): each signal once per process
    postmaster = None
    while True:
        reap_children()
        table = snapshot()
        elapsed = time.monotonic() - t0
        # Remembered once seen running: postgres removes postmaster.pid just before it exits.
        # (A stale file naming a recycled pid is harmless: due_signals only looks at our own.)
        if postmaster is None and (pm := postmaster_pid(pgdata)) in table:
            postmaster = pm
        due = due_signals(table, me, postmaster, elapsed, escalation)
        if not due and not any(p.ppid == me for p in table.values()):
            return []
        if elapsed >= give_up_after:
            left = [table[pid] for pid in due]
            log.error("%d process(es) of the tree could not be stopped: %s", len(left),
                      ", ".join(f"{p.comm} (pid {p.pid}, state {p.state})" for p in left))
            return left
        for pid, sig in due.items():
            key = (pid, table[pid].start, sig)
            if not sig or key in sent:
                continue
            sent.add(key)
            log.warning("%s (pid %d) outlived supervisord: %s", table[pid].comm, pid,
                        signal.Signals(sig).name)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(period)
