"""Exit decisions, as an in-process event handler inside supervisord (compute.tree.supervisord
subscribes it through supervisor's `events.subscribe`; no listener process, no RPC).

- postgres EXITED / STOPPED / FATAL: look for core dumps in PGDATA (log a gdb backtrace of
  each, gdb running as a short-lived child whose end is polled), record postgres' exit code as
  the tree's, then shut supervisord down. (compute-ctl exits with the recorded code.)
- any other program EXITED: counted in `program_restarts` (served by /metrics), but for the
  driver's hand-over to a fresh driver (exit 0: compute/lifecycle/steps.py).
- vm-informant or postgres-exporter EXITED: started again about 5 s later (supervisord would
  restart it at once).
- the state file lost (removed, replaced, truncated: compute.shared.state.StateFileLost), seen
  within STATE_CHECK_PERIOD: one line, exit code 1, the tree stops (postgres: fast shutdown).
  Without the state file nothing can drive the compute (no /configure, /terminate, no
  last_active): it ends, visibly, rather than serve on with a stale or empty state.
  Whatever the state file does, postgres' exit still ends the tree with its code: the
  decision then uses what is known without the file (the start done, no /terminate), and the
  code is also kept here, in memory (`exit_code`), for compute-ctl to exit with.
- the monitor stops ticking (its `monitor_tick` in the state file does not move for
  monitor_watch.stall_after(--monitor-interval) seconds): SIGKILL, counted in
  `monitor_stall_restarts`; supervisord starts a new one.

Every handler runs on supervisord's loop: nothing here may block it. What must wait (a gdb run,
a /terminate still writing its answer, a delayed restart) is a timer on `Timers`, which the
loop's poller runs when due.
"""

from __future__ import annotations

import glob
import heapq
import itertools
import logging
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from typing import Callable

from supervisor import events
from supervisor.states import ProcessStates, SupervisorStates, getProcessStateDescription

from compute.tree import exit_decision, monitor_watch, reaper
from compute.model import launch
from compute.base.procutil import dies_with_us
from compute.shared import driver_requests
from compute.shared.state import StateFileLost, StateStore, state_path

log = logging.getLogger("compute.tree.exitwatch")

VM_INFORMANT = "vm-informant"
MONITOR = "monitor"
POSTGRES_EXPORTER = "postgres-exporter"
RESTARTED_LATER = (VM_INFORMANT, POSTGRES_EXPORTER)  # companions: never in a tight restart loop
INFORMANT_RESTART_DELAY = 5.0
TERMINATE_ANSWER_WAIT = 60.0
TERMINATE_POLL = 0.02
GDB_TIMEOUT = 60.0
GDB_POLL = 0.05
STATE_CHECK_PERIOD = 0.5  # seconds between two looks at the state file's identity
EXIT_STATE_LOST = 1
POSTGRES_END_STATES = ("PROCESS_STATE_EXITED", "PROCESS_STATE_STOPPED", "PROCESS_STATE_FATAL")
STARTABLE = (ProcessStates.EXITED, ProcessStates.STOPPED, ProcessStates.FATAL, ProcessStates.BACKOFF)


# Raw wait statuses of the children supervisord reaped, by pid (compute.tree.supervisord's
# waitpid hook notes them): supervisord itself keeps -1 for any signal, we want its name.
_wait_statuses: dict[int, int] = {}


def note_wait_status(pid: int, status: int) -> None:
    _wait_statuses[pid] = status
    if len(_wait_statuses) > 64:  # only the latest matter (postgres' is read as it is reaped)
        del _wait_statuses[next(iter(_wait_statuses))]


def process_alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed api worker not reaped yet); one
    whose main thread has exited but not every thread is alive (reaper.read_proc)."""
    p = reaper.read_proc(pid)
    return p is not None and p.state not in ("Z", "X", "")


def postgres_exit_code(info: dict) -> int:
    """supervisord reports -1 for a process killed by a signal; the tree must still fail."""
    return exit_decision.postgres_exit_code(info.get("statename"), info.get("exitstatus", 1))


class Timers:
    """Callbacks due at a monotonic time, run by supervisord's loop (compute.tree.supervisord's poller
    shortens its wait to the next one). Single-threaded: no locks."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (self.clock() + delay, next(self._seq), fn))

    def next_in(self) -> float | None:
        """Seconds until the next timer is due (0 if overdue), None when there is none."""
        return max(0.0, self._heap[0][0] - self.clock()) if self._heap else None

    def run_due(self) -> None:
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # a timer must never take supervisord down
                log.exception("timer %r failed", fn)


