"""Access rules against real gunicorn on all interfaces, with a real non-loopback peer: a client
bound to this machine's primary address (compute/api/access.py; the pure decision:
tests/unit/test_access.py)."""

from __future__ import annotations

import json
import os
import socket

import jwt
import pytest

from tests.support.api_helpers import (call, call_from, gunicorn, jwks_keys, launch_settings, make_state,
                                       non_loopback_address, token_for, write_jwks)
from tests.support.pgcluster import free_port

GUARDED = [("POST", "/configure"), ("POST", "/promote"), ("POST", "/terminate"), ("POST", "/check_writability"),
           ("GET", "/insights"), ("GET", "/dbs_and_roles"), ("GET", "/database_schema?database=postgres")]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def peer() -> str:
    addr = non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback address")
    return addr


def _serve(tmp_path, **launch):
    rt, port = str(tmp_path), free_port()
    store = make_state(rt, status="init", launch=launch_settings(rt, http_port=port, **launch))
    store.close()
    return rt, port


def _body(method: str) -> bytes | None:
    return b"{}" if method == "POST" else None


def test_without_jwks_a_non_loopback_peer_gets_403_on_guarded_routes(tmp_path, peer):
    rt, port = _serve(tmp_path)
    with gunicorn(rt):
        for method, path in GUARDED:
            # forwarding headers claiming loopback change nothing: the TCP peer decides
            for extra in ({}, {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "Forwarded": "for=127.0.0.1"}):
                code, headers, body = call_from(peer, port, method, path, _body(method), {**JSON, **extra})
                assert code == 403, (method, path, body)
                assert "loopback" in json.loads(body)["error"]
        for path in ("/status", "/metrics.json", "/info", "/healthz", "/metrics"):
            assert call_from(peer, port, "GET", path)[0] == 200, path
        # the same requests from loopback get past the check (to the status rules: 412/200 text)
        code, _, body = call(port, "POST", "/configure", b'{"spec": {}}', JSON)
        assert code == 412 and json.loads(body) == {"error": "invalid compute status: init"}
        code, _, body = call(port, "POST", "/check_writability")
        assert code == 412 and json.loads(body) == {"error": "invalid compute status: init"}


@pytest.mark.parametrize("proxy_protocol", [False, True], ids=["off", "turned-on-by-env"])
def test_a_proxy_protocol_line_does_not_make_a_peer_loopback(tmp_path, peer, proxy_protocol):
    """gunicorn's PROXY protocol is off: a PROXY header claiming 127.0.0.1 is not believed; and
    were it turned on (GUNICORN_CMD_ARGS, trusting every proxy), a peer it names is unknown, so
    not loopback either."""
    rt, port = _serve(tmp_path)
    env = {"GUNICORN_CMD_ARGS": "--proxy-protocol v1 --proxy-allow-from *"} if proxy_protocol else {}
    with gunicorn(rt, env=env):
        with socket.create_connection((peer, port), timeout=10, source_address=(peer, 0)) as s:
            s.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 3080\r\n"
                      b"POST /terminate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        assert not out.startswith(b"HTTP/1.1 200"), out[:200]
        assert b"terminated" not in out
        if proxy_protocol:
            assert out.startswith(b"HTTP/1.1 403"), out[:200]
        else:
            assert call_from(peer, port, "POST", "/terminate")[0] == 403


def test_with_jwks_a_non_loopback_peer_needs_a_token_of_this_compute(tmp_path, peer):
    ed, rs, doc = jwks_keys()
    path = write_jwks(str(tmp_path / "jwks.json"), doc)
    rt, port = _serve(tmp_path, jwks_path=path, compute_id="compute-1")
    mine = {"Authorization": "Bearer " + token_for(ed, "compute-1")}
    admin = {"Authorization": "Bearer " + token_for(rs, algorithm="RS256")}
    other = {"Authorization": "Bearer " + token_for(ed, "compute-2")}
    expired = {"Authorization": "Bearer " + token_for(ed, "compute-1", exp=1)}
    none_alg = jwt.encode({"compute_id": "compute-1"}, None, algorithm="none")
    with gunicorn(rt):
        for source in (peer, "127.0.0.1"):  # loopback is no exception under a JWKS
            for method, route in [("GET", "/status"), ("GET", "/metrics.json")] + GUARDED:
                code = call_from(source, port, method, route, _body(method), JSON)[0]
                assert code == 400, (source, route)
                for bad, want in ((other, 403), (expired, 401), ({"Authorization": f"Bearer {none_alg}"}, 401)):
                    assert call_from(source, port, method, route, _body(method), {**JSON, **bad})[0] == want, route
            for good in (mine, admin):
                code, _, body = call_from(source, port, "GET", "/status", None, good)
                assert code == 200 and json.loads(body)["status"] == "init"
                assert call_from(source, port, "POST", "/check_writability", None, good)[0] == 412  # past the check: the status
            assert call_from(source, port, "GET", "/healthz")[0] == 200
    # every refusal was logged (route, peer, reason), no token ever
    with open(os.path.join(rt, "gunicorn.log"), encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert f"refused GET /status from {peer}: 403" in log and "refused GET /status from 127.0.0.1: 400" in log
    for headers in (mine, admin, other, expired):
        token = headers["Authorization"].split()[1]
        assert token not in log and token.split(".")[2] not in log
    assert none_alg not in log


def test_a_jwks_file_that_is_not_there_yet_refuses_every_token_until_it_is(tmp_path, peer):
    """Pull mode: compute-ctl writes the file once the control plane answers; until then the
    API starts without it and falls open nowhere."""
    ed, _, doc = jwks_keys()
    path = str(tmp_path / "jwks.json")
    rt, port = _serve(tmp_path, jwks_path=path, compute_id="compute-1")
    token = {"Authorization": "Bearer " + token_for(ed, "compute-1")}
    with gunicorn(rt):
        for source in (peer, "127.0.0.1"):
            assert call_from(source, port, "GET", "/status")[0] == 400
            assert call_from(source, port, "GET", "/status", None, token)[0] == 401
            assert call_from(source, port, "POST", "/configure", b"{}", {**JSON, **token})[0] == 401
            assert call_from(source, port, "GET", "/healthz")[0] == 200
        tmp = path + ".tmp"
        write_jwks(tmp, doc)
        os.replace(tmp, path)
        assert call_from(peer, port, "GET", "/status", None, token)[0] == 200
