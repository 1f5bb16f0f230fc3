"""The activity monitor against a real PG15: what counts as activity, monotonicity, outages."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict
import pytest

from compute.programs.monitor import APPLICATION_NAME, CONNECT_TIMEOUT, ActivityMonitor, LibpqSession, SessionError
from compute.postgres.sessions import superuser_of
from compute.base.procutil import SUPERVISORD_PID_ENV
from compute.shared.state import StateStore
from tests.support.api_helpers import REPO, launch_settings, make_state
from tests.support.pgcluster import free_port, running_cluster
from tests.support.waiting import wait_for

INTERVAL = 0.05


@pytest.fixture(scope="module")
def pg():
    """A real PG15 for this module, autovacuum off: an autovacuum worker is activity (issue 18),
    and one visiting a database during an "idle" test would move last_active for a reason of
    its own (tests/integration/test_monitor_replication.py tests that rule)."""
    with running_cluster(shared_preload_libraries="'pg_stat_statements'", autovacuum="off") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def app_user(pg):
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS app_user")
        conn.execute("CREATE ROLE app_user LOGIN")
        conn.execute("DROP ROLE IF EXISTS boss")
        conn.execute("CREATE ROLE boss LOGIN SUPERUSER")
    return pg.conninfo(user="app_user")


def wait_no_other_sessions(cluster, timeout: float = 5.0) -> None:
    """Sessions closed by a previous test may linger a moment in pg_stat_activity."""
    query = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
             "AND pid <> pg_backend_pid()")
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        wait_for(lambda: conn.execute(query).fetchone()[0] == 0, timeout, "other sessions to go away", 0.05)


@pytest.fixture
def store(tmp_path, pg):
    wait_no_other_sessions(pg)
    return make_state(str(tmp_path), status="running", last_active=None,
                      launch=launch_settings(str(tmp_path), connstr=pg.url()))


@contextmanager
def monitoring(store: StateStore, connstr: str, **kwargs):
    monitor = ActivityMonitor(store, connstr, interval=kwargs.pop("interval", INTERVAL), **kwargs)
    thread = threading.Thread(target=monitor.run, daemon=True)
    thread.start()
    try:
        yield monitor
    finally:
        monitor.stop_event.set()
        thread.join(5)
        assert not thread.is_alive()


def wait_ticks(monitor: ActivityMonitor, n: int) -> None:
    """Until the monitor has done `n` more ticks: a condition, not a clock (the VM is noisy)."""
    start = monitor.ticks
    wait_for(lambda: monitor.ticks >= start + n, timeout=30)


def handles_sigterm(pid: int) -> bool:
    """The program installed its SIGTERM handler (its imports are done): /proc's SigCgt mask."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def sampler(store: StateStore, samples: list, stop: threading.Event) -> threading.Thread:
    def run():
        s = StateStore(store.path)
        while not stop.wait(0.01):
            samples.append(s.get("last_active"))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# -- parsing -------------------------------------------------------------------------------

def test_superuser_is_parsed_from_the_connstr():
    assert superuser_of("postgresql://cloud_admin@127.0.0.1:55432/postgres") == "cloud_admin"
    assert superuser_of("postgresql://boss:pw@localhost/db?sslmode=disable") == "boss"
    assert superuser_of("host=localhost user=zenith_admin dbname=postgres") == "zenith_admin"
    assert superuser_of("host=localhost dbname=postgres") is None
    assert superuser_of("postgresql://%C3%A9lo%C3%AFse@localhost/db") == "éloïse"


# -- what counts -----------------------------------------------------------------------------