class CoreDumpReport:
    """Logs a gdb backtrace of each core* file in PGDATA, one gdb child at a time, then calls
    `then`. gdb's output goes to an unnamed file: nothing to drain while it runs."""

    def __init__(self, pgdata: str, pgbin: str, timers: Timers, then: Callable[[], None]):
        self.cores = sorted(glob.glob(os.path.join(pgdata, "core*"))) if pgdata else []
        self.pgbin, self.timers, self.then = pgbin, timers, then
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._next()

    def _next(self) -> None:
        if not self.cores:
            self.then()
            return
        core = self.cores.pop(0)
        log.error("postgres left a core dump: %s", core)
        out = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(["gdb", "--batch", "-q", "-ex", "bt", self.pgbin, core],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=dies_with_us, close_fds=True)
        except OSError as e:
            out.close()
            log.error("could not get a backtrace of %s: %s", core, e)
            self.timers.call_later(0, self._next)
            return
        self._poll(core, proc, out, time.monotonic() + GDB_TIMEOUT)

    def _poll(self, core: str, proc: subprocess.Popen, out, deadline: float) -> None:
        # supervisord's reap() may collect gdb first: Popen then sees ECHILD and reports 0.
        if proc.poll() is None:
            if time.monotonic() < deadline:
                self.timers.call_later(GDB_POLL, lambda: self._poll(core, proc, out, deadline))
                return
            log.error("could not get a backtrace of %s: gdb timed out after %.0f s", core, GDB_TIMEOUT)
            proc.kill()
        with out:
            out.seek(0)
            for line in out.read().decode("utf-8", "replace").splitlines():
                log.error("backtrace: %s", line)
        self._next()


