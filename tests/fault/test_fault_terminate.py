"""/terminate against faults (issue 21, item 3): the api's whole process group killed -9 while a
/terminate waits for the sync-safekeepers that follows the shutdown. The sync runs in the
lifecycle driver, not in the api, so it is not lost: the tree waits for its answer (the
recorded LSN), a retry sent to the restarted api gets it, and nothing of the tree is left."""

from __future__ import annotations

import os
import signal

from compute.shared import driver_requests as dr
from compute.shared.state import StateStore, state_path
from tests.support.fault_tree import program_child, supervisord_pid
from tests.support.terminate_rig import LSN, GatedNeonCompute, waiting_calls, status_of
from tests.support.waiting import wait_for


def kill_api_group(c) -> int:
    """kill -9 of the api program's process group (gunicorn master and workers); its old master."""
    sup = supervisord_pid(c.runtime_dir)
    master = program_child(sup, "api")
    assert master, "no api master"
    group = os.getpgid(master)
    assert group == master  # supervisord makes each program a process group of its own
    os.killpg(group, signal.SIGKILL)
    return master


def new_api_serving(c, old_master: int) -> None:
    sup = supervisord_pid(c.runtime_dir)
    wait_for(lambda: (m := program_child(sup, "api")) and m != old_master, 30, "a new api master", 0.02)
    wait_for(lambda: c.status() is not None, 30, "the new api to answer", 0.02)


def recorded_answer(c) -> dict:
    store = StateStore(state_path(c.runtime_dir))
    try:
        return dr.Termination.from_json(store.get("terminate")).to_json()
    finally:
        store.close()


def test_kill_9_of_the_api_during_terminate_loses_no_lsn_and_a_retry_gets_it():
    with GatedNeonCompute() as g:
        c = g.c
        first = g.terminate()
        g.wait_sync_held()
        old = kill_api_group(c)
        assert first.exception(30) is not None  # its connection died with the worker
        new_api_serving(c, old)
        assert status_of(c) == "termination_pending_fast"  # the driver's sync goes on
        retry = g.terminate()
        wait_for(lambda: waiting_calls(c) >= 2, 30, "the retry to join (beside the dead call's entry)", 0.02)
        assert not retry.done()
        g.release()
        assert retry.result(60) == (200, {"terminated": True, "lsn": LSN})
        assert g.exited_leaving_nothing() == 0
        assert len(g.syncs()) == 2  # the start's and the one /terminate started: not run again


def test_kill_9_of_the_api_during_terminate_without_a_retry_still_waits_for_the_sync():
    """Nobody is left waiting (the killed worker's call does not count), yet the tree stays up
    until the driver has the LSN: it is recorded, then the tree exits 0 with nothing left."""
    with GatedNeonCompute() as g:
        c = g.c
        first = g.terminate()
        g.wait_sync_held()
        old = kill_api_group(c)
        assert first.exception(30) is not None
        new_api_serving(c, old)  # supervisord restarts it: the tree is not being stopped
        assert c.proc.poll() is None and status_of(c) == "termination_pending_fast"
        assert waiting_calls(c) == 1  # the dead worker's entry: ignored by the tree
        g.release()
        assert g.exited_leaving_nothing() == 0
        assert "postgres is down" in c.output()
        assert recorded_answer(c)["lsn"] == LSN and recorded_answer(c)["phase"] == dr.DONE
