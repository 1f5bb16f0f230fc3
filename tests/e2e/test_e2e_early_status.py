"""The whole tree with compute-ctl's early responder (compute/boot/early_responder.py): /status is
answered before the api program exists, with the bodies the api gives; whatever else arrives
in that window is held unread and gets the api's own answer once it takes over
(compute/api/handover.py). The api is held back (its program not autostarted: a template
copy, COMPUTE_TEMPLATE_DIR) until the test starts it with supervisorctl, so "before the api"
is a state the test controls, not a race it hopes to win."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys

from compute.api import bodies
from compute.api.handover import HELLO, handover_path
from compute.shared.state import StateStore, state_path
from tests.support.api_helpers import jwks_keys, read_to_eof, send_get, split, token_for
from tests.support.fault_tree import alive, proc_table
from tests.support.pgcluster import PG_USER
from tests.support.templates import templates_with
from tests.support.tree import Compute
from tests.support.waiting import nothing_sent, wait_for

ROUTES = ("/status", "/healthz", "/metrics.json", "/info")


def held_back_templates() -> str:
    """A copy of the supervisord templates in which the api does not start by itself."""
    return templates_with("api", "autostart=true", "autostart=false")


def compute_with_api_held_back(**kw) -> Compute:
    c = Compute(**kw)
    c.spec = c.new_spec()
    c.env["COMPUTE_TEMPLATE_DIR"] = held_back_templates()
    c.trace = os.path.join(c.base, "trace")
    os.close(os.open(c.trace, os.O_CREAT | os.O_WRONLY, 0o666))
    os.chmod(c.trace, 0o666)  # appended to by the tree as the compute user
    c.env["COMPUTE_TRACE"] = c.trace
    return c


def marks(c: Compute) -> list[str]:
    from compute.base.trace import read
    return [event for _t, _pid, event in read(c.trace)]


def exchange(port: int, data: bytes, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_to_eof(s)


def get(port: int, path: str) -> bytes:
    return exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())


def comparable(answer: bytes) -> bytes:
    """An answer without its Date header and with its timestamps masked (the monitor ticks
    between the two requests; same width, so content-length still compares)."""
    answer = re.sub(rb"\r\nDate: [^\r]*", b"", answer)
    return re.sub(rb'"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"', b'"<time>"', answer)


def from_responder(answer: bytes) -> bool:
    """compute-ctl's answers carry no Server header (gunicorn's do)."""
    _code, headers, _body = split(answer)
    return "server" not in headers


def api_state(c: Compute) -> str | None:
    """supervisord's state of the api program; None before supervisord answers."""
    if not os.path.exists(os.path.join(c.runtime_dir, "supervisord.conf")):
        return None
    words = c.supervisorctl("status", "api").stdout.split()
    return words[1] if len(words) > 1 and words[0] == "api" else None


def start_api_and_wait_for_hand_over(c: Compute) -> None:
    wait_for(lambda: api_state(c), 30, "supervisord")
    r = c.supervisorctl("start", "api")
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: any(m.startswith("compute-ctl: responder handed over") for m in marks(c)), 30,
             "the api to take over the held connections")
    # the responder marks the hand-over, then removes its socket
    wait_for(lambda: not os.path.exists(handover_path(c.runtime_dir)), 30, "the hand-over socket to go")


