"""The HTTP API: route shapes (falcon TestClient on a real state file), postgres-backed routes
against a real PG15, auth, supervisord interplay, and the real gunicorn command.

This file: the app in-process (falcon TestClient, fake driver, no process); real postgres,
supervisord and gunicorn: tests/integration/test_api.py."""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time

import falcon
import falcon.testing
import pytest

from compute.api import health
from compute.api.app import create_app
from compute.api.bodies import parse_rfc3339, physical_cores, rfc3339
from compute.api.context import ApiContext
from compute.api.errors import MAX_BODY_BYTES
from compute.model.spec import from_stored, parse_spec
from compute.shared.state import StateStore, state_path
from tests.support.api_helpers import (TENANT, TIMELINE, client_for, fake_driver, launch_settings,
                                       make_state, minimal_spec, parse_prometheus, rt, short_runtime_dir)

__all__ = ["rt"]  # the fixtures

JSON = {"Content-Type": "application/json"}

RFC3339_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.fixture
def client(rt):
    make_state(rt)
    return client_for(rt)


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
                      "start_time": "2026-11-25T10:00:00.250Z",
                      "monitor_last_tick": None, "monitor_stall_restarts": 0, "state_writes_failing": False}
    StateStore(state_path(rt)).set(monitor_tick=1795600901.75, monitor_stall_restarts=2)
    body = client_for(rt).simulate_get("/status").json
    assert (body["monitor_last_tick"], body["monitor_stall_restarts"]) == ("2026-11-25T10:01:41.750Z", 2)


def test_status_unknowns_are_null(rt):
    make_state(rt, status="empty", start_time=None, last_active=None, tenant=None, timeline=None)
    assert client_for(rt).simulate_get("/status").json == {
        "tenant": None, "timeline": None, "status": "empty", "last_active": None, "error": None, "start_time": None,
        "monitor_last_tick": None, "monitor_stall_restarts": 0, "state_writes_failing": False}


def test_status_follows_the_state_file(rt):
    store = make_state(rt, status="init")
    c = client_for(rt)
    assert c.simulate_get("/status").json["status"] == "init"
    store.set(status="failed", error="sync safekeepers: exit 1")
    body = c.simulate_get("/status").json
    assert (body["status"], body["error"]) == ("failed", "sync safekeepers: exit 1")
    assert RFC3339_MS.match(body["start_time"])


def test_metrics_json(rt):
    make_state(rt, metrics={})
    c = client_for(rt)
    # HEAD's ComputeMetrics (libs/compute_api/src/responses.rs): all 13 keys, always
    head = ["wait_for_spec_ms", "sync_sk_check_ms", "sync_safekeepers_ms", "pageserver_connect_micros",
            "basebackup_ms", "basebackup_bytes", "start_postgres_ms", "config_ms", "total_startup_ms",
            "load_ext_ms", "num_ext_downloaded", "largest_ext_size", "total_ext_download_size"]
    zero = c.simulate_get("/metrics.json").json
    assert list(zero) == head and set(zero.values()) == {0}
    StateStore(state_path(rt)).record_metrics(sync_safekeepers_ms=12, basebackup_ms=340, config_ms=56,
                                              total_startup_ms=500, wait_for_spec_ms=7, basebackup_bytes=123456,
                                              basebackup_retries=2)
    body = c.simulate_get("/metrics.json").json
    assert body == {**zero, "sync_safekeepers_ms": 12, "basebackup_ms": 340, "config_ms": 56,
                    "total_startup_ms": 500, "wait_for_spec_ms": 7, "basebackup_bytes": 123456,
                    "basebackup_retries": 2}  # ours after HEAD's
    assert list(body)[:13] == head
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


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"spec"', b"{}", b'{"spec": null}',
                                  b'{"spec": [1]}', b'{"spec": "x"}', b"\xff\xfe"])
def test_configure_bad_request_is_400(client, body):
    r = client.simulate_post("/configure", body=body, headers=JSON)
    assert r.status_code == 400
    assert isinstance(r.json["error"], str)


def test_configure_is_allowed_whatever_the_launch_mode(rt):
    """HEAD: /configure outside pull mode too (a push-mode compute: no control plane)."""
    make_state(rt, launch=launch_settings(rt, compute_id=None, control_plane_uri=None))
    with fake_driver(rt):
        r = client_for(rt).simulate_post("/configure", json={"spec": minimal_spec()})
    assert r.status_code == 200, r.text
    assert StateStore(state_path(rt)).get_many(["status", "spec_generation"]) == {"status": "running",
                                                                                   "spec_generation": 1}


def test_configure_invalid_spec_is_400(client, rt):
    spec = minimal_spec()
    spec["format_version"] = 2.0
    r = client.simulate_post("/configure", json={"spec": spec})
    assert r.status_code == 400
    assert "format_version" in r.json["error"]
    assert StateStore(state_path(rt)).get_many(["status", "spec_generation"]) == {"status": "running",
                                                                                   "spec_generation": 0}


