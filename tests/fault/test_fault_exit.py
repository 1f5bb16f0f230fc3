"""Every exit path leaves nothing behind (issue 9, section 5).

Each path ends a booted tree at different moments: while the lifecycle driver runs initdb
(`starting`), running with a client session open (`running`), in pull mode with a /configure
in flight whose apply is blocked on a lock a spec role holds (`configuring`: a gunicorn worker
thread and a postgres backend are busy), right after the api master was killed, while its
successor boots (`api-restarting`: the kills only), and while the api master forks worker after
worker, each killed as soon as it appears (`worker-respawning`: the kills only; a worker forked
after the last look at the tree is in the master's process group). The tree's processes are recorded from
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
import threading
import time

import psycopg
import pytest

from compute.shared.state import StateStore, state_path
from tests.peers.control_plane import ControlPlanePeer
from tests.support.exit_paths import TreeRecord, listening, port_report
from tests.support.fault_tree import alive, program_child, supervisord_pid, tree
from tests.support.tree import Compute, with_initdb_that_waits
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

    def __init__(self, moment: str, initdb_waits: bool = False):
        self.moment = moment
        self.initdb_waits = initdb_waits  # starting: initdb waits (never released) until the tree ends
        self.stack = contextlib.ExitStack()
        self.pool = concurrent.futures.ThreadPoolExecutor(2)
        self.configure_call = None
        self.client: psycopg.Connection | None = None
        self.c: Compute
        self.rec: TreeRecord
        self.stop_killing = threading.Event()
        self.killer: threading.Thread | None = None
        self.workers_killed = 0

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
            if self.initdb_waits and self.moment == "starting":
                with_initdb_that_waits(self.c)
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
        c.wait_serving()  # the api and the monitor come once the start-up is over
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
        if self.moment == "worker-respawning":
            # The api master forks worker after worker: each is killed as soon as it is seen,
            # until the blow (before_blow), which lands while the master reaps and forks again.
            sup = supervisord_pid(c.runtime_dir)
            master = program_child(sup, "api")
            self.killer = threading.Thread(target=self._kill_workers_of, args=(master,), daemon=True)
            self.killer.start()
            self.stack.callback(self.before_blow)
            wait_for(lambda: self.workers_killed >= 3, 30, "three api workers killed and forked again", 0.01)
            self.rec.record()
            assert {"lifecycle", "monitor", "api master", "api worker"} <= self.rec.roles(), self.rec.roles()
            return
        if self.moment == "configuring":
            self.configure_call = self.pool.submit(configure, c, spec_with_app_password(c, "newpass"), 60)
            wait_for(lambda: blocked_apply_pids(c), 30, "the apply to block on the role's lock", 0.05)
            assert c.status()["status"] == "configuration"
        self.rec.record()
        assert EXPECTED_ROLES <= self.rec.roles(), self.rec.roles()

    def _kill_workers_of(self, master: int) -> None:
        killed: set[int] = set()
        while not self.stop_killing.is_set():
            for _, p in tree(self.c.proc.pid):
                if p.ppid == master and p.state != "Z" and p.pid not in killed and not self.stop_killing.is_set():
                    self.rec.record()  # as the test would have seen it: the worker's role noted
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
                    killed.add(p.pid)
                    self.workers_killed += 1
            time.sleep(0.002)

    def before_blow(self) -> None:
        """Just before the blow: the test's own killing stops (what is left must go by itself)."""
        self.stop_killing.set()
        if self.killer is not None:
            self.killer.join(10)

    def __exit__(self, *exc) -> None:
        self.before_blow()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.stack.close()


def assert_ports_free(c: Compute) -> None:
    for what, port in (("API", c.http_port), ("postgres", c.pg_port)):
        if listening(port):  # say who holds it (the report is read before anything else moves)
            report = port_report(port)
            assert not listening(port), f"the {what} port {port} is still listened on; {report}"


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

