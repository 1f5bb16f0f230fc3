"""role.options (issue 18, item 10): the allow-list at the spec boundary, and what the planner
makes of it on create and alter. Attack cases: SUPERUSER and the like, injection attempts."""

from __future__ import annotations

import dataclasses
import math

import pytest

from compute.model import role_options
from compute.model.role_options import RoleOptionError, parse_option, parse_options
from compute.model.spec import GenericOption, SpecError, from_stored, parse_spec, to_document
from compute.reconcile import PlanError, RoleInfo, plan
from tests.unit.test_reconcile_planner import MD5_A, SU, catalog, texts

PG15, PG16 = 150004, 160002


def doc(*options, name: str = "app", password: str | None = MD5_A) -> dict:
    return {"format_version": 1.0,
            "cluster": {"roles": [{"name": name, "encrypted_password": password, "options": list(options)}]}}


def opt(name, value=None, vartype="string") -> dict:
    return {"name": name, "value": value, "vartype": vartype}


def attrs_of(login=True, createdb=False, createrole=False, inherit=True, connlimit=-1, valid_until=None,
             **more) -> dict:
    return {"superuser": False, "login": login, "createdb": createdb, "createrole": createrole,
            "inherit": inherit, "replication": False, "bypassrls": False, "connlimit": connlimit,
            "valid_until": valid_until, **more}


def with_role(c, name: str, password: str | None, **attrs):
    roles = dict(c.roles)
    roles[name] = RoleInfo(name, password, False, attrs_of(**attrs))
    return dataclasses.replace(c, roles=roles)


# -- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, value, keyword, attribute, expected", [
    ("LOGIN", None, "LOGIN", "login", True),
    ("nologin", None, "NOLOGIN", "login", False),
    ("CreateDB", None, "CREATEDB", "createdb", True),
    ("NOINHERIT", None, "NOINHERIT", "inherit", False),
    ("CREATEROLE", None, "CREATEROLE", "createrole", True),
    ("NOSUPERUSER", None, "NOSUPERUSER", "superuser", False),
    ("NOREPLICATION", None, "NOREPLICATION", "replication", False),
    ("CONNECTION LIMIT", "10", "CONNECTION LIMIT", "connlimit", 10),
    ("connection_limit", "-1", "CONNECTION LIMIT", "connlimit", -1),
    ("Connection   Limit", "0", "CONNECTION LIMIT", "connlimit", 0),
    ("VALID UNTIL", "infinity", "VALID UNTIL", "valid_until", math.inf),
    ("valid_until", "2030-01-31", "VALID UNTIL", "valid_until", 1896048000.0),
    ("VALID UNTIL", "2030-01-31T12:00:00Z", "VALID UNTIL", "valid_until", 1896091200.0),
    ("VALID UNTIL", "2030-01-31 13:30:00+01:30", "VALID UNTIL", "valid_until", 1896091200.0),
])
def test_allowed_options_parse_to_typed_attributes(name, value, keyword, attribute, expected):
    a = parse_option(name, value)
    assert (a.keyword, a.attribute, a.value) == (keyword, attribute, expected)


def test_valid_until_is_written_in_utc_with_an_explicit_offset():
    assert parse_option("VALID UNTIL", "2030-01-31").literal == "2030-01-31 00:00:00+00:00"
    assert parse_option("VALID UNTIL", "2030-01-31 13:30+0130").literal == "2030-01-31 12:00:00+00:00"
    assert parse_option("VALID UNTIL", "INFINITY").literal == "infinity"


@pytest.mark.parametrize("name, value, words", [
    ("SUPERUSER", None, "SUPERUSER is refused"),
    ("superuser", None, "SUPERUSER is refused"),
    ("BYPASSRLS", None, "BYPASSRLS is refused"),
    ("REPLICATION", None, "REPLICATION is refused"),
    ("PASSWORD", "'x'", "PASSWORD is not an attribute"),
    ("ENCRYPTED PASSWORD", "x", "not an attribute"),
    ("IN ROLE", "pg_execute_server_program", "IN ROLE is not an attribute"),
    ("ROLE", "cloud_admin", "not an attribute"),
    ("ADMIN", "cloud_admin", "not an attribute"),
    ("SYSID", "10", "not an attribute"),
    ("CREATEDB", "true", "CREATEDB takes no value"),
    ("LOGIN", "SUPERUSER", "LOGIN takes no value"),
    ("CONNECTION LIMIT", None, "needs an integer"),
    ("CONNECTION LIMIT", "10 SUPERUSER", "needs an integer"),
    ("CONNECTION LIMIT", "-2", "needs an integer"),
    ("CONNECTION LIMIT", "2147483648", "needs an integer"),
    ("VALID UNTIL", "2030-01-01' SUPERUSER --", "needs 'infinity' or an ISO 8601"),
    ("VALID UNTIL", "now", "needs 'infinity' or an ISO 8601"),
    ("VALID UNTIL", "2030-02-30", "not a valid date"),
    ("VALID UNTIL", None, "needs 'infinity'"),
    ("CREATEDB SUPERUSER", None, "not a role attribute"),
    ("CREATEDB;", None, "not a role option name"),
    ("LOGIN\n", None, "not a role option name"),
    ("CONNECTION-LIMIT", "1", "not a role option name"),
    ('SUPERUSER"', None, "not a role option name"),
    ("x" * 41, None, "not a role option name"),
    ("WHATEVER", None, "not a role attribute a spec role may hold"),
])
def test_refused_options_say_why(name, value, words):
    with pytest.raises(RoleOptionError) as info:
        parse_option(name, value)
    assert words in str(info.value)


