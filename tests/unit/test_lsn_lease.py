"""LSN leases (issue 18, item 9's lease part): the schedule (compute.model.lsn_lease, pure) and one
attempt on every pageserver of every shard (compute.storage.lsn_lease) against the pageserver
peer, which answers as Neon's page_service.rs does at 6a35a3e."""

from __future__ import annotations

import time

import pytest

from compute.model import lsn_lease as plan
from compute.storage.attempts import StorageError
from compute.storage.lsn_lease import lease_all, lease_one, lease_query
from tests.peers.pageserver import PageserverPeer

TENANT, TIMELINE, LSN = "a" * 32, "b" * 32, "0/16B9188"


# -- the schedule -------------------------------------------------------------------------

def test_retry_is_heads_half_a_second_times_one_and_a_half_capped_at_a_minute():
    assert [plan.retry_delay(n) for n in range(1, 5)] == [0.5, 0.75, 1.125, 1.6875]
    assert plan.retry_delay(50) == 60.0


@pytest.mark.parametrize("validity,delay", [(600, 540), (100, 50), (120, 60), (30, 15), (0, 0), (-5, 0)])
def test_renewal_is_max_of_validity_minus_a_minute_and_half_of_it(validity, delay):
    assert plan.renew_delay(1000 + validity, 1000) == delay


def test_a_record_goes_on_with_its_schedule_until_the_pageservers_change():
    targets = [[TENANT, "postgres://ps:1"]]
    rec = plan.current(None, LSN, targets, 100.0)
    assert rec["state"] == plan.PENDING and plan.wait_seconds(rec, 100.0) == 0
    rec = plan.failed(rec, "refused", 100.0)
    assert rec["state"] == plan.RETRYING and plan.wait_seconds(rec, 100.0) == 0.5
    rec = plan.failed(rec, "refused", 100.5)
    assert plan.wait_seconds(rec, 100.5) == 0.75 and rec["errors"] == 2
    rec = plan.granted(rec, 700.0, 101.0)
    assert rec["state"] == plan.HELD and rec["next_at"] == 640.0 and rec["failures"] == 0
    assert plan.current(rec, LSN, targets, 200.0) is rec  # a new driver goes on with it
    moved = plan.current(rec, LSN, [[TENANT, "postgres://other:1"]], 200.0)
    assert moved["state"] == plan.PENDING and moved["next_at"] == 200.0 and moved["granted"] == 1
    gone = plan.refused(rec)
    assert plan.wait_seconds(gone, 1e9) is None and not plan.keeps_driver_busy(gone)
    assert all(plan.keeps_driver_busy(r) for r in (rec, moved)) and not plan.keeps_driver_busy(None)


# -- the command --------------------------------------------------------------------------

def test_the_command_is_heads_with_its_trailing_space():
    assert lease_query(TENANT, TIMELINE, LSN) == f"lease lsn {TENANT} {TIMELINE} {LSN} ".encode()
    assert lease_query(f"{TENANT}-0102", TIMELINE, LSN).startswith(f"lease lsn {TENANT}-0102 ".encode())


@pytest.mark.parametrize("tsid,timeline,lsn", [
    (TENANT + " ; x", TIMELINE, LSN), (TENANT, TIMELINE + "\n", LSN), (TENANT, TIMELINE, "0/1 --x"),
    (TENANT.upper(), TIMELINE, LSN), (f"{TENANT}-01020", TIMELINE, LSN), ("", TIMELINE, LSN),
])
def test_nothing_unchecked_reaches_the_command(tsid, timeline, lsn):
    with pytest.raises(StorageError):
        lease_query(tsid, timeline, lsn)


@pytest.fixture
def tar(tmp_path):
    path = tmp_path / "empty.tar"
    path.write_bytes(b"\0" * 1024)
    return str(path)


