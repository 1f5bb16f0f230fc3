"""compute-ctl's early responder (compute/early_responder.py) and the hand-over of what it holds
(compute/api_handover.py), in this process: a real listening socket on loopback, raw client
sockets, the worker's end of the hand-over (take_held) as the api worker calls it. The whole
tree (the responder in compute-ctl, the api taking over) is in tests/test_e2e_early_status.py."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

from compute.api import bodies
from compute.api_handover import HELLO, MAX_HELD, handover_path, take_held
from compute.api_socket import bind_api_socket
from compute.early_responder import HOLD, MAX_HEAD, MORE, EarlyResponder, classify
from compute.state import StateStore, state_path
from tests.support.api_helpers import TENANT, TIMELINE, make_state
from tests.support.waiting import nothing_sent, wait_for

STARTED = 1795600800.25


# -- which requests it answers (pure) ---------------------------------------------------------------

@pytest.mark.parametrize("head,expected", [
    (b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n", b"/status"),
    (b"GET /healthz HTTP/1.0\r\n\r\n", b"/healthz"),
    (b"GET /metrics.json?x=1&y=%20 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n", b"/metrics.json"),
    (b"GET /info HTTP/1.1\r\nUser-Agent: curl/8.0\r\nAuthorization: Bearer abc.def\r\n\r\n", b"/info"),
    (b"GET /status HTTP/1.1\r\nHost: x\r\n", MORE),  # incomplete: more may come
    (b"GET /sta", MORE),
    (b"GET /status HTTP/1.1\r\nHost: " + b"x" * MAX_HEAD, HOLD),  # too long to be a head of ours
    (b"GET /status HTTP/1.1\r\nX-Big: " + b"x" * MAX_HEAD + b"\r\n\r\n", HOLD),
    (b"GET /status HTTP/1.1\r\n\r\nGET /status HTTP/1.1\r\n\r\n", HOLD),  # pipelined
    (b"GET /status HTTP/1.1\r\n\r\nx", HOLD),  # anything behind the head
    (b"GET /status HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", HOLD),  # a body
    (b"GET /status HTTP/1.1\r\nContent-Length: 0\r\n\r\n", HOLD),
    (b"GET /status HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", HOLD),
    (b"GET /status HTTP/1.1\r\nExpect: 100-continue\r\n\r\n", HOLD),
    (b"GET /status HTTP/1.1\r\nUpgrade: h2c\r\n\r\n", HOLD),
    (b"GET /status HTTP/1.1\r\nX-Forwarded-Proto: https\r\n\r\n", HOLD),  # gunicorn's scheme policy
    (b"GET /status HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", HOLD),  # gunicorn refuses a 2nd Host
    (b"GET /status HTTP/1.1\r\nX_Under: 1\r\n\r\n", HOLD),
    (b"GET /status HTTP/1.1\r\nBad Name: 1\r\n\r\n", HOLD),
    (b"GET /status HTTP/1.1\r\nNo colon\r\n\r\n", HOLD),
    (b"GET /status HTTP/1.1\r\n folded: 1\r\n\r\n", HOLD),
    (b"GET /status HTTP/1.1\r\nX: \x80\r\n\r\n", HOLD),
    (b"GET /status HTTP/1.1\nHost: x\r\n\r\n", HOLD),  # bare LF
    (b"\r\nGET /status HTTP/1.1\r\n\r\n", HOLD),
    (b"HEAD /status HTTP/1.1\r\n\r\n", HOLD),
    (b"POST /status HTTP/1.1\r\n\r\n", HOLD),
    (b"get /status HTTP/1.1\r\n\r\n", HOLD),
    (b"GET /configure HTTP/1.1\r\n\r\n", HOLD),
    (b"GET /readyz HTTP/1.1\r\n\r\n", HOLD),
    (b"GET /metrics HTTP/1.1\r\n\r\n", HOLD),
    (b"GET /status/ HTTP/1.1\r\n\r\n", HOLD),
    (b"GET //status HTTP/1.1\r\n\r\n", HOLD),
    (b"GET /%73tatus HTTP/1.1\r\n\r\n", HOLD),
    (b"GET /status#x HTTP/1.1\r\n\r\n", HOLD),
    (b"GET http://x/status HTTP/1.1\r\n\r\n", HOLD),
    (b"GET /status HTTP/2.0\r\n\r\n", HOLD),
    (b"GET  /status HTTP/1.1\r\n\r\n", HOLD),
    (b"GET /status HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", HOLD),
])
def test_classify(head, expected):
    assert classify(head) == expected


def test_classify_never_answers_what_the_fast_path_would_not():
    """Whatever the responder answers, the api's own fast path answers too (it is a subset)."""
    from compute.api.fastpath import inline_candidate
    heads = [b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /info HTTP/1.0\r\n\r\n",
             b"GET /healthz?a=b HTTP/1.1\r\nA: b\r\nC: d\r\n\r\n"]
    for head in heads:
        assert classify(head) in (b"/status", b"/info", b"/healthz") and inline_candidate(head)


