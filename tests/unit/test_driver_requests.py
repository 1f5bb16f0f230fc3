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
      "configure_rejected": {"generation": 3, "error": "rejected"}}, (False, "rejected")),
    ({"status": "running", "spec_generation": 3, "error": None,
      "configure_rejected": {"generation": 2, "error": "an older one"}}, (True, None)),
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


@pytest.mark.parametrize("postgres_started,by", [(True, dr.DRIVER), (None, dr.TREE), (False, dr.TREE)])
def test_who_carries_out_a_terminate(tmp_path, postgres_started, by):
    """Decided in the transaction that records the request: the driver when it has started
    postgres, else the tree (no change to postgres, compute/shared/driver_requests.py)."""
    store = make_state(str(tmp_path), postgres_started=postgres_started)
    t = dr.submit_terminate(store, "fast")
    assert (t.id, t.mode, t.by, t.phase) == (1, "fast", by, dr.REQUESTED)
    assert store.get_many(("shutdown_requested", "terminate_pending")) == {
        "shutdown_requested": True, "terminate_pending": True}


def test_a_second_terminate_joins_the_first_until_it_is_answered(tmp_path):
    store = make_state(str(tmp_path), postgres_started=True)
    first = dr.submit_terminate(store, "fast")
    assert dr.submit_terminate(store, "immediate") == first
    dr.finish_terminate(store, first, lsn="0/1")
    assert dr.termination_outcome({"terminate": store.get("terminate")}, first.id).answer() == (
        200, {"terminated": True, "lsn": "0/1"})
    second = dr.submit_terminate(store, "immediate")
    assert (second.id, second.mode) == (2, "immediate")
    assert dr.termination_outcome({"terminate": second.to_json()}, second.id) is None
    failed = dr.finish_terminate(store, second, error="cannot reach supervisord")
    assert failed.answer() == (500, {"error": "cannot reach supervisord"})


def test_the_driver_never_starts_postgres_once_a_terminate_is_there(tmp_path):
    """The other half of the transaction above: a /terminate that found postgres never started
    stops the tree, so the driver's START_POSTGRES step ends the start-up instead (before it
    asks supervisord: there is none here)."""
    rt = str(tmp_path)
    store = make_state(rt, status="init")
    dr.submit_terminate(store, "fast")
    with pytest.raises(Terminating):
        Driver(rt).start_postgres()
    assert store.get("postgres_started") is None
