"""Issue 9, section 2: the HTTP API as an untrusted network client sees it, on booted trees
(real gunicorn on loopback, raw sockets).

Tree 1, pull mode without a JWKS (the default address, 0.0.0.0: it warns): dozens of hostile
connections at once (headers that never end, bodies that trickle, bodies announced and never
sent on kept-alive connections, silent sockets) while /healthz and /status are probed: every
probe answers within a second, and every hostile connection is answered or closed in bounded
time. Tree 2, --jwks and --http-address 127.0.0.1: what needs a token (HEAD's rules: everything
but /metrics, /healthz, /readyz), tokens without exp, a body never read before auth, form posts
refused. Non-loopback peers: tests/integration/test_access_net.py and tests/e2e/test_e2e_access.py.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import jwt
import pytest

from tests.peers.control_plane import ControlPlanePeer
from tests.support.api_helpers import jwks_keys, write_jwks
from tests.support.pgcluster import PG_USER
from tests.support.tree import Compute, pull_compute

JSON = {"Content-Type": "application/json"}
PROBE_BOUND = 1.0  # seconds: what a liveness probe tolerates (the bound)
HEAD_DEADLINE, REQUEST_DEADLINE = 10.0, 10.0  # compute/api/worker.py
SLACK = 8.0  # a shared, noisy machine


@pytest.fixture(scope="module")
def open_compute():
    with ControlPlanePeer(None) as cp:
        c = pull_compute(cp)
        with c:
            c.wait_status("running")
            c.wait_serving()  # else the hostile connections meet the early responder's bounded hold
            yield c


@pytest.fixture(scope="module")
def guarded_compute():
    ed, rs, jwks = jwks_keys()
    with ControlPlanePeer(None) as cp:
        c = pull_compute(cp, "--http-address", "127.0.0.1")
        path = write_jwks(os.path.join(c.base, "jwks.json"), jwks)
        os.chmod(path, 0o644)
        PG_USER.chown(path)
        c.args += ["--jwks", path]
        c.token = jwt.encode({"compute_id": "compute-1"}, ed, algorithm="EdDSA")  # as neon_local: no exp
        with c:
            c.wait_status("running")
            c.keys = (ed, rs)
            yield c


def request(c: Compute, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 10) -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", c.http_port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


# -- probes while hostile connections are open ----------------------------------------------

# A kubelet's view: its own process (not a thread among the test's 85 hostile ones).
PROBE_SCRIPT = """
import http.client, json, sys, time
port, i = int(sys.argv[1]), 0
while True:
    path = ("/healthz", "/status")[i % 2]
    i += 1
    t0 = time.monotonic()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=float(sys.argv[2]))
        conn.request("GET", path)
        code = conn.getresponse().status
        conn.close()
    except OSError:
        code = None
    print(json.dumps([path, code, time.monotonic() - t0, t0]), flush=True)
    time.sleep(0.05)
