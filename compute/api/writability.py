"""POST /check_writability: one write in one round trip.

The table is the contract's `health_check`, schema-qualified (`public`: where the original's
default search_path put it; our session pins search_path to pg_catalog). A spec role that owns
the database or schema public can create `public.health_check` first, with a trigger, a rule or
a child table: its code would run with our superuser rights on the INSERT. So between CREATE
and INSERT a guard refuses any `public.health_check` that is not a plain table owned by us with
no triggers, rules, row security or children (only its owner can add those later). Refused:
a 500 with the reason, nothing written, nothing of theirs executed.
"""

from __future__ import annotations

import logging

import falcon
import psycopg

from compute.model import modes
from compute.api.context import ApiContext
from compute.shared.state import hyphenated
from compute.api.errors import json_body, text
from compute.model.spec import StoredSpecError, load_stored

log = logging.getLogger("compute.api.writability")

# Sent as ONE simple-protocol query string (four statements, one round trip, one implicit
# transaction: a refusal rolls the CREATE back too). The transaction-scoped advisory lock
# serialises concurrent checks: two first CREATE TABLE IF NOT EXISTS at once would otherwise
# race on the catalog and one fail ("type health_check already exists"). Nothing is written at start-up: only when
# asked. Every name outside the table is pg_catalog-qualified. Fixed text: nothing interpolated.
WRITABILITY_QUERY = """\
SELECT pg_catalog.pg_advisory_xact_lock(1668246896, 1);
CREATE TABLE IF NOT EXISTS public.health_check (id serial primary key, updated_at timestamptz default pg_catalog.now());
DO $guard$
DECLARE
  c pg_catalog.pg_class%ROWTYPE;
BEGIN
  SELECT * INTO c FROM pg_catalog.pg_class WHERE oid OPERATOR(pg_catalog.=) 'public.health_check'::pg_catalog.regclass;
  IF c.relkind OPERATOR(pg_catalog.<>) 'r'
     OR c.relowner OPERATOR(pg_catalog.<>) (SELECT r.oid FROM pg_catalog.pg_roles r
                                             WHERE r.rolname OPERATOR(pg_catalog.=) current_user)
     OR c.relhastriggers OR c.relhasrules OR c.relrowsecurity OR c.relhassubclass THEN
    RAISE EXCEPTION 'refusing to write to public.health_check: it is not a plain table owned by % '
                    '(owner %, kind %, triggers %, rules %, row security %, children %)',
                    current_user, c.relowner::pg_catalog.regrole, c.relkind, c.relhastriggers,
                    c.relhasrules, c.relrowsecurity, c.relhassubclass;
  END IF;
END
$guard$;
INSERT INTO public.health_check VALUES (1, pg_catalog.now())
  ON CONFLICT (id) DO UPDATE SET updated_at = pg_catalog.now();
"""


class CheckWritability:
    data_route = True  # compute/api/capacity.py

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = self.ctx.store.get("status")
        if status != "running":  # Neon's answer (its http/mod.rs invalid_status)
            json_body(resp, {"error": f"invalid compute status: {hyphenated(status)}"}, falcon.HTTP_412)
            return
        try:
            current = load_stored(self.ctx.store)
        except StoredSpecError as e:
            text(resp, str(e), falcon.HTTP_500)
            return
        mode = current.mode if current else modes.PRIMARY
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
