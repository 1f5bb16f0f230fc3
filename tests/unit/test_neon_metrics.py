"""Neon's /metrics families at HEAD (compute_tools/src/metrics.rs): compute_ctl_up, the
postgres downtime the monitor measures, the installed extensions it collects. Pure parts and
the page as the API renders it from a state file (no process; promtool: the integration tier)."""

from __future__ import annotations

import json

from falcon.testing import TestClient

from compute import __version__
from compute.api.app import create_app
from compute.postgres.libpq import SessionError
from compute.programs import extensions
from compute.programs.monitor import ActivityMonitor
from tests.support.api_helpers import make_state, parse_prometheus


def page_of(rt: str) -> str:
    return TestClient(create_app(rt)).simulate_get("/metrics").text


# -- compute_ctl_up ------------------------------------------------------------------------

def test_compute_ctl_up_is_one_sample_with_the_hyphenated_status(tmp_path):
    rt = str(tmp_path)
    for status, shown in [("running", "running"), ("configuration_pending", "configuration-pending"),
                          ("termination_pending_immediate", "termination-pending-immediate")]:
        make_state(rt, status=status)
        ups = [line for line in page_of(rt).splitlines() if line.startswith("compute_ctl_up")]
        assert ups == [f'compute_ctl_up{{build_tag="{__version__}",status="{shown}"}} 1']


# -- downtime ------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_downtime_follows_neons_rule(tmp_path, monkeypatch):
    """While checks fail: current = since the last good check, total += since the previous
    check; a good check: current 0. Not counted outside the watched statuses (a /terminate)."""
    store = make_state(str(tmp_path), status="running")
    clock = Clock()
    mon = ActivityMonitor(store, "host=127.0.0.1 port=1 user=cloud_admin", clock=clock)
    up = {"ok": True}

    class Session:
        def query_row(self, *_):
            if not up["ok"]:
                raise SessionError("connection lost")
            return (b"f", None)

        def close(self):
            pass

    def connect(*_a, **_k):
        if not up["ok"]:
            raise SessionError("connection refused")
        return Session()
    monkeypatch.setattr(mon, "_connect", connect)
    monkeypatch.setattr(mon, "collect_extensions", lambda: None)

    def tick(advance: float) -> dict:
        clock.now += advance
        mon.tick()
        return store.get("pg_downtime")

    assert tick(0) is None  # healthy: nothing written
    up["ok"] = False
    assert tick(0.5) == {"current_ms": 500.0, "total_ms": 500.0}   # the query fails
    assert tick(0.5) == {"current_ms": 1000.0, "total_ms": 1000.0}  # the reconnect fails
    up["ok"] = True
    assert tick(0.5) == {"current_ms": 0.0, "total_ms": 1000.0}
    assert tick(0.5) == {"current_ms": 0.0, "total_ms": 1000.0}
    store.set(status="termination_pending_fast")
    up["ok"] = False
    assert tick(5) == {"current_ms": 0.0, "total_ms": 1000.0}  # stopped on purpose: not downtime
    samples = parse_prometheus(page_of(str(tmp_path)))
    assert samples["compute_pg_current_downtime_ms"] == 0 and samples["compute_pg_downtime_ms_total"] == 1000
    # a restarted monitor continues the total
    store = make_state(str(tmp_path), status="running", pg_downtime=store.get("pg_downtime"))
    again = ActivityMonitor(store, "host=127.0.0.1 port=1", clock=clock)
    monkeypatch.setattr(again, "_connect", connect)
    clock.now += 1
    again.tick()
    assert store.get("pg_downtime")["total_ms"] == 1000.0


def test_downtime_families_are_always_there(tmp_path):
    make_state(str(tmp_path))
    samples = parse_prometheus(page_of(str(tmp_path)))
    assert samples["compute_pg_current_downtime_ms"] == 0 and samples["compute_pg_downtime_ms_total"] == 0


# -- installed extensions --------------------------------------------------------------------

def test_aggregate_counts_databases_per_name_version_and_owner():
    found = extensions.aggregate([
        [["plpgsql", "1.0", 10], ["neon", "1.6", 10]],
        [["plpgsql", "1.0", 10], ["neon", "1.5", 10], ["hstore", "1.8", 16384]],
        [["plpgsql", "1.0", 10], "junk", ["short"]],
    ])
    assert found == [
        {"extname": "hstore", "version": "1.8", "owned_by_superuser": "0", "n_databases": 1},
        {"extname": "neon", "version": "1.5", "owned_by_superuser": "1", "n_databases": 1},
        {"extname": "neon", "version": "1.6", "owned_by_superuser": "1", "n_databases": 1},
        {"extname": "plpgsql", "version": "1.0", "owned_by_superuser": "1", "n_databases": 3},
    ]


def test_collect_asks_every_database_and_reports_progress():
    asked, ticks = [], []

    def query_in(db, query):
        asked.append(db)
        if query == extensions.DATABASES_QUERY:
            return json.dumps(["postgres", "app"]).encode()
        return json.dumps([["plpgsql", "1.0", 10]]).encode()
    found = extensions.collect(query_in, lambda: ticks.append(1))
    assert asked == [None, "postgres", "app"] and len(ticks) == 2
    assert found == [{"extname": "plpgsql", "version": "1.0", "owned_by_superuser": "1", "n_databases": 2}]
    assert extensions.parse_rows(b"not json") == [] and extensions.parse_rows(b'{"a": 1}') == []


def test_collection_is_due_at_start_after_a_new_spec_and_hourly():
    assert extensions.due(None, 0, 100.0)
    last = {"collected_at": 100.0, "generation": 1, "extensions": []}
    assert not extensions.due(last, 1, 100.0 + extensions.COLLECT_INTERVAL - 1)
    assert extensions.due(last, 2, 101.0)
    assert extensions.due(last, 1, 100.0 + extensions.COLLECT_INTERVAL)


def test_installed_extensions_on_the_page_with_hostile_names(tmp_path):
    """Extension names and versions come from the database: label values are escaped, never
    able to end the sample or forge another one."""
    make_state(str(tmp_path), installed_extensions={"collected_at": 1.0, "generation": 0, "extensions": [
        {"extname": "plpgsql", "version": "1.0", "owned_by_superuser": "1", "n_databases": 3},
        {"extname": 'x"} 1\ncompute_ctl_up{status="pwned', "version": "1\\0", "owned_by_superuser": "0",
         "n_databases": 1},
    ]})
    page = page_of(str(tmp_path))
    lines = [line for line in page.splitlines() if line.startswith("compute_installed_extensions")]
    assert lines == [
        'compute_installed_extensions{extension_name="plpgsql",version="1.0",owned_by_superuser="1"} 3',
        'compute_installed_extensions{extension_name="x\\"} 1\\ncompute_ctl_up{status=\\"pwned",'
        'version="1\\\\0",owned_by_superuser="0"} 1',
    ]
    assert sum(line.startswith("compute_ctl_up") for line in page.splitlines()) == 1


def test_no_installed_extensions_family_before_the_first_collection(tmp_path):
    make_state(str(tmp_path))
    assert "compute_installed_extensions" not in page_of(str(tmp_path))
