"""End to end, HEAD-shaped specs (issue 18, items 2, 3 and 9's lease part) through the real tree:

- the top-level storage fields reach postgres as HEAD's write_postgres_conf writes them, and
  plain Debian PostgreSQL 15 (no `neon` library) starts with the `neon.*` lines and shows them
  back (custom placeholders): hostile quotes and backslashes come back intact;
- a sharded tenant's basebackup comes from shard 0's first pageserver, asked with the plain
  tenant id as HEAD asks (the peers refuse a shard-qualified one and answer from shard zero);
- a Static compute holds an LSN lease on every shard's pageserver, visible in /metrics
  (promtool clean); a shard its pageserver does not know is retried, never crashed on;
- hostile values in the new fields: exit 1 before anything is touched.
"""

from __future__ import annotations

import os
import re

import psycopg
import pytest

from tests.peers.pageserver import PageserverPeer
from tests.peers.sync_safekeepers import write_fake_postgres
from tests.support.promtool import check_clean
from tests.support.tree import Compute
from tests.support.waiting import wait_for

TENANT, TIMELINE = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9"
TOKEN = "storage-sharded-token-51c2"
STATIC_LSN = "0/FF000000"  # beyond the tar's WAL: postgres waits there, read-only
SYNC_LSN = "0/16B9188"  # the fake sync-safekeepers' answer
PROJECT = "it's a \\ project"  # a quote and a backslash: written doubled, read back intact
ENDPOINT = "ep-'\\'-#1"
def conninfo(peers: list[PageserverPeer], stripe: int = 32768) -> dict:
    count = len(peers) if len(peers) > 1 else 0
    return {"shard_count": count, "stripe_size": stripe if count else None, "prefer_protocol": "libpq",
            "shards": {f"{n:02x}{count:02x}": {"pageservers": [{"id": n + 1, "libpq_url": ps.connstr,
                                                                 "grpc_url": f"grpc://no_user@127.0.0.1:{ps.port + 1}"}]}
                       for n, ps in enumerate(peers)}}


def head_spec(c: Compute, peers: list[PageserverPeer], mode="Primary", **top) -> dict:
    spec = c.new_spec()
    spec["cluster"]["postgresql_conf"] = "# from neon_local\nwork_mem = '5MB'\nlog_min_messages = info"
    spec.update({"tenant_id": TENANT, "timeline_id": TIMELINE, "pageserver_connection_info": conninfo(peers),
                 "storage_auth_token": TOKEN, "project_id": PROJECT, "branch_id": "br-main", "endpoint_id": ENDPOINT,
                 "suspend_timeout_seconds": -1, "mode": mode, **top})
    return spec


def neon_compute(**env) -> Compute:
    c = Compute()
    c.pgbin = write_fake_postgres(c.base)  # records any --sync-safekeepers; else runs postgres
    c.env = {"FAKE_SK_RECORD": os.path.join(c.base, "sync.json"), **env}
    return c


def show(c: Compute, name: str) -> str:
    with psycopg.connect(c.admin_conninfo(), autocommit=True) as conn:
        return conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]


