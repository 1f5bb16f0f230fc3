"""Every exit path leaves nothing behind (issue 9, section 5).

Each path ends a booted tree at different moments: while the lifecycle driver runs initdb
(`starting`), running with a client session open (`running`), in pull mode with a /configure
in flight whose apply is blocked on a lock a spec role holds (`configuring`: a gunicorn worker
thread and a postgres backend are busy), and right after the api master was killed, while its
successor boots (`api-restarting`: the kills only). The tree's processes are recorded from
/proc before the blow (by pid and start time, plus the programs' process groups), and afterwards none
of them may be left and neither port may be listened on:

- kill -9 compute-ctl (which is supervisord: one PID): everything gone within 5 s (GONE_WITHIN);
- SIGTERM, /terminate, postgres killed, failed start: compute-ctl exits only once everything is
  gone, so nothing may be left at the moment it has exited.

And a lifecycle driver killed while it applies a reconfiguration does not wedge the compute.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import signal
import time

import psycopg
import pytest

from compute.shared.state import StateStore, state_path
from tests.peers.control_plane import ControlPlanePeer
from tests.support.exit_paths import TreeRecord, listening
from tests.support.fault_tree import program_child, supervisord_pid, tree
from tests.support.tree import Compute
from tests.support.waiting import wait_for

GONE_WITHIN = 5.0  # the bound after a kill -9 of compute-ctl or supervisord
APP_PASSWORD = "apppass"  # tests/support/tree.py's spec role `app`
APPLY_APP_NAME = "compute_ctl:apply_spec"
MOMENTS = ["starting", "running", "configuring"]
EXPECTED_ROLES = {"lifecycle", "monitor", "api master", "api worker"}


def md5_password(role: str, password: str) -> str:
    return hashlib.md5((password + role).encode()).hexdigest()


def configure(c: Compute, spec: dict, timeout: float = 120) -> tuple[int, dict | None]:
    code, body = c.request("POST", "/configure", {"spec": spec}, {"Content-Type": "application/json"}, timeout)
    return code, json.loads(body) if body else None


def blocked_apply_pids(c: Compute) -> set[int]:
    """Sessions of the driver's apply that wait for a lock."""
    with psycopg.connect(c.admin_conninfo()) as conn:
        return {pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
            (APPLY_APP_NAME,))}


def apply_pids(c: Compute) -> set[int]:
    with psycopg.connect(c.admin_conninfo()) as conn:
        return {pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (APPLY_APP_NAME,))}


def hold_role_lock(c: Compute, password: str = APP_PASSWORD) -> psycopg.Connection:
    """The spec role `app` changes its own password and keeps the transaction open: an apply
    that changes app's password waits for this transaction (a spec role can do this)."""
    holder = psycopg.connect(c.conninfo("appdb", "app", password))
    holder.execute("ALTER ROLE app PASSWORD 'held-by-the-role'")
    return holder


def spec_with_app_password(c: Compute, password: str) -> dict:
    spec = c.new_spec()
    spec["cluster"]["roles"][0]["encrypted_password"] = md5_password("app", password)
    return spec


