"""A booted primary on the Neon path whose /terminate can be held between "postgres is down" and
"the LSN is known" (the sync-safekeepers stand-in's gate, tests/peers/sync_safekeepers.py), and
the looks a /terminate test needs (tests/e2e/test_e2e_terminate.py, tests/fault/test_fault_terminate.py)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import socket

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
        from tests.support.exit_paths import TreeRecord
        self.stack.enter_context(self.c)
        self.c.wait_status("running", timeout=90)
        self.rec = TreeRecord(self.c.proc.pid).keep_recording()
        self.stack.callback(self.rec.kill_survivors)
        self.stack.callback(self.rec.stop)
        open(f"{self.gate}.armed", "w").close()  # from now on the sync waits for the gate
        return self

    def exited_leaving_nothing(self, timeout: float = 30) -> int:
        """compute-ctl's exit code, once it has exited with no process of the tree left."""
        code = self.c.wait_exit(timeout)
        self.rec.stop()
        assert self.rec.survivors() == [], f"left behind: {self.rec.survivors()}"
        return code

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


def waiting_calls(c: Compute) -> int:
    """The /terminate calls counted as waiting, in live processes or not."""
    store = StateStore(state_path(c.runtime_dir))
    try:
        return sum((store.get(dr.WAITERS) or {}).values())
    finally:
        store.close()