def test_a_sharded_primary_from_shard_zero_with_heads_storage_lines(bb_tar):
    with PageserverPeer(bb_tar, password=TOKEN, tenant_id=TENANT, timeline_id=TIMELINE, shards=["0002"]) as ps0, \
            PageserverPeer(bb_tar, password=TOKEN, tenant_id=TENANT, timeline_id=TIMELINE, shards=["0102"]) as ps1:
        c = neon_compute()
        c.spec = head_spec(c, [ps0, ps1], safekeeper_connstrings=["127.0.0.1:5454", "127.0.0.1:5455"],
                           safekeepers_generation=3)
        with c:
            c.wait_status("running", timeout=90)
            # HEAD's libpq basebackup: shard 0's first pageserver, the plain tenant id
            assert ps0.last.queries == [f"basebackup {TENANT} {TIMELINE} {SYNC_LSN}"]
            assert ps0.last.password == TOKEN
            assert ps1.startups == [] and ps0.leases == [] and ps1.leases == []  # a Primary leases nothing
            with open(os.path.join(c.pgdata, "postgresql.conf")) as f:
                conf = f.read()
            urls = f"{ps0.connstr},{ps1.connstr}"
            assert conf.startswith("# from neon_local\nwork_mem = '5MB'\nlog_min_messages = info\n"
                                   "# Neon storage settings\n\n"
                                   "# from compute spec's pageserver_connection_info.stripe_size field\n"
                                   "neon.stripe_size=32768\n"
                                   "# derived from compute spec's pageserver_connection_info field\n"
                                   f"neon.pageserver_connstring='{urls}'\n"
                                   "neon.safekeepers='g#3:127.0.0.1:5454,127.0.0.1:5455'\n"
                                   f"neon.tenant_id='{TENANT}'\nneon.timeline_id='{TIMELINE}'\n"
                                   "neon.project_id='it''s a \\\\ project'\nneon.branch_id='br-main'\n"
                                   "neon.endpoint_id='ep-''\\\\''-#1'\n# Managed by compute_ctl: begin\n"), conf
            assert conf.endswith("# Managed by compute_ctl: end\nneon.disable_logical_replication_subscribers=false\n")
            # postgres 15 without the neon library reads every line: custom placeholders
            assert show(c, "neon.project_id") == PROJECT and show(c, "neon.endpoint_id") == ENDPOINT
            assert show(c, "neon.pageserver_connstring") == urls and show(c, "neon.stripe_size") == "32768"
            assert show(c, "neon.safekeepers") == "g#3:127.0.0.1:5454,127.0.0.1:5455"
            assert show(c, "neon.disable_logical_replication_subscribers") == "false"
            assert show(c, "work_mem") == "5MB"  # postgresql_conf, then our block on top
            assert show(c, "port") == str(c.pg_port)
            assert TOKEN not in c.output()


def test_a_reconfiguration_rewrites_heads_lines_and_postgres_reads_them(bb_tar):
    """/configure (pull mode, ours) with new ids, a new safekeeper generation and a new
    postgresql_conf: the file is rewritten whole and reloaded; the new values are postgres'."""
    import json
    from tests.peers.control_plane import ControlPlanePeer
    with PageserverPeer(bb_tar, password=TOKEN, tenant_id=TENANT, timeline_id=TIMELINE) as ps, \
            ControlPlanePeer(None) as cp:
        c = neon_compute()
        c.args = ["-i", "compute-1", "-p", cp.url, "--control-plane-api", "2023"]  # /configure: ours, no JWKS
        cp.spec = head_spec(c, [ps], safekeeper_connstrings=["127.0.0.1:5454"], safekeepers_generation=1)
        with c:
            c.wait_status("running", timeout=90)
            assert show(c, "neon.safekeepers") == "g#1:127.0.0.1:5454" and show(c, "work_mem") == "5MB"
            spec2 = head_spec(c, [ps], safekeeper_connstrings=["127.0.0.1:5454", "127.0.0.1:5456"],
                              safekeepers_generation=2, project_id="new 'project' \\ 2")
            spec2["cluster"]["postgresql_conf"] = "work_mem = '7MB'"
            code, body = c.request("POST", "/configure", {"spec": spec2}, {"Content-Type": "application/json"}, 60)
            assert code == 200, body
            assert json.loads(body)["status"] == "running"
            assert show(c, "neon.safekeepers") == "g#2:127.0.0.1:5454,127.0.0.1:5456"
            assert show(c, "neon.project_id") == "new 'project' \\ 2"
            assert show(c, "work_mem") == "7MB"
            with open(os.path.join(c.pgdata, "postgresql.conf")) as f:
                assert f.read().startswith("work_mem = '7MB'\n# Neon storage settings\n\n")
            # an invalid one (a duplicate safekeeper) is refused, nothing changes
            spec3 = head_spec(c, [ps], safekeeper_connstrings=["127.0.0.1:5454", "127.0.0.1:5454"])
            code, body = c.request("POST", "/configure", {"spec": spec3}, {"Content-Type": "application/json"}, 60)
            assert code in (400, 412) and b"duplicate entry in safekeeper_connstrings: 127.0.0.1:5454!" in body
            assert show(c, "neon.safekeepers") == "g#2:127.0.0.1:5454,127.0.0.1:5456"


