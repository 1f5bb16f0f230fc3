"""Fault injection on a booted tree: kill -9 the supervised programs over and over, kill -9
postgres, SIGTERM the compute, SIGKILL supervisord itself.

Killing the api's gunicorn master takes /status away for a moment whatever supervisord does:
its orphaned workers stop listening at once ("Parent changed, shutting down") and the new
master needs 0.2-0.8 s (more on a loaded machine) to import and boot its workers; meanwhile
connections are refused. The tests bound that outage and report it.

Restarts are detected from /proc (a new child of supervisord running the program), not by
polling supervisord's control socket: every request on that socket ends supervisord's 1 s
poll() early and would make restarts look faster than they are in production.
"""

from __future__ import annotations

import os
import random
import signal
import time

import psycopg
import pytest

from compute.shared.state import StateStore, state_path
from compute.shared.supervisor_rpc import rpc
from tests.support.fault_tree import (StatusPoller, alive, kill_leftovers, program_child, read_proc,
                                      supervisord_pid, tree)
from tests.support.tree import Compute
from tests.support.waiting import status_answers, wait_for

KILLS = 20
# What the tests below require: each program comes back, and /status is refused no longer than
# this. How fast (issue 6's 2 s goal) is a figure of `python -m bench` (startup's kill -9 rows),
# not an assertion here.
LIVENESS = 5.0


def postmaster_start_time(c: Compute):
    with psycopg.connect(c.conninfo()) as conn:
        return conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]


@pytest.mark.parametrize("program", ["monitor", "api", "lifecycle"])
def test_kill_9_program_repeatedly(compute, program):
    kill_9_program_repeatedly(compute, program)


def kill_9_program_repeatedly(c: Compute, program: str) -> None:
    """KILLS x kill -9 of `program` in the booted tree `c`, with every check on the way; the
    restart times are printed."""
    st0 = c.wait_status("running")
    c.wait_handed_over()  # kill the serving driver, not the one handing over
    pm, pm_started = c.postmaster_pid(), postmaster_start_time(c)
    sup = supervisord_pid(c.runtime_dir)
    rng = random.Random(program)
    spawn_s, running_s, serving_s = [], [], []
    old_workers: list[int] = []

    with StatusPoller(c.http_port) as poller:
        for i in range(KILLS):
            old = wait_for(lambda: program_child(sup, program), 5, f"{program} to run")
            if program == "api":
                old_workers += [p.pid for _, p in tree(c.proc.pid) if p.ppid == old]
            time.sleep(rng.uniform(0, 0.4))  # sometimes mid-start, sometimes settled
            t0 = time.monotonic()
            os.kill(old, signal.SIGKILL)
            new = wait_for(lambda: (n := program_child(sup, program)) and n != old and n, 10,
                           f"a new {program} (kill #{i + 1})")
            spawn_s.append(time.monotonic() - t0)
            # Only now ask supervisord (its answer must agree with /proc).
            wait_for(lambda: (info := rpc(c.runtime_dir).supervisor.getProcessInfo(program))["statename"]
                     == "RUNNING" and info["pid"] == new, 10, f"{program} RUNNING with pid {new}", 0.05)
            running_s.append(time.monotonic() - t0)
            if program == "api":  # back means: the new master's workers answer
                wait_for(lambda: any(p.ppid == new for _, p in tree(c.proc.pid)) and status_answers(c.http_port),
                         10, "the new api to answer", 0.02)
                serving_s.append(time.monotonic() - t0)
            assert alive(pm), f"postgres died after kill #{i + 1} of {program}"
        time.sleep(1)

    print(f"\n{program}: {KILLS} x kill -9; new pid after max {max(spawn_s):.2f} s "
          f"(median {sorted(spawn_s)[KILLS // 2]:.2f}); RUNNING after max {max(running_s):.2f} s; "
          + (f"/status served by the new master after max {max(serving_s):.2f} s; " if serving_s else "")
          + f"/status polls {len(poller.samples)}, failed {len(poller.failures())}, "
            f"longest outage {poller.longest_outage():.2f} s")

    # postgres was never restarted
    assert c.postmaster_pid() == pm and alive(pm)
    assert postmaster_start_time(c) == pm_started
    info = rpc(c.runtime_dir).supervisor.getProcessInfo("postgres")
    assert info["statename"] == "RUNNING" and info["pid"] == pm

    # every program came back
    assert max(running_s) <= LIVENESS, f"restart times {['%.2f' % x for x in running_s]}"

    # /status kept its state and answered throughout (the api itself: back within the limit)
    bodies = poller.bodies()
    assert bodies and all(b["status"] == "running" and b["start_time"] == st0["start_time"] for b in bodies)
    if program == "api":
        # The one server process was killed: /status is refused until the new master has
        # booted (see the module docstring); bounded, not zero.
        assert max(serving_s) <= LIVENESS, f"api back after {['%.2f' % x for x in serving_s]}"
        assert poller.longest_outage() <= LIVENESS
    else:
        assert poller.failures() == [], poller.failures()[:5]
    assert c.status()["status"] == "running"

    # the orphaned gunicorn workers of killed masters went away by themselves
    if program == "api":
        wait_for(lambda: not any(alive(p) for p in old_workers), 10, "old api workers to exit", 0.1)

    # exitwatch (in supervisord) counted every exit (served by /metrics as program restarts)
    store = StateStore(state_path(c.runtime_dir))
    wait_for(lambda: (store.get("program_restarts") or {}).get(program) == KILLS, 5,
             f"program_restarts[{program}] == {KILLS} (is {store.get('program_restarts')})", 0.1)

    # nothing else was disturbed, and the compute still stops cleanly
    assert c.supervisorctl("status").returncode == 0
    c.signal(signal.SIGTERM)
    assert c.wait_exit(10) == 0


