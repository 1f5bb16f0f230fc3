"""The reconciliation planner: catalog snapshot + spec -> ordered statements (pure, no I/O).

`plan(catalog, spec, superuser=...)` follows compute_ctl's "apply the spec" order (contract §5):

  phase 1  0. subscriptions of the databases delete_db deltas name (Neon's pre-dropdb
              DropLogicalSubscriptions: DROP DATABASE refuses a database that has some), in
              that database: ALTER SUBSCRIPTION s DISABLE, SET (slot_name = NONE), DROP;
           1. roles, one transaction in the maintenance db: rename_role deltas (old exists, new
              does not), then CREATE ROLE ... <options> LOGIN PASSWORD ... + GRANT
              pg_read_all_data, pg_write_all_data for missing roles, ALTER ROLE ... <options>
              LOGIN PASSWORD ... where the stored password differs, ALTER ROLE ... <options>
              where only an attribute the options set differs (role.options: the allow-list
              of compute/model/role_options.py; NOLOGIN replaces LOGIN);
           2. databases, autocommit in the maintenance db (CREATE/DROP DATABASE cannot run in a
              transaction): delete_db / rename_db deltas in their listed order, CREATE DATABASE
              <options> OWNER <owner> for missing ones, ALTER DATABASE ... OWNER TO where it differs;
  phase 2  3. role deletions: in every spec database not owned by the role, one transaction with
              REASSIGN OWNED BY r TO <db owner>; DROP OWNED BY r; then DROP ROLE IF EXISTS for
              all of them in one transaction;
           4. grants: GRANT CREATE ON DATABASE db TO <spec roles lacking it> (one transaction);
              in each spec database: ALTER SCHEMA public OWNER TO <db owner> when public is owned
              by cloud_admin, zenith_admin or the connstr superuser, and on PG >= 15 GRANT CREATE
              ON SCHEMA public TO web_access when that role exists;
           5. with drop_subscriptions_before_start, unless neon.drop_subscriptions_done holds
              the spec's timeline: in every database that has subscriptions, the same three
              statements for each (Neon's per-database DropLogicalSubscriptions);
           6. extensions: CREATE EXTENSION IF NOT EXISTS pg_stat_statements SCHEMA public in the maintenance db
              when shared_preload_libraries lists it;
           7. after a drop of 5: the timeline recorded in neon.drop_subscriptions_done (schema and
              table created when missing; Neon's FinalizeDropLogicalSubscriptions).

Every statement is emitted only when the snapshot says it would change something, so
re-planning after an apply yields an empty plan (idempotent and quiet).

Phases. Phase 2 depends on what phase 1 does (grants in a database created by this apply, the
owner of schema public inside it, role deletions after renames). The planner plans both phases
from one snapshot by simulating phase 1's effects on an in-memory model of the catalog; a
database that does not exist yet is assumed to start like template1 (`Catalog.template`), or
like a fresh PG15 database when that was not read. That is what a dry run shows. A real apply
(`compute.reconcile.apply_spec`) does not rely on the simulation for phase 2: it executes phase
1, takes a fresh snapshot (with per-database facts), plans again, checks that phase 1 is now
empty, and executes phase 2 of that plan. The planner stays pure in both cases; the executor
and `apply_spec` do all the I/O.

SQL is only ever built with psycopg's `sql` composition: names go through `sql.Identifier`,
values through `sql.Literal`; the only raw `sql.SQL` fragments are fixed keywords and database
option names/bare values that match the strict patterns spec.py also enforces (checked again
here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from psycopg import sql

from compute.model import role_options
from compute.model.role_options import RoleAttr
from compute.model.spec import (BARE_VALUE, MAX_NAME_BYTES, OPTION_KEYWORD, ComputeSpec, GenericOption,
                          valid_password_hash)

from compute.reconcile.catalog import Catalog, LocalFacts
from compute.reconcile.errors import PlanError

ADMIN_ROLES = frozenset({"cloud_admin", "zenith_admin"})
RESERVED_ROLE_NAMES = frozenset({"public", "none"})  # CREATE ROLE rejects these (and pg_*)
PROTECTED_DATABASES = frozenset({"template0", "template1"})
PG_STAT_STATEMENTS = "pg_stat_statements"
WEB_ACCESS = "web_access"
_MD5 = re.compile(r"^[0-9a-f]{32}\Z")
_REDACTED = sql.SQL("[redacted]")


@dataclass(frozen=True)
class Statement:
    sql: sql.Composable
    redacted: sql.Composable  # the same statement with secrets replaced by [redacted]
    # Databases our own connections to which must be closed first (the database dropped or
    # renamed, the template of CREATE DATABASE).
    closes: tuple[str, ...] = ()
    # May run concurrently with its neighbours that are parallel_safe too (CREATE DATABASE).
    parallel_safe: bool = False

    def render(self, context=None) -> str:
        """The SQL text (context: a connection or cursor for exact quoting; None works too)."""
        return self.sql.as_string(context)

    def render_redacted(self, context=None) -> str:
        return self.redacted.as_string(context)

    @property
    def carries_secret(self) -> bool:
        """True when the statement holds a password hash (its redacted form differs)."""
        return self.redacted is not self.sql


@dataclass(frozen=True)
class Step:
    """Statements to run in one database, all in one transaction or each on its own."""

    dbname: str
    transactional: bool
    statements: tuple[Statement, ...]
    phase: int
    purpose: str  # "roles", "databases", "role deletions", "grants", "schema public", "extensions"


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...] = ()
    notes: tuple[str, ...] = ()  # things deliberately skipped, for the log

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def statement_count(self) -> int:
        return sum(len(s.statements) for s in self.steps)

    @property
    def is_empty(self) -> bool:
        return self.statement_count == 0

    def phase(self, n: int) -> "Plan":
        return Plan(tuple(s for s in self.steps if s.phase == n), self.notes)

    def statements(self) -> Iterator[tuple[Step, Statement]]:
        for step in self.steps:
            for st in step.statements:
                yield step, st

    def render(self, context=None) -> list[tuple[str, str]]:
        """[(dbname, redacted statement text)] in execution order."""
        return [(step.dbname, st.render_redacted(context)) for step, st in self.statements()]


# -- statement helpers --------------------------------------------------------------------

def _st(template: str, *args: sql.Composable, closes: tuple[str, ...] = (),
        parallel_safe: bool = False) -> Statement:
    q = sql.SQL(template).format(*args)
    return Statement(q, q, closes, parallel_safe)


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def stored_password(encrypted_password: str | None) -> str | None:
    """What pg_authid.rolpassword holds after `PASSWORD <this>`: md5 hashes get their prefix."""
    if encrypted_password is None:
        return None
    if _MD5.match(encrypted_password):
        return "md5" + encrypted_password
    return encrypted_password  # 'md5<hash>' already, or a SCRAM verifier (verbatim)


def md5_replay_note(role: str) -> str:
    """Said once per md5 verifier written (docs/security.md, "Role passwords"): postgres' md5
    challenge is answered with the stored hash alone, and every spec role reads pg_authid."""
    return (f"role {role!r} gets an md5 password hash: anyone who reads it can log in as {role!r} "
            "(the hash answers the md5 challenge), and every spec role can read it (pg_read_all_data "
            "reads pg_authid); a scram-sha-256 verifier in the spec closes this")


def _role_options(password: str | None, login: str = "LOGIN") -> tuple[sql.Composable, sql.Composable]:
    kw = sql.SQL({"LOGIN": "LOGIN", "NOLOGIN": "NOLOGIN"}[login])
    if password is None:
        q = sql.SQL("{} PASSWORD NULL").format(kw)
        return q, q
    return (sql.SQL("{} PASSWORD {}").format(kw, sql.Literal(password)),
            sql.SQL("{} PASSWORD {}").format(kw, _REDACTED))


def _attr_sql(attr: RoleAttr) -> sql.Composable:
    """One role attribute: the keyword from role_options' fixed table, the value as a literal."""
    if attr.keyword in role_options.FLAGS:
        return sql.SQL(attr.keyword)
    if attr.keyword == "CONNECTION LIMIT":
        return sql.SQL("CONNECTION LIMIT " + str(int(attr.value)))  # an int: checked grammar
    if attr.keyword == "VALID UNTIL":
        return sql.SQL("VALID UNTIL {}").format(sql.Literal(attr.literal))
    raise PlanError(f"unknown role attribute {attr.keyword!r}")  # role_options refuses it first


