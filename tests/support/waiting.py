"""Waiting on conditions (never on fixed sleeps), shared by the tests and the benchmarks."""

from __future__ import annotations

import socket
import time
import urllib.request


def wait_for(pred, timeout: float = 20.0, what: str = "condition", period: float = 0.01):
    """pred()'s first truthy value, asked every `period` s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(period)


def status_answers(port: int, timeout: float = 1.0) -> bool:
    """Whether GET /status on 127.0.0.1:port answers 200 now."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def nothing_sent(s: socket.socket) -> bool:
    """No byte has come back on `s` (and it is not closed)."""
    timeout = s.gettimeout()
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)
        return False
    except BlockingIOError:
        return True
    finally:
        s.settimeout(timeout)
