"""The lifecycle driver's decisions, as data: what a (re)started driver does next, given only
the state file and supervisord's view of postgres. No I/O here; compute.lifecycle.driver executes.

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
| start-up done, status `configuration`, a promotion   | promote (again: it finds out how far   |
|   requested or begun                                 |   the dead driver got), serve          |
| start-up done, status `configuration`, no promotion  | end its sessions, requeue, serve       |
| start-up done, anything else                         | serve                                  |
| a /terminate for the driver, not yet answered        | terminate (again), wait to be stopped  |
| a /terminate answered, or one the API carries out    | wait to be stopped (postgres is never  |
|   (postgres never ran: compute/shared/driver_requests.py)   |   started again)                       |

A /terminate that arrives while a plan runs does not wait for it: `concurrent_step` says the
driver runs it at once, beside the step in progress (a basebackup, the catalog SQL).

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
# Phases of the driver's requests (compute/shared/driver_requests.py, the records' `phase`).
REQUESTED, STARTED = "requested", "started"
UNDER_WAY = (REQUESTED, STARTED)


class DriverStep(str, Enum):
    WAIT_FOR_SPEC = "wait_for_spec"          # stored, fetched (pull mode), or from /configure
    PREPARE_DATA = "prepare_data"            # empty PGDATA, then basebackup / initdb / clone
    START_POSTGRES = "start_postgres"        # supervisorctl start postgres
    WAIT_READY = "wait_ready"                # postmaster.pid says ready
    END_STALE_SESSIONS = "end_stale_sessions"  # a killed driver's apply sessions
    APPLY = "apply"                          # the spec's catalog SQL (idempotent)
    MARK_RUNNING = "mark_running"            # status running, startup_done
    REQUEUE_CONFIGURATION = "requeue_configuration"  # configuration -> configuration_pending
    PROMOTE = "promote"                      # wait for replay, pg_promote(), hand the spec over
    TERMINATE = "terminate"                  # stop postgres, find the LSN, answer
    WAIT_FOR_STOP = "wait_for_stop"          # the tree is being stopped: do nothing more
    SERVE = "serve"                          # wait for a reconfiguration, apply it, return
    RECONFIGURE = "reconfigure"              # in SERVE: apply the spec /configure handed over
    CATALOG_REQUESTS = "catalog_requests"    # in SERVE: the internal port's /grants, /extensions
    HAND_OVER = "hand_over"                  # exit 0: supervisord forks a fresh driver
    FAIL_LATER = "fail_later"                # keep the error for the grace period, exit 1


@dataclass(frozen=True)
class DriverView:
    """What a starting driver knows: state-file fields and postgres' supervisord state."""
    status: str | None
    startup_done: bool = False
    postgres_state: str | None = None
    promotion: str | None = None    # the `promotion` record's phase
    termination: str | None = None  # driver_requests.termination_phase: a phase, "tree" or None
    lease: bool = False             # a Static compute keeps an LSN lease (compute.lifecycle.lease_keeper)
    catalog_requests: bool = False  # internal-port requests wait (driver_requests.CatalogRequest)


START_STEPS = (DriverStep.PREPARE_DATA, DriverStep.START_POSTGRES, DriverStep.WAIT_READY)
RESUME_STEPS = (DriverStep.WAIT_READY, DriverStep.END_STALE_SESSIONS)
FINISH_STEPS = (DriverStep.APPLY, DriverStep.MARK_RUNNING, DriverStep.HAND_OVER)
# The steps whose failure fails the start-up (status `failed`, then FAIL_LATER).
STARTUP_STEPS = frozenset({DriverStep.WAIT_FOR_SPEC, *START_STEPS, *RESUME_STEPS, DriverStep.APPLY, DriverStep.MARK_RUNNING})


def plan_run(view: DriverView) -> tuple[DriverStep, ...]:
    if view.termination in UNDER_WAY:
        return (DriverStep.TERMINATE, DriverStep.WAIT_FOR_STOP)
    if view.termination is not None:
        return (DriverStep.WAIT_FOR_STOP,)
    if view.startup_done:
        if view.status == "configuration":
            if view.promotion in UNDER_WAY:
                # /promote claimed the compute, or the previous driver died promoting it.
                return (DriverStep.PROMOTE, DriverStep.SERVE, DriverStep.HAND_OVER)
            # The driver always leaves `configuration`: its predecessor died applying a spec.
            return (DriverStep.END_STALE_SESSIONS, DriverStep.REQUEUE_CONFIGURATION, DriverStep.SERVE, DriverStep.HAND_OVER)
        return (DriverStep.SERVE, DriverStep.HAND_OVER)
    if view.status == "failed":
        return (DriverStep.FAIL_LATER,)
    if view.postgres_state in POSTGRES_UP:
        # The previous driver started postgres and died before the end: applying is idempotent.
        return (DriverStep.WAIT_FOR_SPEC, *RESUME_STEPS, *FINISH_STEPS)
    return (DriverStep.WAIT_FOR_SPEC, *START_STEPS, *FINISH_STEPS)


