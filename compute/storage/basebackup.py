"""The pageserver's basebackup: one attempt streamed over the Postgres wire protocol (COPY OUT)
into a tar extractor, inflated on the way when asked.

The connection: for a connection string that asks for neither TLS nor GSS encryption (Neon's
case), libpq through ctypes (compute/postgres/pqconnect.py) makes it, and _WireCopy reads the
stream from its socket; psycopg is not imported (its ~110-140 ms would delay the driver's first
storage step: issue 22). Otherwise, or when libpq.so.5 cannot be loaded, psycopg makes it (and,
for TLS, libpq reads the stream: _libpq_copy_out). Same errors either way.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import re
import socket
import struct
import threading
import time
import zlib
from typing import Any, Callable, Iterator

from compute.postgres import pqconnect, waiting
from compute.storage.tarextract import ArchiveError, TarExtractor
from compute.storage.attempts import DEFAULT_DEADLINE, DEFAULT_TIMEOUT, StorageError, _one_line

log = logging.getLogger("compute.storage")

LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}\Z")
_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
_INFLATE_CHUNK = 1 << 20  # gzip: at most this much output per step
_PIPE_BYTES = 4 << 20  # received but not yet extracted (one chunk more if it is bigger)
_RECV_BYTES = 256 << 10  # the COPY stream's receive buffer: CopyData payloads leave it in pieces
MAX_MESSAGE = 1 << 20  # any other message is held whole to be read: a longer one is refused
COMPRESSIONS = (None, "gzip")  # --basebackup-compression (None: plain tar)


# ---------------------------------------------------------------- basebackup

def basebackup_query(tenant_id: str, timeline_id: str, lsn: str, compression: str | None = None,
                     replica: bool = False) -> str:
    """The pageserver command (pure); every part validated, nothing interpolated unchecked.
    `replica`: for a Static or Replica compute, as Neon asks (`--replica`, after `--gzip`)."""
    if not _ID_RE.fullmatch(tenant_id) or not _ID_RE.fullmatch(timeline_id):
        raise StorageError("tenant_id and timeline_id must be 32 lowercase hex digits")
    if not LSN_RE.fullmatch(lsn):
        raise StorageError(f"invalid LSN {lsn!r}")
    if compression not in COMPRESSIONS:
        raise StorageError(f"unknown basebackup compression {compression!r}")
    query = f"basebackup {tenant_id} {timeline_id}"
    hi, lo = lsn.split("/")
    if int(hi, 16) or int(lo, 16):
        query += f" {lsn}"  # 0/0 means "latest": the LSN is left out
    if compression == "gzip":
        query += " --gzip"
    if replica:
        query += " --replica"
    return query


def basebackup(pageserver_connstr: str, tenant_id: str, timeline_id: str, lsn: str, pgdata: str,
               auth_token: str | None, *, progress: Callable[[int], None] | None = None,
               timeout: float = DEFAULT_TIMEOUT, compression: str | None = None, replica: bool = False,
               deadline: float = DEFAULT_DEADLINE) -> int:
    """One attempt: stream `basebackup` (COPY OUT of one tar, gzipped with compression="gzip")
    from the pageserver into pgdata, extracting as it arrives; returns the bytes received.
    `timeout`: seconds without progress (connect, auth, between chunks) before giving up;
    `deadline`: seconds in all (a pageserver that trickles). Retries: with_retries()."""
    query = basebackup_query(tenant_id, timeline_id, lsn, compression, replica)
    ends = time.monotonic() + deadline
    lib = pqconnect.load()
    params = _parse_connstr(pageserver_connstr, lib)
    os.makedirs(pgdata, mode=0o700, exist_ok=True)
    t0 = time.monotonic()
    # libpq's connect_timeout bounds the whole connect (auth included): within the deadline too.
    connect_timeout = min(timeout, deadline)
    if lib is not None and _plain(params):
        connection = _plain_connection(lib, pageserver_connstr, params, auth_token, connect_timeout, timeout)
    else:
        connection = _psycopg_connection(pageserver_connstr, params, auth_token, connect_timeout, timeout)
    try:
        with TarExtractor(pgdata) as tx:
            sink: Callable[[Any], None] = tx.feed
            gunzip = _Gunzip(tx.feed) if compression == "gzip" else None
            if gunzip is not None:
                sink = gunzip.feed
            with connection as pgconn:
                total = _pipelined(pgconn, query, sink, timeout, progress, ends, deadline)
            if gunzip is not None:
                gunzip.finish()
            tx.finish()  # the stream has ended (read past the archive): the archive must have too
    except ArchiveError as e:
        raise StorageError(f"basebackup: {e}") from None
    except OSError as e:
        raise StorageError(f"basebackup: cannot extract into {pgdata}: {e}") from None
    elapsed = time.monotonic() - t0
    log.info("basebackup: %d bytes in %.2fs (%.1f MiB/s)", total, elapsed,
             total / (1 << 20) / elapsed if elapsed > 0 else 0.0)
    return total


def _connect_timed_out(timeout: float) -> StorageError:
    return StorageError(f"basebackup: no progress from the pageserver for {timeout:g} s (connecting)",
                        retryable=True)


@contextlib.contextmanager
def _plain_connection(lib: pqconnect.Libpq, connstr: str, params: dict[str, str], auth_token: str | None,
                      connect_timeout: float, timeout: float) -> Iterator[pqconnect.Connection]:
    """A plain connection made by libpq through ctypes, PQfinish'd on leaving. As psycopg's
    connect: a failure is retryable (no SQLSTATE), connect_timeout bounds the whole connect."""
    defaults, overrides = _pageserver_params(auth_token, connect_timeout)
    # The connection string as `dbname` (expanded by libpq): after our defaults, so that its own
    # values win, and before our overrides (application_name, the token as password).
    keywords = [*defaults.items(), ("dbname", connstr), *overrides.items()]
    # Non-blocking, libpq does not time its connect itself: connect_timeout read as psycopg does.
    waiter = waiting.Waiter(_connect_seconds(params.get("connect_timeout", defaults["connect_timeout"])))
    try:
        conn = lib.connect(keywords, waiter)
    except waiting.Timeout:
        raise _connect_timed_out(timeout) from None
    except waiting.SessionError as e:
        raise StorageError(f"basebackup: connection failed: {_one_line(str(e))}", retryable=True) from None
    with conn:
        yield conn


@contextlib.contextmanager
def _psycopg_connection(connstr: str, params: dict[str, str], auth_token: str | None, connect_timeout: float,
                        timeout: float) -> Iterator[Any]:
    """A connection made by psycopg (TLS or GSS asked for, or no libpq.so.5 to load): its
    PGconn, closed on leaving; psycopg's errors (also the stream's, on its TLS path) worded.
    `params`: what the connection string sets (_parse_connstr)."""
    import psycopg  # here only: the plain path never pays its import
    conninfo = _pageserver_conninfo(connstr, auth_token, connect_timeout, params)
    try:
        # autocommit: psycopg would otherwise send BEGIN, which the pageserver does not know.
        with psycopg.connect(conninfo, autocommit=True) as conn:
            try:
                yield conn.pgconn
            finally:
                conn.close()  # never let psycopg cancel/drain a possibly huge stream
    except psycopg.errors.ConnectionTimeout:
        raise _connect_timed_out(timeout) from None
    except psycopg.Error as e:
        raise StorageError(f"basebackup: {_pg_error_text(e)}", retryable=_retryable(e)) from None


_Stopped = waiting.Stopped  # the consumer gave up (its own error is the one reported)


class _Channel:
    """A FIFO bounded in bytes (messages can be of any size) that a stopped consumer unblocks."""

    def __init__(self, limit: int) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._bytes = 0
        self._limit = limit
        self._cond = threading.Condition()
        self.stopped = False

    def put(self, item: Any) -> None:
        size = len(item) if item is not None else 0
        with self._cond:
            while self._bytes and self._bytes + size > self._limit and not self.stopped:
                self._cond.wait()
            if self.stopped:
                raise _Stopped()
            self._items.append(item)
            self._bytes += size
            self._cond.notify_all()

    def get(self) -> Any:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            self._bytes -= len(item) if item is not None else 0
            self._cond.notify_all()
            return item

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._items.clear()
            self._cond.notify_all()

    def is_set(self) -> bool:  # the receiver's stop flag (threading.Event-like)
        return self.stopped


def _pipelined(pgconn: Any, query: str, sink: Callable[[Any], None], timeout: float,
               progress: Callable[[int], None] | None, ends: float | None = None,
               deadline: float = DEFAULT_DEADLINE) -> int:
    """_copy_out in a receiver thread, sink (inflate + extract) in this one, at most
    _PIPE_BYTES between them: receiving overlaps file creation and writes, as in
    `psql | tar -x` (both sides release the GIL in their syscalls)."""
    channel = _Channel(_PIPE_BYTES)
    outcome: dict[str, Any] = {}

    def receive() -> None:
        try:
            outcome["total"] = _copy_out(pgconn, query, channel.put, timeout, progress, channel, ends, deadline)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            outcome["error"] = e
        try:
            channel.put(None)
        except _Stopped:
            pass

    receiver = threading.Thread(target=receive, name="basebackup-receive", daemon=True)
    receiver.start()
    try:
        while (chunk := channel.get()) is not None:
            sink(chunk)
    finally:
        channel.stop()  # a failed sink: the receiver stops within waiting.STOP_CHECK s
        receiver.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["total"]


def _copy_out(pgconn: Any, query: str, sink: Callable[[Any], None], timeout: float,
              progress: Callable[[int], None] | None, stop: Any = None, ends: float | None = None,
              deadline: float = DEFAULT_DEADLINE) -> int:
    """Send the query (simple protocol, as the pageserver needs) and feed the COPY stream to
    sink: a server silent for `timeout` seconds, or not done by `ends` (time.monotonic();
    `deadline` seconds after the attempt began), fails the attempt. Reads to the end: an error
    after the archive raises.

    On a plain connection (the only kind we open unless the connection string asks for TLS,
    as Neon's compute_ctl) the stream is read from the socket here, not by libpq: libpq
    buffers one CopyData message whole, whatever length the server announces (up to 1 GiB),
    while here a CopyData payload leaves a fixed buffer in pieces as it arrives, and any other
    message is refused beyond MAX_MESSAGE bytes. Memory is bounded whatever the peer sends."""
    waiter = waiting.Waiter(timeout, silence=True, stop=stop, ends=ends)

    def late(where: str) -> StorageError:
        return StorageError(f"basebackup: not done within the attempt deadline of {deadline:g} s "
                            f"(--attempt-deadline; {where})", retryable=True)

    def silent(where: str, overall: bool = False) -> StorageError:
        if overall:
            return late(where)
        return StorageError(f"basebackup: no progress from the pageserver for {timeout:g} s ({where})",
                            retryable=True)
    if not pgconn.ssl_in_use:
        return _WireCopy(pgconn.socket, waiter, silent, late, ends).run(query, sink, progress)
    # TLS: only on psycopg's connection (pqconnect's are plain: sslmode=disable).
    return _libpq_copy_out(pgconn, query, sink, progress, waiter, silent, late, ends)


class _WireCopy:
    """The query and its COPY OUT answer on the connection's socket, read with the v3 framing
    (type byte, 4-byte length) into one fixed buffer. libpq made the connection and has
    consumed everything up to ReadyForQuery; it is closed, never used again, afterwards."""

    def __init__(self, fd: int, waiter: waiting.Waiter, silent: Callable[[str, bool], StorageError],
                 late: Callable[[str], StorageError], ends: float | None) -> None:
        self.sock = socket.socket(fileno=os.dup(fd))
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.waiter = waiter
        self.silent = silent
        self.late = late
        self.ends = ends
        self.buf = bytearray(_RECV_BYTES)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.total = 0

    def run(self, query: str, sink: Callable[[Any], None], progress: Callable[[int], None] | None) -> int:
        try:
            self._send(b"Q" + struct.pack("!I", len(query) + 5) + query.encode() + b"\0")
            phase = "before"  # -> "copy" (CopyOutResponse) -> "after" (CopyDone) -> "done" (CommandComplete)
            while True:
                kind, length = self._header()
                if kind == b"d" and phase == "copy":
                    self._copy_data(length, sink, progress)
                    continue
                body = self._message(kind, length)
                if kind == b"E":
                    raise _error_response(body)
                if kind in (b"N", b"S"):  # a notice, a parameter change: nothing to do
                    continue
                if phase == "before" and kind == b"H":
                    phase = "copy"
                elif phase == "before":
                    raise StorageError("basebackup: the pageserver did not start a COPY")
                elif phase == "copy" and kind == b"c":
                    phase = "after"
                elif phase == "after" and kind == b"C":
                    phase = "done"
                elif phase == "done" and kind == b"Z":
                    return self.total
                elif kind in (b"C", b"Z"):
                    raise StorageError("basebackup: no command status after the COPY")
                else:
                    raise StorageError(f"basebackup: unexpected message {kind!r} from the pageserver")
        finally:
            self.sock.close()

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                self._wait(True, "sending the query")
            except OSError as e:
                raise StorageError(f"basebackup: connection lost sending the query: {e.strerror or e}",
                                   retryable=True) from None

    def _wait(self, write: bool, where: str) -> None:
        try:
            self.waiter.wait(self.fd, write)
        except waiting.Timeout as e:
            raise self.silent(where, e.overall) from None

    def _fill(self) -> None:
        """At least one more byte after self.end (the buffer compacted first if it is full)."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            n = self.end - self.start
            self.buf[:n] = self.buf[self.start:self.end]
            self.start, self.end = 0, n
        while True:
            try:
                n = self.sock.recv_into(self.view[self.end:])
            except BlockingIOError:
                self._wait(False, f"after {self.total} bytes" if self.total else "waiting for a result")
                continue
            except OSError as e:
                raise StorageError(f"basebackup: connection lost after {self.total} bytes: "
                                   f"{e.strerror or e}", retryable=True) from None
            if not n:
                raise StorageError(f"basebackup: connection lost after {self.total} bytes: "
                                   "server closed the connection unexpectedly", retryable=True)
            self.end += n
            return

    def _header(self) -> tuple[bytes, int]:
        while self.end - self.start < 5:
            self._fill()
        kind = bytes(self.buf[self.start:self.start + 1])
        (length,) = struct.unpack_from("!I", self.buf, self.start + 1)
        if length < 4:
            raise StorageError(f"basebackup: invalid message length {length} from the pageserver")
        self.start += 5
        return kind, length - 4

    def _message(self, kind: bytes, length: int) -> bytes:
        """A whole message body (not CopyData): bounded by MAX_MESSAGE."""
        if length > MAX_MESSAGE:
            raise StorageError(f"basebackup: the pageserver sent a {kind.decode('latin-1')!r} message of "
                               f"{length} bytes (the limit is {MAX_MESSAGE})")
        while self.end - self.start < length:
            self._fill()
        body = bytes(self.buf[self.start:self.start + length])
        self.start += length
        return body

    def _copy_data(self, length: int, sink: Callable[[Any], None],
                   progress: Callable[[int], None] | None) -> None:
        """One CopyData payload to sink, in the pieces that arrive: never held whole."""
        while length:
            if self.start == self.end:
                self._fill()
            n = min(length, self.end - self.start)
            sink(bytes(self.buf[self.start:self.start + n]))
            self.start += n
            length -= n
            self.total += n
            now = time.monotonic()
            if self.ends is not None and now >= self.ends:  # progress, but too slow in all
                raise self.late(f"after {self.total} bytes")
            if progress is not None and now - self.last >= 1.0:
                self.last = now
                progress(self.total)

    last = 0.0


def _error_response(body: bytes) -> StorageError:
    """An ErrorResponse, as _result_error words libpq's."""
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields.setdefault(chr(part[0]), part[1:].decode("utf-8", "replace"))
    sqlstate = fields.get("C", "")
    severity = fields.get("S") or fields.get("V") or "ERROR"
    primary = fields.get("M", "")
    text = f"{severity}: {primary} (SQLSTATE {sqlstate})" if primary else "error from the pageserver"
    return StorageError(f"basebackup: {_one_line(text)}", retryable=_retryable_sqlstate(sqlstate))


def _libpq_copy_out(pgconn: Any, query: str, sink: Callable[[Any], None],
                    progress: Callable[[int], None] | None, waiter: waiting.Waiter,
                    silent: Callable[[str, bool], StorageError], late: Callable[[str], StorageError],
                    ends: float | None) -> int:
    """The COPY through libpq, for a TLS connection the connection string asked for: libpq
    holds each CopyData message whole (documented limit of the memory bound)."""
    from psycopg import pq
    from compute.postgres import libpq
    try:
        libpq.send(pgconn, query.encode(), None, waiter)
    except waiting.Timeout as e:
        raise silent("sending the query", e.overall) from None
    res = _next_result(pgconn, waiter, silent)
    if res is None or res.status != pq.ExecStatus.COPY_OUT:
        raise _result_error(res, "the pageserver did not start a COPY")
    total = 0
    last = time.monotonic()
    while True:
        nbytes, data = pgconn.get_copy_data(1)
        if nbytes > 0:
            total += nbytes
            sink(data)
            now = time.monotonic()
            if ends is not None and now >= ends:  # progress, but too slow in all
                raise late(f"after {total} bytes")
            if progress is not None and now - last >= 1.0:
                last = now
                progress(total)
        elif nbytes == 0:
            try:
                waiter.wait(pgconn.socket, False)
            except waiting.Timeout as e:
                raise silent(f"after {total} bytes", e.overall) from None
            pgconn.consume_input()
        elif nbytes == -1:
            break
        else:
            raise StorageError(f"basebackup: connection lost after {total} bytes: "
                               f"{_conn_message(pgconn)}", retryable=True)
    res = _next_result(pgconn, waiter, silent)
    if res is None or res.status != pq.ExecStatus.COMMAND_OK:
        raise _result_error(res, "no command status after the COPY")
    while _next_result(pgconn, waiter, silent) is not None:
        pass
    return total


def _next_result(pgconn: Any, waiter: waiting.Waiter, silent: Callable[[str, bool], StorageError]) -> Any:
    from compute.postgres import libpq
    try:
        return libpq.next_result(pgconn, waiter)
    except waiting.Timeout as e:
        raise silent("waiting for a result", e.overall) from None


def _conn_message(pgconn: Any) -> str:
    from compute.postgres import libpq
    return _one_line(libpq.error_message(pgconn, "")) or "connection closed"


def _result_error(res: Any, fallback: str) -> StorageError:
    from psycopg import pq
    if res is None or res.status not in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.NONFATAL_ERROR):
        return StorageError(f"basebackup: {fallback}")
    sqlstate = (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode("ascii", "replace")
    severity = (res.error_field(pq.DiagnosticField.SEVERITY) or b"ERROR").decode("utf-8", "replace")
    primary = (res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode("utf-8", "replace")
    text = f"{severity}: {primary} (SQLSTATE {sqlstate})" if primary else \
        res.error_message.decode("utf-8", "replace")
    return StorageError(f"basebackup: {_one_line(text)}", retryable=_retryable_sqlstate(sqlstate))


def _retryable_sqlstate(sqlstate: str | None) -> bool:
    """No SQLSTATE: the transport failed (refused, reset, closed, timed out). Otherwise the
    classes that mean "try again later": 08 connection exception, 53 insufficient resources,
    57 operator intervention (e.g. 57P01 shutdown, 57P03 cannot connect now), 58 system error.
    Anything else the server says (XX000, 28P01 bad password, ...) is an answer, not a hiccup."""
    return not sqlstate or sqlstate[:2] in ("08", "53", "57", "58")


def _retryable(e: Any) -> bool:
    return _retryable_sqlstate(e.diag.sqlstate if e.diag else None)


class _Gunzip:
    """Inflate a gzip stream as it arrives, never more than _INFLATE_CHUNK bytes per step (a
    small input may inflate to gigabytes); concatenated gzip members are one stream."""

    def __init__(self, sink: Callable[[Any], None]) -> None:
        self._sink = sink
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._started = False

    def feed(self, data: Any) -> None:
        if not self._started:
            self._started = bool(len(data))
        while True:
            try:
                out = self._d.decompress(data, _INFLATE_CHUNK)
            except zlib.error as e:
                raise ArchiveError(f"bad gzip stream: {e}") from None
            if out:
                self._sink(out)
            if self._d.eof:
                data = self._d.unused_data
                if not data:
                    return
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # the next gzip member
            else:
                data = self._d.unconsumed_tail
                if not data and len(out) < _INFLATE_CHUNK:
                    return

    def finish(self) -> None:
        if not self._started or not self._d.eof:
            raise ArchiveError("gzip stream truncated")


def _parse_connstr(connstr: str, lib: pqconnect.Libpq | None) -> dict[str, str]:
    """The parameters the pageserver's connection string sets, read by libpq (PQconninfoParse:
    through ctypes, or psycopg's when libpq.so.5 cannot be loaded)."""
    try:
        if lib is not None:
            return lib.parse(connstr)
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
        try:
            return conninfo_to_dict(connstr)
        except ProgrammingError:
            raise pqconnect.ConninfoError() from None
    except pqconnect.ConninfoError:
        raise StorageError("invalid pageserver connection string") from None  # may hold a secret


def _plain(params: dict[str, str]) -> bool:
    """The connection string asks for neither TLS nor GSS encryption (our default: disable)."""
    return (params.get("sslmode", "disable") == "disable" and params.get("gssencmode", "disable") == "disable"
            and params.get("requiressl", "0") == "0")


def _pageserver_params(auth_token: str | None, timeout: float) -> tuple[dict[str, str], dict[str, str]]:
    """What we add to the pageserver's connection string: (defaults its own values override,
    overrides of its values)."""
    # No TLS unless asked for, as Neon's compute_ctl (NoTls): with "prefer", a pageserver could
    # answer the SSLRequest and move the COPY onto libpq's path, which holds a message whole.
    defaults = {"sslmode": "disable", "gssencmode": "disable",
                "connect_timeout": str(max(2, int(math.ceil(timeout))))}  # libpq's minimum is 2 s
    overrides = {"application_name": "compute_ctl"}
    if auth_token:
        overrides["password"] = auth_token  # the storage token is the password; it overrides the connstr's
    return defaults, overrides


def _pageserver_conninfo(connstr: str, auth_token: str | None, timeout: float,
                         params: dict[str, str] | None = None) -> str:
    """The connection string psycopg connects with (the lease's, the basebackup's over TLS);
    `params`: what it sets, when the caller has read them already."""
    from psycopg.conninfo import make_conninfo
    if params is None:
        params = _parse_connstr(connstr, pqconnect.load())
    defaults, overrides = _pageserver_params(auth_token, timeout)
    extra = {k: v for k, v in defaults.items() if k not in params} | overrides
    return make_conninfo(connstr, **extra)


def _connect_seconds(value: str) -> float:
    """How long a connect may take for a connect_timeout, as psycopg reads it (libpq's rules:
    0 or less is no limit, for which psycopg waits 130 s; at least 2 s). A value libpq refuses
    fails the connect anyway."""
    try:
        seconds = int(float(value))
    except ValueError:
        return 130.0
    return 130.0 if seconds <= 0 else float(max(2, seconds))


def _pg_error_text(e: Any) -> str:
    diag = e.diag
    if diag.message_primary:
        return _one_line(f"{diag.severity or 'ERROR'}: {diag.message_primary} (SQLSTATE {diag.sqlstate})")
    return _one_line(str(e))
