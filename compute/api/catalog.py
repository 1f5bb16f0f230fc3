"""GET /dbs_and_roles and GET /database_schema?database=NAME (Neon's routes).

/dbs_and_roles: {"roles": [{"name", "encrypted_password", "options"}], "databases": [{"name",
"owner", "options", "restrict_conn", "invalid"}]} read from the catalog, Neon's shape. The
password hash is never sent (always null): a compute without a JWKS serves the route to its
loopback peers with no token (compute/api/access.py), and a hash is a password's equivalent
for md5 and SCRAM alike.

/database_schema: `pg_dump --schema-only` of that database, spooled to an unnamed file in the
runtime dir as fast as pg_dump makes it, then sent (DatabaseSchema says why and the bounds).
pg_dump connects as the superuser through the compute's own access; every connection parameter
travels in its environment (PGDATABASE is never parsed as a connection string, so any database
name is just a name), none in argv, and there is no password. 404 for an unknown database.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
import time

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
# /database_schema: pg_dump spools into the runtime dir, then the answer is sent from there.
MAX_CONCURRENT_DUMPS = 4  # per worker; each holds a pool thread while its client reads
SPOOL_MAX_BYTES = 64 * 1024 * 1024  # a schema dump larger than this is refused (500)
SPOOL_RESERVE_BYTES = 16 * 1024 * 1024  # left free in the runtime dir (the state file, logs)
SPOOL_MIN_BYTES = 1024 * 1024  # a share smaller than this: 503, try later
DUMP_DEADLINE = 120.0  # seconds pg_dump may take to write the whole dump
DUMP_RETRY_AFTER = 5
SPOOL_POLL = 0.05
STDERR_MAX = 64 * 1024


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
    data_route = True  # compute/api/capacity.py

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
    """The dump is spooled first: pg_dump writes into an unnamed temporary file in the runtime
    dir at its own speed (at most SPOOL_MAX_BYTES, within DUMP_DEADLINE seconds, else it is
    killed), so its transaction and the locks it takes end as soon as the dump is made, however
    slowly the client then reads it; the answer is sent from that file. At most
    MAX_CONCURRENT_DUMPS per worker at once (each holds a pool thread while its client reads,
    and up to SPOOL_MAX_BYTES of the runtime dir): beyond that 429 with Retry-After."""

    data_route = True  # compute/api/capacity.py

    def __init__(self, ctx: ApiContext, *, max_dumps: int = MAX_CONCURRENT_DUMPS,
                 spool_max: int = SPOOL_MAX_BYTES, deadline: float = DUMP_DEADLINE):
        self.ctx = ctx
        self.dumps = threading.BoundedSemaphore(max_dumps)
        self.max_dumps, self.spool_max, self.deadline = max_dumps, spool_max, deadline

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        dbname = database_param(req)
        if not self.dumps.acquire(blocking=False):
            raise falcon.HTTPTooManyRequests(
                description=f"too many schema dumps at once (at most {self.max_dumps}); retry later",
                retry_after=DUMP_RETRY_AFTER)
        handed_over = False
        try:
            spool = self._dump(dbname, resp)
            if spool is not None:
                # Chunked, as before and as Neon streams it (no Content-Length).
                resp.content_type = "application/sql; charset=utf-8"
                resp.stream = _SpooledDump(spool, self.dumps.release)
                handed_over = True
        finally:
            if not handed_over:
                self.dumps.release()

    def _dump(self, dbname: str, resp: falcon.Response):
        """The spooled dump (an open file at its start), or None with resp set to the error."""
        try:
            with self.ctx.pg_connect() as conn:
                exists = conn.execute(DATABASE_EXISTS, (dbname,)).fetchone() is not None
        except psycopg.OperationalError as e:
            json_body(resp, {"error": f"cannot connect to postgres: {str(e).strip()}"}, falcon.HTTP_503)
            return None
        if not exists:
            raise falcon.HTTPNotFound(description="database does not exist")
        spool_dir = self.ctx.runtime_dir
        limit = spool_limit(spool_room(spool_dir), self.spool_max, self.max_dumps)
        if limit < min(SPOOL_MIN_BYTES, self.spool_max):
            raise falcon.HTTPServiceUnavailable(
                description="not enough free space in the runtime dir to spool a schema dump",
                retry_after=DUMP_RETRY_AFTER)
        pg_dump = os.path.join(self.ctx.settings.pgbin_dir or "", "pg_dump")
        spool = tempfile.TemporaryFile(dir=spool_dir)  # unnamed (O_TMPFILE): gone with the last fd
        errors = tempfile.TemporaryFile(dir=spool_dir)
        try:
            try:
                proc = subprocess.Popen([pg_dump, "--schema-only"], env=pg_dump_env(self.ctx.connstr, dbname),
                                        stdin=subprocess.DEVNULL, stdout=spool, stderr=errors)
            except OSError as e:
                json_body(resp, {"error": f"cannot run pg_dump: {e}"}, falcon.HTTP_500)
                return None
            verdict = _wait_spooled(proc, spool, limit, time.monotonic() + self.deadline)
            errors.seek(0)
            text = " ".join(errors.read(STDERR_MAX).decode("utf-8", "replace").split())
            if text:
                log.warning("pg_dump: %s", text)
            if verdict is not None:
                log.error("schema dump of %r stopped: %s", dbname, verdict)
                json_body(resp, {"error": f"schema dump stopped: {verdict}"}, falcon.HTTP_500)
                return None
            if proc.returncode != 0:
                if "does not exist" in text:
                    raise falcon.HTTPNotFound(description="database does not exist")
                json_body(resp, {"error": f"pg_dump failed (exit code {proc.returncode}): {text[:500]}"},
                          falcon.HTTP_500)
                return None
            spool.seek(0)
            result, spool = spool, None
            return result
        finally:
            errors.close()
            if spool is not None:
                spool.close()


def spool_limit(free: int | None, spool_max: int, max_dumps: int) -> int:
    """The most one dump may spool: SPOOL_MAX_BYTES, and never more than its share (of
    max_dumps) of what is free beyond SPOOL_RESERVE_BYTES, which stays for the state file and
    the logs (pure)."""
    if free is None:
        return spool_max
    return max(0, min(spool_max, (free - SPOOL_RESERVE_BYTES) // max(1, max_dumps)))


def spool_room(path: str) -> int | None:
    """Bytes an unprivileged writer may still use on path's filesystem (None: unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _wait_spooled(proc: subprocess.Popen, spool, max_bytes: int, deadline: float) -> str | None:
    """Wait for pg_dump to finish writing into `spool`; kill it (and say why) when it writes
    more than max_bytes or is still running at `deadline` (monotonic)."""
    while True:
        try:
            proc.wait(SPOOL_POLL)
        except subprocess.TimeoutExpired:
            pass
        size = os.fstat(spool.fileno()).st_size
        why = None
        if size > max_bytes:
            why = f"the dump exceeds {max_bytes} bytes"
        elif proc.returncode is None and time.monotonic() >= deadline:
            why = "pg_dump did not finish within its deadline"
        if why is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            return why
        if proc.returncode is not None:
            return None


class _SpooledDump:
    """The WSGI body: the spooled dump in chunks. The server calls close() when the body is done
    or the client went away; the dump's slot is given back then."""

    def __init__(self, spool, release):
        self.spool, self._release = spool, release

    def __iter__(self) -> "_SpooledDump":
        return self

    def __next__(self) -> bytes:
        chunk = self.spool.read(CHUNK)
        if not chunk:
            raise StopIteration
        return chunk

    def close(self) -> None:
        try:
            self.spool.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