class EarlyRequest(str, Enum):
    """The storage request a driver starts before it imports the rest of itself."""
    SYNC_SAFEKEEPERS = "sync_safekeepers"  # `postgres --sync-safekeepers` (its conf written first)
    INITDB = "initdb"                      # the embedded default


def early_request(view: DriverView, source: str | None, sync_safekeepers: bool) -> EarlyRequest | None:
    """What a freshly forked driver starts at once (compute/lifecycle/early.py), before it loads
    psycopg, the basebackup and the catalog code (~100+ ms of imports that then overlap the
    request): the first storage request of a plan that prepares PGDATA, when it is a subprocess.
    `source`, `sync_safekeepers`: the stored spec's modes.plan_start (source None: no spec is
    stored yet: pull mode fetches it first, an `empty` compute waits for one). None: nothing
    early (a resumed or finished start-up, a terminate, a basebackup or a clone first: those
    need libpq)."""
    if view.postgres_state not in (None, "STOPPED") or source is None:
        return None
    if plan_run(view)[:2] != (DriverStep.WAIT_FOR_SPEC, DriverStep.PREPARE_DATA):
        return None
    if source == "initdb":
        return EarlyRequest.INITDB
    if source == "pageserver" and sync_safekeepers:
        return EarlyRequest.SYNC_SAFEKEEPERS
    return None


def concurrent_step(view: DriverView) -> DriverStep | None:
    """A request that must not wait for the plan in progress: a /terminate for the driver."""
    return DriverStep.TERMINATE if view.termination in UNDER_WAY else None


def pending_request(view: DriverView) -> DriverStep | None:
    """In SERVE: the request to carry out now, if any (a terminate first)."""
    if view.termination in UNDER_WAY:
        return DriverStep.TERMINATE
    if view.termination is not None:
        return DriverStep.WAIT_FOR_STOP
    if view.status == "configuration" and view.promotion in UNDER_WAY:
        return DriverStep.PROMOTE
    if view.catalog_requests:
        return DriverStep.CATALOG_REQUESTS
    if wants_reconfiguration(view.status):
        return DriverStep.RECONFIGURE
    return None


def idle(view: DriverView) -> bool:
    """Whether a starting driver has nothing to do until it is woken: the start-up is done, the
    plan is only to serve, and no reconfiguration waits (or the tree is being stopped). Such a
    driver (the one forked after every hand-over) waits for SIGUSR1 before it loads anything
    (compute.lifecycle.driver: each object it touches is a page copied from the warm image)."""
    plan = plan_run(view)
    if plan == (DriverStep.WAIT_FOR_STOP,):
        return True
    if view.lease:  # the lease's renewals are the driver's work for the compute's whole life
        return False
    return plan == (DriverStep.SERVE, DriverStep.HAND_OVER) and not wants_reconfiguration(view.status) \
        and not view.catalog_requests


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


# -- a catalog apply that loses a lock race ----------------------------------------------
# Another session held a lock a statement needed past --lock-timeout (55P03), or postgres broke
# a deadlock by cancelling ours (40P01): nothing of the failing transaction was applied, and
# the apply plans afresh from the catalog, so running it again is safe. A /database_schema
# dump, a user's long transaction on a table a dropped role owns (REASSIGN OWNED) do this.
LOCK_RACE_SQLSTATES = frozenset({"55P03", "40P01"})
LOCK_RACE_ATTEMPTS = 4
LOCK_RACE_FIRST_DELAY = 1.0  # then x2: 1, 2, 4 s between the attempts
LOCK_RACE_FACTOR = 2.0


def lost_lock_race(sqlstate: str | None) -> bool:
    """Whether an apply that failed with `sqlstate` lost a lock race (worth another attempt)."""
    return sqlstate in LOCK_RACE_SQLSTATES


def after_failed_reconfiguration(in_catalog: bool) -> str:
    """The status a reconfiguration that failed leaves. A failure of the catalog SQL (a
    statement erroring half-way, a lock race still lost after its retries, the planner refusing
    the spec, the catalog unreadable): `running`, with the error on /status and the /configure
    answered 500. postgres runs with the new spec's settings (checked and reloaded before the
    catalog SQL, kept: the stored spec is the new one), the catalog partly changed toward it;
    the apply plans afresh from the catalog (idempotent), so a /configure again converges once
    the cause is gone. Never the final `failed` for a compute that serves (Neon's HEAD: `failed`,
    a restart expected). A failure before that (the settings could not be written or checked):
    `failed`."""
    return "running" if in_catalog else "failed"


def catalog_failure_message(error: str, lost_race: bool) -> str:
    """/status' error (and the /configure answer) after a failed catalog apply: what to do first,
    then the executor's sentence (the failing statement, redacted: never a password or hash)."""
    if lost_race:
        return (f"reconfiguration lost a lock race {LOCK_RACE_ATTEMPTS} times; the compute runs "
                f"with the spec partly applied (send it again): {error}")
    return ("reconfiguration failed in the catalog SQL; the compute runs with the new settings and "
            f"the spec partly applied (send it again once the cause is fixed): {error}")
