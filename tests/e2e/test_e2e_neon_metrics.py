"""End to end, Neon's /metrics families at HEAD (issue 18, item 7) on a booted tree: the
installed extensions the monitor collects, the postgres downtime it measures, compute_ctl_up;
the whole page promtool-clean (tests/support/promtool.py)."""

from __future__ import annotations

import re

import psycopg

from tests.support import promtool
from tests.support.tree import Compute
from tests.support.waiting import wait_for


def page(c: Compute) -> str:
    code, body = c.request("GET", "/metrics")
    assert code == 200
    return body.decode()


def sample(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def databases_with(c: Compute, extname: str) -> int:
    """Counted as Neon does: every database that accepts connections and is not invalid."""
    count = 0
    with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
        names = [n for (n,) in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND datconnlimit <> -2")]
    for name in names:
        with psycopg.connect(c.admin_conninfo(name)) as conn:
            count += conn.execute("SELECT count(*) FROM pg_extension WHERE extname = %s", (extname,)).fetchone()[0]
    return count


def test_installed_extensions_downtime_and_ctl_up():
    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        plpgsql = '{extension_name="plpgsql",version="1.0",owned_by_superuser="1"}'
        wait_for(lambda: sample(page(c), "compute_installed_extensions", plpgsql) is not None, 30,
                 "the monitor's first collection", 0.1)
        text = page(c)
        assert sample(text, "compute_installed_extensions", plpgsql) == databases_with(c, "plpgsql")
        assert re.search(r'^compute_ctl_up\{build_tag="[^"]+",status="running"\} 1$', text, re.M)
        assert sample(text, "compute_pg_current_downtime_ms") == 0
        assert sample(text, "compute_pg_downtime_ms_total") == 0
        promtool.check_clean(text)

        # postgres refusing the monitor: its checks fail, and that is downtime (Neon's rule)
        with psycopg.connect(c.admin_conninfo("appdb"), autocommit=True) as conn:
            conn.execute("ALTER DATABASE postgres WITH ALLOW_CONNECTIONS false")
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = 'compute_ctl:activity_monitor'")
            wait_for(lambda: (sample(page(c), "compute_pg_current_downtime_ms") or 0) > 0, 30,
                     "the monitor to count downtime", 0.1)
            conn.execute("ALTER DATABASE postgres WITH ALLOW_CONNECTIONS true")
        wait_for(lambda: sample(page(c), "compute_pg_current_downtime_ms") == 0, 30, "the monitor to be back", 0.1)
        text = page(c)
        assert sample(text, "compute_pg_downtime_ms_total") > 0
        assert c.status()["status"] == "running"
        promtool.check_clean(text)


def test_installed_extensions_are_counted_again_after_a_new_spec():
    """The monitor collects again after each reconfiguration (Neon: only hourly): an extension
    created since shows up (not before: the collection is not per scrape)."""
    from tests.peers.control_plane import ControlPlanePeer
    with ControlPlanePeer(None) as cp:
        c = Compute()
        c.args = ["-i", "compute-1", "-p", cp.url, "--control-plane-api", "2023"]
        c.env = {"NEON_CONSOLE_JWT": "console-jwt"}
        cp.spec = c.new_spec()
        with c:
            c.wait_status("running")
            wait_for(lambda: "compute_installed_extensions{" in page(c), 30, "the first collection", 0.1)
            with psycopg.connect(c.admin_conninfo("appdb"), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION hstore")  # by the bootstrap superuser: owner oid 10
            assert 'extension_name="hstore"' not in page(c)  # collected at start, not per scrape
            code, body = c.request("POST", "/configure", {"spec": c.new_spec()}, timeout=60)
            assert code == 200, body
            hstore = re.compile(r'^compute_installed_extensions\{extension_name="hstore",version="[^"]+",'
                                r'owned_by_superuser="1"\} 1$', re.M)
            wait_for(lambda: hstore.search(page(c)), 30, "hstore to be counted after the new spec", 0.1)
            promtool.check_clean(page(c))
