"""gunicorn's gthread worker, except that a request head is read without holding a thread.

The stock worker hands a connection to a pool thread as soon as its first byte arrives, and the
thread then reads the rest of the request with a blocking socket and no deadline: a few dozen
clients sending their request a byte now and then occupy every thread and /status starves.
Here a pool thread only takes what is already there (one non-blocking recv), keeps it with the
connection and gives the connection back to the worker's poller until the head is complete
(an empty line); only then does the stock code parse and serve the request, from the bytes
already read. A head must be complete within HEAD_DEADLINE seconds of its first byte, and the
poller closes a connection that stays silent for `keepalive` seconds.

Bodies are read by a thread, and only when the app asks (after auth and mode checks; bounded at
1 MiB and at a few concurrent reads by the app, compute/api/errors.py). Once a head is complete,
the rest of that request (its body, read by the app) must arrive within REQUEST_DEADLINE
seconds, and every socket operation of the thread (a response the client does not read
included) within IO_TIMEOUT; a body the app left unread is never drained for long
(DRAIN_DEADLINE): the connection is closed instead of being kept alive. TLS and HTTP/2
connections take the stock path. Used by compute/api/gunicorn_conf.py when the installed
gunicorn has the hooks it relies on (gunicorn >= 23's deferral of connections to the poller),
else plain gthread.

Closing. gunicorn 27 closes a connection "gracefully" on the worker's main thread: half-close,
then wait up to 2 s for the client to close its end. A client that never does stalls the
accept loop and the poller for 2 s per connection: twenty of them took /healthz down for 30 s.
Here the half-closed socket waits in the poller instead (LINGER seconds at most, draining what
arrives so that unread bytes never turn the close into a reset), and the main thread moves on.
"""

from __future__ import annotations

import inspect
import selectors
import socket
import time
from collections import deque

from gunicorn.workers import gthread

_DEFER = gthread._DEFER  # noqa: SLF001 - AttributeError on a gunicorn without deferral: not used then

# The end of a head: "\r\n\r\n", or with bare LFs (which gunicorn's parser then rejects
# with a 400: it must get to see them).
HEAD_ENDS = (b"\n\r\n", b"\n\n")
HEAD_DEADLINE = 10.0
MAX_BUFFERED_HEAD = 64 * 1024  # beyond that, let gunicorn's own limits reject the request
RECV_SIZE = 65536
REQUEST_DEADLINE = 10.0  # head complete -> body read by the app
IO_TIMEOUT = 10.0  # any one blocking send or receive of a pool thread
DRAIN_DEADLINE = 0.1  # an unread body already in flight may be skipped; else close
DRAIN_MAX_BYTES = 64 * 1024
LINGER = 2.0  # a closed connection's socket waits this long (in the poller) for the client's FIN
LINGER_MAX_BYTES = 64 * 1024