# -- in this process ---------------------------------------------------------------------------------

class Rig:
    """A responder on a loopback port, its runtime dir (0700) and hand-over socket."""

    def __init__(self, handover: bool = True):
        self.dir = tempfile.mkdtemp(prefix="cs-early-")
        os.chmod(self.dir, 0o700)
        self.sock = bind_api_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.responder = EarlyResponder(self.sock, started=STARTED, cores=3).start()
        if handover:
            self.responder.offer_handover(handover_path(self.dir))
        self.clients: list[socket.socket] = []

    def connect(self, data: bytes = b"") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if data:
            s.sendall(data)
        self.clients.append(s)
        return s

    def ask(self, path: str) -> bytes:
        """A plain GET, answered and closed by the responder: the whole answer."""
        s = self.connect(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return read_to_eof(s)

    def close(self):
        self.responder.stop()
        for s in self.clients:
            s.close()
        self.sock.close()
        subprocess.run(["rm", "-rf", self.dir], check=False)


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def read_to_eof(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def body_of(answer: bytes) -> bytes:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 200 OK\r\n", head), answer
    assert b"\r\nConnection: close\r\n" in head and b"\r\nContent-Type: application/json\r\n" in head
    assert f"\r\nContent-Length: {len(body)}".encode() in head
    return body


def test_before_the_state_file_it_answers_what_compute_ctl_knows(rig):
    assert json.loads(body_of(rig.ask("/status"))) == {
        "tenant": None, "timeline": None, "status": "init", "last_active": "2026-11-25T10:00:00.250Z",
        "error": None, "start_time": "2026-11-25T10:00:00.250Z"}
    rig.responder.known(tenant=TENANT, timeline=TIMELINE)  # the spec, once validated
    st = json.loads(body_of(rig.ask("/status")))
    assert (st["tenant"], st["timeline"], st["status"]) == (TENANT, TIMELINE, "init")
    assert body_of(rig.ask("/info")) == b'{"num_cpus": 3}'
    assert body_of(rig.ask("/healthz")) == b'{"alive": true}'
    assert json.loads(body_of(rig.ask("/metrics.json"))) == {k: 0 for k in bodies.BASE_METRICS}
    assert rig.responder.answered == 5


def test_after_the_state_file_it_answers_from_it(rig):
    store = make_state(rig.dir, status="init", start_time=STARTED, last_active=STARTED + 1,
                       metrics={"basebackup_ms": 42})
    rig.responder.state_ready(state_path(rig.dir))
    values = store.get_many(bodies.STATUS_KEYS)
    assert body_of(rig.ask("/status")) == bodies.encode(bodies.status_body(values)).encode()
    store.set(status="failed", error="boom")
    st = json.loads(body_of(rig.ask("/status")))
    assert (st["status"], st["error"], st["tenant"]) == ("failed", "boom", TENANT)
    assert json.loads(body_of(rig.ask("/metrics.json")))["basebackup_ms"] == 42
    store.close()


@pytest.mark.parametrize("data", [
    b"",  # connects and says nothing
    b"GET /status HTTP/1.1\r\nHost: x\r\n",  # half a head
    b"POST /configure HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    b"GET /status HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",  # a GET with a body
    b"GET /info HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",  # pipelined
    b"GET /status HTTP/1.1\r\n" + b"X-Big: " + b"y" * 3000 + b"\r\n" + b"X-Big2: " + b"y" * 6000 + b"\r\n\r\n",
    b"GET /configure HTTP/1.1\r\n\r\n",
    b"DELETE /status HTTP/1.1\r\n\r\n",
], ids=["silent", "half-head", "post", "get-with-body", "pipelined", "huge-head", "other-route", "other-method"])
def test_what_it_does_not_answer_is_handed_over_unread(rig, data):
    held = rig.connect(data)
    # A /status made after it is answered (the responder looked at the held one first, or
    # will: either way it never answers it), and the held one still has no answer.
    body_of(rig.ask("/status"))
    wait_for(lambda: len(rig.responder._conns) == 1, 10, "the connection held")
    assert nothing_sent(held)
    taken = take_held(rig.dir)
    assert len(taken) == 1
    sock, client = taken[0]
    assert client == held.getsockname()
    with sock:
        sock.setblocking(True)
        sock.settimeout(10)
        got = b""
        while len(got) < len(data):
            got += sock.recv(65536)
        assert got == data  # every byte the client sent, for the api to read
        sock.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    wait_for(lambda: not rig.responder.running, 10, "the responder to end after the hand-over")
    assert read_to_eof(held) == b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    assert not os.path.exists(handover_path(rig.dir))
    assert take_held(rig.dir) == []  # a second worker: nobody there, it just serves


def test_half_head_completed_in_time_is_answered(rig):
    s = rig.connect(b"GET /healthz HTTP/1.1\r\n")
    wait_for(lambda: len(rig.responder._conns) == 1, 10, "the first half")
    s.sendall(b"Host: x\r\n\r\n")
    assert body_of(read_to_eof(s)) == b'{"alive": true}'


def test_at_the_cap_it_stops_accepting_and_status_waits_in_the_backlog(rig):
    silent = [rig.connect() for _ in range(MAX_HELD)]
    wait_for(lambda: len(rig.responder._conns) == MAX_HELD, 10, "every silent client held")
    waiting = rig.connect(b"GET /status HTTP/1.1\r\n\r\n")
    assert not rig.responder._accepting
    silent[0].close()  # a slot frees: the one in the backlog is accepted and answered
    assert json.loads(body_of(read_to_eof(waiting)))["status"] == "init"
    assert len(rig.responder._conns) == MAX_HELD - 1
    assert len(take_held(rig.dir)) == MAX_HELD - 1


def test_clients_that_go_away_free_their_slot(rig):
    gone = [rig.connect(b"POST /x HTTP/1.1\r\n") for _ in range(5)]
    wait_for(lambda: len(rig.responder._conns) == 5, 10, "five held")
    for s in gone[:3]:
        s.close()
    # A client that closes after sending bytes stays held (the api reads and answers into
    # the void); one that closed before sending anything is dropped.
    silent = rig.connect()
    wait_for(lambda: len(rig.responder._conns) == 6, 10, "the silent one held too")
    silent.close()
    wait_for(lambda: len(rig.responder._conns) == 5, 10, "the silent one dropped")


def test_stop_closes_what_it_holds_and_the_hand_over_socket(rig):
    held = rig.connect(b"POST /configure HTTP/1.1\r\n\r\n")
    wait_for(lambda: len(rig.responder._conns) == 1, 10, "held")
    rig.responder.stop()
    assert not rig.responder.running
    assert not os.path.exists(handover_path(rig.dir))
    try:
        assert read_to_eof(held) == b""
    except ConnectionResetError:
        pass  # unread bytes: the close is a reset
    rig.responder.stop()  # again: nothing


def test_the_hand_over_socket_is_private(rig):
    path = handover_path(rig.dir)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    rig.connect(b"POST /configure HTTP/1.1\r\n\r\n")
    wait_for(lambda: len(rig.responder._conns) == 1, 10, "held")
    r = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c",
                        f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r})"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
    assert len(rig.responder._conns) == 1 and rig.responder.running


