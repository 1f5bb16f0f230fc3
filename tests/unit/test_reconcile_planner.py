"""Unit tests of the pure reconciliation planner on hand-built catalog snapshots."""

from __future__ import annotations

import dataclasses

import pytest
from psycopg import sql

from compute.reconcile import (Catalog, DatabaseInfo, LocalFacts, Plan, PlanError, RoleInfo,
                               format_plan, plan, stored_password)
from compute.model.spec import ComputeSpec, Cluster, Database, DeltaOp, GenericOption, Role, parse_spec

SU = "cloud_admin"
MD5_A = "a" * 32
MD5_B = "b" * 32
SCRAM = "SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$bpSY5Ze9NUH+I35LC3gVq+DpBfK46iXBxvhAKqVu9pE=:VpYlBuxyzeCI1KnctrefdljpB1mk3Gp7sBI/t11+NkQ="  # a real verifier
PG15_PUBLIC = LocalFacts("pg_database_owner", frozenset({"pg_database_owner"}), frozenset({"plpgsql"}))
BUILTIN = ("pg_read_all_data", "pg_write_all_data", "pg_database_owner", "pg_monitor")


# -- helpers ------------------------------------------------------------------------------

def catalog(roles: dict[str, str | None] | None = None, dbs: dict[str, str] | None = None, *,
            version: int = 150004, local: dict[str, LocalFacts] | None = None,
            grants: dict[str, set[str]] | None = None, maint_ext: frozenset[str] = frozenset({"plpgsql"}),
            template: LocalFacts | None = None, superuser: str = SU) -> Catalog:
    """A cluster fresh from initdb plus the given roles {name: stored password} and databases
    {name: owner}; every database's public schema is PG15-like unless `local` says otherwise."""
    all_roles = {superuser: RoleInfo(superuser, None, True)}
    all_roles.update({b: RoleInfo(b) for b in BUILTIN})
    all_roles.update({n: RoleInfo(n, pw) for n, pw in (roles or {}).items()})
    local = local or {}
    grants = grants or {}
    all_dbs = {
        "postgres": DatabaseInfo("postgres", superuser, frozenset({superuser}),
                                 local=LocalFacts("pg_database_owner", frozenset({"pg_database_owner"}), maint_ext)),
        "template1": DatabaseInfo("template1", superuser, frozenset({superuser}), is_template=True),
        "template0": DatabaseInfo("template0", superuser, frozenset({superuser}), allow_connections=False,
                                  is_template=True),
    }
    for name, owner in (dbs or {}).items():
        all_dbs[name] = DatabaseInfo(name, owner, frozenset({owner}) | frozenset(grants.get(name, ())),
                                     local=local.get(name, PG15_PUBLIC))
    return Catalog(version, "postgres", superuser, all_roles, all_dbs, template)


def spec(roles=(), dbs=(), deltas=(), settings=()) -> ComputeSpec:
    """roles: (name, password) pairs; dbs: (name, owner[, options]); deltas: (action, name[, new])."""
    return parse_spec({
        "format_version": 1.0,
        "cluster": {
            "roles": [{"name": n, "encrypted_password": pw} for n, pw in roles],
            "databases": [{"name": d[0], "owner": d[1], "options": d[2] if len(d) > 2 else None} for d in dbs],
            "settings": [{"name": k, "value": v, "vartype": "string"} for k, v in settings],
        },
        "delta_operations": [{"action": d[0], "name": d[1], **({"new_name": d[2]} if len(d) > 2 else {})}
                             for d in deltas],
    }, superuser=SU)


def raw_spec(roles=(), dbs=(), deltas=()) -> ComputeSpec:
    """A ComputeSpec built without spec.py's validation (to test the planner's own checks)."""
    return ComputeSpec(1.0, Cluster(None, None, None, tuple(roles), tuple(dbs), ()), tuple(deltas))


def texts(p: Plan) -> list[str]:
    return [st.render() for _, st in p.statements()]


def by_step(p: Plan) -> list[tuple[str, str, bool, list[str]]]:
    return [(s.purpose, s.dbname, s.transactional, [st.render() for st in s.statements]) for s in p.steps]


def q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- creation -----------------------------------------------------------------------------

