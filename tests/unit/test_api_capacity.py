"""The data routes' share of the API worker's pool (compute/api/capacity.py), a lost lock race
of a reconfiguration (compute/lifecycle/steps.py) and how /configure then answers
(compute/shared/driver_requests.py): pure, no process (issue 21, item 1)."""

from __future__ import annotations

import threading

import falcon
import falcon.testing

from compute.api.capacity import DataRouteShare, Permits, data_permits, pool_threads
from compute.api.errors import MAX_CONCURRENT_BODY_READS
from compute.lifecycle.steps import (LOCK_RACE_ATTEMPTS, after_failed_reconfiguration, catalog_failure_message,
                                     lost_lock_race)
from compute.shared.driver_requests import configure_outcome


def test_data_routes_never_take_the_whole_pool():
    for threads in (1, 2, 8, 16, 64):
        share = data_permits(threads)
        assert share >= 1
        if threads >= 16:  # the default: 8 for data, 4 for bodies, 4 always for probes and control
            assert threads - share - MAX_CONCURRENT_BODY_READS >= 4
    assert data_permits(16) == 8
    assert pool_threads({}) == 16 and pool_threads({"COMPUTE_API_THREADS": "32"}) == 32
    assert pool_threads({"COMPUTE_API_THREADS": "x"}) == 16


class Streamed:
    data_route = True

    def __init__(self):
        self.closed = 0

    def on_get(self, req, resp):
        me = self

        class Body:
            def __iter__(self):
                return iter([b"a", b"b"])

            def close(self):
                me.closed += 1
        resp.stream = Body()


class Plain:
    data_route = True

    def on_get(self, req, resp):
        resp.media = {"ok": True}


class Failing:
    data_route = True

    def on_get(self, req, resp):
        raise falcon.HTTPNotFound()


class Control:
    def on_get(self, req, resp):
        resp.media = {"control": True}


def app_with(permits: Permits):
    app = falcon.App(middleware=[DataRouteShare(permits)])
    streamed = Streamed()
    app.add_route("/stream", streamed)
    app.add_route("/plain", Plain())
    app.add_route("/fail", Failing())
    app.add_route("/control", Control())
    return app, streamed


def call(app, path):
    got = {}

    def start_response(status, headers, exc_info=None):
        got["status"], got["headers"] = status, dict(headers)
    body = app(falcon.testing.create_environ(path=path), start_response)
    return got["status"], got["headers"], body


def test_a_streamed_answer_holds_its_permit_until_closed():
    permits = Permits(1)
    app, streamed = app_with(permits)
    status, _, body = call(app, "/stream")
    assert status.startswith("200")
    status, headers, refused = call(app, "/plain")  # the one permit is held by the stream
    assert status.startswith("429") and headers["retry-after"] == "1"
    assert b"too many data requests" in b"".join(refused)
    status, _, _ = call(app, "/control")  # control routes take no permit
    assert status.startswith("200")
    assert b"".join(body) == b"ab"
    body.close()
    body.close()  # a second close gives nothing back twice (a BoundedSemaphore would raise)
    assert streamed.closed >= 1
    assert call(app, "/plain")[0].startswith("200")
    assert call(app, "/plain")[0].startswith("200")  # plain answers give their permit back at once


def test_a_failing_data_route_gives_its_permit_back():
    permits = Permits(1)
    app, _ = app_with(permits)
    for _ in range(3):
        assert call(app, "/fail")[0].startswith("404")
    assert call(app, "/plain")[0].startswith("200")


def test_permits_under_concurrency_never_exceed_the_limit():
    permits = Permits(3)
    taken, lock, peak = [0], threading.Lock(), [0]

    def worker():
        for _ in range(200):
            if permits.take():
                with lock:
                    taken[0] += 1
                    peak[0] = max(peak[0], taken[0])
                with lock:
                    taken[0] -= 1
                permits.give()
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 3 and taken[0] == 0


def test_a_lost_lock_race_is_retried_then_leaves_the_compute_running():
    assert lost_lock_race("55P03") and lost_lock_race("40P01")
    assert not lost_lock_race(None) and not lost_lock_race("42501") and not lost_lock_race("57014")
    assert LOCK_RACE_ATTEMPTS >= 2
    msg = catalog_failure_message("applying the spec failed ...: canceling statement due to lock timeout", True)
    assert msg.startswith(f"reconfiguration lost a lock race {LOCK_RACE_ATTEMPTS} times; the compute runs")
    assert msg.endswith(": applying the spec failed ...: canceling statement due to lock timeout")


def test_a_failed_catalog_apply_leaves_the_compute_running():
    """Issue 19 item 1: any failure of the catalog SQL of a reconfiguration (a lost lock race, a
    statement erroring half-way, the planner refusing) leaves `running` with the reason; only a
    failure before it (the settings could not be written or checked) is the final `failed`."""
    assert after_failed_reconfiguration(in_catalog=True) == "running"
    assert after_failed_reconfiguration(in_catalog=False) == "failed"
    msg = catalog_failure_message("applying the spec failed in database 'postgres' (databases): boom", False)
    assert msg.startswith("reconfiguration failed in the catalog SQL; the compute runs with the new settings")
    assert "send it again" in msg and msg.endswith(": applying the spec failed in database 'postgres' (databases): boom")


def test_configure_answer_after_a_lost_lock_race():
    failed = {"generation": 3, "error": "lost a lock race"}
    # Ours failed, the compute still runs: /configure answers the error (500), never 200.
    assert configure_outcome({"status": "running", "spec_generation": 3, "error": "x",
                              "configure_answer": failed}, 3) == (False, "lost a lock race")
    # An older failure does not spoil a later configure.
    assert configure_outcome({"status": "running", "spec_generation": 4, "error": None,
                              "configure_answer": failed}, 4) == (True, None)
    assert configure_outcome({"status": "configuration", "spec_generation": 4, "error": None,
                              "configure_answer": failed}, 4) is None
    assert configure_outcome({"status": "failed", "spec_generation": 4, "error": "boom",
                              "configure_answer": None}, 4) == (False, "boom")


def test_a_dump_spools_only_its_share_of_the_free_space():
    from compute.api.catalog import SPOOL_MAX_BYTES, SPOOL_RESERVE_BYTES, spool_limit
    mib = 1024 * 1024
    assert spool_limit(None, SPOOL_MAX_BYTES, 4) == SPOOL_MAX_BYTES
    assert spool_limit(10 * 1024 * mib, SPOOL_MAX_BYTES, 4) == SPOOL_MAX_BYTES
    # a small runtime dir (a 64 MiB tmpfs, 48 MiB free): 8 MiB per dump, the reserve kept
    assert spool_limit(48 * mib, SPOOL_MAX_BYTES, 4) == (48 * mib - SPOOL_RESERVE_BYTES) // 4
    assert 4 * spool_limit(48 * mib, SPOOL_MAX_BYTES, 4) + SPOOL_RESERVE_BYTES <= 48 * mib
    assert spool_limit(SPOOL_RESERVE_BYTES, SPOOL_MAX_BYTES, 4) == 0
    assert spool_limit(0, SPOOL_MAX_BYTES, 4) == 0
