"""EarlyStart.running() (compute/lifecycle/early.py): the driver imports supervisor's RPC client
beside its early storage request only while that request still runs (issue 22)."""

from __future__ import annotations

import subprocess
import time

import pytest

from compute.lifecycle.early import EarlyStart
from compute.lifecycle.steps import EarlyRequest
from compute.storage.safekeepers import Started


@pytest.mark.parametrize("request_kind", [EarlyRequest.SYNC_SAFEKEEPERS, EarlyRequest.INITDB])
def test_running_while_the_process_runs_not_after(request_kind) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    # The sync's Popen comes wrapped (safekeepers.Started), initdb's as it is.
    started = Started(proc, time.monotonic() + 30) if request_kind is EarlyRequest.SYNC_SAFEKEEPERS else proc
    early = EarlyStart(request_kind, started, time.monotonic())
    try:
        assert early.running()
    finally:
        proc.kill()
        proc.wait()
    assert not early.running()
