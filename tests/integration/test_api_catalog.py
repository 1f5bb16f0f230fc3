"""GET /dbs_and_roles and GET /database_schema against a real PG15 (falcon TestClient on a real
state file), their guards, and auth under a JWKS.

This file: against a real PG15; the pure shapes: tests/unit/test_api_catalog.py."""

from __future__ import annotations

import time

import falcon.testing
import psycopg
import pytest
from psycopg import sql

from compute.api.app import create_app
from tests.support.api_helpers import jwks_keys, launch_settings, make_state, pg, write_jwks

__all__ = ['pg']  # the fixture

# Names a careless implementation would parse as a connection string or a shell word.
HOSTILE_DB = "dbname=postgres host=evil"
QUOTED_DB = "it's \"a\" db; $(touch /tmp/pwned)"
PASSWORD_HASH = "md5" + "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def catalog(pg):
    with psycopg.connect(pg.conninfo(), autocommit=True) as su:
        su.execute("DROP ROLE IF EXISTS \"cat owner\"")
        su.execute(sql.SQL("CREATE ROLE \"cat owner\" LOGIN PASSWORD {}").format(sql.Literal(PASSWORD_HASH)))
        for db in (HOSTILE_DB, QUOTED_DB):
            su.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db)))
            su.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier("cat owner")))
        su.execute("CREATE TABLE IF NOT EXISTS only_in_postgres (x int)")
    for db, table in ((HOSTILE_DB, "only_in_hostile"), (QUOTED_DB, "only_in_quoted")):
        with psycopg.connect(pg.conninfo(), dbname=db, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE TABLE {} (id int primary key, note text)").format(sql.Identifier(table)))
    return pg


@pytest.fixture
def client(tmp_path, catalog):
    make_state(str(tmp_path), launch=launch_settings(str(tmp_path), connstr=catalog.url(),
                                                       pgbin_dir="/usr/lib/postgresql/15/bin"))
    return falcon.testing.TestClient(create_app(str(tmp_path)))


def test_dbs_and_roles_neon_shape_without_password_hashes(client):
    r = client.simulate_get("/dbs_and_roles")
    assert r.status_code == 200, r.text
    roles = {x["name"]: x for x in r.json["roles"]}
    assert roles["cat owner"] == {"name": "cat owner", "encrypted_password": None, "options": None}
    assert "cloud_admin" in roles
    dbs = {d["name"]: d for d in r.json["databases"]}
    assert dbs[HOSTILE_DB] == {"name": HOSTILE_DB, "owner": "cat owner", "options": None,
                               "restrict_conn": False, "invalid": False}
    assert dbs["template0"]["restrict_conn"] is True
    assert PASSWORD_HASH not in r.text and "SCRAM-SHA-256$" not in r.text


@pytest.mark.parametrize("db, table", [(HOSTILE_DB, "only_in_hostile"), (QUOTED_DB, "only_in_quoted")])
def test_database_schema_dumps_exactly_that_database(client, db, table):
    r = client.simulate_get("/database_schema", params={"database": db})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/sql")
    assert f"CREATE TABLE public.{table}" in r.text and "only_in_postgres" not in r.text
    assert "PostgreSQL database dump complete" in r.text


def test_database_schema_unknown_database_is_404(client):
    for name in ("nope", "postgres\x01", "' OR 1=1 --"):
        r = client.simulate_get("/database_schema", params={"database": name})
        assert (r.status_code, r.json) == (404, {"error": "database does not exist"}), name


@pytest.mark.parametrize("query", ["", "database=", "database=a&database=b", "database=" + "x" * 64,
                                   "database=a%00b", "other=postgres"])
def test_database_schema_bad_parameter_is_400(client, query):
    r = client.simulate_get("/database_schema", query_string=query)
    assert r.status_code == 400, r.text
    assert "error" in r.json


def test_both_need_a_token_under_jwks(tmp_path, catalog):
    import jwt
    ed, _, jwks = jwks_keys()
    path = write_jwks(str(tmp_path / "jwks.json"), jwks)
    make_state(str(tmp_path), launch=launch_settings(str(tmp_path), connstr=catalog.url(), jwks_path=path,
                                                       pgbin_dir="/usr/lib/postgresql/15/bin"))
    c = falcon.testing.TestClient(create_app(str(tmp_path)))
    good = {"Authorization": "Bearer " + jwt.encode({"compute_id": "compute-1", "exp": time.time() + 300}, ed, algorithm="EdDSA")}
    other = {"Authorization": "Bearer " + jwt.encode({"compute_id": "other", "exp": time.time() + 300}, ed, algorithm="EdDSA")}
    for path_, params in (("/dbs_and_roles", None), ("/database_schema", {"database": HOSTILE_DB})):
        assert c.simulate_get(path_, params=params).status_code == 400  # no token: HEAD's 400
        assert c.simulate_get(path_, params=params, headers={"Authorization": "Bearer x.y.z"}).status_code == 401
        assert c.simulate_get(path_, params=params, headers=other).status_code == 403
        assert c.simulate_get(path_, params=params, headers=good).status_code == 200
