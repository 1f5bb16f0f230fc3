"""POST /terminate[?mode=fast|immediate]: stop postgres and return once it is down, with the
primary's last LSN: {"terminated": true, "lsn": "0/16B3748" | null} (Neon's answer is the
`lsn`; `terminated` is kept for our earlier clients).

fast (default): supervisord stops postgres with SIGINT (fast shutdown, a shutdown checkpoint).
immediate: SIGQUIT (immediate shutdown: no checkpoint, crash recovery on a next start).

Neon's status rules: accepted when the status is `empty` or `running` (it becomes
`termination_pending_<mode>`), 412 `invalid compute status: <status>` otherwise; once the
compute is `terminated`, 201 with the recorded answer. Ours on top (issue 21): a call made while
a terminate is under way joins it and gets the same answer (200, the same LSN) when it comes,
instead of Neon's 412, so a control plane retrying after a client timeout loses nothing.

The lifecycle driver stops postgres and finds the LSN (compute/shared/driver_requests.py has the
rule): the API submits the request, wakes the driver and waits for its answer. `shutdown_requested`
tells the exit watcher that postgres going away is wanted: it then takes the whole tree down
with exit status 0, once the answer is recorded and every waiting call has it
(`terminate_waiters`). When postgres never ran (an `empty` compute), no postgres will end: the
API asks supervisord (`stopAfterTerminate`) to stop the tree after the answer, `lsn` null.
"""

from __future__ import annotations

import logging
import os

import falcon

from compute.shared import driver_requests
from compute.api.context import ApiContext
from compute.api.errors import json_body
from compute.shared.state import hyphenated

log = logging.getLogger("compute.api.terminate")

# Stopping postgres (supervisord's stopwaitsecs, then SIGKILL) and a sync-safekeepers attempt
# (--storage-timeout without output) fit well within it.
TERMINATE_TIMEOUT = 300.0


class Terminate:
    def __init__(self, ctx: ApiContext, *, timeout: float = TERMINATE_TIMEOUT):
        self.ctx = ctx
        self.timeout = timeout

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        modes = req.get_param_as_list("mode") or ["fast"]
        mode = modes[0]
        if len(modes) != 1 or mode not in driver_requests.TERMINATE_MODES:
            raise falcon.HTTPBadRequest(description=f"mode must be fast or immediate, got {','.join(modes)[:40]!r}")
        store = self.ctx.store
        me = os.getpid()
        call = driver_requests.submit_terminate(store, mode, waiter=me)
        if call.kind == driver_requests.REFUSED:
            json_body(resp, {"error": f"invalid compute status: {hyphenated(call.status)}"}, falcon.HTTP_412)
            return
        if call.kind == driver_requests.ANSWERED:
            code, body = call.request.answer()
            json_body(resp, body, falcon.HTTP_201 if code == 200 else falcon.HTTP_500)
            return
        try:
            request, error = self.wait_for_answer(call)
            if error:
                json_body(resp, {"error": error}, falcon.HTTP_500)
                return
            code, body = request.answer()
            json_body(resp, body, falcon.HTTP_200 if code == 200 else falcon.HTTP_500)
        finally:
            driver_requests.leave_terminate(store, me)

    def wait_for_answer(self, call: driver_requests.TerminateCall):
        store, request = self.ctx.store, call.request
        log.info("terminate requested (%s)%s", request.mode,
                 "" if call.kind == driver_requests.NEW else ": joining the one under way")
        if request.by == driver_requests.TREE:
            # No postgres will end, so the exit watcher would never stop the tree: it is asked
            # to, once the answers are out. No WAL was written: no LSN. A call that joins does
            # the same (the first one's process may have died before it could).
            error = driver_requests.stop_tree_after_answer(self.ctx.runtime_dir)
            return driver_requests.finish_terminate(store, request, error=error), None
        # A joining call wakes the driver too: the first caller's process may have died first.
        driver_requests.wake_driver(self.ctx.runtime_dir)
        done, _ = driver_requests.wait_for(
            store, ("terminate",), lambda v: driver_requests.termination_outcome(v, request.id), self.timeout)
        if done is None:
            return None, f"timed out after {self.timeout:.0f} s waiting for the lifecycle driver to stop postgres"
        return done, None
