"""Modes against real peers: the basebackup a replica asks a pageserver for, and /promote on a
real postgres that is not in recovery (the pure part: tests/unit/test_modes.py)."""

from __future__ import annotations

import json
import os

from compute.storage import basebackup
from tests.peers.pageserver import PageserverPeer
from tests.support.api_helpers import TENANT, TIMELINE, client_for, launch_settings, make_state, pg, request_driver
from tests.support.pgcluster import scratch_dir

__all__ = ['pg']  # the fixture

CONNINFO = "host=10.0.0.5 port=5432 user=replicator password=hunter2-secret application_name=r1"


def plain_spec(mode="Replica", **settings: str) -> dict:
    return {"format_version": 1.0, "mode": mode,
            "cluster": {"roles": [], "databases": [],
                        "settings": [{"name": k, "value": v, "vartype": "string"} for k, v in settings.items()]}}


def test_basebackup_asks_for_a_replica_as_neon_does(bb_tar):
    with PageserverPeer(bb_tar) as ps:
        for replica_flag, lsn, want in ((True, "0/0", f"basebackup {TENANT} {TIMELINE} --replica"),
                                        (True, "0/16B9188", f"basebackup {TENANT} {TIMELINE} 0/16B9188 --replica"),
                                        (False, "0/0", f"basebackup {TENANT} {TIMELINE}")):
            dest = scratch_dir("cs-bbm-data-")
            basebackup.basebackup(ps.connstr, TENANT, TIMELINE, lsn, dest, None, replica=replica_flag)
            assert ps.last.queries == [want]
            assert os.path.exists(os.path.join(dest, "PG_VERSION"))


def promote(c, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return c.simulate_post("/promote", body=data, headers={"Content-Type": "application/json", **(headers or {})})


PRIMARY_SPEC = plain_spec("Primary")


def test_promote_failure_leaves_the_replica_running(tmp_path, pg):
    """postgres here is a primary (not in recovery): pg_promote is never reached, the compute
    stays what it was, and the answer is Neon's failed state."""
    rt = str(tmp_path)
    store = make_state(rt, spec=plain_spec(primary_conninfo=CONNINFO), launch=launch_settings(rt, connstr=pg.url()))
    with request_driver(rt):  # the driver promotes (compute/shared/driver_requests.py)
        r = promote(client_for(rt), {"spec": PRIMARY_SPEC, "wal_flush_lsn": "0/1"})
    assert r.status_code == 500
    assert r.json == {"status": "failed", "error": "postgres is not in recovery: nothing to promote"}
    assert store.get("status") == "running" and store.get("spec")["mode"] == "Replica"
    assert store.get("spec_generation") == 0