def test_fresh_cluster_creates_roles_databases_and_grants_in_order():
    p = plan(catalog(), spec(roles=[("alice", MD5_A), ("bob", None)], dbs=[("shop", "alice")]), superuser=SU)
    assert by_step(p) == [
        ("roles", "postgres", True, [
            f"CREATE ROLE \"alice\" LOGIN PASSWORD 'md5{MD5_A}'",
            'GRANT pg_read_all_data, pg_write_all_data TO "alice"',
            'CREATE ROLE "bob" LOGIN PASSWORD NULL',
            'GRANT pg_read_all_data, pg_write_all_data TO "bob"',
        ]),
        ("databases", "postgres", False, ['CREATE DATABASE "shop" OWNER "alice"']),
        # alice owns shop: the default ACL already gives her CREATE
        ("grants", "postgres", True, ['GRANT CREATE ON DATABASE "shop" TO "bob"']),
    ]
    assert [s.phase for s in p.steps] == [1, 1, 2]


def test_unchanged_cluster_plans_nothing():
    c = catalog({"alice": "md5" + MD5_A, "bob": SCRAM, "carol": None}, {"shop": "alice"},
                grants={"shop": {"bob", "carol"}})
    s = spec(roles=[("alice", MD5_A), ("bob", SCRAM), ("carol", None)], dbs=[("shop", "alice")])
    p = plan(c, s, superuser=SU)
    assert p.is_empty and p.steps == () and texts(p) == []
    assert format_plan(p) == "-- nothing to do\n"


def test_md5_hash_with_prefix_in_spec_compares_equal():
    c = catalog({"alice": "md5" + MD5_A}, {})
    assert plan(c, spec(roles=[("alice", "md5" + MD5_A)]), superuser=SU).is_empty
    assert stored_password(MD5_A) == stored_password("md5" + MD5_A) == "md5" + MD5_A
    assert stored_password(SCRAM) == SCRAM and stored_password(None) is None


@pytest.mark.parametrize("stored, wanted, expected", [
    ("md5" + MD5_A, MD5_B, f"ALTER ROLE \"alice\" LOGIN PASSWORD 'md5{MD5_B}'"),
    ("md5" + MD5_A, SCRAM, f"ALTER ROLE \"alice\" LOGIN PASSWORD '{SCRAM}'"),
    (SCRAM, MD5_A, f"ALTER ROLE \"alice\" LOGIN PASSWORD 'md5{MD5_A}'"),
    ("md5" + MD5_A, None, 'ALTER ROLE "alice" LOGIN PASSWORD NULL'),
    (None, MD5_A, f"ALTER ROLE \"alice\" LOGIN PASSWORD 'md5{MD5_A}'"),
])
def test_password_changes(stored, wanted, expected):
    p = plan(catalog({"alice": stored}), spec(roles=[("alice", wanted)]), superuser=SU)
    assert texts(p) == [expected]


def test_passwords_are_redacted_in_the_rendered_plan():
    p = plan(catalog({"bob": None}), spec(roles=[("alice", MD5_A), ("bob", SCRAM)]), superuser=SU)
    shown = format_plan(p)
    assert MD5_A not in shown and "SCRAM" not in shown
    assert 'CREATE ROLE "alice" LOGIN PASSWORD [redacted];' in shown
    assert 'ALTER ROLE "bob" LOGIN PASSWORD [redacted];' in shown
    assert all(MD5_A not in text and "SCRAM" not in text for _, text in p.render())
    assert "-- database \"postgres\": roles (one transaction, phase 1)" in shown


def test_no_builtin_role_grant_before_pg14():
    p = plan(catalog(version=130010), spec(roles=[("alice", None)]), superuser=SU)
    assert texts(p) == ['CREATE ROLE "alice" LOGIN PASSWORD NULL']


