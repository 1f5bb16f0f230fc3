"""The start's storage request runs while compute-ctl is still becoming supervisord (issue 22):
the lifecycle driver is forked before supervisord's loop, starts `--sync-safekeepers` (or
initdb) before it imports the rest of itself, and supervisord adopts that very process as its
`lifecycle` program. Read from the tree's ordered trace (COMPUTE_TRACE: one clock, every
process)."""

from __future__ import annotations

import json
import os
import socket
from collections import Counter

from compute.base.trace import read
from compute.tree.early_driver import FORKED_PROGRAMS_HELD_AT_MOST
from tests.peers.control_plane import ControlPlanePeer
from tests.peers.pageserver import PageserverPeer
from tests.peers.sync_safekeepers import write_fake_postgres
from tests.support.tree import Compute, with_neon_storage
from tests.support.waiting import wait_for

TENANT, TIMELINE = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9"
TOKEN = "early-storage-token"


def traced(c: Compute) -> Compute:
    c.trace = os.path.join(c.base, "trace")
    os.close(os.open(c.trace, os.O_CREAT | os.O_WRONLY, 0o666))
    os.chmod(c.trace, 0o666)  # appended to by the tree as the compute user
    c.env["COMPUTE_TRACE"] = c.trace
    return c


def events_once(c: Compute, *marks: str) -> list[tuple[float, int, str]]:
    """The trace once each of `marks` is in it (the api and the monitor come after the start-up)."""
    want = Counter(marks)

    def seen():
        events = read(c.trace)
        have = Counter(e for _, _, e in events)
        return events if all(have[m] >= n for m, n in want.items()) else None
    return wait_for(seen, 30, f"{marks} in the trace")


def first(events: list[tuple[float, int, str]], prefix: str) -> tuple[float, int]:
    """(time, pid) of the first mark starting with `prefix`."""
    found = [(t, pid) for t, pid, event in events if event.startswith(prefix)]
    assert found, f"no {prefix!r} in {[e for _, _, e in events]}"
    return found[0]


def hold_ran_out(events, warming_t: float) -> bool:
    """Whether supervisord's warm-up came because its hold on the forked programs ran out
    (FORKED_PROGRAMS_HELD_AT_MOST after its loop started: a start-up slowed by a loaded
    machine), not because of what ends the hold. The loop's mark is written just before the
    hold's clock starts, so a warm-up earlier than this bound was not the time-out's."""
    return warming_t >= first(events, "supervisord: loop")[0] + FORKED_PROGRAMS_HELD_AT_MOST


def assert_early(events, request: str) -> None:
    req_t, req_pid = first(events, f"lifecycle: storage request: {request}")
    forked_t, ctl_pid = first(events, "compute-ctl: lifecycle forked early")
    loop_t, loop_pid = first(events, "supervisord: loop")
    adopted_t, _ = first(events, "supervisord: lifecycle adopted")
    assert forked_t < loop_t <= adopted_t and ctl_pid == loop_pid  # compute-ctl forked, then became supervisord
    # the request was made before the programs' warm image and the api existed
    assert req_t < first(events, "supervisord: warm (all)")[0] < first(events, "api: master listening")[0]
    assert req_t < first(events, "lifecycle: wait_for_spec")[0]  # before the driver proper ran
    # one driver from the request to the hand-over: supervisord took over the process that made it
    assert req_pid == first(events, "lifecycle: forked")[1] == first(events, "lifecycle: hand_over")[1]
    assert req_pid != ctl_pid
    print(f"\n{request}: request {1000 * (req_t - forked_t):.0f} ms after the fork, "
          f"supervisord's loop {1000 * (loop_t - forked_t):.0f} ms after it")


def test_the_sync_starts_before_supervisord_and_the_api_are_up(bb_tar: str) -> None:
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = traced(Compute())
        c.pgbin = write_fake_postgres(c.base)
        c.spec = with_neon_storage(c.new_spec(), ps.connstr, TENANT, TIMELINE, "127.0.0.1:5454", TOKEN)
        with c:
            c.wait_status("running", timeout=90)
            assert c.metrics()["sync_safekeepers_retries"] == 0
            events = events_once(c, "api: master listening")
    assert_early(events, "sync-safekeepers")
    # the sync's own time counts from the early request (the metric is what the start waited)
    syncs = [e for _, _, e in events if e.startswith("lifecycle: storage request")]
    assert syncs == ["lifecycle: storage request: sync-safekeepers"]  # one attempt: the early one


def test_initdb_starts_before_supervisord_and_the_api_are_up() -> None:
    c = traced(Compute())
    c.spec = c.new_spec()
    with c:
        c.wait_status("running", timeout=90)
        events = events_once(c, "api: master listening")
    assert_early(events, "initdb")
    assert not os.path.exists(os.path.join(c.runtime_dir, "initdb.pw"))  # its password file is gone