def test_a_static_compute_leases_every_shard_and_shows_it(bb_tar):
    with PageserverPeer(bb_tar, password=TOKEN, tenant_id=TENANT, timeline_id=TIMELINE, shards=["0002"],
                        lease_seconds=3600) as ps0, \
            PageserverPeer(bb_tar, password=TOKEN, tenant_id=TENANT, timeline_id=TIMELINE, shards=["0102"],
                           lease_seconds=1800) as ps1:
        c = neon_compute()
        c.spec = head_spec(c, [ps0, ps1], mode={"Static": STATIC_LSN})
        with c:
            c.wait_status("running", timeout=90)
            basebackups = [s.queries for s in ps0.startups + ps1.startups
                           if any(q.startswith("basebackup") for q in s.queries)]
            assert basebackups == [[f"basebackup {TENANT} {TIMELINE} {STATIC_LSN} --replica"]]
            assert any(q.startswith("basebackup") for s in ps0.startups for q in s.queries)  # shard 0's
            wait_for(lambda: ps0.leases and ps1.leases, 30, "a lease on both shards")
            assert [(x.tenant_shard_id, x.timeline_id, x.lsn) for x in ps0.leases + ps1.leases] == [
                (f"{TENANT}-0002", TIMELINE, STATIC_LSN), (f"{TENANT}-0102", TIMELINE, STATIC_LSN)]
            lease_sessions = [s for s in ps0.startups + ps1.startups if any(q.startswith("lease") for q in s.queries)]
            assert {s.password for s in lease_sessions} == {TOKEN}
            assert lease_sessions[0].queries == [f"lease lsn {TENANT}-0002 {TIMELINE} {STATIC_LSN} "]
            page = wait_for(lambda: 'compute_lsn_lease_state{state="held"} 1' in (p := metrics_page(c)) and p, 30,
                            "the lease held in /metrics", period=0.1)
            valid_until = float(re.search(r"^compute_lsn_lease_valid_until_seconds (\S+)$", page, re.M).group(1))
            assert valid_until == ps1.leases[0].valid_until_ms / 1000  # the earliest of the two
            assert 'compute_lsn_lease_requests_total{result="granted"} 1' in page
            assert "compute_lsn_lease_pageservers 2" in page
            check_clean(page)
            # the driver hands over after the start-up: its successor keeps the lease (not idle),
            # and asks nothing before the renewal is due (an hour's lease: in 59 minutes)
            c.wait_handed_over()
            assert len(ps0.leases) == 1 and len(ps1.leases) == 1
            assert TOKEN not in c.output()


def test_the_lease_is_renewed_by_every_driver_of_the_compute(bb_tar):
    """A 2 s lease is renewed every second (max(2 - 60, 2 / 2)): across the driver's hand-over
    after the start-up, and after the driver is killed (its successor goes on from the record;
    docs/architecture.md, "LSN leases")."""
    import signal
    with PageserverPeer(bb_tar, tenant_id=TENANT, timeline_id=TIMELINE, lease_seconds=2) as ps:
        c = neon_compute()
        c.spec = head_spec(c, [ps], mode={"Static": STATIC_LSN})
        del c.spec["storage_auth_token"]
        with c:
            c.wait_status("running", timeout=90)
            pid = c.wait_handed_over()
            seen = len(ps.leases)
            wait_for(lambda: len(ps.leases) >= seen + 2, 30, "renewals by the driver after the hand-over", period=0.1)
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: (p := c.supervisorctl("pid", "lifecycle").stdout.strip()).isdigit()
                     and int(p) not in (0, pid), 30, "a new driver", period=0.1)
            seen = len(ps.leases)
            wait_for(lambda: len(ps.leases) >= seen + 2, 30, "renewals by the restarted driver", period=0.1)
            assert {x.tenant_shard_id for x in ps.leases} == {TENANT}
            assert {x.lsn for x in ps.leases} == {STATIC_LSN}
            page = metrics_page(c)
            assert 'compute_lsn_lease_state{state="held"} 1' in page
            assert c.status()["status"] == "running"


