"""The storage path against a booted tree: hostile archives, stalls, refusals, retries, gzip.

Archives come from the wire-protocol pageserver peer; every hostile class of the extractor's
rule is served to a real compute-ctl, and nothing outside PGDATA may change."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tarfile
import time

import psycopg
import pytest

from tests.peers.pageserver import PageserverPeer
from tests.peers.sync_safekeepers import write_fake_postgres
from tests.support import promtool
from tests.support.hostile_tar import Member, raw_header, snapshot_tree, with_basebackup
from tests.support.pgcluster import free_port
from tests.support.tree import Compute, with_neon_storage
from tests.support.waiting import wait_for

TENANT, TIMELINE = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9"
TOKEN = "storage-e2e-token-7f3a"


def neon_compute(connstr: str, *args: str, env: dict | None = None) -> Compute:
    c = Compute(args=list(args))
    c.pgbin = write_fake_postgres(c.base)
    c.env = {"FAKE_SK_RECORD": os.path.join(c.base, "sync.json"), **(env or {})}
    c.spec = with_neon_storage(c.new_spec(), connstr, TENANT, TIMELINE, "127.0.0.1:5454", TOKEN)
    return c


def serve(c: Compute, data: bytes) -> str:
    path = os.path.join(c.base, "served.tar")
    with open(path, "wb") as f:
        f.write(data)
    return path


def hostile(victim: str, run_dir: str) -> dict[str, tuple[list[Member], bool]]:
    """class -> (members, put them before the real archive's members)."""
    keep = os.path.join(victim, "keep")
    return {
        "absolute": ([Member(keep, b"pwned")], True),
        "dotdot-to-state-file": ([Member("../run/state.db", b"pwned")], False),
        "pax-path-escape": ([Member("innocent", b"pwned", pax={"path": "../victim/keep"})], False),
        "symlink-then-write": ([Member("pg_evil", kind="sym", linkname=victim), Member("pg_evil/keep", b"pwned")],
                               True),
        "symlink-chain": ([Member("l1", kind="sym", linkname="l2"), Member("l2", kind="sym", linkname="../victim"),
                           Member("l1/keep", b"pwned")], False),
        "symlink-redefines-dir": ([Member("base", kind="sym", linkname=victim), Member("base/keep", b"pwned")],
                                  False),
        "hardlink-out": ([Member("pg_evil", kind="hard", linkname=keep)], False),
        "file-redefines-member": ([Member("PG_VERSION", b"99\n")], False),
        "device": ([Member("pg_dev", kind="chr", devmajor=1, devminor=3)], True),
        "fifo": ([Member("pg_fifo", kind="fifo")], False),
    }


CASES = sorted(hostile("/v", "/r"))


@pytest.mark.parametrize("case", CASES + ["huge-pax-header", "huge-longname"])
def test_hostile_archive_fails_the_start_and_nothing_outside_changes(case: str, bb_tar: str) -> None:
    c = Compute()
    victim = os.path.join(c.base, "victim")
    os.mkdir(victim)
    with open(os.path.join(victim, "keep"), "w") as f:
        f.write("keep")
    if case.startswith("huge"):
        kind = tarfile.XHDTYPE if case == "huge-pax-header" else tarfile.GNUTYPE_LONGNAME
        data = raw_header("././@PaxHeader", kind, 1 << 40) + b"\0" * (1 << 20)
        want = "the limit is 65536"
    else:
        members, first = hostile(victim, c.runtime_dir)[case]
        data = with_basebackup(bb_tar, members, first=first)
        want = "refusing tar member"
    path = serve(c, data)
    with PageserverPeer(path, password=TOKEN) as ps:
        c.pgbin = write_fake_postgres(c.base)
        c.spec = with_neon_storage(c.new_spec(), ps.connstr, TENANT, TIMELINE, "127.0.0.1:5454", TOKEN)
        before = snapshot_tree(c.base, skip=("pgdata", "run", "compute-ctl.out", "spec.json"))
        with c:
            st = c.wait_status("failed", timeout=60)
            assert want in st["error"] and st["error"].startswith("basebackup: "), st["error"]
            assert "\n" not in st["error"]
            assert c.metrics()["basebackup_retries"] == 0  # a refused archive is not retried
            assert len(ps.startups) == 1
            assert c.wait_exit(30) == 1
            assert snapshot_tree(c.base, skip=("pgdata", "run", "compute-ctl.out", "spec.json")) == before
            for rel, (kind, mode, *_r) in snapshot_tree(c.pgdata).items():
                assert kind in (stat.S_IFDIR, stat.S_IFREG) and not mode & 0o7022, (rel, oct(mode))
            assert stat.S_IMODE(os.stat(c.pgdata).st_mode) == 0o700


def test_sanitised_members_still_boot(bb_tar: str) -> None:
    """A `.` member asking 0777 and setuid/world-writable files: the start succeeds without them."""
    c = Compute()
    data = with_basebackup(bb_tar, [Member(".", kind="dir", mode=0o777), Member("./", kind="dir", mode=0o4777),
                                    Member("pg_suid", b"#!/bin/sh\n", mode=0o6777),
                                    Member("pg_dir", kind="dir", mode=0o1777)])
    path = serve(c, data)
    with PageserverPeer(path, password=TOKEN) as ps:
        c.pgbin = write_fake_postgres(c.base)
        c.spec = with_neon_storage(c.new_spec(), ps.connstr, TENANT, TIMELINE, "127.0.0.1:5454", TOKEN)
        with c:
            c.wait_status("running", timeout=90)
            assert stat.S_IMODE(os.stat(c.pgdata).st_mode) == 0o700
            assert stat.S_IMODE(os.stat(os.path.join(c.pgdata, "pg_suid")).st_mode) == 0o755
            assert stat.S_IMODE(os.stat(os.path.join(c.pgdata, "pg_dir")).st_mode) == 0o755
            # Another OS user gets nothing of what the archive brought, whatever its modes said.
            for rel in ("pg_suid", "global/pg_control", "pg_dir"):
                res = subprocess.run(["runuser", "-u", "nobody", "--", "stat", os.path.join(c.pgdata, rel)],
                                     capture_output=True, text=True)
                assert res.returncode != 0 and "Permission denied" in res.stderr, (rel, res.stderr)
            with psycopg.connect(c.admin_conninfo()) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped is not)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


