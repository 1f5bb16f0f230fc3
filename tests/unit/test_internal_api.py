"""The internal port (issue 18, item 8): HEAD's POST /grants and /extensions, in-process (falcon
TestClient on a real state file, a thread in the driver's place); the request shapes and the
statements, pure. Real postgres and the booted tree: tests/integration/test_internal_requests.py,
tests/e2e/test_e2e_internal_port.py."""

from __future__ import annotations

import argparse
import threading

import pytest

from compute.api.internal import LOOPBACK_ONLY
from compute.boot import cli
from compute.lifecycle.catalog_requests import extension_statement, grant_statement
from compute.lifecycle.steps import DriverStep, DriverView, idle, pending_request
from compute.model.internal_requests import (MAX_NAME_BYTES, PRIVILEGES, ExtensionRequest, GrantsRequest,
                                             RequestShapeError, parse_extension, parse_grants)
from compute.shared import driver_requests
from compute.shared.state import StateStore, state_path
from tests.support.api_helpers import client_for, launch_settings, make_state, rt

__all__ = ["rt"]

INTERNAL = 3081
GRANT = {"database": "shop", "schema": "app", "privileges": ["USAGE", "CREATE"], "role": "reader"}
EXT = {"extension": "hstore", "database": "shop", "version": "1.8"}


def state(rt: str, status: str = "running", address: str | None = "127.0.0.1"):
    return make_state(rt, status=status, launch=launch_settings(rt, internal_http_port=INTERNAL,
                                                                internal_http_address=address))


def post(c, path: str, body=None, *, port: int = INTERNAL, peer: str = "127.0.0.1", content_type="application/json",
         raw: bytes | None = None):
    import json
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    return c.simulate_post(path, body=data, headers=headers, port=port, remote_addr=peer)


class Driver(threading.Thread):
    """The lifecycle driver's half: answers each queued request with `answer(request)`, which
    returns (answer, error)."""

    def __init__(self, rt: str, answer):
        super().__init__(daemon=True)
        self.store = StateStore(state_path(rt))
        self.answer = answer
        self.stop = threading.Event()
        self.seen: list[driver_requests.CatalogRequest] = []

    def run(self) -> None:
        while not self.stop.wait(0.01):
            for r in driver_requests.pending_catalog_requests(self.store.get(driver_requests.CATALOG_KEY)):
                self.seen.append(r)
                answer, error = self.answer(r)
                driver_requests.finish_catalog_request(self.store, r.id, answer=answer, error=error)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(5)


# -- shapes -----------------------------------------------------------------------------------

def test_heads_shapes_parse():
    assert parse_grants(GRANT) == GrantsRequest("shop", "app", ("USAGE", "CREATE"), "reader")
    assert parse_grants({**GRANT, "extra": 1}).answer() == GRANT  # unknown keys ignored, as serde
    assert parse_extension(EXT) == ExtensionRequest("hstore", "shop", "1.8")
    for p in PRIVILEGES:
        assert parse_grants({**GRANT, "privileges": [p]}).privileges == (p,)


@pytest.mark.parametrize("body,field", [
    ([], "<body>"), ({k: v for k, v in GRANT.items() if k != "role"}, "role"),
    ({**GRANT, "privileges": ["ALL"]}, "privileges[0]"), ({**GRANT, "privileges": ["usage"]}, "privileges[0]"),
    ({**GRANT, "privileges": "USAGE"}, "privileges"), ({**GRANT, "privileges": [["USAGE"]]}, "privileges[0]"),
    ({**GRANT, "role": 7}, "role"), ({**GRANT, "role": ""}, "role"),
    ({**GRANT, "role": "a\x00b"}, "role"), ({**GRANT, "schema": "s" * (MAX_NAME_BYTES + 1)}, "schema"),
    ({**GRANT, "database": "é" * 32}, "database"),  # 64 bytes of UTF-8
    ({**GRANT, "role": "public"}, "role"), ({**GRANT, "role": "PUBLIC"}, "role"),
    ({**GRANT, "role": "\ud800"}, "role"),
])
def test_hostile_grants_are_refused_naming_the_field(body, field):
    with pytest.raises(RequestShapeError) as e:
        parse_grants(body)
    assert e.value.field == field and "\n" not in str(e.value)