"""


@dataclass
class Probes:
    """GET /healthz and /status in turn, each with a 1 s timeout, from another process."""
    port: int
    results: list[tuple[str, int | None, float, float]] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE_SCRIPT, str(self.port), str(PROBE_BOUND)],
                                     stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        for line in self.proc.stdout:
            self.results.append(tuple(json.loads(line)))

    def finish(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.thread.join(5)

    def slow_or_failed(self) -> list:
        return [r for r in self.results if r[1] != 200 or r[2] >= PROBE_BOUND]

    def longest_miss_streak(self) -> int:
        """Most consecutive probes that failed or took a second or more. A liveness probe fails
        a pod after several misses in a row (Kubernetes: 3); starvation would miss them all for
        seconds, while one lone miss is the noise of a shared 2-core machine."""
        worst = run = 0
        for _, code, latency, _ in self.results:
            run = run + 1 if code != 200 or latency >= PROBE_BOUND else 0
            worst = max(worst, run)
        return worst


@dataclass
class Hostile:
    """One hostile connection in its own thread: what it sent, what it got, when it ended."""
    kind: str
    port: int
    started: float = 0.0
    status: int | None = None
    answered_after: float | None = None
    closed_after: float | None = None
    error: str | None = None

    def run(self, stop: threading.Event) -> None:
        self.started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as s:
                getattr(self, "_" + self.kind)(s, stop)
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
            if self.closed_after is None:
                self.closed_after = time.monotonic() - self.started

    def _read_until_closed(self, s: socket.socket, stop: threading.Event) -> None:
        s.settimeout(0.2)
        out = b""
        while not stop.is_set():
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                self.closed_after = time.monotonic() - self.started
                stop.wait()  # a hostile client does not close its end: the server must not wait for it
                return
            if not out:
                self.answered_after = time.monotonic() - self.started
            out += chunk
            if self.status is None and out.startswith(b"HTTP/") and b" " in out:
                self.status = int(out.split(b" ", 2)[1])

    def _trickle(self, s: socket.socket, stop: threading.Event, head: bytes, drip: bytes, every: float) -> None:
        s.sendall(head)
        s.setblocking(False)
        while not stop.is_set():
            try:
                s.send(drip)
            except (BlockingIOError, OSError):
                break
            try:
                if s.recv(65536, socket.MSG_PEEK) is not None:
                    break  # the server answered or closed: stop dripping
            except BlockingIOError:
                pass
            stop.wait(every)
        s.setblocking(True)
        self._read_until_closed(s, stop)

    def _slowloris(self, s, stop):  # a head that never ends
        self._trickle(s, stop, b"GET /status HTTP/1.1\r\nHost: x\r\n", b"X-a: b\r\n", 0.5)

    def _slow_body(self, s, stop):  # a head at once, then its body a byte at a time
        self._trickle(s, stop, b"POST /configure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 1000\r\n\r\n", b" ", 0.5)

    def _unread_body(self, s, stop):  # a refused request whose announced body never comes
        s.sendall(b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        self._read_until_closed(s, stop)

    def _unread_form(self, s, stop):
        s.sendall(b"POST /check_writability HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
                  b"\r\nContent-Length: 100000\r\n\r\nx=1")
        self._read_until_closed(s, stop)

    def _silent(self, s, stop):
        self._read_until_closed(s, stop)


def test_dozens_of_hostile_connections_do_not_starve_the_probes(open_compute):
    c = open_compute
    # more slow bodies than the API has threads (1 worker x 16 by default): only 4 per worker are read
    kinds = {"slowloris": 15, "slow_body": 40, "unread_body": 10, "unread_form": 10, "silent": 10}
    hostile = [Hostile(kind, c.http_port) for kind, n in kinds.items() for _ in range(n)]
    stop = threading.Event()
    threads = [threading.Thread(target=h.run, args=(stop,), daemon=True) for h in hostile]
    probes = Probes(c.http_port)
    for t in threads:
        t.start()
    probes.start()
    try:
        # until every hostile connection has been dealt with (or far past every deadline)
        deadline = time.monotonic() + max(HEAD_DEADLINE, REQUEST_DEADLINE) + 30
        while time.monotonic() < deadline and any(h.closed_after is None for h in hostile):
            time.sleep(0.2)
    finally:
        probes.finish()
        stop.set()
        for t in threads:
            t.join(5)

    by_kind = {k: Counter((h.status, h.closed_after is not None) for h in hostile if h.kind == k) for k in kinds}
    ms = [round(r[2] * 1000) for r in sorted(probes.results, key=lambda r: r[2])]
    print(f"\n{len(hostile)} hostile connections: {by_kind}; {len(ms)} probes, p50 {ms[len(ms) // 2]} ms, "
          f"p99 {ms[len(ms) * 99 // 100]} ms, max {ms[-1]} ms, {len(probes.slow_or_failed())} over 1 s")
    assert len(probes.results) > 50
    misses = probes.slow_or_failed()
    t_first = probes.results[0][3] if probes.results else 0
    print("slowest probes (path, code, ms, s after the first):",
          [(p, code, round(lat * 1000), round(t - t_first, 1))
           for p, code, lat, t in sorted(probes.results, key=lambda r: -r[2])[:5]])
    assert probes.longest_miss_streak() <= 1 and len(misses) <= len(probes.results) // 50, misses
    for h in hostile:
        assert h.closed_after is not None, f"{h.kind}: still open"
    for h in hostile:
        if h.kind == "slowloris":  # no answer owed; closed once its head is overdue
            assert h.closed_after < HEAD_DEADLINE + SLACK, h
        elif h.kind == "slow_body":  # read within the request deadline (408) or refused at once (503)
            assert h.status in (408, 503) and h.closed_after < REQUEST_DEADLINE + SLACK, h
        elif h.kind == "unread_body":  # 405 without reading the body, then closed, not drained
            assert h.status == 405 and h.closed_after < SLACK, h
        elif h.kind == "unread_form":
            assert h.status == 415 and h.closed_after < SLACK, h
        else:  # silent: closed after the keep-alive timeout
            assert h.closed_after < 5 + SLACK, h
    slow = Counter(h.status for h in hostile if h.kind == "slow_body")
    assert slow[408] >= 1 and slow[503] >= 1, slow  # some were read (and timed out), some refused
    assert c.status()["status"] == "running"


def test_a_body_sent_slowly_but_within_the_deadline_is_served(open_compute):
    """The deadline bounds abuse, not honest slow links: 2 s to send a small body is fine."""
    c = open_compute
    body = json.dumps({"spec": "not an object"}).encode()
    with socket.create_connection(("127.0.0.1", c.http_port), timeout=30) as s:
        s.sendall(b"POST /configure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        for i in range(0, len(body), 4):
            s.sendall(body[i:i + 4])
            time.sleep(2 / (len(body) / 4))
        out = s.recv(65536)
    assert out.startswith(b"HTTP/1.1 400"), out[:200]


def test_form_posts_and_text_bodies_are_415_before_anything_is_read(open_compute):
    c = open_compute
    for path in ("/configure", "/check_writability", "/terminate"):
        for ctype in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
            code, body, _ = request(c, "POST", path, b'{"spec": {}}', {"Content-Type": ctype})
            assert code == 415, (path, ctype, code, body)
    assert request(c, "POST", "/configure", b'{"spec": {}}')[0] == 415  # no Content-Type at all
    assert c.status()["status"] == "running"


def test_all_interfaces_without_jwks_warns(open_compute):
    out = open_compute.output()
    assert "listens on 0.0.0.0 (not loopback) without a JWKS" in out


# -- --jwks and --http-address ---------------------------------------------------------------

def token(c: Compute, **claims) -> dict:
    claims = {"compute_id": "compute-1", "exp": time.time() + 300, **claims}
    return {"Authorization": "Bearer " + jwt.encode(claims, c.keys[0], algorithm="EdDSA", headers={"kid": "ed"})}


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp{,6})."""
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, p = local.partition(":")
            if state == "0A" and int(p, 16) == port:
                found.add(addr)
    return found


