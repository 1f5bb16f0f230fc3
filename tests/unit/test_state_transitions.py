"""The status transitions table, as the state store enforces it (no postgres, milliseconds)."""

from __future__ import annotations

import itertools

import pytest

from compute.shared.state import ALLOWED_TRANSITIONS, IllegalTransition, StateStore, Status, check_transition, hyphenated

LEGAL = {
    ("init", "init"), ("init", "empty"), ("init", "running"), ("init", "failed"),
    ("empty", "configuration_pending"), ("empty", "failed"),
    ("configuration_pending", "init"), ("configuration_pending", "configuration"),
    ("configuration_pending", "failed"),
    ("running", "configuration_pending"), ("running", "configuration"),
    ("configuration", "running"), ("configuration", "configuration_pending"), ("configuration", "failed"),
    # /terminate (Neon's rule: only from empty or running), then its answer
    ("empty", "termination_pending_fast"), ("empty", "termination_pending_immediate"),
    ("running", "termination_pending_fast"), ("running", "termination_pending_immediate"),
    ("termination_pending_fast", "terminated"), ("termination_pending_immediate", "terminated"),
    ("termination_pending_fast", "failed"), ("termination_pending_immediate", "failed"),
}


def test_every_status_has_a_row():
    assert set(ALLOWED_TRANSITIONS) == set(Status)


@pytest.mark.parametrize("src,dst", list(itertools.product([s.value for s in Status], repeat=2)))
def test_store_enforces_the_table(tmp_path, src, dst):
    store = StateStore.create(str(tmp_path / "state.db"), {"status": src, "error": None})
    if (src, dst) in LEGAL:
        store.set(status=dst, error="x")
        assert (store.get("status"), store.get("error")) == (dst, "x")
    else:
        with pytest.raises(IllegalTransition, match=f"{src} cannot become {dst}"):
            store.set(status=dst, error="x")
        assert (store.get("status"), store.get("error")) == (src, None)  # nothing written
        # the compare-and-set path refuses it the same way, even when allowed_from matches
        with pytest.raises(IllegalTransition):
            store.transition({src}, dst, error="x")
        assert (store.get("status"), store.get("error")) == (src, None)


def test_failed_is_final():
    assert ALLOWED_TRANSITIONS[Status.FAILED] == frozenset()


def test_terminated_is_final():
    assert ALLOWED_TRANSITIONS[Status.TERMINATED] == frozenset()


def test_neon_status_names():
    """HEAD's ComputeStatus (libs/compute_api/src/responses.rs) serialised snake_case, but the
    Hadron-only refresh states."""
    assert [s.value for s in Status] == [
        "empty", "configuration_pending", "init", "running", "configuration", "failed",
        "termination_pending_fast", "termination_pending_immediate", "terminated"]
    assert hyphenated("termination_pending_fast") == "termination-pending-fast"


@pytest.mark.parametrize("bad", ["stopped", "", None, 3, "RUNNING"])
def test_unknown_status_is_refused(tmp_path, bad):
    store = StateStore.create(str(tmp_path / "state.db"), {"status": "init"})
    with pytest.raises(IllegalTransition, match="unknown status"):
        store.set(status=bad, other=1)
    assert store.get("other") is None and store.get("status") == "init"


def test_unknown_stored_status_is_refused():
    with pytest.raises(IllegalTransition, match="stored status 'zombie' is unknown"):
        check_transition("zombie", "running")


def test_compare_and_set_still_loses_quietly(tmp_path):
    """A lost race (status not among allowed_from) is False, not an error."""
    store = StateStore.create(str(tmp_path / "state.db"), {"status": "running"})
    assert store.transition({"configuration_pending"}, "configuration") is False
    assert store.transition({"running"}, "configuration_pending", bump="gen") == 1
    assert store.get("status") == "configuration_pending"


def test_enum_values_are_the_wire_strings():
    assert Status.RUNNING == "running" and check_transition(None, "running") is Status.RUNNING
