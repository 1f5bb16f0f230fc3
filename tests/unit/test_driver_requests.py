"""The API's half of the requests to the lifecycle driver (compute/shared/driver_requests.py): what a
submit writes, who carries out a /terminate, and how an answer is read. State files only, no
processes (the executors: test_api.py, test_modes.py, the e2e and fault suites)."""

from __future__ import annotations

import pytest

from compute.shared import driver_requests as dr
from compute.lifecycle.driver import Driver, Terminating
from tests.support.api_helpers import make_state, minimal_spec


def test_configure_is_one_transition_and_one_winner(tmp_path):
    store = make_state(str(tmp_path), status="running")
    spec = minimal_spec()
    assert dr.submit_configure(store, spec) == 1
    assert store.get_many(("status", "spec", "spec_generation")) == {
        "status": "configuration_pending", "spec": spec, "spec_generation": 1}
    assert dr.submit_configure(store, minimal_spec()) is None  # a second one while pending
    assert store.get("spec") == spec


def test_configure_keeps_the_spec_it_replaces(tmp_path):
    """For a reconfiguration that changes nothing (postgres rejected its settings) to put back."""
    store = make_state(str(tmp_path), status="running")
    old = minimal_spec()
    store.set(spec=old, spec_generation=4)
    new = {**minimal_spec(), "operation_uuid": "new"}
    assert dr.submit_configure(store, new) == 5
    assert store.get("previous_spec") == {"generation": 5, "spec": old}
    assert store.get("spec") == new


@pytest.mark.parametrize("values,outcome", [
    ({"status": "configuration_pending", "spec_generation": 3, "error": None}, None),
    ({"status": "configuration", "spec_generation": 3, "error": None}, None),
    ({"status": "running", "spec_generation": 3, "error": None}, (True, None)),
    ({"status": "configuration", "spec_generation": 4, "error": None}, (True, None)),  # ours, then another
    ({"status": "failed", "spec_generation": 3, "error": "boom"}, (False, "boom")),
    ({"status": "failed", "spec_generation": 3, "error": None}, (False, "configuration failed")),
    # postgres rejected the settings of ours: back to running, nothing changed, an error all the same
    ({"status": "running", "spec_generation": 3, "error": "x",
      "configure_answer": {"generation": 3, "error": "rejected"}}, (False, "rejected")),
    ({"status": "running", "spec_generation": 3, "error": None,
      "configure_answer": {"generation": 2, "error": "an older one"}}, (True, None)),
    # the driver's answer to ours, read after the next /configure moved the status on: still ours
    ({"status": "configuration_pending", "spec_generation": 4, "error": None,
      "configure_answer": {"generation": 3, "error": "rejected"}}, (False, "rejected")),
    ({"status": "configuration", "spec_generation": 4, "error": None,
      "configure_answer": {"generation": 3, "error": None}}, (True, None)),
    ({"status": "failed", "spec_generation": 3, "error": "boom",
      "configure_answer": {"generation": 3, "error": "boom"}}, (False, "boom")),
])
def test_configure_outcome(values, outcome):
    assert dr.configure_outcome(values, 3) == outcome


def test_promote_claims_a_running_compute_once(tmp_path):
    store = make_state(str(tmp_path), status="running")
    first = dr.submit_promote(store, {"spec": 1}, "0/1")
    assert first is not None and first.id == 1 and first.phase == dr.REQUESTED
    assert store.get("status") == "configuration"
    assert dr.submit_promote(store, {"spec": 2}, "0/2") is None
    assert dr.Promotion.from_json(store.get("promotion")) == first


def test_promotion_outcome():
    p = dr.Promotion(id=2, spec=None, wal_flush_lsn=None)
    assert dr.promotion_outcome({"promotion": p.to_json()}, 2) is None
    started = {**p.to_json(), "phase": dr.STARTED}
    assert dr.promotion_outcome({"promotion": started}, 2) is None
    done = {**p.to_json(), "phase": dr.DONE, "generation": 5}
    assert dr.promotion_outcome({"promotion": done}, 2).generation == 5
    assert dr.promotion_outcome({"promotion": {**p.to_json(), "phase": dr.FAILED, "error": "x"}}, 2).error == "x"
    assert dr.promotion_outcome({"promotion": None}, 2).phase == dr.FAILED


@pytest.mark.parametrize("status,postgres_started,by", [
    ("running", True, dr.DRIVER), ("empty", None, dr.TREE), ("empty", False, dr.TREE)])
def test_who_carries_out_a_terminate(tmp_path, status, postgres_started, by):
    """Decided in the transaction that records the request: the driver when it has started
    postgres, else the tree (no change to postgres, compute/shared/driver_requests.py)."""
    store = make_state(str(tmp_path), status=status, postgres_started=postgres_started)
    call = dr.submit_terminate(store, "fast", waiter=41)
    t = call.request
    assert call.kind == dr.NEW and (t.id, t.mode, t.by, t.phase) == (1, "fast", by, dr.REQUESTED)
    assert store.get_many(("status", "shutdown_requested", "terminate_waiters")) == {
        "status": "termination_pending_fast", "shutdown_requested": True, "terminate_waiters": {"41": 1}}


