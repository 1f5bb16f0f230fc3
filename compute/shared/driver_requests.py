"""Requests to the lifecycle driver: the API's half (submit, wake, wait) and the records both
halves read and write in the state file.

The rule: the lifecycle driver (compute/lifecycle/driver.py) is the one process that changes postgres
or storage. It starts and stops postgres, writes its configuration, runs the catalog SQL,
wait_for_replay + pg_promote(), --sync-safekeepers and the basebackup (it alone has the storage
token, also when it comes only from the environment). The API changes neither: /configure,
/promote and /terminate validate, submit a typed request here, wake the driver and wait for its
answer. The driver executes a request as a step of its plan (compute/lifecycle/steps.py), and a
driver killed in the middle of one finishes it when supervisord restarts it (each record says
how far it got).

One exception, which is not a change to postgres: when postgres has never been started, /terminate
has nothing to stop and no LSN to find, so the API itself asks supervisord to stop the whole tree
once its answer is out (`by` TREE). A start-up busy in sync-safekeepers, a basebackup or initdb,
or an `empty` compute waiting for its spec, is stopped at once, as SIGTERM would, without waiting
for the driver; the driver, seeing such a request, never starts postgres.

Requests (state keys):
- configure: status {empty, running} -> configuration_pending with the new `spec` and a bumped
  `spec_generation` (the request is the status: the driver's SERVE step takes it); the answer is
  the `configure_answer` record of that generation (applied, or the error), written with the
  status that ends the reconfiguration (`running`, or `failed`);
- promote: status running -> configuration with the `promotion` record (the spec, the LSN);
  the driver promotes, then hands the spec over as a configure of its own (`generation`);
- catalog (the internal port's /grants and /extensions): while `running`, a CatalogRequest
  appended to `catalog_requests` (the status stays `running`, as HEAD); the driver carries the
  queue out in order, each record answered DONE (the answer) or FAILED (the error); the API
  call that made it removes it once read;
- terminate: status {empty, running} -> termination_pending_<mode> with the `terminate` record
  (mode, owner) and `shutdown_requested`; the answer is the record DONE, in the same transaction
  as the status `terminated` (or `failed`). Each waiting call is counted in `terminate_waiters`
  (by pid); the exit watcher stops the tree only once the record is DONE and no live process
  waits (a killed api worker holds nothing up).
Imports only compute.shared.state and compute.shared.supervisor_rpc (no lifecycle, storage, replica, api).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from compute.shared.state import TERMINATION_PENDING, StateStore
from compute.shared.supervisor_rpc import rpc

log = logging.getLogger("compute.shared.driver_requests")

# A record's phases: asked; work begun (a restarted driver resumes knowing it began); answered.
REQUESTED, STARTED, DONE, FAILED = "requested", "started", "done", "failed"
DRIVER, TREE = "driver", "tree"  # who carries out a terminate (the rule above)
TERMINATE_MODES = ("fast", "immediate")
POLL_INTERVAL = 0.05


# -- the records -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Promotion:
    id: int
    spec: Any                       # the spec document the promoted compute runs
    wal_flush_lsn: str | None
    phase: str = REQUESTED          # STARTED: pg_promote() may have run; DONE: spec handed over
    lsn_wait_ms: int = 0
    pg_promote_ms: int = 0
    promoted_at: float | None = None  # epoch seconds, when the spec was handed over
    generation: int | None = None     # the spec_generation of that hand-over
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> "Promotion | None":
        return cls(**raw) if isinstance(raw, dict) else None

    @property
    def pending(self) -> bool:
        return self.phase in (REQUESTED, STARTED)


@dataclass(frozen=True)
class Termination:
    id: int
    mode: str
    by: str                         # DRIVER or TREE
    phase: str = REQUESTED          # STARTED: the flush LSN is read, postgres may be signalled
    flush_lsn: str | None = None    # read before an immediate shutdown's signal
    lsn: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> "Termination | None":
        return cls(**raw) if isinstance(raw, dict) else None

    def answer(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of a DONE terminate."""
        if self.error:
            return 500, {"error": self.error}
        return 200, {"terminated": True, "lsn": self.lsn}


