"""How our own superuser sessions connect to postgres (reconcile, monitor, API, lifecycle).

Spec roles are untrusted database users, and one of them may own the database we connect to.
A database owner can `ALTER DATABASE ... SET search_path = public, pg_catalog` (or `SET role`),
and then create `public.now()`, an operator `=` on text, a table our statements name: an
unpinned superuser session would run their code with superuser rights. So every session we
open pins, in the startup packet (source `client`, which outranks database and role settings):

  search_path = pg_catalog, pg_temp   only the system catalog resolves unqualified names (pg_temp
                                      last: it is never searched for functions or operators)
  role = none                         we act as the connstr's user, never as a role a database
                                      setting names
  default_transaction_read_only = off a database owner cannot make our DDL fail
  lock_timeout, statement_timeout     per program: a blocked statement ends with an error

Everything we name outside pg_catalog is schema-qualified (`public.health_check`, the
pg_stat_statements view in its extension's schema).

TLS: postgres is our own, on this host, so a session to a loopback address or a unix socket
asks for no TLS (`sslmode=disable`) unless the connstr (or PGSSLMODE) names an sslmode: libpq's
default `prefer` encrypts every session with a server that offers TLS (ssl=on), for bytes that
never leave the host. (With ssl=off, as our postgresql.conf has it, this makes no memory
difference: the monitor's OpenSSL pages came from SCRAM, below.) Our sessions stay on TCP: the
connstr's host, port and authentication (pg_hba's `host` lines) keep meaning what they say.

The monitor's session lasts the compute's life, so it goes further: it uses postgres' unix
socket when the connstr names this host (`socket_params`). Over TCP the embedded default
authenticates with SCRAM, and libpq computes SCRAM with OpenSSL, whose initialisation left
libcrypto's pages in the monitor for its whole life, sslmode=disable or not (docs/performance.md,
"Figures behind the code"); peer authentication on the socket runs no OpenSSL at all. The socket is the one the running
postmaster names in postmaster.pid, and `requirepeer` makes libpq refuse a server that does not
run as our own OS user (a socket planted in a shared directory while postgres is down). If the
socket cannot be used (pg_hba has no `local` line for us, no socket directory), the connstr is.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from compute.model.conninfo import parse as conninfo_to_dict  # psycopg's, without its import cost

PINNED_SEARCH_PATH = "pg_catalog,pg_temp"

# Settings that keep statements carrying password hashes out of the server log, SET LOCAL in the
# transaction that runs them (log_statement is checked when a query string arrives, so they must
# be in force before it is sent). debug_print_* would print the parse tree, literals included;
# pg_stat_statements would store the utility statement verbatim.
NO_LOG_SETTINGS = (
    ("log_statement", "none"),
    ("log_min_error_statement", "panic"),
    ("log_min_duration_statement", "-1"),
    ("log_duration", "off"),
    ("debug_print_parse", "off"),
    ("debug_print_rewritten", "off"),
    ("debug_print_plan", "off"),
    ("pg_stat_statements.track", "none"),
)


def superuser_of(connstr: str) -> str | None:
    """The user a libpq connection string or URL names (None if it names none); ValueError,
    saying why, if it is not a connection string. Every program's one reading of the -C user."""
    try:
        params = conninfo_to_dict(connstr)
    except ValueError as e:  # ConninfoError: libpq's message names the problem, not a secret
        raise ValueError(f"not a valid connection string ({e})") from None
    return params.get("user") or None


def named_superuser(connstr: str) -> str:
    """The -C/--connstr flag's check (compute-ctl and `compute-ctl plan`): the superuser it
    names; ValueError with the message for the command line otherwise."""
    try:
        user = superuser_of(connstr)
    except ValueError as e:
        raise ValueError(f"--connstr: {e}") from None
    if not user:
        raise ValueError("--connstr must name the superuser, e.g. postgresql://cloud_admin@127.0.0.1:55432/postgres")
    return user


def session_options(*, lock_timeout_ms: int | None = None, statement_timeout_ms: int | None = None) -> str:
    """The `options` value (postgres command-line switches) our sessions connect with."""
    parts = [f"-c search_path={PINNED_SEARCH_PATH}", "-c role=none", "-c default_transaction_read_only=off"]
    # the timeouts are always ours (a database owner could set them to 1 ms or to forever)
    if lock_timeout_ms is not None:
        parts.append(f"-c lock_timeout={int(lock_timeout_ms)}")
    if statement_timeout_ms is not None:
        parts.append(f"-c statement_timeout={int(statement_timeout_ms)}")
    return " ".join(parts)


def is_local_host(host: str | None) -> bool:
    """Whether every host a libpq `host` value names is this machine: none (libpq's default
    unix socket), a socket directory, localhost, or a loopback address."""
    if not host:
        return True
    for h in host.split(","):
        h = h.strip()
        if not h or h.startswith("/") or h.startswith("@") or h == "localhost":
            continue
        try:
            if not ipaddress.ip_address(h).is_loopback:
                return False
        except ValueError:
            return False
    return True


def local_sslmode(params: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """`params` (connect() keywords) with sslmode=disable added when they name none, PGSSLMODE
    is unset and the server is on this host (see the module docstring: no OpenSSL in our
    processes for a loopback session). An sslmode the operator names is always kept."""
    env = os.environ if environ is None else environ
    if "sslmode" in params or env.get("PGSSLMODE"):
        return params
    # libpq connects to hostaddr when given (host then only names the server for auth)
    where = params.get("hostaddr") or env.get("PGHOSTADDR") or params.get("host") or env.get("PGHOST")
    return {**params, "sslmode": "disable"} if is_local_host(where) else params


def socket_params(params: dict[str, Any], postmaster_pid: str | None, os_user: str) -> dict[str, Any] | None:
    """`params` redirected to the unix socket of the postmaster whose postmaster.pid text is
    given (line 4: port, line 5: first socket directory), or None when they name another host,
    or the postmaster listens on no socket. Only ever for a server running as `os_user`."""
    where = params.get("hostaddr") or params.get("host") or os.environ.get("PGHOST")
    lines = (postmaster_pid or "").splitlines()
    if len(lines) < 5 or not is_local_host(where) or not lines[4].startswith("/") or not lines[3].isdigit():
        return None
    out = {k: v for k, v in params.items() if k not in ("hostaddr", "sslmode")}
    return {**out, "host": lines[4], "port": lines[3], "requirepeer": os_user}


def read_postmaster_pid(pgdata: str) -> str | None:
    try:
        with open(os.path.join(pgdata, "postmaster.pid"), encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def session_params(connstr: str, **timeouts: int | None) -> dict[str, Any]:
    """The connstr as connect() keywords, our pinned options appended to its own (later -c
    switches win, so a connstr cannot unpin them), without TLS to a local server unless asked."""
    params: dict[str, Any] = conninfo_to_dict(connstr)
    params["options"] = f"{params.get('options', '')} {session_options(**timeouts)}".strip()
    return local_sslmode(params)