class Scene:
    """A booted tree at one of the MOMENTS, with everything the moment needs open."""

    def __init__(self, moment: str):
        self.moment = moment
        self.stack = contextlib.ExitStack()
        self.pool = concurrent.futures.ThreadPoolExecutor(2)
        self.configure_call = None
        self.client: psycopg.Connection | None = None
        self.c: Compute
        self.rec: TreeRecord

    def __enter__(self) -> "Scene":
        try:
            self._boot()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _boot(self) -> None:
        if self.moment == "configuring":
            cp = self.stack.enter_context(ControlPlanePeer(None))
            self.c = Compute()
            # The apply must stay blocked on the role's lock as long as the test holds it.
            self.c.args = ["-i", "compute-1", "-p", cp.url, "--control-plane-api", "2023", "--lock-timeout", "120"]
            self.c.env = {"NEON_CONSOLE_JWT": "console-jwt"}
            cp.spec = self.c.new_spec()
        else:
            self.c = Compute()
            self.c.spec = self.c.new_spec()
        self.stack.callback(self.c.close)
        self.c.start()
        self.rec = TreeRecord(self.c.proc.pid).keep_recording()
        self.stack.callback(self.rec.kill_survivors)
        self.stack.callback(self.rec.stop)
        c = self.c
        if self.moment == "starting":
            wait_for(lambda: any(p.comm == "initdb" for _, p in tree(c.proc.pid)), 60, "initdb to run", 0.01)
            self.rec.record()
            assert {"lifecycle", "initdb"} <= self.rec.roles(), self.rec.roles()
            return
        c.wait_status("running")
        if self.moment == "configuring":
            self.client = hold_role_lock(c)
        else:
            self.client = psycopg.connect(c.conninfo("appdb", "app", APP_PASSWORD))
        self.stack.callback(self.client.close)
        if self.moment == "api-restarting":
            # The api master killed, and the blow lands while its successor boots: before the
            # gunicorn master arms its parent-death signal (it imports the app first).
            sup = supervisord_pid(c.runtime_dir)
            old = program_child(sup, "api")
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: (n := program_child(sup, "api")) and n != old, 10, "a new api master", 0.002)
            self.rec.record()
            return
        if self.moment == "configuring":
            self.configure_call = self.pool.submit(configure, c, spec_with_app_password(c, "newpass"), 60)
            wait_for(lambda: blocked_apply_pids(c), 30, "the apply to block on the role's lock", 0.05)
            assert c.status()["status"] == "configuration"
        self.rec.record()
        assert EXPECTED_ROLES <= self.rec.roles(), self.rec.roles()

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.stack.close()


def assert_ports_free(c: Compute) -> None:
    assert not listening(c.http_port), f"the API port {c.http_port} is still listened on"
    assert not listening(c.pg_port), f"the postgres port {c.pg_port} is still listened on"


def stopped_at_exit(scene: Scene, action, timeout: float = 30, orderly: bool = True) -> tuple[int, float]:
    """Run `action`, wait for compute-ctl to exit, and require that nothing of the tree is left
    at that moment: compute-ctl exits only once every descendant is gone. `orderly`: supervisord
    stopped everything itself, compute-ctl's last resort had nothing to do."""
    c, rec = scene.c, scene.rec
    rec.record()
    t0 = time.monotonic()
    action()
    code = c.wait_exit(timeout)
    elapsed = time.monotonic() - t0
    rec.stop()
    left = rec.survivors()
    assert left == [], f"left behind when compute-ctl exited ({code}): {left}"
    assert_ports_free(c)
    if orderly:
        assert "outlived supervisord" not in c.output(), c.output()[-3000:]
    return code, elapsed


# -- kill -9 compute-ctl ---------------------------------------------------------------------

@pytest.mark.parametrize("moment", MOMENTS + ["api-restarting"])
def test_kill_9_compute_ctl_leaves_nothing_behind(moment):
    """compute-ctl is supervisord (one PID): every program and postgres get a parent-death
    signal and go on their own."""
    with Scene(moment) as s:
        # initdb may run before supervisord's loop has written its pid file (the driver is forked
        # first: compute/tree/early_driver.py)
        wait_for(lambda: os.path.exists(os.path.join(s.c.runtime_dir, "supervisord.pid")), 30,
                 "supervisord's pid file", 0.005)
        assert supervisord_pid(s.c.runtime_dir) == s.c.proc.pid
        s.rec.record()
        t0 = time.monotonic()
        os.kill(s.c.proc.pid, signal.SIGKILL)
        s.c.proc.wait()
        _, left = s.rec.wait_gone(3 * GONE_WITHIN)  # longer, to say what stayed and how long
        gone_after = time.monotonic() - t0
        print(f"\nkill -9 compute-ctl ({moment}): tree gone after {gone_after:.2f} s")
        assert left == [], f"still there {gone_after:.1f} s after kill -9 of compute-ctl: {left}"
        assert gone_after <= GONE_WITHIN, f"the tree took {gone_after:.2f} s to go"
        assert_ports_free(s.c)


# -- SIGTERM ---------------------------------------------------------------------------------