def tree_pids(c: Compute) -> dict[int, str]:
    return {p.pid: role for role, p in tree(c.proc.pid) if p.pid != c.proc.pid}


def wait_gone(pids, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_kill_9_postgres_propagates_failure(compute):
    c = compute
    c.wait_status("running")
    c.wait_handed_over()  # the whole tree, api and monitor included
    pids = tree_pids(c)
    pm = c.postmaster_pid()
    t = time.monotonic()
    os.kill(pm, signal.SIGKILL)
    code = c.wait_exit(30)
    elapsed = time.monotonic() - t  # reported, not asserted: bench measures speed
    print(f"\nkill -9 postgres: compute-ctl exited {code} after {elapsed:.2f} s")
    assert code != 0
    assert wait_gone(pids) == []


def test_sigterm_is_a_clean_exit_0(compute):
    c = compute
    c.wait_status("running")
    pids = tree_pids(c)
    t = time.monotonic()
    c.signal(signal.SIGTERM)
    code = c.wait_exit(15)
    elapsed = time.monotonic() - t
    print(f"\nSIGTERM: compute-ctl exited {code} after {elapsed:.2f} s")
    assert code == 0
    assert elapsed < 10
    assert wait_gone(pids, 2) == []
    assert "received fast shutdown request" in c.output()


def test_sigkill_of_supervisord_leaves_nothing_behind(compute):
    """Every program, the gunicorn workers and postgres go when supervisord (compute-ctl
    itself: one PID) is SIGKILLed (each sets a parent-death signal: monitor and the api master
    lacked one until issue 6)."""
    c = compute
    c.wait_status("running")
    c.wait_handed_over()  # the driver that ran the start-up hands over to a fresh one
    assert supervisord_pid(c.runtime_dir) == c.proc.pid  # compute-ctl is supervisord
    pids = tree_pids(c)
    roles = set(pids.values())
    assert {"postgres", "lifecycle", "monitor", "api master", "api worker"} <= roles, roles
    assert all(read_proc(p).ppid == c.proc.pid for p, role in pids.items()
               if role in ("lifecycle", "monitor", "api master"))
    try:
        os.kill(supervisord_pid(c.runtime_dir), signal.SIGKILL)
        code = c.wait_exit(15)
        assert code != 0
        survivors = wait_gone(pids)
        described = [f"{pids[p]} (pid {p}, now child of {read_proc(p).ppid})" for p in survivors
                     if read_proc(p)]
        assert survivors == [], f"survived SIGKILL of supervisord: {described}"
    finally:
        kill_leftovers(pids)  # a regression must not leak processes into the rest of the run