def _attrs_sql(attrs: Iterable[RoleAttr]) -> list[sql.Composable]:
    return [_attr_sql(a) for a in attrs]


def _subscription_drops(subnames: Iterable[str]) -> tuple[Statement, ...]:
    """Neon's sql/drop_subscriptions.sql, statement by statement: disabled first (its worker
    stops), detached from its remote slot (the slot is the publisher's, left as it is: a
    branch's inherited subscription points at its parent's), then dropped."""
    out: list[Statement] = []
    for name in subnames:
        out.append(_st("ALTER SUBSCRIPTION {} DISABLE", _ident(name)))
        out.append(_st("ALTER SUBSCRIPTION {} SET (slot_name = NONE)", _ident(name)))
        out.append(_st("DROP SUBSCRIPTION {}", _ident(name)))
    return tuple(out)


def _db_option(opt: GenericOption, where: str) -> sql.Composable:
    if not OPTION_KEYWORD.match(opt.name) or opt.name.lower() == "owner":
        raise PlanError(f"{where}: {opt.name!r} is not a usable database option")
    if opt.value is None:
        return sql.SQL(opt.name)
    if opt.vartype == "string":
        return sql.SQL("{} {}").format(sql.SQL(opt.name), sql.Literal(opt.value))
    if not BARE_VALUE.match(opt.value):
        raise PlanError(f"{where}: value of option {opt.name!r} is not a plain {opt.vartype} value")
    return sql.SQL("{} {}").format(sql.SQL(opt.name), sql.SQL(opt.value))


