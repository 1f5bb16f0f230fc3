"""The lifecycle driver's decisions, as data: what a (re)started driver does next, given only
the state file and supervisord's view of postgres. No I/O here; compute.lifecycle executes.

The driver may be killed at any moment and restarted by supervisord, so every start of it
reads a `DriverView` and follows `plan_run(view)`:

| left behind by the killed driver                     | plan                                   |
|------------------------------------------------------|----------------------------------------|
| nothing started (waiting for a spec, or in storage:  | wait for spec, prepare data (PGDATA    |
|   sync-safekeepers / basebackup / initdb)            |   emptied first), start postgres, wait |
|                                                      |   ready, apply, mark running, hand over|
| postgres RUNNING/STARTING, start-up not finished     | wait for spec, wait ready, end the     |
|                                                      |   dead driver's sessions, apply, mark  |
|                                                      |   running, hand over                   |
| status `failed` (start-up failed, grace period)      | fail later (rest of the grace period)  |
| start-up done, status `configuration` (by driver)    | end its sessions, requeue, serve       |
| start-up done, status `configuration` (by /promote)  | serve (the API finishes the promotion) |
| start-up done, anything else                         | serve                                  |

Hand over: a driver that has done the start-up (basebackup, tar extraction, the catalog SQL)
exits 0 and supervisord forks a fresh one from the warm image, which plans `serve`. The start-up
wrote to (copied) much of the shared image it ran: private memory that a driver idle for the
compute's whole life would otherwise keep (docs/performance.md, "Figures behind the code"). The same after
each reconfiguration served (`serve` returns after applying one).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

POSTGRES_UP = ("RUNNING", "STARTING")  # supervisord states in which postgres is ours to reuse
PROMOTE = "promote"  # `configuring_by` while /promote holds status `configuration`


class Step(str, Enum):
    WAIT_FOR_SPEC = "wait_for_spec"          # stored, fetched (pull mode), or from /configure
    PREPARE_DATA = "prepare_data"            # empty PGDATA, then basebackup / initdb / clone
    START_POSTGRES = "start_postgres"        # supervisorctl start postgres
    WAIT_READY = "wait_ready"                # postmaster.pid says ready
    END_STALE_SESSIONS = "end_stale_sessions"  # a killed driver's apply sessions
    APPLY = "apply"                          # the spec's catalog SQL (idempotent)
    MARK_RUNNING = "mark_running"            # status running, startup_done
    REQUEUE_CONFIGURATION = "requeue_configuration"  # configuration -> configuration_pending
    SERVE = "serve"                          # wait for a reconfiguration, apply it, return
    HAND_OVER = "hand_over"                  # exit 0: supervisord forks a fresh driver
    FAIL_LATER = "fail_later"                # keep the error for the grace period, exit 1


@dataclass(frozen=True)
class DriverView:
    """What a starting driver knows: state-file fields and postgres' supervisord state."""
    status: str | None
    startup_done: bool = False
    postgres_state: str | None = None
    configuring_by: str | None = None


START_STEPS = (Step.PREPARE_DATA, Step.START_POSTGRES, Step.WAIT_READY)
RESUME_STEPS = (Step.WAIT_READY, Step.END_STALE_SESSIONS)
FINISH_STEPS = (Step.APPLY, Step.MARK_RUNNING, Step.HAND_OVER)
# The steps whose failure fails the start-up (status `failed`, then FAIL_LATER).
STARTUP_STEPS = frozenset({Step.WAIT_FOR_SPEC, *START_STEPS, *RESUME_STEPS, Step.APPLY, Step.MARK_RUNNING})


def plan_run(view: DriverView) -> tuple[Step, ...]:
    if view.startup_done:
        if view.status == "configuration" and view.configuring_by != PROMOTE:
            # Only the driver (or /promote, marked) sets `configuration`, and the driver always
            # leaves it: its predecessor died applying a spec. Apply it again.
            return (Step.END_STALE_SESSIONS, Step.REQUEUE_CONFIGURATION, Step.SERVE, Step.HAND_OVER)
        return (Step.SERVE, Step.HAND_OVER)
    if view.status == "failed":
        return (Step.FAIL_LATER,)
    if view.postgres_state in POSTGRES_UP:
        # The previous driver started postgres and died before the end: applying is idempotent.
        return (Step.WAIT_FOR_SPEC, *RESUME_STEPS, *FINISH_STEPS)
    return (Step.WAIT_FOR_SPEC, *START_STEPS, *FINISH_STEPS)


def idle(view: DriverView) -> bool:
    """Whether a starting driver has nothing to do until it is woken: the start-up is done, the
    plan is only to serve, and no reconfiguration waits. Such a driver (the one forked after
    every hand-over) waits for SIGUSR1 before it loads anything (compute.lifecycle: each
    object it touches is a page copied from the warm image)."""
    return plan_run(view) == (Step.SERVE, Step.HAND_OVER) and not wants_reconfiguration(view.status)


def wants_reconfiguration(status: str | None) -> bool:
    """In SERVE: a /configure (or /promote) has handed over a spec to apply."""
    return status == "configuration_pending"


def grace_remaining(failed_at: float | None, grace_seconds: float, now: float) -> float:
    """Seconds the error stays on /status before the tree exits (a restarted driver only
    finishes what its predecessor began)."""
    return max(0.0, (now if failed_at is None else failed_at) + grace_seconds - now)


class Readiness(str, Enum):
    READY = "ready"
    WAIT = "wait"
    DIED = "died"
    TIMED_OUT = "timed_out"


def readiness(postmaster_status: str | None, postgres_state: str | None, elapsed: float,
              timeout: float) -> Readiness:
    """One look at a starting postgres. `postgres_state` None: not asked this time."""
    if postmaster_status == "ready":
        return Readiness.READY
    if elapsed > timeout:
        return Readiness.TIMED_OUT
    if postgres_state is not None and postgres_state not in POSTGRES_UP:
        return Readiness.DIED
    return Readiness.WAIT
