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
"""

from __future__ import annotations

from typing import Any

from psycopg.conninfo import conninfo_to_dict

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


def session_options(*, lock_timeout_ms: int | None = None, statement_timeout_ms: int | None = None) -> str:
    """The `options` value (postgres command-line switches) our sessions connect with."""
    parts = [f"-c search_path={PINNED_SEARCH_PATH}", "-c role=none", "-c default_transaction_read_only=off"]
    # the timeouts are always ours (a database owner could set them to 1 ms or to forever)
    if lock_timeout_ms is not None:
        parts.append(f"-c lock_timeout={int(lock_timeout_ms)}")
    if statement_timeout_ms is not None:
        parts.append(f"-c statement_timeout={int(statement_timeout_ms)}")
    return " ".join(parts)


def session_params(connstr: str, **timeouts: int | None) -> dict[str, Any]:
    """The connstr as connect() keywords, our pinned options appended to its own (later -c
    switches win, so a connstr cannot unpin them)."""
    params: dict[str, Any] = conninfo_to_dict(connstr)
    params["options"] = f"{params.get('options', '')} {session_options(**timeouts)}".strip()
    return params