def test_database_options_then_owner():
    opts = [{"name": "encoding", "value": "UTF8", "vartype": "string"},
            {"name": "lc_collate", "value": "it's", "vartype": "string"},
            {"name": "connection_limit", "value": "-1", "vartype": "integer"},
            {"name": "is_template", "value": None, "vartype": "bool"}]
    p = plan(catalog({"alice": None}), spec(roles=[("alice", None)], dbs=[("shop", "alice", opts)]),
             superuser=SU)
    create = [t for t in texts(p) if t.startswith("CREATE DATABASE")]
    assert create == ["CREATE DATABASE \"shop\" encoding 'UTF8' lc_collate 'it''s' "
                      "connection_limit -1 is_template OWNER \"alice\""]
    st = next(st for _, st in p.statements() if st.render().startswith("CREATE DATABASE"))
    assert st.closes == ("template1",) and st.parallel_safe


def test_database_owner_change():
    c = catalog({"alice": None, "bob": None}, {"shop": "alice"}, grants={"shop": {"bob"}})
    p = plan(c, spec(roles=[("alice", None), ("bob", None)], dbs=[("shop", "bob")]), superuser=SU)
    # the old owner's implicit rights move to the new owner: alice needs an explicit grant now
    assert by_step(p) == [("databases", "postgres", False, ['ALTER DATABASE "shop" OWNER TO "bob"']),
                          ("grants", "postgres", True, ['GRANT CREATE ON DATABASE "shop" TO "alice"'])]


def test_grant_create_lists_only_roles_lacking_it():
    c = catalog({"a": None, "b": None, "c": None}, {"d1": "a", "d2": "a"}, grants={"d1": {"b"}})
    p = plan(c, spec(roles=[("a", None), ("b", None), ("c", None)], dbs=[("d1", "a"), ("d2", "a")]),
             superuser=SU)
    assert texts(p) == ['GRANT CREATE ON DATABASE "d1" TO "c"', 'GRANT CREATE ON DATABASE "d2" TO "b", "c"']


def test_databases_owned_by_the_superuser_are_allowed():
    p = plan(catalog(), spec(dbs=[("admin_db", SU)]), superuser=SU)
    assert texts(p) == [f'CREATE DATABASE "admin_db" OWNER "{SU}"']


# -- deltas -------------------------------------------------------------------------------

def test_rename_role_then_password_is_set_again():
    c = catalog({"old": "md5" + MD5_A}, {"shop": "old"})
    s = spec(roles=[("new", MD5_B)], dbs=[("shop", "new")], deltas=[("rename_role", "old", "new")])
    p = plan(c, s, superuser=SU)
    # ACLs and ownership follow the rename: no owner change or grant is needed afterwards
    assert texts(p) == ['ALTER ROLE "old" RENAME TO "new"', f"ALTER ROLE \"new\" LOGIN PASSWORD 'md5{MD5_B}'"]
    assert len(p.steps) == 1 and p.steps[0].transactional


def test_rename_role_keeps_a_scram_verifier():
    p = plan(catalog({"old": SCRAM}), spec(roles=[("new", SCRAM)], deltas=[("rename_role", "old", "new")]),
             superuser=SU)
    assert texts(p) == ['ALTER ROLE "old" RENAME TO "new"']


def test_rename_role_skipped_when_old_missing_or_new_exists():
    s = spec(roles=[("new", None)], deltas=[("rename_role", "old", "new")])
    assert plan(catalog({"new": None}), s, superuser=SU).is_empty
    p = plan(catalog({"old": None, "new": None}), s, superuser=SU)
    assert p.is_empty and "already exists" in p.notes[0]


def test_rename_role_chain_in_listed_order():
    s = spec(roles=[("c", None)], deltas=[("rename_role", "a", "b"), ("rename_role", "b", "c")])
    assert texts(plan(catalog({"a": None}), s, superuser=SU)) == [
        'ALTER ROLE "a" RENAME TO "b"', 'ALTER ROLE "b" RENAME TO "c"']


def test_delete_role_reassigns_in_each_spec_database_then_drops():
    c = catalog({"alice": None, "bob": None, "gone": "md5" + MD5_A}, {"d1": "alice", "d2": "bob"},
                grants={"d1": {"bob"}, "d2": {"alice"}})
    s = spec(roles=[("alice", None), ("bob", None)], dbs=[("d1", "alice"), ("d2", "bob")],
             deltas=[("delete_role", "gone")])
    assert by_step(plan(c, s, superuser=SU)) == [
        ("role deletions", "d1", True, ['REASSIGN OWNED BY "gone" TO "alice"', 'DROP OWNED BY "gone"']),
        ("role deletions", "d2", True, ['REASSIGN OWNED BY "gone" TO "bob"', 'DROP OWNED BY "gone"']),
        ("role deletions", "postgres", True, ['DROP ROLE IF EXISTS "gone"']),
    ]
    # once gone, nothing
    c2 = dataclasses.replace(c, roles={k: v for k, v in c.roles.items() if k != "gone"})
    assert plan(c2, s, superuser=SU).is_empty


