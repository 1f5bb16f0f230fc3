"""Issue 9, sections 2 and 3, below the booted tree: the pure decisions (redaction, content
types, the exposure warning, session options) and the attacks that need only a real postgres
(a spec role's objects against our sessions, password statements against the server log, a
held lock against an apply). The same attacks against a booted tree: test_fault_network.py,
test_fault_sessions.py.

This file: against a real postgres; the pure decisions: tests/unit/test_security_net.py.
"""

from __future__ import annotations

import time

import falcon.testing
import psycopg
import pytest

from compute.api.app import create_app
from compute.reconcile import ApplyError, ReconcileError, apply_spec
from compute.model.spec import parse_spec
from tests.support.api_helpers import launch_settings, make_state, pg
from tests.support.pgcluster import running_cluster
from tests.support.traps import TRAPS

__all__ = ['pg']  # the fixture

SECRET = "s3cr3t-Pa55"


def client(rt: str, cluster, **launch) -> falcon.testing.TestClient:
    make_state(rt, launch=launch_settings(rt, **{"connstr": cluster.url(), **launch}))
    return falcon.testing.TestClient(create_app(rt))


def test_insights_never_return_a_password_literal(tmp_path, pg):
    with psycopg.connect(pg.conninfo(), autocommit=True) as su:
        su.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        su.execute("DROP ROLE IF EXISTS leaky")
        su.execute("CREATE ROLE leaky LOGIN CREATEROLE")
        su.execute("SELECT pg_stat_statements_reset()")
    with psycopg.connect(pg.conninfo(user="leaky"), autocommit=True) as u:
        for i, stmt in enumerate([
            "ALTER ROLE leaky PASSWORD '{s}0'", "alter role leaky encrypted password '{s}1'",
            "ALTER ROLE leaky PASSWORD E'{s}2\\\\'", "ALTER ROLE leaky PASSWORD $${s}3$$",
            "CREATE ROLE leaky_{i} PASSWORD $q${s}4$q$", "ALTER ROLE leaky WITH LOGIN PASSWORD U&'{s}5'",
        ]):
            u.execute(stmt.format(s=SECRET, i=i))
    r = client(str(tmp_path), pg).simulate_get("/insights")
    assert r.status_code == 200, r.text
    queries = [row["query"] for row in r.json["pg_stat_statements"]]
    assert sum("PASSWORD" in q.upper() for q in queries) >= 6, queries  # stored verbatim, then redacted
    assert SECRET not in r.text


def test_insights_in_a_database_a_spec_role_owns_run_none_of_its_code(tmp_path, pg):
    with psycopg.connect(pg.conninfo(), autocommit=True) as su:
        su.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        su.execute("DROP DATABASE IF EXISTS squat")
        su.execute("DROP ROLE IF EXISTS squatter")
        su.execute("CREATE ROLE squatter LOGIN")
        su.execute("CREATE DATABASE squat OWNER squatter")
    with psycopg.connect(pg.conninfo("squat"), autocommit=True) as su:
        su.execute("CREATE EXTENSION pg_stat_statements SCHEMA public")  # where the planner puts it
    with psycopg.connect(pg.conninfo("squat", user="squatter"), autocommit=True) as u:
        install_traps(u, "squat")
    r = client(str(tmp_path), pg, connstr=pg.url("squat")).simulate_get("/insights")
    assert r.status_code == 200, r.text
    assert "pg_stat_statements" in r.json
    assert trap_hits(pg, "squat") == []


def test_writability_refuses_a_spec_role_table_and_runs_none_of_its_code(tmp_path, pg):
    with psycopg.connect(pg.conninfo(), autocommit=True) as su:
        su.execute("DROP DATABASE IF EXISTS owned")
        su.execute("DROP ROLE IF EXISTS dbowner")
        su.execute("CREATE ROLE dbowner LOGIN")
        su.execute("CREATE DATABASE owned OWNER dbowner")
    with psycopg.connect(pg.conninfo("owned", user="dbowner"), autocommit=True) as u:
        install_traps(u, "owned")
    c = client(str(tmp_path), pg, connstr=pg.url("owned"))
    r = c.simulate_post("/check_writability")
    assert r.status_code == 500
    assert "refusing to write to public.health_check" in r.text and "dbowner" in r.text
    assert trap_hits(pg, "owned") == []
    with psycopg.connect(pg.conninfo("owned"), autocommit=True) as su:
        assert su.execute("SELECT count(*) FROM public.health_check").fetchone()[0] == 0
        # the same check on a table of ours: written
        su.execute("DROP TABLE public.health_check")
    assert c.simulate_post("/check_writability").text == "true"
    assert trap_hits(pg, "owned") == []