def termination_phase(raw: Any) -> str | None:
    """What the driver's plan needs of the `terminate` record: None (no terminate), TREE (the
    API stops the tree: the driver only must not start postgres), or a driver-owned phase."""
    t = Termination.from_json(raw)
    if t is None:
        return None
    return TREE if t.by == TREE else t.phase


# -- submit ----------------------------------------------------------------------------------

def submit_configure(store: StateStore, spec: Any) -> int | None:
    """Hand a validated spec document over; the new spec_generation, or None when the status
    is neither `empty` nor `running` (of concurrent requests, exactly one wins). The spec it
    replaces is kept beside it (`previous_spec`, with the generation): a reconfiguration that
    changes nothing (postgres rejected its settings) puts it back."""
    def decide(v: dict[str, Any]) -> dict[str, Any] | None:
        if v["status"] not in ("empty", "running"):
            return None
        generation = int(v["spec_generation"] or 0) + 1
        return {"status": "configuration_pending", "spec": spec, "spec_generation": generation, "error": None,
                "previous_spec": {"generation": generation, "spec": v["spec"]}}

    fields = store.update(("status", "spec_generation", "spec"), decide)
    return fields["spec_generation"] if fields else None


def submit_promote(store: StateStore, spec: Any, wal_flush_lsn: str | None) -> Promotion | None:
    """Claim a running compute for a promotion (status `configuration`: no /configure and no
    second /promote meanwhile); None when it is not `running`."""
    made: list[Promotion] = []

    def decide(v: dict[str, Any]) -> dict[str, Any] | None:
        if v["status"] != "running":
            return None
        last = Promotion.from_json(v["promotion"])
        made.append(Promotion(id=(last.id if last else 0) + 1, spec=spec, wal_flush_lsn=wal_flush_lsn))
        return {"status": "configuration", "promotion": made[0].to_json()}

    store.update(("status", "promotion"), decide)
    return made[0] if made else None


NEW, JOINED, ANSWERED, REFUSED = "new", "joined", "answered", "refused"  # what a /terminate found
TERMINATE_FROM = ("empty", "running")  # Neon's rule: /terminate is accepted only then (else 412)
WAITERS = "terminate_waiters"
TERMINATE_KEYS = ("status", "terminate", "postgres_started", WAITERS)


@dataclass(frozen=True)
class TerminateCall:
    """What one /terminate call found, decided in one transaction (terminate_call below):
    NEW: it made the request (and waits); JOINED: one is under way, its answer will be ours (we
    wait); ANSWERED: the compute is `terminated`, the recorded answer is ours at once (201);
    REFUSED: the status is neither `empty` nor `running` (412, `status` says which)."""
    kind: str
    request: Termination | None = None
    status: str | None = None


def terminate_call(v: dict[str, Any], mode: str) -> tuple[TerminateCall, dict[str, Any] | None]:
    """Pure: (what the call found, the fields to write) from the TERMINATE_KEYS. Every
    concurrent or repeated /terminate gets the one request's answer: the LSN is found once, by
    whoever carries the request out, and recorded with it."""
    current = Termination.from_json(v["terminate"])
    status = v["status"]
    if current is not None and current.phase != DONE:
        return TerminateCall(JOINED, current), {}
    if current is not None and status == "terminated":
        return TerminateCall(ANSWERED, current), None
    if status not in TERMINATE_FROM:
        return TerminateCall(REFUSED, status=status), None
    by = DRIVER if v["postgres_started"] else TREE
    made = Termination(id=(current.id if current else 0) + 1, mode=mode, by=by)
    return TerminateCall(NEW, made), {"terminate": made.to_json(), "shutdown_requested": True,
                                      "status": TERMINATION_PENDING[mode].value}


