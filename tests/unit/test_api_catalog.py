"""GET /dbs_and_roles and GET /database_schema against a real PG15 (falcon TestClient on a real
state file), their guards, and auth under a JWKS.

This file: the pure shapes and guards; against a real PG15: tests/integration/test_api_catalog.py."""

from __future__ import annotations

import falcon.testing

from compute.api.app import create_app
from compute.api.catalog import catalog_objects, pg_dump_env
from tests.support.api_helpers import launch_settings, make_state

# Names a careless implementation would parse as a connection string or a shell word.
HOSTILE_DB = "dbname=postgres host=evil"


def test_catalog_objects_shape_is_pure_and_hashless():
    assert catalog_objects([("a",)], [("d", "a", True, False)]) == {
        "roles": [{"name": "a", "encrypted_password": None, "options": None}],
        "databases": [{"name": "d", "owner": "a", "options": None, "restrict_conn": True, "invalid": False}]}


def test_pg_dump_gets_no_password_and_the_name_only_as_pgdatabase():
    env = pg_dump_env("postgresql://cloud_admin:secret@127.0.0.1:5432/postgres?sslmode=disable", HOSTILE_DB)
    assert env["PGDATABASE"] == HOSTILE_DB
    assert (env["PGHOST"], env["PGPORT"], env["PGUSER"]) == ("127.0.0.1", "5432", "cloud_admin")
    assert "secret" not in "".join(env.values()) and "PGPASSWORD" not in env


def test_postgres_unreachable_is_503(tmp_path):
    make_state(str(tmp_path), launch=launch_settings(str(tmp_path)))  # port 1: nothing there
    c = falcon.testing.TestClient(create_app(str(tmp_path)))
    assert c.simulate_get("/dbs_and_roles").status_code == 503
    assert c.simulate_get("/database_schema", params={"database": "postgres"}).status_code == 503
