"""supervisord with prompt restarts, run by compute-ctl in its own process (`run(conf)`: one
PID for the life of the compute), or standalone: `python -m compute.tree.supervisord -n -c CONF`.

supervisord 4.3's main loop is poll(timeout=1 s) -> transition() -> reap(). A SIGCHLD does not
end the poll (PEP 475 retries it), and a program reaped at the end of one turn is respawned by
the transition() of the next one: a crashed program comes back 1-2 s later. Here any signal
ends the poll (signal.set_wakeup_fd), and a turn that reaped a child is followed by another at
once, so a crashed program is respawned within milliseconds. Idle cost: none.

While it shuts down, a turn waits at most SHUTDOWN_TICK: supervisord stops one priority group
per turn, and nobody may be left to poke its control socket (compute-ctl killed outright: our
parent-death signal is what started the shutdown).

At the first start the lifecycle driver runs already (forked by compute-ctl before this loop,
adopted at its first spawn: compute/tree/early_driver.py). Until it has exited (the start-up's
hand-over) or for at most early_driver.FORKED_PROGRAMS_HELD_AT_MOST after the loop started,
supervisord neither warms the forked programs' image nor autostarts them (api, monitor): the
start-up's critical path (the driver, postgres' spawn) has the CPU and the loop to itself. Then
the whole image is imported in one step before the first of them (or the hand-over's driver) is
forked. Exec'd programs (postgres) never wait for it.

The tree's event handlers run here, in-process (no eventlistener processes): exit decisions
(compute/tree/exitwatch.py) and the log relay (compute/tree/logrelay.py) are subscribed to supervisor's
event bus once supervisord has set it up, and their timers run on this loop: a turn waits at
most until the next one is due. One is periodic: exitwatch's look at the monitor's progress
(a monitor that stops ticking is killed and restarted: compute/tree/monitor_watch.py), once a second
at the default --monitor-interval. The relay arms one when it had to drop lines (the loop never
waits for stdout's reader: compute/base/stdout_buffer.py), to publish their count for /metrics.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import signal
import sqlite3
import time

from supervisor import options, poller, process, rpcinterface, supervisord
from supervisor.states import ProcessStates, SupervisorStates
from supervisor.xmlrpc import Faults, RPCError

from compute.model import launch
from compute.tree import early_driver, warmfork
from compute.api.listener import api_fds
from compute.tree.exitwatch import ExitWatch, Timers, note_wait_status
from compute.tree.logrelay import DroppedLines, LogRelay, setup_relay_logging
from compute.shared.state import StateStore, runtime_dir_from_env
from compute.base.trace import mark
from compute.base.procutil import COMPUTE_CTL_PID_ENV, SUPERVISORD_PID_ENV, die_with_parent

log = logging.getLogger("compute.boot.cli")

SHUTDOWN_TICK = 0.05
# The signals that stop supervisord, and what its stop of a program sends (stopsignal TERM or
# INT; QUIT in gunicorn's terms).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# What asked supervisord to stop, in order: a signal, or the operator's `supervisorctl shutdown`
# (STOP_BY_RPC). Either is a wanted stop: the tree exits 0, not as a failure.
stop_signals: list[int] = []
STOP_BY_RPC = 0
TIMERS = Timers()  # the in-process handlers' timers, run by PromptPoller


class PromptPoller(poller.PollPoller):
    def initialize(self) -> None:
        super().initialize()
        self.again = True  # the first turn starts the programs at once, not after a 1 s poll
        self._wake_r, wake_w = os.pipe()  # close-on-exec: children never see it
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        self._poller.register(self._wake_r, select.POLLIN)
        signal.set_wakeup_fd(wake_w)  # a byte per signal (SIGCHLD), whatever the handler

    def poll(self, timeout):
        if self.again:
            self.again, timeout = False, 0
        elif self.options.mood < SupervisorStates.RUNNING:
            timeout = min(timeout, SHUTDOWN_TICK)
        due = TIMERS.next_in()
        if due is not None:
            timeout = min(timeout, due)
        readables, writables = super().poll(timeout)
        TIMERS.run_due()
        if self._wake_r in readables:
            readables.remove(self._wake_r)
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        return readables, writables


_waitpid = options.ServerOptions.waitpid


def _waitpid_then_turn_again(self):
    pid, sts = _waitpid(self)
    if pid and sts is not None:
        note_wait_status(pid, sts)  # exitwatch names the signal that killed postgres
        early_driver.note_exited(pid)  # the early driver's exit ends the start-up's hold
    if pid and isinstance(self.poller, PromptPoller):
        self.poller.again = True  # the next transition() respawns it: do not wait 1 s for it
    return pid, sts


_get_signal = options.ServerOptions.get_signal


def _get_signal_noting_stops(self):
    sig = _get_signal(self)
    if sig == signal.SIGHUP:
        # supervisord would restart every program in place, postgres included: a compute only
        # ever starts fresh (new PGDATA, new basebackup), so a reload has nothing right to do.
        log.warning("received SIGHUP: ignored (a compute does not reload or restart in place; "
                    "/configure changes the spec, SIGTERM stops the compute)")
        return None
    if sig in STOP_SIGNALS:
        if not stop_signals:
            log.info("received %s: fast shutdown of postgres, then the tree", signal.Signals(sig).name)
        stop_signals.append(sig)
    return sig


class ComputeRPCInterface(rpcinterface.SupervisorNamespaceRPCInterface):
    """supervisor's own RPC namespace, minus the in-place restart (`supervisorctl reload`): for
    the same reason as SIGHUP above. Loaded from supervisord.conf's [rpcinterface:supervisor]."""

    def restart(self):
        self._update("restart")
        raise RPCError(Faults.FAILED, "compute-ctl does not restart in place: stop the compute "
                                      "(supervisorctl shutdown, SIGTERM) and start a new one")

    def shutdown(self):
        result = super().shutdown()  # refuses (SHUTDOWN_STATE) when already stopping
        if not stop_signals:
            log.info("supervisorctl shutdown: fast shutdown of postgres, then the tree")
        stop_signals.append(STOP_BY_RPC)
        return result


    def stopAfterTerminate(self):
        """For the api's /terminate when postgres never ran (nothing else would end the tree):
        stop the tree once the answer is out, with exit_decision.terminate_without_postgres'
        code. Reachable, like `shutdown`, only through the control socket."""
        self._update("stopAfterTerminate")
        if _watch is None:
            raise RPCError(Faults.FAILED, "the exit watcher is not running yet")
        _watch.terminate_without_postgres()
        return True


