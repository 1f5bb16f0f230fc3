"""The lifecycle driver's LSN lease thread (compute/lifecycle/lease_keeper.py), one turn at a
time with a fake clock, against the pageserver peer: the record it leaves in the state file is
what a successor driver goes on from, and what /metrics shows."""

from __future__ import annotations

import pytest

from compute.lifecycle.lease_keeper import STATE_KEY, LeaseKeeper, wants_lease
from compute.model.spec import load_stored
from tests.peers.pageserver import PageserverPeer
from tests.support.api_helpers import make_state

TENANT, TIMELINE, LSN = "a" * 32, "b" * 32, "0/16B9188"


def static_spec(connstrs: list[str], **top):
    info = {"shard_count": len(connstrs) if len(connstrs) > 1 else 0, "stripe_size": 8 if len(connstrs) > 1 else None,
            "shards": {(f"{n:02x}{len(connstrs):02x}" if len(connstrs) > 1 else "0000"):
                       {"pageservers": [{"id": n, "libpq_url": url, "grpc_url": None}]} for n, url in enumerate(connstrs)}}
    return {"format_version": 1.0, "cluster": {"roles": [], "databases": [], "settings": []},
            "tenant_id": TENANT, "timeline_id": TIMELINE, "mode": {"Static": LSN},
            "pageserver_connection_info": info, **top}


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def tar(tmp_path):
    path = tmp_path / "empty.tar"
    path.write_bytes(b"\0" * 1024)
    return str(path)


def keeper(tmp_path, spec):
    store = make_state(str(tmp_path / "rt"), spec=spec)
    clock = Clock()
    k = LeaseKeeper(store, timeout=5, token=lambda s: s.storage_auth_token, clock=clock)
    return store, clock, k


def test_only_static_computes_lease(tmp_path):
    store = make_state(str(tmp_path / "rt"), spec=static_spec(["postgres://u@h:1"]))
    assert wants_lease(load_stored(store))
    store.set(spec={**store.get("spec"), "mode": "Primary"})
    assert not wants_lease(load_stored(store)) and not wants_lease(None)


def test_every_shard_leased_then_renewed_when_due(tmp_path, tar):
    with PageserverPeer(tar, shards=["0002"], lease_seconds=600, password="tok") as ps0, \
            PageserverPeer(tar, shards=["0102"], lease_seconds=300, password="tok") as ps1:
        store, clock, k = keeper(tmp_path, static_spec([ps0.connstr, ps1.connstr], storage_auth_token="tok"))
        assert k.step()
        rec = store.get(STATE_KEY)
        assert rec["state"] == "held" and rec["granted"] == 1
        assert [x.tenant_shard_id for x in ps0.leases + ps1.leases] == [f"{TENANT}-0002", f"{TENANT}-0102"]
        assert rec["valid_until"] == ps1.leases[0].valid_until_ms / 1000  # the earliest
        k.wake.set()  # not due yet: a turn only waits
        assert k.step() and len(ps0.leases) == 1
        clock.now = rec["next_at"]
        assert k.step() and len(ps0.leases) == 2 and store.get(STATE_KEY)["granted"] == 2


def test_failures_are_retried_with_heads_backoff_and_a_successor_goes_on(tmp_path, tar):
    with PageserverPeer(tar, faults=["close", "fatal", "error"]) as ps:
        store, clock, k = keeper(tmp_path, static_spec([ps.connstr]))
        delays = []
        for _ in range(3):
            assert k.step()
            rec = store.get(STATE_KEY)
            assert rec["state"] == "retrying" and "\n" not in rec["error"]
            delays.append(round(rec["next_at"] - clock.now, 4))
            clock.now = rec["next_at"]
        assert delays == [0.5, 0.75, 1.125]
        successor = LeaseKeeper(store, timeout=5, token=lambda s: None, clock=clock)
        assert successor.step()
        rec = store.get(STATE_KEY)
        assert rec["state"] == "held" and rec["errors"] == 3 and rec["granted"] == 1 and ps.leases


def test_a_refusal_ends_the_lease(tmp_path, tar):
    with PageserverPeer(tar, gc_cutoff="1/0") as ps:
        store, clock, k = keeper(tmp_path, static_spec([ps.connstr]))
        assert k.step()
        assert store.get(STATE_KEY)["state"] == "refused"
        assert k.step() is False


def test_a_shard_the_pageserver_does_not_know_is_retried_not_crashed_on(tmp_path, tar):
    with PageserverPeer(tar, shards=["0002"]) as ps:  # the spec says unsharded: it asks for `<tenant>`
        store, clock, k = keeper(tmp_path, static_spec([ps.connstr]))
        assert k.step()
        rec = store.get(STATE_KEY)
        assert rec["state"] == "retrying" and "not found" in rec["error"] and ps.leases == []


def test_new_pageservers_are_leased_at_once(tmp_path, tar):
    with PageserverPeer(tar) as ps, PageserverPeer(tar) as other:
        store, clock, k = keeper(tmp_path, static_spec([ps.connstr]))
        assert k.step() and store.get(STATE_KEY)["state"] == "held"
        from tests.support.api_helpers import stored
        store.set(spec=stored(static_spec([other.connstr])))
        assert k.step()
        assert store.get(STATE_KEY)["state"] == "held" and len(other.leases) == 1


def test_metrics_show_the_lease(tmp_path, tar):
    from compute.api.prometheus import PrometheusMetrics
    with PageserverPeer(tar) as ps:
        store, clock, k = keeper(tmp_path, static_spec([ps.connstr]))
        assert k.step()

        class Ctx:
            runtime_dir = str(tmp_path / "nowhere")

            settings = type("Launch", (), {"monitor_interval": 0.5})()

            def runtime_free_bytes(self):
                return None
        Ctx.store = store
        page = PrometheusMetrics(Ctx(), rpc_timeout=0.1).render()
    assert 'compute_lsn_lease_state{state="held"} 1' in page
    assert 'compute_lsn_lease_state{state="retrying"} 0' in page
    assert 'compute_lsn_lease_requests_total{result="granted"} 1' in page
    assert "compute_lsn_lease_valid_until_seconds " in page and "compute_lsn_lease_pageservers 1" in page
