"""supervisord eventlistener: decides when the tree ends, and with which exit code.

- postgres EXITED / STOPPED / FATAL: look for core dumps in PGDATA (log a gdb backtrace of
  each), record postgres' exit code as the tree's, then ask supervisord to shut down.
  (supervisord itself always exits 0; compute-ctl exits with the recorded code.)
- any other program EXITED: counted in `program_restarts` (served by /metrics).
- vm-informant or postgres-exporter EXITED: started again about 5 s later (supervisord would
  restart it at once).
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import threading
import time
import xmlrpc.client

from . import exit_decision, settings
from .listener import events
from .procutil import die_with_parent
from .logs import setup_program_logging
from .state import StateStore, state_path
from .supervision import rpc, shutdown_tree

log = logging.getLogger("compute.exitwatch")

VM_INFORMANT = "vm-informant"
POSTGRES_EXPORTER = "postgres-exporter"
RESTARTED_LATER = (VM_INFORMANT, POSTGRES_EXPORTER)  # companions: never in a tight restart loop
INFORMANT_RESTART_DELAY = 5.0
TERMINATE_ANSWER_WAIT = 60.0
SHUTDOWN_STATE = 6  # supervisor.xmlrpc.Faults.SHUTDOWN_STATE
POSTGRES_END_STATES = ("PROCESS_STATE_EXITED", "PROCESS_STATE_STOPPED", "PROCESS_STATE_FATAL")


def postgres_exit_code(info: dict) -> int:
    """supervisord reports -1 for a process killed by a signal; the tree must still fail."""
    return exit_decision.postgres_exit_code(info.get("statename"), info.get("exitstatus", 1))


def log_core_dumps(pgdata: str, pgbin: str) -> None:
    for core in sorted(glob.glob(os.path.join(pgdata, "core*"))):
        log.error("postgres left a core dump: %s", core)
        try:
            out = subprocess.run(["gdb", "--batch", "-q", "-ex", "bt", pgbin, core],
                                 capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                log.error("backtrace: %s", line)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("could not get a backtrace of %s: %s", core, e)


class ExitWatch:
    def __init__(self, runtime_dir: str):
        self.runtime_dir = runtime_dir
        self.store = StateStore(state_path(runtime_dir))
        self.settings = settings.load(self.store)

    def on_event(self, eventname: str, payload: dict[str, str]) -> None:
        name = payload.get("processname", "")
        if name == "postgres" and eventname in POSTGRES_END_STATES:
            self.postgres_ended(eventname)
        elif eventname == "PROCESS_STATE_EXITED":
            self.count_exit(name)
            if name in RESTARTED_LATER:
                self.restart_later(name)

    def postgres_ended(self, eventname: str) -> None:
        try:
            info = rpc(self.runtime_dir).supervisor.getProcessInfo("postgres")
        except xmlrpc.client.Fault as e:
            if e.faultCode == SHUTDOWN_STATE:
                return  # supervisord is already taking the tree down (SIGTERM, /terminate)
            raise
        flags = self.store.get_many(("startup_done", "shutdown_requested"))
        decision = exit_decision.decide_postgres_exit(
            info.get("statename"), info.get("exitstatus", 1),
            startup_done=bool(flags["startup_done"]), shutdown_requested=bool(flags["shutdown_requested"]))
        code = decision.code
        if decision.action is exit_decision.ExitAction.RECORD_START_FAILURE:
            # A failed start: the driver reports it on /status for the grace period, then exits 1.
            log.warning("postgres exited during start-up (%s, exit status %s)",
                        info.get("statename"), info.get("exitstatus"))
            self.store.set(postgres_exit_code=code)
            return
        log.info("postgres is down (%s, exit status %s): stopping the compute with exit code %d",
                 info.get("statename"), info.get("exitstatus"), code)
        if self.settings is not None:
            log_core_dumps(self.settings.pgdata, self.settings.pgbin)
        self.store.set_once("exit_code", code)
        self.shutdown()

    def shutdown(self) -> None:
        # In a thread: the event must be acknowledged, and supervisord stops us too.
        threading.Thread(target=self._shutdown_after_terminate, daemon=True).start()

    def _shutdown_after_terminate(self, timeout: float = TERMINATE_ANSWER_WAIT) -> None:
        """A /terminate still finding its LSN (pg_controldata, sync-safekeepers) gets its answer
        out before the api program is stopped."""
        deadline = time.monotonic() + timeout
        while self.store.get("terminate_pending") and time.monotonic() < deadline:
            time.sleep(0.02)
        shutdown_tree(self.runtime_dir)

    def count_exit(self, name: str) -> None:
        restarts = self.store.get("program_restarts") or {}
        restarts[name] = restarts.get(name, 0) + 1
        self.store.set(program_restarts=restarts)
        log.warning("%s exited; supervisord restarts it", name)

    def restart_later(self, name: str, delay: float = INFORMANT_RESTART_DELAY) -> None:
        def start() -> None:
            try:
                rpc(self.runtime_dir).supervisor.startProcess(name, False)
            except (OSError, xmlrpc.client.Fault) as e:
                log.warning("could not restart %s: %s", name, e)
        t = threading.Timer(delay, start)
        t.daemon = True
        t.start()

    def recover(self) -> None:
        """After our own restart: events missed while we were down must not be lost."""
        try:
            infos = {i["name"]: i for i in rpc(self.runtime_dir).supervisor.getAllProcessInfo()}
        except (OSError, xmlrpc.client.Fault):
            return
        pg = infos.get("postgres")
        if pg and exit_decision.postgres_has_ended(pg["statename"],
                                                   postgres_started=bool(self.store.get("postgres_started"))):
            self.postgres_ended("recovered")
        for name in RESTARTED_LATER:
            info = infos.get(name)
            if info and info["statename"] in ("EXITED", "FATAL", "BACKOFF"):
                self.restart_later(name)


def main() -> None:
    die_with_parent()
    setup_program_logging()
    watch = ExitWatch(os.environ["COMPUTE_RUNTIME_DIR"])
    started = False
    for headers, payload, _ in events():
        if not started:  # the first READY is answered once supervisord is serving
            started = True
            threading.Thread(target=watch.recover, daemon=True).start()
        try:
            watch.on_event(headers["eventname"], payload)
        except Exception:  # never die on one bad event: we are the tree's exit path
            log.exception("handling %s", headers.get("eventname"))
            time.sleep(0.1)


if __name__ == "__main__":
    main()
