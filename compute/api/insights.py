"""GET /insights: the top pg_stat_statements entries.

Query texts can hold secrets (utility statements such as `ALTER ROLE ... PASSWORD '...'` are
stored verbatim), so the route needs a token with a JWKS and a loopback peer without one
(compute/api/access.py, GUARDED), and whatever the access every
`query` goes through compute.api.redaction before it leaves.

The view is read from the schema its extension lives in (our session pins search_path to
pg_catalog, and a spec role must not be able to put a `pg_stat_statements` of its own first).
"""

from __future__ import annotations

import json
import logging

import falcon
import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from compute.api.context import ApiContext
from compute.shared.state import hyphenated
from compute.api.errors import json_body
from compute.api.redaction import redact_passwords

log = logging.getLogger("compute.api.insights")

EXTENSION_SCHEMA_QUERY = """
SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
 WHERE e.extname = 'pg_stat_statements'
"""

# Top 100 by mean execution + planning time, the superuser's own statements excluded. The JSON is
# built by postgres (row_to_json keeps every column with its natural JSON type).
INSIGHTS_QUERY = sql.SQL("""
SELECT coalesce(json_agg(row_to_json(s) ORDER BY s.mean_exec_time + s.mean_plan_time DESC), '[]'::json)::text
  FROM (SELECT *
          FROM {schema}.pg_stat_statements
         WHERE userid IS DISTINCT FROM (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = %s)
         ORDER BY mean_exec_time + mean_plan_time DESC
         LIMIT 100) s
""")

# Without pg_stat_statements (not installed, or not preloaded) the answer is an empty list, as
# Neon's: clients parse /insights as JSON.
NO_STATEMENTS = '{"pg_stat_statements": []}'


def redact_rows(rows: list) -> list:
    for row in rows:
        if isinstance(row, dict) and "query" in row:
            row["query"] = redact_passwords(row["query"])
    return rows


class Insights:
    data_route = True  # compute/api/capacity.py

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = self.ctx.store.get("status")
        if status != "running":  # Neon's answer (its http/mod.rs invalid_status)
            json_body(resp, {"error": f"invalid compute status: {hyphenated(status)}"}, falcon.HTTP_412)
            return
        try:
            with self.ctx.pg_connect() as conn:
                found = conn.execute(EXTENSION_SCHEMA_QUERY).fetchone()
                if found is None:  # not installed
                    resp.content_type = falcon.MEDIA_JSON
                    resp.text = NO_STATEMENTS
                    return
                query = INSIGHTS_QUERY.format(schema=sql.Identifier(found[0]))
                rows = conn.execute(query, (self.ctx.superuser,)).fetchone()[0]
        except (pgerrors.UndefinedTable, pgerrors.UndefinedFunction, pgerrors.ObjectNotInPrerequisiteState) as e:
            log.info("insights: pg_stat_statements is not available (%s)", str(e).strip())
            resp.content_type = falcon.MEDIA_JSON
            resp.text = NO_STATEMENTS
            return
        except psycopg.OperationalError as e:
            json_body(resp, {"error": f"cannot connect to postgres: {str(e).strip()}"}, falcon.HTTP_503)
            return
        except psycopg.Error as e:
            log.warning("insights query failed: %s", e)
            json_body(resp, {"error": str(e).strip()}, falcon.HTTP_500)
            return
        json_body(resp, {"pg_stat_statements": redact_rows(json.loads(rows))})
