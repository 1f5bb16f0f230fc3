"""End to end, /terminate as Neon's compute_ctl at HEAD answers it (issue 18, item 7) and twin
calls (issue 21, item 3): the termination states on /status and /metrics, 412 outside `empty`
and `running`, one request whatever the number of calls, every call answered once postgres is
down with the same LSN, 201 with the recorded answer once `terminated`.

The Neon path with the sync-safekeepers stand-in (tests/peers/sync_safekeepers.py): its gate
holds the sync /terminate runs after the shutdown, so the test sees the compute between
"postgres is down" and "the LSN is known" for as long as it wants, without sleeping.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import socket
import urllib.error

from compute.shared import driver_requests as dr
from compute.shared.state import StateStore, state_path
from tests.support.tree import Compute
from tests.support.waiting import wait_for

TENANT, TIMELINE, TOKEN = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9", "tok.en"
LSN = "0/2A3B4C8"  # what the stand-in's sync answers


class GatedNeonCompute:
    """A primary on the Neon path whose sync-safekeepers after the shutdown waits for `release()`."""

    def __init__(self) -> None:
        from tests.peers.pageserver import PageserverPeer, make_basebackup_tar
        from tests.peers.sync_safekeepers import write_fake_postgres
        from tests.support.pgcluster import scratch_dir
        from tests.support.tree import with_neon_storage
        self.stack = contextlib.ExitStack()
        tar = make_basebackup_tar(os.path.join(scratch_dir("cs-bb-"), "basebackup.tar"))
        ps = self.stack.enter_context(PageserverPeer(tar, password=TOKEN, tenant_id=TENANT, timeline_id=TIMELINE))
        c = self.c = Compute()
        c.pgbin = write_fake_postgres(c.base)
        self.record = os.path.join(c.base, "sync.json")
        self.gate = os.path.join(c.base, "sync.gate")
        c.env = {"FAKE_SK_RECORD": self.record, "FAKE_SK_EXPECT_TOKEN": TOKEN, "FAKE_SK_LSN": LSN,
                 "FAKE_SK_GATE": self.gate}
        c.spec = with_neon_storage(c.new_spec(), ps.connstr, TENANT, TIMELINE, "127.0.0.1:5454", TOKEN)
        self.pool = concurrent.futures.ThreadPoolExecutor(8)

    def __enter__(self) -> "GatedNeonCompute":
        self.stack.enter_context(self.c)
        self.c.wait_status("running", timeout=90)
        open(f"{self.gate}.armed", "w").close()  # from now on the sync waits for the gate
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.stack.close()

    def terminate(self, mode: str | None = None, timeout: float = 60):
        """POST /terminate in a thread: a future of (code, body as JSON)."""
        path = "/terminate" if mode is None else f"/terminate?mode={mode}"

        def call():
            code, body = self.c.request("POST", path, timeout=timeout)
            return code, json.loads(body)
        return self.pool.submit(call)

    def wait_sync_held(self) -> None:
        wait_for(lambda: os.path.exists(f"{self.gate}.waiting"), 60, "the sync after the shutdown to start", 0.02)

    def release(self) -> None:
        if not os.path.exists(self.gate):
            open(self.gate, "w").close()

    def syncs(self) -> list:
        with open(self.record) as f:
            return json.load(f)


def ctl_up(c: Compute) -> str:
    """The status Neon's compute_ctl_up{build_tag,status} names (one sample, value 1)."""
    _, body = c.request("GET", "/metrics")
    ups = [line for line in body.decode().splitlines() if line.startswith("compute_ctl_up{")]
    assert len(ups) == 1 and ups[0].endswith("} 1"), ups
    return ups[0].split('status="')[1].split('"')[0]


def status_of(c: Compute) -> str:
    return c.status()["status"]


def postgres_down(c: Compute) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", c.pg_port), timeout=1):
            return False
    except OSError:
        return True


@contextlib.contextmanager
def holding_the_tree(c: Compute):
    """A waiting caller that never finishes: a live process registered as waiting for the
    answer keeps the tree up after `terminated` (compute/tree/exit_decision.hold_for_terminate)
    until it leaves. Here the test process itself, joining the request under way: the only way
    to look at a `terminated` compute for as long as a test needs (we do not linger: docs/api.md)."""
    store = StateStore(state_path(c.runtime_dir))
    call = dr.submit_terminate(store, "fast", waiter=os.getpid())
    assert call.kind == dr.JOINED, call
    try:
        yield
    finally:
        dr.leave_terminate(store, os.getpid())
        store.close()


def test_three_twin_terminates_get_one_answer_after_postgres_is_down_then_201():
    with GatedNeonCompute() as g:
        c = g.c
        first = g.terminate()
        g.wait_sync_held()  # postgres is down, the LSN not known yet
        assert postgres_down(c)
        twins = [g.terminate("immediate"), g.terminate()]  # joined: the first call's mode stays
        with holding_the_tree(c):
            assert status_of(c) == "termination_pending_fast"
            for path, method in (("/check_writability", "POST"), ("/insights", "GET")):
                code, body = c.request(method, path)
                assert (code, json.loads(body)) == (412, {"error": "invalid compute status: termination-pending-fast"})
            assert ctl_up(c) == "termination-pending-fast"
            assert not any(f.done() for f in [first, *twins])  # no answer before the LSN is known
            g.release()
            answers = [f.result(60) for f in [first, *twins]]
            assert answers == [(200, {"terminated": True, "lsn": LSN})] * 3
            # terminated, and the tree still up for our held call: the recorded answer, 201
            assert status_of(c) == "terminated"
            code, body = c.request("POST", "/terminate?mode=immediate")
            assert (code, json.loads(body)) == (201, {"terminated": True, "lsn": LSN})
            assert ctl_up(c) == "terminated"
            for path, method in (("/check_writability", "POST"), ("/insights", "GET")):
                code, body = c.request(method, path)
                assert (code, json.loads(body)) == (412, {"error": "invalid compute status: terminated"})
        assert c.wait_exit(30) == 0
        assert len(g.syncs()) == 2  # the start's and one for all the /terminate calls


def test_two_at_once_get_the_same_lsn():
    with GatedNeonCompute() as g:
        calls = [g.terminate(), g.terminate()]
        g.wait_sync_held()
        g.release()
        assert [f.result(60) for f in calls] == [(200, {"terminated": True, "lsn": LSN})] * 2
        assert g.c.wait_exit(30) == 0
        assert len(g.syncs()) == 2


def test_a_retry_after_a_client_timeout_gets_the_first_calls_answer():
    """A control plane whose client gives up while the sync runs, and asks again: the retry
    joins the request under way and gets its LSN (the first call's sync is not run again)."""
    with GatedNeonCompute() as g:
        impatient = g.terminate(timeout=0.5)
        g.wait_sync_held()
        exc = impatient.exception(30)
        assert isinstance(exc, (TimeoutError, socket.timeout, urllib.error.URLError)), exc
        retry = g.terminate()
        wait_for(lambda: live_waiters(g.c) >= 1 and not retry.done(), 30, "the retry to join", 0.02)
        g.release()
        assert retry.result(60) == (200, {"terminated": True, "lsn": LSN})
        assert g.c.wait_exit(30) == 0
        assert len(g.syncs()) == 2


def live_waiters(c: Compute) -> int:
    store = StateStore(state_path(c.runtime_dir))
    try:
        return sum((store.get(dr.WAITERS) or {}).values())
    finally:
        store.close()