# -- the model phase 1 mutates ------------------------------------------------------------

@dataclass
class _Db:
    owner: str
    create: set[str]
    local: LocalFacts | None
    exists_now: bool  # exists in the snapshot (False: created by this plan)


@dataclass
class _State:
    version: int
    maintenance_db: str
    roles: dict[str, str | None]  # name -> stored password
    dbs: dict[str, _Db]
    template: LocalFacts
    attrs: dict[str, dict] = field(default_factory=dict)  # name -> role attributes (catalog.RoleInfo)
    subscriptions: dict[str, list[str]] = field(default_factory=dict)  # dbname -> subscription names
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, catalog: Catalog, superuser: str) -> "_State":
        template = catalog.template or _default_template(catalog.server_version_num, superuser)
        subs: dict[str, list[str]] = {}
        for sub in catalog.subscriptions:
            subs.setdefault(sub.dbname, []).append(sub.name)
        return cls(
            version=catalog.server_version_num,
            maintenance_db=catalog.maintenance_db,
            roles={name: r.password for name, r in catalog.roles.items()},
            dbs={name: _Db(d.owner, set(d.create_grantees), d.local, True) for name, d in catalog.databases.items()},
            template=template,
            attrs={name: dict(r.attributes) for name, r in catalog.roles.items()},
            subscriptions=subs,
        )

    def rename_role(self, old: str, new: str) -> None:
        self.attrs[new] = self.attrs.pop(old, {})
        password = self.roles.pop(old)
        # ALTER ROLE ... RENAME clears an md5 password (the hash is salted with the name).
        self.roles[new] = None if password is not None and password.startswith("md5") else password
        for db in self.dbs.values():  # ACLs and owners refer to OIDs: they follow the rename
            if db.owner == old:
                db.owner = new
            if old in db.create:
                db.create.discard(old)
                db.create.add(new)
            if db.local is not None:
                db.local = _rename_in_local(db.local, old, new)


def _rename_in_local(local: LocalFacts, old: str, new: str) -> LocalFacts:
    owner = new if local.public_owner == old else local.public_owner
    create = frozenset(new if r == old else r for r in local.public_create)
    return LocalFacts(owner, create, local.extensions)


def _default_template(version: int, superuser: str) -> LocalFacts:
    if version >= 150000:
        return LocalFacts("pg_database_owner", frozenset({"pg_database_owner"}), frozenset({"plpgsql"}))
    return LocalFacts(superuser, frozenset({superuser}), frozenset({"plpgsql"}))


# -- validation ----------------------------------------------------------------------------

def _check_name(name: str, what: str) -> None:
    if not name or "\x00" in name:
        raise PlanError(f"{what} name {name!r} is empty or contains a NUL byte")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise PlanError(f"{what} name {name!r} is longer than {MAX_NAME_BYTES} bytes "
                        "(postgres would truncate it)")


