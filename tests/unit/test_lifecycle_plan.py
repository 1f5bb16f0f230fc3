"""The lifecycle driver's restart/resume matrix, decided without processes (milliseconds): a
driver killed at every step of its life, and what its successor then does. The executors are
exercised against real postgres in test_lifecycle_resume.py and, kill -9 end to end, in the
fault suite (test_fault_exit.py, test_fault_kill.py)."""

from __future__ import annotations

import dataclasses

import pytest

from compute.lifecycle.steps import (STARTUP_STEPS, DriverView, Readiness, DriverStep, concurrent_step, grace_remaining,
                                    idle, pending_request, plan_run, readiness, wants_reconfiguration)

S = DriverStep
FROM_SCRATCH = (S.WAIT_FOR_SPEC, S.PREPARE_DATA, S.START_POSTGRES, S.WAIT_READY, S.APPLY, S.MARK_RUNNING, S.HAND_OVER)
REUSE_POSTGRES = (S.WAIT_FOR_SPEC, S.WAIT_READY, S.END_STALE_SESSIONS, S.APPLY, S.MARK_RUNNING, S.HAND_OVER)
REAPPLY = (S.END_STALE_SESSIONS, S.REQUEUE_CONFIGURATION, S.SERVE, S.HAND_OVER)
PROMOTE = (S.PROMOTE, S.SERVE, S.HAND_OVER)
TERMINATE = (S.TERMINATE, S.WAIT_FOR_STOP)