def test_a_shard_its_pageserver_does_not_know_is_retried_and_shown(bb_tar):
    """The spec names shard 0102 on a pageserver that hosts 0103 only (another tenant layout):
    the lease attempt fails there, is retried with HEAD's backoff, and /metrics says so; the
    compute itself runs (HEAD's lease task only logs)."""
    with PageserverPeer(bb_tar, tenant_id=TENANT, timeline_id=TIMELINE, shards=["0002"]) as ps0, \
            PageserverPeer(bb_tar, tenant_id=TENANT, timeline_id=TIMELINE, shards=["0103"]) as ps1:
        c = neon_compute()
        c.spec = head_spec(c, [ps0, ps1], mode={"Static": STATIC_LSN})
        del c.spec["storage_auth_token"]
        with c:
            c.wait_status("running", timeout=90)
            page = wait_for(lambda: re.search(r'compute_lsn_lease_requests_total\{result="error"\} [3-9]',
                                              p := metrics_page(c)) and p, 60, "three failed lease attempts", period=0.1)
            assert 'compute_lsn_lease_state{state="retrying"} 1' in page
            assert ps1.leases == [] and ps0.leases  # shard 0 granted each time, shard 1 never
            wait_for(lambda: f"lease on {TENANT}-0102" in c.output() and "not found" in c.output(), 30,
                     "the lease keeper's line (through supervisord's log relay)")
            check_clean(page)
            assert c.status()["status"] == "running"


def metrics_page(c: Compute) -> str:
    code, body = c.request("GET", "/metrics")
    assert code == 200
    return body.decode()


HOSTILE = [
    ("project_id", lambda s: s.update(project_id="p\nshared_preload_libraries = 'evil'")),
    ("endpoint_id", lambda s: s.update(endpoint_id="e\x00")),
    ("branch_id", lambda s: s.update(branch_id="b" * 5000)),
    ("safekeeper_connstrings[0]", lambda s: s.update(safekeeper_connstrings=["sk:1\nfsync = off"])),
    ("safekeeper_connstrings", lambda s: s.update(safekeeper_connstrings=["sk:1", "sk:1"])),
    ("pageserver_connection_info.shards.0102.pageservers[0].libpq_url",
     lambda s: s["pageserver_connection_info"]["shards"]["0102"]["pageservers"][0].update(
         libpq_url="postgres://a:1,postgres://evil:2")),
    ("pageserver_connection_info.stripe_size", lambda s: s["pageserver_connection_info"].update(stripe_size=None)),
    ("pageserver_connection_info.shards", lambda s: s["pageserver_connection_info"]["shards"].pop("0102")),
    ("pageserver_connstring", lambda s: (s.pop("pageserver_connection_info"),
                                         s.update(pageserver_connstring="postgres://a:1,postgres://b:2"))),
    ("cluster.postgresql_conf", lambda s: s["cluster"].update(postgresql_conf="include '/etc/passwd'")),
    ("cluster.postgresql_conf", lambda s: s["cluster"].update(postgresql_conf="data_directory = '/tmp'")),
    ("safekeepers_generation", lambda s: s.update(safekeepers_generation=-1)),
]


@pytest.mark.parametrize("field,mutate", HOSTILE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(HOSTILE)])
def test_hostile_storage_fields_exit_1_touching_nothing(field, mutate):
    c = Compute()
    c.spec = c.new_spec()
    c.spec.update(tenant_id=TENANT, timeline_id=TIMELINE, safekeeper_connstrings=["sk:1"],
                  pageserver_connection_info={"shard_count": 2, "stripe_size": 8, "shards": {
                      n: {"pageservers": [{"id": 1, "libpq_url": "postgres://no_user@127.0.0.1:9", "grpc_url": None}]}
                      for n in ("0002", "0102")}})
    mutate(c.spec)
    try:
        out = c.refused_over_precious_pgdata()
        assert out.startswith(f"compute-ctl: invalid spec: {field}: ") and len(out.splitlines()) == 1, out
        assert sorted(os.listdir(c.pgdata)) == ["precious"]
    finally:
        c.close()