def test_an_attribute_set_twice_is_refused():
    for pair in (("LOGIN", "NOLOGIN"), ("CREATEDB", "createdb"), ("INHERIT", "NOINHERIT")):
        with pytest.raises(RoleOptionError) as info:
            parse_options([GenericOption(pair[0], None, "string"), GenericOption(pair[1], None, "string")])
        assert "conflicts with" in str(info.value) and info.value.index == 1


# -- the spec boundary ---------------------------------------------------------------------

def test_the_spec_stores_canonical_names_and_round_trips():
    s = parse_spec(doc(opt("createdb"), opt("connection_limit", "5", "integer"), opt("Valid Until", "2030-01-31")))
    assert [o.name for o in s.cluster.roles[0].options] == ["CREATEDB", "CONNECTION LIMIT", "VALID UNTIL"]
    assert parse_spec(to_document(s)) == s == from_stored(to_document(s))


@pytest.mark.parametrize("option, field, words", [
    (opt("SUPERUSER"), "cluster.roles[0].options[1]", "role 'app': SUPERUSER is refused"),
    (opt("BYPASSRLS"), "cluster.roles[0].options[1]", "role 'app': BYPASSRLS is refused"),
    (opt("REPLICATION"), "cluster.roles[0].options[1]", "role 'app': REPLICATION is refused"),
    (opt("CONNECTION LIMIT", "1; ALTER ROLE app SUPERUSER", "integer"), "cluster.roles[0].options[1]",
     "needs an integer"),
    (opt("VALID UNTIL", "infinity'; ALTER ROLE app SUPERUSER; --"), "cluster.roles[0].options[1]",
     "needs 'infinity'"),
    (opt("LOGIN SUPERUSER"), "cluster.roles[0].options[1]", "not a role attribute"),
    (opt("LOGIN; ALTER ROLE app SUPERUSER"), "cluster.roles[0].options[1].name", "not a role option name"),
    (opt("NOLOGIN"), "cluster.roles[0].options[1]", "NOLOGIN conflicts with LOGIN"),
])
def test_hostile_options_make_the_spec_invalid_naming_role_and_option(option, field, words):
    with pytest.raises(SpecError) as info:
        parse_spec(doc(opt("LOGIN"), option))
    assert info.value.field == field
    assert words in str(info.value)


# -- the planner: create ------------------------------------------------------------------

def spec_with(*options, password=MD5_A):
    return parse_spec(doc(*options, password=password))


def test_create_carries_the_options_before_login_and_password():
    s = spec_with(opt("CREATEDB"), opt("CONNECTION LIMIT", "5", "integer"), opt("VALID UNTIL", "2030-01-31"),
                  opt("NOINHERIT"))
    assert texts(plan(catalog(), s, superuser=SU))[0] == (
        "CREATE ROLE \"app\" CREATEDB CONNECTION LIMIT 5 VALID UNTIL '2030-01-31 00:00:00+00:00' NOINHERIT "
        f"LOGIN PASSWORD 'md5{MD5_A}'")


def test_nologin_replaces_login():
    s = spec_with(opt("NOLOGIN"), password=None)
    assert texts(plan(catalog(), s, superuser=SU))[0] == 'CREATE ROLE "app" NOLOGIN PASSWORD NULL'


def test_redacted_form_keeps_the_options_and_hides_the_password():
    p = plan(catalog(), spec_with(opt("CREATEDB")), superuser=SU)
    _, text = p.render()[0]
    assert text == 'CREATE ROLE "app" CREATEDB LOGIN PASSWORD [redacted]'