def test_active_session_keeps_last_active_at_now(store, pg, app_user):
    """While a query runs, every tick of the monitor moves last_active up to that tick's time."""
    cancelled = []

    def long_query():
        try:
            user.execute("SELECT pg_sleep(60)")
        except psycopg.errors.QueryCanceled:  # below, once checked
            cancelled.append(True)

    with psycopg.connect(app_user, autocommit=True) as user, monitoring(store, pg.url()) as m:
        t = threading.Thread(target=long_query)
        t.start()
        wait_for(lambda: store.get("last_active") is not None)
        for _ in range(5):
            before = time.time()  # the query runs throughout: a tick begun after this stamps later
            wait_ticks(m, 2)
            assert store.get("last_active") >= before
        user.cancel()
        t.join(30)
        assert cancelled == [True]


def test_idle_in_transaction_counts_as_active(store, pg, app_user):
    with psycopg.connect(app_user) as user, monitoring(store, pg.url()) as m:
        user.execute("SELECT 1")  # psycopg opened a transaction: 'idle in transaction'
        wait_for(lambda: store.get("last_active") is not None)
        for _ in range(5):
            before = time.time()
            wait_ticks(m, 2)  # a whole tick after `before`: it stamped the session active
            assert store.get("last_active") >= before
        user.rollback()


def test_idle_sessions_report_their_state_change(store, pg, app_user):
    with psycopg.connect(app_user, autocommit=True) as a, psycopg.connect(app_user, autocommit=True) as b:
        a.execute("SELECT 1")
        time.sleep(0.3)
        b.execute("SELECT 2")  # the later of the two
        with psycopg.connect(pg.conninfo(), autocommit=True) as su:
            expected = su.execute(
                "SELECT extract(epoch FROM max(state_change))::float8 FROM pg_stat_activity "
                "WHERE usename = 'app_user' AND state = 'idle'").fetchone()[0]
        with monitoring(store, pg.url()):
            wait_for(lambda: store.get("last_active") is not None)
            time.sleep(1.0)  # idle: it must not creep towards now
            assert store.get("last_active") == pytest.approx(expected, abs=1e-3)
    assert time.time() - expected > 0.9


def test_own_and_superuser_sessions_never_count(store, pg):
    with psycopg.connect(pg.conninfo(), autocommit=True) as su1, \
            psycopg.connect(pg.conninfo(), autocommit=True) as su2, monitoring(store, pg.url()) as m:
        su2.execute("BEGIN")  # idle in transaction, as the superuser
        t = threading.Thread(target=lambda: su1.execute("SELECT pg_sleep(1)"))
        t.start()
        t.join()
        wait_ticks(m, 3)
        assert store.get("last_active") is None


def test_superuser_is_not_hard_coded(store, pg, app_user):
    """With a connstr naming `boss`, boss is excluded and cloud_admin is an ordinary user."""
    boss_url = f"postgresql://boss@127.0.0.1:{pg.port}/postgres"
    with psycopg.connect(pg.conninfo(user="boss"), autocommit=True) as boss, monitoring(store, boss_url) as m:
        t = threading.Thread(target=lambda: boss.execute("SELECT pg_sleep(0.8)"))
        t.start()
        t.join()
        wait_ticks(m, 3)
        assert store.get("last_active") is None
        with psycopg.connect(pg.conninfo(user="cloud_admin"), autocommit=True) as admin:
            admin.execute("BEGIN")
            wait_for(lambda: (store.get("last_active") or 0) > time.time() - 1)


def test_last_active_never_moves_backwards(store, pg, app_user):
    samples: list = []
    stop = threading.Event()
    t = sampler(store, samples, stop)
    with monitoring(store, pg.url()) as m:
        with psycopg.connect(app_user, autocommit=True) as user:
            user.execute("SELECT pg_sleep(0.5)")
            wait_ticks(m, 6)
            user.execute("SELECT 1")
            wait_ticks(m, 6)
        with psycopg.connect(app_user, autocommit=True):  # an idle session whose state_change is old
            wait_ticks(m, 6)
        wait_ticks(m, 6)
    stop.set()
    t.join()
    values = [v for v in samples if v is not None]
    assert len(values) > 50
    assert values == sorted(values)


