"""The activity monitor counts what Neon's compute_ctl at HEAD counts besides client sessions
(monitor.rs): walsenders other than the walproposer, subscriptions with a running worker,
autovacuum workers. Against a real PG15 with `wal_level = logical`, real pg_receivewal, a real
subscription (to the same cluster) and a real autovacuum worker."""

from __future__ import annotations

import os
import shutil
import subprocess

import psycopg
import pytest

from compute.programs.monitor import ActivityMonitor
from tests.support.api_helpers import launch_settings, make_state
from tests.support.pgcluster import PG_USER, PGBIN_DIR, running_cluster, scratch_dir
from tests.support.waiting import wait_for

NOW = 4_000_000_000.0  # the monitor's clock: "active" answers exactly this


@pytest.fixture(scope="module")
def cluster():
    # autovacuum off but in its own test: its workers visit every database now and then, and
    # one seen by a poll would make an "idle" assertion fail for a reason of its own.
    with running_cluster(wal_level="logical", autovacuum="off", max_wal_senders="10",
                         max_replication_slots="10") as c:
        yield c


def set_autovacuum(cluster, on: bool) -> None:
    with su(cluster) as conn:
        if on:
            conn.execute("ALTER SYSTEM SET autovacuum = on")
            conn.execute("ALTER SYSTEM SET autovacuum_naptime = 1")
        else:
            conn.execute("ALTER SYSTEM RESET autovacuum")
            conn.execute("ALTER SYSTEM RESET autovacuum_naptime")
        conn.execute("SELECT pg_reload_conf()")


@pytest.fixture
def monitor(tmp_path, cluster):
    """A monitor with a fixed clock, polled by hand. Our own superuser sessions do not count."""
    store = make_state(str(tmp_path), status="running", launch=launch_settings(str(tmp_path), connstr=cluster.url()))
    m = ActivityMonitor(store, cluster.url(), interval=0.05, clock=lambda: NOW)
    yield m
    m._close()


def su(cluster, dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(cluster.conninfo(dbname), autocommit=True)


def backends(cluster, backend_type: str, extra: str = "") -> int:
    with su(cluster) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = %s" + extra,
                            (backend_type,)).fetchone()[0]


def streaming(cluster) -> int:
    with su(cluster) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'").fetchone()[0]


def idle(monitor: ActivityMonitor) -> bool:
    """No activity at all: no client session (ours are excluded), nothing else counted."""
    return monitor.poll() is None


def popen_as_pg(argv: list[str]) -> subprocess.Popen:
    kwargs = {}
    if os.getuid() == 0:
        kwargs = {"user": PG_USER.uid, "group": PG_USER.gid, "extra_groups": []}
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HOME": PG_USER.home}, **kwargs)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_a_quiet_cluster_is_idle(monitor, cluster):
    wait_for(lambda: backends(cluster, "autovacuum worker") == 0 and backends(cluster, "walsender") == 0,
             60, "no autovacuum worker nor walsender")
    assert idle(monitor)


@pytest.mark.parametrize("application_name, counts", [("pg_receivewal", True), ("walproposer", False)])
def test_a_walsender_is_activity_unless_it_is_the_walproposer(monitor, cluster, application_name, counts):
    """pg_receivewal streams WAL from us (a physical walsender): the compute must not be
    suspended under it. HEAD ignores Neon's walproposer by its application_name; so do we."""
    out = scratch_dir("cs-receivewal-")
    proc = popen_as_pg([f"{PGBIN_DIR}/pg_receivewal", "-D", out, "--no-loop", "--no-sync",
                        "-d", f"host=127.0.0.1 port={cluster.port} user={cluster.superuser} "
                              f"application_name={application_name}"])
    try:
        wait_for(lambda: proc.poll() is not None or streaming(cluster), 30, "pg_receivewal's walsender")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert monitor.poll() == (NOW if counts else None)
    finally:
        stop(proc)
        shutil.rmtree(out, ignore_errors=True)
    wait_for(lambda: backends(cluster, "walsender") == 0, 30, "the walsender to go")
    assert idle(monitor)


