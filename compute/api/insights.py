"""GET /insights: the top pg_stat_statements entries."""

from __future__ import annotations

import logging

import falcon
import psycopg
from psycopg import errors as pgerrors

from compute.api.context import ApiContext, debug_status_name
from compute.api.errors import json_body, text

log = logging.getLogger("compute.api.insights")

# Top 100 by mean execution + planning time, the superuser's own statements excluded. The JSON is
# built by postgres (row_to_json keeps every column with its natural JSON type).
INSIGHTS_QUERY = """
SELECT coalesce(json_agg(row_to_json(s) ORDER BY s.mean_exec_time + s.mean_plan_time DESC), '[]'::json)::text
  FROM (SELECT *
          FROM pg_stat_statements
         WHERE userid IS DISTINCT FROM (SELECT oid FROM pg_roles WHERE rolname = %s)
         ORDER BY mean_exec_time + mean_plan_time DESC
         LIMIT 100) s
"""

# Without pg_stat_statements (not installed, or not preloaded) the answer is an empty list, as
# Neon's: clients parse /insights as JSON.
NO_STATEMENTS = '{"pg_stat_statements": []}'


class Insights:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = self.ctx.store.get("status")
        if status != "running":
            text(resp, f"compute is not running, current status: {debug_status_name(status)}")
            return
        try:
            with self.ctx.pg_connect() as conn:
                rows = conn.execute(INSIGHTS_QUERY, (self.ctx.superuser,)).fetchone()[0]
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
        resp.content_type = falcon.MEDIA_JSON
        resp.text = '{"pg_stat_statements": ' + rows + "}"
