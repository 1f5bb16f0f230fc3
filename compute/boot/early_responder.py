"""compute-ctl answers the plain read-only requests itself until the api serves.

The api (gunicorn, forked from compute-ctl's warm image) serves only once the start-up is over
(supervisord holds it back while the early driver runs it, at most ~1 s after its loop started:
compute/tree/supervisord.py), ~0.8 s after exec. The API socket is bound much
earlier (compute/api/listener.py), so compute-ctl starts this responder, a thread, right after
the bind and before any heavy import; it answers:

  plain GET /status, /healthz, /metrics.json, /info (the api's fast-path routes,
  compute/api/fastpath.py): the same body bytes the api gives for the same state
  (compute/api/bodies.py), with `Connection: close`. Before the state file exists, from what
  compute-ctl knows (status `init`, its start time, the spec's tenant and timeline once
  validated: what the state file is then created with); after, from the state file.
  Only what the api would give the same request: without a JWKS, what it gives anyone
  (compute/api/route_policy.py answerable_without_credentials); with one, /healthz to anyone
  and /status & co. to a request whose token the api's own decision admits
  (compute/api/access.py decide(), pure: the same JWKS file, compute id and rules). A request
  the decision refuses (no token, not verified, another compute's) is held, not answered: the
  api gives it its 400/401/403 and logs it. While compute-ctl does not know yet whether the
  compute has a JWKS (-c, -p before their spec is read), /healthz alone.

Everything else it neither answers nor reads: it looks at what arrived with MSG_PEEK and
keeps the connection ("held"): any other route or method, a body, bytes pipelined after the
head, an incomplete or oversized head, anything outside the strict grammar it shares with the
api's fast path (classify(), compute/api/fastpath.py plain_get). When an api worker starts it
takes the held connections over (compute/api/handover.py) and the client gets the api's real
answer, later. At MAX_HELD held connections the responder stops accepting:
the kernel's backlog queues, as it would with no responder at all.

Threads and processes. The thread runs in compute-ctl while it demotes itself (setuid applies
to every thread of the process: glibc's setxid broadcast) and while supervisord forks the
programs. A fork copies only the forking thread: the child must not inherit a lock or an SQLite
handle in use by this one (a child opening the state file then hangs). So the responder reads
the state file only while it holds `_state_lock`, and every os.fork first takes that lock and
closes the responder's connection (register_at_fork): no fork happens while the responder is
inside SQLite or has the file open; it opens it again on its next answer (kept open between
answers otherwise: opening it costs much more than a read). Its sockets are close-on-exec and
closed by supervisord in every child (only the API socket is kept, for the api). The thread is a daemon
and stop() is bounded: it never holds up compute-ctl's exit.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from compute.api import bodies
from compute.api.route_policy import answerable_without_credentials
from compute.api.fastpath import MAX_HEAD, PlainGet, plain_get
from compute.api.handover import MAX_HELD, listen, read_hello, send_held
from compute.base.trace import mark

if TYPE_CHECKING:
    from compute.shared.state import StateStore

log = logging.getLogger("compute.boot.cli")

STATE_BUSY_TIMEOUT_MS = 50  # never stall a fork (it waits for _state_lock) on a busy state file

# classify(): wait for more bytes, or leave the connection to the api.
MORE = "more"
HOLD = "hold"


def classify(data: bytes) -> bytes | str:
    """What to do with the bytes a new connection has sent so far (peeked, unread): the route
    to answer (exactly one complete plain GET of a fast-path route in the api's own grammar,
    compute/api/fastpath.py plain_get, nothing after it), MORE (an incomplete head that fits
    MAX_HEAD) or HOLD (the api's: everything else)."""
    if data.find(b"\r\n\r\n") < 0:
        return MORE if len(data) <= MAX_HEAD else HOLD
    request = plain_get(data)
    if request is None or request.length != len(data):
        return HOLD  # not plain; or pipelined bytes or a body behind the head
    return request.route


def http_answer(body: str, version: str = "HTTP/1.1", now: float | None = None) -> bytes:
    """A complete `200 OK` answer with a JSON body, closing the connection; in the request's
    HTTP version, as gunicorn answers."""
    data = body.encode()
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
    return (f"{version} 200 OK\r\nDate: {date}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


# -- fork hygiene --------------------------------------------------------------------------------

_state_lock = threading.Lock()  # held by the responder while it reads the state file
_open_connections: list = []  # the responder's state-file connection, kept between answers


def _close_state_connections() -> None:
    """With _state_lock held: close what the responder keeps open (it reopens when it needs)."""
    while _open_connections:
        _open_connections.pop().close()


def _before_fork() -> None:
    _state_lock.acquire()
    _close_state_connections()


def _after_fork_in_child() -> None:
    _state_lock.release()  # taken by the forking thread (this one in the child) before fork


os.register_at_fork(before=_before_fork, after_in_parent=_state_lock.release,
                    after_in_child=_after_fork_in_child)


class _TokenRule:
    """What the api's decision takes from the settings (compute/api/auth.py Access), and the
    JwksFile it reads."""

    def __init__(self, jwks_path: str, compute_id: str | None, require_exp: bool):
        # Imported here, in the main thread (PyJWT, cryptography: with --jwks already there),
        # never by the responder's: a fork in the middle of a thread's import leaves the child
        # a held import lock.
        from compute.api.access import JwksFile, preload_verifier
        preload_verifier()
        self.jwks_path, self.compute_id, self.require_exp = jwks_path, compute_id, require_exp
        self.file = JwksFile(jwks_path)


class _Conn:
    __slots__ = ("sock", "held")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.held = False  # decided: the api's (else still waiting for a complete head)


class EarlyResponder:
    """The thread. compute-ctl's main thread tells it what it learns (known(), state_ready(),
    offer_handover()) and stops it on every way out (stop())."""

    def __init__(self, listener: socket.socket, *, started: float, cores: int | None = None,
                 jwks: bool | None = None):
        self.listener = listener
        self.jwks = jwks  # the compute has a JWKS; None: not known yet (only OPEN routes answered)
        self._tokens: _TokenRule | None = None  # with a JWKS: whose tokens the api admits (jwks_known)
        self.known_status: dict[str, Any] = {"status": "init", "error": None, "tenant": None, "timeline": None,
                                             "start_time": started, "last_active": started}
        self.info = bodies.encode(bodies.info_body(cores))
        self.healthz = bodies.encode(bodies.HEALTHZ)
        self.state_path: str | None = None
        self._store: StateStore | None = None  # used by the thread only, under _state_lock
        self.handover_path: str | None = None
        self.answered = 0
        self.handed_over: int | None = None  # how many, once done
        self._conns: dict[int, _Conn] = {}
        self._accepting = False
        self._handover_sock: socket.socket | None = None
        self._stopping = False
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()  # the pipe is closed by the thread, written by stop()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="early-responder", daemon=True)

    # -- the main thread's side ------------------------------------------------------------------
    def start(self) -> "EarlyResponder":
        self.listener.setblocking(False)  # workers share it once the api runs: never block in accept
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._set_accepting(True)
        self._thread.start()
        mark("compute-ctl: responder answering")
        return self

    def known(self, **fields: Any) -> None:
        """What /status says before the state file exists (tenant, timeline: the spec's)."""
        self.known_status = {**self.known_status, **fields}

    def jwks_known(self, jwks_path: str | None, compute_id: str | None = None, require_exp: bool = False) -> None:
        """The compute's JWKS (None: it has none), once its settings are built, with what the
        api's decision also takes from them (--jwt-require-exp, the compute id)."""
        self._tokens = _TokenRule(jwks_path, compute_id, require_exp) if jwks_path else None
        self.jwks = bool(jwks_path)
        self._wake()  # what it held for want of this may be answerable now

    def state_ready(self, path: str) -> None:
        """The state file exists: answer from it from now on."""
        self.state_path = path

    def offer_handover(self, path: str) -> None:
        """Listen for the api worker that takes the held connections (as the compute user, in
        the runtime dir: compute/api/handover.py)."""
        sock = listen(path)
        self.handover_path = path
        self._handover_sock = sock
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def stop(self, timeout: float = 1.0) -> None:
        """End the thread (bounded); connections still held are closed: nobody will answer them."""
        if not self._thread.is_alive():
            return
        self._stopping = True
        self._wake()
        self._thread.join(timeout)

    def _wake(self) -> None:
        """The thread looks again: at `_stopping`, and at what it holds (_reconsider)."""
        with self._wake_lock:
            if not self._closed:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:  # full: a wake-up is pending anyway
                    pass

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    events = self._epoll.poll()
                except InterruptedError:
                    continue
                for fd, ev in events:
                    if fd == self._wake_r:
                        self._reconsider()
                        continue
                    if fd == self.listener.fileno():
                        self._accept()
                    elif self._handover_sock is not None and fd == self._handover_sock.fileno():
                        if self._hand_over():
                            return
                    elif fd in self._conns:
                        self._on_event(self._conns[fd])
        except Exception:  # noqa: BLE001 - never take compute-ctl down; the api serves anyway
            log.exception("early responder failed: the api answers once it is up")
        finally:
            self._close_all()

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        if on:
            self._epoll.register(self.listener.fileno(), select.EPOLLIN)
        else:
            self._epoll.unregister(self.listener.fileno())
        self._accepting = on

    def _accept(self) -> None:
        while len(self._conns) < MAX_HELD:
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                break  # an api worker took it, or nothing left
            except OSError as e:  # out of descriptors, say: leave the rest to the backlog
                log.warning("early responder: accept failed (%s): the api answers the rest", e)
                self._set_accepting(False)
                return
            sock.setblocking(False)
            conn = self._conns[sock.fileno()] = _Conn(sock)
            # Edge-triggered: woken once per arrival of bytes, never again for bytes left unread.
            self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
            self._on_event(conn)
        self._set_accepting(len(self._conns) < MAX_HELD)

    def _reconsider(self) -> None:
        """Woken by the main thread: what was held for want of what it has learnt since (whether
        there is a JWKS, and its rule) is decided again; the rest stays held, still unread."""
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        if self._stopping:
            return
        for conn in list(self._conns.values()):
            if conn.held:
                conn.held = False
                self._on_event(conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        conn.sock.close()
        self._set_accepting(len(self._conns) < MAX_HELD)

    def _on_event(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD + 1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return  # nothing yet
        except OSError:
            self._drop(conn)  # reset by the client
            return
        if not data:
            self._drop(conn)  # the client closed without sending a byte: nothing to answer
            return
        if conn.held:
            return
        verdict = classify(data)
        if verdict == MORE:
            return
        request = plain_get(data) if verdict != HOLD else None
        if request is None or not (answerable_without_credentials(verdict.decode(), self.jwks)
                                   or self._token_admits(request, conn.sock)):
            conn.held = True  # the api's: unread, handed over when it starts
            return
        body = self._body(verdict)
        if body is None:
            conn.held = True  # the state file could not be read now: the api will answer
            return
        self.answered += 1
        if self.answered == 1:
            mark("compute-ctl: responder first answer")
        try:
            conn.sock.recv(len(data))  # exactly the head we looked at: nothing is left unread
            conn.sock.send(http_answer(body, request.version.decode()))
        except OSError:
            pass
        self._drop(conn)

    def _token_admits(self, request: PlainGet, sock: socket.socket) -> bool:
        """With a JWKS: whether the api's decision admits this request's token (decide(), with
        the api's JwksFile: re-read when the file changes). Everything else is the api's to
        refuse: no Authorization field; a JWKS file not there yet (pull mode: the driver writes
        the control plane's), left unread here so that no warning is logged for it; an error."""
        rule = self._tokens
        if rule is None or self.jwks is not True or request.authorization is None:
            return False
        try:
            if not os.path.exists(rule.jwks_path):
                return False
            from compute.api.access import decide  # imported by _TokenRule already
            decision = decide(request.route.decode(), sock.getpeername()[0], request.authorization.decode("latin-1"),
                              rule.file.current(), rule.compute_id, require_exp=rule.require_exp)
        except Exception:  # noqa: BLE001 - held: the api decides, and says why
            return False
        return decision.allowed

    def _body(self, route: bytes) -> str | None:
        if route == b"/healthz":
            return self.healthz
        if route == b"/info":
            return self.info
        path = self.state_path
        if path is None:
            known = self.known_status
            return bodies.encode(bodies.status_body(known) if route == b"/status" else bodies.metrics_body({}))
        # The state file, read under the lock every fork takes first (module docstring).
        with _state_lock:
            try:
                if not _open_connections:  # first answer, or a fork closed it: a fresh handle
                    # Imported here, not at the start: sqlite3 is not on compute-ctl's path to
                    # the driver's fork (the state file is created after it, issue 22).
                    from compute.shared.state import StateStore, bound_busy_wait
                    bound_busy_wait(STATE_BUSY_TIMEOUT_MS)  # this thread's connections
                    self._store = StateStore(path)
                    _open_connections.append(self._store.connection())
                if route == b"/status":
                    return bodies.encode(bodies.status_body(self._store.get_many(bodies.STATUS_KEYS)))
                return bodies.encode(bodies.metrics_body(self._store.get("metrics")))
            except Exception:  # noqa: BLE001 - busy, or unreadable: leave it to the api
                _close_state_connections()
                return None

    def _hand_over(self) -> bool:
        """An api worker asks for the held connections. True once they are its."""
        try:
            channel, _ = self._handover_sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return False
        with channel:
            if not read_hello(channel):
                log.warning("refused a connection to the hand-over socket: not the compute's own api")
                return False
            self._set_accepting(False)  # from now on the backlog waits for the worker
            held = [c.sock for c in self._conns.values()]
            try:
                send_held(channel, held)
            except OSError as e:  # the worker gave up: keep them for the next one
                log.warning("hand-over to the api failed (%s): keeping %d connection(s)", e, len(held))
                self._set_accepting(len(self._conns) < MAX_HELD)
                return False
        self.handed_over = len(held)
        mark(f"compute-ctl: responder handed over {len(held)}")
        return True

    def _close_all(self) -> None:
        with _state_lock:
            _close_state_connections()
        for conn in list(self._conns.values()):
            conn.sock.close()  # handed over (the worker has its own copy), or nobody will answer
        self._conns.clear()
        if self._handover_sock is not None:
            self._handover_sock.close()
            try:
                os.unlink(self.handover_path)
            except OSError:
                pass
        self._epoll.close()
        with self._wake_lock:
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