def add_waiter(waiters: Any, pid: int, delta: int) -> dict[str, int]:
    """The `terminate_waiters` map ({pid: calls waiting}) after `delta` more calls of `pid`."""
    found = {str(k): int(n) for k, n in (waiters or {}).items()} if isinstance(waiters, dict) else {}
    n = found.get(str(pid), 0) + delta
    if n > 0:
        found[str(pid)] = n
    else:
        found.pop(str(pid), None)
    return found


def submit_terminate(store: StateStore, mode: str, waiter: int | None = None) -> TerminateCall:
    """One /terminate call: decide what it found (terminate_call) and, when it is to wait for
    an answer, register `waiter` (the waiting process' pid) in the same transaction: the exit
    watcher keeps the tree up until every live waiter has its answer. Who carries a NEW request
    out is decided in the same transaction as the driver's `postgres_started` (set before it
    asks supervisord to start postgres, unless a terminate is there): either the driver started
    postgres and stops it, or it never will and the tree is stopped (TREE)."""
    found: list[TerminateCall] = []

    def decide(v: dict[str, Any]) -> dict[str, Any] | None:
        call, fields = terminate_call(v, mode)
        found.append(call)
        if fields is None:
            return None
        if waiter is not None:
            fields = {**fields, WAITERS: add_waiter(v[WAITERS], waiter, +1)}
        return fields or None

    store.update(TERMINATE_KEYS, decide)
    return found[0]


def leave_terminate(store: StateStore, waiter: int) -> None:
    """A waiting call has its answer (or gave up): it no longer holds the tree up."""
    store.update((WAITERS,), lambda v: {WAITERS: add_waiter(v[WAITERS], waiter, -1)})


def finish_terminate(store: StateStore, t: Termination, *, lsn: str | None = None,
                     error: str | None = None) -> Termination:
    """Record the answer; the status becomes `terminated` (or `failed` with the error) in the
    same transaction, so /status says `terminated` exactly when the answer is there. A request
    answered already keeps its first answer (a second finisher, e.g. a call that joined a TREE
    request, changes nothing)."""
    done = replace(t, phase=DONE, lsn=lsn, error=error)
    kept: list[Termination] = []

    def decide(v: dict[str, Any]) -> dict[str, Any] | None:
        current = Termination.from_json(v["terminate"])
        if current is not None and current.id == t.id and current.phase == DONE:
            kept.append(current)
            return None
        fields: dict[str, Any] = {"terminate": done.to_json()}
        if v["status"] in PENDING_STATUSES:
            fields.update({"status": "failed", "error": error} if error else {"status": "terminated"})
        return fields

    store.update(("terminate", "status"), decide)
    return kept[0] if kept else done


PENDING_STATUSES = frozenset(s.value for s in TERMINATION_PENDING.values())


def under_way(raw: Any) -> bool:
    """Whether the `terminate` record is a request not answered yet."""
    t = Termination.from_json(raw)
    return t is not None and t.phase != DONE


# -- catalog requests (the internal port: compute/api/internal.py) ------------------------------

CATALOG_KEY = "catalog_requests"
CATALOG_SEQ = "catalog_request_seq"
CATALOG_KEYS = ("status", CATALOG_KEY, CATALOG_SEQ)
GRANTS, EXTENSION = "grants", "extension"
MAX_CATALOG_QUEUE = 32  # requests waiting or answered but not yet read; beyond: refused (503)
BUSY = "busy"


@dataclass(frozen=True)
class CatalogRequest:
    id: int
    kind: str                       # GRANTS or EXTENSION
    body: dict[str, Any]            # the checked request (compute/model/internal_requests.py)
    phase: str = REQUESTED          # DONE: `answer` holds the result; FAILED: `error`
    answer: Any = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> "CatalogRequest | None":
        try:
            return cls(**raw) if isinstance(raw, dict) else None
        except TypeError:
            return None