def _protected_role(name: str, catalog: Catalog, superuser: str) -> str | None:
    if name in (superuser, catalog.current_user):
        return "it is the connstr superuser"
    if name.startswith("pg_"):
        return "pg_* roles are built-in"
    if name in RESERVED_ROLE_NAMES:
        return "the name is reserved by postgres"
    return None


def _validate(catalog: Catalog, spec: ComputeSpec, superuser: str) -> None:
    spec_roles = {r.name for r in spec.cluster.roles}
    spec_dbs = {d.name for d in spec.cluster.databases}
    for r in spec.cluster.roles:
        _check_name(r.name, "role")
        why = _protected_role(r.name, catalog, superuser)
        if why:
            raise PlanError(f"cluster.roles: role {r.name!r} cannot be managed by the spec: {why}")
        for attr in _role_attrs(r.name, r.options):
            if attr.keyword == "CREATEROLE" and catalog.server_version_num < role_options.CREATEROLE_MIN_VERSION:
                raise PlanError(f"cluster.roles: role {r.name!r}: option CREATEROLE is refused: "
                                f"{role_options.CREATEROLE_WHY}")
        if r.encrypted_password is not None and not valid_password_hash(r.encrypted_password):
            # never echo the value: it may be a plain password
            raise PlanError(f"cluster.roles: the encrypted_password of role {r.name!r} is neither an md5 "
                            "hash nor a valid SCRAM-SHA-256 verifier (postgres would take it for a "
                            "plain password)")
    for d in spec.cluster.databases:
        _check_name(d.name, "database")
        _check_name(d.owner, "role")
        if d.owner not in spec_roles and d.owner not in (superuser, catalog.current_user):
            raise PlanError(f"cluster.databases: database {d.name!r} is owned by role {d.owner!r}, "
                            "which is not defined in cluster.roles")
        for opt in d.options:
            _db_option(opt, f"cluster.databases: database {d.name!r}")
    protected_dbs = PROTECTED_DATABASES | {catalog.maintenance_db}
    targets: dict[str, set[str]] = {"rename_role": set(), "rename_db": set()}
    for i, op in enumerate(spec.delta_operations):
        where = f"delta_operations[{i}] ({op.action} {op.name!r})"
        kind = "role" if op.action.endswith("_role") else "database"
        _check_name(op.name, kind)
        if op.action.startswith("rename_"):
            if not op.new_name:
                raise PlanError(f"{where}: new_name is required")
            _check_name(op.new_name, kind)
            if op.new_name in targets[op.action]:
                raise PlanError(f"{where}: two rename operations target {op.new_name!r}")
            targets[op.action].add(op.new_name)
        if kind == "role":
            for name in (op.name, op.new_name):
                if name is None:
                    continue
                why = _protected_role(name, catalog, superuser)
                if why:
                    raise PlanError(f"{where}: refusing to touch role {name!r}: {why}")
            if op.action == "delete_role" and op.name in spec_roles:
                raise PlanError(f"{where}: role {op.name!r} is also listed in cluster.roles "
                                "(it would be created and dropped on every apply)")
        else:
            if op.name in protected_dbs:
                raise PlanError(f"{where}: refusing to {op.action.split('_')[0]} database {op.name!r}")
            if op.action == "delete_db" and op.name in spec_dbs:
                raise PlanError(f"{where}: database {op.name!r} is also listed in cluster.databases "
                                "(it would be dropped and recreated on every apply)")


def _role_attrs(role: str, options) -> tuple[RoleAttr, ...]:
    """The spec role's options, checked again (a stored spec is not re-validated)."""
    try:
        return role_options.parse_options(options)
    except role_options.RoleOptionError as e:
        raise PlanError(f"cluster.roles: role {role!r}: {e}") from None


def _drop_wanted(catalog: Catalog, spec: ComputeSpec) -> bool:
    """drop_subscriptions_before_start asks for the drop and it was not done on this timeline
    (Neon's compute_ctl: once per timeline, recorded in neon.drop_subscriptions_done)."""
    if not spec.drop_subscriptions_before_start or spec.timeline_id is None:
        return False
    marker = catalog.drop_marker
    if marker is None:
        raise PlanError("drop_subscriptions_before_start: the catalog snapshot has no "
                        "neon.drop_subscriptions_done facts (read with this spec)")
    if not marker.schema_safe or not marker.table_safe:
        raise PlanError("drop_subscriptions_before_start: schema neon or neon.drop_subscriptions_done in "
                        f"database {catalog.maintenance_db!r} is not a plain table owned by a superuser: "
                        "refusing to write the drop record there (a role of the tenant's made it?)")
    return spec.timeline_id not in marker.timelines


