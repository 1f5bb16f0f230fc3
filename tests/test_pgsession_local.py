"""How our own sessions reach the local postgres (compute/pgsession.py): no TLS on loopback
unless the connstr (or PGSSLMODE) asks for it, and the monitor on the postmaster's unix socket,
never on a socket whose server is not our OS user."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import psycopg
import pytest

from compute.monitor import ActivityMonitor
from compute.pgsession import is_local_host, local_sslmode, named_superuser, session_params, socket_params, superuser_of
from compute.reconcile.connections import APPLICATION_NAME as APPLY, Connections
from tests.support.api_helpers import make_state
from tests.support.pgcluster import PG_USER, free_port, run_as_pg, running_cluster, scratch_dir

# -- pure ----------------------------------------------------------------------------------------

def test_one_reading_of_the_superuser_for_every_program():
    """superuser_of: the monitor's and the api's (None when none is named); named_superuser:
    the -C flag's check of compute-ctl and `compute-ctl plan`, on top of it."""
    assert superuser_of("host=localhost user=zenith_admin") == "zenith_admin"
    assert superuser_of("postgresql://127.0.0.1/postgres") is None
    with pytest.raises(ValueError, match=r"^not a valid connection string"):
        superuser_of("host=localhost user")
    assert named_superuser("postgresql://cloud_admin@127.0.0.1:55432/postgres") == "cloud_admin"
    with pytest.raises(ValueError, match=r"^--connstr must name the superuser"):
        named_superuser("postgresql://127.0.0.1/postgres")
    with pytest.raises(ValueError, match=r"^--connstr: not a valid connection string"):
        named_superuser("host=localhost user")


@pytest.mark.parametrize("host", [None, "", "/run/postgresql", "@abstract", "localhost", "127.0.0.1",
                                  "127.1.2.3", "::1", "localhost,127.0.0.1"])
def test_local_hosts(host):
    assert is_local_host(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "db.example.com", "0.0.0.0", "127.0.0.1,10.0.0.1", "::ffff:1.2.3.4"])
def test_other_hosts(host):
    assert not is_local_host(host)


def test_sslmode_disable_only_for_a_local_server_and_only_when_nobody_named_one():
    assert local_sslmode({"host": "127.0.0.1"}, {})["sslmode"] == "disable"
    assert local_sslmode({"host": "127.0.0.1", "sslmode": "require"}, {})["sslmode"] == "require"
    assert "sslmode" not in local_sslmode({"host": "127.0.0.1"}, {"PGSSLMODE": "verify-full"})
    assert "sslmode" not in local_sslmode({"host": "db.example.com"}, {})
    # libpq connects to hostaddr when it is given: that decides, not the name
    assert "sslmode" not in local_sslmode({"host": "localhost", "hostaddr": "10.1.1.1"}, {})
    assert "sslmode" not in local_sslmode({}, {"PGHOST": "10.1.1.1"})
    params = session_params("postgresql://u@127.0.0.1:5432/postgres?sslmode=verify-ca")
    assert params["sslmode"] == "verify-ca" and "search_path=pg_catalog" in params["options"]


PID_FILE = "4242\n/pgdata\n1700000000\n55432\n/run/pg\n127.0.0.1\n  1234  5678\nready   \n"


def test_socket_params_from_the_postmaster_pid_file():
    params = {"host": "127.0.0.1", "hostaddr": "127.0.0.1", "port": "1", "user": "cloud_admin",
              "sslmode": "require", "options": "-c x=y"}
    got = socket_params(params, PID_FILE, "postgres")
    assert got == {"host": "/run/pg", "port": "55432", "user": "cloud_admin", "options": "-c x=y",
                   "requirepeer": "postgres"}


@pytest.mark.parametrize("pid_file", [None, "", "4242\n/pgdata\n", PID_FILE.replace("/run/pg", ""),
                                      PID_FILE.replace("/run/pg", "relative/dir"),
                                      PID_FILE.replace("55432", "5432; rm -rf /")])
def test_no_socket_without_a_usable_pid_file(pid_file):
    assert socket_params({"host": "127.0.0.1"}, pid_file, "postgres") is None


def test_no_socket_for_a_remote_server():
    assert socket_params({"host": "db.example.com"}, PID_FILE, "postgres") is None


# -- a server that offers TLS ----------------------------------------------------------------

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


# -- the monitor's socket ----------------------------------------------------------------------

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
            from compute.monitor import ActivityMonitor
            from compute.state import StateStore
            store = StateStore.create({rt!r} + "/state.db", {{"status": "running"}})
            m = ActivityMonitor(store, {pg.url()!r}, pgdata={pgdata!r})
            c = m._connect()
            print(c.query_row(b"SELECT inet_client_addr() IS NULL", []) == (b"t",))
        """)
        out = run_as_pg([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=rt)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "True"
