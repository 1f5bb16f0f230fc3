"""compute-ctl's early responder (compute/boot/early_responder.py) and the hand-over of what it holds
(compute/api/handover.py), in this process: a real listening socket on loopback, raw client
sockets, the worker's end of the hand-over (take_held) as the api worker calls it. The whole
tree (the responder in compute-ctl, the api taking over) is in tests/e2e/test_e2e_early_status.py.

This file: no process; other users, forks and gunicorn: tests/integration/test_early_responder.py."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from compute.api import bodies
from compute.api.handover import MAX_HELD, handover_path, take_held
from compute.boot.early_responder import HOLD, MAX_HEAD, MORE, classify
from compute.shared.state import state_path
from tests.support.api_helpers import TENANT, TIMELINE, make_state
from tests.support.early_rig import STARTED, Rig, body_of, read_to_eof, rig
from tests.support.waiting import nothing_sent, wait_for

__all__ = ["rig"]  # the fixture


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


def test_before_the_state_file_it_answers_what_compute_ctl_knows(rig):
    assert json.loads(body_of(rig.ask("/status"))) == {
        "tenant": None, "timeline": None, "status": "init", "last_active": "2026-11-25T10:00:00.250Z",
        "error": None, "start_time": "2026-11-25T10:00:00.250Z", "monitor_last_tick": None,
        "monitor_stall_restarts": 0, "state_writes_failing": False}
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


@pytest.mark.parametrize("jwks", [True, None], ids=["jwks-not-read-yet", "not-known-yet"])
def test_before_its_jwks_is_known_it_answers_only_healthz_and_holds_the_rest_for_the_api(jwks):
    """With a JWKS whose settings compute-ctl has not built yet, or before it knows whether it
    has one, /status & co. wait for the api, token or not."""
    rig = Rig(jwks=jwks)
    try:
        held = {path: rig.connect(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer x.y.z\r\n\r\n".encode())
                for path in ("/status", "/metrics.json", "/info")}
        assert body_of(rig.ask("/healthz")) == b'{"alive": true}'
        wait_for(lambda: len(rig.responder._conns) == 3, 10, "the three held")
        assert all(nothing_sent(s) for s in held.values())
        if jwks is None:  # the settings say: no JWKS; from now on /status & co. are answered, held ones too
            rig.responder.jwks_known(None)
            assert json.loads(body_of(read_to_eof(held["/status"])))["status"] == "init"
            assert all(body_of(read_to_eof(held[path])) for path in ("/metrics.json", "/info"))
            assert json.loads(body_of(rig.ask("/status")))["status"] == "init"
            assert take_held(rig.dir) == []
        else:
            assert len(take_held(rig.dir)) == 3
    finally:
        rig.close()


ME = "compute-me"


def held(rig: Rig) -> int:
    """Connections the responder has decided to hold (accepted ones may still wait for bytes)."""
    return sum(conn.held for conn in list(rig.responder._conns.values()))


@pytest.fixture(scope="module")
def token_keys():
    from tests.support.api_helpers import jwks_keys
    return jwks_keys()  # (ed25519 key, rsa key, the JWKS of their public halves)


def _forged_tokens(ed, rs, doc) -> dict[str, str]:
    """Tokens the api's decision refuses (tests/unit/test_access.py has the whole list)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from tests.support.api_helpers import forged_token as forged, token_for

    mine = {"compute_id": ME, "scope": None, "aud": None}
    rsa_pem = rs.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return {
        "another compute's": token_for(ed, "compute-other"),
        "no compute id": token_for(ed, None, scope=None, aud=None),
        "admin without aud": token_for(ed, None, aud=None),
        "expired": token_for(ed, ME, exp=1),
        "a stranger's key": token_for(ed25519.Ed25519PrivateKey.generate(), ME),
        "alg none": forged({"alg": "none", "typ": "JWT"}, mine, None),
        "HS256 keyed with the RSA public key": forged({"alg": "HS256", "kid": "rs"}, mine, rsa_pem),
        "HS256 keyed with a secret": jwt.encode(mine, "s" * 32, algorithm="HS256"),
        "garbage": "not.a.jwt",
        "empty": "",
    }