@pytest.mark.parametrize("moment", ["starting", "configuring"])  # running: test_fault_kill.py
def test_sigterm_leaves_nothing_behind(moment):
    with Scene(moment) as s:
        code, elapsed = stopped_at_exit(s, lambda: s.c.signal(signal.SIGTERM))
        print(f"\nSIGTERM ({moment}): compute-ctl exited {code} after {elapsed:.2f} s")
        assert code == 0
        if s.configure_call is not None:  # the blocked /configure ended (an answer or a closed socket)
            concurrent.futures.wait([s.configure_call], timeout=10)
            assert s.configure_call.done()


# -- /terminate ------------------------------------------------------------------------------

@pytest.mark.parametrize("moment", ["starting", "running", "configuring"])
def test_terminate_leaves_nothing_behind(moment):
    """running: the answer, then the tree ends with 0. starting (initdb runs: `init`) and
    configuring (`configuration`): Neon's rule, 412, nothing is stopped and the status stays;
    SIGTERM then ends the tree with nothing left behind."""
    with Scene(moment) as s:
        if moment != "running":
            status = {"starting": "init", "configuring": "configuration"}[moment]
            code, body = s.c.request("POST", "/terminate", timeout=30)
            assert (code, json.loads(body)) == (412, {"error": f"invalid compute status: {status}"})
            assert s.c.status()["status"] == status and s.c.proc.poll() is None
            code, elapsed = stopped_at_exit(s, lambda: s.c.signal(signal.SIGTERM))
            print(f"\n/terminate refused ({moment}), then SIGTERM: compute-ctl exited {code} after {elapsed:.2f} s")
            assert code == 0
            return
        answers = []
        code, elapsed = stopped_at_exit(
            s, lambda: answers.append(s.c.request("POST", "/terminate", timeout=30)))
        print(f"\n/terminate ({moment}): compute-ctl exited {code} after {elapsed:.2f} s")
        assert answers[0][0] == 200 and json.loads(answers[0][1])["terminated"] is True
        assert code == 0


def test_terminate_of_an_empty_compute_ends_it():
    """No spec yet, postgres never ran: /terminate answers (no LSN: no WAL was written), then
    the whole tree ends with 0 and leaves nothing behind (it used to keep running)."""
    with contextlib.ExitStack() as stack:
        cp = stack.enter_context(ControlPlanePeer(None, answer_status="empty"))
        c = Compute()
        c.args = ["-i", "compute-1", "-p", cp.url, "--control-plane-api", "2023"]
        c.env = {"NEON_CONSOLE_JWT": "console-jwt"}
        stack.callback(c.close)
        c.start()
        rec = TreeRecord(c.proc.pid).keep_recording()
        stack.callback(rec.kill_survivors)
        stack.callback(rec.stop)
        c.wait_status("empty")  # possibly from compute-ctl's early responder: wait for the api too
        wait_for(lambda: {"lifecycle", "api master", "api worker"} <= rec.record().roles(), 30,
                 "the api program", 0.02)
        code, body = c.request("POST", "/terminate", timeout=30)
        assert (code, json.loads(body)) == (200, {"terminated": True, "lsn": None})
        assert c.wait_exit(30) == 0
        rec.stop()
        assert rec.survivors() == [], f"left behind after /terminate of an empty compute: {rec.survivors()}"
        assert_ports_free(c)
        assert "postgres never ran" in c.output()


# -- postgres exits --------------------------------------------------------------------------

@pytest.mark.parametrize("moment,sig", [("configuring", signal.SIGKILL), ("running", signal.SIGQUIT)],
                         ids=["configuring-SIGKILL", "running-SIGQUIT"])  # running + SIGKILL: test_fault_kill.py
def test_postgres_exit_leaves_nothing_behind(moment, sig):
    with Scene(moment) as s:
        pm = s.c.postmaster_pid()
        code, elapsed = stopped_at_exit(s, lambda: os.kill(pm, sig))
        print(f"\npostmaster {signal.Signals(sig).name} ({moment}): compute-ctl exited {code} "
              f"after {elapsed:.2f} s")
        if sig == signal.SIGKILL:
            assert code != 0


# -- failed start ----------------------------------------------------------------------------

def missing_library(c: Compute) -> None:
    c.spec["cluster"]["settings"].append(
        {"name": "shared_preload_libraries", "value": "no_such_library", "vartype": "string"})


