"""libpq connection strings, read without importing psycopg (pure).

psycopg costs ~80-120 ms of CPU to import: most of what compute-ctl spent validating `-C` and
the spec before its first storage request (issue 22). `parse` reads the common forms itself,
with exactly libpq's result (tests/unit/test_conninfo.py compares it with libpq's own parser,
psycopg's conninfo_to_dict, on generated strings): `key=value` pairs of well-known keywords
with plain values, and `postgres[ql]://[user[:password]@]host[:port][/dbname]` with plain
parts. Anything else (quotes, escapes, percent-encoding, query parameters, several hosts,
keywords a libpq version may not know) goes to psycopg's conninfo_to_dict (libpq's
PQconninfoParse), imported then: the same answer, or the same error, as before.
"""

from __future__ import annotations

import re

# Keywords every libpq since 9.x knows (an unknown one is an error, which libpq words).
_KEYWORDS = frozenset({"host", "hostaddr", "port", "dbname", "user", "password", "passfile",
                       "connect_timeout", "application_name", "sslmode", "target_session_attrs"})
_PLAIN = r"[A-Za-z0-9_.:/@+-]+"  # no quote, backslash, whitespace, percent sign, comma, `=`
_PAIR = re.compile(rf"([a-z_]+)=({_PLAIN})")
_PAIRS = re.compile(rf"[ ]*(?:[a-z_]+={_PLAIN}[ ]+)*[a-z_]+={_PLAIN}[ ]*\Z")
_NAME = r"[A-Za-z0-9_.-]+"
_URI = re.compile(rf"postgres(?:ql)?://(?:(?P<user>{_NAME})(?::(?P<password>{_NAME}))?@)?"
                  rf"(?P<host>{_NAME})(?::(?P<port>[0-9]+))?(?:/(?P<dbname>{_NAME}))?\Z")


class ConninfoError(ValueError):
    """Not a connection string; the message is libpq's (it never echoes a password)."""


def parse(connstr: str) -> dict[str, str]:
    """The parameters `connstr` sets, as libpq's PQconninfoParse reads them (no defaults, no
    environment). ConninfoError when libpq refuses it."""
    fast = _parse_plain(connstr)
    if fast is not None:
        return fast
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict
    try:
        return conninfo_to_dict(connstr)
    except ProgrammingError as e:
        raise ConninfoError(str(e)) from None


def _parse_plain(connstr: str) -> dict[str, str] | None:
    """The plain forms (module docstring); None for anything else."""
    m = _URI.match(connstr)
    if m:
        return {k: v for k, v in m.groupdict().items() if v is not None}
    if connstr.startswith("postgres") and "://" in connstr:
        return None
    if not _PAIRS.match(connstr):
        return None
    out: dict[str, str] = {}
    for key, value in _PAIR.findall(connstr):
        if key not in _KEYWORDS:
            return None
        out[key] = value  # the last one wins, as in libpq
    return out