def catalog_queue(raw: Any) -> list[CatalogRequest]:
    return [r for r in (CatalogRequest.from_json(x) for x in (raw if isinstance(raw, list) else [])) if r]


def pending_catalog_requests(raw: Any) -> list[CatalogRequest]:
    """The requests the driver has still to carry out, oldest first."""
    return [r for r in catalog_queue(raw) if r.phase in (REQUESTED, STARTED)]


def submit_catalog_request(store: StateStore, kind: str, body: dict[str, Any]) -> CatalogRequest | str:
    """Queue a request for the driver while the compute is `running` (HEAD's rule, checked in
    the same transaction): the request, or the status it found (412), or BUSY (too many)."""
    found: list[Any] = []

    def decide(v: dict[str, Any]) -> dict[str, Any] | None:
        if v["status"] != "running":
            found.append(v["status"])
            return None
        queue = catalog_queue(v[CATALOG_KEY])
        if len(queue) >= MAX_CATALOG_QUEUE:
            found.append(BUSY)
            return None
        made = CatalogRequest(id=int(v[CATALOG_SEQ] or 0) + 1, kind=kind, body=body)
        found.append(made)
        return {CATALOG_KEY: [*(r.to_json() for r in queue), made.to_json()], CATALOG_SEQ: made.id}

    store.update(CATALOG_KEYS, decide)
    return found[0]


def finish_catalog_request(store: StateStore, request_id: int, *, answer: Any = None,
                           error: str | None = None) -> None:
    """The driver's answer to one request (a request no longer queued is left alone)."""
    def decide(v: dict[str, Any]) -> dict[str, Any] | None:
        queue = catalog_queue(v[CATALOG_KEY])
        if not any(r.id == request_id for r in queue):
            return None
        done = [replace(r, phase=FAILED if error else DONE, answer=answer, error=error)
                if r.id == request_id else r for r in queue]
        return {CATALOG_KEY: [r.to_json() for r in done]}

    store.update((CATALOG_KEY,), decide)


def fail_catalog_requests(store: StateStore, error: str) -> None:
    """Every request still waiting fails with `error` (the compute is being stopped)."""
    def decide(v: dict[str, Any]) -> dict[str, Any] | None:
        queue = catalog_queue(v[CATALOG_KEY])
        if not any(r.phase in (REQUESTED, STARTED) for r in queue):
            return None
        return {CATALOG_KEY: [(replace(r, phase=FAILED, error=error) if r.phase in (REQUESTED, STARTED) else r
                               ).to_json() for r in queue]}

    store.update((CATALOG_KEY,), decide)


def take_catalog_answer(store: StateStore, request_id: int) -> CatalogRequest | None:
    """The request's record once answered, removed from the queue in the same transaction;
    None while it waits."""
    taken: list[CatalogRequest] = []

    def decide(v: dict[str, Any]) -> dict[str, Any] | None:
        queue = catalog_queue(v[CATALOG_KEY])
        mine = next((r for r in queue if r.id == request_id), None)
        if mine is None:
            taken.append(replace(CatalogRequest(request_id, "", {}), phase=FAILED, error="the request was lost"))
            return None
        if mine.phase in (REQUESTED, STARTED):
            return None
        taken.append(mine)
        return {CATALOG_KEY: [r.to_json() for r in queue if r.id != request_id]}

    store.update((CATALOG_KEY,), decide)
    return taken[0] if taken else None


def drop_catalog_request(store: StateStore, request_id: int) -> None:
    """A call that gives up (timed out) takes its request out of the queue."""
    store.update((CATALOG_KEY,), lambda v: {CATALOG_KEY: [r.to_json() for r in catalog_queue(v[CATALOG_KEY])
                                                          if r.id != request_id]})


# -- wake ------------------------------------------------------------------------------------