def test_order_of_all_phases():
    c = catalog({"gone": None, "old": None, "web_access": None}, {"olddb": SU, "dropme": SU},
                local={"olddb": LocalFacts(SU, frozenset({SU}))})
    s = spec(roles=[("new", None), ("web_access", None)], dbs=[("newdb", "new")],
             deltas=[("delete_role", "gone"), ("rename_role", "old", "new"), ("delete_db", "dropme"),
                     ("rename_db", "olddb", "newdb")],
             settings=[("shared_preload_libraries", "neon, pg_stat_statements")])
    p = plan(c, s, superuser=SU)
    assert [(st.purpose, st.dbname) for st in p.steps] == [
        ("roles", "postgres"), ("databases", "postgres"), ("role deletions", "newdb"),
        ("role deletions", "postgres"), ("grants", "postgres"), ("schema public", "newdb"),
        ("extensions", "postgres")]
    assert texts(p) == [
        'ALTER ROLE "old" RENAME TO "new"',
        'DROP DATABASE IF EXISTS "dropme" WITH (FORCE)',
        'ALTER DATABASE "olddb" RENAME TO "newdb"',
        'ALTER DATABASE "newdb" OWNER TO "new"',
        'REASSIGN OWNED BY "gone" TO "new"', 'DROP OWNED BY "gone"',
        'DROP ROLE IF EXISTS "gone"',
        'GRANT CREATE ON DATABASE "newdb" TO "web_access"',
        'ALTER SCHEMA public OWNER TO "new"',
        'GRANT CREATE ON SCHEMA public TO "web_access"',
        'CREATE EXTENSION IF NOT EXISTS "pg_stat_statements" SCHEMA public',
    ]
    drops = [st for _, st in p.statements() if st.closes]
    assert [st.closes for st in drops] == [("dropme",), ("olddb",)]


def test_delete_db_only_when_present_and_without_force_before_pg13():
    s = spec(deltas=[("delete_db", "x")])
    assert plan(catalog(), s, superuser=SU).is_empty
    assert texts(plan(catalog(dbs={"x": SU}), s, superuser=SU)) == ['DROP DATABASE IF EXISTS "x" WITH (FORCE)']
    assert texts(plan(catalog(dbs={"x": SU}, version=120000), s, superuser=SU)) == ['DROP DATABASE IF EXISTS "x"']


def test_rename_db_skipped_when_target_exists_or_source_missing():
    s = spec(deltas=[("rename_db", "a", "b")])
    assert plan(catalog(dbs={"b": SU}), s, superuser=SU).is_empty
    p = plan(catalog(dbs={"a": SU, "b": SU}), s, superuser=SU)
    assert p.is_empty and "already exists" in p.notes[0]


# -- per-database rules -------------------------------------------------------------------

@pytest.mark.parametrize("public_owner, expect_alter", [
    ("cloud_admin", True), ("zenith_admin", True), ("pg_database_owner", False), ("alice", False),
    ("someone_else", False), (None, False),
])
def test_schema_public_owner_rule(public_owner, expect_alter):
    facts = LocalFacts(public_owner, frozenset({public_owner} if public_owner else ()))
    c = catalog({"alice": None, "zenith_admin": None, "someone_else": None}, {"shop": "alice"},
                local={"shop": facts})
    p = plan(c, spec(roles=[("alice", None)], dbs=[("shop", "alice")]), superuser=SU)
    assert texts(p) == (['ALTER SCHEMA public OWNER TO "alice"'] if expect_alter else [])


