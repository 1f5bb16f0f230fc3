"""The HTTP API: route shapes (falcon TestClient on a real state file), postgres-backed routes
against a real PG15, auth, supervisord interplay, and the real gunicorn command.

This file: against real postgres, supervisord and gunicorn; the app alone in-process:
tests/unit/test_api.py."""

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
import psycopg
import pytest

from compute.api.context import ApiContext
from compute.api.errors import MAX_BODY_BYTES
from compute.shared.supervisor_rpc import rpc
from compute.api.writability import WRITABILITY_QUERY
from compute.shared.state import StateStore, state_path
from tests.support.api_helpers import (call, client_for, fake_driver, gunicorn, gunicorn_state, launch_settings,
                                       make_state, minimal_spec, parse_prometheus, pg, request_driver, rt,
                                       short_runtime_dir, supervisord)
from tests.support.waiting import wait_for

__all__ = ["pg", "rt"]  # the fixtures

JSON = {"Content-Type": "application/json"}


def test_configure_wakes_the_driver_through_supervisord():
    rt = short_runtime_dir()
    try:
        make_state(rt, status="running")
        with supervisord(rt) as usr1_log, fake_driver(rt, hold=0.1):
            r = client_for(rt).simulate_post("/configure", json={"spec": minimal_spec()})
            assert r.status_code == 200
            wait_for(lambda: os.path.exists(usr1_log) and open(usr1_log).read(), 5,
                     "supervisord's SIGUSR1 to the driver")
            assert open(usr1_log).read() == "usr1\n"
    finally:
        shutil.rmtree(rt, ignore_errors=True)


def pg_state(rt, cluster, **fields):
    return make_state(rt, launch=launch_settings(rt, connstr=cluster.url()), **fields)


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
            assert store.get("status") == "terminated"
            again = client_for(rt).simulate_post("/terminate")  # already down: the recorded answer
            assert (again.status_code, again.json) == (201, {"terminated": True, "lsn": None})
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
            assert store.get("shutdown_requested") is True and store.get("terminate_waiters") == {}
            assert store.get("status") == "terminated"
    finally:
        shutil.rmtree(rt, ignore_errors=True)


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

        hold = 2.0
        with fake_driver(rt, hold=hold):
            t = threading.Thread(target=configure)
            t.start()
            wait_for(lambda: StateStore(state_path(rt)).get("status") != "running", 5, "the configuration to begin")
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
        assert max(latencies) < hold, max(latencies)  # none waited for the configuration


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
    assert len(latencies) > 10 and max(latencies) < 3.0, max(latencies)  # none waited for a trickler


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
