"""End to end, day-two operations: JSON logs, vm-informant supervision."""

import json
import os
import signal
import stat
import time

from tests.support.tree import Compute


def test_json_log_format():
    c = Compute()
    c.spec = c.new_spec()
    c.args = ["--log-format", "json"]
    with c:
        c.wait_status("running")
        c.signal(signal.SIGTERM)
        assert c.wait_exit(10) == 0
        lines = [ln for ln in c.output().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert all(set(r) == {"ts", "level", "program", "msg"} for r in records)
    programs = {r["program"] for r in records}
    assert {"compute-ctl", "lifecycle", "postgres"} <= programs
    assert any(r["program"] == "postgres" and "ready to accept connections" in r["msg"] for r in records)


INFORMANT = """#!/bin/sh
# Stand-in for vm-informant: records each start and its arguments, then dies after a moment.
echo "$(date +%s.%N) $*" >> "{record}"
echo "vm-informant stand-in started"
sleep 1
exit 3
"""


def test_vm_informant_restarted_after_5_seconds_and_harmless():
    c = Compute()
    c.spec = c.new_spec()
    record = os.path.join(c.base, "informant.log")
    informant = os.path.join(c.base, "vm-informant")
    with open(informant, "w") as f:
        f.write(INFORMANT.format(record=record))
    os.chmod(informant, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    c.args = ["--vm-informant", informant]
    with c:
        c.wait_status("running")
        pm = c.postmaster_pid()
        deadline = time.monotonic() + 20
        starts = []
        while time.monotonic() < deadline and len(starts) < 2:
            time.sleep(0.2)
            if os.path.exists(record):
                with open(record) as f:
                    starts = [ln.split(" ", 1) for ln in f.read().splitlines()]
        assert len(starts) >= 2, c.output()[-3000:]
        gap = float(starts[1][0]) - float(starts[0][0])
        assert 5.5 <= gap <= 8.5  # ran ~1 s, then restarted ~5 s after its exit
        assert "--auto-restart" in starts[0][1] and "--pgconnstr=dbname=postgres user=cloud_admin" in starts[0][1]
        assert c.postmaster_pid() == pm and c.status()["status"] == "running"
        assert "vm-informant stand-in started" in c.output()


def test_no_vm_informant_no_program():
    c = Compute()
    c.spec = c.new_spec()
    c.args = ["--vm-informant", "/nonexistent/vm-informant"]
    with c:
        c.wait_status("running")
        assert "vm-informant" not in c.supervisorctl("status").stdout
