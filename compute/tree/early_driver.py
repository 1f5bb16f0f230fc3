"""The lifecycle driver, forked by compute-ctl before supervisord runs; supervisord adopts it
as its `lifecycle` program (issue 22: exec -> first storage request).

Until now the driver was supervisord's first spawn, ~350 ms after exec on this VM: compute-ctl
imported supervisor and the driver's modules, parsed supervisord.conf and entered the loop
first. None of that is needed to start `postgres --sync-safekeepers` or initdb. So once
everything is validated, the two directories are prepared and root is dropped (nothing is
touched before the last check), compute-ctl forks the driver at once, as supervisord would
fork it: its own process group, stdin and stdout+stderr on pipes, every other fd closed,
supervisord's environment for the program (`program_environment`), comm `lifecycle`. The
driver starts the storage request before it imports anything heavy (compute/lifecycle/early.py)
and says so on a pipe. Meanwhile compute-ctl writes supervisord.conf and creates the state
file, and sends the driver the file's identity on another pipe (`state_file_ready`: the driver
reads the state file only after that, compute/base/forkinfo.py wait_for_state_file); then it
waits for the request's start (at most READY_WAIT, `wait_request_started`) and becomes
supervisord while the request runs. At its first spawn of `lifecycle`
supervisord takes this process over instead of forking one (`adopt`): the pipes become the
program's dispatchers, the pid its pid, and from there on it is the program like any other
(stopped as a group, restarted when it exits, its lines relayed).

One owner on every path: the driver is compute-ctl's child from the fork on, with a
parent-death signal; a stop signal that reaches compute-ctl before supervisord's loop is kept
(`hold_stop_signals`) and handed to supervisord as soon as it has its handlers, which then
stops the adopted driver in order; a bootstrap that fails after the fork (the state file
cannot be created, supervisord refuses its conf) stops it (`stop_unadopted`) before exiting 1;
the driver itself exits 1 when the pipe closes without the state file's word.
"""

from __future__ import annotations

import configparser
import fcntl
import os
import select
import signal
import time
from dataclasses import dataclass

from compute.base import forkinfo
from compute.base.trace import mark

PROGRAM = "lifecycle"
MODULE = "compute.lifecycle.driver"  # the program's command: `python -m compute.lifecycle.driver`
ENTRY = "compute.lifecycle.early:main"  # what the early fork runs: the storage request first
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
MAX_FD = 1 << 20
# How long compute-ctl waits for the driver's storage request to start before importing
# supervisor and the warm image: those would otherwise take the CPU the request needs (on a
# busy machine, the request came 150-250 ms after the fork instead of 30-50).
READY_WAIT = 0.1
# How long after its loop started supervisord holds back the forked programs (api, monitor) and
# their warm image while the early driver still runs its start-up (`start_up_over`). The start-up
# normally ends well before (hand-over ~0.4 s after the loop on this VM); a long basebackup must
# not leave the tree without its api: meanwhile the early responder answers /status & co. and
# holds every other request (compute/boot/early_responder.py) until the api takes them, so
# nothing is refused, only answered later.
FORKED_PROGRAMS_HELD_AT_MOST = 1.0


@dataclass
class EarlyDriver:
    pid: int
    stdin: int   # our end of its stdin pipe
    stdout: int  # our end of its stdout+stderr pipe
    ready: int | None = None        # the pipe it writes once its storage request is started
    state_ready: int | None = None  # the pipe we write once the state file exists (state_file_ready)


_pending: EarlyDriver | None = None
_start_up_pid: int | None = None  # the early driver until it exits (hand-over, failure, kill)
held_signals: list[int] = []  # stop signals that came before supervisord had its handlers


def pending() -> bool:
    return _pending is not None


def start_up_running() -> bool:
    """Whether the early driver (adopted or not) has not exited yet."""
    return _start_up_pid is not None


def note_exited(pid: int) -> None:
    """supervisord reaped `pid`: when it is the early driver, the start-up is over."""
    global _start_up_pid
    if pid == _start_up_pid:
        _start_up_pid = None


