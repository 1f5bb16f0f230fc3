"""POST /check_writability: one write in one round trip."""

from __future__ import annotations

import logging

import falcon
import psycopg

from compute import modes
from compute.api.context import ApiContext, debug_status_name
from compute.api.errors import text

log = logging.getLogger("compute.api.writability")

# Sent as ONE simple-protocol query string (two statements, one round trip, one implicit
# transaction). Nothing is written at start-up: only when asked.
WRITABILITY_QUERY = (
    "CREATE TABLE IF NOT EXISTS health_check (id serial primary key, updated_at timestamptz default now()); "
    "INSERT INTO health_check VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET updated_at = now();"
)


class CheckWritability:
    auth_required = True

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = self.ctx.store.get("status")
        if status != "running":
            text(resp, f"invalid compute status for check_writability request: {debug_status_name(status)}")
            return
        mode = modes.mode_of(self.ctx.store.get("spec"))
        if mode != modes.PRIMARY:
            # A hot standby refuses every write; say so instead of sending one (Neon's answer is
            # the same 500, with postgres' "read-only transaction" error).
            text(resp, f"compute is read-only (mode {mode.lower()}): cannot execute INSERT in a read-only transaction",
                 falcon.HTTP_500)
            return
        try:
            with self.ctx.pg_connect() as conn:
                conn.execute(WRITABILITY_QUERY, prepare=False)
        except psycopg.Error as e:
            log.warning("check_writability failed: %s", e)
            text(resp, str(e).strip() or type(e).__name__, falcon.HTTP_500)
            return
        text(resp, "true")
