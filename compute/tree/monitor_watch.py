"""Is the activity monitor still ticking? Pure decisions for the exit watcher (issue 21, item 5).

The monitor (compute/programs/monitor.py) records the wall time of each finished tick in the state file
(`monitor_tick`). A monitor that stops ticking (SIGSTOPped, deadlocked, stuck outside its
bounded waits) would leave `last_active` frozen while /metrics says it runs: a control plane
would suspend a busy compute. supervisord's loop looks at the tick every `check_period` and,
when neither the tick nor the monitor's pid has changed for `stall_after(interval)` seconds of
its own monotonic clock (a wall-clock step changes nothing), SIGKILLs the monitor; supervisord
starts a new one at once (autorestart).

The threshold: a healthy monitor finishes a tick every `interval` plus the tick's own duration,
and a tick waits on postgres for at most TICK_BOUND seconds (monitor.py: a connect over the
unix socket, then over TCP, CONNECT_TIMEOUT each, and a query, QUERY_TIMEOUT: 2 + 2 + 6 s), so
one waiting on a stalled postgres is never taken for a stopped one. Two intervals of slack on
top: 11 s at the default 0.5 s, detected within one more check period (1 s there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TICK_BOUND = 10.0  # seconds: >= 2 * monitor.CONNECT_TIMEOUT + monitor.QUERY_TIMEOUT (unit-tested)


def stall_after(interval: float) -> float:
    """Seconds without a new tick after which a running monitor is taken as stopped."""
    return TICK_BOUND + 2 * max(0.05, float(interval))


def check_period(interval: float) -> float:
    """How often supervisord's loop looks at the tick: every two intervals, between 0.2 s and
    1 s (once a second at the default: about as often as supervisord's own idle turn)."""
    return min(1.0, max(0.2, 2 * float(interval)))


@dataclass(frozen=True)
class Progress:
    """What the watcher last saw: the monitor's pid, its tick, and since when (monotonic)."""
    pid: int | None
    tick: Any
    since: float


def observe(seen: Progress | None, pid: int | None, tick: Any, now: float,
            threshold: float) -> tuple[Progress, bool]:
    """The watcher's new view, and whether the monitor (pid) is to be killed as stopped.
    A new pid, or a monitor that is not running (pid None), starts the count again; so does
    a kill (the next decision comes a whole threshold later, whatever supervisord does)."""
    if pid is None or seen is None or seen.pid != pid or seen.tick != tick:
        return Progress(pid, tick, now), False
    if now - seen.since > threshold:
        return Progress(pid, tick, now), True
    return seen, False
