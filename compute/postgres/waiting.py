"""How the non-blocking libpq drivers wait for their socket (poll(): bounded, interruptible by
a signal handler that raises, and by a stop flag), and the errors they report. No psycopg:
the basebackup's plain path (compute/postgres/pqconnect.py) uses it before psycopg is imported
(issue 22); compute/postgres/libpq.py, psycopg's pq driven the same way, too.
"""

from __future__ import annotations

import select
import time
from typing import Any

STOP_CHECK = 0.2  # s: how often a wait with a stop flag looks at it


class SessionError(Exception):
    """What libpq reported: the connection failed or was lost, or the query failed."""


class Timeout(SessionError):
    """The socket stayed silent until the waiter's deadline. `overall`: the waiter's `ends`
    (the attempt's deadline, whatever the progress) was the one that passed."""

    def __init__(self, message: str, overall: bool = False) -> None:
        super().__init__(message)
        self.overall = overall


class Stopped(Exception):
    """The waiter's stop flag was set (its owner's own error is the one reported)."""


class Waiter:
    """How long the driver waits for the socket: `timeout` seconds in all from now (a connect's
    or a query's budget) or, with silence=True, `timeout` seconds of silence (every wait anew:
    progress resets it) and, with `ends` (a time.monotonic() value), never past it (an
    attempt's overall deadline). `stop`, anything with is_set(), is looked at every STOP_CHECK s."""

    def __init__(self, timeout: float, *, silence: bool = False, stop: Any = None,
                 ends: float | None = None) -> None:
        self.timeout = timeout
        self.silence = silence
        self.stop = stop
        self.ends = ends
        self.deadline = time.monotonic() + timeout

    def wait(self, fd: int, write: bool) -> None:
        """Until fd is ready for reading (or writing): Timeout at the deadline, Stopped once stop
        is set. A signal handler that raises interrupts it (poll: PEP 475)."""
        deadline = time.monotonic() + self.timeout if self.silence else self.deadline
        overall = self.ends is not None and self.ends <= deadline
        if overall:
            deadline = self.ends
        poller = select.poll()
        poller.register(fd, select.POLLOUT if write else select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout("timed out", overall=overall)
            if poller.poll(min(left, STOP_CHECK if self.stop is not None else left) * 1000):
                return
            if self.stop is not None and self.stop.is_set():
                raise Stopped()
