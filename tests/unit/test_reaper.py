"""What compute-ctl does with whatever of the tree outlives supervisord (compute/tree/reaper.py), and
the parent checks that close the window before a parent-death signal is armed
(compute/base/procutil.py). The e2e side: tests/fault/test_fault_exit.py.

This file: the pure decisions; with real processes: tests/integration/test_reaper.py."""

from __future__ import annotations

import signal

from compute.tree.reaper import Escalation, Proc, descendants, due_signals, process_state

ROOT = 100
ESC = Escalation(term_after=0.5, quit_postmaster_after=2.0, kill_after=3.0)


def table(*procs: tuple[int, int] | tuple[int, int, str]) -> dict[int, Proc]:
    """(pid, ppid[, state]) -> a process table; start times are all distinct."""
    return {p[0]: Proc(pid=p[0], ppid=p[1], state=p[2] if len(p) > 2 else "S", start=1000 + p[0])
            for p in procs}


# A tree after a SIGKILL of supervisord (201): its programs are re-parented to compute-ctl
# (ROOT); 300 is the postmaster with two backends, 400 a gunicorn master with a worker, 500 a
# zombie not yet reaped; 1 (init), 50 (our parent) and 900 (someone else's) are not ours.
AFTER_SUPERVISORD_KILL = table(
    (1, 0), (50, 1), (ROOT, 50), (900, 1),
    (300, ROOT), (301, 300), (302, 300),
    (400, ROOT), (401, 400),
    (500, ROOT, "Z"),
    (600, ROOT), (601, 600), (602, 601),  # lifecycle -> initdb -> postgres --boot
)


def test_descendants_are_exactly_the_subtree():
    got = [p.pid for p in descendants(AFTER_SUPERVISORD_KILL, ROOT)]
    assert sorted(got) == [300, 301, 302, 400, 401, 500, 600, 601, 602]
    assert got.index(600) < got.index(601) < got.index(602)  # parents first
    assert descendants(AFTER_SUPERVISORD_KILL, 902) == []


def test_first_only_wait_for_what_is_already_stopping():
    due = due_signals(AFTER_SUPERVISORD_KILL, ROOT, postmaster=300, elapsed=0.1, escalation=ESC)
    assert set(due) == {300, 301, 302, 400, 401, 600, 601, 602}  # alive; the zombie is not
    assert set(due.values()) == {0}


def test_then_postgres_fast_shutdown_and_sigterm_for_the_rest():
    due = due_signals(AFTER_SUPERVISORD_KILL, ROOT, postmaster=300, elapsed=1.0, escalation=ESC)
    assert due == {300: signal.SIGINT, 301: 0, 302: 0,  # the postmaster stops its backends
                   400: signal.SIGTERM, 401: signal.SIGTERM,
                   600: signal.SIGTERM, 601: signal.SIGTERM, 602: signal.SIGTERM}


def test_then_immediate_shutdown_then_sigkill_for_everything():
    due = due_signals(AFTER_SUPERVISORD_KILL, ROOT, postmaster=300, elapsed=2.5, escalation=ESC)
    assert due[300] == signal.SIGQUIT and due[301] == 0 and due[400] == signal.SIGTERM
    due = due_signals(AFTER_SUPERVISORD_KILL, ROOT, postmaster=300, elapsed=3.0, escalation=ESC)
    assert due == {pid: signal.SIGKILL for pid in (300, 301, 302, 400, 401, 600, 601, 602)}


def test_nothing_alive_means_nothing_due():
    only_zombies = table((ROOT, 50), (500, ROOT, "Z"), (900, 1))
    for elapsed in (0.0, 1.0, 5.0):
        assert due_signals(only_zombies, ROOT, postmaster=None, elapsed=elapsed, escalation=ESC) == {}


def test_a_stale_postmaster_pid_names_nobody_outside_the_tree():
    """postmaster.pid left by a killed postgres may name a recycled pid: never signalled unless
    it is one of ours, and ours are not spared because of it."""
    due = due_signals(AFTER_SUPERVISORD_KILL, ROOT, postmaster=900, elapsed=1.0, escalation=ESC)
    assert 900 not in due
    assert due[300] == signal.SIGTERM and due[301] == signal.SIGTERM  # no known postmaster: all SIGTERM


def test_orphaned_backends_are_stopped_too():
    """The postmaster died first: its backends were re-parented to us."""
    orphans = table((ROOT, 50), (301, ROOT), (302, ROOT))
    due = due_signals(orphans, ROOT, postmaster=300, elapsed=1.0, escalation=ESC)
    assert due == {301: signal.SIGTERM, 302: signal.SIGTERM}


def test_a_process_is_dead_only_once_every_thread_is():
    """/proc/PID/stat says Z once the main thread has exited; threads still on their way out of
    a kill hold the process's descriptors (a gunicorn worker's: the API socket)."""
    assert process_state("S", ["S", "S"]) == "S"
    assert process_state("Z", ["Z", "S", "R"]) == "S"  # the first live thread's
    assert process_state("Z", ["Z", "D"]) == "D"
    assert process_state("Z", ["Z"]) == "Z"
    assert process_state("Z", ["Z", "X"]) == "Z"
    assert process_state("Z", []) == "Z"  # reaped meanwhile: no task left to read
    assert process_state("X", ["R"]) == "R"
