"""gunicorn's gthread worker, except that a request head is read without holding a thread, and
that GET /status, /healthz, /metrics.json and /info are answered by the poller itself.

Fast path (compute/api/fastpath.py says which requests): when the poller has a complete head
of such a request, it runs gunicorn's own request handling and the falcon app right there, the
answer going to a buffer, then sends it with the socket non-blocking; what the client does not
take at once waits in the poller (IO_TIMEOUT at most) before the next request of that connection
is looked at. Everything else (and a request the poller could not answer: a busy state file, a
malformed head) goes to the pool, in order: a connection is in one place at a time. An inline
request pipelined behind an inline one is answered inline too, on a later turn of the loop. 16 threads
contending for one GIL made each /status wait in the pool's queue and for the GIL; here it
costs neither, and it is answered while every pool thread is blocked.

The stock worker hands a connection to a pool thread as soon as its first byte arrives, and the
thread then reads the rest of the request with a blocking socket and no deadline: a few dozen
clients sending their request a byte now and then occupy every thread and /status starves.
Here the poller (or, for connections the pool hands back, a pool thread) only takes what is
already there (one non-blocking recv), keeps it with the connection and waits in the poller
until the head is complete
(an empty line); only then does the stock code parse and serve the request, from the bytes
already read. The same goes for the start of a next head that came pipelined behind a request
(_hold_partial_head): it goes back to the poller, not to a thread that would wait for the rest. A head must be complete within HEAD_DEADLINE seconds of its first byte, and the
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

Accepting. The listener's callback takes every connection waiting in the backlog (gunicorn's
takes one per turn of the loop; under load a burst of new connections then waited a turn
each). Pool answers. A pool thread's answer (up to POOL_ANSWER_MAX) is kept and handed back
with the connection; the poller sends it as it sends an inline one, so a client that does not
read its answers holds no thread (COMPUTE_API_POLLER_SENDS=0: threads send, as gunicorn's do).

Closing. gunicorn 27 closes a connection "gracefully" on the worker's main thread: half-close,
then wait up to 2 s for the client to close its end. A client that never does stalls the
accept loop and the poller for 2 s per connection: twenty of them took /healthz down for 30 s.
Here the half-closed socket waits in the poller instead (LINGER seconds at most, draining what
arrives so that unread bytes never turn the close into a reset), and the main thread moves on.
"""

from __future__ import annotations

import errno
import gc
import inspect
import io
import os
import selectors
import socket
import sys
import time
from collections import deque
from functools import partial

from gunicorn import http
from gunicorn.workers import gthread

from compute.api import fastpath
from compute.api.handover import take_held
from compute.shared.state import bound_busy_wait, runtime_dir_from_env

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
ACCEPT_BATCH = 64  # connections taken from the backlog per readiness of the listener
POOL_ANSWER_MAX = 256 * 1024  # a pool thread's answer up to this size is sent by the poller


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


def fast_path_enabled(environ=os.environ) -> bool:
    """COMPUTE_API_FAST_PATH=0 sends every request to the pool (the A/B switch of bench.api)."""
    return environ.get("COMPUTE_API_FAST_PATH", "1") != "0"


class _CapturingSocket:
    """What gunicorn's response writes to when a request is answered inline: the bytes are
    kept, and the poller sends them without ever blocking."""

    def __init__(self):
        self.out = bytearray()

    def sendall(self, data) -> None:
        self.out += data

    def send(self, data) -> int:
        self.out += data
        return len(data)

    def recv(self, *_args) -> bytes:  # never reached: inline requests have no body
        raise BlockingIOError("an inline request does not read its socket")

    def shutdown(self, _how) -> None:
        pass

    def settimeout(self, _t) -> None:
        pass

    def close(self) -> None:
        pass


class _SpillingSocket:
    """What a pool thread's answer is written to: kept, for the poller to send without
    blocking (a client that does not read its answer then holds no thread); beyond
    POOL_ANSWER_MAX, what was kept and the rest go out on the socket itself, blocking
    (IO_TIMEOUT per send) as the stock worker does. A close before the answer was handed over
    is the poller's to do, after it sent what was kept."""

    def __init__(self, sock: socket.socket, max_bytes: int = POOL_ANSWER_MAX):
        self.sock, self.max_bytes = sock, max_bytes
        self.out = bytearray()
        self.spilled = False

    def sendall(self, data) -> None:
        if self.spilled:
            self.sock.sendall(data)
            return
        self.out += data
        if len(self.out) > self.max_bytes:
            self.spilled = True
            kept, self.out = bytes(self.out), bytearray()
            self.sock.sendall(kept)

    def send(self, data) -> int:
        self.sendall(data)
        return len(data)

    def take(self) -> bytes:
        kept, self.out = bytes(self.out), bytearray()
        return kept

    # gunicorn's close_graceful() after an app error mid-answer: shutdown, drain, close.
    def shutdown(self, how) -> None:
        if self.spilled:
            self.sock.shutdown(how)

    def recv(self, *args) -> bytes:
        return self.sock.recv(*args) if self.spilled else b""

    def settimeout(self, t) -> None:
        if self.spilled:
            self.sock.settimeout(t)

    def close(self) -> None:
        pass  # the connection's owner closes it

    def fileno(self) -> int:  # sendfile() would write around what was kept: send that first
        if not self.spilled:
            self.spilled = True
            self.sock.sendall(self.take())
        return self.sock.fileno()