def prom_value(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    assert m, f"{name}{{{labels}}} not in /metrics"
    return float(m.group(1))


def check_promtool(text: str) -> None:
    if shutil.which("promtool"):  # optional: not a CI dependency
        promtool.check_clean(text)


def test_stall_mid_archive_is_retried_from_an_empty_pgdata(bb_tar: str) -> None:
    with PageserverPeer(bb_tar, password=TOKEN, faults=["stall", "drop"]) as ps:
        c = neon_compute(ps.connstr, "--storage-timeout", "2")
        with c:
            c.wait_status("running", timeout=120)
            assert [s.fault for s in ps.startups] == ["stall", "drop", None]
            assert c.metrics()["basebackup_retries"] == 2
            out = c.output()
            assert re.search(r"basebackup attempt 1/10 failed: basebackup: no progress from the pageserver "
                             r"for 2 s \(after \d+ bytes\); retrying in 0.50 s", out), out[-3000:]
            assert "basebackup attempt 2/10 failed: basebackup: connection lost" in out \
                or "basebackup attempt 2/10 failed: basebackup: consuming input failed" in out, out[-3000:]
            code, body = c.request("GET", "/metrics")
            text = body.decode()
            assert prom_value(text, "compute_storage_retries_total", 'step="basebackup"') == 2
            assert prom_value(text, "compute_storage_retries_total", 'step="sync_safekeepers"') == 0
            check_promtool(text)
            assert TOKEN not in out


def test_refused_then_unavailable_pageserver_is_retried(bb_tar: str) -> None:
    """Nobody listens at first (ECONNREFUSED), then the pageserver says 'starting up' and closes
    a connection: running after retries, each attempt logged with its cause."""
    port = free_port()
    c = neon_compute(f"postgresql://no_user@127.0.0.1:{port}")
    with c:
        deadline = time.monotonic() + 60
        while "basebackup attempt 1/10 failed" not in c.output():
            assert time.monotonic() < deadline, c.output()[-3000:]
            time.sleep(0.05)
        with PageserverPeer(bb_tar, password=TOKEN, faults=["fatal", "close"], port=port) as ps:
            c.wait_status("running", timeout=90)
            retries = c.metrics()["basebackup_retries"]
            assert retries >= 3 and len(ps.startups) == 3, (retries, ps.startups)
        out = c.output()
        assert "Connection refused" in out
        assert "FATAL: the database system is starting up" in out


def test_gzip_end_to_end(bb_tar: str) -> None:
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = neon_compute(ps.connstr, "--basebackup-compression", "gzip")
        with c:
            c.wait_status("running", timeout=90)
            s = ps.last
            assert s.queries == [f"basebackup {TENANT} {TIMELINE} 0/16B9188 --gzip"]
            assert c.metrics()["basebackup_bytes"] == s.wire_bytes < os.path.getsize(bb_tar)
            with psycopg.connect(c.admin_conninfo()) as conn:
                assert conn.execute("SELECT count(*) FROM pg_class").fetchone()[0] > 100


def test_silent_safekeepers_are_killed_and_retried(bb_tar: str) -> None:
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = neon_compute(ps.connstr, "--storage-timeout", "2", env={"FAKE_SK_STALL": "1"})
        with c:
            c.wait_status("running", timeout=90)
            assert c.metrics()["sync_safekeepers_retries"] == 1
            wait_for(lambda: "sync-safekeepers attempt 1/5 failed: sync-safekeepers: no progress for 2 s (killed)"
                     in c.output(), 30, "the driver's line (through supervisord's log relay)")
        out = subprocess.run(["pgrep", "-f", f"{c.pgbin} --sync-safekeepers"], capture_output=True, text=True)
        assert out.stdout == ""  # the silent one did not outlive its compute


def test_exhausted_sync_retries_fail_with_the_last_cause(bb_tar: str) -> None:
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = neon_compute(ps.connstr, env={"FAKE_SK_FAIL": "100"})
        with c:
            st = c.wait_status("failed", timeout=60)
            assert st["error"].startswith("sync-safekeepers failed after 5 attempt(s): sync-safekeepers: exit code 1")
            assert "simulated failure 5/100" in st["error"]
            assert c.metrics()["sync_safekeepers_retries"] == 4
            assert ps.sessions == []
            assert c.wait_exit(30) == 1


@pytest.mark.parametrize("args,msg", [
    (["--storage-timeout", "0"], "--storage-timeout must be between 1 and 86400 seconds"),
    (["--storage-timeout", "nan"], "--storage-timeout must be between 1 and 86400 seconds"),
    (["--storage-timeout", "1e9"], "--storage-timeout must be between 1 and 86400 seconds"),
    (["--basebackup-compression", "zstd"], "invalid choice: 'zstd'"),
])
def test_bad_storage_flags_are_refused_before_anything(args: list[str], msg: str) -> None:
    c = Compute(args=args)
    c.spec = c.new_spec()
    try:
        res = subprocess.run(c.command(), capture_output=True, text=True, timeout=60)
        assert res.returncode in (1, 2) and msg in res.stderr, res.stderr
        assert not os.path.exists(c.runtime_dir) and not os.path.exists(c.pgdata)
    finally:
        c.close()


def test_lifecycle_killed_during_a_silent_sync_leaves_no_orphan(bb_tar: str) -> None:
    """kill -9 of lifecycle while sync-safekeepers hangs: the sync dies with it, the restarted
    lifecycle syncs again and the compute runs."""
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = neon_compute(ps.connstr, env={"FAKE_SK_STALL": "1"})
        with c:
            pattern = f"{c.pgbin} --sync-safekeepers"
            deadline = time.monotonic() + 60
            while not (pids := subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()):
                assert time.monotonic() < deadline, c.output()[-3000:]
                time.sleep(0.05)
            lifecycle = c.program_pid("lifecycle")
            os.kill(lifecycle, 9)
            deadline = time.monotonic() + 30
            while any(alive(int(p)) for p in pids):
                assert time.monotonic() < deadline, "the stalled sync outlived lifecycle"
                time.sleep(0.05)
            c.wait_status("running", timeout=90)


def test_safekeepers_that_never_answer_fail_the_start_in_bounded_time(bb_tar: str) -> None:
    """Always silent: 5 attempts of 2 s each plus 0.5+0.75+1.125+1.69 s of backoff, then failed."""
    with PageserverPeer(bb_tar, password=TOKEN) as ps:
        c = neon_compute(ps.connstr, "--storage-timeout", "2", env={"FAKE_SK_STALL": "100"})
        with c:
            t = time.monotonic()
            st = c.wait_status("failed", timeout=120)
            took = time.monotonic() - t
            assert st["error"].startswith("sync-safekeepers failed after 5 attempt(s): sync-safekeepers: "
                                          "no progress for 2 s (killed)"), st["error"]
            assert 14 <= took < 60, took
            assert c.metrics()["sync_safekeepers_retries"] == 4 and ps.sessions == []
            assert c.wait_exit(30) == 1
        out = subprocess.run(["pgrep", "-f", f"{c.pgbin} --sync-safekeepers"], capture_output=True, text=True)
        assert out.stdout == ""
