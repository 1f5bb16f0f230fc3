"""docs/openapi.yaml against the real app: every route documented, every documented response
produced and validated (openapi-core), through falcon's TestClient and through real gunicorn."""

from __future__ import annotations

import http.client
import inspect
import json
import os
import shutil
import time
import urllib.parse

import falcon.inspect
import falcon.testing
import jwt
import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec

from compute.api.app import create_app
from compute.api.errors import MAX_BODY_BYTES
from tests.support.api_helpers import (REPO, fake_driver, gunicorn, gunicorn_state, jwks_keys, launch_settings,
                                       make_state, minimal_spec, pg, request_driver, short_runtime_dir, stage_status,
                                       stored, supervisord, write_jwks)

__all__ = ["pg"]

DOC_PATH = os.path.join(REPO, "docs", "openapi.yaml")
HOST = "http://localhost:3080"
HTTP_METHODS = ("get", "post", "put", "delete", "patch")

# Documented answers that need a broken postgres in ways a test cannot cheaply arrange.
NOT_EXERCISED = {("/insights", "get", 500), ("/dbs_and_roles", "get", 500),
                 # needs a real replica: tests/e2e/test_e2e_modes.py validates it against PromoteState
                 ("/promote", "post", 200),
                 # a slow body, too many bodies at once: against real gunicorn in test_fault_network.py
                 ("/configure", "post", 408), ("/configure", "post", 503)}


@pytest.fixture(scope="module")
def doc():
    with open(DOC_PATH) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def openapi():
    return OpenAPI.from_file_path(DOC_PATH)


class Checker:
    """Validates request/response pairs and records which documented answers were seen."""

    def __init__(self, openapi: OpenAPI):
        self.openapi = openapi
        self.seen: set[tuple[str, str, int]] = set()

    def check(self, method: str, path: str, status: int, content_type: str, body: bytes,
              headers: dict, req_body: bytes | None = None, req_headers: dict | None = None) -> None:
        req_headers = req_headers or {}
        path, _, query = path.partition("?")  # the query string is the request's, not the path's
        request = MockRequest(HOST, method, path, args=dict(urllib.parse.parse_qsl(query)),
                              headers=req_headers, data=req_body,
                              content_type=req_headers.get("Content-Type", "application/json"))
        response = MockResponse(body, status_code=status, headers=headers, content_type=content_type)
        self.openapi.validate_response(request, response)
        self.seen.add((path, method.lower(), status))

    def result(self, r: falcon.testing.Result, method: str, path: str, **req) -> falcon.testing.Result:
        self.check(method, path, r.status_code, r.headers.get("content-type", ""), r.content,
                   dict(r.headers), req.get("body"), req.get("headers"))
        return r


@pytest.fixture(scope="module")
def checker(openapi):
    return Checker(openapi)


RAN: set[str] = set()  # the tests of this module that ran in this process


@pytest.fixture(autouse=True)
def note_ran(request):
    yield
    RAN.add(request.function.__name__)


def sim(checker: Checker, client: falcon.testing.TestClient, method: str, path: str,
        body: bytes | None = None, headers: dict | None = None) -> falcon.testing.Result:
    r = client.simulate_request(method, path, body=body, headers=headers)
    return checker.result(r, method, path, body=body, headers=headers)


def test_document_is_valid_openapi(doc):
    validate_spec(doc)


def test_every_route_is_documented_and_every_documented_route_exists(doc, tmp_path):
    make_state(str(tmp_path))
    app = create_app(str(tmp_path))
    routes = {}
    for route in falcon.inspect.inspect_app(app).routes:
        methods = {m.method.lower() for m in route.methods if not m.internal and m.method != "OPTIONS"}
        routes[route.path] = methods
    documented = {path: {m for m in ops if m in HTTP_METHODS} for path, ops in doc["paths"].items()}
    assert routes == documented


def test_json_errors_match_the_error_schema(doc, tmp_path):
    make_state(str(tmp_path))
    c = falcon.testing.TestClient(create_app(str(tmp_path)))
    validator = OAS30Validator(doc["components"]["schemas"]["Error"])
    for r in (c.simulate_get("/nope"), c.simulate_post("/status"), c.simulate_get("/configure"),
              c.simulate_post("/configure", body=b"[]")):
        validator.validate(r.json)


