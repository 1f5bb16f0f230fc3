"""The API worker's fast path (compute/api/fastpath.py, compute/api/worker.py): GET /status,
/healthz, /metrics.json and /info answered on the poller thread. Real gunicorn on loopback,
raw sockets.

This file: real gunicorn; the pure parts: tests/unit/test_api_fastpath.py."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import struct
import threading
import time

import pytest

from compute.shared.state import StateStore, state_path
from tests.support.api_helpers import (fake_driver, gunicorn, gunicorn_state, jwks_keys, launch_settings,
                                       make_state, minimal_spec, token_for, write_jwks)
from tests.support.pgcluster import free_port
from tests.support.waiting import wait_for

ON, OFF = {"COMPUTE_API_FAST_PATH": "1"}, {"COMPUTE_API_FAST_PATH": "0"}


def exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` (one or more requests, the last with Connection: close), read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def without_date(raw: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*", b"", raw)


def responses(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in a stream of Content-Length-framed responses."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        out.append((int(head.split(b" ")[1]), rest[:length]))
        raw = rest[length:]
    return out


REQUESTS = [
    b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /status?verbose=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /metrics.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /info HTTP/1.0\r\n\r\n",
    b"GET /info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer not-a-token\r\nConnection: close\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    b"HEAD /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 9000 + b"\r\nConnection: close\r\n\r\n",
    b"POST /configure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\n{}",
    b"POST /check_writability HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
]


@pytest.mark.parametrize("with_jwks", [False, True], ids=["open", "jwks"])
def test_inline_answers_are_byte_identical_to_the_pool(tmp_path, with_jwks):
    """Same state file, gunicorn with and without the fast path: every answer the same bytes
    (but the Date header), the routes with auth included."""
    rt = str(tmp_path)
    port = free_port()
    jwks = write_jwks(str(tmp_path / "jwks.json"), jwks_keys()[2]) if with_jwks else None
    make_state(rt, launch=launch_settings(rt, http_port=port, jwks_path=jwks), start_time=1_700_000_000.5,
               metrics={"basebackup_ms": 12, "config_ms": 3})
    answers = {}
    for mode, env in (("inline", ON), ("pool", OFF)):
        with gunicorn(rt, env={**env, "COMPUTE_API_WORKERS": "1"}):
            answers[mode] = [without_date(exchange(port, r)) for r in REQUESTS]
    for request, inline, pool in zip(REQUESTS, answers["inline"], answers["pool"]):
        assert inline == pool, request
    statuses = [a.split(b" ", 2)[1] for a in answers["inline"]]
    if with_jwks:  # HEAD: /status & co. need a token too (400 without a Bearer header, 401 a bad one)
        assert statuses == [b"400", b"400", b"200", b"400", b"400", b"401", b"400", b"404", b"405", b"405",
                            b"400", b"431", b"400", b"400"]
        return
    assert statuses == [b"200"] * 7 + [b"404", b"405", b"405", b"400", b"431"] + (
        [b"400", b"500"])  # no postgres behind /check_writability
    assert json.loads(responses(answers["inline"][0])[0][1])["start_time"] == "2023-11-14T22:13:20.500Z"


def test_pipelined_fast_and_slow_requests_are_answered_in_order(tmp_path):
    """One connection: inline routes, a /configure that blocks a pool thread for a second,
    an error, inline routes again: every answer, in the order asked."""
    rt = str(tmp_path)
    _, port = gunicorn_state(rt)
    body = json.dumps({"spec": minimal_spec()}).encode()
    pipeline = (b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /configure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body) +
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /metrics.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with gunicorn(rt, env={"COMPUTE_API_WORKERS": "1"}), fake_driver(rt, hold=1.0):
        got = responses(exchange(port, pipeline, timeout=30))
        # and again with the slow one first, in pieces
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /configure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\nGET /hea")
            time.sleep(0.2)
            s.sendall(b"lthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        again = responses(raw)
    assert [st for st, _ in got] == [200, 200, 200, 200, 404, 200]
    assert b'"tenant"' in got[0][1] and b'"num_cpus"' in got[1][1]
    assert json.loads(got[2][1])["status"] == "running"  # /configure's own answer
    assert got[3][1] == b'{"alive": true}' and b'"basebackup_ms"' in got[5][1]
    assert [st for st, _ in again] == [200, 200, 200]
    assert json.loads(again[0][1])["status"] == "running" and b'"tenant"' in again[1][1]
    assert again[2][1] == b'{"alive": true}'


def test_a_client_slow_to_read_its_answer_blocks_no_one(tmp_path):
    """A /status answer far larger than the socket buffers (an 8 MiB error text), to a client
    that does not read it: the poller sends what fits and goes on serving others; the client
    later gets the whole answer, and its connection is still usable."""
    rt = str(tmp_path)
    error = "e" * (8 * 1024 * 1024)
    _, port = gunicorn_state(rt, status="failed", error=error)
    with gunicorn(rt, env={"COMPUTE_API_WORKERS": "1", "COMPUTE_API_THREADS": "1"}):
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: no autotuning
        slow.settimeout(30)
        slow.connect(("127.0.0.1", port))
        slow.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: slow.recv(1, socket.MSG_PEEK), what="the first bytes of the answer")
        latencies = []
        for _ in range(20):  # others, inline and through the single pool thread
            for request in (b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
                            b"GET /openapi.yaml HTTP/1.1\r\nConnection: close\r\n\r\n"):
                t0 = time.monotonic()
                assert exchange(port, request, timeout=5).startswith(b"HTTP/1.1 200")
                latencies.append(time.monotonic() - t0)
        assert max(latencies) < 2.0, max(latencies)
        raw = b""
        while len(raw) < len(error) or not raw.endswith(b"}"):
            raw += slow.recv(1 << 20)
        (status, body), = responses(raw)
        assert status == 200 and json.loads(body)["error"] == error
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        rest = b""
        while chunk := slow.recv(65536):
            rest += chunk
        assert responses(rest) == [(200, b'{"alive": true}')]
        slow.close()


def _slow_body(port: int, release: threading.Event, results: list) -> None:
    """A POST whose body never comes until `release`: holds a pool thread (10 s at most)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /configure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 20\r\nConnection: close\r\n\r\n{")
            release.wait(8)
            s.sendall(b" " * 19)
            results.append(s.recv(65536).split(b" ")[1])
    except OSError as e:
        results.append(repr(e))


def _times_out(port: int, path: bytes) -> bool:
    """Whether a GET of `path` (a route served by the pool) goes unanswered for a second."""
    try:
        exchange(port, b"GET %s HTTP/1.1\r\nConnection: close\r\n\r\n" % path, timeout=1)
    except socket.timeout:
        return True
    return False


@pytest.mark.parametrize("fast_path", [True, False], ids=["inline", "pool-only"])
def test_status_while_every_pool_thread_is_blocked(tmp_path, fast_path):
    """Both threads of the only worker hold a request whose body does not come: /status & co
    are still answered inline; a pool route waits (and, without the fast path, /status too)."""
    rt = str(tmp_path)
    _, port = gunicorn_state(rt)
    release, results = threading.Event(), []
    env = {**(ON if fast_path else OFF), "COMPUTE_API_WORKERS": "1", "COMPUTE_API_THREADS": "2"}
    with gunicorn(rt, env=env):
        holders = [threading.Thread(target=_slow_body, args=(port, release, results)) for _ in range(2)]
        for t in holders:
            t.start()
        try:
            wait_for(lambda: _times_out(port, b"/openapi.yaml"), what="both pool threads to be taken")
            answered = []
            for path in (b"/status", b"/healthz", b"/metrics.json", b"/info"):
                try:
                    answered.append(exchange(port, b"GET %s HTTP/1.1\r\nConnection: close\r\n\r\n" % path,
                                             timeout=1).split(b" ")[1])
                except socket.timeout:
                    answered.append(b"timeout")
        finally:
            release.set()
            for t in holders:
                t.join()
    if fast_path:
        assert answered == [b"200"] * 4
    else:
        assert answered == [b"timeout"] * 4
    assert sorted(results) == [b"400", b"400"]  # {"spec"...} never came: a bad request, answered


def test_a_locked_state_file_sends_the_request_to_the_pool_not_a_500(tmp_path):
    """Another process holds the state file exclusively: the inline read gives up after its
    short busy timeout, the poller goes on (/healthz), and a pool thread answers the /status
    once the lock is gone."""
    rt = str(tmp_path)
    store, port = gunicorn_state(rt)
    store.close()  # the locker must be the only one with the file open
    with gunicorn(rt, env={"COMPUTE_API_WORKERS": "1"}):
        locker = sqlite3.connect(state_path(rt), isolation_level=None)
        locker.execute("PRAGMA locking_mode = EXCLUSIVE")
        locker.execute("BEGIN EXCLUSIVE")
        locker.execute("COMMIT")  # the lock stays: exclusive locking mode
        result = {}
        t = threading.Thread(target=lambda: result.update(
            raw=exchange(port, b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n", timeout=30)))
        t.start()
        try:
            time.sleep(0.5)  # the /status is now waiting in a pool thread
            assert t.is_alive()
            assert exchange(port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n", timeout=2) \
                .startswith(b"HTTP/1.1 200")
        finally:
            locker.close()
        t.join(30)
    (status, body), = responses(result["raw"])
    assert status == 200 and json.loads(body)["status"] == "running"


def _read_responses(s: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """Read exactly `count` Content-Length-framed responses from `s` (it may stay open)."""
    raw = b""
    while True:
        rest, complete = raw, 0
        while b"\r\n\r\n" in rest:
            head, _, rest = rest.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
            if len(rest) < length:
                break
            rest, complete = rest[length:], complete + 1
        if complete >= count:
            return responses(raw)
        chunk = s.recv(65536)
        if not chunk:
            return responses(raw)
        raw += chunk


@pytest.mark.parametrize("first", [b"/healthz", b"/openapi.yaml"], ids=["inline-first", "pool-first"])
def test_a_partial_head_pipelined_behind_a_request_holds_no_pool_thread(tmp_path, first):
    """A complete request and, in the same packet, the first bytes of the next head: the rest
    of that head is awaited in the poller like any head, not by a pool thread reading it with
    a blocking socket (REQUEST_DEADLINE, 10 s). Two such clients per pool of two threads used
    to hold the pool for those 10 s, over and over."""
    rt = str(tmp_path)
    _, port = gunicorn_state(rt)
    with gunicorn(rt, env={"COMPUTE_API_WORKERS": "1", "COMPUTE_API_THREADS": "2"}):
        holders = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
        try:
            for s in holders:
                s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\nGET /openapi.yaml HTTP/1.1\r\nHo" % first)
            for s in holders:  # the first request of each is answered, the second is pending
                assert [st for st, _ in _read_responses(s, 1)] == [200]
            # a pool route is answered while all three heads are still incomplete
            assert exchange(port, b"GET /openapi.yaml HTTP/1.1\r\nConnection: close\r\n\r\n",
                            timeout=5).startswith(b"HTTP/1.1 200")
            for s in holders:  # and the held bytes were kept, in order
                s.sendall(b"st: x\r\nConnection: close\r\n\r\n")
                (status, body), = _read_responses(s, 1)
                assert status == 200 and body.startswith(b"openapi:"), body[:40]
        finally:
            for s in holders:
                s.close()


def _attack(port: int, data: bytes) -> bytes:
    """Send `data`, half-close (no more requests), read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return without_date(out)


def _statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


_H = b"Host: x\r\n"
# (attack, the statuses of what must come back): framing tricks around the inline routes. The
# fast path decides only where a request runs: every answer must be the pool's, byte for byte.
ATTACKS = [
    (b"GET http://x/status HTTP/1.1\r\n" + _H + b"\r\n", [200]),  # absolute form: the pool
    (b"GET /%73tatus HTTP/1.1\r\n\r\n", [200]),
    (b"GET //status HTTP/1.1\r\n\r\n", [200]),
    (b"get /status HTTP/1.1\r\n\r\n", [400]),
    (b"GET /status\r\n\r\n", [400]),  # HTTP/0.9-style line
    (b"GET /status HTTP/1.0\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n", [200]),  # 1.0: closes after one
    (b"GET /status HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n", [200, 200]),
    (b"GET /status HTTP/1.1\r\nconnection: CLOSE\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n", [200]),
    (b"GET /status HTTP/1.1\r\nX: a\r\n Content-Length: 5\r\n\r\nhello", [400]),  # obs-fold
    (b"GET /status HTTP/1.1\r\ncontent-length: 5\r\nContent-Length: 5\r\n\r\nhello", [400]),
    (b"GET /status HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", [400]),
    (b"GET /status HTTP/1.1\r\nTRANSFER-ENCODING: chunked\r\n\r\n19\r\nGET /healthz HTTP/1.1\r\n\r\n"
     b"\r\n0\r\n\r\nGET /info HTTP/1.1\r\n\r\n", [200, 200]),  # the chunk is a body, not a request
    (b"GET /status HTTP/1.1\r\nHost: x\n\r\nGET /healthz HTTP/1.1\r\n\r\n", [400]),  # bare LF
    (b"GET /status HTTP/1.1\r\nHost: x\rContent-Length: 5\r\n\r\nhello", [400]),  # bare CR
    (b"GET /status HTTP/1.1\r\nContent-Length\x00: 5\r\n\r\nhelloGET /info HTTP/1.1\r\n\r\n", [400]),
    (b"GET /status HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", [431]),
    (b"GET /status HTTP/1.1\r\nX: " + b"a" * 8188 + b"\r\n\r\n", [431]),
    (b"GET /status HTTP/1.1\r\n\r\nGET /status HTTP/1.1\r\nContent-Length: 30\r\n\r\n"
     b"GET /healthz HTTP/1.1\r\n\r\nGET /info HTTP/1.1\r\n\r\n", [200, 200, 400]),  # a body hides one
    (b"GET /healthz HTTP/1.1\r\n\r\nPOST /status HTTP/1.1\r\nContent-Length: 23\r\n\r\n"
     b"GET /healthz HTTP/1.1\r\n\r\nGET /info HTTP/1.1\r\n\r\n", [200, 405, 200]),
    (b"GET /healthz HTTP/1.1\r\n\r\nGET /status HTTP/1.1\r\nContent-Length : 5\r\n\r\n"
     b"helloGET /info HTTP/1.1\r\n\r\n", [200, 400]),
    (b"GET /status HTTP/1.1\r\nExpect: 100-continue\r\n\r\n", [100, 200]),
    (b"GET /status HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n" * 20, [200] * 40),
]


def test_framing_attacks_get_the_pools_answers(tmp_path):
    """Smuggling and desync attempts around the inline routes, each in one packet: with and
    without the fast path the same bytes come back (but Date), and the expected requests (no
    more: none hidden in a body or behind a close) are answered."""
    rt = str(tmp_path)
    _, port = gunicorn_state(rt)
    answers = {}
    for mode, env in (("inline", ON), ("pool", OFF)):
        with gunicorn(rt, env={**env, "COMPUTE_API_WORKERS": "1"}):
            answers[mode] = [_attack(port, data) for data, _ in ATTACKS]
    for (data, expected), inline, pool in zip(ATTACKS, answers["inline"], answers["pool"]):
        assert inline == pool, data[:80]
        assert _statuses(inline) == expected, data[:80]


# With a JWKS every route here but /healthz needs a token (HEAD): without a Bearer header 400, with
# a bad one 401; a valid token on the first request never carries over to the next.
AUTH_SMUGGLING = [
    (b"GET /status HTTP/1.1\r\n\r\nGET /dbs_and_roles HTTP/1.1\r\n\r\n", [400, 400]),
    (b"GET /healthz HTTP/1.1\r\n\r\nPOST /terminate HTTP/1.1\r\nContent-Length: 0\r\n\r\n", [200, 400]),
    (b"GET /info HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /insights HTTP/1.1\r\n\r\n",
     [400, 400]),
    (b"GET /metrics.json HTTP/1.1\r\nAuthorization: Bearer a.b.c\r\n\r\n"
     b"POST /configure HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", [401, 400]),
    (b"GET http://x/database_schema?database=postgres HTTP/1.1\r\n\r\n", [400]),
    (b"GET /status/../dbs_and_roles HTTP/1.1\r\n\r\n", [404]),
    (b"GET /status?/dbs_and_roles HTTP/1.1\r\n\r\nPOST /promote HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
     [400, 400]),
    (b"GET /status HTTP/1.1\r\n\r\nPOST /check_writability HTTP/1.1\r\n\r\n", [400, 400]),
    (b"GET /status HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\nPOST /terminate HTTP/1.1\r\n"
     b"Content-Length: 0\r\n\r\n", [200, 400]),
]


def test_with_jwks_every_route_behind_an_inline_one_still_needs_a_token(tmp_path):
    """With --jwks, routes that need a token pipelined behind (or disguised as) inline ones,
    without a valid token: refused every time, and nothing stopped or configured."""
    rt = str(tmp_path)
    port = free_port()
    ed, _, doc = jwks_keys()
    jwks = write_jwks(str(tmp_path / "jwks.json"), doc)
    store = make_state(rt, launch=launch_settings(rt, http_port=port, jwks_path=jwks))
    store.close()
    token = token_for(ed, "compute-1").encode()
    with gunicorn(rt, env={**ON, "COMPUTE_API_WORKERS": "1"}):
        for data, expected in AUTH_SMUGGLING:
            assert _statuses(_attack(port, data.replace(b"{token}", token))) == expected, data[:80]
        status = json.loads(responses(exchange(port, b"GET /status HTTP/1.1\r\nAuthorization: Bearer " + token
                                               + b"\r\nConnection: close\r\n\r\n"))[0][1])
    assert status["status"] == "running"


def test_clients_resetting_mid_answer_leak_no_connection_slot(tmp_path):
    """More clients than the worker has connection slots each reset their connection (RST)
    while an inline answer (1 MiB) or a pipelined pool one is on its way: every slot is given
    back, so the worker still accepts and answers."""
    rt = str(tmp_path)
    _, port = gunicorn_state(rt, status="failed", error="e" * (1 << 20))
    env = {"COMPUTE_API_WORKERS": "1", "COMPUTE_API_THREADS": "2", "COMPUTE_API_CONNECTIONS": "8"}
    with gunicorn(rt, env=env):
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET /status HTTP/1.1\r\n\r\n" + (b"GET /openapi.yaml HTTP/1.1\r\n\r\n" if i % 2 else b""))
            if i % 4 < 2:
                s.recv(100)  # the answer is on its way
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST
        for path in (b"/healthz", b"/openapi.yaml", b"/healthz"):
            assert exchange(port, b"GET %s HTTP/1.1\r\nConnection: close\r\n\r\n" % path,
                            timeout=30).startswith(b"HTTP/1.1 200")


def test_pipelined_inline_requests_a_client_does_not_read_hold_no_pool_thread(tmp_path):
    """Clients that pipeline many /status (large answers here: a long error text) and do not
    read them: the answers after the first are given inline too, one at a time, so they wait
    in the poller rather than in a pool thread blocked on a send (IO_TIMEOUT, 10 s, each);
    the pool still answers; and each client later gets every answer, in order."""
    rt = str(tmp_path)
    error = "e" * (256 * 1024)
    _, port = gunicorn_state(rt, status="failed", error=error)
    with gunicorn(rt, env={"COMPUTE_API_WORKERS": "1", "COMPUTE_API_THREADS": "2"}):
        clients = []
        try:
            for _ in range(4):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.settimeout(30)
                s.connect(("127.0.0.1", port))
                s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n" * 10 + b"GET /healthz HTTP/1.1\r\n\r\n")
                clients.append(s)
            for s in clients:
                wait_for(lambda: s.recv(1, socket.MSG_PEEK), what="the first bytes of an answer")
            assert exchange(port, b"GET /openapi.yaml HTTP/1.1\r\nConnection: close\r\n\r\n",
                            timeout=5).startswith(b"HTTP/1.1 200")
            for s in clients:
                got = _read_responses(s, 11)
                assert [st for st, _ in got] == [200] * 11
                assert all(json.loads(body)["error"] == error for _, body in got[:10])
                assert got[10][1] == b'{"alive": true}'
        finally:
            for s in clients:
                s.close()


def _configure_answer(port: int, timeout: float) -> int | str:
    body = json.dumps({"spec": minimal_spec()}).encode()
    try:
        raw = exchange(port, b"POST /configure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body), timeout=timeout)
    except socket.timeout:
        return "timeout"
    return int(raw.split(b" ")[1])


@pytest.mark.parametrize("poller_sends", [True, False], ids=["poller-sends", "threads-send"])
def test_clients_not_reading_pool_answers_hold_no_pool_thread(tmp_path, poller_sends):
    """More clients than the worker has pool threads each pipeline requests that the pool
    answers (GET /status with a Content-Length: not inline) with a 200 KiB answer (a long
    error text), 8 MB in all each, and read nothing. A pool thread's answer goes to the poller
    with its connection and waits there for the client, so the threads stay free: /configure
    and another pool route keep being answered, and each client later gets its answers, in
    order. With COMPUTE_API_POLLER_SENDS=0 (threads send, as gunicorn does) the same clients
    hold both threads in blocked sends (10 s each): the attack is real."""
    rt = str(tmp_path)
    error = "e" * (200 * 1024)
    _, port = gunicorn_state(rt, status="running")
    env = {"COMPUTE_API_WORKERS": "1", "COMPUTE_API_THREADS": "2",
           "COMPUTE_API_POLLER_SENDS": "1" if poller_sends else "0"}
    request = b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    pipelined = 40
    with gunicorn(rt, env=env), fake_driver(rt, hold=0.05):
        clients = []
        try:
            store = StateStore(state_path(rt))
            store.set(error=error)  # the /status answers are large; the status stays running
            store.close()
            for _ in range(4):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
                s.settimeout(60)
                s.connect(("127.0.0.1", port))
                s.sendall(request * pipelined)
                clients.append(s)
            for s in clients:
                wait_for(lambda: s.recv(1, socket.MSG_PEEK), what="the first bytes of an answer")
            if not poller_sends:
                wait_for(lambda: _times_out(port, b"/openapi.yaml"), what="both pool threads blocked in a send")
                return
            answers = []
            for _ in range(10):  # a few seconds of the attack: the threads never get stuck
                answers.append(_configure_answer(port, timeout=5))
                answers.append(int(exchange(port, b"GET /openapi.yaml HTTP/1.1\r\nConnection: close\r\n\r\n",
                                            timeout=5).split(b" ")[1]))
            assert answers == [200] * 20
            got: dict = {}

            def read(i: int, s: socket.socket) -> None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                got[i] = _read_responses(s, 10)

            readers = [threading.Thread(target=read, args=(i, s)) for i, s in enumerate(clients)]
            for t in readers:
                t.start()
            for t in readers:
                t.join(60)
            for i in range(len(clients)):
                assert [st for st, _ in got[i][:10]] == [200] * 10, got[i][:3]
                # whole /status bodies, in order (a /configure clears the error: later ones are short)
                assert all(json.loads(body)["tenant"] for _, body in got[i][:10])
                assert json.loads(got[i][0][1])["error"] == error
        finally:
            for s in clients:
                s.close()


def test_a_pool_answer_beyond_the_kept_size_is_still_sent_whole(tmp_path):
    """A pool answer larger than POOL_ANSWER_MAX (a 2 MiB error text on /status, answered by
    the pool with the fast path off) goes out on the socket from the thread as before, to a
    client reading slowly: whole, in order, and the connection is still usable."""
    rt = str(tmp_path)
    error = "e" * (2 * 1024 * 1024)
    _, port = gunicorn_state(rt, status="failed", error=error)
    with gunicorn(rt, env={**OFF, "COMPUTE_API_WORKERS": "1", "COMPUTE_API_THREADS": "2"}):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\nGET /openapi.yaml HTTP/1.1\r\nHost: x\r\n\r\n"
                      b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            got = _read_responses(s, 3)
    assert [st for st, _ in got] == [200, 200, 200]
    assert json.loads(got[0][1])["error"] == error
    assert got[1][1].startswith(b"openapi:") and got[2][1] == b'{"alive": true}'