MATRIX = {
    # first start: nothing happened yet
    "fresh start": (DriverView("init", postgres_state="STOPPED"), FROM_SCRATCH),
    # killed before the spec arrived (empty compute waiting for /configure)
    "before spec, waiting for /configure": (DriverView("empty", postgres_state="STOPPED"), FROM_SCRATCH),
    "spec handed over, not yet taken": (DriverView("configuration_pending", postgres_state="STOPPED"),
                                        FROM_SCRATCH),
    # killed during storage (sync-safekeepers, basebackup, initdb): PGDATA is emptied again
    "during storage": (DriverView("init", postgres_state="STOPPED"), FROM_SCRATCH),
    # supervisord gave up on postgres while the driver was away: start it again, from scratch
    "postgres exited before ready": (DriverView("init", postgres_state="EXITED"), FROM_SCRATCH),
    # postgres running but the start unfinished: keep postgres, apply again
    "postgres starting": (DriverView("init", postgres_state="STARTING"), REUSE_POSTGRES),
    "postgres running, apply unfinished": (DriverView("init", postgres_state="RUNNING"), REUSE_POSTGRES),
    # failed start: finish the grace period, then exit 1
    "failed start in grace period": (DriverView("failed", postgres_state="RUNNING"), (S.FAIL_LATER,)),
    "failed start, postgres gone": (DriverView("failed", postgres_state="EXITED"), (S.FAIL_LATER,)),
    # after the start: serve, re-applying a configuration a killed driver left half done
    "running": (DriverView("running", startup_done=True), (S.SERVE, S.HAND_OVER)),
    "configuration pending": (DriverView("configuration_pending", startup_done=True), (S.SERVE, S.HAND_OVER)),
    "configuration in progress": (DriverView("configuration", startup_done=True), REAPPLY),
    # an earlier promotion's record (answered) does not make a re-apply a promotion
    "configuration in progress after a promotion": (DriverView("configuration", startup_done=True,
                                                               promotion="done"), REAPPLY),
    "configuration in progress after a failed promotion": (DriverView("configuration", startup_done=True,
                                                                      promotion="failed"), REAPPLY),
    # /promote claimed the compute (`configuration` + its request): the driver promotes; one
    # killed in the middle of it promotes again (it finds out how far its predecessor got)
    "promote requested": (DriverView("configuration", startup_done=True, promotion="requested"), PROMOTE),
    "promote in progress": (DriverView("configuration", startup_done=True, promotion="started"), PROMOTE),
    # /terminate for the driver: carried out first, whatever else was going on, then nothing more
    "terminate requested, running": (DriverView("running", startup_done=True, termination="requested"), TERMINATE),
    "terminate requested, configuring": (DriverView("configuration", startup_done=True, promotion="started",
                                                    termination="requested"), TERMINATE),
    "terminate requested during start-up": (DriverView("init", termination="requested"), TERMINATE),
    "terminate in progress": (DriverView("running", startup_done=True, termination="started"), TERMINATE),
    "terminate in progress, failed start": (DriverView("failed", termination="started"), TERMINATE),
    # answered, or one the API carries out (postgres never ran): never start anything again
    "terminated": (DriverView("running", startup_done=True, termination="done"), (S.WAIT_FOR_STOP,)),
    "terminate by the tree, empty": (DriverView("empty", postgres_state="STOPPED", termination="tree"),
                                     (S.WAIT_FOR_STOP,)),
    "terminate by the tree, during storage": (DriverView("init", termination="tree"), (S.WAIT_FOR_STOP,)),
    # a failed reconfiguration keeps the compute up with the error (no grace-period exit)
    "reconfiguration failed": (DriverView("failed", startup_done=True), (S.SERVE, S.HAND_OVER)),
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_restart_resume_matrix(case):
    view, expected = MATRIX[case]
    assert plan_run(view) == expected


@pytest.mark.parametrize("case", list(MATRIX))
def test_every_plan_is_well_formed(case):
    plan = plan_run(MATRIX[case][0])
    # postgres is started only on an emptied, freshly filled PGDATA, and never twice
    if S.START_POSTGRES in plan:
        assert plan.index(S.PREPARE_DATA) < plan.index(S.START_POSTGRES) < plan.index(S.WAIT_READY)
        assert S.END_STALE_SESSIONS not in plan
    # the spec is applied only once postgres is ready, and the compute marked running after it
    if S.APPLY in plan:
        assert plan.index(S.WAIT_FOR_SPEC) < plan.index(S.WAIT_READY) < plan.index(S.APPLY) \
            < plan.index(S.MARK_RUNNING)
    # a plan either hands over to a fresh driver, ends the tree, or waits for the tree to end
    assert plan[-1] in (S.HAND_OVER, S.FAIL_LATER, S.WAIT_FOR_STOP)
    # a terminate comes before anything else, and nothing starts postgres after one
    if view_terminating(MATRIX[case][0]):
        assert S.START_POSTGRES not in plan and S.APPLY not in plan and S.PROMOTE not in plan
    assert len(set(plan)) == len(plan)


def test_only_startup_steps_fail_the_start():
    assert S.SERVE not in STARTUP_STEPS and S.FAIL_LATER not in STARTUP_STEPS
    assert S.REQUEUE_CONFIGURATION not in STARTUP_STEPS
    assert set(FROM_SCRATCH[:-1]) | set(REUSE_POSTGRES[:-1]) <= STARTUP_STEPS


@pytest.mark.parametrize("status,wanted", [("configuration_pending", True), ("running", False),
                                           ("configuration", False), ("failed", False), (None, False)])
def test_serve_applies_only_handed_over_specs(status, wanted):
    assert wants_reconfiguration(status) is wanted


@pytest.mark.parametrize("failed_at,grace,now,left", [
    (100.0, 30.0, 100.0, 30.0),   # just failed
    (100.0, 30.0, 120.0, 10.0),   # a restarted driver finishes the rest only
    (100.0, 30.0, 200.0, 0.0),    # already over: exit at once
    (None, 30.0, 500.0, 30.0),    # no record of when: a full period from now
    (100.0, 0.0, 100.0, 0.0),
])
def test_grace_period(failed_at, grace, now, left):
    assert grace_remaining(failed_at, grace, now) == pytest.approx(left)


@pytest.mark.parametrize("pm,state,elapsed,verdict", [
    ("ready", "RUNNING", 0.1, Readiness.READY),
    ("ready", None, 99.0, Readiness.READY),          # ready wins over a late look
    ("starting", "STARTING", 1.0, Readiness.WAIT),
    (None, None, 1.0, Readiness.WAIT),               # no postmaster.pid yet, not asked
    ("starting", "EXITED", 1.0, Readiness.DIED),
    (None, "FATAL", 1.0, Readiness.DIED),
    (None, "BACKOFF", 1.0, Readiness.DIED),
    ("starting", "RUNNING", 61.0, Readiness.TIMED_OUT),
])
def test_readiness(pm, state, elapsed, verdict):
    assert readiness(pm, state, elapsed, 60.0) is verdict


def view_terminating(view: DriverView) -> bool:
    return view.termination is not None


def test_a_terminate_runs_beside_any_plan_in_progress():
    """concurrent_step: the driver's request thread carries out a /terminate at once (during a
    basebackup, the catalog SQL, a reconfiguration); the API's own (postgres never ran) is not
    the driver's to run."""
    for case, (view, _) in MATRIX.items():
        expected = S.TERMINATE if view.termination in ("requested", "started") else None
        assert concurrent_step(view) is expected, case


@pytest.mark.parametrize("view,step", [
    (DriverView("running", startup_done=True), None),
    (DriverView("configuration_pending", startup_done=True), S.RECONFIGURE),
    (DriverView("configuration", startup_done=True, promotion="requested"), S.PROMOTE),
    (DriverView("configuration", startup_done=True, promotion="done"), None),  # being applied by us
    (DriverView("running", startup_done=True, promotion="failed"), None),
    (DriverView("configuration_pending", startup_done=True, termination="requested"), S.TERMINATE),
    (DriverView("running", startup_done=True, termination="done"), S.WAIT_FOR_STOP),
])
def test_serve_carries_out_the_waiting_request(view, step):
    assert pending_request(view) is step


IDLE = {"running", "reconfiguration failed", "terminated", "terminate by the tree, empty",
        "terminate by the tree, during storage"}


@pytest.mark.parametrize("case", list(MATRIX))
def test_a_driver_idles_only_when_it_would_only_serve_with_nothing_waiting(case):
    """The driver forked after a hand-over sleeps until SIGUSR1 (compute/lifecycle/driver.py
    wait_for_work) only in these states: a waiting or interrupted reconfiguration, and every
    start-up state, are work at once."""
    view, _ = MATRIX[case]
    # postgres' state is not asked by the idle check: it must not matter
    assert idle(dataclasses.replace(view, postgres_state=None)) is (case in IDLE)
    assert idle(view) is (case in IDLE)


@pytest.mark.parametrize("case", sorted(IDLE - {"terminated", "terminate by the tree, empty",
                                                "terminate by the tree, during storage"}))
def test_a_driver_keeping_an_lsn_lease_never_idles(case):
    """compute/lifecycle/lease_keeper.py: the lease's renewals are work for the whole life of a
    Static compute; a refused lease (no renewals any more) lets the driver idle again."""
    view, _ = MATRIX[case]
    assert idle(dataclasses.replace(view, lease=True)) is False
    from compute.lifecycle.driver import view_of
    s = {"status": view.status, "startup_done": view.startup_done, "promotion": None, "terminate": None}
    assert view_of({**s, "lsn_lease": {"state": "held"}}).lease is True
    assert view_of({**s, "lsn_lease": {"state": "refused"}}).lease is False
    assert view_of({**s, "lsn_lease": None}).lease is False