def test_http_address_binds_loopback_only(guarded_compute):
    c = guarded_compute
    assert listening_addresses(c.http_port) == {"0100007F"}  # 127.0.0.1, nothing else
    assert "not loopback" not in c.output()


def test_every_route_but_metrics_and_probes_needs_a_token(guarded_compute):
    c = guarded_compute
    protected = [("POST", "/configure"), ("POST", "/terminate"), ("POST", "/check_writability"), ("GET", "/insights"),
                 ("GET", "/status"), ("GET", "/metrics.json"), ("GET", "/info"), ("GET", "/openapi.yaml"),
                 ("GET", "/dbs_and_roles")]
    expired = token(c, exp=time.time() - 120)  # beyond HEAD's 60 s leeway
    other = token(c, compute_id="compute-2")
    forged = {"Authorization": "Bearer " + jwt.encode({"compute_id": "compute-1", "exp": time.time() + 60},
                                                      "k" * 32, algorithm="HS256")}
    admin_without_aud = token(c, compute_id=None, scope="compute_ctl:admin")
    for method, path in protected:
        for headers, want in (({}, 400), ({"Authorization": "Basic eDp5"}, 400), (expired, 401), (forged, 401),
                              (admin_without_aud, 401), (other, 403)):
            code, body, hdrs = request(c, method, path, b"{}" if method == "POST" else None,
                                       {**JSON, **headers} if method == "POST" else headers)
            assert code == want, (method, path, headers, code, body)
            assert want != 401 or hdrs.get("www-authenticate") == "Bearer"
            assert "error" in json.loads(body)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert request(c, "GET", path)[0] == 200, path
    # with a token: past auth (a valid check; an empty spec object is an invalid spec: 400)
    no_exp = {"Authorization": "Bearer " + jwt.encode({"compute_id": "compute-1"}, c.keys[0], algorithm="EdDSA")}
    admin = token(c, compute_id=None, scope="compute_ctl:admin", aud=["compute"])
    for good in (token(c), no_exp, admin):  # exp is not required (HEAD), checked when present
        assert request(c, "POST", "/check_writability", None, good)[:2] == (200, b"true")
        assert request(c, "GET", "/insights", None, good)[0] == 200
        assert request(c, "GET", "/status", None, good)[0] == 200
        code, body, _ = request(c, "POST", "/configure", b'{"spec": {}}', {**JSON, **good})
        assert code == 400 and b"format_version" in body, body
    assert c.status()["status"] == "running"


def test_no_body_is_read_before_auth(guarded_compute):
    """A POST announcing 500 kB and sending none of it: answered 400 (no token) at once, then closed
    (neither read nor drained). With a token the same request would wait for its body."""
    c = guarded_compute
    for path in ("/configure", "/check_writability", "/terminate"):
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", c.http_port), timeout=15) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      "Content-Length: 500000\r\n\r\n".encode())
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        elapsed = time.monotonic() - t0
        assert out.startswith(b"HTTP/1.1 400"), (path, out[:200])
        assert elapsed < 5, (path, elapsed)
    # control: with a valid token, /configure does wait for the body (and gives up at the deadline)
    headers = "".join(f"{k}: {v}\r\n" for k, v in token(c).items())
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", c.http_port), timeout=REQUEST_DEADLINE + 20) as s:
        s.sendall(("POST /configure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"{headers}Content-Length: 500000\r\n\r\n").encode())
        out = s.recv(65536)
    elapsed = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 408"), out[:200]
    assert REQUEST_DEADLINE - 1 < elapsed < REQUEST_DEADLINE + SLACK