class _InlineConn:
    """The three attributes of a connection that gunicorn's handle_request uses."""

    def __init__(self, sock, client, server):
        self.sock, self.client, self.server = sock, client, server


class HeadFirstThreadWorker(gthread.ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cs_lingering: deque = deque()  # (deadline, socket, [bytes drained]), oldest first
        self.cs_fast_path = fast_path_enabled()
        self.cs_writing: deque = deque()  # (deadline, conn): answers the client is slow to take
        # Pool threads' answers sent by the poller (needs our finish_request, gunicorn >= 27's).
        self.cs_poller_sends = _FINISH_REQUEST_OF_27 and os.environ.get("COMPUTE_API_POLLER_SENDS", "1") != "0"

    def init_process(self):
        # What the worker was forked with (the app, gunicorn's objects) lives as long as the
        # worker: out of the collector (no collection first: that would write to every shared
        # page), so that a full collection neither walks it nor copies its pages.
        gc.freeze()
        bound_busy_wait(fastpath.INLINE_BUSY_TIMEOUT_MS)  # this (the poller) thread's state file reads
        interval = os.environ.get("COMPUTE_API_SWITCH_INTERVAL")
        if interval:
            sys.setswitchinterval(float(interval))
        super().init_process()

    def run(self):
        """gthread's loop, after taking over the connections compute-ctl's early responder
        accepted and holds (compute/api/handover.py, at most TAKE_TIMEOUT): served as if this
        worker had accepted them, before its first accept. [] for all but the first worker."""
        server = self.sockets[0].getsockname() if self.sockets else None
        for sock, client in take_held(runtime_dir_from_env(required=False)):
            self.nr_conns += 1
            self._on_readable(gthread.TConn(self.cfg, sock, client, server))
        super().run()

    def set_accept_enabled(self, enabled):
        """As gthread's; and a stopping worker (SIGTERM, or its master gone) closes its copy of
        the listening socket at once. gthread only stops polling it, and keeps it open while the
        requests in flight finish (up to graceful_timeout), so a /configure in flight kept the
        API port listened on until the master's SIGKILL of the worker, and then for as long as
        the dying worker's last thread took to exit (after kill -9 of compute-ctl, the port
        outlived every process the tree's /proc showed alive). The connections waiting in the
        backlog are not lost: the socket is also compute-ctl's (and a new master's)."""
        super().set_accept_enabled(enabled)
        if not enabled and (not self.alive or self.ppid != os.getppid()):
            for listener in self.sockets:
                listener.close()  # idempotent: gthread closes them again at the end

    # -- the poller: read heads, answer inline routes, hand the rest to the pool -------------
    # A connection the poller keeps (waiting for bytes, or answered inline and kept alive) stays
    # registered with the selector from one request to the next (only its callback changes: no
    # system call); it is unregistered whenever it leaves the poller (pool, close, linger).
    def accept(self, listener):
        """Every connection waiting in the backlog (up to ACCEPT_BATCH and the worker's
        connection bound), not one per turn of the loop as gunicorn does: under load a turn
        serves every ready connection, so a burst of N new connections waited N turns for their
        first answer (docs/performance.md, "Figures behind the code")."""
        for _ in range(max(1, min(ACCEPT_BATCH, self.worker_connections - self.nr_conns))):
            if not self.alive:
                return  # stopping: what is still in the backlog is the next worker's
            try:
                client_sock, client_addr = listener.accept()
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                    raise
                return
            self.nr_conns += 1
            conn = gthread.TConn(self.cfg, client_sock, client_addr, listener.getsockname())
            conn.cs_fresh = True  # no request yet: see _wait_readable
            self._on_readable(conn)

    def on_client_socket_readable(self, conn, client):
        self.keepalived_conns.remove(conn)
        self._on_readable(conn)

    def on_pending_socket_readable(self, conn, client):
        self.pending_conns.remove(conn)
        conn.data_ready = True
        self._on_readable(conn)

    def _watch(self, conn, events, callback) -> None:
        try:
            self.poller.modify(conn.sock, events, callback)  # same events: no system call
        except KeyError:
            self.poller.register(conn.sock, events, callback)

    def _unwatch(self, conn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _to_pool(self, conn) -> None:
        conn.cs_fresh = False
        self._unwatch(conn)
        self.enqueue_req(conn)

    def _drop(self, conn, linger: bool = False) -> None:
        self._unwatch(conn)
        self.nr_conns -= 1
        if linger:
            self._linger(conn.sock)
        else:
            conn.close()

    def _on_readable(self, conn) -> None:
        """On the poller thread: take what the client sent (one non-blocking recv); a complete
        head is answered here if its route allows (fastpath.py), else by a pool thread."""
        if (not self.cs_fast_path or self.cfg.is_ssl or conn.is_http2
                or gthread.negotiation.prior_knowledge_allowed(self.cfg, conn.client)
                or (conn.parser is not None and conn.parser.unreader.buf.getbuffer().nbytes)):
            self._to_pool(conn)  # handle() in a pool thread, as without the fast path
            return
        try:
            verdict = self._read_head(conn)
        except Exception:  # noqa: BLE001 - never let one connection take the poller down
            self.log.exception("reading a request head")
            verdict = False
        if verdict is _DEFER:
            self._wait_readable(conn)
        elif verdict is False:
            self._drop(conn)
        elif getattr(conn, "cs_inline", False):
            self._serve_inline(conn)
        else:
            self._to_pool(conn)

    def _wait_readable(self, conn) -> None:
        """Back to the poller until the client sends more (as gunicorn's finish_request does for
        a deferred connection)."""
        if not self.alive and not getattr(conn, "cs_fresh", False):
            self._drop(conn)  # an idle kept-alive connection: a client retries on another
            return
        # A connection accepted just before the stop whose first request is not all here yet
        # still gets its answer: gunicorn's graceful loop serves it until graceful_timeout
        # (dropped, the client saw its new connection closed without an answer).
        _nonblocking(conn.sock)
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self._watch(conn, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))

    def _serve_inline(self, conn) -> None:
        """Answer the request whose head the parser holds, on this thread, through the same
        gunicorn request handling and falcon app as a pool thread would; then send the answer
        without blocking. Whatever cannot be done here goes to the pool, in order."""
        conn.cs_fresh = False
        req = None
        try:
            _nonblocking(conn.sock)  # should the parser ever want more bytes: no wait here
            req = next(conn.parser)  # from the bytes held: a complete head, no body
        except (StopIteration, http.errors.NoMoreData):
            self._drop(conn)
            return
        except Exception as e:  # noqa: BLE001 - a malformed request: the pool answers the error
            self._unwatch(conn)
            self._submit(conn, self._answer_error, conn, req, e)
            return
        capture = _CapturingSocket()
        try:
            with fastpath.inline():
                keepalive = gthread.ThreadWorker.handle_request(self, req, _InlineConn(capture, conn.client, conn.server))
        except fastpath.RetryInPool:
            self._unwatch(conn)
            self._submit(conn, self._handle_parsed, conn, req)
            return
        except StopIteration:  # the app failed after the head was sent: send what there is, close
            keepalive = False
        except Exception as e:  # noqa: BLE001 - nothing sent yet: the pool answers the error
            self._unwatch(conn)
            self._submit(conn, self._answer_error, conn, req, e)
            return
        if keepalive:
            conn.parser.mesg = None  # fully read (no body): nothing for the parser to drain
        self._send_inline(conn, memoryview(bytes(capture.out)), keepalive)

    def _send_inline(self, conn, data: memoryview, keepalive: bool) -> None:
        _nonblocking(conn.sock)  # a connection back from the pool is blocking
        try:
            sent = conn.sock.send(data) if data else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return
        if sent < len(data):  # the client is not reading: wait for it in the poller, bounded
            self.cs_writing.append((time.monotonic() + IO_TIMEOUT, conn))
            self._watch(conn, selectors.EVENT_WRITE, partial(self._on_writable, conn, data[sent:], keepalive))
            return
        self._after_inline(conn, keepalive)

    def _on_writable(self, conn, data: memoryview, keepalive: bool, _sock) -> None:
        entry = next((e for e in self.cs_writing if e[1] is conn), None)
        if entry is not None:
            self.cs_writing.remove(entry)
        self._send_inline(conn, data, keepalive)

    def _after_inline(self, conn, keepalive: bool) -> None:
        if not keepalive or not self.alive:
            self._drop(conn, linger=True)
        elif conn.parser.unreader.buf.getbuffer().nbytes:
            if _hold_partial_head(conn):  # the next head, incomplete: wait for the rest here
                self._wait_readable(conn)
            elif self.cs_fast_path and fastpath.inline_candidate(conn.parser.unreader.buf.getvalue()):
                # Inline too, on a later turn of the loop (others go first; no recursion): a
                # client pipelining requests it does not read must not block a pool thread.
                self._unwatch(conn)
                self.method_queue.defer(self._serve_inline, conn)
            else:
                self._to_pool(conn)  # a pipelined request already here: the pool, in order
        else:  # kept alive: back to waiting, as gunicorn's finish_request does
            conn.set_timeout()
            self.keepalived_conns.append(conn)
            self._watch(conn, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def _submit(self, conn, fn, *args) -> None:
        fs = self.tpool.submit(fn, *args)
        fs.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def _handle_parsed(self, conn, req):
        """In a pool thread: a request parsed by the poller (it could not be answered there)."""
        try:
            conn.sock.setblocking(True)
            return self._keepalive_after(conn, self.handle_request(req, conn))
        except (OSError, StopIteration, http.errors.NoMoreData):
            return False
        except Exception as e:  # noqa: BLE001 - as gunicorn's handle()
            self.handle_error(req, conn.sock, conn.client, e)
            return False

    def _answer_error(self, conn, req, exc):
        """In a pool thread: the error answer gunicorn's handle() gives (400 for a malformed
        request, 500 otherwise); the connection is then closed."""
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(IO_TIMEOUT)
            self.handle_error(req, conn.sock, conn.client, exc)
        except OSError:
            pass
        return False

    def _finish_request_lingering(self, conn, fs):
        """As gunicorn's, except that a connection to close lingers in the poller, never on
        this (the main) thread."""
        try:
            result = fs.result() if not fs.cancelled() else False
        except Exception:  # noqa: BLE001 - gunicorn's own: close at once
            result = None
        out = conn.__dict__.pop("cs_out", None)
        if out and result is not None and result is not _DEFER:
            # A pool thread's answer (handle_request): sent here without blocking, then the
            # connection is kept alive, or lingers and closes, as after an inline answer.
            self._send_inline(conn, memoryview(out), bool(result))
            return
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
        while self.cs_writing and self.cs_writing[0][0] <= now:  # never took its answer
            self._drop(self.cs_writing.popleft()[1])

    if _FINISH_REQUEST_OF_27:
        finish_request = _finish_request_lingering

    def handle(self, conn):
        if (self.cfg.is_ssl or conn.is_http2
                or gthread.negotiation.prior_knowledge_allowed(self.cfg, conn.client)):
            return super().handle(conn)
        parser = conn.parser
        if parser is not None and parser.unreader.buf.getbuffer().nbytes:
            if _hold_partial_head(conn):
                return _DEFER  # the rest of the next head is awaited in the poller
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
        if not self.cs_poller_sends or self.cfg.is_ssl:
            return super().handle_request(req, conn)
        # The answer is kept and handed to the poller with the connection (finish_request):
        # N clients that do not read their answers hold no pool thread (they did, IO_TIMEOUT
        # per send each), so /configure and the other pool routes are not kept waiting.
        out = _SpillingSocket(conn.sock)
        try:
            return super().handle_request(req, _InlineConn(out, conn.client, conn.server))
        finally:
            conn.cs_out = out.take()

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
            _nonblocking(conn.sock)
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
                conn.cs_inline = fastpath.inline_candidate(bytes(head))
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


def _hold_partial_head(conn) -> bool:
    """The parser holds the start of a pipelined next request but not its whole head: give
    those bytes back to the head collector (conn.cs_head, _read_head), so that the rest is
    awaited in the poller like any head, never by a pool thread reading with a blocking socket
    (a complete request followed by a byte of the next one held a thread for REQUEST_DEADLINE).
    True if so; a complete head (or more than MAX_BUFFERED_HEAD) stays for the parser."""
    held = conn.parser.unreader.buf.getvalue()
    if not held or len(held) > MAX_BUFFERED_HEAD or any(end in held for end in HEAD_ENDS):
        return False
    conn.parser.unreader.buf = io.BytesIO()
    conn.cs_head = bytearray(held)
    conn.cs_head_since = time.monotonic()  # HEAD_DEADLINE from now
    return True


def _nonblocking(sock: socket.socket) -> None:
    if sock.gettimeout() != 0.0:  # Python's own record: no system call when already so
        sock.setblocking(False)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
