"""postgres-exporter: the DSN it gets (pure), its supervisord section, and end to end with
Debian's real prometheus-postgres-exporter scraping a booted compute.

This file: the real exporter on a booted compute; the pure parts:
tests/unit/test_postgres_exporter.py."""

import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.support.pgcluster import free_port
from tests.support.tree import Compute

EXPORTER = shutil.which("prometheus-postgres-exporter") or "/usr/bin/prometheus-postgres-exporter"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def wait_pg_up(port: int, c: Compute, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            last = scrape(port)
            if "\npg_up 1" in last:
                return last
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise AssertionError(f"no pg_up 1 within {timeout} s: {last[-500:]}\n{c.output()[-4000:]}")


def exporter_pid(c: Compute) -> int:
    out = c.supervisorctl("pid", "postgres-exporter").stdout.strip()
    return int(out)


@pytest.mark.skipif(not os.access(EXPORTER, os.X_OK), reason="prometheus-postgres-exporter not installed")
def test_real_exporter_scrapes_the_compute_and_is_supervised():
    c = Compute()
    c.spec = c.new_spec()
    port = free_port()
    c.args = ["--postgres-exporter", EXPORTER, "--postgres-exporter-port", str(port)]
    with c:
        c.wait_status("running")
        text = wait_pg_up(port, c)
        assert "pg_stat_database_" in text  # real per-database metrics from postgres

        # Its access is private: no password anywhere, its environment unreadable by others.
        pid = exporter_pid(c)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert not any(b"postgresql://" in a or b"password" in a for a in argv)
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        assert b"password" not in env[b"DATA_SOURCE_NAME"] and b"@/postgres?" in env[b"DATA_SOURCE_NAME"]
        other = subprocess.run(["runuser", "-u", "nobody", "--", "cat", f"/proc/{pid}/environ"],
                               capture_output=True)
        assert other.returncode != 0 and b"DATA_SOURCE_NAME" not in other.stdout

        # Killed: restarted ~5 s later (exitwatch), postgres untouched, metrics back.
        pm = c.postmaster_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        new = None
        while time.monotonic() < deadline:
            try:
                new = exporter_pid(c)
            except ValueError:
                new = None
            if new and new != pid:
                break
            time.sleep(0.2)
        assert new and new != pid, c.supervisorctl("status").stdout
        wait_pg_up(port, c)
        assert c.postmaster_pid() == pm and c.status()["status"] == "running"

        c.signal(signal.SIGTERM)
        assert c.wait_exit(20) == 0
        # No orphan: the exporter went down with the tree.
        assert not os.path.exists(f"/proc/{new}") or open(f"/proc/{new}/stat").read().split()[2] == "Z"
