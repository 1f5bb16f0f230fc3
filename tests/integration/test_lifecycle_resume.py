"""A lifecycle driver that starts and finds a reconfiguration half-applied (its predecessor was
killed): it ends the dead driver's sessions, and only those, then applies the spec again.
Against a real PG15; the e2e side (kill -9 of the driver mid-apply): tests/fault/test_fault_exit.py."""

from __future__ import annotations

import psycopg
import pytest

from compute.lifecycle.driver import Driver
from compute.reconcile.connections import APPLICATION_NAME
from tests.support.api_helpers import launch_settings, make_state
from tests.support.pgcluster import running_cluster


@pytest.fixture(scope="module")
def cluster():
    with running_cluster() as c:
        with psycopg.connect(c.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE ROLE mallory LOGIN")  # a spec role: an untrusted database user
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("GRANT SELECT ON t TO mallory")
        yield c


def session(cluster, user: str | None, application_name: str) -> psycopg.Connection:
    conn = psycopg.connect(cluster.conninfo(user=user), application_name=application_name)
    conn.execute("SELECT count(*) FROM t")  # idle in transaction, holding a lock: like a blocked apply
    return conn


def alive(conn: psycopg.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


@pytest.fixture
def sessions(cluster):
    opened = {
        "dead driver's": session(cluster, None, APPLICATION_NAME),
        "spec role's, same name": session(cluster, "mallory", APPLICATION_NAME),
        "monitor's": session(cluster, None, "compute_ctl:activity_monitor"),
    }
    yield opened
    for conn in opened.values():
        conn.close()


def test_interrupted_reconfiguration_is_resumed_after_ending_the_dead_drivers_sessions(tmp_path, cluster, sessions):
    rt = str(tmp_path)
    store = make_state(rt, status="configuration", startup_done=True,
                       launch=launch_settings(rt, connstr=cluster.url()))
    Driver(rt).resume_interrupted_reconfiguration()
    assert store.get("status") == "configuration_pending"  # serve() applies it again
    assert {name: alive(conn) for name, conn in sessions.items()} == {
        "dead driver's": False, "spec role's, same name": True, "monitor's": True}


@pytest.mark.parametrize("status", ["running", "failed", "configuration_pending"])
def test_nothing_to_resume_touches_nothing(tmp_path, cluster, sessions, status):
    rt = str(tmp_path)
    store = make_state(rt, status=status, startup_done=True, launch=launch_settings(rt, connstr=cluster.url()))
    Driver(rt).resume_interrupted_reconfiguration()
    assert store.get("status") == status
    assert all(alive(conn) for conn in sessions.values())


def test_postgres_unreachable_still_resumes(tmp_path):
    """The sessions cannot be ended (postgres is down): the apply is retried all the same, and
    fails or succeeds on its own."""
    rt = str(tmp_path)
    store = make_state(rt, status="configuration", startup_done=True,
                       launch=launch_settings(rt, connstr="postgresql://cloud_admin@127.0.0.1:1/postgres"))
    Driver(rt).resume_interrupted_reconfiguration()
    assert store.get("status") == "configuration_pending"


@pytest.mark.parametrize("phase", ["requested", "started"])
def test_a_promotion_in_progress_is_left_to_the_promote_step(tmp_path, cluster, sessions, phase):
    """`configuration` held by /promote (its `promotion` record under way): a driver restarted
    meanwhile neither re-queues the old spec nor ends any session; its PROMOTE step (which
    finds out how far its predecessor got) finishes the promotion."""
    rt = str(tmp_path)
    store = make_state(rt, status="configuration", startup_done=True,
                       promotion={"id": 1, "spec": None, "wal_flush_lsn": None, "phase": phase},
                       launch=launch_settings(rt, connstr=cluster.url()))
    Driver(rt).resume_interrupted_reconfiguration()
    assert store.get("status") == "configuration"
    assert all(alive(conn) for conn in sessions.values())


def test_the_idle_drivers_look_at_the_state_file(tmp_path):
    """wait_for_work's look (in a short-lived child after a hand-over): work for a waiting or
    interrupted reconfiguration, none for a running compute, and work for a state file it
    cannot read (the driver proper then reports what is wrong)."""
    from compute.lifecycle.driver import _has_work, _has_work_child
    from compute.shared.state import StateStore, state_path
    path = state_path(str(tmp_path))
    store = StateStore.create(path, {"status": "running", "startup_done": True})
    for look in (_has_work, _has_work_child):
        assert look(path) is False
    store.set(status="configuration_pending")
    assert _has_work_child(path) is True
    store.set(status="configuration")
    assert _has_work_child(path) is True
    store.set(status="running", terminate={"id": 1, "mode": "fast", "by": "driver", "phase": "requested"})
    assert _has_work_child(path) is True  # a /terminate for the driver
    store.set(terminate={"id": 1, "mode": "fast", "by": "tree", "phase": "requested"})
    assert _has_work_child(path) is False  # the API stops the tree: nothing for the driver
    store.close()
    with open(path, "r+b") as f:
        f.write(b"garbage" * 1000)
    assert _has_work_child(path) is True


def test_a_promotion_the_dead_driver_began_is_finished(tmp_path, cluster):
    """Killed after pg_promote() (record STARTED, postgres out of recovery): the next driver's
    PROMOTE step finds the work done and hands the new spec over; a promotion only REQUESTED
    on a postgres that is not in recovery fails cleanly instead (nothing to promote)."""
    from compute.shared import driver_requests as dr
    from compute.model.spec import from_stored, parse_spec, to_document
    from tests.support.api_helpers import minimal_spec
    rt = str(tmp_path)
    new = to_document(parse_spec(minimal_spec()))
    for phase, status, outcome in (("started", "configuration_pending", dr.DONE), ("requested", "running", dr.FAILED)):
        store = make_state(rt, status="configuration", startup_done=True, spec_generation=4,
                           promotion={"id": 1, "spec": new, "wal_flush_lsn": None, "phase": phase},
                           launch=launch_settings(rt, connstr=cluster.url()))
        Driver(rt).promote()
        p = dr.Promotion.from_json(store.get("promotion"))
        assert (store.get("status"), p.phase) == (status, outcome), p.error
        if outcome == dr.DONE:
            assert p.generation == store.get("spec_generation") == 5 and from_stored(store.get("spec")) == from_stored(new)
        else:
            assert p.error == "postgres is not in recovery: nothing to promote"
        store.close()


def test_a_terminate_the_dead_driver_began_is_answered_with_the_lsn_it_recorded(tmp_path):
    """Killed after the immediate shutdown's signal (record STARTED, the flush LSN read before
    it): the next driver stops nothing more (postgres is gone) and answers that LSN."""
    from compute.shared import driver_requests as dr
    from compute.model.spec import parse_spec, to_document
    from tests.support.api_helpers import short_runtime_dir, supervisord
    import shutil
    rt = short_runtime_dir()
    try:
        primary = {"format_version": 1.0, "cluster": {"roles": [], "databases": [], "settings": []}}
        store = make_state(rt, postgres_started=True, spec=primary,
                           terminate={"id": 1, "mode": "immediate", "by": "driver", "phase": "started",
                                      "flush_lsn": "0/16B3748"})
        assert store.get("spec") == to_document(parse_spec(primary))
        with supervisord(rt):
            from compute.shared.supervisor_rpc import rpc
            rpc(rt).supervisor.stopProcess("postgres")  # what the dead driver had done
            Driver(rt).terminate()
        t = dr.Termination.from_json(store.get("terminate"))
        assert (t.phase, t.answer()) == (dr.DONE, (200, {"terminated": True, "lsn": "0/16B3748"}))
    finally:
        shutil.rmtree(rt, ignore_errors=True)