def make_rpcinterface(supervisord_) -> ComputeRPCInterface:
    return ComputeRPCInterface(supervisord_)


_fork = options.ServerOptions.fork
open_stores: list = []  # our state-db handles: closed before every fork (SQLite after fork only)


def _fork_without_open_stores(self):
    """supervisord's fork of a program. The stop signals are blocked across the fork and the
    child sets them to their default action before it lets them in: until the program installs
    its own handlers (warmfork.run_forked, postgres' exec) the child has supervisord's Python
    handlers, and a SIGTERM from a shutdown that came while it was being spawned (a SIGTERM of
    compute-ctl right after the start) was swallowed by supervisord's copy in the child: the
    program ran on until stopwaitsecs and a SIGKILL (its initdb or workers left to the group
    kill and compute-ctl's reaper). Blocked, the signal waits in the child and stops it."""
    for store in open_stores:
        store.close()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pid = _fork(self)
        if pid == 0:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # the child: a pending stop signal ends it here
    return pid


_spawn = process.Subprocess.spawn


def _forked(proc) -> bool:
    """Whether supervisord forks this program from the warm image (else it execs it)."""
    try:
        filename, argv = proc.get_execv_args()
    except process.ProcessException:
        return False  # spawn reports it
    return warmfork.forked_module(filename, argv) is not None


def _spawn_warm(self):
    """The first start's driver is adopted (forked before this loop ran); a forked program is
    forked from the warm image, imported just before the first of them; an exec'd one
    (postgres: the start-up's critical path) is spawned at once, nothing warmed for it."""
    if self.config.name == early_driver.PROGRAM and early_driver.pending():
        return early_driver.adopt(self)  # forked by compute-ctl before this loop ran
    if _forked(self):
        stopping = functools.partial(stop_pending, self.config.options)
        if stopping() or not warmfork.warm_for(self.config.name, stopping):
            # This turn ends with the stop (Supervisor.handle_signal, after the transitions):
            # no warm-up, nor a fork, ahead of it for a program it would stop at once. Its
            # state stays as it was (STOPPED, EXITED): no later turn starts it, the tree is stopping.
            return None
    return _spawn(self)


def stop_pending(options_) -> bool:
    """A stop signal that supervisord has received and not acted on yet: its handler only
    records it (supervisor.options.SignalReceiver, pinned 4.3.0), the loop reads it at the
    end of its turn."""
    return any(sig in STOP_SIGNALS for sig in options_.signal_receiver._signals_recvd)


_transition = process.Subprocess.transition
_loop_started: float | None = None  # time.monotonic() when the loop started


def _start_up_over() -> bool:
    since_loop = 0.0 if _loop_started is None else time.monotonic() - _loop_started
    return early_driver.start_up_over(early_driver.start_up_running(), since_loop)


