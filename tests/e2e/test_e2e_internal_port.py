"""The internal port on a booted tree (issue 18, item 8): `--internal-http-port` serves HEAD's
POST /grants and /extensions on loopback, no token; the lifecycle driver applies them with
quoted names; hostile names, unknown roles and privileges outside HEAD's set are refused or
fail cleanly; peers beyond loopback never reach it; the port is held as the external one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request

import psycopg
import pytest

from tests.support.pgcluster import free_port
from tests.support.tree import Compute

HOSTILE_SCHEMA = 'we"ird; DROP SCHEMA public; --'
HOSTILE_ROLE = "ro'le\"; --"


class InternalCompute(Compute):
    """HEAD's port flags (--http-port conflicts with --internal-http-port, as at HEAD)."""

    def command(self) -> list[str]:
        return ["--external-http-port" if a == "--http-port" else a for a in super().command()]


def internal(c: Compute, path: str, body, *, host: str = "127.0.0.1", timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{host}:{c.internal_port}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (the one a default route leaves by)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
        address = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if address.startswith("127.") else address


@pytest.fixture(scope="module")
def compute():
    c = InternalCompute()
    c.internal_port = free_port()
    c.spec = c.new_spec()
    c.args = ["--internal-http-port", str(c.internal_port)]
    with c:
        c.wait_status("running")
        with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
            conn.execute("CREATE ROLE reader NOLOGIN")
            conn.execute(f'CREATE ROLE "{HOSTILE_ROLE.replace(chr(34), chr(34) * 2)}" NOLOGIN')
            conn.execute("CREATE SCHEMA app")
            conn.execute(f'CREATE SCHEMA "{HOSTILE_SCHEMA.replace(chr(34), chr(34) * 2)}"')
        yield c


def privileges(c: Compute, role: str, schema: str) -> tuple[bool, bool]:
    with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
        return conn.execute("SELECT has_schema_privilege(r.oid, n.oid, 'USAGE'), has_schema_privilege(r.oid, n.oid, 'CREATE')"
                            " FROM pg_roles r, pg_namespace n WHERE r.rolname = %s AND n.nspname = %s",
                            (role, schema)).fetchone()


def test_grants_as_head(compute):
    body = {"database": "postgres", "schema": "app", "privileges": ["USAGE"], "role": "reader"}
    assert internal(compute, "/grants", body) == (201, body)
    assert privileges(compute, "reader", "app") == (True, False)
    body = {**body, "privileges": ["USAGE", "CREATE"]}
    assert internal(compute, "/grants", body) == (201, body)  # USAGE held: only CREATE granted
    assert privileges(compute, "reader", "app") == (True, True)
    assert compute.status()["status"] == "running"


def test_hostile_names_are_identifiers_never_sql(compute):
    body = {"database": "postgres", "schema": HOSTILE_SCHEMA, "privileges": ["USAGE"], "role": HOSTILE_ROLE}
    assert internal(compute, "/grants", body) == (201, body)
    assert privileges(compute, HOSTILE_ROLE, HOSTILE_SCHEMA) == (True, False)
    with psycopg.connect(compute.admin_conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'public'").fetchone()[0] == 1


@pytest.mark.parametrize("change,code", [
    ({"privileges": ["ALL"]}, 422), ({"privileges": ["SUPERUSER"]}, 422), ({"role": "public"}, 422),
    ({"role": "r\x00oot"}, 422), ({"schema": "s" * 64}, 422), ({"role": "x" * 10_000}, 422),
    ({"database": "postgres; DROP DATABASE postgres"}, 500),  # a name, which no database has
])
def test_refusals_change_nothing(compute, change, code):
    body = {"database": "postgres", "schema": "app", "privileges": ["USAGE"], "role": "reader", **change}
    got, answer = internal(compute, "/grants", body)
    assert got == code, answer
    with psycopg.connect(compute.admin_conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'postgres'").fetchone()[0] == 1


def test_a_grant_to_a_role_that_does_not_exist_is_heads_500(compute):
    body = {"database": "postgres", "schema": "app", "privileges": ["USAGE"], "role": "nobody_here"}
    code, answer = internal(compute, "/grants", body)
    assert code == 500
    assert answer["error"].startswith("failed to grant role privileges to the schema: ")
    assert 'role "nobody_here" does not exist' in answer["error"]
    assert compute.status()["status"] == "running"


def test_extensions_as_head(compute):
    with psycopg.connect(compute.admin_conninfo(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION hstore VERSION '1.7'")
    assert internal(compute, "/extensions", {"extension": "hstore", "database": "postgres", "version": "1.8"}) \
        == (201, {"extension": "hstore", "version": "1.8"})  # ALTER EXTENSION ... UPDATE TO
    assert internal(compute, "/extensions", {"extension": "citext", "database": "postgres", "version": "1.6"}) \
        == (201, {"extension": "citext", "version": "1.6"})  # CREATE EXTENSION ... WITH SCHEMA public
    with psycopg.connect(compute.admin_conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT extname, extversion, extnamespace::regnamespace::text FROM pg_extension "
                            "WHERE extname IN ('hstore', 'citext') ORDER BY 1").fetchall() == \
            [("citext", "1.6", "public"), ("hstore", "1.8", "public")]
    code, answer = internal(compute, "/extensions", {"extension": "citext", "database": "postgres",
                                                     "version": "1.6'; DROP EXTENSION hstore; --"})
    assert code == 500 and answer["error"].startswith("failed to install extension: ")
    code, answer = internal(compute, "/extensions", {"extension": 'no"such', "database": "postgres", "version": "1"})
    assert code == 500 and "failed to install extension: " in answer["error"]
    with psycopg.connect(compute.admin_conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'hstore'").fetchone()[0] == 1


def test_the_ports_are_apart_and_others_are_not_supported(compute):
    assert compute.request("POST", "/grants", {"database": "postgres", "schema": "app",
                                                "privileges": ["USAGE"], "role": "reader"})[0] == 404
    assert internal(compute, "/refresh_configuration", b"")[0] == 501
    assert internal(compute, "/extension_server/neon.so", b"") == (412, {"error": "remote storage is not configured"})
    req = urllib.request.Request(f"http://127.0.0.1:{compute.internal_port}/status")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 404  # no /status, no token routes on the internal port


def test_peers_beyond_loopback_never_reach_it(compute):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    with pytest.raises(OSError):  # bound to 127.0.0.1: refused before any HTTP
        socket.create_connection((address, compute.internal_port), timeout=5).close()


def test_an_internal_port_in_use_is_a_one_line_error_before_anything():
    c = InternalCompute()
    c.spec = c.new_spec()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        c.args = ["--internal-http-port", str(port)]
        r = subprocess.run(c.command(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"compute-ctl: the HTTP API cannot listen on 127.0.0.1:{port} "
        "(--internal-http-address/--internal-http-port): Address already in use"]
    assert not os.path.exists(c.pgdata) and not os.path.exists(c.runtime_dir)


def test_only_compute_ctl_and_the_api_hold_the_internal_socket(compute):
    """The internal socket is kept like the external one (compute/api/listener.py): compute-ctl
    and the api hold it, no other program of the tree (postgres, the driver, the monitor)."""
    from tests.support.fault_tree import holders, listening_inode, tree
    compute.wait_handed_over()
    held = holders(compute, listening_inode(compute.internal_port))
    assert set(held.values()) <= {"compute-ctl", "api master", "api worker"}, held
    assert compute.proc.pid in held and "api worker" in set(held.values())
    others = {role for role, p in tree(compute.proc.pid) if p.pid not in held}
    assert {"lifecycle", "monitor", "postgres"} <= others, others


def test_an_operator_may_open_it_and_is_warned():
    """--internal-http-address 0.0.0.0 (HEAD binds every interface): a peer beyond loopback is
    answered (here a refusal of its body, 422: it reached the app), and compute-ctl warned."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    c = InternalCompute()
    c.internal_port = free_port()
    c.spec = c.new_spec()
    c.args = ["--internal-http-port", str(c.internal_port), "--internal-http-address", "0.0.0.0"]
    with c:
        c.wait_status("running")
        code, answer = internal(c, "/grants", {"database": "postgres", "schema": "public",
                                               "privileges": ["ALL"], "role": "x"}, host=address)
        assert code == 422 and "unknown variant `ALL`" in answer["error"]
        assert "!!! the internal API (POST /grants, /extensions: no token) listens on 0.0.0.0" in c.output()


def test_a_request_waits_for_a_driver_that_is_down_and_is_carried_out_by_the_next(compute):
    """The request is a record in the state file, not a message to a process: with the
    lifecycle driver stopped, /grants waits; the driver supervisord starts again carries it out."""
    import threading
    import time

    from compute.shared.state import StateStore, state_path
    with psycopg.connect(compute.admin_conninfo(), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA later")
    r = compute.supervisorctl("stop", "lifecycle")
    assert r.returncode == 0, r.stdout + r.stderr
    body = {"database": "postgres", "schema": "later", "privileges": ["USAGE"], "role": "reader"}
    answers: list = []
    caller = threading.Thread(target=lambda: answers.append(internal(compute, "/grants", body, timeout=120)))
    caller.start()
    try:
        store = StateStore(state_path(compute.runtime_dir))
        deadline = time.monotonic() + 30
        while not store.get("catalog_requests"):
            assert time.monotonic() < deadline, "the request never reached the state file"
            time.sleep(0.05)
        assert answers == [] and privileges(compute, "reader", "later") == (False, False)
    finally:
        r = compute.supervisorctl("start", "lifecycle")
        caller.join(120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert answers == [(201, body)]
    assert privileges(compute, "reader", "later") == (True, False)