def start_up_over(driver_running: bool, since_loop: float, *,
                  held_at_most: float = FORKED_PROGRAMS_HELD_AT_MOST) -> bool:
    """Whether supervisord may warm up and autostart the forked programs (api, monitor): once
    the early driver has exited (it does at the hand-over, right when the status is running, or
    when it dies), or at the latest `held_at_most` seconds after supervisord's loop started.
    Without an early driver (standalone, or its fork failed) at once. With a JWKS too: compute-ctl's
    early responder answers a token holder's /status & co. itself, with the api's own decision
    (compute/boot/early_responder.py), so nobody polling the start waits for the api."""
    return not driver_running or since_loop >= held_at_most


def _conf_environment(conf: str, section: str) -> dict[str, str]:
    """A section's `environment=` as supervisord reads it: `%%` (our renderer's escape of `%`,
    compute/tree/supervisord_conf.py) expanded, then supervisor.datatypes.dict_of_key_value_pairs'
    reading, line for line (importing supervisor here would cost the early fork ~30 ms)."""
    import shlex
    parser = configparser.RawConfigParser()
    parser.read_string(conf)
    text = parser.get(section, "environment", fallback="").replace("%%", "%")
    lexer = shlex.shlex(text)
    lexer.wordchars += "/.+-():"
    tokens = list(lexer)
    out, i = {}, 0
    while i < len(tokens):
        k_eq_v = tokens[i:i + 3]
        if len(k_eq_v) != 3 or k_eq_v[1] != "=":
            raise ValueError(f"[{section}] environment: unexpected end of key/value pairs")
        out[k_eq_v[0]] = k_eq_v[2].strip("'\"")
        i += 4
    return out


def program_environment(environ: dict[str, str], conf: str, server_url: str) -> dict[str, str]:
    """What supervisord gives the lifecycle program (supervisor.process.Subprocess.
    _spawn_as_child): its own environment, its SUPERVISOR_* variables, the [supervisord]
    section's environment, the program's own (tests/unit/test_early_driver.py checks this
    against supervisord's own reading of a rendered conf)."""
    return {**environ, "SUPERVISOR_ENABLED": "1", "SUPERVISOR_SERVER_URL": server_url,
            "SUPERVISOR_PROCESS_NAME": PROGRAM, "SUPERVISOR_GROUP_NAME": PROGRAM,
            **_conf_environment(conf, "supervisord"), **_conf_environment(conf, f"program:{PROGRAM}")}


def _held(signum, _frame) -> None:
    held_signals.append(signum)