@pytest.mark.parametrize("status", ["init", "configuration_pending", "configuration", "failed"])
def test_a_terminate_is_refused_unless_empty_or_running(tmp_path, status):
    """Neon's rule (412): nothing recorded, nobody registered, postgres untouched."""
    store = make_state(str(tmp_path), status=status, postgres_started=True)
    call = dr.submit_terminate(store, "immediate", waiter=41)
    assert (call.kind, call.status) == (dr.REFUSED, status)
    assert store.get_many(("status", "terminate", "shutdown_requested", "terminate_waiters")) == {
        "status": status, "terminate": None, "shutdown_requested": False, "terminate_waiters": None}


def test_twin_terminates_share_one_request_and_its_answer(tmp_path):
    """Issue 21: a second and a third call while the first is under way join it (whatever
    their mode); once answered, a repeated call gets the recorded answer (Neon's 201)."""
    store = make_state(str(tmp_path), postgres_started=True)
    first = dr.submit_terminate(store, "fast", waiter=41)
    second = dr.submit_terminate(store, "immediate", waiter=42)
    third = dr.submit_terminate(store, "fast", waiter=41)
    assert (second.kind, third.kind) == (dr.JOINED, dr.JOINED)
    assert second.request == third.request == first.request
    assert store.get("terminate_waiters") == {"41": 2, "42": 1}
    assert store.get("status") == "termination_pending_fast"
    assert dr.termination_outcome({"terminate": store.get("terminate")}, first.request.id) is None
    dr.finish_terminate(store, first.request, lsn="0/1")
    assert store.get("status") == "terminated"
    assert dr.termination_outcome({"terminate": store.get("terminate")}, first.request.id).answer() == (
        200, {"terminated": True, "lsn": "0/1"})
    # a second finisher changes nothing: the first answer stays
    assert dr.finish_terminate(store, first.request, lsn="0/2").lsn == "0/1"
    later = dr.submit_terminate(store, "immediate", waiter=43)
    assert later.kind == dr.ANSWERED and later.request.answer() == (200, {"terminated": True, "lsn": "0/1"})
    for pid in (41, 41, 42):
        dr.leave_terminate(store, pid)
    assert store.get("terminate_waiters") == {}  # the answered call never registered


def test_a_failed_terminate_fails_the_compute(tmp_path):
    store = make_state(str(tmp_path), postgres_started=True)
    call = dr.submit_terminate(store, "fast")
    failed = dr.finish_terminate(store, call.request, error="cannot reach supervisord")
    assert failed.answer() == (500, {"error": "cannot reach supervisord"})
    assert store.get_many(("status", "error")) == {"status": "failed", "error": "cannot reach supervisord"}
    assert dr.submit_terminate(store, "fast").kind == dr.REFUSED


def test_waiters_map():
    assert dr.add_waiter(None, 7, +1) == {"7": 1}
    assert dr.add_waiter({"7": 1}, 7, -1) == {}
    assert dr.add_waiter({"7": 1}, 8, -1) == {"7": 1}  # never negative
    assert dr.add_waiter("garbage", 7, +1) == {"7": 1}


def test_the_driver_never_starts_postgres_once_a_terminate_is_there(tmp_path):
    """The other half of the transaction above: a /terminate that found postgres never started
    stops the tree, so the driver's START_POSTGRES step ends the start-up instead (before it
    asks supervisord: there is none here)."""
    rt = str(tmp_path)
    store = make_state(rt, status="empty")
    dr.submit_terminate(store, "fast")
    with pytest.raises(Terminating):
        Driver(rt).start_postgres()
    assert store.get("postgres_started") is None


def test_a_stop_the_driver_cannot_make_fails_the_compute_and_ends_it(tmp_path, monkeypatch):
    """supervisord refusing the stop: the waiting calls get the error (500), the compute is
    `failed`, and it ends as every failure does (the grace period, then exit 1)."""
    rt = str(tmp_path)
    store = make_state(rt, postgres_started=True)
    call = dr.submit_terminate(store, "fast")
    driver = Driver(rt)
    monkeypatch.setattr(driver, "stop_postgres", lambda mode: ("supervisord refused to stop postgres: BAD", False))
    ended = []
    monkeypatch.setattr(driver, "fail_later", ended.append)
    driver.terminate()
    assert ended == ["supervisord refused to stop postgres: BAD"]
    assert store.get("status") == "failed" and store.get("failed_at") is not None
    t = dr.Termination.from_json(store.get("terminate"))
    assert t.id == call.request.id and t.answer() == (500, {"error": "supervisord refused to stop postgres: BAD"})
