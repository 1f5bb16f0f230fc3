"""A connection factory for reconciliation: one connection per database, reused.

`Connections(connstr)` is callable: `conns(dbname)` returns an autocommit connection to that
database, opened on first use and kept. The maintenance database (the connstr's own) stays open;
others are kept in a small LRU (a spec may name more databases than max_connections allows).
The executor calls `discard(dbname)` before dropping or renaming a database, and
`open_extra(dbname)` for statements it runs concurrently; `snapshot()` uses `map()` to read
per-database facts from several databases at once (connection set-up dominates that read).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from compute.postgres.sessions import local_sslmode, session_options
from compute.model.launch import default

APPLICATION_NAME = "compute_ctl:apply_spec"
# A statement of ours that waits this long for a lock, or runs this long, fails the apply with a
# clear error instead of hanging it (the lock_timeout and statement_timeout settings).
DEFAULT_LOCK_TIMEOUT = default("lock_timeout")
DEFAULT_STATEMENT_TIMEOUT = default("statement_timeout")
T = TypeVar("T")


class Connections:
    def __init__(self, connstr: str, *, max_open: int = 8, connect_timeout: int = 10,
                 lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
                 statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT):
        self.connstr = connstr
        self.max_open = max(1, max_open)
        self.lock_timeout = lock_timeout
        self.statement_timeout = statement_timeout
        self._extra: dict[str, object] = {}
        params = conninfo_to_dict(connstr)
        # Pinned search_path and role, bounded waits (compute/postgres/sessions.py), after the connstr's
        # own options so that they win.
        ours = session_options(lock_timeout_ms=_ms(lock_timeout), statement_timeout_ms=_ms(statement_timeout))
        self._extra["options"] = f"{params.get('options', '')} {ours}".strip()
        if "connect_timeout" not in params:
            self._extra["connect_timeout"] = connect_timeout
        if "application_name" not in params:
            self._extra["application_name"] = APPLICATION_NAME
        # no TLS to our own local server unless the connstr asks (compute.postgres.sessions.local_sslmode)
        sslmode = local_sslmode(params).get("sslmode")
        if sslmode and "sslmode" not in params:
            self._extra["sslmode"] = sslmode
        self._maint: psycopg.Connection | None = None
        self._others: OrderedDict[str, psycopg.Connection] = OrderedDict()
        self._lock = threading.Lock()
        self.opened = 0  # connections opened so far (for tests and benchmarks)

    # -- factory protocol -------------------------------------------------------------

    @property
    def maintenance(self) -> psycopg.Connection:
        if self._maint is None or self._maint.closed or self._maint.broken:
            self._maint = self._connect(None)
        return self._maint

    @property
    def maintenance_db(self) -> str:
        return self.maintenance.info.dbname

    def __call__(self, dbname: str) -> psycopg.Connection:
        if dbname == self.maintenance_db:
            return self.maintenance
        conn = self._others.get(dbname)
        if conn is not None and not conn.closed and not conn.broken:
            self._others.move_to_end(dbname)
            return conn
        self.discard(dbname)
        with self._lock:
            evicted = []
            while len(self._others) >= self.max_open:
                evicted.append(self._others.popitem(last=False)[1])
        for old in evicted:
            old.close()
        conn = self._connect(dbname)
        with self._lock:
            self._others[dbname] = conn
        return conn

    def discard(self, dbname: str) -> None:
        with self._lock:
            conn = self._others.pop(dbname, None)
        if conn is not None:
            conn.close()

    def open_extra(self, dbname: str) -> psycopg.Connection:
        """A new, uncached connection (the caller closes it)."""
        return self._connect(dbname)

    def map(self, dbnames: Iterable[str], fn: Callable[[psycopg.Connection], T], *,
            workers: int = 8) -> dict[str, T]:
        """fn(connection to db) for each db, on up to `workers` threads; the connections are
        cached afterwards (within max_open)."""
        names = list(dict.fromkeys(dbnames))
        maint = self.maintenance_db
        if workers <= 1 or len(names) <= 1:
            return {name: fn(self(name)) for name in names}

        def one(name: str) -> T:
            if name == maint:
                return fn(self.maintenance)
            with self._lock:
                conn = self._others.pop(name, None)
            if conn is None or conn.closed or conn.broken:
                conn = self._connect(name)
            try:
                return fn(conn)
            finally:
                with self._lock:
                    self._others[name] = conn
                    evicted = []
                    while len(self._others) > self.max_open:
                        evicted.append(self._others.popitem(last=False)[1])
                for old in evicted:
                    old.close()

        with ThreadPoolExecutor(min(workers, len(names))) as pool:
            return dict(zip(names, pool.map(one, names)))

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            others = list(self._others.values())
            self._others.clear()
        for conn in others:
            conn.close()
        if self._maint is not None:
            self._maint.close()
            self._maint = None

    def __enter__(self) -> "Connections":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self, dbname: str | None) -> psycopg.Connection:
        kwargs = dict(self._extra)
        if dbname is not None:
            kwargs["dbname"] = dbname
        conn = psycopg.connect(make_conninfo(self.connstr, **kwargs), autocommit=True)
        with self._lock:
            self.opened += 1
        return conn


def _ms(seconds: float | None) -> int | None:
    """Seconds as a postgres timeout in ms (0: none); None: leave the server's setting."""
    return None if seconds is None else max(0, round(seconds * 1000))
