"""The tree's exit decision when postgres ends: every case, no processes (milliseconds)."""

from __future__ import annotations

import pytest

from compute.tree import exit_decision
from compute.tree.exit_decision import (ExitAction, ExitDecision, decide_postgres_exit, hold_for_terminate,
                                   live_waiters, postgres_exit_code, postgres_has_ended, tree_exit_code, counts_as_restart,
                                   terminate_without_postgres)

SHUT, START = ExitAction.SHUT_DOWN, ExitAction.RECORD_START_FAILURE


@pytest.mark.parametrize("statename,exitstatus,code", [
    ("EXITED", 0, 0),       # a clean fast shutdown (pg_ctl stop by hand)
    ("EXITED", 2, 2),
    ("EXITED", -1, 1),      # killed by a signal (kill -9 of the postmaster)
    ("STOPPED", -1, 1),
    ("FATAL", 0, 1),        # never got going: supervisord gave up
    ("EXITED", None, 1),    # no status at all still fails the tree
])
def test_exit_code(statename, exitstatus, code):
    assert postgres_exit_code(statename, exitstatus) == code


@pytest.mark.parametrize("startup_done,shutdown_requested,statename,exitstatus,expected", [
    # running compute: postgres' own code ends the tree
    (True, False, "EXITED", 0, ExitDecision(0, SHUT)),
    (True, False, "EXITED", -1, ExitDecision(1, SHUT)),
    (True, False, "FATAL", 0, ExitDecision(1, SHUT)),
    # /terminate: a wanted stop is exit 0, whatever postgres said (immediate shutdown)
    (True, True, "EXITED", 3, ExitDecision(0, SHUT)),
    (True, True, "EXITED", -1, ExitDecision(0, SHUT)),
    # /terminate during start-up still shuts down
    (False, True, "STOPPED", -1, ExitDecision(0, SHUT)),
    # start-up not finished: the driver owns the failure (grace period, then exit 1)
    (False, False, "EXITED", -1, ExitDecision(1, START)),
    (False, False, "EXITED", 0, ExitDecision(0, START)),
    (False, False, "FATAL", 0, ExitDecision(1, START)),
])
def test_decision_matrix(startup_done, shutdown_requested, statename, exitstatus, expected):
    assert decide_postgres_exit(statename, exitstatus, startup_done=startup_done,
                                shutdown_requested=shutdown_requested) == expected


@pytest.mark.parametrize("statename,postgres_started,ended", [
    ("EXITED", False, True), ("FATAL", False, True),
    ("STOPPED", False, False),  # not started yet: the driver has not asked for it
    ("STOPPED", True, True),
    ("RUNNING", True, False), ("STARTING", True, False), ("BACKOFF", True, False), (None, True, False),
])
def test_recovery_sees_a_missed_end(statename, postgres_started, ended):
    assert postgres_has_ended(statename, postgres_started=postgres_started) is ended


@pytest.mark.parametrize("recorded,by_signal,by_rpc,expected", [
    (None, True, False, 0),    # SIGTERM: a wanted stop
    (3, True, False, 0),       # SIGTERM wins over a recorded code (as before)
    (None, False, True, 0),    # the operator's supervisorctl shutdown
    (1, False, True, 1),       # the driver's shutdown after a failed start keeps its code
    (0, False, False, 0),      # postgres exited 0 (exitwatch recorded it)
    (2, False, False, 2),
    (None, False, False, None),  # nobody decided: unexpected
])
def test_tree_exit_code(recorded, by_signal, by_rpc, expected):
    assert tree_exit_code(recorded, stopped_by_signal=by_signal, stopped_by_rpc=by_rpc) == expected


@pytest.mark.parametrize("program,exitstatus,counted", [
    ("lifecycle", 0, False),   # the hand-over to a fresh driver
    ("lifecycle", 1, True),    # a crashed driver
    ("lifecycle", -1, True),   # kill -9
    ("lifecycle", None, True),
    ("monitor", 0, True),      # nobody else exits 0 on purpose
    ("api", 0, True),
    ("monitor", 1, True),
])
def test_counts_as_restart(program, exitstatus, counted):
    assert counts_as_restart(program, exitstatus) is counted


@pytest.mark.parametrize("status,code", [("empty", 0), ("init", 0), ("configuration_pending", 0), ("failed", 1),
                                         (None, 0)])
def test_terminate_without_postgres(status, code):
    assert terminate_without_postgres(status) == code


def test_killed_by_names_the_signal_from_the_wait_status():
    import signal as sig
    assert exit_decision.killed_by(None) is None
    assert exit_decision.killed_by(0) is None            # exit 0
    assert exit_decision.killed_by(1 << 8) is None       # exit 1
    assert exit_decision.killed_by(sig.SIGKILL).startswith("SIGKILL (signal 9): the kernel's OOM killer")
    assert exit_decision.killed_by(sig.SIGSEGV | 0x80) == "SIGSEGV (signal 11)"  # with a core dump
    assert exit_decision.killed_by(sig.SIGABRT) == "SIGABRT (signal 6)"


@pytest.mark.parametrize("under_way,waiters,held", [
    (True, 0, True),    # the driver is still finding the LSN (sync-safekeepers after the stop)
    (False, 2, True),   # answered, two calls still sending it
    (False, 0, False),  # answered and sent: the tree goes, no linger
])
def test_hold_for_terminate(under_way, waiters, held):
    assert hold_for_terminate(under_way, waiters) is held


def test_live_waiters_count_only_live_processes():
    """A killed api worker's calls hold nothing up; garbage in the map counts as nobody."""
    alive = {10, 30}.__contains__
    assert live_waiters({"10": 2, "20": 5, "30": 1}, alive) == 3
    assert live_waiters({"x": 1, "10": "two"}, alive) == 0
    assert live_waiters(None, alive) == 0 and live_waiters([1], alive) == 0


def test_process_alive_reads_proc():
    """exitwatch's liveness check for the waiting calls' pids (no process started here)."""
    import os
    from compute.tree.exitwatch import process_alive
    assert process_alive(os.getpid()) is True
    assert process_alive(2 ** 22 + 1) is False  # above the kernel's pid_max: never a process