@pytest.mark.parametrize("body,field", [
    ({**EXT, "version": 1.8}, "version"), ({**EXT, "version": ""}, "version"),
    ({**EXT, "version": "1\x00"}, "version"), ({**EXT, "version": "1" * 2000}, "version"),
    ({**EXT, "extension": "x" * 64}, "extension"), ({k: v for k, v in EXT.items() if k != "database"}, "database"),
])
def test_hostile_extension_requests_are_refused(body, field):
    with pytest.raises(RequestShapeError) as e:
        parse_extension(body)
    assert e.value.field == field


def test_statements_quote_every_name_and_skip_what_is_held():
    hostile = GrantsRequest("db", 'sch"; DROP SCHEMA x; --', ("USAGE", "CREATE", "USAGE"), "ro'le; --")
    assert grant_statement(hostile, set()).as_string(None) == \
        'GRANT USAGE, CREATE ON SCHEMA "sch""; DROP SCHEMA x; --" TO "ro\'le; --"'
    assert grant_statement(hostile, {"USAGE"}).as_string(None).startswith("GRANT CREATE ON SCHEMA")
    assert grant_statement(hostile, {"USAGE", "CREATE"}) is None  # nothing written: a replica answers too
    ext = ExtensionRequest('h"store', "db", "1.8'; DROP TABLE t; --")
    assert extension_statement(ext, None).as_string(None) == \
        'CREATE EXTENSION IF NOT EXISTS "h""store" WITH SCHEMA public VERSION \'1.8\'\'; DROP TABLE t; --\''
    assert extension_statement(ext, "1.7").as_string(None) == \
        'ALTER EXTENSION "h""store" UPDATE TO \'1.8\'\'; DROP TABLE t; --\''
    assert extension_statement(ExtensionRequest("e", "db", "1.8"), "1.8") is None


def test_the_driver_plans_the_queue():
    waiting = DriverView(status="running", startup_done=True, catalog_requests=True)
    assert pending_request(waiting) is DriverStep.CATALOG_REQUESTS
    assert not idle(waiting)
    assert idle(DriverView(status="running", startup_done=True))
    terminating = DriverView(status="termination_pending_fast", startup_done=True, termination="requested",
                             catalog_requests=True)
    assert pending_request(terminating) is DriverStep.TERMINATE


def test_the_queue_is_bounded_and_needs_running(rt):
    store = state(rt)
    for _ in range(driver_requests.MAX_CATALOG_QUEUE):
        assert isinstance(driver_requests.submit_catalog_request(store, "grants", GRANT), driver_requests.CatalogRequest)
    assert driver_requests.submit_catalog_request(store, "grants", GRANT) == driver_requests.BUSY
    store.set(status="configuration_pending")
    assert driver_requests.submit_catalog_request(store, "grants", GRANT) == "configuration_pending"


# -- the app ----------------------------------------------------------------------------------

def test_grants_reach_the_driver_and_echo_heads_answer(rt):
    state(rt)
    c = client_for(rt)
    with Driver(rt, lambda r: (None, None)) as d:
        r = post(c, "/grants", GRANT)
    assert (r.status_code, r.json) == (201, GRANT)
    assert [(s.kind, s.body) for s in d.seen] == [("grants", GRANT)]
    assert StateStore(state_path(rt)).get(driver_requests.CATALOG_KEY) == []  # the answer was taken


def test_extensions_answer_the_version_and_a_failure_is_500_with_heads_words(rt):
    state(rt)
    c = client_for(rt)
    with Driver(rt, lambda r: (r.body["version"], None)):
        r = post(c, "/extensions", EXT)
    assert (r.status_code, r.json) == (201, {"extension": "hstore", "version": "1.8"})
    with Driver(rt, lambda r: (None, 'failed to install extension: extension "hstore" has no version "9"')):
        r = post(c, "/extensions", {**EXT, "version": "9"})
    assert r.status_code == 500 and r.json["error"].startswith("failed to install extension: ")


def test_heads_order_body_then_status(rt):
    state(rt, status="configuration_pending")
    c = client_for(rt)
    assert post(c, "/grants", GRANT, content_type=None).status_code == 415
    assert post(c, "/grants", raw=b'{"database": ').status_code == 400
    r = post(c, "/grants", {**GRANT, "privileges": ["SUPERUSER"]})
    assert r.status_code == 422 and "unknown variant `SUPERUSER`" in r.json["error"]
    r = post(c, "/grants", GRANT)
    assert (r.status_code, r.json) == (412, {"error": "invalid compute status: configuration-pending"})
    assert StateStore(state_path(rt)).get(driver_requests.CATALOG_KEY) is None  # nothing queued