def test_a_later_value_from_elsewhere_is_kept(store, pg, app_user):
    future = time.time() + 3600
    store.set(last_active=future)
    with psycopg.connect(app_user, autocommit=True) as user, monitoring(store, pg.url()) as m:
        user.execute("BEGIN")
        wait_ticks(m, 5)
        assert store.get("last_active") == future
        assert m.record(time.time()) is False


def test_writes_only_when_the_value_changes(store, pg, app_user, monkeypatch):
    writes = []
    real = StateStore.advance_last_active

    def counting(self, ts):
        writes.append(ts)
        return real(self, ts)

    monkeypatch.setattr(StateStore, "advance_last_active", counting)
    with psycopg.connect(app_user, autocommit=True) as user:
        user.execute("SELECT 1")
        with monitoring(store, pg.url()) as m:
            wait_ticks(m, 20)  # one idle session that does not change
    assert len(writes) == 1


# -- start-up and outages ------------------------------------------------------------------------

def test_quiet_before_postgres_is_up(tmp_path, caplog, pg):
    """Status running but nothing listening yet: retry without a word."""
    port = free_port()
    store = make_state(str(tmp_path), status="running", last_active=None)
    caplog.set_level(logging.INFO, logger="compute.programs.monitor")
    with monitoring(store, f"postgresql://cloud_admin@127.0.0.1:{port}/postgres") as m:
        wait_ticks(m, 10)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert store.get("last_active") is None


def test_no_queries_before_the_driver_reports_postgres_up(tmp_path, pg, app_user):
    store = make_state(str(tmp_path), status="init", last_active=None)
    with psycopg.connect(app_user, autocommit=True) as user, monitoring(store, pg.url()) as m:
        user.execute("BEGIN")
        wait_ticks(m, 5)
        with psycopg.connect(pg.conninfo(), autocommit=True) as su:
            names = [r[0] for r in su.execute("SELECT application_name FROM pg_stat_activity").fetchall()]
        assert APPLICATION_NAME not in names
        assert store.get("last_active") is None
        store.set(status="running")
        wait_for(lambda: store.get("last_active"))
        assert m._conn is not None


def test_survives_postgres_restart(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="compute.programs.monitor")
    with running_cluster() as cluster:
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE ROLE app_user LOGIN")
        store = make_state(str(tmp_path), status="running", last_active=None)
        samples: list = []
        stop = threading.Event()
        t = sampler(store, samples, stop)
        with monitoring(store, cluster.url()) as m:
            with psycopg.connect(cluster.conninfo(user="app_user"), autocommit=True) as user:
                user.execute("BEGIN")
                wait_for(lambda: store.get("last_active"))
            cluster.stop()
            wait_ticks(m, 20)  # failing ticks
            down_at = time.time()
            cluster.start()
            with psycopg.connect(cluster.conninfo(user="app_user"), autocommit=True) as user:
                user.execute("BEGIN")
                wait_for(lambda: store.get("last_active") > down_at, timeout=10)
        stop.set()
        t.join()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings  # once per outage, not once per tick
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    values = [v for v in samples if v is not None]
    assert values == sorted(values)


# -- the program ---------------------------------------------------------------------------------

