"""The HTTP API: route shapes (falcon TestClient on a real state file), postgres-backed routes
against a real PG15, auth, supervisord interplay, and the real gunicorn command."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import threading
import time

import falcon
import falcon.testing
import jwt
import psycopg
import pytest

from compute.api import auth as auth_mod
from compute.api.app import create_app
from compute.api.bodies import parse_rfc3339, physical_cores, rfc3339
from compute.api.context import ApiContext
from compute.api.errors import MAX_BODY_BYTES
from compute.supervision import rpc
from compute.api.writability import WRITABILITY_QUERY
from compute.spec import from_stored, parse_spec
from compute.state import StateStore, state_path
from tests.support.api_helpers import (TENANT, TIMELINE, fake_driver, gunicorn, gunicorn_state, jwks_keys,
                                       launch_settings, make_state, minimal_spec, pg, request_driver,
                                       short_runtime_dir, supervisord, write_jwks)

__all__ = ["pg"]  # the fixture

JSON = {"Content-Type": "application/json"}

RFC3339_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.fixture
def rt(tmp_path):
    return str(tmp_path)


def client_for(runtime_dir: str) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(runtime_dir))


@pytest.fixture
def client(rt):
    make_state(rt)
    return client_for(rt)


# -- /status ---------------------------------------------------------------------------------

def test_rfc3339_formatting():
    assert rfc3339(None) is None
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1795600800.1234) == "2026-11-25T10:00:00.123Z"
    assert rfc3339(1795600800.9999) == "2026-11-25T10:00:00.999Z"  # truncated, never rounded up
    assert parse_rfc3339(rfc3339(1795600800.5)) == 1795600800.5


def test_status_shape(rt):
    make_state(rt, status="running", start_time=1795600800.25, last_active=1795600900.5)
    r = client_for(rt).simulate_get("/status")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json == {"tenant": TENANT, "timeline": TIMELINE, "status": "running",
                      "last_active": "2026-11-25T10:01:40.500Z", "error": None,
                      "start_time": "2026-11-25T10:00:00.250Z"}


def test_status_unknowns_are_null(rt):
    make_state(rt, status="empty", start_time=None, last_active=None, tenant=None, timeline=None)
    assert client_for(rt).simulate_get("/status").json == {
        "tenant": None, "timeline": None, "status": "empty", "last_active": None, "error": None, "start_time": None}


def test_status_follows_the_state_file(rt):
    store = make_state(rt, status="init")
    c = client_for(rt)
    assert c.simulate_get("/status").json["status"] == "init"
    store.set(status="failed", error="sync safekeepers: exit 1")
    body = c.simulate_get("/status").json
    assert (body["status"], body["error"]) == ("failed", "sync safekeepers: exit 1")
    assert RFC3339_MS.match(body["start_time"])


# -- /metrics.json, /info ------------------------------------------------------------------

def test_metrics_json(rt):
    make_state(rt, metrics={})
    c = client_for(rt)
    assert c.simulate_get("/metrics.json").json == {
        "sync_safekeepers_ms": 0, "basebackup_ms": 0, "config_ms": 0, "total_startup_ms": 0}
    StateStore(state_path(rt)).record_metrics(sync_safekeepers_ms=12, basebackup_ms=340, config_ms=56,
                                              total_startup_ms=500, wait_for_spec_ms=7, basebackup_bytes=123456)
    body = c.simulate_get("/metrics.json").json
    assert body == {"sync_safekeepers_ms": 12, "basebackup_ms": 340, "config_ms": 56, "total_startup_ms": 500,
                    "wait_for_spec_ms": 7, "basebackup_bytes": 123456}
    assert all(type(v) is int for v in body.values())


def test_info_counts_physical_cores(client):
    assert client.simulate_get("/info").json == {"num_cpus": physical_cores()}


def test_physical_cores_parsing(tmp_path):
    ht = tmp_path / "cpuinfo"
    blocks = []
    for cpu, (phys, core) in enumerate([(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 0)]):
        blocks.append(f"processor\t: {cpu}\nmodel name\t: X\nphysical id\t: {phys}\ncore id\t\t: {core}\n")
    ht.write_text("\n".join(blocks))
    assert physical_cores(str(ht)) == 3
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50\n\nprocessor\t: 1\nBogoMIPS\t: 50\n")
    assert physical_cores(str(arm)) == os.cpu_count()
    assert physical_cores(str(tmp_path / "missing")) == os.cpu_count()


# -- errors ----------------------------------------------------------------------------------

def test_unknown_route_is_json_404(client):
    for accept in ("application/json", "text/plain", "*/*", "application/xml"):
        r = client.simulate_get("/nope", headers={"Accept": accept})
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/json"
        assert "error" in r.json


@pytest.mark.parametrize("method,path", [("POST", "/status"), ("GET", "/configure"), ("DELETE", "/info"),
                                         ("GET", "/check_writability"), ("GET", "/terminate"),
                                         ("POST", "/metrics"), ("PUT", "/insights")])
def test_wrong_method_is_405(client, method, path):
    r = client.simulate_request(method, path)
    assert r.status_code == 405
    assert "allow" in r.headers
    assert "error" in r.json


def test_body_over_1mib_is_413(client):
    big = b"x" * (MAX_BODY_BYTES + 1)
    for path in ("/configure", "/check_writability", "/terminate"):
        r = client.simulate_post(path, body=big)
        assert r.status_code == 413, path
        assert "error" in r.json
    # exactly 1 MiB is read (and rejected as not JSON, not as too large)
    assert client.simulate_post("/configure", body=b" " * MAX_BODY_BYTES, headers=JSON).status_code == 400


# -- /configure ------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"spec"', b"{}", b'{"spec": null}',
                                  b'{"spec": [1]}', b'{"spec": "x"}', b"\xff\xfe"])
def test_configure_bad_request_is_400(client, body):
    r = client.simulate_post("/configure", body=body, headers=JSON)
    assert r.status_code == 400
    assert isinstance(r.json["error"], str)


def test_configure_not_allowed_without_pull_mode(rt):
    make_state(rt, launch=launch_settings(rt, live_config_allowed=False))
    r = client_for(rt).simulate_post("/configure", json={"spec": minimal_spec()})
    assert r.status_code == 412
    assert "not allowed" in r.json["error"]
    assert StateStore(state_path(rt)).get("status") == "running"


def test_configure_invalid_spec_is_412(client, rt):
    spec = minimal_spec()
    spec["format_version"] = 2.0
    r = client.simulate_post("/configure", json={"spec": spec})
    assert r.status_code == 412
    assert "format_version" in r.json["error"]
    assert StateStore(state_path(rt)).get_many(["status", "spec_generation"]) == {"status": "running",
                                                                                   "spec_generation": 0}


@pytest.mark.parametrize("status", ["init", "configuration_pending", "configuration", "failed"])
def test_configure_in_wrong_status_is_412(rt, status):
    make_state(rt, status=status)
    r = client_for(rt).simulate_post("/configure", json={"spec": minimal_spec()})
    assert r.status_code == 412
    assert "invalid compute status" in r.json["error"]
    assert StateStore(state_path(rt)).get("status") == status


@pytest.mark.parametrize("start", ["empty", "running"])
def test_configure_hands_the_spec_to_the_driver_and_waits(rt, start):
    make_state(rt, status=start, spec_generation=3)
    spec = minimal_spec()
    with fake_driver(rt, hold=0.3) as driver:
        t0 = time.monotonic()
        r = client_for(rt).simulate_post("/configure", json={"spec": spec})
        elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.json["status"] == "running"
    assert set(r.json) == {"tenant", "timeline", "status", "last_active", "error", "start_time"}
    assert elapsed >= 0.3
    # the spec sent, stored as the programs read it (typed, without parsing it again)
    assert [from_stored(doc) for doc in driver.applied] == [parse_spec(spec)]
    store = StateStore(state_path(rt))
    assert from_stored(store.get("spec")) == parse_spec(spec)
    assert store.get("spec_generation") == 4


def test_configure_failure_is_500_with_the_error(rt):
    make_state(rt, status="running")
    with fake_driver(rt, fail="role alice: permission denied"):
        r = client_for(rt).simulate_post("/configure", json={"spec": minimal_spec()})
    assert r.status_code == 500
    assert r.json == {"error": "role alice: permission denied"}


def test_configure_clears_an_old_error(rt):
    make_state(rt, status="running", error="stale")
    with fake_driver(rt):
        r = client_for(rt).simulate_post("/configure", json={"spec": minimal_spec()})
    assert r.status_code == 200 and r.json["error"] is None


def test_concurrent_configure_has_exactly_one_winner(rt):
    make_state(rt, status="running")
    app = create_app(rt)
    results: list[int] = []
    barrier = threading.Barrier(6)

    def call():
        c = falcon.testing.TestClient(app)
        barrier.wait()
        results.append(c.simulate_post("/configure", json={"spec": minimal_spec()}).status_code)

    with fake_driver(rt, hold=0.5) as driver:
        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert sorted(results) == [200, 412, 412, 412, 412, 412]
    assert len(driver.applied) == 1
    assert StateStore(state_path(rt)).get("spec_generation") == 1


def test_configure_wakes_the_driver_through_supervisord():
    rt = short_runtime_dir()
    try:
        make_state(rt, status="running")
        with supervisord(rt) as usr1_log, fake_driver(rt, hold=0.1):
            r = client_for(rt).simulate_post("/configure", json={"spec": minimal_spec()})
            assert r.status_code == 200
            deadline = time.monotonic() + 5
            while not (os.path.exists(usr1_log) and open(usr1_log).read()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert open(usr1_log).read() == "usr1\n"
    finally:
        shutil.rmtree(rt, ignore_errors=True)


def test_configure_timeout(rt):
    from compute.api.configure import Configure
    make_state(rt, status="running")
    ctx = ApiContext(rt)
    app = falcon.App()
    app.add_route("/configure", Configure(ctx, timeout=0.3))
    r = falcon.testing.TestClient(app).simulate_post("/configure", json={"spec": minimal_spec()})
    assert r.status_code == 500
    assert "timed out" in r.json["error"]


# -- /insights, /check_writability (real postgres) -----------------------------------------

def pg_state(rt, cluster, **fields):
    return make_state(rt, launch=launch_settings(rt, connstr=cluster.url()), **fields)


@pytest.mark.parametrize("status", ["empty", "init", "configuration_pending", "failed"])
def test_insights_when_not_running_is_text(rt, status):
    make_state(rt, status=status)
    r = client_for(rt).simulate_get("/insights")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    expected = {"empty": "Empty", "init": "Init", "configuration_pending": "ConfigurationPending",
                "failed": "Failed"}[status]
    assert r.text == f"compute is not running, current status: {expected}"


def test_insights_top_statements_without_the_superuser(rt, pg):
    with psycopg.connect(pg.conninfo(), autocommit=True) as su:
        su.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        su.execute("DROP ROLE IF EXISTS insight_user")
        su.execute("CREATE ROLE insight_user LOGIN")
        su.execute("SELECT pg_stat_statements_reset()")
        su.execute("SELECT pg_sleep(0.05) AS superuser_statement")  # slowest: would come first
        su_oid = su.execute("SELECT oid FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    with psycopg.connect(pg.conninfo(user="insight_user"), autocommit=True) as u:
        for i in range(3):
            u.execute("SELECT pg_sleep(0.02) AS slow_user_statement")
        for i in range(120):  # many distinct statements: the answer is capped at 100
            u.execute(f"SELECT {i} AS n{i}")
    pg_state(rt, pg)
    r = client_for(rt).simulate_get("/insights")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    rows = r.json["pg_stat_statements"]
    assert 0 < len(rows) <= 100
    assert all(row["userid"] != su_oid for row in rows)
    assert not any("superuser_statement" in row["query"] for row in rows)
    assert "slow_user_statement" in rows[0]["query"]
    assert rows[0]["calls"] == 3
    keys = [row["mean_exec_time"] + row["mean_plan_time"] for row in rows]
    assert keys == sorted(keys, reverse=True)


def test_insights_without_the_extension_is_an_empty_list(rt):
    from tests.support.pgcluster import running_cluster
    with running_cluster() as cluster:  # no pg_stat_statements at all
        pg_state(rt, cluster)
        r = client_for(rt).simulate_get("/insights")
        assert (r.status_code, r.headers["content-type"], r.json) == (200, "application/json",
                                                                       {"pg_stat_statements": []})
        with psycopg.connect(cluster.conninfo(), autocommit=True) as su:  # installed, not preloaded
            su.execute("CREATE EXTENSION pg_stat_statements")
        r = client_for(rt).simulate_get("/insights")
        assert (r.status_code, r.json) == (200, {"pg_stat_statements": []})


@pytest.mark.parametrize("status", ["empty", "init", "configuration", "failed"])
def test_check_writability_when_not_running_is_text(rt, status):
    make_state(rt, status=status)
    r = client_for(rt).simulate_post("/check_writability")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text.startswith("invalid compute status for check_writability request: ")


def test_check_writability_writes_in_one_round_trip(rt, pg, monkeypatch):
    pg_state(rt, pg)
    calls = []
    real_execute = psycopg.Connection.execute

    def spy(self, query, params=None, *, prepare=None, binary=False):
        calls.append((query, params, prepare))
        return real_execute(self, query, params, prepare=prepare, binary=binary)

    monkeypatch.setattr(psycopg.Connection, "execute", spy)
    c = client_for(rt)
    r = c.simulate_post("/check_writability")
    assert (r.status_code, r.text) == (200, "true")
    assert calls == [(WRITABILITY_QUERY, None, False)]  # both statements, one simple query
    monkeypatch.undo()
    with psycopg.connect(pg.conninfo()) as conn:
        (first,) = conn.execute("SELECT updated_at FROM health_check WHERE id = 1").fetchone()
    time.sleep(0.01)
    assert c.simulate_post("/check_writability").text == "true"
    with psycopg.connect(pg.conninfo()) as conn:
        rows = conn.execute("SELECT id, updated_at FROM health_check").fetchall()
    assert len(rows) == 1 and rows[0][1] > first


def test_check_writability_reports_the_error(rt, pg):
    # (a connstr option default_transaction_read_only=on no longer counts: our sessions pin it
    # off, so that a database owner cannot make our DDL fail; a real standby is still read-only)
    with psycopg.connect(pg.conninfo(), autocommit=True) as su:
        su.execute("DROP DATABASE IF EXISTS nopublic")
        su.execute("CREATE DATABASE nopublic")
    with psycopg.connect(pg.conninfo("nopublic"), autocommit=True) as su:
        su.execute("DROP SCHEMA public")
    make_state(rt, launch=launch_settings(rt, connstr=pg.url("nopublic")))
    r = client_for(rt).simulate_post("/check_writability")
    assert r.status_code == 500
    assert 'schema "public" does not exist' in r.text


def test_check_writability_postgres_down(rt):
    make_state(rt)  # connstr points at port 1
    r = client_for(rt).simulate_post("/check_writability")
    assert r.status_code == 500
    assert "connection" in r.text.lower()


# -- probes ----------------------------------------------------------------------------------

def test_healthz_never_touches_postgres(rt, monkeypatch):
    make_state(rt, status="failed")
    monkeypatch.setattr(ApiContext, "pg_connect", lambda *a, **k: pytest.fail("healthz touched postgres"))
    r = client_for(rt).simulate_get("/healthz")
    assert (r.status_code, r.json) == (200, {"alive": True})


def test_readyz(rt, pg):
    store = pg_state(rt, pg, status="init")
    c = client_for(rt)
    r = c.simulate_get("/readyz")
    assert r.status_code == 503 and r.json["ready"] is False and r.json["status"] == "init"
    store.set(status="running")
    r = c.simulate_get("/readyz")
    assert (r.status_code, r.json) == (200, {"ready": True, "status": "running", "reason": None})
    store.set(status="configuration")
    assert c.simulate_get("/readyz").status_code == 503


def test_readyz_postgres_down_and_cache(rt, monkeypatch):
    make_state(rt, status="running")  # nothing listens on port 1
    connects = []
    real = ApiContext.pg_connect

    def counting(self, timeout=3):
        connects.append(timeout)
        return real(self, timeout)

    monkeypatch.setattr(ApiContext, "pg_connect", counting)
    c = client_for(rt)
    for _ in range(20):
        r = c.simulate_get("/readyz")
        assert r.status_code == 503
        assert "does not accept connections" in r.json["reason"]
    assert connects == [1]  # cached for about a second, connect timeout 1 s
    time.sleep(1.1)
    c.simulate_get("/readyz")
    assert len(connects) == 2


# -- /metrics (Prometheus) --------------------------------------------------------------------

def parse_prometheus(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples


def test_prometheus_without_supervisord(rt):
    now = time.time()
    store = make_state(rt, status="running", start_time=now - 100, last_active=now - 30,
                       program_restarts={"postgres": 2, "monitor": 1}, pending_restart=["shared_buffers"])
    store.record_metrics(sync_safekeepers_ms=1500, basebackup_ms=250, basebackup_bytes=4096, config_ms=3,
                         total_startup_ms=2000)
    r = client_for(rt).simulate_get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    s = parse_prometheus(r.text)
    assert s['compute_status{status="running"}'] == 1
    assert s['compute_status{status="empty"}'] == 0
    assert s['compute_startup_phase_seconds{phase="sync_safekeepers"}'] == 1.5
    assert s['compute_startup_phase_seconds{phase="total_startup"}'] == 2.0
    assert s["compute_basebackup_bytes"] == 4096
    assert 29 <= s["compute_seconds_since_last_active"] <= 35
    assert s['compute_program_restarts_total{program="postgres"}'] == 2
    assert s["compute_pending_restart_settings"] == 1
    assert s["compute_supervisord_up"] == 0
    assert "# TYPE compute_program_restarts_total counter" in r.text


def test_prometheus_with_supervisord():
    rt = short_runtime_dir()
    try:
        make_state(rt)
        with supervisord(rt):
            r = client_for(rt).simulate_get("/metrics")
            s = parse_prometheus(r.text)
            assert s["compute_supervisord_up"] == 1
            assert s['compute_program_state{program="postgres",state="RUNNING"}'] == 20
            assert s['compute_program_up{program="lifecycle"}'] == 1
            rpc(rt).supervisor.stopProcess("postgres")
            s = parse_prometheus(client_for(rt).simulate_get("/metrics").text)
            assert s['compute_program_state{program="postgres",state="STOPPED"}'] == 0
            assert s['compute_program_up{program="postgres"}'] == 0
    finally:
        shutil.rmtree(rt, ignore_errors=True)


def test_prometheus_survives_a_wedged_supervisord():
    rt = short_runtime_dir()
    from compute.supervision import socket_path
    wedged = socket.socket(socket.AF_UNIX)  # listens, never answers
    try:
        wedged.bind(socket_path(rt))
        wedged.listen(16)
        make_state(rt)
        t0 = time.monotonic()
        r = client_for(rt).simulate_get("/metrics")
        assert r.status_code == 200
        assert time.monotonic() - t0 < 4
        assert parse_prometheus(r.text)["compute_supervisord_up"] == 0
    finally:
        wedged.close()
        shutil.rmtree(rt, ignore_errors=True)


def test_prometheus_label_escaping(rt):
    make_state(rt, program_restarts={'we"ird\\name\n': 1})
    assert 'compute_program_restarts_total{program="we\\"ird\\\\name\\n"} 1' in \
        client_for(rt).simulate_get("/metrics").text


# -- /terminate ------------------------------------------------------------------------------

def test_terminate_stops_postgres_through_supervisord():
    rt = short_runtime_dir()
    try:
        store = make_state(rt, postgres_started=True)  # as the driver sets it before starting postgres
        with supervisord(rt), request_driver(rt):  # the driver stops postgres
            r = client_for(rt).simulate_post("/terminate")
            assert (r.status_code, r.json) == (200, {"terminated": True, "lsn": None})  # no spec: no LSN
            assert store.get("shutdown_requested") is True
            info = rpc(rt).supervisor.getProcessInfo("postgres")
            assert info["statename"] == "STOPPED"
            assert open(os.path.join(rt, "postgres.signals")).read() == "SIGINT\n"  # fast shutdown
            assert client_for(rt).simulate_post("/terminate").status_code == 200  # already down: fine
    finally:
        shutil.rmtree(rt, ignore_errors=True)


def test_terminate_immediate_sends_sigquit():
    rt = short_runtime_dir()
    try:
        store = make_state(rt, postgres_started=True)  # as the driver sets it before starting postgres
        with supervisord(rt), request_driver(rt):  # the driver stops postgres
            r = client_for(rt).simulate_post("/terminate", params={"mode": "immediate"})
            assert (r.status_code, r.json) == (200, {"terminated": True, "lsn": None})
            assert rpc(rt).supervisor.getProcessInfo("postgres")["statename"] == "EXITED"
            assert open(os.path.join(rt, "postgres.signals")).read() == "SIGQUIT\n"  # immediate shutdown
            assert store.get("shutdown_requested") is True and store.get("terminate_pending") is False
    finally:
        shutil.rmtree(rt, ignore_errors=True)


@pytest.mark.parametrize("mode", ["smart", "FAST", "immediate;rm", "fast&mode=immediate"])
def test_terminate_unknown_mode_is_400_and_changes_nothing(rt, mode):
    store = make_state(rt)
    r = client_for(rt).simulate_post("/terminate", query_string=f"mode={mode}")
    assert r.status_code == 400 and "mode" in r.json["error"]
    assert store.get("shutdown_requested") is False


def test_terminate_without_supervisord_is_500(rt):
    store = make_state(rt)
    r = client_for(rt).simulate_post("/terminate")
    assert r.status_code == 500
    assert "supervisord" in r.json["error"]
    assert store.get("shutdown_requested") is True


# -- JWT auth ----------------------------------------------------------------------------------

@pytest.fixture
def keys():
    return jwks_keys()


@pytest.fixture
def auth_client(rt, keys):
    path = write_jwks(os.path.join(rt, "jwks.json"), keys[2])
    make_state(rt, status="failed", launch=launch_settings(rt, jwks_path=path, compute_id="compute-1"))
    return client_for(rt)


def claims(**overrides) -> dict:
    """Claims of a valid token for compute-1 (tokens must expire)."""
    return {"compute_id": "compute-1", "exp": time.time() + 300, **overrides}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_auth_open_without_jwks(rt):
    make_state(rt, status="init")
    c = client_for(rt)
    assert c.simulate_post("/check_writability").status_code == 200
    assert c.simulate_post("/configure", body=b"x", headers=JSON).status_code == 412  # past auth: the status


def test_auth_missing_or_malformed_token_is_401(auth_client):
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"},
                    bearer("not.a.jwt"), bearer("abc")):
        for path in ("/check_writability", "/configure", "/terminate"):
            r = auth_client.simulate_post(path, headers=headers)
            assert r.status_code == 401, (headers, path)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "error" in r.json


def test_auth_valid_eddsa_and_rs256(auth_client, keys):
    ed, rs, _ = keys
    for token in (jwt.encode(claims(), ed, algorithm="EdDSA", headers={"kid": "ed"}),
                  jwt.encode(claims(), rs, algorithm="RS256", headers={"kid": "rs"}),
                  jwt.encode(claims(exp=time.time() + 60, nbf=time.time() - 5), ed, algorithm="EdDSA")):
        r = auth_client.simulate_post("/check_writability", headers=bearer(token))
        assert r.status_code == 200, r.text  # status failed: the text answer, past auth
        assert r.text.startswith("invalid compute status")


def test_auth_wrong_compute_is_403(auth_client, keys):
    ed = keys[0]
    for wrong in (claims(compute_id="compute-2"), {"exp": time.time() + 60}, claims(compute_id=None)):
        r = auth_client.simulate_post("/check_writability", headers=bearer(jwt.encode(wrong, ed, algorithm="EdDSA")))
        assert r.status_code == 403, wrong
        assert "error" in r.json


def test_auth_rejects_bad_signatures(auth_client, keys):
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    stranger = ed25519.Ed25519PrivateKey.generate()
    bad = [
        jwt.encode(claims(), stranger, algorithm="EdDSA"),
        jwt.encode(claims(), stranger, algorithm="EdDSA", headers={"kid": "ed"}),
        jwt.encode(claims(exp=time.time() - 60), keys[0], algorithm="EdDSA"),
        jwt.encode(claims(), "s" * 32, algorithm="HS256"),
        jwt.encode(claims(), keys[0], algorithm="EdDSA", headers={"kid": "unknown"}),
    ]
    # algorithm confusion: an HMAC token keyed with the published RSA public key
    pem = keys[1].public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    header = json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rs"}).encode()
    import base64, hashlib, hmac
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")  # noqa: E731
    signing_input = b64(header) + b"." + b64(b'{"compute_id": "compute-1"}')
    bad.append((signing_input + b"." + b64(hmac.new(pem, signing_input, hashlib.sha256).digest())).decode())
    ed_token = jwt.encode(claims(), keys[0], algorithm="EdDSA")
    head, payload, sig = ed_token.split(".")
    tampered = b64(b'{"compute_id": "compute-2"}').decode()
    bad.append(f"{head}.{tampered}.{sig}")  # tampered payload
    for token in bad:
        assert auth_client.simulate_post("/check_writability", headers=bearer(token)).status_code == 401, token


def test_auth_read_and_health_routes_stay_open(auth_client):
    for path in ("/status", "/metrics.json", "/metrics", "/info", "/healthz", "/readyz", "/openapi.yaml"):
        assert auth_client.simulate_get(path).status_code in (200, 503), path
    assert auth_client.simulate_get("/insights").status_code == 401  # query texts: database contents
    assert auth_client.simulate_get("/configure").status_code == 405  # 405, not 401
    assert auth_client.simulate_get("/nope").status_code == 404


def test_auth_configure_with_token(rt, keys):
    path = write_jwks(os.path.join(rt, "jwks.json"), keys[2])
    make_state(rt, launch=launch_settings(rt, jwks_path=path, compute_id="compute-1"))
    token = jwt.encode(claims(), keys[1], algorithm="RS256")
    c = client_for(rt)
    assert c.simulate_post("/configure", json={"spec": minimal_spec()}).status_code == 401
    with fake_driver(rt):
        r = c.simulate_post("/configure", json={"spec": minimal_spec()}, headers=bearer(token))
    assert r.status_code == 200


def test_auth_unreadable_jwks_fails_closed(rt, keys):
    make_state(rt, launch=launch_settings(rt, jwks_path=os.path.join(rt, "missing.json")))
    token = jwt.encode(claims(), keys[0], algorithm="EdDSA")
    assert client_for(rt).simulate_post("/check_writability", headers=bearer(token)).status_code == 401


def test_auth_reloads_a_rotated_jwks(rt, keys):
    path = write_jwks(os.path.join(rt, "jwks.json"), {"keys": [keys[2]["keys"][1]]})  # RSA only
    make_state(rt, status="failed", launch=launch_settings(rt, jwks_path=path, compute_id="compute-1"))
    c = client_for(rt)
    ed_token = jwt.encode(claims(), keys[0], algorithm="EdDSA")
    assert c.simulate_post("/check_writability", headers=bearer(ed_token)).status_code == 401
    write_jwks(path, keys[2])
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert c.simulate_post("/check_writability", headers=bearer(ed_token)).status_code == 200


def test_load_jwks_skips_unsupported_keys(tmp_path, keys):
    doc = {"keys": [{"kty": "oct", "k": "c2VjcmV0"},
                    {"kty": "OKP", "crv": "X25519", "x": keys[2]["keys"][0]["x"]},
                    {"kty": "RSA", "alg": "RS512", "n": keys[2]["keys"][1]["n"], "e": "AQAB"},
                    keys[2]["keys"][0]]}
    loaded = auth_mod.load_jwks(write_jwks(str(tmp_path / "j.json"), doc))
    assert [(k.kid, k.alg) for k in loaded] == [("ed", "EdDSA")]


# -- real gunicorn, real HTTP ----------------------------------------------------------------------

def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_gunicorn_serves_status_while_configure_blocks(tmp_path):
    rt = str(tmp_path)
    _, port = gunicorn_state(rt, status="running")
    with gunicorn(rt):
        status, headers, body = call(port, "GET", "/status")
        assert status == 200 and json.loads(body)["status"] == "running"
        result = {}

        def configure():
            result["r"] = call(port, "POST", "/configure", json.dumps({"spec": minimal_spec()}).encode(),
                               {"Content-Type": "application/json"})

        with fake_driver(rt, hold=2.0):
            t = threading.Thread(target=configure)
            t.start()
            deadline = time.monotonic() + 5
            while StateStore(state_path(rt)).get("status") == "running" and time.monotonic() < deadline:
                time.sleep(0.01)
            latencies, seen = [], set()
            while t.is_alive():
                t0 = time.monotonic()
                s, _, b = call(port, "GET", "/status")
                latencies.append(time.monotonic() - t0)
                assert s == 200
                seen.add(json.loads(b)["status"])
                time.sleep(0.02)
            t.join()
        assert result["r"][0] == 200, result["r"]
        assert json.loads(result["r"][2])["status"] == "running"
        assert "configuration" in seen
        assert len(latencies) > 20
        assert max(latencies) < 0.5, max(latencies)


def test_gunicorn_chunked_body_over_limit_is_413(tmp_path):
    rt = str(tmp_path)
    _, port = gunicorn_state(rt)
    with gunicorn(rt):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        chunk = b"x" * 65536

        def gen():
            for _ in range(40):  # 2.5 MiB, no Content-Length
                yield chunk

        conn.request("POST", "/configure", body=gen(), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked", **JSON})
        resp = conn.getresponse()
        assert resp.status == 413
        assert "error" in json.loads(resp.read())
        conn.close()
        status, _, _ = call(port, "POST", "/configure", b"x" * (MAX_BODY_BYTES + 10), JSON)
        assert status == 413


def test_gunicorn_worker_crash_loses_no_state(tmp_path):
    rt = str(tmp_path)
    store, port = gunicorn_state(rt, status="running", last_active=1795600800.5)
    with gunicorn(rt, env={"COMPUTE_API_WORKERS": "2"}) as master:
        before = json.loads(call(port, "GET", "/status")[2])
        deadline = time.monotonic() + 10
        while True:  # both workers forked (the first may answer before the second exists)
            workers = [int(p) for p in open(f"/proc/{master.pid}/task/{master.pid}/children").read().split()]
            if len(workers) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(workers) == 2
        for w in workers:
            os.kill(w, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            now = [int(p) for p in open(f"/proc/{master.pid}/task/{master.pid}/children").read().split()]
            if len(now) == 2 and not set(now) & set(workers):
                break
            time.sleep(0.05)
        else:
            pytest.fail("gunicorn did not replace its workers")
        status, _, body = call(port, "GET", "/status")
        assert status == 200 and json.loads(body) == before
        assert store.integrity_ok()


def test_gunicorn_logs_to_stderr_as_level_and_message(tmp_path):
    rt = str(tmp_path)
    _, port = gunicorn_state(rt)
    log_path = os.path.join(rt, "g.log")
    with gunicorn(rt, stderr_path=log_path):
        call(port, "GET", "/status")
    text = open(log_path).read()
    # `LEVEL: message`: the tree's logrelay adds the time and the program name
    assert re.search(r"^INFO: Listening at: http://0\.0\.0\.0:%d " % port, text, re.M), text
    assert "GET /status" not in text  # no access log by default



def test_gunicorn_exits_when_its_parent_dies(tmp_path):
    """supervisord killed with SIGKILL: the api must not linger as an orphan holding the port."""
    import subprocess
    import sys
    from tests.support.api_helpers import GUNICORN_ARGV, REPO, wait_port
    rt = str(tmp_path)
    _, port = gunicorn_state(rt)
    env = dict(os.environ, COMPUTE_RUNTIME_DIR=rt, PYTHONPATH=REPO)
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; p = subprocess.Popen(sys.argv[1:]); "
                               "print(p.pid, flush=True); time.sleep(600)", *GUNICORN_ARGV],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        master = int(parent.stdout.readline())
        wait_port(port)
        assert call(port, "GET", "/status")[0] == 200
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    pass
            except OSError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the orphaned api still listens")
    finally:
        parent.kill()
        try:
            os.kill(master, signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError):
            pass


# -- the worker: request heads are read in the poller ---------------------------------------------

def _read_responses(sock: socket.socket, n: int, timeout: float = 10) -> list[bytes]:
    sock.settimeout(timeout)
    data = b""
    while data.count(b"HTTP/1.1 ") < n or not data.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return [b"HTTP/1.1 " + part for part in data.split(b"HTTP/1.1 ")[1:]]


def test_worker_pipelined_and_split_requests(tmp_path):
    rt = str(tmp_path)
    _, port = gunicorn_state(rt)
    with gunicorn(rt):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\nGET /info HTTP/1.1\r\nHost: x\r\n\r\n")
            answers = _read_responses(s, 2)
            assert [a.split(b" ")[1] for a in answers] == [b"200", b"200"]
            assert b'"num_cpus"' in answers[1]
            for piece in (b"GET /in", b"fo HTTP/1.1\r", b"\nHost: x\r\n", b"\r\n"):  # split head
                s.sendall(piece)
                time.sleep(0.1)
            assert b'"num_cpus"' in _read_responses(s, 1)[0]
            body = json.dumps({"spec": []}).encode()
            s.sendall(b"POST /configure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body))
            time.sleep(0.1)
            s.sendall(body)  # the body after the head, on a kept-alive connection
            assert _read_responses(s, 1)[0].startswith(b"HTTP/1.1 400")


def test_worker_slow_and_silent_clients_do_not_starve_status(tmp_path):
    """More trickling and silent clients than the workers have threads (2 x 16)."""
    rt = str(tmp_path)
    _, port = gunicorn_state(rt)
    req = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 40 + b"\r\nConnection: close\r\n\r\n"
    results: list = []
    stop = threading.Event()
    started = threading.Semaphore(0)

    def trickle():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                for i in range(len(req)):
                    s.send(req[i:i + 1])
                    if i == 0:
                        started.release()
                    if stop.wait(3.0 / len(req)):
                        return
                results.append(s.recv(65536).split(b" ")[1])
        except OSError as e:
            results.append(repr(e))

    with gunicorn(rt):
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        threads = [threading.Thread(target=trickle) for _ in range(40)]
        for t in threads:
            t.start()
        for _ in threads:  # every trickling client has started its request
            assert started.acquire(timeout=30), "a trickling client could not start its request"
        latencies = []
        while any(t.is_alive() for t in threads):
            t0 = time.monotonic()
            assert call(port, "GET", "/status", timeout=5)[0] == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
        for t in threads:
            t.join()
        for s in silent:
            s.close()
    assert results == [b"200"] * 40
    assert len(latencies) > 10 and max(latencies) < 1.0, max(latencies)


def test_worker_lets_gunicorn_reject_bare_lf_heads(tmp_path):
    rt = str(tmp_path)
    _, port = gunicorn_state(rt)
    with gunicorn(rt):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /status HTTP/1.1\nHost: x\nConnection: close\n\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 400")


def test_api_connections_have_a_statement_timeout(rt, pg):
    own = pg.url() + "?options=-c%20work_mem%3D7MB%20-c%20search_path%3Dpublic"
    make_state(rt, launch=launch_settings(rt, connstr=own))
    with ApiContext(rt).pg_connect() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "10s"
        assert conn.execute("SHOW work_mem").fetchone()[0] == "7MB"  # the connstr's own options: kept
        assert conn.execute("SHOW search_path").fetchone()[0] == "pg_catalog,pg_temp"  # except the pinned
        assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "off"
        assert conn.execute("SHOW application_name").fetchone()[0] == "compute_ctl:http"
