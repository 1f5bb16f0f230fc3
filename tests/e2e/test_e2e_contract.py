"""End to end, the contract details: pull mode as compute_ctl of April 2023 (both token
variables, both answer shapes), start_time of an `empty` compute, skip_pg_catalog_updates,
/terminate with the LSN in both modes, and /dbs_and_roles + /database_schema through real
gunicorn (streamed, guarded by the JWKS)."""

import json
import os
import socket
import subprocess
import time

import jwt
import psycopg
import pytest

from compute.api.bodies import parse_rfc3339
from tests.peers.control_plane import ControlPlanePeer
from tests.support.api_helpers import jwks_keys
from tests.support.tree import Compute
from tests.support.waiting import wait_for

TOKEN = "control-plane-token-value"


def pull_compute(cp: ControlPlanePeer, env: dict) -> Compute:
    c = Compute()
    c.args = ["-i", "compute-1", "-p", cp.url, "--control-plane-api", "2023"]
    c.env = env
    return c


def lsn_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def roles(c: Compute) -> set:
    with psycopg.connect(c.admin_conninfo()) as conn:
        return {r for (r,) in conn.execute("SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_'")}


def test_pull_attached_with_neon_control_plane_token():
    with ControlPlanePeer(None, answer_status="attached") as cp:
        c = pull_compute(cp, {"NEON_CONTROL_PLANE_TOKEN": TOKEN})
        cp.spec = c.new_spec()
        with c:
            c.wait_status("running")
            assert cp.requests[0].headers.get("Authorization") == TOKEN  # raw, as compute_ctl sends it
            assert "app" in roles(c)
            assert TOKEN not in c.output()


def test_pull_attached_without_a_spec_fails_the_start():
    with ControlPlanePeer(None, answer_status="attached") as cp:
        c = pull_compute(cp, {"NEON_CONSOLE_JWT": TOKEN})
        with c:
            st = c.wait_status("failed")
            assert "attached, but its spec is empty" in st["error"]
            assert len(cp.requests) == 1  # not retried
            assert c.wait_exit(30) == 1


def test_empty_status_then_configure_resets_start_time_and_skip_pg_catalog_updates():
    with ControlPlanePeer(None, answer_status="empty") as cp:
        c = pull_compute(cp, {"NEON_CONSOLE_JWT": TOKEN})
        cp.spec = c.new_spec()  # present, but "empty" wins: no spec yet
        with c:
            first = c.wait_status("empty")
            assert cp.requests[0].headers.get("Authorization") == TOKEN
            booted = parse_rfc3339(first["start_time"])
            time.sleep(1.2)  # the wait for the spec must not count as start-up
            spec = c.new_spec()
            spec["skip_pg_catalog_updates"] = True
            code, body = c.request("POST", "/configure", {"spec": spec}, {"Content-Type": "application/json"}, 60)
            assert code == 200, body
            st = c.wait_status("running")
            assert parse_rfc3339(st["start_time"]) >= booted + 1.0
            code, metrics = c.request("GET", "/metrics.json")
            metrics = json.loads(metrics)
            assert metrics["wait_for_spec_ms"] >= 1000
            assert metrics["total_startup_ms"] < metrics["wait_for_spec_ms"] + (time.time() - booted) * 1000 - 1000
            assert "app" not in roles(c)  # no role/database SQL: skipped
            with psycopg.connect(c.admin_conninfo()) as conn:
                assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'appdb'").fetchone()[0] == 0

            # On reconfigure too: still skipped; without the flag the role appears.
            code, _ = c.request("POST", "/configure", {"spec": spec}, {"Content-Type": "application/json"}, 60)
            assert code == 200 and "app" not in roles(c)
            spec["skip_pg_catalog_updates"] = False
            code, _ = c.request("POST", "/configure", {"spec": spec}, {"Content-Type": "application/json"}, 60)
            assert code == 200 and "app" in roles(c)


def controldata(pgdata: str) -> dict:
    out = subprocess.run(["/usr/lib/postgresql/15/bin/pg_controldata", "-D", pgdata], capture_output=True,
                         text=True, env={"LC_ALL": "C"}, check=True).stdout
    return dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in out.splitlines()))


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_terminate_answers_the_primarys_lsn_and_exits_0(mode):
    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS x")
            before = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]
        code, body = c.request("POST", f"/terminate?mode={mode}")
        assert code == 200, body
        answer = json.loads(body)
        assert answer["terminated"] is True and lsn_int(answer["lsn"]) >= lsn_int(before)
        assert c.wait_exit(30) == 0
        cd = controldata(c.pgdata)
        if mode == "fast":  # the shutdown checkpoint record starts where the WAL written before ends
            assert cd["Database cluster state"] == "shut down"
            assert answer["lsn"] == cd["Latest checkpoint location"] == before
        else:  # SIGQUIT: no shutdown checkpoint; the flush LSN read before the signal
            assert cd["Database cluster state"] == "in production"
            assert answer["lsn"] == before


def dechunk(data: bytes) -> tuple[bytes, int]:
    """An HTTP/1.1 chunked body: (the bytes, how many chunks)."""
    out, n = b"", 0
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out, n
        out, data, n = out + data[:size], data[size + 2:], n + 1


def dump_sessions(c: Compute) -> int:
    """pg_dump sessions of this compute's /database_schema (by their application_name)."""
    with psycopg.connect(c.admin_conninfo()) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity "
                            "WHERE application_name = 'compute_ctl:database_schema'").fetchone()[0]


