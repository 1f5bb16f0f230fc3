"""POST /terminate: stop postgres (fast shutdown) and return once it is down.

`shutdown_requested` tells the lead's exit watcher that postgres going away is wanted: it then
takes the whole tree down with exit status 0.
"""

from __future__ import annotations

import logging
import xmlrpc.client

import falcon

from compute.api.context import ApiContext
from compute.api.errors import json_body
from compute.supervision import rpc

log = logging.getLogger("compute.api.terminate")

# supervisord's Faults.NOT_RUNNING: postgres already stopped, which is what we want.
NOT_RUNNING = 70


class Terminate:
    auth_required = True

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.ctx.store.set(shutdown_requested=True)
        log.info("terminate requested: stopping postgres")
        try:
            # Blocks until supervisord reports postgres stopped (SIGINT, then SIGKILL after
            # its stopwaitsecs), so no socket timeout here.
            rpc(self.ctx.runtime_dir, timeout=None).supervisor.stopProcess("postgres", True)
        except xmlrpc.client.Fault as e:
            if e.faultCode != NOT_RUNNING:
                json_body(resp, {"error": f"supervisord refused to stop postgres: {e.faultString}"}, falcon.HTTP_500)
                return
        except (OSError, xmlrpc.client.ProtocolError) as e:
            json_body(resp, {"error": f"cannot reach supervisord: {e}"}, falcon.HTTP_500)
            return
        log.info("postgres is down")
        json_body(resp, {"terminated": True})