def test_another_uid_is_refused_even_where_it_can_reach_the_socket(rig):
    """With the directory and socket opened up (a mistake), the peer's uid still decides:
    nobody gets no descriptor, and the worker after it gets them all."""
    rig.connect(b"POST /configure HTTP/1.1\r\n\r\n")
    wait_for(lambda: len(rig.responder._conns) == 1, 10, "held")
    os.chmod(rig.dir, 0o755)
    os.chmod(handover_path(rig.dir), 0o777)
    script = ("import socket, sys\ns = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
              f"s.settimeout(10)\n"
              f"try:\n    s.sendall({HELLO!r}); msg, fds, _, _ = socket.recv_fds(s, 64, 64)\n"
              "except (BrokenPipeError, ConnectionResetError):\n    msg, fds = b'', []\n"
              "print(len(msg), len(fds))")
    r = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", script, handover_path(rig.dir)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.split() == ["0", "0"], r.stdout + r.stderr
    assert rig.responder.running
    assert len(take_held(rig.dir)) == 1


def test_the_worker_gives_up_on_a_responder_that_does_not_answer(tmp_path):
    """Something listens but never answers: the worker serves anyway, after TAKE_TIMEOUT."""
    path = handover_path(str(tmp_path))
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(path)
        mute.listen()
        assert take_held(str(tmp_path), timeout=0.2) == []
    assert take_held(str(tmp_path / "absent")) == [] and take_held(None) == []