def test_responses_match_the_document(checker, pg, tmp_path):
    rt = str(tmp_path)
    import psycopg
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("DROP ROLE IF EXISTS doc_user")
        conn.execute("CREATE ROLE doc_user LOGIN")
    with psycopg.connect(pg.conninfo(user="doc_user"), autocommit=True) as conn:
        conn.execute("SELECT 1 AS doc_statement")

    store = make_state(rt, status="running", last_active=1795600800.5,
                       launch=launch_settings(rt, connstr=pg.url()))
    store.record_metrics(sync_safekeepers_ms=1, basebackup_ms=2, config_ms=3, total_startup_ms=4,
                         basebackup_bytes=5, wait_for_spec_ms=6)
    c = falcon.testing.TestClient(create_app(rt))

    for path in ("/status", "/metrics.json", "/metrics", "/info", "/healthz", "/readyz", "/openapi.yaml"):
        assert sim(checker, c, "GET", path).status_code == 200, path
    r = sim(checker, c, "GET", "/insights")
    assert r.status_code == 200 and r.json["pg_stat_statements"]
    assert sim(checker, c, "POST", "/check_writability").text == "true"

    ok = json.dumps({"spec": minimal_spec()}).encode()
    hdr = {"Content-Type": "application/json"}
    with fake_driver(rt):
        assert sim(checker, c, "POST", "/configure", ok, hdr).status_code == 200
    with fake_driver(rt, fail="boom"):
        assert sim(checker, c, "POST", "/configure", ok, hdr).status_code == 500
    assert sim(checker, c, "POST", "/configure", ok, hdr).status_code == 412  # status failed now
    stage_status(store, "running")  # `failed` is final for the programs
    for bad, status in ((b"nope", 400), (json.dumps({"spec": {"format_version": 9}}).encode(), 400),
                        (b"x" * (MAX_BODY_BYTES + 1), 413)):
        assert sim(checker, c, "POST", "/configure", bad, hdr).status_code == status
    for path in ("/check_writability", "/terminate"):
        assert sim(checker, c, "POST", path, b"x" * (MAX_BODY_BYTES + 1)).status_code == 413
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for path in ("/configure", "/check_writability", "/terminate"):
        assert sim(checker, c, "POST", path, b"spec=x", form).status_code == 415

    # not running: Neon's 412 and the 503 probe
    stage_status(store, "init")
    store.set(last_active=None, start_time=None)
    assert sim(checker, c, "GET", "/status").json["last_active"] is None
    assert sim(checker, c, "GET", "/insights").status_code == 412
    assert sim(checker, c, "POST", "/check_writability").status_code == 412
    assert sim(checker, c, "POST", "/terminate").status_code == 412
    assert sim(checker, c, "GET", "/readyz").status_code == 503

    # postgres unreachable / read-only
    store.set(status="running", launch=launch_settings(rt, connstr="postgresql://cloud_admin@127.0.0.1:1/x"))
    c2 = falcon.testing.TestClient(create_app(rt))
    assert sim(checker, c2, "GET", "/insights").status_code == 503
    assert sim(checker, c2, "POST", "/check_writability").status_code == 500
    assert sim(checker, c2, "POST", "/terminate").status_code == 500  # no supervisord


def test_auth_responses_match_the_document(checker, tmp_path):
    rt = str(tmp_path)
    ed, rs, jwks = jwks_keys()
    path = write_jwks(os.path.join(rt, "jwks.json"), jwks)
    make_state(rt, status="init", launch=launch_settings(rt, jwks_path=path, compute_id="compute-1"))
    c = falcon.testing.TestClient(create_app(rt))
    wrong = {"Authorization": "Bearer " + jwt.encode({"compute_id": "other", "exp": time.time() + 60}, ed,
                                                     algorithm="EdDSA")}
    bad = {"Authorization": "Bearer " + jwt.encode({"compute_id": "compute-1"}, "k" * 32, algorithm="HS256")}
    for method, route in (("POST", "/configure"), ("POST", "/terminate"), ("POST", "/check_writability"),
                          ("POST", "/promote"), ("GET", "/insights"), ("GET", "/status"), ("GET", "/metrics.json"),
                          ("GET", "/info"), ("GET", "/openapi.yaml")):
        assert sim(checker, c, method, route).status_code == 400
        assert sim(checker, c, method, route, headers=bad).status_code == 401
        assert sim(checker, c, method, route, headers=wrong).status_code == 403
    # without a JWKS: the guarded routes refuse a client that is not on loopback
    rt2 = str(tmp_path / "open")
    make_state(rt2, status="init", launch=launch_settings(rt2))
    c2 = falcon.testing.TestClient(create_app(rt2))
    for method, route in (("POST", "/configure"), ("GET", "/dbs_and_roles"), ("GET", "/database_schema")):
        r = c2.simulate_request(method, route, remote_addr="10.0.0.5", params={"database": "postgres"})
        checker.result(r, method, route)
        assert r.status_code == 403


