"""When writes of the state file fail (a full runtime dir), /status and /metrics say so, and an
active compute is never shown idle (issue 19, item 3). Pure, plus the falcon app in-process."""

from __future__ import annotations

import time

import falcon.testing

from compute.api.app import create_app
from compute.api.bodies import (STATE_WRITE_RESERVE_BYTES, activity_unknown_after, parse_rfc3339,
                                state_health, status_body)
from compute.api.context import ApiContext
from tests.support.api_helpers import make_state

NOW = 1_800_000_000.0


def test_full_runtime_dir_means_state_writes_fail():
    values = {"status": "running", "monitor_tick": NOW - 1}
    assert state_health(values, now=NOW, free_bytes=0, monitor_interval=0.5) == (True, False)
    assert state_health(values, now=NOW, free_bytes=STATE_WRITE_RESERVE_BYTES - 1, monitor_interval=0.5)[0]
    assert state_health(values, now=NOW, free_bytes=10 * STATE_WRITE_RESERVE_BYTES, monitor_interval=0.5) == \
        (False, False)
    assert state_health(values, now=NOW, free_bytes=None, monitor_interval=0.5) == (False, False)


def test_activity_unknown_only_while_monitored_and_past_the_tree_s_restart():
    stale = NOW - activity_unknown_after(0.5) - 1
    assert activity_unknown_after(0.5) > 2 * 10  # a merely stopped monitor is replaced before
    for status in ("running", "configuration_pending", "configuration"):
        assert state_health({"status": status, "monitor_tick": stale}, now=NOW, free_bytes=None,
                            monitor_interval=0.5)[1]
    for status in ("init", "empty", "failed"):
        assert not state_health({"status": status, "monitor_tick": stale}, now=NOW, free_bytes=None,
                                monitor_interval=0.5)[1]
    assert not state_health({"status": "running", "monitor_tick": None}, now=NOW, free_bytes=None,
                            monitor_interval=0.5)[1]
    assert not state_health({"status": "running", "monitor_tick": NOW - 5}, now=NOW, free_bytes=None,
                            monitor_interval=0.5)[1]


def test_an_active_compute_is_never_shown_idle():
    values = {"status": "running", "last_active": NOW - 3600, "monitor_tick": NOW - 3600, "error": None}
    body = status_body(values, health=(False, True), now=NOW)
    assert parse_rfc3339(body["last_active"]) == NOW  # not an hour idle: unknown counts as active
    assert "not being recorded" in body["error"]
    body = status_body(values, health=(True, False), now=NOW)
    assert body["state_writes_failing"] is True and "runtime dir is full" in body["error"]
    assert parse_rfc3339(body["last_active"]) == NOW - 3600
    # an error already there (a failed start, a lost lock race) is kept
    body = status_body({**values, "error": "boom"}, health=(True, True), now=NOW)
    assert body["error"] == "boom" and body["state_writes_failing"] is True
    assert status_body(values)["state_writes_failing"] is False  # the early responder's: no checks


def test_status_and_metrics_say_so(tmp_path, monkeypatch):
    rt = str(tmp_path)
    make_state(rt, status="running", last_active=time.time() - 3600, monitor_tick=time.time() - 3600)
    monkeypatch.setattr(ApiContext, "runtime_free_bytes", lambda self: 0)
    c = falcon.testing.TestClient(create_app(rt))
    body = c.simulate_get("/status").json
    assert body["state_writes_failing"] is True and body["error"]
    assert parse_rfc3339(body["last_active"]) > time.time() - 60
    page = c.simulate_get("/metrics").text
    assert "compute_state_writes_failing 1" in page
    assert "compute_activity_unknown 1" in page
    assert "compute_runtime_dir_free_bytes 0" in page
