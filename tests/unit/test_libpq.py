"""The one non-blocking libpq driver (compute/postgres/libpq.py): its waits, on a socket pair. Its use:
the monitor's session (tests/integration/test_monitor.py, "the monitor's libpq session") and the
basebackup's COPY stream (tests/{unit,integration}/test_basebackup.py)."""

from __future__ import annotations

import socket
import threading

import pytest

from compute.postgres import libpq
from compute.programs import monitor
from compute.storage import basebackup


def test_a_ready_socket_returns_at_once_and_a_silent_one_times_out():
    a, b = socket.socketpair()
    with a, b:
        libpq.Waiter(5).wait(a.fileno(), True)  # writable
        with pytest.raises(libpq.Timeout, match="timed out"):
            libpq.Waiter(0.05).wait(a.fileno(), False)
        b.send(b"x")
        libpq.Waiter(5).wait(a.fileno(), False)
        assert isinstance(libpq.Timeout("x"), libpq.SessionError)  # the monitor's one error type


def test_a_budget_is_spent_once_silence_is_counted_per_wait():
    a, b = socket.socketpair()
    with a, b:
        budget = libpq.Waiter(0.2)
        budget.deadline -= 1  # as if the budget had been spent waiting already
        b.send(b"x")
        with pytest.raises(libpq.Timeout):
            budget.wait(a.fileno(), True)
        silence = libpq.Waiter(0.2, silence=True)
        silence.deadline -= 1  # no effect: every wait gets its own 0.2 s
        silence.wait(a.fileno(), True)


def test_the_stop_flag_ends_a_wait():
    a, b = socket.socketpair()
    stop = threading.Event()
    with a, b:
        timer = threading.Timer(0.05, stop.set)
        timer.start()
        with pytest.raises(libpq.Stopped):
            libpq.Waiter(60, silence=True, stop=stop).wait(a.fileno(), False)
        timer.join()


def test_the_monitor_and_the_basebackup_use_this_driver():
    assert monitor.LibpqSession is libpq.LibpqSession and monitor.SessionError is libpq.SessionError
    assert basebackup._Stopped is libpq.Stopped