def start_program(runtime_dir: str) -> subprocess.Popen:
    env = dict(os.environ, COMPUTE_RUNTIME_DIR=runtime_dir, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-m", "compute.programs.monitor"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_program_runs_and_stops_promptly_on_sigterm(tmp_path, pg, app_user):
    rt = str(tmp_path)
    store = make_state(rt, status="running", last_active=None, launch=launch_settings(rt, connstr=pg.url()))
    proc = start_program(rt)
    try:
        with psycopg.connect(pg.conninfo(), autocommit=True) as su:
            wait_for(lambda: su.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                        (APPLICATION_NAME,)).fetchone()[0] == 1, timeout=10)
        with psycopg.connect(app_user, autocommit=True) as user:
            user.execute("BEGIN")
            wait_for(lambda: (store.get("last_active") or 0) > time.time() - 1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert time.monotonic() - t0 < CONNECT_TIMEOUT  # ended by the signal, not by a timeout
    finally:
        if proc.poll() is None:
            proc.kill()
    _, err = proc.communicate()
    assert "INFO: watching postgres activity (excluding user 'cloud_admin')" in err


def test_program_stops_promptly_while_connecting(tmp_path):
    """SIGTERM in the middle of a slow connection attempt: a loopback peer that takes the TCP
    connection and never answers the startup packet (as a black-holed server would)."""
    rt = str(tmp_path)
    silent = socket.create_server(("127.0.0.1", 0))
    make_state(rt, status="running", launch=launch_settings(
        rt, connstr=f"postgresql://cloud_admin@127.0.0.1:{silent.getsockname()[1]}/postgres"))
    proc = start_program(rt)
    try:
        silent.settimeout(30)
        held, _ = silent.accept()  # the monitor is connecting (its handlers are installed by now)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert time.monotonic() - t0 < CONNECT_TIMEOUT  # the attempt was cut short, not timed out
        held.close()
    finally:
        silent.close()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_program_waits_for_the_launch_record(tmp_path):
    rt = str(tmp_path)
    proc = start_program(rt)  # no state file yet
    try:
        wait_for(lambda: proc.poll() is not None or handles_sigterm(proc.pid), timeout=30)
        time.sleep(1.2)  # not synchronisation: the window (two of its 0.5 s looks) it must wait through
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not reaped by init yet
    except FileNotFoundError:
        return True


def test_program_exits_when_its_parent_dies(tmp_path):
    rt = str(tmp_path)
    make_state(rt, status="init")
    env = dict(os.environ, COMPUTE_RUNTIME_DIR=rt, PYTHONPATH=REPO)
    # The parent names itself in the environment, as supervisord does: a parent gone before the
    # monitor armed its parent-death signal is noticed too (compute/base/procutil.py die_with_parent).
    parent = subprocess.Popen(
        [sys.executable, "-c", "import os, subprocess, sys, time; os.environ[sys.argv[1]] = str(os.getpid()); "
                               "p = subprocess.Popen(sys.argv[2:]); print(p.pid, flush=True); "
                               "time.sleep(600)",
         SUPERVISORD_PID_ENV, sys.executable, "-m", "compute.programs.monitor"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    monitor = int(parent.stdout.readline())
    try:
        wait_for(lambda: _gone(monitor) or handles_sigterm(monitor), 30, "the monitor to be up")
        assert not _gone(monitor)
        parent.kill()
        parent.wait()
        wait_for(lambda: _gone(monitor), timeout=5)
    finally:
        parent.kill()
        if not _gone(monitor):
            os.kill(monitor, signal.SIGKILL)


# -- the monitor's libpq session ----------------------------------------------------------------

def test_libpq_session_answers_one_row_as_text(pg):
    s = LibpqSession(conninfo_to_dict(pg.url()), 2, 5)
    try:
        assert s.query_row(b"SELECT $1::text, NULL, 1.5::float8, true", [b"x"]) == (b"x", None, b"1.5", b"t")
        assert s.query_row(b"SELECT 1", []) == (b"1",)  # the session stays usable
    finally:
        s.close()


@pytest.mark.parametrize("query,error", [
    (b"SELECT 1/0", "division by zero"),
    (b"SELECT 1 UNION ALL SELECT 2", "2 rows"),
    (b"SELECT pg_sleep(3)", "timed out"),
])
def test_libpq_session_errors_are_session_errors(pg, query, error):
    s = LibpqSession(conninfo_to_dict(pg.url()), 2, 1)
    try:
        with pytest.raises(SessionError, match=error):
            s.query_row(query, [])
    finally:
        s.close()


def test_libpq_session_connect_failure_is_a_session_error():
    port = free_port()  # nobody listens
    with pytest.raises(SessionError, match="refused|failed"):
        LibpqSession({"host": "127.0.0.1", "port": str(port), "dbname": "postgres"}, 2, 1)