def test_terminate_response_matches_the_document(checker):
    rt = short_runtime_dir()
    try:
        make_state(rt, postgres_started=True)  # as the driver sets it before starting postgres
        with supervisord(rt), request_driver(rt):
            c = falcon.testing.TestClient(create_app(rt))
            assert sim(checker, c, "POST", "/terminate").status_code == 200
            assert sim(checker, c, "POST", "/terminate").status_code == 201  # terminated: the recorded answer
    finally:
        shutil.rmtree(rt, ignore_errors=True)


def test_real_http_responses_match_the_document(openapi, tmp_path):
    rt = str(tmp_path)
    _, port = gunicorn_state(rt, status="running")
    checker = Checker(openapi)
    with gunicorn(rt):
        for method, path, body in (("GET", "/status", None), ("GET", "/metrics.json", None), ("GET", "/info", None),
                                   ("GET", "/metrics", None), ("GET", "/healthz", None), ("GET", "/readyz", None),
                                   ("GET", "/openapi.yaml", None), ("POST", "/configure", b"{}"),
                                   ("POST", "/check_writability", None)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            checker.check(method, path, resp.status, resp.getheader("Content-Type", ""), data,
                          dict(resp.getheaders()), body)
    assert ("/configure", "post", 400) in checker.seen


def test_terminate_modes_match_the_document(checker):
    rt = short_runtime_dir()
    try:
        make_state(rt, postgres_started=True)  # as the driver sets it before starting postgres
        c = falcon.testing.TestClient(create_app(rt))
        assert sim(checker, c, "POST", "/terminate?mode=nope").status_code == 400
        with supervisord(rt), request_driver(rt):
            r = sim(checker, c, "POST", "/terminate?mode=immediate")
            assert r.status_code == 200 and r.json["lsn"] is None
    finally:
        shutil.rmtree(rt, ignore_errors=True)


def test_insights_without_pg_stat_statements_matches_the_document(checker, tmp_path):
    from tests.support.pgcluster import running_cluster
    with running_cluster() as cluster:
        make_state(str(tmp_path), launch=launch_settings(str(tmp_path), connstr=cluster.url()))
        r = sim(checker, falcon.testing.TestClient(create_app(str(tmp_path))), "GET", "/insights")
    assert (r.status_code, r.json) == (200, {"pg_stat_statements": []})


def test_catalog_routes_match_the_document(checker, pg, tmp_path):
    rt = str(tmp_path)
    make_state(rt, launch=launch_settings(rt, connstr=pg.url(), pgbin_dir="/usr/lib/postgresql/15/bin"))
    c = falcon.testing.TestClient(create_app(rt))
    r = sim(checker, c, "GET", "/dbs_and_roles")
    assert r.status_code == 200 and r.json["roles"] and r.json["databases"]
    assert sim(checker, c, "GET", "/database_schema?database=postgres").status_code == 200
    assert sim(checker, c, "GET", "/database_schema?database=nope").status_code == 404
    assert sim(checker, c, "GET", "/database_schema?database=a&database=b").status_code == 400

    # pg_dump missing: 500; postgres unreachable: 503
    make_state(str(tmp_path / "nodump"), launch=launch_settings(str(tmp_path / "nodump"), connstr=pg.url(),
                                                               pgbin_dir="/nonexistent"))
    c2 = falcon.testing.TestClient(create_app(str(tmp_path / "nodump")))
    assert sim(checker, c2, "GET", "/database_schema?database=postgres").status_code == 500
    make_state(str(tmp_path / "down"), launch=launch_settings(str(tmp_path / "down")))
    c3 = falcon.testing.TestClient(create_app(str(tmp_path / "down")))
    assert sim(checker, c3, "GET", "/dbs_and_roles").status_code == 503
    assert sim(checker, c3, "GET", "/database_schema?database=postgres").status_code == 503

    # every dump slot taken: 429 with Retry-After
    from compute.api.catalog import DatabaseSchema
    from compute.api.context import ApiContext
    from compute.api.errors import serialize_error
    busy = falcon.App()
    busy.set_error_serializer(serialize_error)
    busy.add_route("/database_schema", DatabaseSchema(ApiContext(rt), max_dumps=0))
    r = sim(checker, falcon.testing.TestClient(busy), "GET", "/database_schema?database=postgres")
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0

    # under a JWKS: 400 without a token, 401 with a bad one, 403 with another compute's
    ed, _, jwks = jwks_keys()
    path = write_jwks(str(tmp_path / "jwks.json"), jwks)
    make_state(str(tmp_path / "auth"), launch=launch_settings(str(tmp_path / "auth"), jwks_path=path))
    c4 = falcon.testing.TestClient(create_app(str(tmp_path / "auth")))
    wrong = {"Authorization": "Bearer " + jwt.encode({"compute_id": "other", "exp": time.time() + 300}, ed, algorithm="EdDSA")}
    for route in ("/dbs_and_roles", "/database_schema?database=postgres"):
        assert sim(checker, c4, "GET", route).status_code == 400
        assert sim(checker, c4, "GET", route, headers={"Authorization": "Bearer x.y.z"}).status_code == 401
        assert sim(checker, c4, "GET", route, headers=wrong).status_code == 403


def test_promote_responses_match_the_document(checker, pg, tmp_path):
    rt = str(tmp_path)
    replica_spec = {**minimal_spec(), "mode": "Replica"}
    store = make_state(rt, status="running", spec=replica_spec, launch=launch_settings(rt, connstr=pg.url()))
    c = falcon.testing.TestClient(create_app(rt))
    hdr = {"Content-Type": "application/json"}
    primary = json.dumps({"spec": minimal_spec(), "wal_flush_lsn": "0/1"}).encode()
    assert sim(checker, c, "POST", "/promote", b"nope", hdr).status_code == 400
    assert sim(checker, c, "POST", "/promote", b"spec=x", {"Content-Type": "application/x-www-form-urlencoded"}).status_code == 415
    assert sim(checker, c, "POST", "/promote", b"x" * (MAX_BODY_BYTES + 1), hdr).status_code == 413
    with request_driver(rt):  # the driver promotes (compute/shared/driver_requests.py)
        assert sim(checker, c, "POST", "/promote", primary, hdr).status_code == 500  # pg is not in recovery
    store.set(spec=stored(minimal_spec()))
    assert sim(checker, c, "POST", "/promote", primary, hdr).status_code == 412
    # read-only: the text answer of /check_writability
    store.set(spec=stored(replica_spec))
    assert sim(checker, c, "POST", "/check_writability").status_code == 500


EXERCISES = (test_responses_match_the_document, test_auth_responses_match_the_document,
             test_terminate_response_matches_the_document, test_terminate_modes_match_the_document,
             test_insights_without_pg_stat_statements_matches_the_document,
             test_catalog_routes_match_the_document, test_promote_responses_match_the_document)


def test_every_documented_response_was_exercised(doc, checker, request, tmp_path_factory):
    """The document promises nothing untested: what the tests above saw, in file order, plus
    what those that did not run in this process (this test alone, -k) see when run here."""
    for exercise in EXERCISES:
        if exercise.__name__ in RAN:
            continue
        exercise(**{name: checker if name == "checker" else
                    tmp_path_factory.mktemp(exercise.__name__[:30]) if name == "tmp_path" else
                    request.getfixturevalue(name)
                    for name in inspect.signature(exercise).parameters})
    documented = {(path, method, int(code))
                  for path, ops in doc["paths"].items()
                  for method, op in ops.items() if method in HTTP_METHODS
                  for code in op["responses"]}
    assert documented - checker.seen - NOT_EXERCISED == set()