def hold_stop_signals() -> None:
    """From the fork until supervisord has its handlers: a stop signal is kept, not acted on
    (compute-ctl would die at once, before the driver it forked is stopped)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _held)


def replay_held_signals() -> None:
    """In supervisord, once its handlers are installed: the kept stop signals, in order."""
    while held_signals:
        signal.raise_signal(held_signals.pop(0))


def fork_driver(env: dict[str, str], python: str) -> EarlyDriver:
    """Fork the lifecycle driver now (module docstring); the child never returns. The state
    file need not exist yet: the driver waits for `state_file_ready` before it reads it
    (compute/base/forkinfo.py wait_for_state_file), and starts its storage request meanwhile."""
    global _pending, _start_up_pid
    from compute.tree.warmfork import run_forked
    child_stdin, stdin = os.pipe()
    stdout, child_stdout = os.pipe()
    ready_r, ready_w = os.pipe()
    state_r, state_w = os.pipe()
    for fd in (stdin, stdout):  # as supervisord's own pipes (supervisor.options.make_pipes)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NDELAY)
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgrp()
            os.dup2(child_stdin, 0)
            os.dup2(child_stdout, 1)
            os.dup2(child_stdout, 2)
            # the API socket, the responder's, our pipes' other ends; not the two the driver keeps
            close_all_but((ready_w, state_r))
            forkinfo.forked_early = True
            forkinfo.early_ready_fd = ready_w
            forkinfo.state_ready_fd = state_r
            run_forked(MODULE, [python, "-m", MODULE], env, entry=ENTRY)
        finally:
            os._exit(127)
    mark("compute-ctl: lifecycle forked early")
    for fd in (child_stdin, child_stdout, ready_w, state_r):
        os.close(fd)
    _pending = EarlyDriver(pid, stdin, stdout, ready=ready_r, state_ready=state_w)
    _start_up_pid = pid
    return _pending


def close_all_but(keep: tuple[int, ...], first: int = 3) -> None:
    """Close every fd from `first` up (to MAX_FD) but those in `keep`."""
    low = first
    for fd in sorted(k for k in keep if k >= first):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, MAX_FD)


def state_file_ready(environ: dict[str, str]) -> None:
    """The state file exists: tell the early driver, with the variables that came with it (its
    identity, compute/shared/state.py STATE_ID_ENV), which it adds to its environment. Nothing to
    do without an early driver (its fork failed: supervisord forks it, with them)."""
    early = _pending
    if early is None or early.state_ready is None:
        return
    fd, early.state_ready = early.state_ready, None
    try:
        os.write(fd, "".join(f"{k}={v}\n" for k, v in environ.items()).encode())
    except OSError:  # it is gone: supervisord reaps it and starts `lifecycle` again
        pass
    finally:
        os.close(fd)


def wait_request_started() -> None:
    """Until the driver says its storage request is started (at most READY_WAIT): then
    supervisor's imports and the warm image, which would otherwise take the CPU the request
    needs (on a busy machine, the request came 150-250 ms after the fork instead of 30-50)."""
    early = _pending
    if early is None:
        return  # no early driver (its fork failed): supervisord forks it from the warm image
    if early.ready is not None:
        fd, early.ready = early.ready, None
        try:  # bounded; the responder thread answers meanwhile
            select.select([fd], [], [], READY_WAIT)
        finally:
            os.close(fd)
    from compute.tree.warmfork import defer_driver_modules
    defer_driver_modules()


def adopt(process) -> int:
    """supervisord's spawn of the `lifecycle` program (supervisor.process.Subprocess.spawn),
    for the driver forked early: the same bookkeeping, no fork. A driver that has exited
    meanwhile is reaped by supervisord's next turn and restarted as any program is."""
    global _pending
    from supervisor.states import ProcessStates
    early, _pending = _pending, None
    assert early is not None
    options = process.config.options
    process.killing = False
    process.spawnerr = None
    process.exitstatus = None
    process.system_stop = False
    process.administrative_stop = False
    process.laststart = time.time()
    process._assertInState(ProcessStates.EXITED, ProcessStates.FATAL, ProcessStates.BACKOFF,
                           ProcessStates.STOPPED)
    process.change_state(ProcessStates.STARTING)
    pipes = {"child_stdin": None, "stdin": early.stdin, "stdout": early.stdout, "child_stdout": None,
             "stderr": None, "child_stderr": None}
    options.make_pipes = lambda stderr=True: pipes  # the dispatchers read the early driver's pipes
    try:
        process.dispatchers, process.pipes = process.config.make_dispatchers(process)
    finally:
        del options.make_pipes
    mark("supervisord: lifecycle adopted")
    return process._spawn_as_parent(early.pid)


def stop_unadopted(wait: float = 5.0) -> bool:
    """A bootstrap that fails after the fork: the driver's process group (with the storage
    request it started) is stopped and waited for. True when there was one to stop (the caller
    then reaps what it left: initdb runs in a session of its own)."""
    global _pending, _start_up_pid
    early, _pending, _start_up_pid = _pending, None, None
    if early is None:
        return False
    for sig, grace in ((signal.SIGTERM, wait), (signal.SIGKILL, wait)):
        try:
            os.killpg(early.pid, sig)
        except ProcessLookupError:
            break
        ends = time.monotonic() + grace
        while time.monotonic() < ends:
            if os.waitpid(early.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.01)
        else:
            continue
        break
    for fd in (early.stdin, early.stdout, early.ready, early.state_ready):
        if fd is not None:
            os.close(fd)
    return True