def test_schema_public_owned_by_a_custom_superuser_is_given_away():
    su = "my_admin"
    c = catalog({"alice": None}, {"shop": "alice"}, local={"shop": LocalFacts(su, frozenset({su}))}, superuser=su)
    p = plan(c, parse_spec({"format_version": 1.0, "cluster": {
        "roles": [{"name": "alice"}], "databases": [{"name": "shop", "owner": "alice"}]}}), superuser=su)
    assert texts(p) == ['ALTER SCHEMA public OWNER TO "alice"']


def test_schema_public_not_touched_when_the_db_owner_is_the_admin():
    c = catalog({}, {"admin_db": SU}, local={"admin_db": LocalFacts(SU, frozenset({SU}))})
    assert plan(c, spec(dbs=[("admin_db", SU)]), superuser=SU).is_empty


@pytest.mark.parametrize("version, has_role, already, public, expected", [
    (150004, True, False, True, True),
    (150004, True, True, True, False),
    (150004, False, False, True, False),
    (140010, True, False, True, False),
    (150004, True, False, False, False),  # no schema public: nothing to grant on
])
def test_web_access_rule(version, has_role, already, public, expected):
    roles = {"alice": None, **({"web_access": None} if has_role else {})}
    facts = LocalFacts("pg_database_owner" if public else None,
                       frozenset({"pg_database_owner"} | ({"web_access"} if already else set())) if public else frozenset())
    c = catalog(roles, {"shop": "alice"}, version=version, local={"shop": facts})
    spec_roles = [("alice", None)] + ([("web_access", None)] if has_role else [])
    c = dataclasses.replace(c, databases={**c.databases, "shop": dataclasses.replace(
        c.databases["shop"], create_grantees=frozenset({"alice", "web_access"}))})
    p = plan(c, spec(roles=spec_roles, dbs=[("shop", "alice")]), superuser=SU)
    assert texts(p) == (['GRANT CREATE ON SCHEMA public TO "web_access"'] if expected else [])


@pytest.mark.parametrize("libs, present, expected", [
    ("pg_stat_statements", False, True),
    ("neon,pg_stat_statements", True, False),
    ("neon", False, False),
    (None, False, False),
])
def test_pg_stat_statements_extension(libs, present, expected):
    ext = frozenset({"plpgsql", "pg_stat_statements"} if present else {"plpgsql"})
    s = spec(settings=[("shared_preload_libraries", libs)] if libs else [])
    p = plan(catalog(maint_ext=ext), s, superuser=SU)
    assert texts(p) == (['CREATE EXTENSION IF NOT EXISTS "pg_stat_statements" SCHEMA public'] if expected else [])
    if expected:
        assert p.steps[0].dbname == "postgres" and p.steps[0].phase == 2


def test_new_database_planned_from_the_template_facts():
    # e.g. PG14, where template1's schema public belongs to the bootstrap superuser
    c = catalog({"alice": None}, template=LocalFacts(SU, frozenset({SU})))
    p = plan(c, spec(roles=[("alice", None)], dbs=[("shop", "alice")]), superuser=SU)
    assert ("schema public", "shop") in [(s.purpose, s.dbname) for s in p.steps]
    assert 'ALTER SCHEMA public OWNER TO "alice"' in texts(p)
    # phase 1 only: what apply_spec runs first
    p1 = plan(c, spec(roles=[("alice", None)], dbs=[("shop", "alice")]), superuser=SU, phases=(1,))
    assert texts(p1) == ['CREATE DATABASE "shop" OWNER "alice"']
    assert p.phase(1).statement_count == 1


# -- rejected before anything runs ---------------------------------------------------------

