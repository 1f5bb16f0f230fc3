"""The API worker's fast path (compute/api/fastpath.py, compute/api/worker.py): GET /status,
/healthz, /metrics.json and /info answered on the poller thread. Real gunicorn on loopback,
raw sockets.

This file: the head grammar and the worker's accept loop in-process; real gunicorn:
tests/integration/test_api_fastpath.py."""

from __future__ import annotations

import select
import selectors
import socket

import pytest

from compute.api.fastpath import inline_candidate
from tests.support.waiting import wait_for


@pytest.mark.parametrize("head,expected", [
    (b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (b"GET /healthz HTTP/1.1\r\n\r\n", True),
    (b"GET /metrics.json?x=1 HTTP/1.0\r\nHost: x\r\n\r\n", True),
    (b"GET /info HTTP/1.1\r\nHost: x\r\n\r\nPOST /configure HTTP/1.1\r\n", True),  # the first one counts
    (b"GET /status HTTP/1.1\r\nHost: x\r\n", False),  # incomplete
    (b"HEAD /status HTTP/1.1\r\n\r\n", False),
    (b"POST /status HTTP/1.1\r\n\r\n", False),
    (b"GET /readyz HTTP/1.1\r\n\r\n", False),  # postgres
    (b"GET /metrics HTTP/1.1\r\n\r\n", False),  # supervisord
    (b"GET /configure HTTP/1.1\r\n\r\n", False),
    (b"GET /status/ HTTP/1.1\r\n\r\n", False),
    (b"GET /%73tatus HTTP/1.1\r\n\r\n", False),
    (b"GET /status HTTP/1.1\r\nContent-Length: 0\r\n\r\n", False),
    (b"GET /status HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", False),
    (b"GET /status HTTP/1.1\r\nExpect: 100-continue\r\n\r\n", False),
    (b"GET /status HTTP/1.1\r\nUpgrade: h2c\r\n\r\n", False),
    (b"GET /status HTTP/1.1\r\nContent-Length : 5\r\n\r\n", False),
    (b"GET /status HTTP/1.1\r\nNo colon here\r\n\r\n", False),
    (b"GET /status HTTP/1.1\nHost: x\r\n\r\n", False),  # bare LF
    (b"GET /status HTTP/2.0\r\n\r\n", False),
    (b"GET  /status HTTP/1.1\r\n\r\n", False),
    (b"\r\nGET /status HTTP/1.1\r\n\r\n", False),
])
def test_inline_candidates(head, expected):
    assert inline_candidate(head) is expected


@pytest.fixture
def bare_worker():
    """The worker class itself (not forked by gunicorn) around a real listening socket: its
    poller, method queue and pool set up as init_process() does, no loop running, so a test
    can call one of its callbacks and look at what it did."""
    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    from compute.api.worker import HeadFirstThreadWorker

    made = []

    def make(connections: int):
        cfg = Config()
        cfg.set("worker_connections", connections)
        cfg.set("threads", 2)
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        listener.setblocking(False)
        worker = HeadFirstThreadWorker(0, 0, [listener], None, 30, cfg, Logger(cfg))
        worker.tpool = worker.get_thread_pool()
        worker.poller = selectors.DefaultSelector()
        worker.method_queue.init()
        made.append((worker, listener))
        return worker, listener

    yield make
    for worker, listener in made:
        for conn in list(worker.pending_conns):
            conn.close()
        worker.tpool.shutdown(wait=False)
        worker.poller.close()
        worker.method_queue.close()
        worker.tmp.close()
        listener.close()


def test_one_readiness_of_the_listener_accepts_every_waiting_connection(bare_worker):
    """20 clients connected at once (no request yet): one call of the listener's callback
    takes all of them from the backlog and leaves each waiting for its head in the poller.
    gunicorn's own accept() takes one per turn of the loop, so under load (a turn answers every
    ready connection) the last of a burst of 64 waited 0.3-0.4 s for its first answer."""
    worker, listener = bare_worker(connections=256)
    clients = [socket.create_connection(listener.getsockname(), timeout=10) for _ in range(20)]
    try:
        worker.accept(listener)
        assert worker.nr_conns == 20
        assert len(worker.pending_conns) == 20  # each waits for its head in the poller
        assert len(worker.poller.get_map()) == 20  # the listener is not registered here (no loop)
    finally:
        for c in clients:
            c.close()


def test_accepting_a_burst_stops_at_the_connection_bound(bare_worker):
    """The worker's connection bound (COMPUTE_API_CONNECTIONS) still holds within one burst:
    beyond it connections stay in the kernel's backlog, and are taken once slots are free."""
    worker, listener = bare_worker(connections=8)
    clients = [socket.create_connection(listener.getsockname(), timeout=10) for _ in range(12)]
    try:
        worker.accept(listener)
        assert worker.nr_conns == 8
        worker.nr_conns = 4  # four connections ended
        worker.accept(listener)
        assert worker.nr_conns == 8 and len(worker.pending_conns) == 12
    finally:
        for c in clients:
            c.close()


def test_a_stopping_worker_accepts_nothing_more_and_keeps_fresh_connections(bare_worker):
    """Once the worker is told to stop (alive False, gunicorn's SIGTERM handler), what waits in
    the backlog is left to the next worker, and a connection it already accepted whose first
    request is not all there yet still waits for it (gunicorn's graceful loop answers it): it
    was closed without an answer, a cut request during `supervisorctl restart api`. An idle
    kept-alive connection is still closed."""
    worker, listener = bare_worker(connections=8)
    early = socket.create_connection(listener.getsockname(), timeout=10)
    try:
        early.sendall(b"GET /status HTTP/1.1\r\n")  # half a head
        wait_for(lambda: select.select([listener], [], [], 0)[0], 10, "the connection in the backlog")
        worker.accept(listener)
        assert worker.nr_conns == 1 and len(worker.pending_conns) == 1
        fresh = worker.pending_conns[0]
        worker.alive = False
        late = socket.create_connection(listener.getsockname(), timeout=10)
        try:
            worker.accept(listener)
            assert worker.nr_conns == 1  # left in the backlog
            worker.pending_conns.remove(fresh)
            worker._wait_readable(fresh)  # noqa: SLF001 - the poller's callback, called as it would
            assert list(worker.pending_conns) == [fresh] and worker.nr_conns == 1
            fresh.cs_fresh = False  # as after its first answer: now an idle kept-alive connection
            worker.pending_conns.remove(fresh)
            worker._wait_readable(fresh)  # noqa: SLF001
            assert not worker.pending_conns and worker.nr_conns == 0
        finally:
            late.close()
    finally:
        early.close()


def test_one_grammar_for_the_fast_path_and_the_early_responder():
    """compute-ctl's early responder answers exactly the heads plain_get() accepts with nothing
    behind them; the worker's fast path takes the same heads (what follows is its parser's)."""
    from compute.api.fastpath import MAX_HEAD, plain_get
    from compute.boot.early_responder import HOLD, classify
    head = b"GET /metrics.json?a=1 HTTP/1.0\r\nHost: x\r\n\r\n"
    assert plain_get(head) == (b"/metrics.json", b"HTTP/1.0", len(head), None)
    with_token = b"GET /status HTTP/1.1\r\nauthorization:  Bearer a.b.c \r\n\r\n"
    assert plain_get(with_token).authorization == b"Bearer a.b.c"  # the field's value, as gunicorn strips it
    assert plain_get(b"GET /status HTTP/1.1\r\nAuthorization:\r\n\r\n").authorization == b""
    assert classify(head) == b"/metrics.json" and inline_candidate(head)
    assert plain_get(head + b"GET /status HTTP/1.1\r\n\r\n").length == len(head)
    assert classify(head + b"x") == HOLD and inline_candidate(head + b"x")  # pipelined: the worker's parser
    for odd in (b"GET /status HTTP/1.1\r\nX-Forwarded-Proto: https\r\n\r\n",
                b"GET /status HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
                b"GET /status HTTP/1.1\r\nX: \x80\r\n\r\n",
                b"GET /status HTTP/1.1\r\nX-Big: " + b"x" * MAX_HEAD + b"\r\n\r\n"):
        assert plain_get(odd) is None and classify(odd) == HOLD and not inline_candidate(odd)