class DeadlineSocket:
    """The parser's view of a client socket: every recv ends by `deadline` (socket.timeout),
    however slowly the bytes come. Everything else is the socket's own."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self.deadline = deadline

    def recv(self, size: int, *flags) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("request not received within its deadline")
        before = self._sock.gettimeout()
        self._sock.settimeout(remaining if before is None else min(before, remaining))
        try:
            return self._sock.recv(size, *flags)
        finally:
            self._sock.settimeout(before)

    def __getattr__(self, name):
        return getattr(self._sock, name)


# gunicorn >= 27 calls finish_request(conn, fs) on the main thread and closes there; older ones
# differ, and then keep their own.
_FINISH_REQUEST_OF_27 = (list(inspect.signature(gthread.ThreadWorker.finish_request).parameters)[1:]
                         == ["conn", "fs"])


class HeadFirstThreadWorker(gthread.ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cs_lingering: deque = deque()  # (deadline, socket, [bytes drained]), oldest first

    def _finish_request_lingering(self, conn, fs):
        """As gunicorn's, except that a connection to close lingers in the poller, never on
        this (the main) thread."""
        try:
            result = fs.result() if not fs.cancelled() else False
        except Exception:  # noqa: BLE001 - gunicorn's own: close at once
            result = None
        if result is _DEFER or result:
            return super().finish_request(conn, fs)
        self.nr_conns -= 1
        if result is None:
            conn.close()
        else:
            self._linger(conn.sock)

    def _linger(self, sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)  # our FIN: the answer is complete
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, self._on_lingering_readable)
        except (OSError, ValueError, KeyError):
            _close(sock)
            return
        self.cs_lingering.append((time.monotonic() + LINGER, sock, [0]))

    def _on_lingering_readable(self, sock: socket.socket) -> None:
        entry = next((e for e in self.cs_lingering if e[1] is sock), None)
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if entry is not None:
            entry[2][0] += len(data)
        if not data or (entry is not None and entry[2][0] > LINGER_MAX_BYTES):
            self._end_linger(sock)
            if entry is not None:
                self.cs_lingering.remove(entry)

    def _end_linger(self, sock: socket.socket) -> None:
        try:
            self.poller.unregister(sock)
        except (OSError, ValueError, KeyError):
            pass
        _close(sock)

    def murder_pending(self):
        """Also close lingering sockets whose time is up (called on every turn of the loop)."""
        super().murder_pending()
        now = time.monotonic()
        while self.cs_lingering and self.cs_lingering[0][0] <= now:
            self._end_linger(self.cs_lingering.popleft()[1])

    if _FINISH_REQUEST_OF_27:
        finish_request = _finish_request_lingering

    def handle(self, conn):
        if (self.cfg.is_ssl or conn.is_http2
                or gthread.negotiation.prior_knowledge_allowed(self.cfg, conn.client)):
            return super().handle(conn)
        parser = conn.parser
        if parser is not None and parser.unreader.buf.getbuffer().nbytes:
            if isinstance(getattr(parser.unreader, "sock", None), DeadlineSocket):
                parser.unreader.sock.deadline = time.monotonic() + REQUEST_DEADLINE
            return super().handle(conn)  # pipelined bytes already held: the stock path
        verdict = self._read_head(conn)
        if verdict is True:
            return super().handle(conn)
        return verdict

    def handle_request(self, req, conn):
        # Blocking from here on, but never without a bound: the parser reads through a
        # DeadlineSocket, and sends (a client that does not read its answer) time out.
        conn.sock.settimeout(IO_TIMEOUT)
        return super().handle_request(req, conn)

    def _keepalive_after(self, conn, keepalive):
        """Keep a connection alive only if what is left of its body is already here: a client
        that announced a body and does not send it must not hold a thread (gunicorn's own
        drain waits up to 5 s)."""
        if not keepalive:
            return False
        return bool(conn.parser.finish_body(deadline=time.monotonic() + DRAIN_DEADLINE,
                                            max_bytes=DRAIN_MAX_BYTES))

    @staticmethod
    def _read_head(conn):
        """True: the head is complete and handed to the parser. _DEFER: wait in the poller for
        more. False: close the connection."""
        head = getattr(conn, "cs_head", None)
        if head is None:
            head = conn.cs_head = bytearray()
            conn.cs_head_since = None
        try:
            conn.sock.setblocking(False)
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            return False
        if data == b"":
            return False  # the client went away
        if data:
            if not head:
                conn.cs_head_since = time.monotonic()
            start = max(0, len(head) - 2)
            head += data
            if any(head.find(end, start) >= 0 for end in HEAD_ENDS) or len(head) > MAX_BUFFERED_HEAD:
                conn.init()  # blocking socket and parser, as the stock path makes them
                unreader = conn.parser.unreader
                if hasattr(unreader, "sock"):  # the rest of this request within REQUEST_DEADLINE
                    unreader.sock = DeadlineSocket(conn.sock, time.monotonic() + REQUEST_DEADLINE)
                unreader.unread(bytes(head))
                head.clear()
                conn.cs_head_since = None
                return True
        if conn.cs_head_since is not None and time.monotonic() - conn.cs_head_since > HEAD_DEADLINE:
            return False
        return _DEFER


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
