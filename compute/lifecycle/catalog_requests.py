"""The lifecycle driver's half of the internal port's /grants and /extensions (HEAD's
ComputeNode::set_role_grants and install_extension, compute_tools/src/compute.rs): one
superuser session to the request's database, one look at the catalog, then the one statement
(or none) the pure rule says (compute/model/internal_requests.py).

Names reach postgres only as psycopg `sql.Identifier`s and the version as a `sql.Literal`
(HEAD quotes it as an identifier; a literal is never truncated at 63 bytes), never
interpolated; the catalog lookups pass them as parameters. The session is the driver's own
(application_name compute_ctl:internal, --lock-timeout and --statement-timeout as the spec's
apply).
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import sql

from compute.model.internal_requests import ExtensionRequest, GrantsRequest, extension_action, grants_to_add
from compute.postgres.sessions import session_params
from compute.shared.driver_requests import EXTENSION, GRANTS, CatalogRequest

log = logging.getLogger("compute.lifecycle.catalog_requests")

APPLICATION_NAME = "compute_ctl:internal"
CONNECT_TIMEOUT = 10
# What the role holds on the schema already (HEAD's query, with pg_roles: NOLOGIN roles too).
HELD_ON_SCHEMA = ("SELECT acl.privilege_type FROM pg_catalog.pg_namespace n"
                  " CROSS JOIN LATERAL pg_catalog.aclexplode(n.nspacl) AS acl"
                  " JOIN pg_catalog.pg_roles r ON acl.grantee = r.oid"
                  " WHERE r.rolname OPERATOR(pg_catalog.=) %s::pg_catalog.name"
                  " AND n.nspname OPERATOR(pg_catalog.=) %s::pg_catalog.name")
INSTALLED_VERSION = "SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) %s"
# HEAD's words before the reason (compute_tools/src/http/routes/{grants,extensions}.rs).
FAILED = {GRANTS: "failed to grant role privileges to the schema", EXTENSION: "failed to install extension"}


class CatalogRequestError(Exception):
    pass


def grant_statement(req: GrantsRequest, held: set[str]) -> sql.Composed | None:
    privileges = grants_to_add(req.privileges, held)
    if not privileges:
        return None
    # Keywords from HEAD's fixed set (checked at the API and here again), never from the client.
    assert all(p.isalpha() and p.isupper() for p in privileges)
    return sql.SQL("GRANT {} ON SCHEMA {} TO {}").format(
        sql.SQL(", ").join(sql.SQL(p) for p in privileges), sql.Identifier(req.schema), sql.Identifier(req.role))


def extension_statement(req: ExtensionRequest, installed: str | None) -> sql.Composed | None:
    action = extension_action(installed, req.version)
    if action == "update":
        return sql.SQL("ALTER EXTENSION {} UPDATE TO {}").format(sql.Identifier(req.extension), sql.Literal(req.version))
    if action == "create":
        return sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA public VERSION {}").format(
            sql.Identifier(req.extension), sql.Literal(req.version))
    return None


def connect(connstr: str, database: str, *, lock_timeout_ms: int | None,
            statement_timeout_ms: int | None) -> psycopg.Connection:
    params = session_params(connstr, lock_timeout_ms=lock_timeout_ms, statement_timeout_ms=statement_timeout_ms)
    params["dbname"] = database  # a keyword, never parsed as a connection string
    return psycopg.connect(**params, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                           application_name=APPLICATION_NAME)


def carry_out(connstr: str, request: CatalogRequest, *, lock_timeout_ms: int | None = None,
              statement_timeout_ms: int | None = None) -> Any:
    """The answer (grants: None; extension: the version), or CatalogRequestError with HEAD's
    sentence and postgres' reason."""
    try:
        if request.kind == GRANTS:
            req = GrantsRequest(**{**request.body, "privileges": tuple(request.body["privileges"])})
        elif request.kind == EXTENSION:
            req = ExtensionRequest(**request.body)
        else:
            raise CatalogRequestError(f"unknown request kind {request.kind!r}")
    except TypeError as e:
        raise CatalogRequestError(f"malformed request record: {e}") from None
    try:
        with connect(connstr, req.database, lock_timeout_ms=lock_timeout_ms,
                     statement_timeout_ms=statement_timeout_ms) as conn:
            if isinstance(req, GrantsRequest):
                held = {row[0] for row in conn.execute(HELD_ON_SCHEMA, (req.role, req.schema))}
                statement = grant_statement(req, held)
                answer = None
            else:
                row = conn.execute(INSTALLED_VERSION, (req.extension,)).fetchone()
                statement = extension_statement(req, row[0] if row else None)
                answer = req.version
            if statement is not None:
                log.info("%s: %s", request.kind, statement.as_string(conn))
                conn.execute(statement)
            else:
                log.info("%s: nothing to do (already in place)", request.kind)
            return answer
    except psycopg.Error as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CatalogRequestError(f"{FAILED[request.kind]}: {reason}") from None