def install_traps(conn: psycopg.Connection, dbname: str) -> None:
    """As the owner of `dbname`: objects that run code when a superuser session resolves a
    name to them, and a database setting that would put them first (and act as the owner)."""
    conn.execute(TRAPS)
    conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET search_path = public, pg_catalog").format(
        psycopg.sql.Identifier(dbname)))
    # as the owner itself, no trap fires (the hit() filter: not a superuser, no SET ROLE)
    assert conn.execute("SELECT count(*) FROM public.trap_hits").fetchone()[0] == 0


def trap_hits(cluster, dbname: str) -> list[tuple[str, str]]:
    with psycopg.connect(cluster.conninfo(dbname), autocommit=True,
                         options="-c search_path=pg_catalog") as su:
        return [tuple(r) for r in su.execute("SELECT who::text, what FROM public.trap_hits")]


def test_traps_fire_for_an_unpinned_superuser_session(pg):
    """The test's own control: without the pinning, the traps do catch a superuser."""
    with psycopg.connect(pg.conninfo(), autocommit=True) as su:
        su.execute("DROP DATABASE IF EXISTS control")
        su.execute("DROP ROLE IF EXISTS ctl_owner")
        su.execute("CREATE ROLE ctl_owner LOGIN")
        su.execute("CREATE DATABASE control OWNER ctl_owner")
    with psycopg.connect(pg.conninfo("control", user="ctl_owner"), autocommit=True) as u:
        install_traps(u, "control")
    with psycopg.connect(pg.conninfo("control"), autocommit=True) as su:
        su.execute("SELECT now(), pg_backend_pid(), 'a'::text = 'b'::text")
    assert {what for _, what in trap_hits(pg, "control")} >= {"now()", "pg_backend_pid()", "text = text"}


def test_apply_in_databases_a_spec_role_owns_runs_none_of_its_code(pg):
    spec = parse_spec({
        "format_version": 1.0,
        "cluster": {"cluster_id": "c", "name": "c", "settings": [],
                    "roles": [{"name": "trapper", "encrypted_password": "0" * 32, "options": None}],
                    "databases": [{"name": "trapdb", "owner": "trapper", "options": None}]},
    }, superuser="cloud_admin")
    apply_spec(pg.url(), spec, superuser="cloud_admin")
    with psycopg.connect(pg.conninfo("trapdb", user="trapper"), autocommit=True) as u:
        install_traps(u, "trapdb")
    # another apply (a new role: grants and schema checks in trapdb again)
    spec2 = parse_spec({**spec_dict(spec), "cluster": {**spec_dict(spec)["cluster"], "roles": [
        {"name": "trapper", "encrypted_password": "1" * 32, "options": None},
        {"name": "second", "encrypted_password": None, "options": None}]}}, superuser="cloud_admin")
    apply_spec(pg.url(), spec2, superuser="cloud_admin")
    assert trap_hits(pg, "trapdb") == []


def spec_dict(spec) -> dict:
    return {
        "format_version": 1.0,
        "cluster": {"cluster_id": "c", "name": "c", "settings": [],
                    "roles": [{"name": r.name, "encrypted_password": r.encrypted_password, "options": None}
                              for r in spec.cluster.roles],
                    "databases": [{"name": d.name, "owner": d.owner, "options": None}
                                  for d in spec.cluster.databases]},
    }


def role_spec(password: str) -> dict:
    return {"format_version": 1.0,
            "cluster": {"cluster_id": "c", "name": "c", "settings": [], "databases": [],
                        "roles": [{"name": "logged", "encrypted_password": password, "options": None}]}}


def test_password_hashes_never_reach_the_server_log_even_on_failure():
    hashes = ["a" * 31 + "1", "b" * 31 + "2", "c" * 31 + "3"]
    with running_cluster(log_statement="'all'", log_min_duration_statement="0",
                         log_min_error_statement="'debug5'") as cluster:
        apply_spec(cluster.url(), parse_spec(role_spec(hashes[0]), superuser="cloud_admin"),
                   superuser="cloud_admin")
        apply_spec(cluster.url(), parse_spec(role_spec(hashes[1]), superuser="cloud_admin"),
                   superuser="cloud_admin")
        # a failing batch: the role's row is locked by a session of its own
        with psycopg.connect(cluster.conninfo(user="logged")) as holder:  # trust: no password needed
            holder.execute("ALTER ROLE logged PASSWORD NULL")  # its pg_authid row locked until rollback
            t0 = time.monotonic()
            with pytest.raises(ApplyError) as failed:
                apply_spec(cluster.url(), parse_spec(role_spec(hashes[2]), superuser="cloud_admin"),
                           superuser="cloud_admin", lock_timeout=0.5)
            elapsed = time.monotonic() - t0
            holder.rollback()
        log = cluster.log()
    for h in hashes:
        assert h not in log, f"hash {h} in the server log"
    assert "lock timeout" in str(failed.value) and "--lock-timeout" in str(failed.value)
    assert elapsed < 20
    assert "statement: BEGIN" in log and "statement: SET LOCAL log_statement" in log  # logging was on
    assert "canceling statement due to lock timeout" in log  # the failure itself is logged