def test_no_options_is_what_it_was():
    assert texts(plan(catalog(), spec_with(), superuser=SU))[0] == f"CREATE ROLE \"app\" LOGIN PASSWORD 'md5{MD5_A}'"


# -- the planner: alter --------------------------------------------------------------------

def test_unchanged_options_plan_nothing():
    c = with_role(catalog(), "app", "md5" + MD5_A, createdb=True, connlimit=5, valid_until=1896048000.0)
    s = spec_with(opt("CREATEDB"), opt("CONNECTION LIMIT", "5"), opt("VALID UNTIL", "2030-01-31"), opt("LOGIN"))
    assert plan(c, s, superuser=SU).is_empty


def test_an_option_that_differs_alters_the_role_without_touching_the_password():
    c = with_role(catalog(), "app", "md5" + MD5_A, createdb=False, connlimit=5)
    s = spec_with(opt("CREATEDB"), opt("CONNECTION LIMIT", "5"))
    assert texts(plan(c, s, superuser=SU)) == ['ALTER ROLE "app" CREATEDB CONNECTION LIMIT 5']


def test_a_password_change_carries_the_options():
    c = with_role(catalog(), "app", "md5" + "b" * 32, createdb=True)
    assert texts(plan(c, spec_with(opt("CREATEDB")), superuser=SU)) == [
        f"ALTER ROLE \"app\" CREATEDB LOGIN PASSWORD 'md5{MD5_A}'"]


def test_nologin_on_an_existing_role_that_can_log_in():
    c = with_role(catalog(), "app", "md5" + MD5_A, login=True)
    assert texts(plan(c, spec_with(opt("NOLOGIN")), superuser=SU)) == ['ALTER ROLE "app" NOLOGIN']


def test_a_role_the_options_do_not_mention_keeps_its_attributes():
    """No option about LOGIN and the same password: nothing, as before options were applied."""
    c = with_role(catalog(), "app", "md5" + MD5_A, login=False, createdb=True)
    assert plan(c, spec_with(), superuser=SU).is_empty


def test_valid_until_compares_as_a_time_not_as_text():
    c = with_role(catalog(), "app", "md5" + MD5_A, valid_until=1896091200.0)
    assert plan(c, spec_with(opt("VALID UNTIL", "2030-01-31 13:30:00+01:30")), superuser=SU).is_empty
    c = with_role(catalog(), "app", "md5" + MD5_A, valid_until=None)
    assert texts(plan(c, spec_with(opt("VALID UNTIL", "infinity")), superuser=SU)) == [
        "ALTER ROLE \"app\" VALID UNTIL 'infinity'"]
    c = with_role(catalog(), "app", "md5" + MD5_A, valid_until=math.inf)
    assert plan(c, spec_with(opt("VALID UNTIL", "infinity")), superuser=SU).is_empty


def test_a_renamed_role_keeps_its_attributes_for_the_comparison():
    c = with_role(catalog(), "old", None, createdb=True)
    s = parse_spec({"format_version": 1.0,
                    "cluster": {"roles": [{"name": "app", "encrypted_password": None, "options": [opt("CREATEDB")]}]},
                    "delta_operations": [{"action": "rename_role", "name": "old", "new_name": "app"}]})
    assert texts(plan(c, s, superuser=SU)) == ['ALTER ROLE "old" RENAME TO "app"']


# -- the planner: CREATEROLE and stored specs ------------------------------------------------

def test_createrole_is_refused_on_pg15_and_allowed_on_pg16():
    s = spec_with(opt("CREATEROLE"))
    with pytest.raises(PlanError) as info:
        plan(catalog(version=PG15), s, superuser=SU)
    assert "role 'app': option CREATEROLE is refused" in str(info.value)
    assert "pg_execute_server_program" in str(info.value)
    assert texts(plan(catalog(version=PG16), s, superuser=SU))[0].startswith('CREATE ROLE "app" CREATEROLE LOGIN')


def test_the_planner_checks_options_again_for_a_stored_spec():
    """A stored spec is not validated again (compute/model/spec.py from_stored): a damaged
    state file with SUPERUSER in it plans nothing."""
    d = to_document(spec_with(opt("CREATEDB")))
    d["cluster"]["roles"][0]["options"] = [{"name": "SUPERUSER", "value": None, "vartype": "string"}]
    with pytest.raises(PlanError) as info:
        plan(catalog(), from_stored(d), superuser=SU)
    assert "role 'app': SUPERUSER is refused" in str(info.value)


def test_refused_keywords_and_allowed_ones_do_not_overlap():
    allowed = set(role_options.FLAGS) | set(role_options.VALUED)
    assert not allowed & set(role_options.REFUSED)
    assert not allowed & set(role_options.NOT_ATTRIBUTES)
