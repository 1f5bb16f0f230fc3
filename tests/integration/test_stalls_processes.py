"""The stalls' pieces that need a process (issue 21): a forked child's stdout buffer, and
/metrics' new families checked by promtool. The pure ones are tests/unit/test_stalls.py."""

from __future__ import annotations

import os
import shutil
import time

from falcon.testing import TestClient

from compute.api.app import create_app
from tests.support import promtool
from tests.support.api_helpers import make_state


def test_a_forked_child_starts_with_a_fresh_buffer(pipe):
    from compute.base.stdout_buffer import STDOUT
    r, w = pipe
    STDOUT.dropped += 0  # the module's instance is the one reset at fork
    pid = os.fork()
    if pid == 0:  # the child: a fresh lock (maybe held by a writer in the parent), no thread
        ok = STDOUT._thread is None and STDOUT._cond.acquire(timeout=1) and STDOUT.dropped == 0
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_prometheus_shows_the_monitors_progress_and_the_dropped_lines(tmp_path):
    rt = str(tmp_path)

    def client_for(runtime_dir: str) -> TestClient:
        return TestClient(create_app(runtime_dir))
    store = make_state(rt, status="running")
    page = client_for(rt).simulate_get("/metrics").text
    assert "compute_log_lines_dropped_total 0\n" in page
    assert "compute_monitor_stall_restarts_total 0\n" in page
    assert "compute_monitor_seconds_since_tick" not in page  # no tick yet: nothing to say
    store.set(monitor_tick=time.time() - 12, monitor_stall_restarts=1, log_lines_dropped=4321)
    page = client_for(rt).simulate_get("/metrics").text
    assert "compute_log_lines_dropped_total 4321\n" in page
    assert "compute_monitor_stall_restarts_total 1\n" in page
    since = float(page.split("\ncompute_monitor_seconds_since_tick ")[1].split()[0])
    assert 12 <= since < 60
    assert "# TYPE compute_log_lines_dropped_total counter" in page
    assert shutil.which("promtool"), "promtool (Debian's prometheus package; scripts/install.sh with WITH_TESTS=1)"
    promtool.check_clean(page)