def test_pull_mode_fetches_the_spec_before_any_storage_request() -> None:
    """No spec stored: nothing starts early; the driver fetches it, then initdb runs."""
    with ControlPlanePeer(None) as cp:
        c = traced(Compute())
        c.args = ["-i", "compute-1", "-p", cp.url, "--control-plane-api", "2023"]
        c.env["NEON_CONSOLE_JWT"] = "console-jwt"
        cp.spec = c.new_spec()
        with c:
            c.wait_status("running", timeout=90)
            events = read(c.trace)
    assert first(events, "lifecycle: wait_for_spec")[0] < first(events, "lifecycle: storage request: initdb")[0]


# Not the responder's to answer (a POST): held until the api takes it. An empty spec: refused by
# the api's validation, nothing changes.
HELD_REQUEST = (b"POST /configure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")


def _held_request(port: int) -> socket.socket | None:
    """A request the early responder does not answer itself, sent as soon as the socket is bound."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
    except OSError:
        return None  # not bound yet
    s.sendall(HELD_REQUEST)
    return s


def test_postgres_is_spawned_before_the_apis_warm_image_which_then_serves() -> None:
    """While the early driver runs the start-up, supervisord neither warms the api's and the
    monitor's image nor starts them: postgres' spawn does not wait behind that. The api comes
    after, forked from the whole image (the hand-over's driver too), and answers what was held."""
    c = traced(Compute())
    c.spec = c.new_spec()
    with c:
        s = wait_for(lambda: _held_request(c.http_port), 30, "the API socket")
        with s:
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        c.wait_status("running", timeout=90)
        c.wait_handed_over()
        events = events_once(c, "lifecycle: forked", "lifecycle: forked", "monitor: forked")
    head = answer.partition(b"\r\n\r\n")[0]
    assert b"\r\nServer: " in head and head.split(b" ")[1] in (b"400", b"412", b"422"), answer  # the api's
    assert any(e.startswith("compute-ctl: responder handed over") and not e.endswith(" 0") for _, _, e in events)
    exec_t, _ = first(events, "exec: postgres")
    warming_t, ctl_pid = first(events, "supervisord: warming (all)")
    assert warming_t < first(events, "supervisord: warm (all)")[0] < first(events, "api: forked")[0]
    if not hold_ran_out(events, warming_t):
        # the hold ends when the early driver exits: at its hand-over, long after postgres' exec
        early_pid = first(events, "lifecycle: forked")[1]
        handed_t = next(t for t, pid, e in events if e == "lifecycle: hand_over" and pid == early_pid)
        assert exec_t < handed_t < warming_t
        assert exec_t < first(events, "monitor: forked")[0]
    else:
        print(f"\nthe hold ran out: postgres' exec {1000 * (exec_t - warming_t):+.0f} ms from the warm-up's start")
    # one warm-up, in compute-ctl, before any program is forked from it: the hand-over's driver too
    assert [pid for _, pid, e in events if e == "supervisord: warming (all)"] == [ctl_pid]
    early_pid = first(events, "lifecycle: forked")[1]
    forked_later = [(t, e) for t, pid, e in events if e.endswith(": forked") and pid != early_pid]
    assert forked_later and all(t > warming_t for t, _ in forked_later), forked_later
    assert any(e == "lifecycle: forked" for _, e in forked_later)


def test_with_a_jwks_a_token_holder_is_answered_by_compute_ctl_and_the_api_waits_as_without() -> None:
    """With a JWKS compute-ctl's responder answers a token holder's /status itself (the api's
    own decision admits the token), so the forked programs are held as without a JWKS: the
    api's warm-up follows the early driver's hand-over, not postgres' spawn."""
    from tests.support.api_helpers import jwks_keys, read_to_eof, send_get, split, token_for
    ed, _, jwks = jwks_keys()
    c = traced(Compute())
    c.spec = c.new_spec()
    c.use_jwks(jwks, token_for(ed))  # an admin token (this push-mode compute has no compute id): status() sends it
    with c:
        events_once(c, "compute-ctl: tree files written")  # the responder takes tokens from here on
        code, headers, body = split(read_to_eof(send_get(c.http_port, "/status", c.token, timeout=60)))
        handed_over = any(e.startswith("compute-ctl: responder handed over") for _, _, e in read(c.trace))
        assert code == 200 and json.loads(body)["status"] in ("init", "running"), body
        assert handed_over or "server" not in headers, headers  # compute-ctl's answer, not gunicorn's
        c.wait_status("running", timeout=90)
        events = events_once(c, "api: master listening", "lifecycle: hand_over")
    warming_t, _ = first(events, "supervisord: warming (all)")
    if not hold_ran_out(events, warming_t):
        early_pid = first(events, "lifecycle: forked")[1]
        handed_t = next(t for t, pid, e in events if e == "lifecycle: hand_over" and pid == early_pid)
        assert first(events, "exec: postgres")[0] < handed_t < warming_t
    else:
        print("\nthe hold ran out before the early driver's hand-over")