@pytest.mark.parametrize("status", ["init", "configuration_pending", "configuration", "failed"])
def test_configure_in_wrong_status_is_412(rt, status):
    make_state(rt, status=status)
    r = client_for(rt).simulate_post("/configure", json={"spec": minimal_spec()})
    assert r.status_code == 412
    assert r.json == {"error": f"invalid compute status: {status.replace('_', '-')}"}  # HEAD's wording
    assert StateStore(state_path(rt)).get("status") == status


JWKS_DOC = {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}


def test_configure_takes_heads_body_and_does_not_apply_its_jwks(rt):
    """`{spec, compute_ctl_config}` as HEAD sends it: checked, not applied (the JWKS is fixed for
    the life of the compute)."""
    store = make_state(rt)
    body = {"spec": minimal_spec(), "compute_ctl_config": {"jwks": JWKS_DOC, "tls": None}}
    with fake_driver(rt):
        r = client_for(rt).simulate_post("/configure", json=body)
    assert r.status_code == 200, r.text
    assert store.get("spec_generation") == 1
    assert client_for(rt).simulate_get("/status").status_code == 200  # still no JWKS: /status open
    assert client_for(rt).simulate_post("/check_writability", remote_addr="10.1.2.3").status_code == 403


@pytest.mark.parametrize("config", [
    [], "x", {}, {"jwks": None}, {"jwks": []}, {"jwks": {"keys": {}}}, {"jwks": {"keys": [1]}},
    {"jwks": {"keys": [{"crv": "Ed25519"}]}}, {"jwks": {"keys": []}, "tls": "yes"},
    {"jwks": {"keys": []}, "tls": {"key_path": "/k"}},
])
def test_configure_malformed_compute_ctl_config_is_400_and_changes_nothing(rt, config):
    store = make_state(rt)
    r = client_for(rt).simulate_post("/configure", json={"spec": minimal_spec(), "compute_ctl_config": config})
    assert r.status_code == 400, r.text
    assert "compute_ctl_config" in r.json["error"]
    assert store.get_many(["status", "spec_generation"]) == {"status": "running", "spec_generation": 0}


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
    assert set(r.json) == {"tenant", "timeline", "status", "last_active", "error", "start_time",
                           "monitor_last_tick", "monitor_stall_restarts", "state_writes_failing"}
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


def test_configure_timeout(rt):
    from compute.api.configure import Configure
    make_state(rt, status="running")
    ctx = ApiContext(rt)
    app = falcon.App()
    app.add_route("/configure", Configure(ctx, timeout=0.3))
    r = falcon.testing.TestClient(app).simulate_post("/configure", json={"spec": minimal_spec()})
    assert r.status_code == 500
    assert "timed out" in r.json["error"]


NOT_RUNNING = {"empty": "empty", "init": "init", "configuration_pending": "configuration-pending",
               "configuration": "configuration", "failed": "failed",
               "termination_pending_fast": "termination-pending-fast",
               "termination_pending_immediate": "termination-pending-immediate", "terminated": "terminated"}


@pytest.mark.parametrize("status", sorted(NOT_RUNNING))
@pytest.mark.parametrize("method,path", [("GET", "/insights"), ("POST", "/check_writability")])
def test_insights_and_check_writability_when_not_running_are_412(rt, status, method, path):
    """HEAD's answer (http/mod.rs invalid_status): 412 JSON, the status as its Display writes it."""
    make_state(rt, status=status)
    r = client_for(rt).simulate_request(method, path)
    assert r.status_code == 412
    assert r.headers["content-type"].startswith("application/json")
    assert r.json == {"error": f"invalid compute status: {NOT_RUNNING[status]}"}


def test_check_writability_postgres_down(rt):
    make_state(rt)  # connstr points at port 1
    r = client_for(rt).simulate_post("/check_writability")
    assert r.status_code == 500
    assert "connection" in r.text.lower()


def test_healthz_never_touches_postgres(rt, monkeypatch):
    make_state(rt, status="failed")
    monkeypatch.setattr(ApiContext, "pg_connect", lambda *a, **k: pytest.fail("healthz touched postgres"))
    r = client_for(rt).simulate_get("/healthz")
    assert (r.status_code, r.json) == (200, {"alive": True})


def test_readyz_postgres_down_and_cache(rt, monkeypatch):
    make_state(rt, status="running")  # nothing listens on port 1
    connects = []
    real = health.connect_within

    def counting(connstr, deadline):
        connects.append(deadline)
        return real(connstr, deadline)

    class Later:
        """`time` as compute.api.health sees it, `skew` seconds on: the cache expires, no sleep."""
        skew = 0.0

        def __getattr__(self, name):
            return getattr(time, name)

        def monotonic(self):
            return time.monotonic() + self.skew

    clock = Later()
    monkeypatch.setattr(health, "connect_within", counting)
    monkeypatch.setattr(health, "time", clock)
    c = client_for(rt)
    for _ in range(20):
        r = c.simulate_get("/readyz")
        assert r.status_code == 503
        assert "does not accept connections" in r.json["reason"]
    assert connects == [1]  # cached for about a second, connect deadline 1 s
    clock.skew = health.CACHE_SECONDS
    c.simulate_get("/readyz")
    assert len(connects) == 2


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


def test_prometheus_survives_a_wedged_supervisord():
    rt = short_runtime_dir()
    from compute.shared.supervisor_rpc import socket_path
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


