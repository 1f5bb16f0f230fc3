"""End to end, /terminate as Neon's compute_ctl at HEAD answers it (issue 18, item 7) and twin
calls (issue 21, item 3): the termination states on /status and /metrics, 412 outside `empty`
and `running`, one request whatever the number of calls, every call answered once postgres is
down with the same LSN, 201 with the recorded answer once `terminated`.

The Neon path with the sync-safekeepers stand-in (tests/peers/sync_safekeepers.py): its gate
holds the sync /terminate runs after the shutdown, so the test sees the compute between
"postgres is down" and "the LSN is known" for as long as it wants, without sleeping.
"""

from __future__ import annotations

import json
import socket
import urllib.error

import pytest

from tests.support.terminate_rig import (LSN, GatedNeonCompute, ctl_up, holding_the_tree, waiting_calls,
                                         postgres_down, status_of)
from tests.support.waiting import wait_for


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
        assert g.exited_leaving_nothing() == 0
        assert len(g.syncs()) == 2  # the start's and one for all the /terminate calls


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_two_at_once_get_the_same_lsn(mode):
    with GatedNeonCompute() as g:
        calls = [g.terminate(mode), g.terminate(mode)]
        g.wait_sync_held()
        assert status_of(g.c) == f"termination_pending_{mode}"
        assert ctl_up(g.c) == f"termination-pending-{mode}"
        g.release()
        assert [f.result(60) for f in calls] == [(200, {"terminated": True, "lsn": LSN})] * 2
        assert g.exited_leaving_nothing() == 0
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
        # the impatient call's thread still waits in the api (counted), the retry beside it
        wait_for(lambda: waiting_calls(g.c) >= 2, 30, "the retry to join", 0.02)
        assert not retry.done()
        g.release()
        assert retry.result(60) == (200, {"terminated": True, "lsn": LSN})
        assert g.exited_leaving_nothing() == 0
        assert len(g.syncs()) == 2
