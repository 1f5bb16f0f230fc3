"""How our own sessions reach the local postgres (compute/postgres/sessions.py): no TLS on loopback
unless the connstr (or PGSSLMODE) asks for it, and the monitor on the postmaster's unix socket,
never on a socket whose server is not our OS user.

This file: against real postgres; the pure decisions: tests/unit/test_pgsession_local.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import psycopg
import pytest

from compute.programs.monitor import ActivityMonitor
from compute.postgres.sessions import session_params
from compute.reconcile.connections import APPLICATION_NAME as APPLY, Connections
from tests.support.api_helpers import make_state
from tests.support.pgcluster import PG_USER, free_port, run_as_pg, running_cluster, scratch_dir


@pytest.fixture(scope="module")
def tls_pg():
    certs = scratch_dir("cs-tls-")
    key, crt = os.path.join(certs, "server.key"), os.path.join(certs, "server.crt")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-keyout", key, "-out", crt], check=True, capture_output=True)
    for path in (key, crt):
        os.chown(path, PG_USER.uid, PG_USER.gid)
        os.chmod(path, 0o600)
    with running_cluster(ssl="on", ssl_cert_file=f"'{crt}'", ssl_key_file=f"'{key}'") as cluster:
        yield cluster


def _ssl_of(conn: psycopg.Connection, application_name: str) -> list[bool]:
    return [r[0] for r in conn.execute(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = %s",
        (application_name,))]


def test_our_sessions_are_not_encrypted_on_loopback(tls_pg):
    with psycopg.connect(tls_pg.conninfo(), autocommit=True) as admin:
        with psycopg.connect(**session_params(tls_pg.url()), application_name="ours", autocommit=True):
            assert _ssl_of(admin, "ours") == [False]
        with Connections(tls_pg.url()) as conns:
            conns(None).execute("SELECT 1")
            assert set(_ssl_of(admin, APPLY)) == {False}
        # the server does offer TLS: libpq's default would have used it
        with psycopg.connect(tls_pg.conninfo(), application_name="stock", autocommit=True):
            assert _ssl_of(admin, "stock") == [True]


def test_an_sslmode_in_the_connstr_is_respected(tls_pg):
    with psycopg.connect(tls_pg.conninfo(), autocommit=True) as admin:
        url = tls_pg.url() + "?sslmode=require"
        with psycopg.connect(**session_params(url), application_name="asked", autocommit=True):
            assert _ssl_of(admin, "asked") == [True]
        with Connections(url) as conns:
            conns(None).execute("SELECT 1")
            assert set(_ssl_of(admin, APPLY)) == {True}


PLANTED = textwrap.dedent("""
    import os, socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    os.chmod(sys.argv[1], 0o777)
    s.listen(8)
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        c.settimeout(2)
        try:
            data = c.recv(65536)
        except OSError:
            data = b""
        print("got", len(data), flush=True)
        c.close()
""")


def test_the_monitor_never_talks_to_a_socket_another_user_planted(tmp_path):
    """postmaster.pid names a socket directory anyone can write to, and `nobody` has put a
    listener there (postgres is down, or the file is stale): the monitor must not send it a
    startup packet (requirepeer), and watches postgres over the connstr instead."""
    with running_cluster() as pg:
        shared = scratch_dir("cs-shared-")
        os.chmod(shared, 0o1777)
        port = free_port()
        path = os.path.join(shared, f".s.PGSQL.{port}")
        planted = subprocess.Popen(["runuser", "-u", "nobody", "--", sys.executable, "-c", PLANTED, path],
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert planted.stdout.readline().strip() == "listening"
            pgdata = tmp_path / "pgdata"
            pgdata.mkdir()
            (pgdata / "postmaster.pid").write_text(f"1\n{pgdata}\n0\n{port}\n{shared}\n127.0.0.1\n0 0\nready\n")
            rt = str(tmp_path)
            store = make_state(rt, status="running", last_active=None)
            monitor = ActivityMonitor(store, pg.url(), interval=0.05, pgdata=str(pgdata))
            try:
                conn = monitor._connect()
                # it is the real postgres, over TCP
                assert conn.query_row(b"SELECT inet_client_addr() IS NOT NULL", []) == (b"t",)
                conn.close()
            finally:
                monitor._close()
            # the planted listener was connected to, and got nothing
            planted.terminate()
            out = planted.communicate(timeout=10)[0]
            assert "got " in out and all(line == "got 0" for line in out.splitlines() if line.startswith("got"))
        finally:
            planted.kill()
            planted.wait()


def test_the_monitor_uses_the_postmasters_socket_when_it_runs_as_the_servers_user(tmp_path):
    """As the compute's OS user (the tree's case), the monitor's session is on the unix socket."""
    with running_cluster() as pg:
        rt = scratch_dir("cs-mon-")
        os.chown(rt, PG_USER.uid, PG_USER.gid)
        pgdata = pg.datadir
        code = textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {os.getcwd()!r})
            from compute.programs.monitor import ActivityMonitor
            from compute.shared.state import StateStore
            store = StateStore.create({rt!r} + "/state.db", {{"status": "running"}})
            m = ActivityMonitor(store, {pg.url()!r}, pgdata={pgdata!r})
            c = m._connect()
            print(c.query_row(b"SELECT inet_client_addr() IS NULL", []) == (b"t",))
        """)
        out = run_as_pg([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=rt)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "True"