@pytest.mark.parametrize("moment", MOMENTS + ["api-restarting", "worker-respawning"])
def test_kill_9_compute_ctl_leaves_nothing_behind(moment):
    """compute-ctl is supervisord (one PID): every program and postgres get a parent-death
    signal and go on their own."""
    with Scene(moment) as s:
        # initdb may run before supervisord's loop has written its pid file (the driver is forked
        # first: compute/tree/early_driver.py)
        pidfile = os.path.join(s.c.runtime_dir, "supervisord.pid")
        wait_for(lambda: os.path.exists(pidfile) and open(pidfile).read().strip(), 30,
                 "supervisord's pid in its pid file", 0.005)
        assert supervisord_pid(s.c.runtime_dir) == s.c.proc.pid
        s.before_blow()
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


def test_kill_9_compute_ctl_frees_the_api_port_before_the_request_in_flight_ends():
    """After kill -9 of compute-ctl with a /configure in flight, the api master stops (its
    parent-death signal) and its worker stops accepting: the worker closes its listening
    socket at once, while it still gives the request in flight its grace period. The port
    used to stay listened on until the master killed the worker (graceful_timeout later), and
    then as long as the worker's last thread took to exit: a process whose main thread has
    exited reads as a zombie in /proc/PID/stat while its other threads still hold its
    descriptors, so the port outlived everything the tree's /proc showed alive."""
    with Scene("configuring") as s:
        s.rec.record()
        workers = [pid for (pid, _), role in s.rec.members.items() if role == "api worker" and alive(pid)]
        assert workers, s.rec.members
        os.kill(s.c.proc.pid, signal.SIGKILL)
        s.c.proc.wait()
        wait_for(lambda: not listening(s.c.http_port), 3 * GONE_WITHIN, "the API port to be released", 0.002)
        still = [pid for pid in workers if alive(pid)]
        assert still, "the api worker was gone before the API port was released"
        _, left = s.rec.wait_gone(3 * GONE_WITHIN)
        assert left == [], f"still there after kill -9 of compute-ctl: {left}"
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


def test_sigterm_as_the_programs_are_spawned_stops_each_on_its_sigterm():
    """SIGTERM of compute-ctl the moment the last program (the monitor) is forked: supervisord
    stops everything on its next turn, so that program gets its SIGTERM in its first
    milliseconds. A program forked from compute-ctl used to have supervisord's Python
    handlers until it installed its own, and swallowed that SIGTERM: it ran on until
    stopwaitsecs and supervisord's SIGKILL (`starting` took 2.4 s instead of 0.2 s in half the
    runs). Now nothing needs a SIGKILL and nothing is left."""
    with contextlib.ExitStack() as stack:
        c = Compute()
        c.spec = c.new_spec()
        stack.callback(c.close)
        c.start()
        rec = TreeRecord(c.proc.pid).keep_recording()
        stack.callback(rec.kill_survivors)
        stack.callback(rec.stop)
        sup = c.proc.pid  # compute-ctl is supervisord

        def children() -> list[str]:  # the kernel's list, cheaper than a walk of /proc
            with open(f"/proc/{sup}/task/{sup}/children") as f:
                return f.read().split()
        # lifecycle, api, monitor: the third is being spawned (still supervisord's code in it)
        wait_for(lambda: len(children()) >= 3, 60, "the third program to be forked", 0.0005)
        c.signal(signal.SIGTERM)
        rec.record()
        code = c.wait_exit(30)
        rec.stop()
        assert code == 0
        assert rec.survivors() == [], f"left behind after SIGTERM: {rec.survivors()}"
        assert_ports_free(c)
        with open(os.path.join(c.runtime_dir, "logs", "supervisord.log")) as f:
            log = f.read()
        assert "with SIGKILL" not in log, log[-3000:]
        assert "outlived supervisord" not in c.output(), c.output()[-3000:]