@pytest.mark.parametrize("break_it", [missing_library, "invalid pulled spec"],
                         ids=["missing-preload-library", "invalid-pulled-spec"])
def test_failed_start_leaves_nothing_behind(break_it):
    with contextlib.ExitStack() as stack:
        c = Compute()
        if break_it == "invalid pulled spec":
            cp = stack.enter_context(ControlPlanePeer(None))
            spec = c.new_spec()
            spec["cluster"]["roles"][0]["name"] = "x" * 70
            cp.spec = spec
            c.args = ["-i", "compute-1", "-p", cp.url, "--control-plane-api", "2023"]
        else:
            c.spec = c.new_spec()
            break_it(c)
        stack.callback(c.close)
        c.start()
        rec = TreeRecord(c.proc.pid).keep_recording()
        stack.callback(rec.kill_survivors)
        stack.callback(rec.stop)
        st = c.wait_status("failed")
        assert st["error"]
        code = c.wait_exit(30)
        rec.stop()
        assert code == 1
        assert "api master" in rec.roles(), rec.roles()
        assert rec.survivors() == [], f"left behind after a failed start: {rec.survivors()}"
        assert_ports_free(c)


# -- a driver killed while it applies a reconfiguration --------------------------------------

def test_lifecycle_killed_mid_reconfiguration_does_not_wedge():
    """The apply is held on a lock a spec role holds, the driver is killed with kill -9, the lock
    is released: the restarted driver ends the dead driver's session, applies the spec again,
    and the blocked /configure gets its answer. Status never stays `configuration`."""
    with contextlib.ExitStack() as stack:
        cp = stack.enter_context(ControlPlanePeer(None))
        c = Compute()
        c.args = ["-i", "compute-1", "-p", cp.url, "--control-plane-api", "2023", "--lock-timeout", "120"]  # blocked until released
        c.env = {"NEON_CONSOLE_JWT": "console-jwt"}
        cp.spec = c.new_spec()
        stack.enter_context(c)
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        c.wait_status("running")
        store = StateStore(state_path(c.runtime_dir))
        sup = supervisord_pid(c.runtime_dir)
        timings = []
        # How the role lets go: right after the kill, or once the new driver's apply waits too;
        # last, by committing its own change (the apply may then fail: an answer all the same).
        current = APP_PASSWORD
        for i, release in enumerate(["rollback", "rollback-after-reapply", "commit"]):
            password = f"pass-{i}"
            holder = hold_role_lock(c, current)
            call = pool.submit(configure, c, spec_with_app_password(c, password))
            ghost = wait_for(lambda: blocked_apply_pids(c), 30, "the apply to block on the role's lock", 0.05)
            old = program_child(sup, "lifecycle")
            t_kill = time.monotonic()
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: (n := program_child(sup, "lifecycle")) and n != old, 10, "a new lifecycle")
            # The dead driver's session, blocked on the lock, is ended by the new driver.
            wait_for(lambda: not (ghost & apply_pids(c)), 15, f"the dead driver's session {ghost} to end")
            if release == "rollback-after-reapply":
                wait_for(lambda: blocked_apply_pids(c) - ghost, 15, "the new driver's apply to block")
            assert not call.done() and store.get("status") in ("configuration", "configuration_pending")
            t_release = time.monotonic()
            if release == "commit":
                holder.commit()
            else:
                holder.rollback()
            holder.close()
            code, body = call.result(timeout=60)
            answered = time.monotonic() - t_release
            timings.append((release, time.monotonic() - t_kill, answered))
            status = c.status()["status"]
            assert status == ("running" if code == 200 else "failed"), (code, body, status)
            if release == "commit":
                assert code in (200, 500), (code, body)
            else:
                assert code == 200, body
                with psycopg.connect(c.conninfo("appdb", "app", password)):
                    pass  # the new spec's password took
                current = password
            assert answered < 30, f"/configure answered {answered:.1f} s after the lock was released"
        print("\n" + "; ".join(f"{r}: /configure answered {a:.2f} s after the release "
                               f"({k:.2f} s after the kill)" for r, k, a in timings))
        assert "the previous driver died while applying a new spec" in c.output()