# -- the planner ---------------------------------------------------------------------------

def plan(catalog: Catalog, spec: ComputeSpec, *, superuser: str, phases: Iterable[int] = (1, 2)) -> Plan:
    """Plan the statements that bring the cluster described by `catalog` to `spec`."""
    _validate(catalog, spec, superuser)
    phases = set(phases)
    drop = _drop_wanted(catalog, spec)
    state = _State.of(catalog, superuser)
    steps: list[Step] = []
    steps += _plan_predrop_subscriptions(state, spec)
    steps += _plan_roles(state, spec)
    steps += _plan_databases(state, spec)
    if 2 in phases:
        steps += _plan_role_deletions(state, spec)
        steps += _plan_grants(state, spec, admins=ADMIN_ROLES | {superuser, catalog.current_user})
        if drop:
            steps += _plan_inherited_subscriptions(state, catalog)
        steps += _plan_extensions(state, spec)
        if drop:
            steps += _plan_drop_marker(state, catalog, spec)
    steps = [s for s in steps if s.statements and s.phase in phases]
    return Plan(tuple(steps), tuple(state.notes))


def _plan_roles(state: _State, spec: ComputeSpec) -> list[Step]:
    out: list[Statement] = []
    for op in spec.delta_operations:
        if op.action != "rename_role" or op.name not in state.roles:
            continue
        assert op.new_name is not None
        if op.new_name in state.roles:
            state.notes.append(f"rename_role {op.name!r} -> {op.new_name!r} skipped: "
                               f"role {op.new_name!r} already exists")
            continue
        out.append(_st("ALTER ROLE {} RENAME TO {}", _ident(op.name), _ident(op.new_name)))
        state.rename_role(op.name, op.new_name)

    for role in spec.cluster.roles:
        want = stored_password(role.encrypted_password)
        name = _ident(role.name)
        attrs = _role_attrs(role.name, role.options)
        login = "NOLOGIN" if any(a.keyword == "NOLOGIN" for a in attrs) else "LOGIN"
        # LOGIN / NOLOGIN is written with the password, as before; the other options before it.
        extra = _attrs_sql(a for a in attrs if a.attribute != "login")
        opts, opts_redacted = _role_options(want, login)
        if want is not None and want.startswith("md5") and state.roles.get(role.name, "") != want:
            state.notes.append(md5_replay_note(role.name))
        if role.name not in state.roles:
            q = sql.SQL("CREATE ROLE {} {}")
            out.append(Statement(q.format(name, _join(extra, opts)), q.format(name, _join(extra, opts_redacted))))
            if state.version >= 140000:
                out.append(_st("GRANT pg_read_all_data, pg_write_all_data TO {}", name))
            state.roles[role.name] = want
            state.attrs[role.name] = {**role_options.DEFAULTS, "login": login == "LOGIN",
                                      **{a.attribute: a.value for a in attrs}}
            continue
        current = state.attrs.setdefault(role.name, {})
        if state.roles[role.name] != want:
            q = sql.SQL("ALTER ROLE {} {}")
            out.append(Statement(q.format(name, _join(extra, opts)), q.format(name, _join(extra, opts_redacted))))
            state.roles[role.name] = want
            current["login"] = login == "LOGIN"
        elif any(not role_options.same_value(a, current.get(a.attribute)) for a in attrs):
            # Only attributes differ: no password, no implicit LOGIN (a role the spec does not
            # say NOLOGIN/LOGIN for keeps what it has, as before options were applied).
            out.append(_st("ALTER ROLE {} {}", name, _join(_attrs_sql(attrs))))
        current.update({a.attribute: a.value for a in attrs})
    return [Step(state.maintenance_db, True, tuple(out), 1, "roles")]


def _join(*parts) -> sql.Composable:
    flat: list[sql.Composable] = []
    for p in parts:
        flat.extend(p if isinstance(p, list) else [p])
    return sql.SQL(" ").join(flat)


def _plan_predrop_subscriptions(state: _State, spec: ComputeSpec) -> list[Step]:
    steps = []
    for op in spec.delta_operations:
        if op.action != "delete_db" or op.name not in state.dbs or not state.subscriptions.get(op.name):
            continue
        steps.append(Step(op.name, True, _subscription_drops(state.subscriptions.pop(op.name)), 1,
                          "subscriptions"))
    return steps


