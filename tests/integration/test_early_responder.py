"""compute-ctl's early responder (compute/boot/early_responder.py) and the hand-over of what it holds
(compute/api/handover.py), in this process: a real listening socket on loopback, raw client
sockets, the worker's end of the hand-over (take_held) as the api worker calls it. The whole
tree (the responder in compute-ctl, the api taking over) is in tests/e2e/test_e2e_early_status.py.

This file: other users, forks and gunicorn; the rest: tests/unit/test_early_responder.py."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading

from compute.api import bodies
from compute.api.handover import HELLO, handover_path, take_held
from compute.boot.early_responder import HOLD, MORE, classify
from compute.shared.state import StateStore, state_path
from tests.support.api_helpers import make_state
from tests.support.early_rig import STARTED, Rig, body_of, read_to_eof, rig
from tests.support.waiting import wait_for

__all__ = ["rig"]  # the fixture


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
