"""A spec role's `options` (Neon's `Role.options`, GenericOption list): which role attributes a
tenant role may be given, parsed into typed attributes (pure).

Neon's compute_ctl renders every option verbatim as `NAME value` into `CREATE ROLE` / `ALTER
ROLE` (pg_helpers.rs `to_pg_options`): its control plane is trusted. Ours is an allow-list
(docs/security.md, "Role attributes"): the attributes below, by name, in any letter case, words
separated by spaces or `_` (`CONNECTION LIMIT`, `connection_limit`). Nothing of the spec's text
reaches SQL: the planner writes the keyword from this table and the value as a literal.

- no value: LOGIN NOLOGIN CREATEDB NOCREATEDB CREATEROLE NOCREATEROLE INHERIT NOINHERIT, and
  the harmless negatives NOSUPERUSER NOREPLICATION NOBYPASSRLS;
- `CONNECTION LIMIT` n: an integer from -1 (no limit) to 2147483647;
- `VALID UNTIL` ts: `infinity`, or an ISO 8601 date or date and time, with an optional `Z` or
  `+HH:MM` offset (none: UTC).

Refused (nothing is applied, the spec is invalid): SUPERUSER, BYPASSRLS, REPLICATION (see
REFUSED for why each), options that are not attributes (PASSWORD: the password is
`encrypted_password`; IN ROLE, ROLE, ADMIN, USER, SYSID: memberships are not the spec's), an
attribute set twice (LOGIN with NOLOGIN), a flag with a value, anything unknown. CREATEROLE is
refused on PostgreSQL 15 and older by the planner (it knows the server version).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# keyword -> (attribute in the catalog snapshot, value it sets)
FLAGS: dict[str, tuple[str, bool]] = {
    "LOGIN": ("login", True), "NOLOGIN": ("login", False),
    "CREATEDB": ("createdb", True), "NOCREATEDB": ("createdb", False),
    "CREATEROLE": ("createrole", True), "NOCREATEROLE": ("createrole", False),
    "INHERIT": ("inherit", True), "NOINHERIT": ("inherit", False),
    "NOSUPERUSER": ("superuser", False), "NOREPLICATION": ("replication", False),
    "NOBYPASSRLS": ("bypassrls", False),
}
VALUED: dict[str, str] = {"CONNECTION LIMIT": "connlimit", "VALID UNTIL": "valid_until"}
REFUSED: dict[str, str] = {
    "SUPERUSER": "a superuser owns the compute (files, programs, every other role)",
    "BYPASSRLS": "it ignores every row-level security policy",
    "REPLICATION": "it can run BASE_BACKUP over an ordinary database connection, which copies "
                   "every file of the data directory, and hold WAL with replication slots",
}
NOT_ATTRIBUTES = ("PASSWORD", "ENCRYPTED PASSWORD", "UNENCRYPTED PASSWORD", "IN ROLE", "IN GROUP",
                  "ROLE", "ADMIN", "USER", "SYSID")
# CREATEROLE on PostgreSQL 15 and older may grant membership in any non-superuser role,
# pg_execute_server_program included (COPY ... PROGRAM as the compute's OS user).
CREATEROLE_MIN_VERSION = 160000
CREATEROLE_WHY = ("on PostgreSQL 15 and older a CREATEROLE role can grant itself "
                  "pg_execute_server_program and run programs as the compute's OS user")

NAME = re.compile(r"^[A-Za-z_][A-Za-z_ ]{0,39}\Z")
INT_LIMIT = re.compile(r"^-?[0-9]{1,10}\Z")
TIMESTAMP = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[ T][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?)?"
    r"(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?\Z")
INFINITY = "infinity"
MAX_INT4 = 2**31 - 1


class RoleOptionError(ValueError):
    """One option refused: `str()` says which and why; `index`: its position in the role's list."""

    index: int = 0


@dataclass(frozen=True)
class RoleAttr:
    keyword: str       # the canonical keyword: a key of FLAGS or VALUED
    attribute: str     # its field in the catalog snapshot (compute/reconcile/catalog.py RoleInfo)
    value: bool | int | float  # what the catalog holds once applied (VALID UNTIL: epoch seconds)
    literal: str | None = None  # VALID UNTIL: the timestamp as written to SQL (UTC, explicit offset)