def _plan_inherited_subscriptions(state: _State, catalog: Catalog) -> list[Step]:
    """Every database's subscriptions (pg_subscription is shared: the snapshot names them all),
    the maintenance database's too, unlike Neon's (it skips `postgres`)."""
    steps = []
    for dbname, names in sorted(state.subscriptions.items()):
        if dbname not in state.dbs:
            continue
        info = catalog.databases.get(dbname)
        if info is not None and not info.allow_connections:
            state.notes.append(f"database {dbname!r} does not allow connections: its subscriptions "
                               f"({', '.join(names)}) are not dropped")
            continue
        steps.append(Step(dbname, True, _subscription_drops(names), 2, "subscriptions"))
    state.subscriptions = {}
    return steps


def _plan_drop_marker(state: _State, catalog: Catalog, spec: ComputeSpec) -> list[Step]:
    """Neon's sql/finalize_drop_subscriptions.sql: row 1 holds the last timeline done. The
    schema and the table are created only when missing (no IF NOT EXISTS: one a tenant role
    makes meanwhile fails the statement instead of being written to)."""
    marker = catalog.drop_marker
    assert marker is not None
    out: list[Statement] = []
    if not marker.schema_exists:
        out.append(_st("CREATE SCHEMA neon"))
    if not marker.table_exists:
        out.append(_st("CREATE TABLE neon.drop_subscriptions_done (id pg_catalog.int4 PRIMARY KEY "
                       "GENERATED BY DEFAULT AS IDENTITY, timeline_id pg_catalog.text)"))
    out.append(_st("INSERT INTO neon.drop_subscriptions_done (id, timeline_id) VALUES (1, {}) "
                   "ON CONFLICT (id) DO UPDATE SET timeline_id = EXCLUDED.timeline_id",
                   sql.Literal(spec.timeline_id)))
    return [Step(state.maintenance_db, True, tuple(out), 2, "subscriptions dropped")]


def _plan_databases(state: _State, spec: ComputeSpec) -> list[Step]:
    out: list[Statement] = []
    drop_q = "DROP DATABASE IF EXISTS {} WITH (FORCE)" if state.version >= 130000 else "DROP DATABASE IF EXISTS {}"
    for op in spec.delta_operations:
        if op.action == "delete_db" and op.name in state.dbs:
            out.append(_st(drop_q, _ident(op.name), closes=(op.name,)))
            del state.dbs[op.name]
        elif op.action == "rename_db" and op.name in state.dbs:
            assert op.new_name is not None
            if op.new_name in state.dbs:
                state.notes.append(f"rename_db {op.name!r} -> {op.new_name!r} skipped: "
                                   f"database {op.new_name!r} already exists")
                continue
            out.append(_st("ALTER DATABASE {} RENAME TO {}", _ident(op.name), _ident(op.new_name),
                           closes=(op.name,)))
            state.dbs[op.new_name] = state.dbs.pop(op.name)

    for db in spec.cluster.databases:
        current = state.dbs.get(db.name)
        if current is None:
            opts = [_db_option(o, f"database {db.name!r}") for o in db.options]
            template = next((o.value for o in db.options if o.name.lower() == "template" and o.value),
                            "template1")
            out.append(_st("CREATE DATABASE {}{} OWNER {}", _ident(db.name),
                           sql.SQL("").join(sql.SQL(" {}").format(o) for o in opts), _ident(db.owner),
                           closes=(template,), parallel_safe=True))
            state.dbs[db.name] = _Db(db.owner, {db.owner}, state.template, False)
        elif current.owner != db.owner:
            out.append(_st("ALTER DATABASE {} OWNER TO {}", _ident(db.name), _ident(db.owner)))
            if current.owner in current.create:  # the new owner inherits the old owner's rights
                current.create.discard(current.owner)
                current.create.add(db.owner)
            current.owner = db.owner
    return [Step(state.maintenance_db, False, tuple(out), 1, "databases")]