def test_a_held_lock_fails_the_apply_in_bounded_time_with_a_clear_error(pg):
    spec = parse_spec({
        "format_version": 1.0,
        "cluster": {"cluster_id": "c", "name": "c", "settings": [],
                    "roles": [{"name": "holder", "encrypted_password": None, "options": None},
                              {"name": "doomed", "encrypted_password": None, "options": None}],
                    "databases": [{"name": "lockdb", "owner": "holder", "options": None}]},
    }, superuser="cloud_admin")
    apply_spec(pg.url(), spec, superuser="cloud_admin")
    delete = parse_spec({**spec_dict(spec),
                         "cluster": {**spec_dict(spec)["cluster"], "roles": [
                             {"name": "holder", "encrypted_password": None, "options": None}]},
                         "delta_operations": [{"action": "delete_role", "name": "doomed"}]},
                        superuser="cloud_admin")
    with psycopg.connect(pg.conninfo("lockdb", user="doomed")) as doomed:
        doomed.execute("CREATE SCHEMA doomed_s")
        doomed.execute("CREATE TABLE doomed_s.mine (x int)")
        doomed.commit()
        doomed.execute("LOCK TABLE doomed_s.mine IN ACCESS EXCLUSIVE MODE")  # held until rollback
        t0 = time.monotonic()
        with pytest.raises(ApplyError) as failed:
            apply_spec(pg.url(), delete, superuser="cloud_admin", lock_timeout=0.5)
        elapsed = time.monotonic() - t0
        doomed.rollback()
    message = str(failed.value)
    assert "lock timeout" in message and "lockdb" in message, message
    assert "\n" not in message
    assert elapsed < 20
    apply_spec(pg.url(), delete, superuser="cloud_admin")  # lock released: the same apply passes


def test_statement_timeout_ends_a_long_statement_with_a_clear_error(pg):
    spec = parse_spec({
        "format_version": 1.0,
        "cluster": {"cluster_id": "c", "name": "c", "settings": [], "roles": [],
                    "databases": [{"name": "slowdb", "owner": "cloud_admin", "options": None}]},
    }, superuser="cloud_admin")
    # 1 ms: copying template1 takes far longer (on a loaded machine even the catalog read may)
    with pytest.raises(ReconcileError) as failed:
        apply_spec(pg.url(), spec, superuser="cloud_admin", statement_timeout=0.001)
    assert "canceling statement due to statement timeout" in str(failed.value)
    assert not isinstance(failed.value, ApplyError) or "--statement-timeout" in str(failed.value)
    apply_spec(pg.url(), spec, superuser="cloud_admin")  # the default: done


def _refused_without_reading(port: int, head: bytes) -> bytes:
    """Send a head announcing 500 kB and none of it; the answer, read until the server closes."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + b"Content-Length: 500000\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("status,ctype,want", [
    ("configuration", "application/json", b"412"),  # another configuration in progress
    ("running", "application/x-www-form-urlencoded", b"415"),
])
def test_no_body_is_read_before_the_mode_checks(tmp_path, status, ctype, want):
    """Real gunicorn on 127.0.0.1 (launch http_address): refused at once, connection closed
    rather than drained; nobody waits for the 500 kB."""
    from tests.support.api_helpers import gunicorn
    from tests.support.pgcluster import free_port
    rt, port = str(tmp_path), free_port()
    make_state(rt, status=status, launch=launch_settings(rt, http_port=port, http_address="127.0.0.1"))
    with gunicorn(rt):
        t0 = time.monotonic()
        out = _refused_without_reading(port, b"POST /configure HTTP/1.1\r\nHost: x\r\n"
                                             b"Content-Type: " + ctype.encode() + b"\r\n")
        assert out.startswith(b"HTTP/1.1 " + want), out[:200]
        assert time.monotonic() - t0 < 5


def test_concurrent_first_writability_checks_all_succeed(tmp_path, pg):
    """Concurrent CREATE TABLE IF NOT EXISTS race on the catalog (one fails with a unique
    violation); the route tries again instead of answering 500."""
    import threading
    with psycopg.connect(pg.conninfo(), autocommit=True) as su:
        su.execute("DROP DATABASE IF EXISTS race")
        su.execute("CREATE DATABASE race")
    rt = str(tmp_path)
    make_state(rt, launch=launch_settings(rt, connstr=pg.url("race")))
    barrier, answers = threading.Barrier(8), []

    def check():
        c = falcon.testing.TestClient(create_app(rt))
        barrier.wait(10)
        r = c.simulate_post("/check_writability")
        answers.append((r.status_code, r.text))

    threads = [threading.Thread(target=check) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == [(200, "true")] * 8