def test_status_is_answered_before_the_api_exists_with_the_apis_bytes():
    c = compute_with_api_held_back()
    with c:
        first = wait_for(lambda: _try_get(c.http_port, "/status"), 30, "a first /status")
        assert from_responder(first) and split(first)[0] == 200
        assert split(first)[1]["connection"] == "close"
        assert wait_for(lambda: api_state(c), 30, "supervisord") == "STOPPED"
        assert "api: forked" not in marks(c) and "compute-ctl: responder first answer" in marks(c)
        # Every thread of compute-ctl runs as the compute user (setuid applies to all of them).
        tasks = os.listdir(f"/proc/{c.proc.pid}/task")
        assert len(tasks) >= 2  # the responder's thread is one of them
        for tid in tasks:
            with open(f"/proc/{c.proc.pid}/task/{tid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            assert set(uids) == {str(PG_USER.uid)}, (tid, uids)

        # The start goes on without the api; the responder follows the state file.
        wait_for(lambda: json.loads(split(get(c.http_port, "/status"))[2])["status"] == "running", 60, "running")
        # /status shows the monitor's last tick: hold the monitor still, so that both answer
        # from the same state. Once it runs: a monitor still held back would be started after the stop.
        c.program_pid("monitor")
        r = c.supervisorctl("stop", "monitor")
        assert r.returncode == 0, r.stdout + r.stderr
        store = StateStore(state_path(c.runtime_dir))
        before = store.get_many(bodies.STATUS_KEYS), store.get("metrics")
        early = {route: get(c.http_port, route) for route in ROUTES}
        assert all(from_responder(a) for a in early.values())

        start_api_and_wait_for_hand_over(c)
        late = {route: get(c.http_port, route) for route in ROUTES}
        assert not any(from_responder(a) for a in late.values())
        assert (store.get_many(bodies.STATUS_KEYS), store.get("metrics")) == before  # the same state
        store.close()
        for route in ROUTES:
            e_code, e_headers, e_body = split(early[route])
            l_code, l_headers, l_body = split(late[route])
            assert (e_code, e_body) == (l_code, l_body), route  # byte for byte
            assert e_headers["content-type"] == l_headers["content-type"] == "application/json"
        st = json.loads(split(late["/status"])[2])
        assert st["status"] == "running"
        assert os.path.exists(handover_path(c.runtime_dir)) is False


def _try_get(port: int, path: str) -> bytes | None:
    try:
        return get(port, path)
    except OSError:
        return None  # not bound yet


# Sent while the api is held back: none of them may be answered by the responder, each must
# get exactly what the api answers the same bytes afterwards.
HELD = {
    "post-configure": b"POST /configure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    "get-with-body": b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    "pipelined": b"GET /info HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "huge-head": b"GET /info HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 5000 + b"\r\nX-B: " + b"b" * 5000
                 + b"\r\nConnection: close\r\n\r\n",
    "readyz": b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "head": b"HEAD /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "bad-header": b"GET /info HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\nConnection: close\r\n\r\n",
}
HALF = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
HALF_REST = b"Connection: close\r\n\r\n"
LATE_REQUEST = b"GET /info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def test_what_arrives_early_gets_the_apis_own_answer_later():
    c = compute_with_api_held_back()
    with c:
        wait_for(lambda: _try_get(c.http_port, "/healthz"), 30, "the responder")
        c.wait_status("running")  # the same state now and when the api answers (/readyz included)
        held = {name: socket.create_connection(("127.0.0.1", c.http_port), timeout=30) for name in HELD}
        for name, data in HELD.items():
            held[name].sendall(data)
        half = socket.create_connection(("127.0.0.1", c.http_port), timeout=30)
        half.sendall(HALF)
        silent = socket.create_connection(("127.0.0.1", c.http_port), timeout=30)
        # Others are answered meanwhile, though these wait.
        for _ in range(3):
            assert from_responder(get(c.http_port, "/status"))
        assert all(nothing_sent(s) for s in [*held.values(), half, silent])

        # Nobody else can take them: not another user (the runtime dir is 0700), not even root
        # (SO_PEERCRED: only the compute's user).
        path = handover_path(c.runtime_dir)
        r = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c",
                            f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
        with socket.socket(socket.AF_UNIX) as thief:
            thief.settimeout(30)
            thief.connect(path)
            try:
                thief.sendall(HELLO)
                msg, fds, _flags, _ = socket.recv_fds(thief, 64, 64)
            except (BrokenPipeError, ConnectionResetError):
                msg, fds = b"", []
            assert (msg, fds) == (b"", [])

        start_api_and_wait_for_hand_over(c)
        assert f"compute-ctl: responder handed over {len(HELD) + 2}" in marks(c)
        half.sendall(HALF_REST)
        silent.sendall(LATE_REQUEST)
        got = {name: read_to_eof(s) for name, s in held.items()}
        got["half"], got["silent"] = read_to_eof(half), read_to_eof(silent)
        for s in [*held.values(), half, silent]:
            s.close()

        reference = {name: exchange(c.http_port, data) for name, data in HELD.items()}
        reference["half"] = exchange(c.http_port, HALF + HALF_REST)
        reference["silent"] = exchange(c.http_port, LATE_REQUEST)
        for name, answer in got.items():  # (nothing had come before the hand-over: the api's)
            assert answer, name
            assert comparable(answer) == comparable(reference[name]), name
        codes = {name: split(a)[0] for name, a in got.items()}
        assert codes["post-configure"] != 503 and codes["readyz"] == 200 and codes["bad-header"] == 400, codes
        assert got["pipelined"].count(b"HTTP/1.1 200 OK") == 2


def test_with_jwks_a_token_the_api_admits_is_answered_early_and_the_rest_waits_for_the_api():
    """With a JWKS, /status & co. need a token (HEAD). compute-ctl's responder answers /healthz,
    and /status for a token the api's own decision admits (here an admin token: this push-mode
    compute has no compute id); it refuses nothing itself: a request without a token, another
    compute's, a forged one, are held and get the api's 400/403/401 once it serves."""
    import jwt
    ed, _, jwks = jwks_keys()
    c = compute_with_api_held_back()
    c.use_jwks(jwks)
    token = token_for(ed)
    with c:
        first = wait_for(lambda: _try_get(c.http_port, "/healthz"), 30, "a first /healthz")
        assert from_responder(first) and split(first)[0] == 200
        ask = functools.partial(send_get, c.http_port)
        # Asked as soon as the socket answers: held until compute-ctl has checked the JWKS and
        # built its settings, then answered by the responder (the api is held back here).
        early = read_to_eof(ask("/status", token))
        assert from_responder(early) and split(early)[0] == 200 and json.loads(split(early)[2])["status"]
        assert from_responder(read_to_eof(ask("/info", token)))
        held = {"status": ask("/status"), "info": ask("/info"), "metrics.json": ask("/metrics.json"),
                "dbs": ask("/dbs_and_roles"),
                "another compute's": ask("/status", token_for(ed, "compute-other")),
                "forged": ask("/status", jwt.encode({"scope": "compute_ctl:admin", "aud": ["compute"]}, "s" * 32,
                                                    algorithm="HS256"))}
        held["configure"] = socket.create_connection(("127.0.0.1", c.http_port), timeout=30)
        held["configure"].sendall(HELD["post-configure"])
        assert from_responder(get(c.http_port, "/healthz"))
        assert all(nothing_sent(s) for s in held.values())
        start_api_and_wait_for_hand_over(c)
        codes = {}
        for name, s in held.items():
            answer = read_to_eof(s)
            s.close()
            assert not from_responder(answer), name
            codes[name] = split(answer)[0]
        assert codes == {"status": 400, "info": 400, "metrics.json": 400, "dbs": 400, "another compute's": 403,
                         "forged": 401, "configure": 400}, codes


def test_a_previous_runs_jwks_file_never_verifies_a_token():
    """RUNTIME_DIR/jwks.json is the hand-off this start writes (-c's compute_ctl_config.jwks) or
    its driver does (v2 pull: once the control plane has answered). A copy a previous run left
    there (the runtime dir outlives a restart) is removed before anyone reads it: while the
    control plane has not answered, a token signed with the old keys is never answered by
    compute-ctl; the api refuses it (401) once the answer's JWKS is written, and admits the new."""
    import threading
    from tests.peers.control_plane import ControlPlanePeer
    old_ed, _, old_jwks = jwks_keys()
    new_ed, _, new_jwks = jwks_keys()
    c = compute_with_api_held_back()
    spec, c.spec = c.spec, None
    c.token = token_for(new_ed)  # status() asks with it (an admin token)
    os.makedirs(c.runtime_dir, mode=0o700, exist_ok=True)
    stale = os.path.join(c.runtime_dir, "jwks.json")
    with open(stale, "w") as f:
        json.dump(old_jwks, f)
    for path, mode in ((c.runtime_dir, 0o700), (stale, 0o600)):
        os.chown(path, PG_USER.uid, PG_USER.gid)
        os.chmod(path, mode)

    def ask(key) -> socket.socket:  # /status with an admin token signed by `key`
        return send_get(c.http_port, "/status", token_for(key))
    answer = threading.Event()
    with ControlPlanePeer(spec, compute_id="compute-1", jwks=new_jwks, answer_after=answer) as cp:
        c.args += ["-i", "compute-1", "-p", cp.url]
        with c:
            try:
                wait_for(lambda: cp.requests and "supervisord: loop" in marks(c), 30,
                         "the driver asking the control plane, supervisord running")
                assert not os.path.exists(stale)  # gone before the responder or the api could read it
                old = ask(old_ed)
                assert from_responder(get(c.http_port, "/healthz"))
            finally:
                answer.set()
            start_api_and_wait_for_hand_over(c)
            c.wait_status("running", timeout=90)  # asked with a token of the answer's keys
            refused = read_to_eof(old)
            old.close()
            assert not from_responder(refused) and split(refused)[0] == 401, refused
            admitted = read_to_eof(ask(new_ed))
            assert split(admitted)[0] == 200, admitted


def test_sigterm_while_the_responder_holds_connections():
    """compute-ctl stops at once, whatever its responder holds: exit 0, nothing left, the
    held clients see their connection end."""
    c = compute_with_api_held_back()
    with c:
        wait_for(lambda: _try_get(c.http_port, "/status"), 30, "the responder")
        held = socket.create_connection(("127.0.0.1", c.http_port), timeout=30)
        held.sendall(HELD["post-configure"])
        assert from_responder(get(c.http_port, "/status"))
        assert nothing_sent(held)
        assert wait_for(lambda: api_state(c), 30, "supervisord") == "STOPPED"
        pids = {p.pid for p in proc_table().values() if c.base in p.cmdline} | {c.proc.pid}
        c.signal(signal.SIGTERM)
        assert c.wait_exit(30) == 0
        try:
            assert read_to_eof(held) == b""
        except ConnectionResetError:
            pass
        held.close()
        assert not any(alive(pid) for pid in pids)
        assert not os.path.exists(handover_path(c.runtime_dir))


def test_an_invalid_spec_still_fails_with_one_line_and_leaves_nothing():
    """The responder may have answered `init` meanwhile; the exit is as before: one line,
    exit 1, no runtime dir, no PGDATA."""
    c = Compute()
    c.spec = {"format_version": 1.0, "cluster": {"roles": "not a list"}}
    try:
        r = subprocess.run(c.command(), capture_output=True, text=True, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("compute-ctl: "), r.stderr
        assert not os.path.exists(c.runtime_dir) and not os.path.exists(c.pgdata)
        with socket.socket() as s:  # the port is free again
            s.bind(("0.0.0.0", c.http_port))
    finally:
        c.close()