def _plan_role_deletions(state: _State, spec: ComputeSpec) -> list[Step]:
    doomed: list[str] = []
    for op in spec.delta_operations:
        if op.action == "delete_role" and op.name in state.roles and op.name not in doomed:
            doomed.append(op.name)
    if not doomed:
        return []
    steps = []
    for db in spec.cluster.databases:
        owner = state.dbs[db.name].owner if db.name in state.dbs else db.owner
        out: list[Statement] = []
        for role in doomed:
            if role == owner:
                continue
            out.append(_st("REASSIGN OWNED BY {} TO {}", _ident(role), _ident(owner)))
            out.append(_st("DROP OWNED BY {}", _ident(role)))
        steps.append(Step(db.name, True, tuple(out), 2, "role deletions"))
    drops = tuple(_st("DROP ROLE IF EXISTS {}", _ident(role)) for role in doomed)
    steps.append(Step(state.maintenance_db, True, drops, 2, "role deletions"))
    for role in doomed:
        del state.roles[role]
        for d in state.dbs.values():
            d.create.discard(role)
    return steps


def _plan_grants(state: _State, spec: ComputeSpec, *, admins: frozenset[str]) -> list[Step]:
    role_names = [r.name for r in spec.cluster.roles]
    grants: list[Statement] = []
    for db in spec.cluster.databases:
        current = state.dbs[db.name]
        missing = [r for r in role_names if r not in current.create]
        if missing:
            grants.append(_st("GRANT CREATE ON DATABASE {} TO {}", _ident(db.name),
                              sql.SQL(", ").join(_ident(r) for r in missing)))
            current.create.update(missing)
    steps = [Step(state.maintenance_db, True, tuple(grants), 2, "grants")]

    web_access = state.version >= 150000 and WEB_ACCESS in state.roles
    for db in spec.cluster.databases:
        current = state.dbs[db.name]
        local = current.local
        if local is None:
            state.notes.append(f"database {db.name!r}: schema public not inspected (no per-database facts; connections not allowed?)")
            continue
        out: list[Statement] = []
        owner = local.public_owner
        if owner is not None and owner in admins and owner != db.owner:
            out.append(_st("ALTER SCHEMA public OWNER TO {}", _ident(db.owner)))
            owner = db.owner
        create = set(local.public_create)
        if owner == db.owner and local.public_owner in create:
            create.add(db.owner)
        if web_access and owner is not None and WEB_ACCESS not in create:
            out.append(_st("GRANT CREATE ON SCHEMA public TO {}", _ident(WEB_ACCESS)))
            create.add(WEB_ACCESS)
        current.local = LocalFacts(owner, frozenset(create), local.extensions)
        steps.append(Step(db.name, True, tuple(out), 2, "schema public"))
    return steps


def preload_libraries(spec: ComputeSpec) -> list[str]:
    value = spec.setting("shared_preload_libraries") or ""
    return [lib.strip().strip('"').strip() for lib in value.split(",") if lib.strip()]


def _plan_extensions(state: _State, spec: ComputeSpec) -> list[Step]:
    if PG_STAT_STATEMENTS not in preload_libraries(spec):
        return []
    maint = state.dbs.get(state.maintenance_db)
    if maint is not None and maint.local is not None and PG_STAT_STATEMENTS in maint.local.extensions:
        return []
    # In schema public, where an unpinned session would put it: our sessions pin search_path to
    # pg_catalog (compute/postgres/sessions.py), which no extension may be created in.
    st = _st("CREATE EXTENSION IF NOT EXISTS {} SCHEMA public", _ident(PG_STAT_STATEMENTS))
    return [Step(state.maintenance_db, True, (st,), 2, "extensions")]


# -- presentation -------------------------------------------------------------------------

def _display(name: str) -> str:
    """A one-line, unambiguous rendering of a name for headers (control characters escaped)."""
    out = []
    for ch in name:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return '"' + "".join(out) + '"'


def format_plan(plan: Plan, context=None) -> str:
    """The statements a reconfiguration would run, one per line, grouped by database and
    transaction, passwords shown as [redacted]. `context`: a connection for exact quoting."""
    if plan.is_empty:
        return "-- nothing to do\n"
    lines: list[str] = []
    for step in plan.steps:
        mode = "one transaction" if step.transactional else "autocommit"
        lines.append(f"-- database {_display(step.dbname)}: {step.purpose} ({mode}, phase {step.phase})")
        lines.extend(st.render_redacted(context) + ";" for st in step.statements)
    for note in plan.notes:
        lines.append(f"-- note: {note}")
    return "\n".join(lines) + "\n"
