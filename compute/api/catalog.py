"""GET /dbs_and_roles and GET /database_schema?database=NAME (Neon's routes).

/dbs_and_roles: {"roles": [{"name", "encrypted_password", "options"}], "databases": [{"name",
"owner", "options", "restrict_conn", "invalid"}]} read from the catalog, Neon's shape. The
password hash is never sent (always null): a compute without a JWKS serves the route to its
loopback peers with no token (compute/api/access.py), and a hash is a password's equivalent
for md5 and SCRAM alike.

/database_schema: `pg_dump --schema-only` of that database, streamed as pg_dump produces it.
pg_dump connects as the superuser through the compute's own access; every connection parameter
travels in its environment (PGDATABASE is never parsed as a connection string, so any database
name is just a name), none in argv, and there is no password. 404 for an unknown database.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import falcon
import psycopg
from psycopg.conninfo import conninfo_to_dict

from compute.api.context import ApiContext
from compute.api.errors import json_body

log = logging.getLogger("compute.api.catalog")

ROLES_QUERY = "SELECT rolname FROM pg_catalog.pg_roles ORDER BY rolname"
# pg_database.datconnlimit = -2 marks a database left invalid by an interrupted DROP DATABASE.
DATABASES_QUERY = """
SELECT datname, (SELECT rolname FROM pg_catalog.pg_roles WHERE oid = datdba),
       NOT datallowconn, datconnlimit = -2
  FROM pg_catalog.pg_database ORDER BY datname
"""
DATABASE_EXISTS = "SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s"
MAX_NAME_BYTES = 63
CHUNK = 64 * 1024


def catalog_objects(role_rows, database_rows) -> dict:
    """The answer, from (rolname,) and (datname, owner, restrict_conn, invalid) rows."""
    return {
        "roles": [{"name": name, "encrypted_password": None, "options": None} for (name,) in role_rows],
        "databases": [{"name": name, "owner": owner, "options": None, "restrict_conn": bool(restrict),
                       "invalid": bool(invalid)} for name, owner, restrict, invalid in database_rows],
    }


def database_param(req: falcon.Request) -> str:
    """The `database` query parameter: a non-empty name postgres could have (400 otherwise)."""
    values = req.get_param_as_list("database") or []
    if len(values) != 1 or not values[0]:
        raise falcon.HTTPBadRequest(description="give exactly one database: ?database=NAME")
    name = values[0]
    if "\x00" in name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise falcon.HTTPBadRequest(description=f"not a database name: NUL byte or longer than {MAX_NAME_BYTES} bytes")
    return name


def pg_dump_env(connstr: str, dbname: str) -> dict[str, str]:
    """pg_dump's whole environment: where to connect, as whom, to which database."""
    params = conninfo_to_dict(connstr)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
           "PGDATABASE": dbname, "PGAPPNAME": "compute_ctl:database_schema", "PGCONNECT_TIMEOUT": "10"}
    for key, var in (("host", "PGHOST"), ("hostaddr", "PGHOSTADDR"), ("port", "PGPORT"), ("user", "PGUSER"),
                     ("sslmode", "PGSSLMODE"), ("passfile", "PGPASSFILE")):
        if params.get(key):
            env[var] = str(params[key])
    # The superuser's password on the embedded default: the passfile our programs are given
    # (compute/postgres/localauth.py), never the password itself.
    if "PGPASSFILE" not in env and os.environ.get("PGPASSFILE"):
        env["PGPASSFILE"] = os.environ["PGPASSFILE"]
    return env


class DbsAndRoles:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            with self.ctx.pg_connect() as conn:
                roles = conn.execute(ROLES_QUERY).fetchall()
                databases = conn.execute(DATABASES_QUERY).fetchall()
        except psycopg.OperationalError as e:
            json_body(resp, {"error": f"cannot connect to postgres: {str(e).strip()}"}, falcon.HTTP_503)
            return
        except psycopg.Error as e:
            json_body(resp, {"error": str(e).strip()}, falcon.HTTP_500)
            return
        json_body(resp, catalog_objects(roles, databases))


class DatabaseSchema:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        dbname = database_param(req)
        try:
            with self.ctx.pg_connect() as conn:
                exists = conn.execute(DATABASE_EXISTS, (dbname,)).fetchone() is not None
        except psycopg.OperationalError as e:
            json_body(resp, {"error": f"cannot connect to postgres: {str(e).strip()}"}, falcon.HTTP_503)
            return
        if not exists:
            raise falcon.HTTPNotFound(description="database does not exist")
        pg_dump = os.path.join(self.ctx.settings.pgbin_dir or "", "pg_dump")
        try:
            proc = subprocess.Popen([pg_dump, "--schema-only"], env=pg_dump_env(self.ctx.connstr, dbname),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            json_body(resp, {"error": f"cannot run pg_dump: {e}"}, falcon.HTTP_500)
            return
        errors: list[str] = []
        reader = threading.Thread(target=_log_stderr, args=(proc, errors), daemon=True)
        reader.start()
        first = proc.stdout.read1(CHUNK)
        if not first:  # nothing at all: pg_dump failed before its first line (dropped meanwhile?)
            proc.wait()
            reader.join(5)
            proc.stdout.close()
            text = " ".join(errors)
            if "does not exist" in text:
                raise falcon.HTTPNotFound(description="database does not exist")
            json_body(resp, {"error": f"pg_dump failed (exit code {proc.returncode}): {text[:500]}"},
                      falcon.HTTP_500)
            return
        resp.content_type = "application/sql; charset=utf-8"
        resp.stream = _DumpStream(proc, first)


class _DumpStream:
    """The WSGI body: chunks as pg_dump writes them. The server calls close() when the body is
    done or the client went away, even before the first chunk was asked for (a generator's
    `finally` would not run then): pg_dump never outlives its request."""

    def __init__(self, proc: subprocess.Popen, first: bytes):
        self.proc, self.pending = proc, first

    def __iter__(self) -> "_DumpStream":
        return self

    def __next__(self) -> bytes:
        if self.pending:
            chunk, self.pending = self.pending, b""
            return chunk
        chunk = self.proc.stdout.read1(CHUNK)
        if not chunk:
            if self.proc.wait() != 0:
                log.error("pg_dump exited with code %d after streaming part of the schema", self.proc.returncode)
            raise StopIteration
        return chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def _log_stderr(proc: subprocess.Popen, errors: list[str]) -> None:
    for raw in proc.stderr:
        line = raw.decode("utf-8", "replace").rstrip()
        errors.append(line)
        log.warning("pg_dump: %s", line)
    proc.stderr.close()
