"""libpq's connection functions through ctypes: parse a connection string and make a
connection (non-blocking, PQconnectStartParams/PQconnectPoll), without importing psycopg.

Why (issue 22): psycopg costs ~110-140 ms of CPU to import, `ctypes.CDLL("libpq.so.5")` ~3-5
ms. The basebackup uses a connection only to authenticate; on a plain one it then reads the
COPY stream from the socket itself (compute/storage/basebackup.py, _WireCopy). So the driver's
first storage step after the sync no longer waits for psycopg's import.

Debian's libpq (libpq5, installed with postgresql-15) is loaded by its soname, never through
ctypes.util.find_library (that runs ldconfig or gcc). load() answers None when it cannot be
loaded: the caller then uses psycopg. Nothing here logs: the values given to connect() (a
password among them) stay in this process' memory.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Iterable

from compute.postgres.waiting import SessionError, Waiter

SONAME = "libpq.so.5"

# PostgresPollingStatusType and ConnStatusType (libpq-fe.h)
_POLLING_FAILED, _POLLING_READING, _POLLING_WRITING, _POLLING_OK = 0, 1, 2, 3
_CONNECTION_OK = 0


class ConninfoError(ValueError):
    """libpq refused the connection string (its message is not kept: it may quote the string)."""


class _ConninfoOption(ctypes.Structure):
    """PQconninfoOption (libpq-fe.h)."""
    _fields_ = [("keyword", ctypes.c_char_p), ("envvar", ctypes.c_char_p), ("compiled", ctypes.c_char_p),
                ("val", ctypes.c_char_p), ("label", ctypes.c_char_p), ("dispchar", ctypes.c_char_p),
                ("dispsize", ctypes.c_int)]


class Libpq:
    """The loaded library, every function used declared with its C signature."""

    def __init__(self, cdll: ctypes.CDLL) -> None:
        c_void_p, c_char_p, c_int = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        options = ctypes.POINTER(_ConninfoOption)
        strings = ctypes.POINTER(c_char_p)

        def fn(name: str, restype: object, *argtypes: object) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
            f = getattr(cdll, name)
            f.restype = restype
            f.argtypes = argtypes
            return f

        self.PQconninfoParse = fn("PQconninfoParse", options, c_char_p, ctypes.POINTER(c_void_p))
        self.PQconninfoFree = fn("PQconninfoFree", None, options)
        self.PQfreemem = fn("PQfreemem", None, c_void_p)
        self.PQconnectStartParams = fn("PQconnectStartParams", c_void_p, strings, strings, c_int)
        self.PQconnectPoll = fn("PQconnectPoll", c_int, c_void_p)
        self.PQsocket = fn("PQsocket", c_int, c_void_p)
        self.PQstatus = fn("PQstatus", c_int, c_void_p)
        self.PQerrorMessage = fn("PQerrorMessage", c_char_p, c_void_p)
        self.PQsslInUse = fn("PQsslInUse", c_int, c_void_p)
        self.PQfinish = fn("PQfinish", None, c_void_p)

    def parse(self, connstr: str) -> dict[str, str]:
        """The parameters `connstr` sets, as libpq reads them (PQconninfoParse: no defaults, no
        environment). ConninfoError when libpq refuses it."""
        errmsg = ctypes.c_void_p()
        opts = self.PQconninfoParse(connstr.encode(), ctypes.byref(errmsg))
        if not opts:
            if errmsg.value:
                self.PQfreemem(errmsg)
            raise ConninfoError("invalid connection string")
        try:
            params: dict[str, str] = {}
            i = 0
            while (keyword := opts[i].keyword) is not None:
                value = opts[i].val
                if value is not None:
                    params[keyword.decode()] = value.decode("utf-8", "replace")
                i += 1
            return params
        finally:
            self.PQconninfoFree(opts)

    def connect(self, params: Iterable[tuple[str, str]], waiter: Waiter) -> Connection:
        """A connection made with PQconnectStartParams (expand_dbname=1: a `dbname` holding a
        connection string is expanded where it stands; later keywords override it, earlier ones
        are overridden) and PQconnectPoll, each wait bounded by `waiter` (Timeout, Stopped; a
        signal handler that raises cuts it short). SessionError (libpq's message) when it fails.
        PQfinish'd on every failure."""
        pairs = [(k.encode(), v.encode()) for k, v in params]
        keywords = (ctypes.c_char_p * (len(pairs) + 1))(*(k for k, _ in pairs), None)
        values = (ctypes.c_char_p * (len(pairs) + 1))(*(v for _, v in pairs), None)
        handle = self.PQconnectStartParams(keywords, values, 1)
        if not handle:
            raise SessionError("out of memory")
        conn = Connection(self, handle)
        try:
            status = _POLLING_WRITING  # libpq: before the first PQconnectPoll, wait as if WRITING
            if self.PQstatus(handle) == _CONNECTION_OK or self.PQsocket(handle) < 0:
                status = self.PQconnectPoll(handle)  # done already, or failed (no socket to wait on)
            while status not in (_POLLING_OK, _POLLING_FAILED):
                waiter.wait(self.PQsocket(handle), status == _POLLING_WRITING)
                status = self.PQconnectPoll(handle)
            if status == _POLLING_FAILED or self.PQstatus(handle) != _CONNECTION_OK:
                raise SessionError(conn.error_message() or "connection failed")
        except BaseException:
            conn.close()
            raise
        return conn


class Connection:
    """One PGconn* (as c_void_p), PQfinish'd by close() (or leaving a `with`)."""

    def __init__(self, lib: Libpq, handle: int) -> None:
        self._lib = lib
        self._handle: int | None = handle

    @property
    def socket(self) -> int:
        return self._lib.PQsocket(self._handle)

    @property
    def ssl_in_use(self) -> bool:
        return bool(self._lib.PQsslInUse(self._handle))

    def error_message(self) -> str:
        return (self._lib.PQerrorMessage(self._handle) or b"").decode("utf-8", "replace").strip()

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle:
            self._lib.PQfinish(handle)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@functools.cache
def load() -> Libpq | None:
    """libpq.so.5, loaded once; None when it cannot be (not installed, a symbol missing)."""
    try:
        return Libpq(ctypes.CDLL(SONAME))
    except (OSError, AttributeError):
        return None
