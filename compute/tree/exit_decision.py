"""What the tree does when postgres has ended: a pure decision, no I/O.

    decide_postgres_exit(statename, exitstatus, startup_done=..., shutdown_requested=...)
        -> ExitDecision(code, action)

`statename`/`exitstatus` are supervisord's getProcessInfo("postgres") fields. Actions:
- SHUT_DOWN: record `code` as the tree's exit code (first writer wins) and stop the tree.
- RECORD_START_FAILURE: postgres died while the compute was starting; only note `code`
  (as `postgres_exit_code`): the lifecycle driver reports the failure on /status for the
  grace period, then exits the tree with 1 itself.
Caller: exitwatch, the in-process handler inside supervisord (compute/tree/supervisord.py).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from enum import Enum


class ExitAction(str, Enum):
    SHUT_DOWN = "shut_down"
    RECORD_START_FAILURE = "record_start_failure"


@dataclass(frozen=True)
class ExitDecision:
    code: int
    action: ExitAction


def postgres_exit_code(statename: str | None, exitstatus: int | None) -> int:
    """postgres' exit status as the tree's: supervisord reports -1 for a process killed by a
    signal, and FATAL for one that never got going; the tree must fail in both."""
    if statename == "FATAL":
        return 1
    status = 1 if exitstatus is None else int(exitstatus)
    return 1 if status < 0 else status


def killed_by(wait_status: int | None) -> str | None:
    """The signal that ended a process, from its raw wait status, as "SIGKILL (signal 9)"; None
    when it exited by itself (supervisord keeps only -1 for any signal)."""
    if wait_status is None or not os.WIFSIGNALED(wait_status):
        return None
    number = os.WTERMSIG(wait_status)
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    hint = (": the kernel's OOM killer sends it when the container's memory limit is reached, "
            "an operator's kill -9 too") if number == signal.SIGKILL else ""
    return f"{name} (signal {number}){hint}"


def decide_postgres_exit(statename: str | None, exitstatus: int | None, *, startup_done: bool,
                         shutdown_requested: bool) -> ExitDecision:
    code = postgres_exit_code(statename, exitstatus)
    if shutdown_requested:
        code = 0  # /terminate: a wanted stop (an immediate shutdown exits non-zero)
    if not (startup_done or shutdown_requested):
        return ExitDecision(code, ExitAction.RECORD_START_FAILURE)
    return ExitDecision(code, ExitAction.SHUT_DOWN)


def terminate_without_postgres(status: str | None) -> int:
    """The tree's exit code when /terminate finds no postgres that ever ran (an `empty` compute
    waiting for its spec, or a start-up stuck before postgres): no postgres will end, so nothing
    else ends the tree. 0, a wanted stop; 1 when the start had already failed (what the driver
    would exit with after its grace period)."""
    return 1 if status == "failed" else 0


def postgres_has_ended(statename: str | None, *, postgres_started: bool) -> bool:
    """On a restart of the watcher: did postgres end while nobody listened? STOPPED counts only
    once the driver has started it (before that it is merely not started yet)."""
    if statename in ("EXITED", "FATAL"):
        return True
    return statename == "STOPPED" and postgres_started


def tree_exit_code(recorded: int | None, *, stopped_by_signal: bool, stopped_by_rpc: bool) -> int | None:
    """compute-ctl's own exit code once supervisord has stopped. None: nobody decided (an
    unexpected stop, the caller fails). A stop signal is a wanted stop: 0. The XML-RPC shutdown
    is also how the driver ends a failed start, after recording its code, so it only means 0
    when no code was recorded (the operator's `supervisorctl shutdown`)."""
    if stopped_by_signal:
        return 0
    if stopped_by_rpc and recorded is None:
        return 0
    return recorded


def hold_for_terminate(request_under_way: bool, live_waiters: int) -> bool:
    """Whether stopping the tree must wait for a /terminate: its request not answered yet (the
    driver may be running sync-safekeepers after the shutdown: the LSN must not be lost), or a
    live process still waiting to send the answer (a killed api worker's calls do not count).
    No linger beyond that (Neon lingers 30 s after a fast terminate: docs/api.md)."""
    return request_under_way or live_waiters > 0


def live_waiters(waiters, alive) -> int:
    """The calls still waiting for a /terminate answer in processes `alive(pid)` says exist."""
    if not isinstance(waiters, dict):
        return 0
    total = 0
    for pid, n in waiters.items():
        try:
            if alive(int(pid)):
                total += int(n)
        except (TypeError, ValueError):
            continue
    return total


HANDS_OVER = "lifecycle"  # the one program that exits 0 on purpose (compute/lifecycle/steps.py: hand over)


def counts_as_restart(program: str, exitstatus: int | None) -> bool:
    """Whether an EXITED program is a restart worth counting (`program_restarts`, /metrics):
    every exit but the driver's hand-over to a fresh driver (exit 0). A driver that fails
    exits non-zero; one stopped by supervisord is STOPPED, not EXITED."""
    return not (program == HANDS_OVER and exitstatus == 0)