def test_a_fork_never_inherits_the_responders_state_file_handle(rig):
    """Forks while the responder reads the state file as fast as it can: each child closes its
    descriptors (as supervisord does), then opens, writes and reads the state file itself (an
    SQLite lock or handle inherited from the responder would hang or break that)."""
    store = make_state(rig.dir, status="init")
    store.close()
    rig.responder.state_ready(state_path(rig.dir))
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            body_of(rig.ask("/status"))

    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    try:
        wait_for(lambda: rig.responder.answered > 20, 20, "answers from the state file")
        for _ in range(30):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.closerange(3, 1024)  # as supervisord does in every child
                    store = StateStore(state_path(rig.dir))
                    store.set(last_active=float(len(str(pid))))  # a write, as every program does
                    code = 0 if store.get("status") == "init" and store.integrity_ok() else 1
                    store.close()
                finally:
                    os._exit(code)
            done: list[int] = []

            def reaped(pid=pid):
                got, status = os.waitpid(pid, os.WNOHANG)
                if got == pid:
                    done.append(os.waitstatus_to_exitcode(status))
                return bool(done)

            try:
                wait_for(reaped, 20, f"fork child {pid} (hung?)")
            except AssertionError:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise
            assert done == [0]
    finally:
        stop.set()
        t.join(10)


ANSWERED = [
    b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /status?verbose=1 HTTP/1.0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.29\r\nAccept: */*\r\n\r\n",
    b"GET /metrics.json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer not-a-token\r\n\r\n",
    b"GET /info HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
]


def test_the_same_bodies_as_the_api_for_the_same_state_file():
    """The responder and a real gunicorn (the api's own command line) on one state file: for
    every request the responder answers, the api answers 200 with the same body bytes. (No
    hand-over socket here: the api's worker would take the responder's connections.)"""
    rig = Rig(handover=False)
    try:
        _same_bodies(rig)
    finally:
        rig.close()


def _same_bodies(rig: Rig) -> None:
    from tests.support.api_helpers import gunicorn, launch_settings
    from tests.support.pgcluster import free_port
    port = free_port()
    store = make_state(rig.dir, status="init", launch=launch_settings(rig.dir, http_port=port),
                       start_time=STARTED, last_active=STARTED + 2.5, metrics={"basebackup_ms": 7})
    store.close()
    rig.responder.state_ready(state_path(rig.dir))
    rig.responder.info = bodies.encode(bodies.info_body())  # this machine's, as the api counts
    with gunicorn(rig.dir, env={"COMPUTE_API_WORKERS": "1"}):
        for request in ANSWERED:
            assert classify(request) not in (MORE, HOLD)
            early = rig.connect(request)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
                          if b"Connection:" not in request else request.replace(b"keep-alive", b"close"))
                api = read_to_eof(s)
            head, _, api_body = api.partition(b"\r\n\r\n")
            ours = read_to_eof(early)
            assert ours.split(b"\r\n", 1)[0] == head.split(b"\r\n", 1)[0], (ours, api)  # "HTTP/1.x 200 OK"
            assert body_of(ours) == api_body, request


@pytest.mark.parametrize("flag,value", [("--lock-timeout", "-1"), ("--postgres-exporter", "/nonexistent"),
                                        ("--http-address", "localhost"), ("--storage-timeout", "0")])
def test_a_bad_flag_fails_before_the_bind(tmp_path, capsys, flag, value):
    """Flags are checked before the API socket is bound (and so before anything answers): with
    the port taken, the error is still the flag's."""
    from compute.cli import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["-D", str(tmp_path / "pg"), "-C", "postgresql://cloud_admin@127.0.0.1:1/postgres",
                     "-s", '{"format_version": 1.0, "cluster": {}}', "--runtime-dir", str(tmp_path / "run"),
                     "--http-address", "127.0.0.1", "--http-port", str(port), flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 1 and flag in err and "\n" not in err and "cannot listen" not in err, err
    assert threading.active_count() == 1  # no responder thread was started