def test_catalog_routes_through_gunicorn_streamed_and_guarded():
    ed, _, jwks = jwks_keys()
    c = Compute()
    c.spec = c.new_spec()
    token = jwt.encode({"scope": "compute_ctl:admin", "aud": ["compute"], "exp": time.time() + 300}, ed,
                       algorithm="EdDSA")  # an admin token: this push-mode compute has no compute id
    c.use_jwks(jwks, token)
    with c:
        c.wait_status("running")
        auth = {"Authorization": f"Bearer {token}"}
        with psycopg.connect(c.admin_conninfo("appdb"), autocommit=True) as conn:
            for i in range(400):  # a schema of a few hundred KiB: more than one pipe's worth
                conn.execute(f"CREATE TABLE wide_{i} (id int primary key, a text, b text, c timestamptz)")

        # A raw client without a token gets 400 on both (HEAD), and nothing runs.
        for path in ("/dbs_and_roles", "/database_schema?database=appdb"):
            with socket.create_connection(("127.0.0.1", c.http_port), timeout=10) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                head = s.recv(65536).split(b"\r\n", 1)[0]
            assert head.startswith(b"HTTP/1.1 400"), (path, head)

        code, body = c.request("GET", "/dbs_and_roles", headers=auth)
        assert code == 200
        dbs = {d["name"]: d for d in json.loads(body)["databases"]}
        assert dbs["appdb"]["owner"] == "app"

        # Streamed: chunked transfer, every table in it.
        with socket.create_connection(("127.0.0.1", c.http_port), timeout=30) as s:
            s.sendall(f"GET /database_schema?database=appdb HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
                      f"\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
        body, chunks = dechunk(rest)
        assert chunks > 1 and body.count(b"CREATE TABLE public.wide_") == 400
        assert b"PostgreSQL database dump complete" in body

        # A client that goes away mid-stream: pg_dump does not linger.
        s = socket.create_connection(("127.0.0.1", c.http_port), timeout=30)
        s.sendall(f"GET /database_schema?database=appdb HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
                  f"\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.close()
        wait_for(lambda: dump_sessions(c) == 0, 30, "pg_dump's session to end", 0.1)
        code, body = c.request("GET", "/database_schema?database=nope", headers=auth)
        assert (code, json.loads(body)) == (404, {"error": "database does not exist"})


def test_terminate_on_the_neon_path_syncs_safekeepers_again():
    """As Neon's compute_ctl: after a primary's postgres is down, --sync-safekeepers once more,
    and its LSN is the answer."""
    from tests.peers.pageserver import PageserverPeer, make_basebackup_tar
    from tests.peers.sync_safekeepers import DEFAULT_LSN, write_fake_postgres
    from tests.support.pgcluster import scratch_dir
    from tests.support.tree import with_neon_storage
    tenant, timeline, storage_token = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9", "tok.en"
    tar = make_basebackup_tar(os.path.join(scratch_dir("cs-bb-"), "basebackup.tar"))
    with PageserverPeer(tar, password=storage_token, tenant_id=tenant, timeline_id=timeline) as ps:
        c = Compute()
        c.pgbin = write_fake_postgres(c.base)
        record = os.path.join(c.base, "sync.json")
        c.env = {"FAKE_SK_RECORD": record, "FAKE_SK_EXPECT_TOKEN": storage_token}
        c.spec = with_neon_storage(c.new_spec(), ps.connstr, tenant, timeline, "127.0.0.1:5454", storage_token)
        with c:
            c.wait_status("running", timeout=90)
            code, body = c.request("POST", "/terminate")
            assert (code, json.loads(body)) == (200, {"terminated": True, "lsn": DEFAULT_LSN})
            assert c.wait_exit(30) == 0
            with open(record) as f:
                calls = json.load(f)
            assert len(calls) == 2 and all(call["token_matches"] for call in calls)
            assert storage_token not in c.output()


def test_terminate_sync_gets_a_storage_token_given_only_in_the_environment():
    """The storage token from the environment alone (NEON_AUTH_TOKEN, a Kubernetes Secret): only
    the lifecycle driver and postgres have it (compute/model/environ.py), and the driver runs
    /terminate's sync-safekeepers, so that sync authenticates like the start's (it once ran in
    the API process, without the token)."""
    from tests.peers.pageserver import PageserverPeer, make_basebackup_tar
    from tests.peers.sync_safekeepers import DEFAULT_LSN, write_fake_postgres
    from tests.support.pgcluster import scratch_dir
    from tests.support.tree import with_neon_storage
    tenant, timeline, storage_token = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9", "env.tok"
    tar = make_basebackup_tar(os.path.join(scratch_dir("cs-bb-"), "basebackup.tar"))
    with PageserverPeer(tar, password=storage_token, tenant_id=tenant, timeline_id=timeline) as ps:
        c = Compute()
        c.pgbin = write_fake_postgres(c.base)
        record = os.path.join(c.base, "sync.json")
        c.env = {"FAKE_SK_RECORD": record, "FAKE_SK_EXPECT_TOKEN": storage_token, "NEON_AUTH_TOKEN": storage_token}
        c.spec = with_neon_storage(c.new_spec(), ps.connstr, tenant, timeline, "127.0.0.1:5454", None)
        with c:
            c.wait_status("running", timeout=90)
            code, body = c.request("POST", "/terminate")
            assert (code, json.loads(body)) == (200, {"terminated": True, "lsn": DEFAULT_LSN})
            assert c.wait_exit(30) == 0
            with open(record) as f:
                calls = json.load(f)
            assert len(calls) == 2, calls
            assert [call["token_matches"] for call in calls] == [True, True]  # the start's, /terminate's
            assert storage_token not in c.output()
