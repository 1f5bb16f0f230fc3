"""Catalog snapshots: what the planner needs to know about a running cluster.

`snapshot()` is the only place that reads the catalog. It uses a handful of queries on the
maintenance database (the one named in the connstr) and one small query per database whose
per-database facts matter (the spec's databases, the sources of `rename_db` deltas, and
template1 on request). All reads are read-only catalog queries; nothing is logged as DDL.

The result is plain, frozen data (`Catalog`), so the planner is pure and can be unit-tested on
hand-built snapshots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import psycopg

from compute.model.spec import ComputeSpec

from compute.reconcile.errors import CatalogError

ConnFactory = Callable[[str], psycopg.Connection]


@dataclass(frozen=True)
class RoleInfo:
    name: str
    password: str | None = field(default=None, repr=False)  # pg_authid.rolpassword, verbatim
    superuser: bool = False
    # The attributes a spec role's options may set (compute/model/role_options.py), by the
    # names of role_options.FLAGS / VALUED: login, createdb, createrole, inherit, replication,
    # bypassrls, superuser, connlimit, valid_until (epoch seconds, inf, or None: no limit).
    # Empty when not read (hand-built snapshots): every option then counts as differing.
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Subscription:
    dbname: str  # the database it lives in (DROP SUBSCRIPTION must run there)
    name: str


@dataclass(frozen=True)
class DropMarker:
    """Neon's `neon.drop_subscriptions_done` in the maintenance database: the timelines whose
    inherited subscriptions were dropped. Read only when the spec asks for the drop."""

    schema_exists: bool = False
    schema_safe: bool = True   # schema neon owned by a superuser (or absent)
    table_exists: bool = False
    table_safe: bool = True    # the table owned by a superuser, an ordinary table (or absent)
    timelines: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LocalFacts:
    """Facts only visible from inside one database."""

    public_owner: str | None  # owner of schema public; None when there is no such schema
    public_create: frozenset[str] = frozenset()  # roles holding CREATE on public in its ACL
    extensions: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DatabaseInfo:
    name: str
    owner: str
    # Roles holding CREATE in the database's ACL (the default ACL when datacl is NULL: the
    # owner). Explicit entries only: implicit rights (superuser, membership) do not count, so a
    # GRANT is skipped exactly when it would not change the ACL.
    create_grantees: frozenset[str] = frozenset()
    allow_connections: bool = True
    is_template: bool = False
    local: LocalFacts | None = None  # None when not read


@dataclass(frozen=True)
class Catalog:
    server_version_num: int
    maintenance_db: str
    current_user: str
    roles: Mapping[str, RoleInfo]
    databases: Mapping[str, DatabaseInfo]
    # What a database created now starts with (template1's facts), when read. Used to plan
    # per-database steps for databases that do not exist yet (dry runs).
    template: LocalFacts | None = None
    subscriptions: tuple[Subscription, ...] = ()  # every database's (pg_subscription is shared)
    drop_marker: DropMarker | None = None  # None: not read

    @property
    def maintenance(self) -> DatabaseInfo | None:
        return self.databases.get(self.maintenance_db)


# -- queries ------------------------------------------------------------------------------

_Q_SERVER = """
SELECT current_setting('server_version_num')::int, current_database(), current_user,
       (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)
"""

_Q_ROLES = """
SELECT oid, rolname, rolpassword, rolsuper, rolcanlogin, rolcreatedb, rolcreaterole, rolinherit,
       rolreplication, rolbypassrls, rolconnlimit, extract(epoch FROM rolvaliduntil)::float8
  FROM pg_catalog.pg_authid
"""

_Q_SUBSCRIPTIONS = """
SELECT d.datname, s.subname::text
  FROM pg_catalog.pg_subscription s JOIN pg_catalog.pg_database d ON d.oid = s.subdbid
 ORDER BY 1, 2
"""

# Who owns schema neon and neon.drop_subscriptions_done: we write there as the superuser, so a
# table (or schema) a tenant role made first, possibly with triggers, is never touched.
_Q_MARKER = """
SELECT (SELECT r.rolsuper FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner
         WHERE n.nspname = 'neon'),
       (SELECT r.rolsuper AND c.relkind = 'r' AND NOT c.relhastriggers AND NOT c.relhasrules
               AND NOT c.relrowsecurity
          FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_catalog.pg_roles r ON r.oid = c.relowner
         WHERE n.nspname = 'neon' AND c.relname = 'drop_subscriptions_done')
