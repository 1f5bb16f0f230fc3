"""The optional postgres-exporter program (Debian's `prometheus-postgres-exporter`): how it
reaches postgres.

It gets the superuser's access the compute's own programs use: the host (a unix socket
directory or a loopback address), port, user and database of `--connstr`, as a URL in
DATA_SOURCE_NAME in its environment (readable only by the compute's user, never in argv). A
password in `--connstr` is never passed on: the superuser's local access needs none.
"""

from __future__ import annotations

import urllib.parse

from compute.model.conninfo import parse as conninfo_to_dict

from compute.model.launch import default as _default

DEFAULT_PORT = _default("postgres_exporter_port")  # the exporter's registered port (9187)


def exporter_dsn(connstr: str) -> str:
    """`postgresql://USER@/DBNAME?host=H&port=P&sslmode=disable` with every value
    percent-encoded (lib/pq reads the query parameters; a socket path fits as `host`)."""
    params = conninfo_to_dict(connstr)
    user = params.get("user")
    if not user:
        raise ValueError("the superuser connection string names no user")
    query = {}
    if params.get("host"):
        query["host"] = params["host"].split(",")[0]
    if params.get("port"):
        query["port"] = str(params["port"]).split(",")[0]
    query["sslmode"] = "disable"  # a local connection; the exporter would otherwise try TLS first
    q = "&".join(f"{k}={urllib.parse.quote(v, safe='')}" for k, v in query.items())
    return (f"postgresql://{urllib.parse.quote(user, safe='')}@/"
            f"{urllib.parse.quote(params.get('dbname') or 'postgres', safe='')}?{q}")