def wake_driver(runtime_dir: str) -> None:
    """SIGUSR1 to the lifecycle driver through supervisord. It also looks at the state file by
    itself now and then, so a failure here only delays the request."""
    try:
        rpc(runtime_dir, timeout=2).supervisor.signalProcess("lifecycle", "USR1")
    except Exception as e:
        log.debug("could not signal the lifecycle driver: %s", e)


SHUTDOWN_STATE = 6  # supervisord's Faults.SHUTDOWN_STATE: already stopping the tree


def stop_tree_after_answer(runtime_dir: str) -> str | None:
    """The exception to the rule (module docstring): postgres never ran, no postgres will end,
    so the exit watcher is asked to stop the tree once the terminate answer is out."""
    import xmlrpc.client  # here, not at the top: the api and the driver import this module at their start
    try:
        rpc(runtime_dir).supervisor.stopAfterTerminate()
    except xmlrpc.client.Fault as e:
        if e.faultCode != SHUTDOWN_STATE:
            return f"postgres never ran, and supervisord could not be asked to stop the compute: {e}"
    except (OSError, xmlrpc.client.Error) as e:
        return f"postgres never ran, and supervisord could not be asked to stop the compute: {e}"
    log.info("postgres never ran: the compute stops once this answer is out")
    return None


# -- wait ------------------------------------------------------------------------------------

def wait_for(store: StateStore, keys: tuple[str, ...], outcome: Callable[[dict[str, Any]], Any],
             timeout: float, poll: float = POLL_INTERVAL) -> tuple[Any, dict[str, Any]]:
    """Poll `keys` until `outcome(values)` is not None: (outcome, values); (None, values) when
    `timeout` seconds passed first."""
    deadline = time.monotonic() + timeout
    while True:
        values = store.get_many(keys)
        found = outcome(values)
        if found is not None or time.monotonic() >= deadline:
            return found, values
        time.sleep(poll)


CONFIGURE_ANSWER = "configure_answer"
CONFIGURE_KEYS = ("status", "spec_generation", "error", CONFIGURE_ANSWER)


def configure_answer(generation: int, error: str | None = None) -> dict[str, Any]:
    """The driver's answer to the configure of `generation`, as the state fields it writes with
    the status that ends the reconfiguration (one transaction): the `configure_answer` record,
    `{generation, error}`; `error` None: applied. One record whatever the outcome: applied,
    refused with nothing changed, failed."""
    return {CONFIGURE_ANSWER: {"generation": generation, "error": error}}


def configure_outcome(values: dict[str, Any], generation: int) -> tuple[bool, str | None] | None:
    """(applied, error) once the driver has answered the configure of `generation`; None: not yet.
    The `configure_answer` record of our generation is the answer (an error in it: /configure
    answers 500 with it, whatever the status). Without one (a later configure's record replaced
    ours): a later generation means ours was answered and another configure came after it;
    `running` means ours was applied, `failed` that it failed."""
    answer = values.get(CONFIGURE_ANSWER)
    if isinstance(answer, dict) and answer.get("generation") == generation:
        error = answer.get("error")
        return (True, None) if error is None else (False, str(error) or "configuration failed")
    if values["status"] == "running" or (values["spec_generation"] or 0) > generation:
        return True, None
    if values["status"] == "failed":
        return False, values["error"] or "configuration failed"
    return None


def promotion_outcome(values: dict[str, Any], request_id: int) -> Promotion | None:
    p = Promotion.from_json(values["promotion"])
    if p is None or p.id != request_id:
        return replace(Promotion(id=request_id, spec=None, wal_flush_lsn=None), phase=FAILED,
                       error="the promotion request was lost")
    return None if p.pending else p


def termination_outcome(values: dict[str, Any], request_id: int) -> Termination | None:
    t = Termination.from_json(values["terminate"])
    if t is not None and t.id == request_id and t.phase == DONE:
        return t
    if t is not None and t.id > request_id:
        return t if t.phase == DONE else None
    return None