def test_a_subscription_with_a_worker_is_activity_a_disabled_one_is_not(monitor, cluster):
    """A subscription (to this same cluster) whose apply worker runs counts, as HEAD's
    `pg_stat_subscription WHERE pid IS NOT NULL`. Its walsender is named `walproposer` here, so
    that only the worker can be what the monitor sees. Disabled: no worker, idle again."""
    with su(cluster) as conn:
        conn.execute("DROP DATABASE IF EXISTS pub")
        conn.execute("DROP DATABASE IF EXISTS sub")
        conn.execute("CREATE DATABASE pub")
        conn.execute("CREATE DATABASE sub")
    with su(cluster, "pub") as pub:
        pub.execute("CREATE TABLE t (id int PRIMARY KEY)")
        pub.execute("CREATE PUBLICATION p FOR TABLE t")
        # A subscription to its own cluster cannot create its slot (it would wait for itself).
        pub.execute("SELECT pg_create_logical_replication_slot('s1', 'pgoutput')")
    conninfo = f"host=127.0.0.1 port={cluster.port} user={cluster.superuser} dbname=pub application_name=walproposer"
    try:
        with su(cluster, "sub") as sub:
            sub.execute("CREATE TABLE t (id int PRIMARY KEY)")
            sub.execute(f"CREATE SUBSCRIPTION s CONNECTION '{conninfo}' PUBLICATION p "
                        "WITH (create_slot = false, slot_name = 's1', copy_data = false)")
            wait_for(lambda: sub.execute("SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL")
                     .fetchone()[0] == 1, 30, "the apply worker")
            assert monitor.poll() == NOW

            sub.execute("ALTER SUBSCRIPTION s DISABLE")
            wait_for(lambda: sub.execute("SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL")
                     .fetchone()[0] == 0, 30, "the apply worker to stop")
            wait_for(lambda: backends(cluster, "walsender") == 0, 30, "its walsender to go")
            assert sub.execute("SELECT count(*) FROM pg_subscription").fetchone()[0] == 1  # still there
            assert idle(monitor)
            sub.execute("ALTER SUBSCRIPTION s SET (slot_name = NONE)")
            sub.execute("DROP SUBSCRIPTION s")
    finally:
        with su(cluster) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
            conn.execute("DROP DATABASE IF EXISTS sub WITH (FORCE)")
            conn.execute("DROP DATABASE IF EXISTS pub WITH (FORCE)")


def test_an_autovacuum_worker_is_activity(monitor, cluster):
    """A table full of dead rows, vacuumed as slowly as postgres allows (cost limit 1, delay
    100 ms per page): its autovacuum worker stays long enough to be seen, and the compute is
    active while it runs. Dropping the table cancels the worker."""
    set_autovacuum(cluster, True)
    with su(cluster) as conn:
        conn.execute("DROP TABLE IF EXISTS dead")
        conn.execute("CREATE TABLE dead (id int, pad text) WITH (autovacuum_vacuum_cost_delay = 100, "
                     "autovacuum_vacuum_cost_limit = 1, autovacuum_vacuum_threshold = 1)")
        conn.execute("INSERT INTO dead SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g")
        conn.execute("DELETE FROM dead")
        try:
            wait_for(lambda: backends(cluster, "autovacuum worker", " AND query LIKE '%%dead%%'"), 60,
                     "an autovacuum worker on table dead")
            assert monitor.poll() == NOW
        finally:
            conn.execute("DROP TABLE dead")
            set_autovacuum(cluster, False)
    wait_for(lambda: backends(cluster, "autovacuum worker") == 0, 60, "the worker to go")
    with su(cluster) as conn:  # the reload is seen by the launcher: no new worker from here on
        wait_for(lambda: conn.execute("SHOW autovacuum").fetchone()[0] == "off", 10, "autovacuum off")
    wait_for(lambda: backends(cluster, "autovacuum worker") == 0, 60, "the worker to go")
    assert idle(monitor)