@pytest.mark.parametrize("s, message", [
    (lambda: raw_spec(roles=[Role("alice", None)], dbs=[Database("shop", "nobody")]), "not defined in cluster.roles"),
    (lambda: raw_spec(roles=[Role("x" * 64, None)]), "longer than 63 bytes"),
    (lambda: raw_spec(roles=[Role("é" * 32, None)]), "longer than 63 bytes"),
    (lambda: raw_spec(dbs=[Database("d" * 64, SU)]), "longer than 63 bytes"),
    (lambda: raw_spec(deltas=[DeltaOp("rename_role", "a", "n" * 64)]), "longer than 63 bytes"),
    (lambda: spec(roles=[(SU, None)]), "connstr superuser"),
    # matches spec.py's pattern, but postgres would not recognise it and hash it as a password
    (lambda: spec(deltas=[("delete_role", SU)]), "connstr superuser"),
    (lambda: spec(deltas=[("rename_role", SU, "x")]), "connstr superuser"),
    (lambda: spec(deltas=[("rename_role", "a", "c"), ("rename_role", "b", "c")]), "two rename operations"),
    (lambda: spec(deltas=[("rename_db", "a", "c"), ("rename_db", "b", "c")]), "two rename operations"),
    (lambda: spec(roles=[("alice", None)], deltas=[("delete_role", "alice")]), "also listed in cluster.roles"),
    (lambda: spec(dbs=[("shop", SU)], deltas=[("delete_db", "shop")]), "also listed in cluster.databases"),
    (lambda: spec(deltas=[("delete_db", "postgres")]), "refusing to delete database 'postgres'"),
    (lambda: spec(deltas=[("rename_db", "template1", "x")]), "refusing to rename"),
    (lambda: raw_spec(dbs=[Database("shop", SU, (GenericOption("owner", "x", "string"),))]), "not a usable"),
    (lambda: raw_spec(dbs=[Database("shop", SU, (GenericOption("x; DROP", "1", "integer"),))]), "not a usable"),
    (lambda: raw_spec(dbs=[Database("shop", SU, (GenericOption("connection_limit", "1; DROP", "integer"),))]),
     "not a plain integer"),
])
def test_plan_errors(s, message):
    with pytest.raises(PlanError, match=message):
        plan(catalog({"alice": None, "a": None, "b": None}), s(), superuser=SU)
    assert issubclass(PlanError, ValueError)


# -- hostile names ------------------------------------------------------------------------

HOSTILE = [
    'it\'s "quoted"', "semi;colon", "dollar$$quote$$", "back\\slash\\", "new\nline", " spaces  ",
    "emoji 🐘🚀", "MixedCase", "x" * 63, "é" * 31 + "x", "'; DROP TABLE t; --", 'a"";"b',
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_quoted_as_identifiers(name):
    s = spec(roles=[(name, MD5_A), ("other", None)], dbs=[(name, name)],
             deltas=[("rename_role", name + "_", name), ("delete_role", name[:60] + "-x")]
             if len(name.encode()) <= 61 else [])
    c = catalog({name + "_": None, name[:60] + "-x": None} if len(name.encode()) <= 61 else {})
    p = plan(c, s, superuser=SU)
    rendered = "\n".join(texts(p))
    assert f"CREATE DATABASE {q(name)} OWNER {q(name)}" in rendered
    assert f'GRANT CREATE ON DATABASE {q(name)} TO "other"' in rendered
    # the identifiers are psycopg Identifier objects, never text pasted into SQL
    idents = [obj for _, st in p.statements() for obj in _walk(st.sql) if isinstance(obj, sql.Identifier)]
    assert any(i._obj == (name,) for i in idents)
    literals = [obj for _, st in p.statements() for obj in _walk(st.sql) if isinstance(obj, sql.SQL)]
    assert all(name not in lit._obj for lit in literals if name.strip())


def _walk(c):
    if isinstance(c, sql.Composed):
        for part in c._obj:
            yield from _walk(part)
    else:
        yield c


# -- scale ---------------------------------------------------------------------------------

def test_planner_at_scale_plans_each_object_once_and_nothing_when_done():
    # How long it takes is measured by `python -m bench.reconcile` (1,000 roles + 100 databases),
    # never asserted here: a wall-clock limit fails on a loaded machine, not on a slow planner.
    n_roles, n_dbs = 1000, 100
    s = spec(roles=[(f"u{i}", MD5_A) for i in range(n_roles)], dbs=[(f"d{j}", f"u{j}") for j in range(n_dbs)])
    p = plan(catalog(), s, superuser=SU)
    assert p.statement_count == 2 * n_roles + 2 * n_dbs
    done = catalog({f"u{i}": "md5" + MD5_A for i in range(n_roles)}, {f"d{j}": f"u{j}" for j in range(n_dbs)},
                   grants={f"d{j}": {f"u{i}" for i in range(n_roles)} for j in range(n_dbs)})
    assert plan(done, s, superuser=SU).is_empty