def test_non_loopback_peers_are_refused_unless_the_operator_opened_the_port(rt):
    state(rt)
    c = client_for(rt)
    for peer in ("10.1.2.3", "192.168.0.5", "::ffff:10.0.0.1", "2001:db8::1", "fe80::1%eth0"):
        r = post(c, "/grants", GRANT, peer=peer)
        assert (r.status_code, r.json) == (403, {"error": LOOPBACK_ONLY}), peer
    assert post(c, "/grants", {**GRANT, "privileges": ["ALL"]}, peer="::ffff:127.0.0.1").status_code == 422
    rt2 = rt + "-open"
    state(rt2, address="0.0.0.0")
    assert post(client_for(rt2), "/grants", {**GRANT, "privileges": ["ALL"]}, peer="10.1.2.3").status_code == 422


def test_the_ports_serve_their_own_routes(rt):
    state(rt)
    c = client_for(rt)
    assert post(c, "/grants", GRANT, port=3080).status_code == 404  # not on the external port
    assert c.simulate_get("/status", port=INTERNAL, remote_addr="127.0.0.1").status_code == 404
    assert c.simulate_get("/status", port=3080).status_code == 200
    assert c.simulate_get("/grants", port=INTERNAL, remote_addr="127.0.0.1").status_code == 405
    r = post(c, "/refresh_configuration", {})
    assert r.status_code == 501 and "not supported" in r.json["error"]
    assert post(c, "/failpoints", []).status_code == 501
    r = post(c, "/extension_server/lib/neon.so?is_library=true", raw=b"", content_type=None)
    assert (r.status_code, r.json) == (412, {"error": "remote storage is not configured"})
    # Not served (no internal address recorded): that port number is just the external app's.
    rt2 = rt + "-none"
    state(rt2, address=None)
    assert post(client_for(rt2), "/grants", GRANT).status_code == 404


def test_a_terminate_ends_the_wait_with_412(rt):
    store = state(rt)
    c = client_for(rt)
    timer = threading.Timer(0.2, lambda: StateStore(state_path(rt)).set(status="termination_pending_fast"))
    timer.start()
    r = post(c, "/grants", GRANT)
    timer.join()
    assert (r.status_code, r.json) == (412, {"error": "invalid compute status: termination-pending-fast"})
    assert store.get(driver_requests.CATALOG_KEY) == []


# -- compute-ctl's flags ------------------------------------------------------------------------

def test_the_internal_port_is_served_when_asked_loopback_by_default():
    args = cli.build_parser().parse_args(["-D", "/d", "-C", "c", "-S", "/s", "--internal-http-port", "4001"])
    cli.resolve_ports(None, args)
    assert cli.internal_served(args)
    plain = cli.build_parser().parse_args(["-D", "/d", "-C", "c", "-S", "/s"])
    cli.resolve_ports(None, plain)
    assert not cli.internal_served(plain)
    assert cli.internal_exposure_warning("127.0.0.1") is None and cli.internal_exposure_warning(None) is None
    assert "not loopback" in cli.internal_exposure_warning("0.0.0.0")
    with pytest.raises(cli.UsageError, match="--internal-http-address 'here'"):
        cli.http_address("here", "--internal-http-address")
    assert isinstance(args, argparse.Namespace)


def test_internal_flags_are_checked_before_any_bind():
    def flags(*extra):
        args = cli.build_parser().parse_args(["-D", "/d", "-C", "c", "-S", "/s", *extra])
        cli.resolve_ports(None, args)
        cli.validate_flags(args)
        return args
    assert flags("--internal-http-port", "4001").internal_http_address == "127.0.0.1"
    assert flags("--internal-http-address", "[::1]").internal_http_address == "::1"  # port 3081
    assert flags().internal_http_address is None  # not served
    for bad, said in ((["--internal-http-address", "localhost"], "not an IP address"),
                      (["--external-http-port", "3081", "--internal-http-address", "127.0.0.1"], "must differ"),
                      (["--external-http-port", "4000", "--internal-http-port", "4000"], "must differ")):
        with pytest.raises(cli.UsageError, match=said):
            flags(*bad)
