"""The runtime dir on a small tmpfs (as `/run/compute-ctl` is, as root), issue 19 item 3: a flood
of postgres log lines (failing 1 MB statements) can no longer fill it, the state file stays
writable and `last_active` keeps moving; when the space does run out (something else fills
it), /status and /metrics say the state writes fail and never show the busy compute idle.
Needs root (mount); the tree runs as the compute user."""

from __future__ import annotations

import os
import subprocess
import time

import psycopg
import psycopg.sql
import pytest

from compute.api.bodies import activity_unknown_after, parse_rfc3339
from compute.tree.supervisord_conf import LOG_BUDGET_BYTES
from tests.support.tree import Compute
from tests.support.waiting import wait_for

TMPFS_BYTES = 48 * 1024 * 1024  # above the log budget (30 MiB), far below the old caps (330 MB)
STATEMENT_BYTES = 1024 * 1024
FAILURES = 80  # 80 MB of postgres log (each failing statement is logged whole)
INTERVAL = 0.2
HANG = 120

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def used(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@needs_root
def test_log_flood_cannot_fill_a_small_runtime_dir_and_a_full_one_is_reported():
    c = Compute(args=["--monitor-interval", str(INTERVAL)])
    mnt = os.path.join(c.base, "tmpfs")
    os.makedirs(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0755", "tmpfs", mnt], check=True)
    try:
        c.runtime_dir = os.path.join(mnt, "run")
        c.spec = c.new_spec()
        with c:
            c.wait_status("running")
            busy = psycopg.connect(c.conninfo("appdb", "app", "apppass"), autocommit=True)
            big = "x" * STATEMENT_BYTES
            for _ in range(FAILURES):
                with pytest.raises(psycopg.Error):
                    busy.execute("SELECT %s::int" % psycopg.sql.quote(big))
            flood_end = time.time()  # postgres wrote each failing statement to its log: 80+ MB
            assert used(mnt) <= LOG_BUDGET_BYTES + 4 * 1024 * 1024, used(mnt)  # logs + the state file
            busy.execute("BEGIN")  # a busy session from here on: idle in transaction
            wait_for(lambda: parse_rfc3339(c.status()["last_active"]) > flood_end, HANG,
                     "last_active moving after the flood", 0.05)
            body = c.status()
            assert body["state_writes_failing"] is False and body["error"] is None, body
            print(f"tmpfs {TMPFS_BYTES >> 20} MiB after {FAILURES} MB of failing statements: "
                  f"{used(mnt) / 2 ** 20:.1f} MiB used")

            # Something else fills it: the state writes fail, and /status says so.
            filler = os.path.join(mnt, "filler")
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
            try:
                wait_for(lambda: c.status()["state_writes_failing"], HANG, "/status to say so", 0.05)
                page = c.request("GET", "/metrics")[1].decode()
                assert "compute_state_writes_failing 1" in page
                filled_at = time.time()
                # Once the monitor's ticks stop reaching the state file for long enough, the busy
                # compute is shown active (last_active: the time of the answer), never idle.
                wait_for(lambda: parse_rfc3339(c.status()["last_active"]) > filled_at,
                         activity_unknown_after(INTERVAL) + HANG, "last_active not frozen", 0.2)
                assert "not being recorded" in c.status()["error"] or c.status()["state_writes_failing"]
            finally:
                os.unlink(filler)
            wait_for(lambda: not c.status()["state_writes_failing"], HANG, "writes possible again", 0.05)
            recovered = time.time()
            wait_for(lambda: parse_rfc3339(c.status()["monitor_last_tick"]) > recovered, HANG,
                     "the monitor's ticks recorded again", 0.05)
            busy.close()
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)
