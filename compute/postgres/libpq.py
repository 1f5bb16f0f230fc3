"""The non-blocking driver of psycopg's thin libpq wrapper (psycopg.pq), driven with poll(), for
the monitor's session (compute/programs/monitor.py), the LSN leases and a basebackup's COPY
stream over TLS (compute/storage/). A plain basebackup connects without psycopg:
compute/postgres/pqconnect.py.

Not a psycopg Connection: the monitor runs one query every tick for the life of the compute,
and psycopg's Python layers (connection generators, adapters, cursors, row makers) copied
much of the warm image into it (docs/performance.md, "Figures behind the code"). Non-blocking calls: a signal whose
handler raises (the monitor's SIGTERM) cuts a connect or a query short, a silent server fails
an attempt after a bounded wait, and a stop flag (the basebackup's extractor gave up) is seen
while waiting. Every query runs outside a transaction (libpq's default).

Imports psycopg.pq and psycopg.conninfo only: this module is in the monitor's footprint. How
long to wait, and the errors, are compute/postgres/waiting.py's (no psycopg there).
"""

from __future__ import annotations

from typing import Any

from psycopg import pq
from psycopg.conninfo import make_conninfo

# The waiting part has its own psycopg-free home (the basebackup's plain path needs it without
# psycopg); these names stay reachable here, as libpq.Waiter etc., for this driver's callers.
from compute.postgres.waiting import STOP_CHECK, SessionError, Stopped, Timeout, Waiter  # noqa: F401

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