def test_sigterm_during_the_warm_up_stops_the_tree_without_finishing_it():
    """SIGTERM while supervisord imports the programs' warm image (~300 ms of CPU, right after
    the start-up's hand-over, in its loop): it looks for a stop between two of the image's
    modules, forks nothing more and stops the tree. Before, the signal waited for the whole
    image and the api's and monitor's forks (the bench's SIGTERM -> exit: ~620 ms)."""
    from compute.base.trace import read
    with contextlib.ExitStack() as stack:
        c = Compute()
        c.spec = c.new_spec()
        trace = os.path.join(c.base, "trace")
        os.close(os.open(trace, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(trace, 0o666)  # appended to by the tree as the compute user
        c.env["COMPUTE_TRACE"] = trace
        stack.callback(c.close)
        c.start()
        rec = TreeRecord(c.proc.pid).keep_recording()
        stack.callback(rec.kill_survivors)
        stack.callback(rec.stop)
        wait_for(lambda: any(e == "supervisord: warming (all)" for _, _, e in read(trace)), 90,
                 "supervisord's warm-up", 0.0005)
        c.signal(signal.SIGTERM)
        signalled = time.monotonic()  # the trace's clock
        rec.record()
        code = c.wait_exit(30)
        exited = time.monotonic()
        rec.stop()
        assert code == 0
        assert rec.survivors() == [], f"left behind after SIGTERM: {rec.survivors()}"
        assert_ports_free(c)
        events = read(trace)
    cut = [t for t, _, e in events if e == "supervisord: warm-up cut short (stopping)"]
    warm = [t for t, _, e in events if e == "supervisord: warm (all)"]
    # Cut short; or it had ended before the signal came (a fast machine, or a slow test)
    assert cut or (warm and warm[0] < signalled), events[-12:]
    if cut:
        assert not warm, "warmed after all"
        forked = [e for t, _, e in events if e.endswith(": forked") and t > signalled]
        assert forked == [], f"forked after the stop: {forked}"
    print(f"\nSIGTERM during the warm-up: {'cut short' if cut else 'the warm-up had ended'}, "
          f"exit 0 {1000 * (exited - signalled):.0f} ms after the signal")


# -- /terminate ------------------------------------------------------------------------------

@pytest.mark.parametrize("moment", ["starting", "running", "configuring"])
def test_terminate_leaves_nothing_behind(moment):
    """running: the answer, then the tree ends with 0. starting (initdb runs: `init`) and
    configuring (`configuration`): Neon's rule, 412, nothing is stopped and the status stays;
    SIGTERM then ends the tree with nothing left behind."""
    with Scene(moment, initdb_waits=True) as s:  # starting: still `init` when /terminate comes
        if moment != "running":
            status = {"starting": "init", "configuring": "configuration"}[moment]
            if moment == "starting":  # the api is held back until the start-up is over: an operator's start
                # initdb runs before supervisord's loop (the early driver): wait for its socket
                s.c.program_pid("lifecycle")
                r = s.c.supervisorctl("start", "api")
                # started, or already (the hold on it ran out: early_driver.FORKED_PROGRAMS_HELD_AT_MOST)
                assert r.returncode == 0 or "api: ERROR (already started)" in r.stdout, r.stdout + r.stderr
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
        # The api comes once supervisord's hold on it runs out (the failed driver lives through
        # the grace): a grace long enough for it to be seen in the tree on a loaded machine.
        c.args += ["--grace-seconds", "6"]
        stack.callback(c.close)
        c.start()
        rec = TreeRecord(c.proc.pid).keep_recording()
        stack.callback(rec.kill_survivors)
        stack.callback(rec.stop)
        st = c.wait_status("failed")
        assert st["error"]
        wait_for(lambda: "api master" in rec.roles(), 30, "the api master in the tree", 0.05)
        code = c.wait_exit(30)
        rec.stop()
        assert code == 1
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
            st = c.status()
            # a 500 too: a catalog apply that failed half-way leaves the compute running (issue 19 item 1)
            assert st["status"] == "running", (code, body, st)
            if code != 200:
                assert st["error"] == body["error"], (code, body, st)
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