def _transition_holding_autostart(self):
    """supervisor's per-turn transition of a program, minus the autostart (STOPPED, never
    started) of a forked program (not the driver: its first spawn adopts the early one) while
    the first start's early driver runs its start-up (early_driver.start_up_over): the warm-up
    (~200 ms of CPU, in this loop) and the forks would delay postgres' spawn behind them and
    compete with the driver's imports and storage request on our 2 cores. An explicit start
    (supervisorctl start api) is not a transition: it still spawns, and warms, at once. Nothing
    else happens to a STOPPED program in a transition."""
    if (self.state == ProcessStates.STOPPED and not self.laststart and self.config.autostart
            and self.config.name != early_driver.PROGRAM and not _start_up_over() and _forked(self)):
        return None
    return _transition(self)


_close_fd = options.ServerOptions.close_fd


_api_fds: tuple[int, ...] = ()  # compute-ctl's API sockets (compute/api/listener.py), set by run()


def _close_fd_but_api_socket(self, fd):
    """supervisord closes fds 3.. in every child it forks: not the API socket. The child's
    execve (warmfork) decides who keeps it: the api alone."""
    if fd not in _api_fds:
        _close_fd(self, fd)


_runforever = supervisord.Supervisor.runforever


def _runforever_with_handlers(self):
    """Supervisor.run() clears the event bus just before this: subscribe now."""
    global _loop_started
    install_handlers(self, runtime_dir_from_env())
    mark("supervisord: loop")
    _loop_started = time.monotonic()
    if early_driver.start_up_running():  # a turn when the hold ends, if the driver has not exited
        TIMERS.call_later(early_driver.FORKED_PROGRAMS_HELD_AT_MOST, lambda: None)
    early_driver.replay_held_signals()  # a stop asked for before supervisord had its handlers
    return _runforever(self)


_watch: ExitWatch | None = None  # for ComputeRPCInterface.stopAfterTerminate


def install_handlers(supervisor, runtime_dir: str) -> ExitWatch:
    global _watch
    watch = _watch = ExitWatch(supervisor, runtime_dir, TIMERS)
    fmt = watch.settings.log_format if watch.settings else launch.default("log_format")
    dropped = DroppedLines(watch.store, TIMERS)
    setup_relay_logging(fmt, on_drop=dropped.noticed)
    LogRelay(fmt, on_drop=dropped.noticed).subscribe()
    dropped.noticed()  # lines the bootstrap may have dropped before the loop ran
    watch.subscribe()
    watch.watch_monitor()
    watch.watch_state_file()
    open_stores.append(watch.store)
    return watch


def run(conf: str | None = None) -> int | None:
    """supervisord's loop in this process, until it has stopped every program. Returns the
    signal (SIGTERM, SIGINT, SIGQUIT) that asked it to stop, or STOP_BY_RPC for `supervisorctl
    shutdown`; None if something else did (exitwatch after postgres exited)."""
    global _api_fds
    os.environ[SUPERVISORD_PID_ENV] = str(os.getpid())  # the programs' own check (procutil)
    if not early_driver.pending():  # else the driver runs already, importing its own modules
        mark("supervisord: warming")
        warmfork.warm_early()  # the rest just before the first program that needs it (_spawn_warm)
        mark("supervisord: warm (early)")
    options.ServerOptions.execve = warmfork.execve
    options.ServerOptions.fork = _fork_without_open_stores
    process.Subprocess.spawn = _spawn_warm
    process.Subprocess.transition = _transition_holding_autostart
    _api_fds = api_fds()
    options.ServerOptions.close_fd = _close_fd_but_api_socket
    poller.Poller = PromptPoller
    options.ServerOptions.waitpid = _waitpid_then_turn_again
    options.ServerOptions.get_signal = _get_signal_noting_stops
    supervisord.Supervisor.runforever = _runforever_with_handlers
    supervisord.main(["-n", "-c", conf] if conf else None)
    return stop_signals[0] if stop_signals else None


def recorded_exit_code(path: str) -> int | None:
    """The tree's exit code once the loop has ended: the state file's (first writer wins,
    the driver's failed start included); when the file is lost or unreadable, the one exitwatch
    kept in memory."""
    code = None
    try:
        store = StateStore(path)
        try:
            code = store.get("exit_code")
        finally:
            store.close()
    except sqlite3.Error as e:
        log.error("cannot read the exit code from the state file: %s", e)
    if code is None and _watch is not None:
        code = _watch.exit_code
    return code


def main() -> None:
    # compute-ctl killed outright (even before this line): shut the tree down in order.
    die_with_parent(signal.SIGTERM, parent_env=COMPUTE_CTL_PID_ENV)
    run()


if __name__ == "__main__":
    main()