"""
_Q_MARKER_TIMELINES = "SELECT timeline_id::text FROM neon.drop_subscriptions_done"

# aclexplode() detoasts its argument on every row it returns, which is quadratic for a large
# ACL (1,000 grantees x 100 databases takes a second): explode one aclitem at a time instead.
_Q_DATABASES = """
SELECT d.datname, pg_catalog.pg_get_userbyid(d.datdba), d.datallowconn, d.datistemplate,
       ARRAY(SELECT a.grantee
               FROM (SELECT (pg_catalog.aclexplode(ARRAY[i])).*
                       FROM unnest(coalesce(d.datacl, pg_catalog.acldefault('d', d.datdba))) i) a
              WHERE a.privilege_type = 'CREATE')
  FROM pg_catalog.pg_database d
"""

_Q_LOCAL = """
SELECT (SELECT pg_catalog.pg_get_userbyid(nspowner) FROM pg_catalog.pg_namespace WHERE nspname = 'public'),
       ARRAY(SELECT pg_catalog.pg_get_userbyid(a.grantee)
               FROM pg_catalog.pg_namespace n,
                    pg_catalog.aclexplode(coalesce(n.nspacl, pg_catalog.acldefault('n', n.nspowner))) a
              WHERE n.nspname = 'public' AND a.grantee <> 0 AND a.privilege_type = 'CREATE'),
       ARRAY(SELECT extname::text FROM pg_catalog.pg_extension)