def canonical_name(name: str) -> str:
    """`connection_limit` -> `CONNECTION LIMIT`; RoleOptionError when it is not a name at all."""
    if not isinstance(name, str) or not NAME.match(name):
        raise RoleOptionError(f"{_short(name)} is not a role option name")
    return " ".join(name.replace("_", " ").split()).upper()


def parse_option(name: str, value: str | None) -> RoleAttr:
    """One option as the spec gives it (name, value) -> its typed attribute."""
    key = canonical_name(name)
    if key in REFUSED:
        raise RoleOptionError(f"{key} is refused: {REFUSED[key]}")
    if key in NOT_ATTRIBUTES:
        raise RoleOptionError(f"{key} is not an attribute the spec may set (a password is "
                              "encrypted_password; memberships are not the spec's)")
    if key in FLAGS:
        if value is not None:
            raise RoleOptionError(f"{key} takes no value")
        attribute, flag = FLAGS[key]
        return RoleAttr(key, attribute, flag)
    if key == "CONNECTION LIMIT":
        if value is None or not INT_LIMIT.match(value) or not -1 <= int(value) <= MAX_INT4:
            raise RoleOptionError(f"{key} needs an integer from -1 (no limit) to {MAX_INT4}")
        return RoleAttr(key, "connlimit", int(value))
    if key == "VALID UNTIL":
        return _valid_until(value)
    raise RoleOptionError(f"{_short(key)} is not a role attribute a spec role may hold "
                          f"(allowed: {', '.join([*FLAGS, *VALUED])})")


def parse_options(options) -> tuple[RoleAttr, ...]:
    """Every option of one role (GenericOption-like: .name, .value), in order. Raises
    RoleOptionError with `.index` set to the offending option's position."""
    out: list[RoleAttr] = []
    seen: dict[str, str] = {}
    for i, opt in enumerate(options):
        try:
            attr = parse_option(opt.name, opt.value)
            if attr.attribute in seen:
                raise RoleOptionError(f"{attr.keyword} conflicts with {seen[attr.attribute]} "
                                      "(the same attribute twice)")
        except RoleOptionError as e:
            e.index = i
            raise
        seen[attr.attribute] = attr.keyword
        out.append(attr)
    return tuple(out)


def same_value(attr: RoleAttr, current) -> bool:
    """Whether the catalog's value (`current`, None when unknown) already is what `attr` sets."""
    if current is None:
        return False
    if attr.attribute == "valid_until":
        if math.isinf(attr.value) or math.isinf(current):
            return attr.value == current
        return abs(float(current) - float(attr.value)) < 1e-6
    return current == attr.value


# What CREATE ROLE gives a role when an option does not say (postgres' defaults).
DEFAULTS = {"login": False, "createdb": False, "createrole": False, "inherit": True,
            "superuser": False, "replication": False, "bypassrls": False, "connlimit": -1,
            "valid_until": None}


def _valid_until(value: str | None) -> RoleAttr:
    key = "VALID UNTIL"
    if value is not None and value.lower() == INFINITY:
        return RoleAttr(key, "valid_until", math.inf, INFINITY)
    if value is None or not TIMESTAMP.match(value):
        raise RoleOptionError(f"{key} needs 'infinity' or an ISO 8601 date or date and time "
                              "(e.g. 2030-01-31 or 2030-01-31T12:00:00Z)")
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    if re.search(r"[+-][0-9]{2}[0-9]{2}\Z", text):  # +HHMM -> +HH:MM
        text = text[:-2] + ":" + text[-2:]
    elif re.search(r"[ T][0-9:.]+[+-][0-9]{2}\Z", text):  # +HH -> +HH:00
        text += ":00"
    from datetime import datetime, timezone  # here: a VALID UNTIL is rare, compute-ctl's start needs none (issue 22)
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise RoleOptionError(f"{key}: {_short(value)} is not a valid date and time") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    ts = ts.astimezone(timezone.utc)
    return RoleAttr(key, "valid_until", ts.timestamp(), ts.isoformat(sep=" "))


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
