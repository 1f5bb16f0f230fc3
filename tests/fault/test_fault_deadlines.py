"""Issue 19, item 2: peers that trickle. Every outbound request has an overall deadline per
attempt (--attempt-deadline), on top of the per-receive / no-progress bounds: a control plane,
safekeepers, a pageserver or a primary that keep sending a byte now and then, and never finish,
fail the attempt, which is retried; the attempt and the deadline are in the log and, when the
start fails, on /status."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from compute.postgres import replica
from tests.peers.control_plane import ControlPlanePeer
from tests.peers.pageserver import PageserverPeer
from tests.peers.sync_safekeepers import write_fake_postgres
from tests.support.tree import Compute, pull_compute, with_neon_storage

TENANT, TIMELINE = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9"
TOKEN = "deadline-e2e-token-51c2"
DEADLINE = ["--storage-timeout", "1", "--attempt-deadline", "2"]


def neon_compute(connstr: str, *args: str, env: dict | None = None) -> Compute:
    c = Compute(args=list(args))
    c.pgbin = write_fake_postgres(c.base)
    c.env = dict(env or {})
    c.spec = with_neon_storage(c.new_spec(), connstr, TENANT, TIMELINE, "127.0.0.1:5454", TOKEN)
    return c


def test_a_control_plane_that_trickles_fails_the_start_with_the_deadline_on_status() -> None:
    """200, Content-Length 100000, a byte every 0.5 s (each receive gets something: the 10 s
    receive timeout never fires): each attempt ends at its deadline and is retried; after the
    last, /status says failed with the attempt count and the deadline, and the tree exits 1."""
    with ControlPlanePeer(None, trickle=0.5) as cp:
        c = pull_compute(cp, *DEADLINE)
        with c:
            st = c.wait_status("failed", timeout=120)
            assert "after 5 attempt(s)" in st["error"], st
            assert "no whole answer within the attempt deadline of 2 s (--attempt-deadline)" in st["error"], st
            out = c.output()
            for n in range(1, 5):
                assert re.search(rf"fetching the spec from \S+ failed \(attempt {n}/5\): no whole answer "
                                 r"within the attempt deadline of 2 s", out), out[-3000:]
            assert len(cp.requests) == 5
            assert c.wait_exit(60) == 1


def test_a_control_plane_that_trickles_then_answers_is_retried_to_running() -> None:
    with ControlPlanePeer(None, trickle=0.5, trickle_first=2) as cp:
        c = pull_compute(cp, *DEADLINE)
        with c:
            c.wait_status("running", timeout=120)
            assert len(cp.requests) == 3
            assert "(attempt 2/5): no whole answer within the attempt deadline of 2 s" in c.output()


def test_safekeepers_that_talk_without_end_fail_the_start_with_the_deadline_on_status(bb_tar: str) -> None:
    """sync-safekeepers logs a line every 0.5 s (progress for --storage-timeout) and never ends."""
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = neon_compute(ps.connstr, *DEADLINE, env={"FAKE_SK_TRICKLE": "100"})
        with c:
            st = c.wait_status("failed", timeout=120)
            assert st["error"].startswith(
                "sync-safekeepers failed after 5 attempt(s): sync-safekeepers: not done within the attempt "
                "deadline of 2 s (--attempt-deadline; killed)"), st["error"]
            out = c.output()
            assert "sync-safekeepers attempt 1/5 failed: sync-safekeepers: not done within the attempt " \
                   "deadline of 2 s" in out, out[-3000:]
            assert c.metrics()["sync_safekeepers_retries"] == 4 and ps.sessions == []
            assert c.wait_exit(60) == 1
        left = subprocess.run(["pgrep", "-f", f"{c.pgbin} --sync-safekeepers"], capture_output=True, text=True)
        assert left.stdout == ""


def test_a_pageserver_that_trickles_fails_the_attempt_and_is_retried(bb_tar: str) -> None:
    """One archive byte per CopyData message every 0.5 s: the no-progress bound never acts; the
    attempt's deadline does, and the next attempt (a normal session) brings the compute up."""
    with PageserverPeer(bb_tar, password=TOKEN, faults=["trickle"]) as ps:
        # 6 s, not 2: the second attempt's whole 38 MiB basebackup must fit in it on a loaded machine
        c = neon_compute(ps.connstr, "--storage-timeout", "1", "--attempt-deadline", "6")
        with c:
            c.wait_status("running", timeout=120)
            assert [s.fault for s in ps.startups] == ["trickle", None]
            assert c.metrics()["basebackup_retries"] == 1
            out = c.output()
            assert re.search(r"basebackup attempt 1/10 failed: basebackup: not done within the attempt deadline "
                             r"of 6 s \(--attempt-deadline; (after \d+ bytes|waiting for a result)\)", out), out[-3000:]


FAKE_PG_BASEBACKUP = """#!/bin/sh
# a primary that trickles: pg_basebackup keeps reporting, never finishes; its child too
sleep 3600 &
while :; do echo "pg_basebackup: still copying"; sleep 0.5; done
"""


def test_a_clone_that_never_ends_is_killed_at_its_deadline_and_retried(tmp_path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "pg_basebackup"
    fake.write_text(FAKE_PG_BASEBACKUP)
    fake.chmod(0o755)
    pgdata, secrets = tmp_path / "pgdata", tmp_path / "run"
    pgdata.mkdir()
    secrets.mkdir(mode=0o700)
    retried = []
    with pytest.raises(replica.ReplicaError) as err:
        replica.clone_primary(str(bindir), str(pgdata), "host=127.0.0.1 user=r password=pw", str(secrets),
                              deadline=1, before_retry=lambda: retried.append(1))
    assert str(err.value) == ("cloning the primary failed after 3 attempt(s): cloning the primary: not done "
                              "within the attempt deadline of 1 s (--attempt-deadline; pg_basebackup killed)")
    assert len(retried) == 2
    assert os.listdir(secrets) == []  # the passfile went with each attempt
    left = subprocess.run(["pgrep", "-f", str(fake)], capture_output=True, text=True)
    assert left.stdout == ""  # the whole group went, its child included
