"""The LSN lease of a `Static` compute, kept by a thread of the lifecycle driver (the one
program that talks to storage). The schedule is compute.model.lsn_lease's, the attempt
compute.storage.lsn_lease's; this module only loops: read the spec and the `lsn_lease` record,
wait until the next attempt is due, try, write the record back.

Started as soon as the spec is known (before postgres starts, as HEAD), by every driver of a
Static compute: a driver that hands over or dies takes the thread with it, and its successor
goes on from the record (a lease held stays held until its renewal is due). A driver whose
compute keeps a lease never goes idle (compute.lifecycle.steps.idle).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable

from compute.model import lsn_lease as plan
from compute.model.spec import ComputeSpec, StoredSpecError, load_stored
from compute.shared.state import StateStore
from compute.storage import lsn_lease
from compute.storage.attempts import StorageError

log = logging.getLogger("compute.lifecycle.lsn_lease")

STATE_KEY = "lsn_lease"


def wants_lease(spec: ComputeSpec | None) -> bool:
    return spec is not None and spec.mode == "Static" and spec.storage is not None and spec.static_lsn is not None


class LeaseKeeper:
    def __init__(self, store: StateStore, *, timeout: float, token: Callable[[ComputeSpec], str | None],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.timeout = timeout
        self.token = token
        self.clock = clock
        self.wake = threading.Event()  # a new spec (the pageservers may have changed), or stop
        self.stopped = False
        self.thread: threading.Thread | None = None

    def start(self, spec: ComputeSpec) -> None:
        """Write the record first (in the caller's thread): a driver that hands over right after
        this already leaves a compute that keeps its successor busy."""
        assert spec.storage is not None and spec.static_lsn is not None
        stored = self.store.get(STATE_KEY)
        record = plan.current(stored, spec.static_lsn, [list(t) for t in spec.storage.tenant_shard_ids()], self.clock())
        if record != stored:
            self.store.set(**{STATE_KEY: record})
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, name="lsn-lease", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()

    def run(self) -> None:
        # Signals go to the driver's main thread (as for its requests thread).
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGTERM))
        try:
            while not self.stopped and self.step():
                pass
        except Exception:  # the compute goes on without its lease; logged loudly
            log.exception("the LSN lease loop failed")

    def step(self) -> bool:
        """One turn: wait for the next attempt or make it. False: nothing more to do."""
        try:
            spec = load_stored(self.store)
        except StoredSpecError as e:
            log.error("%s", e)
            return False
        if not wants_lease(spec):
            return False
        assert spec is not None and spec.storage is not None and spec.static_lsn is not None
        targets = [list(t) for t in spec.storage.tenant_shard_ids()]
        record = plan.current(self.store.get(STATE_KEY), spec.static_lsn, targets, self.clock())
        wait = plan.wait_seconds(record, self.clock())
        if wait is None:
            return False  # refused: HEAD ends its task there too
        if self.store.get(STATE_KEY) != record:
            self.store.set(**{STATE_KEY: record})
        if wait > 0:
            self.wake.wait(wait)
            self.wake.clear()
            return True
        try:
            valid_until = lsn_lease.lease_all([tuple(t) for t in targets], self.token(spec), spec.storage.timeline_id,
                                              spec.static_lsn, timeout=self.timeout)
        except StorageError as e:
            record = plan.failed(record, str(e), self.clock())
            log.warning("LSN lease at %s: %s (attempt %d; next in %.2f s)", spec.static_lsn, e, record["failures"],
                        plan.retry_delay(record["failures"]))
        else:
            if valid_until is None:
                record = plan.refused(record)
                log.error("LSN lease at %s refused: %s; the compute runs on without it", spec.static_lsn,
                          record["error"])
            else:
                record = plan.granted(record, valid_until, self.clock())
                log.info("LSN lease at %s held on %d pageserver(s) until %s; renewal in %.0f s", spec.static_lsn,
                         len(targets), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(valid_until)),
                         record["next_at"] - self.clock())
        self.store.set(**{STATE_KEY: record})
        return True