def test_a_lease_from_the_peer(tar):
    with PageserverPeer(tar, password="tok", lease_seconds=300) as ps:
        t0 = time.time()
        valid_until = lease_one(ps.connstr, "tok", TENANT, TIMELINE, LSN, timeout=5)
        assert t0 + 290 < valid_until < time.time() + 310
        assert ps.last.queries == [f"lease lsn {TENANT} {TIMELINE} {LSN} "]
        assert ps.last.password == "tok" and ps.last.startup.get("application_name") == "compute_ctl"
        assert [(x.tenant_shard_id, x.lsn) for x in ps.leases] == [(TENANT, LSN)]


def test_every_shard_is_asked_with_its_shard_id_and_the_earliest_wins(tar):
    with PageserverPeer(tar, shards=["0002"], lease_seconds=600) as ps0, \
            PageserverPeer(tar, shards=["0102"], lease_seconds=300) as ps1:
        targets = [(f"{TENANT}-0002", ps0.connstr), (f"{TENANT}-0102", ps1.connstr)]
        valid_until = lease_all(targets, None, TIMELINE, LSN, timeout=5)
        assert valid_until == ps1.leases[0].valid_until_ms / 1000
        assert [x.tenant_shard_id for x in ps0.leases + ps1.leases] == [f"{TENANT}-0002", f"{TENANT}-0102"]


def test_a_refusal_is_none(tar):
    with PageserverPeer(tar, gc_cutoff="1/0") as ps:
        assert lease_one(ps.connstr, None, TENANT, TIMELINE, LSN, timeout=5) is None
        assert lease_all([(TENANT, ps.connstr)], None, TIMELINE, LSN, timeout=5) is None


@pytest.mark.parametrize("tsid,hosted", [
    (TENANT, ["0002"]),              # unqualified id for a sharded tenant: not found, as a real one
    (f"{TENANT}-0202", ["0002"]),    # a shard id the peer does not know
    (f"{TENANT}-0001", ["0000"]),    # a sharded id for an unsharded tenant
])
def test_a_shard_the_pageserver_does_not_host_is_an_error(tar, tsid, hosted):
    with PageserverPeer(tar, shards=hosted) as ps:
        with pytest.raises(StorageError, match=f"lease on {tsid}: .*not found"):
            lease_one(ps.connstr, None, tsid, TIMELINE, LSN, timeout=5)
        assert ps.leases == []


@pytest.mark.parametrize("fault", ["close", "fatal", "error"])
def test_a_failing_pageserver_fails_the_attempt(tar, fault):
    with PageserverPeer(tar, faults=[fault]) as ps:
        with pytest.raises(StorageError) as e:
            lease_all([(TENANT, ps.connstr)], None, TIMELINE, LSN, timeout=5)
        assert e.value.retryable and "\n" not in str(e.value)


def test_the_basebackup_refuses_a_shard_qualified_tenant_and_needs_shard_zero(tar):
    """page_service.rs: `basebackup` parses a TenantId (a `-NNCC` suffix does not parse) and
    answers from shard zero (ShardSelector::Zero)."""
    import psycopg
    with PageserverPeer(tar, shards=["0102"]) as ps:
        with psycopg.connect(ps.connstr, autocommit=True, sslmode="disable") as conn:
            for tenant, words in ((f"{TENANT}-0002", "Failed to parse tenant id"), (TENANT, "no shard zero")):
                res = conn.pgconn.exec_(f"basebackup {tenant} {TIMELINE}".encode())
                assert words in res.error_message.decode()


@pytest.mark.parametrize("reply,words", [
    (("expires", b"1700000000000"), "unexpected answer (column 'expires')"),
    (("valid_until", b"-5"), "unexpected valid_until '-5'"),
    (("valid_until", b"12e3"), "unexpected valid_until"),
    (("valid_until", b"9" * 30), "unexpected valid_until"),
    (("valid_until", b"\n\nDROP"), "unexpected valid_until"),
])
def test_a_hostile_lease_answer_fails_the_attempt_in_one_line(tar, reply, words):
    with PageserverPeer(tar, lease_reply=reply) as ps:
        with pytest.raises(StorageError) as e:
            lease_one(ps.connstr, None, TENANT, TIMELINE, LSN, timeout=5)
    assert words in str(e.value) and "\n" not in str(e.value) and e.value.retryable