@pytest.mark.parametrize("require_exp", [False, True], ids=["exp-optional", "jwt-require-exp"])
def test_with_a_jwks_it_answers_the_tokens_the_apis_decision_admits_and_holds_the_rest(tmp_path, token_keys,
                                                                                        require_exp):
    """compute/api/access.py decide(), the api's own: a token for this compute (or an admin's)
    gets /status & co. from the responder; every token the api would refuse, and a request
    without one, is held unread for the api, which gives its 400/401/403 and logs it."""
    from tests.support.api_helpers import token_for, write_jwks
    ed, rs, doc = token_keys
    jwks = write_jwks(str(tmp_path / "jwks.json"), doc)
    rig = Rig(jwks=True)
    try:
        exp = {"exp": 4102444800} if require_exp else {}
        good = {"ours": token_for(ed, ME, **exp), "ours, RS256": token_for(rs, ME, algorithm="RS256", **exp),
                "an admin's": token_for(ed, None, **exp)}
        # Before compute-ctl has built its settings: held; answered as soon as it has
        early = rig.connect(f"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good['ours']}\r\n\r\n".encode())
        wait_for(lambda: held(rig) == 1, 10, "held")
        assert nothing_sent(early)
        rig.responder.jwks_known(jwks, ME, require_exp)
        assert json.loads(body_of(read_to_eof(early)))["status"] == "init"
        for name, token in good.items():
            for path in ("/status", "/metrics.json", "/info"):
                s = rig.connect(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
                body = body_of(read_to_eof(s))
                if path == "/status":
                    assert json.loads(body)["status"] == "init", name
        refused = {name: f"Bearer {token}" for name, token in _forged_tokens(ed, rs, doc).items()}
        refused["no Authorization field"] = None
        refused["another scheme"] = f"Basic {good['ours']}"
        if require_exp:
            refused["ours without exp (--jwt-require-exp)"] = f"Bearer {token_for(ed, ME)}"
        waiting = []
        for name, authorization in refused.items():
            field = f"Authorization: {authorization}\r\n" if authorization is not None else ""
            waiting.append(rig.connect(f"GET /status HTTP/1.1\r\nHost: x\r\n{field}\r\n".encode()))
        wait_for(lambda: held(rig) == len(refused), 10, "every refused request held")
        assert all(nothing_sent(s) for s in waiting), refused
        assert len(take_held(rig.dir)) == len(refused)  # the api's, unread
    finally:
        rig.close()


def test_a_jwks_file_not_there_yet_holds_every_token_until_it_is(tmp_path, token_keys):
    """v2 pull mode: the JWKS path is known, the driver writes the control plane's JWKS later."""
    from tests.support.api_helpers import token_for, write_jwks
    ed, _rs, doc = token_keys
    path = str(tmp_path / "jwks.json")
    rig = Rig(jwks=True)
    try:
        rig.responder.jwks_known(path, ME)
        ask = f"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token_for(ed, ME)}\r\n\r\n".encode()
        early = rig.connect(ask)
        wait_for(lambda: held(rig) == 1, 10, "held")  # decided, not only accepted: then the file comes
        assert nothing_sent(early)
        write_jwks(path, doc)
        assert json.loads(body_of(read_to_eof(rig.connect(ask))))["status"] == "init"
        assert len(take_held(rig.dir)) == 1
    finally:
        rig.close()


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


def test_the_worker_gives_up_on_a_responder_that_does_not_answer(tmp_path):
    """Something listens but never answers: the worker serves anyway, after TAKE_TIMEOUT."""
    path = handover_path(str(tmp_path))
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(path)
        mute.listen()
        assert take_held(str(tmp_path), timeout=0.2) == []
    assert take_held(str(tmp_path / "absent")) == [] and take_held(None) == []


@pytest.mark.parametrize("flag,value", [("--lock-timeout", "-1"), ("--postgres-exporter", "/nonexistent"),
                                        ("--http-address", "localhost"), ("--storage-timeout", "0")])
def test_a_bad_flag_fails_before_the_bind(tmp_path, capsys, flag, value):
    """Flags are checked before the API socket is bound (and so before anything answers): with
    the port taken, the error is still the flag's."""
    from compute.boot.cli import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["-D", str(tmp_path / "pg"), "-C", "postgresql://cloud_admin@127.0.0.1:1/postgres",
                     "-s", '{"format_version": 1.0, "cluster": {}}', "--runtime-dir", str(tmp_path / "run"),
                     "--http-address", "127.0.0.1", "--http-port", str(port), flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 1 and flag in err and "\n" not in err and "cannot listen" not in err, err
    # No responder thread was started (only stdout's writer may run: compute/base/stdout_buffer.py).
    assert [t for t in threading.enumerate() if t.name != "stdout-writer"] == [threading.main_thread()]