"""


def read_local(conn: psycopg.Connection) -> LocalFacts:
    row = conn.execute(_Q_LOCAL).fetchone()
    assert row is not None
    return LocalFacts(public_owner=row[0], public_create=frozenset(row[1]), extensions=frozenset(row[2]))


def read_drop_marker(conn: psycopg.Connection) -> DropMarker:
    schema_super, table_ok = conn.execute(_Q_MARKER).fetchone()  # type: ignore[misc]
    marker = DropMarker(schema_exists=schema_super is not None, schema_safe=schema_super is not False,
                        table_exists=table_ok is not None, table_safe=table_ok is not False)
    if marker.table_exists and marker.schema_safe and marker.table_safe:
        timelines = frozenset(r[0] for r in conn.execute(_Q_MARKER_TIMELINES) if r[0] is not None)
        marker = dataclasses.replace(marker, timelines=timelines)
    return marker


def databases_to_inspect(spec: ComputeSpec) -> list[str]:
    """Databases whose per-database facts the planner may need: the spec's databases and the
    sources and targets of rename_db deltas (a renamed database keeps its contents)."""
    names: dict[str, None] = {}
    for db in spec.cluster.databases:
        names[db.name] = None
    for op in spec.delta_operations:
        if op.action == "rename_db":
            names[op.name] = None
            if op.new_name:
                names[op.new_name] = None
    return list(names)


def snapshot(conn_factory: ConnFactory, spec: ComputeSpec, *, maintenance_db: str | None = None,
             local: bool = True, local_for: Iterable[str] | None = None, template: bool = False) -> Catalog:
    """Read the catalog.

    `conn_factory(dbname)` returns an open connection to that database (it may cache them;
    `compute.reconcile.Connections` does). `maintenance_db` defaults to the factory's
    `maintenance_db` attribute, else "postgres". Per-database facts are read for the spec's
    databases that exist (or for `local_for` when given) and the maintenance database; with
    `template=True` also for template1 (what new databases start with).
    """
    try:
        maint = maintenance_db or getattr(conn_factory, "maintenance_db", None) or "postgres"
    except psycopg.Error as e:
        raise CatalogError(f"cannot connect to postgres: {_pg_message(e)}") from e
    try:
        conn = conn_factory(maint)
        version, current_db, current_user, is_super = conn.execute(_Q_SERVER).fetchone()  # type: ignore[misc]
        if not is_super:
            raise CatalogError(f"the connstr user {current_user!r} is not a superuser: "
                               "cannot read role passwords (pg_authid)")
        names: dict[int, str] = {}
        roles: dict[str, RoleInfo] = {}
        for oid, name, pw, su, login, createdb, createrole, inherit, repl, bypass, connlimit, until \
                in conn.execute(_Q_ROLES):
            names[oid] = name
            roles[name] = RoleInfo(name, pw, su, {
                "superuser": su, "login": login, "createdb": createdb, "createrole": createrole,
                "inherit": inherit, "replication": repl, "bypassrls": bypass, "connlimit": connlimit,
                "valid_until": until})
        dbs_raw = {row[0]: row for row in conn.execute(_Q_DATABASES)}
        maint_local = read_local(conn)
        subscriptions = tuple(Subscription(db, name) for db, name in conn.execute(_Q_SUBSCRIPTIONS))
        marker = read_drop_marker(conn) if spec.drop_subscriptions_before_start else None
    except psycopg.Error as e:
        raise CatalogError(f"reading the catalog in database {maint!r} failed: {_pg_message(e)}") from e

    databases = {
        name: DatabaseInfo(name=name, owner=owner, create_grantees=_names(grantees, names),
                           allow_connections=allow, is_template=is_tmpl,
                           local=maint_local if name == current_db else None)
        for name, (_, owner, allow, is_tmpl, grantees) in dbs_raw.items()
    }
    catalog = Catalog(server_version_num=version, maintenance_db=current_db, current_user=current_user,
                      roles=roles, databases=databases, subscriptions=subscriptions, drop_marker=marker)
    if local or template:
        names_ = (list(local_for) if local_for is not None else databases_to_inspect(spec)) if local else []
        catalog = with_local_facts(catalog, conn_factory, names_, template=template)
    return catalog


def with_local_facts(catalog: Catalog, conn_factory: ConnFactory, dbnames: Iterable[str], *,
                     template: bool = False) -> Catalog:
    """`catalog` plus the per-database facts of `dbnames` (those that exist and accept
    connections; others are left unread) and, with `template=True`, of template1."""
    dbs = catalog.databases
    todo = [n for n in dict.fromkeys(dbnames)
            if n in dbs and dbs[n].local is None and dbs[n].allow_connections]
    facts = _read_locals(conn_factory, todo)
    template_facts = catalog.template
    if template and template_facts is None and "template1" in dbs:
        template_facts = facts.get("template1") or dbs["template1"].local
        if template_facts is None:
            template_facts = _read_local_in(conn_factory, "template1")
            # a session in template1 makes CREATE DATABASE fail elsewhere: leave at once
            discard = getattr(conn_factory, "discard", None)
            if discard is not None:
                discard("template1")
    databases = {name: (dataclasses.replace(d, local=facts[name]) if name in facts else d)
                 for name, d in dbs.items()}
    return dataclasses.replace(catalog, databases=databases, template=template_facts)


def _read_locals(conn_factory: ConnFactory, names: list[str]) -> dict[str, LocalFacts]:
    mapper = getattr(conn_factory, "map", None)
    if mapper is None or len(names) <= 1:
        return {name: _read_local_in(conn_factory, name) for name in names}

    def read(conn: psycopg.Connection) -> LocalFacts:
        try:
            return read_local(conn)
        except psycopg.Error as e:
            raise CatalogError(f"reading the catalog in database {conn.info.dbname!r} failed: "
                               f"{_pg_message(e)}") from e

    try:
        return mapper(names, read)
    except psycopg.Error as e:  # connecting failed
        raise CatalogError(f"reading per-database facts failed: {_pg_message(e)}") from e


def _read_local_in(conn_factory: ConnFactory, dbname: str) -> LocalFacts:
    try:
        conn = conn_factory(dbname)
        return read_local(conn)
    except psycopg.Error as e:
        raise CatalogError(f"reading the catalog in database {dbname!r} failed: {_pg_message(e)}") from e


def _names(oids: Iterable[int], names: Mapping[int, str]) -> frozenset[str]:
    return frozenset(names[oid] for oid in oids if oid in names)  # 0 is PUBLIC: not a role


def _pg_message(e: BaseException) -> str:
    diag: Any = getattr(e, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    return primary or str(e).strip() or type(e).__name__
