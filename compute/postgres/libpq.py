"""The one non-blocking libpq driver: psycopg's thin libpq wrapper (psycopg.pq) driven with
poll(), for the monitor's session (compute/programs/monitor.py) and the basebackup's COPY stream
(compute/storage.py).

Not a psycopg Connection: the monitor runs one query every tick for the life of the compute,
and psycopg's Python layers (connection generators, adapters, cursors, row makers) copied
much of the warm image into it (docs/performance.md, "Figures behind the code"). Non-blocking calls: a signal whose
handler raises (the monitor's SIGTERM) cuts a connect or a query short, a silent server fails
an attempt after a bounded wait, and a stop flag (the basebackup's extractor gave up) is seen
while waiting. Every query runs outside a transaction (libpq's default).

Imports psycopg.pq and psycopg.conninfo only: this module is in the monitor's footprint.
"""

from __future__ import annotations

import select
import time
from typing import Any

from psycopg import pq
from psycopg.conninfo import make_conninfo

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


def error_message(pgconn: pq.abc.PGconn, fallback: str) -> str:
    return pgconn.error_message.decode("utf-8", "replace").strip() or fallback


def connect(params: dict[str, Any], waiter: Waiter) -> pq.abc.PGconn:
    """A connection made with libpq's non-blocking connect (PQconnectStart/Poll), left in
    non-blocking mode. SessionError (libpq's message) when it fails."""
    pgconn = pq.PGconn.connect_start(make_conninfo(**params).encode())
    try:
        while True:
            status = pgconn.connect_poll()
            if status == pq.PollingStatus.OK:
                break
            if status == pq.PollingStatus.FAILED:
                raise SessionError(error_message(pgconn, "connection failed"))
            waiter.wait(pgconn.socket, status == pq.PollingStatus.WRITING)
        pgconn.nonblocking = 1
    except BaseException:
        pgconn.finish()
        raise
    return pgconn


def send(pgconn: Any, query: bytes, params: list[bytes | None] | None, waiter: Waiter) -> None:
    """Send one query: the extended protocol with text parameters, or (params None) the simple
    protocol, as a pageserver needs; flushed whole."""
    if params is None:
        pgconn.send_query(query)
    else:
        pgconn.send_query_params(query, params)
    while pgconn.flush():
        waiter.wait(pgconn.socket, True)


def next_result(pgconn: Any, waiter: Waiter) -> Any:
    """The next result of the query sent (None: no more), waiting for its bytes."""
    while pgconn.is_busy():
        waiter.wait(pgconn.socket, False)
        pgconn.consume_input()
    return pgconn.get_result()


class LibpqSession:
    """One connection that answers single-row queries (the monitor's)."""

    def __init__(self, params: dict[str, Any], connect_timeout: float, query_timeout: float):
        self.query_timeout = query_timeout
        self.pgconn = connect(params, Waiter(connect_timeout))

    def query_row(self, query: bytes, params: list[bytes | None]) -> tuple[bytes | None, ...]:
        """The single row `query` returns, its values as libpq's text."""
        pgconn = self.pgconn
        waiter = Waiter(self.query_timeout)
        send(pgconn, query, params, waiter)
        result = None
        while (res := next_result(pgconn, waiter)) is not None:
            result = res if result is None or result.status == pq.ExecStatus.TUPLES_OK else result
        if result is None or pgconn.status != pq.ConnStatus.OK:
            raise SessionError(error_message(pgconn, "connection lost"))
        if result.status != pq.ExecStatus.TUPLES_OK or result.ntuples != 1:
            message = result.error_message.decode("utf-8", "replace").strip()
            raise SessionError(message or f"unexpected answer ({pq.ExecStatus(result.status).name}, {result.ntuples} rows)")
        self.last_result = result  # its column names, for a caller that checks them
        return tuple(result.get_value(0, i) for i in range(result.nfields))

    def close(self) -> None:
        self.pgconn.finish()