class ExitWatch:
    def __init__(self, supervisord, runtime_dir: str, timers: Timers):
        self.supervisord = supervisord
        self.runtime_dir = runtime_dir
        self.timers = timers
        self.store = StateStore(state_path(runtime_dir))
        self.exit_code: int | None = None  # ours, in memory: the state file may be gone
        self.state_lost = False
        try:
            self.settings = launch.require(self.store)
        except sqlite3.Error as e:  # lost before the loop ran: watch_state_file stops the tree
            log.debug("no launch settings: %s", e)
            self.settings = None

    # -- supervisord's side --------------------------------------------------------------
    def subscribe(self) -> None:
        events.subscribe(events.ProcessStateEvent, self.handle)

    def handle(self, event) -> None:
        """supervisord calls this synchronously from its own state changes: never raise."""
        try:
            self.on_event(events.getEventNameByType(type(event)),
                          {"processname": event.process.config.name})
        except Exception:  # we are the tree's exit path: never die on one bad event
            log.exception("handling %s", type(event).__name__)

    def _process(self, name: str):
        group = self.supervisord.process_groups.get(name)
        return group.processes.get(name) if group else None

    def shutting_down(self) -> bool:
        return self.supervisord.options.mood < SupervisorStates.RUNNING

    def process_info(self, name: str) -> dict | None:
        """What supervisorctl's getProcessInfo says; None once supervisord is shutting down
        (SIGTERM, /terminate: it is already taking the tree down)."""
        proc = self._process(name)
        if proc is None or self.shutting_down():
            return None
        return {"statename": getProcessStateDescription(proc.get_state()),
                "exitstatus": proc.exitstatus or 0}

    # -- decisions -------------------------------------------------------------------------
    def on_event(self, eventname: str, payload: dict[str, str]) -> None:
        name = payload.get("processname", "")
        if name == "postgres" and eventname in POSTGRES_END_STATES:
            self.postgres_ended(eventname)
        elif eventname == "PROCESS_STATE_EXITED":
            proc = self._process(name)
            if exit_decision.counts_as_restart(name, proc.exitstatus if proc is not None else None):
                self.count_exit(name)
            if name in RESTARTED_LATER:
                self.restart_later(name)

    def postgres_ended(self, eventname: str) -> None:
        info = self.process_info("postgres")
        if info is None:
            return  # supervisord is already taking the tree down (SIGTERM, /terminate)
        proc = self._process("postgres")
        signalled = exit_decision.killed_by(_wait_statuses.pop(proc.pid, None) if proc and proc.pid else None)
        if signalled:
            log.error("postgres was killed by %s", signalled)
        try:
            flags = self.store.get_many(("startup_done", "shutdown_requested"))
        except sqlite3.Error as e:
            # The state file is lost or unreadable: decide from what is known without it (the
            # start done, no /terminate), never drop the event (the tree would outlive postgres).
            log.error("postgres ended and the state file cannot be read (%s): deciding without it", e)
            flags = {"startup_done": True, "shutdown_requested": False}
        decision = exit_decision.decide_postgres_exit(
            info.get("statename"), info.get("exitstatus", 1),
            startup_done=bool(flags["startup_done"]), shutdown_requested=bool(flags["shutdown_requested"]))
        code = decision.code
        if decision.action is exit_decision.ExitAction.RECORD_START_FAILURE:
            # A failed start: the driver reports it on /status for the grace period, then exits 1.
            log.warning("postgres exited during start-up (%s, exit status %s)",
                        info.get("statename"), info.get("exitstatus"))
            try:
                self.store.set(postgres_exit_code=code)
            except sqlite3.Error as e:  # the driver cannot fail the start without it: we stop
                log.error("could not record postgres' exit (%s): stopping the compute", e)
                self.record_exit(EXIT_STATE_LOST)
                self.supervisord.options.mood = SupervisorStates.SHUTDOWN
            return
        log.info("postgres is down (%s, exit status %s): stopping the compute with exit code %d",
                 info.get("statename"), info.get("exitstatus"), code)

        def stop() -> None:
            self.record_exit(code)
            self.shutdown()
        if self.settings is None:
            stop()
            return
        CoreDumpReport(self.settings.pgdata, self.settings.pgbin, self.timers, stop).start()

    def record_exit(self, code: int) -> None:
        """The tree's exit code, first writer wins: in the state file (the driver may have
        written one) and here in memory, which compute-ctl uses when the file is unreadable."""
        if self.exit_code is None:
            self.exit_code = code
        try:
            self.store.set_once("exit_code", code)
        except sqlite3.Error as e:
            log.debug("exit code %d kept in memory only: %s", code, e)

    def watch_state_file(self, period: float = STATE_CHECK_PERIOD) -> None:
        """Every `period`, from the loop: is the state file still the one compute-ctl created
        (StateStore.check: one stat)? Lost: one line, exit code 1, stop the tree."""
        def check() -> None:
            if self.shutting_down():
                return
            try:
                self.store.check()
            except StateFileLost as e:
                self.state_lost = True
                log.error("%s: the compute cannot be driven without it; stopping it (exit code %d)",
                          e, EXIT_STATE_LOST)
                self.record_exit(EXIT_STATE_LOST)
                self.supervisord.options.mood = SupervisorStates.SHUTDOWN
                return
            self.timers.call_later(period, check)
        self.timers.call_later(0, check)

    def terminate_without_postgres(self) -> None:
        """/terminate found no postgres that ever ran: end the tree once its answer is out."""
        code = exit_decision.terminate_without_postgres(self.store.get("status"))
        log.info("terminate requested and postgres never ran: stopping the compute with exit code %d", code)
        self.record_exit(code)
        self.shutdown()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the tree once no /terminate holds it (exit_decision.hold_for_terminate): the
        driver finishing its answer (sync-safekeepers after the shutdown), or calls still
        sending theirs. Bounded: a driver that never answers does not keep the tree up."""
        if timeout is None:
            timeout = max(TERMINATE_ANSWER_WAIT, (self.settings.attempt_deadline if self.settings else 0) + 30)
        deadline = time.monotonic() + timeout

        def check() -> None:
            try:
                v = self.store.get_many(("terminate", driver_requests.WAITERS))
                hold = exit_decision.hold_for_terminate(
                    driver_requests.under_way(v["terminate"]),
                    exit_decision.live_waiters(v[driver_requests.WAITERS], process_alive))
            except Exception as e:  # the state file busy or gone: do not hold the tree up on it
                log.warning("cannot read the /terminate waiters: %s", e)
                hold = False
            if hold and time.monotonic() < deadline:
                self.timers.call_later(TERMINATE_POLL, check)
            else:
                self.supervisord.options.mood = SupervisorStates.SHUTDOWN
        check()

    def count_exit(self, name: str) -> None:
        restarts = self.store.get("program_restarts") or {}
        restarts[name] = restarts.get(name, 0) + 1
        self.store.set(program_restarts=restarts)
        log.warning("%s exited; supervisord restarts it", name)

    def restart_later(self, name: str, delay: float = INFORMANT_RESTART_DELAY) -> None:
        def start() -> None:
            proc = self._process(name)
            if proc is None or self.shutting_down() or proc.get_state() not in STARTABLE:
                return  # gone, going down, or started meanwhile (supervisorctl start)
            proc.spawn()
        self.timers.call_later(delay, start)

    def watch_monitor(self) -> None:
        """Every check period, from the loop: is the monitor still ticking (monitor_watch)?"""
        interval = self.settings.monitor_interval if self.settings else launch.default("monitor_interval")
        threshold, period = monitor_watch.stall_after(interval), monitor_watch.check_period(interval)
        seen: monitor_watch.Progress | None = None

        def check() -> None:
            nonlocal seen
            if self.shutting_down():
                return  # the tree is going down: nothing to restart
            self.timers.call_later(period, check)
            proc = self._process(MONITOR)
            running = proc is not None and proc.get_state() == ProcessStates.RUNNING and proc.pid
            try:
                tick = self.store.get("monitor_tick")
            except Exception as e:  # the state file busy or gone: no decision this time
                log.debug("could not read the monitor's tick: %s", e)
                return
            seen, stalled = monitor_watch.observe(seen, proc.pid if running else None, tick,
                                                  time.monotonic(), threshold)
            if stalled:
                self.restart_stalled_monitor(proc.pid, threshold)
        self.timers.call_later(period, check)

    def restart_stalled_monitor(self, pid: int, threshold: float) -> None:
        log.warning("monitor stopped ticking (no tick for %.1f s): killing it (pid %d); supervisord "
                    "starts a new one", threshold, pid)
        try:
            os.kill(pid, signal.SIGKILL)  # works on a stopped process too
        except ProcessLookupError:
            return
        restarts = int(self.store.get("monitor_stall_restarts") or 0) + 1
        self.store.set(monitor_stall_restarts=restarts)
