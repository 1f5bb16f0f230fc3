"""The state file removed, truncated or replaced with an empty file, on a booted tree and
during its start (issue 21, item 2). The tree notices (exitwatch looks every 0.5 s), says so in
one line, and stops: exit code 1, postgres shut down, no process left, no new state file made,
no program in a loop of restarts or log lines. SIGTERM meanwhile still exits 0, without a
traceback."""

from __future__ import annotations

import os
import signal

import pytest

from tests.support.fault_tree import alive, descendants
from tests.support.tree import Compute
from tests.support.waiting import wait_for

HANG = 60


def state_db(c: Compute) -> str:
    return os.path.join(c.runtime_dir, "state.db")


def lose(path: str, how: str) -> None:
    if how == "remove":
        os.unlink(path)
    elif how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(0)
    elif how == "replace-with-empty":
        tmp = path + ".new"
        open(tmp, "wb").close()
        os.replace(tmp, path)
    else:
        raise AssertionError(how)


def check_stopped_cleanly(c: Compute, pids: list[int], how: str, code: int = 1) -> None:
    assert c.wait_exit(HANG) == code, c.output()[-4000:]
    out = c.output()
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, "no process of the tree left")
    assert "Traceback" not in out, out[-4000:]
    assert "compute-ctl: " not in out or out.count("state.db") <= 3  # the one line, if in the bootstrap
    if how == "remove":
        assert not os.path.exists(c.runtime_dir) or not os.path.exists(state_db(c))  # never re-created
    elif os.path.exists(state_db(c)):
        # Nothing made a new database in it. (A connection closing as its program stops may
        # checkpoint its WAL's pages back into the truncated file: old pages, never the header.)
        with open(state_db(c), "rb") as f:
            assert not f.read(16).startswith(b"SQLite format 3")
    # Each program says it once, at most: no crash loop, no flood.
    assert out.count("waiting to be stopped") <= 4, out[-4000:]
    assert out.count("state file") < 20, out[-4000:]


@pytest.mark.parametrize("how", ["remove", "truncate", "replace-with-empty"])
def test_state_file_lost_while_running_stops_the_compute(how):
    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        pids = [p.pid for p in descendants(c.proc.pid)]
        postmaster = c.postmaster_pid()
        assert postmaster in pids
        lose(state_db(c), how)
        check_stopped_cleanly(c, pids, how)
        assert "the compute cannot be driven without it; stopping it (exit code 1)" in c.output()


@pytest.mark.parametrize("how", ["remove", "truncate", "replace-with-empty"])
@pytest.mark.parametrize("when", ["created", "initdb"])
def test_state_file_lost_during_the_start_stops_the_compute(how, when):
    c = Compute()
    c.spec = c.new_spec()
    with c:
        # As soon as compute-ctl has created it (the programs are being forked), or once the
        # driver's initdb has begun writing PGDATA.
        wait_for(lambda: os.path.exists(state_db(c)) and os.path.getsize(state_db(c)) > 0, HANG,
                 "the state file", 0.002)
        if when == "initdb":
            wait_for(lambda: os.path.exists(os.path.join(c.pgdata, "PG_VERSION")), HANG, "initdb", 0.002)
        lose(state_db(c), how)
        pids = [p.pid for p in descendants(c.proc.pid)]
        check_stopped_cleanly(c, pids, how)


def test_sigterm_with_the_state_file_lost_still_exits_0():
    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        pids = [p.pid for p in descendants(c.proc.pid)]
        c.signal(signal.SIGSTOP)  # supervisord's loop cannot notice the loss before the SIGTERM
        try:
            lose(state_db(c), "remove")
            c.signal(signal.SIGTERM)
        finally:
            c.signal(signal.SIGCONT)
        check_stopped_cleanly(c, pids, "remove", code=0)
