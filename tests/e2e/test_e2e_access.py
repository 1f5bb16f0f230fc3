"""Access to a booted tree's API as Neon's clients and attackers meet it (compute/api/access.py):
HEAD's token rules with neon_local's own key and tokens, and the loopback rule of a compute
without a JWKS, from a real non-loopback peer (this machine's primary address)."""

from __future__ import annotations

import hashlib
import json
import os

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.peers.control_plane import ControlPlanePeer
from tests.support.api_helpers import call_from, jwks_keys, non_loopback_address, token_for
from tests.support.tree import Compute

JSON = {"Content-Type": "application/json"}


def neon_local_jwks(ed) -> dict:
    """The JWKS neon_local puts in compute_ctl_config (cp/endpoint.rs create_jwks_from_pem)."""
    import base64
    raw = ed.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    return {"keys": [{"use": "sig", "key_ops": ["verify"], "alg": "EdDSA", "kid": b64(hashlib.sha256(raw).digest()),
                      "kty": "OKP", "crv": "Ed25519", "x": b64(raw)}]}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def peer() -> str:
    addr = non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback address")
    return addr


def test_a_compute_without_jwks_serves_its_guarded_routes_to_loopback_only(peer):
    """Push mode on all interfaces: it warns at start; a peer on the network gets 403 for
    /promote (the replica takeover the issue describes), /configure, /terminate and the catalog,
    and /status; loopback clients keep everything."""
    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        assert "listens on 0.0.0.0 (not loopback) without a JWKS" in c.output()
        new = {"spec": {**c.new_spec(), "mode": "Primary"}, "wal_flush_lsn": "0/0"}
        for method, path, body in (("POST", "/promote", json.dumps(new).encode()),
                                   ("POST", "/configure", json.dumps({"spec": c.new_spec()}).encode()),
                                   ("POST", "/terminate", None), ("POST", "/check_writability", None),
                                   ("GET", "/dbs_and_roles", None), ("GET", "/insights", None),
                                   ("GET", "/database_schema?database=postgres", None)):
            code, _, answer = call_from(peer, c.http_port, method, path, body, {**JSON, "X-Forwarded-For": "127.0.0.1"})
            assert code == 403 and "loopback" in json.loads(answer)["error"], (path, code, answer)
        code, _, answer = call_from(peer, c.http_port, "GET", "/status")
        assert code == 200 and json.loads(answer)["status"] == "running"
        assert c.request("GET", "/dbs_and_roles")[0] == 200  # loopback
        assert c.status()["status"] == "running"  # nothing was stopped or configured


def test_neon_locals_keys_and_tokens_drive_the_tree_and_others_do_not(peer):
    """neon_local's JWK, its tokens (EdDSA, no kid, no exp, the nulls), /status polled with the
    compute's token, /configure with HEAD's body, /terminate?mode=immediate with an admin token;
    another compute's token, an expired one, an admin token without the audience, `alg` tricks
    and a missing header are refused, from loopback and from the network alike."""
    ed, rs, _ = jwks_keys()
    with ControlPlanePeer(None) as cp:
        c = Compute()
        c.args = ["-i", "ep-1", "-p", cp.url, "--control-plane-api", "2023"]
        c.env = {"NEON_CONSOLE_JWT": "cp-token"}
        cp.spec = c.new_spec()
        c.use_jwks(neon_local_jwks(ed), token_for(ed, "ep-1"))
        with c:
            c.wait_status("running")
            assert "not loopback" not in c.output()
            mine, admin = bearer(token_for(ed, "ep-1")), bearer(token_for(ed))
            refused = {
                "no header": ({"Authorization": None}, 400),
                "basic": ({"Authorization": "Basic ZXAtMTp4"}, 400),
                "another compute": (bearer(token_for(ed, "ep-2")), 403),
                "no compute id": (bearer(jwt.encode({"scope": None, "aud": None}, ed, algorithm="EdDSA")), 403),
                "expired": (bearer(token_for(ed, "ep-1", exp=1)), 401),
                "admin without aud": (bearer(token_for(ed, aud=None)), 401),
                "admin, another aud": (bearer(token_for(ed, aud=["pageserver"])), 401),
                "a key not in the JWKS": (bearer(token_for(rs, "ep-1", algorithm="RS256")), 401),
                "HS256 keyed with the public x": (bearer(token_for(neon_local_jwks(ed)["keys"][0]["x"].ljust(32, "A"),
                                                                   "ep-1", algorithm="HS256")), 401),
            }
            for name, (headers, want) in refused.items():
                for path in ("/status", "/metrics.json"):
                    assert c.request("GET", path, headers=headers)[0] == want, (name, path)
                    h = {k: v for k, v in headers.items() if v is not None}
                    assert call_from(peer, c.http_port, "GET", path, None, h)[0] == want, (name, path)
                code, answer = c.request("POST", "/configure", {"spec": c.new_spec()}, headers)
                assert code == want, (name, answer)
                assert c.request("POST", "/terminate?mode=immediate", None, headers)[0] == want, name
            assert c.request("GET", "/healthz", headers={"Authorization": None})[0] == 200
            assert call_from(peer, c.http_port, "GET", "/metrics")[0] == 200

            # /configure as neon_local sends it: {spec, compute_ctl_config}, the compute's token
            body = {"spec": c.new_spec(**{"work_mem": "9MB"}), "compute_ctl_config": {"jwks": neon_local_jwks(ed),
                                                                                       "tls": None}}
            code, answer = c.request("POST", "/configure", body, mine, timeout=120)
            assert code == 200, answer
            code, answer = c.request("GET", "/status", headers=mine)
            assert code == 200 and json.loads(answer)["status"] == "running"
            # from the network with the token as well
            code, _, answer = call_from(peer, c.http_port, "GET", "/status", None, mine)
            assert code == 200

            code, answer = c.request("POST", "/terminate?mode=immediate", None, admin, timeout=60)
            assert code == 200 and "lsn" in json.loads(answer), answer
            assert c.wait_exit(60) == 0


def test_a_jwks_file_missing_at_start_refuses_the_start():
    """--jwks naming a file that is not there: the start is refused with a sentence naming it
    (issue 20 item 4; a JWKS that arrives later comes through `-c` or the pull answer, written by
    compute-ctl itself: tests/e2e/test_e2e_launch.py), never a compute open to any token."""
    with ControlPlanePeer(None) as cp:
        c = Compute()
        c.args = ["-i", "ep-1", "-p", cp.url, "--control-plane-api", "2023"]
        c.env = {"NEON_CONSOLE_JWT": "cp-token"}
        cp.spec = c.new_spec()
        path = os.path.join(c.base, "later", "jwks.json")
        c.args += ["--jwks", path]
        try:
            c.start()
            assert c.wait_exit(60) == 1
            out = c.output()
            assert path in out and "--jwks" in out, out[-3000:]
            assert not os.path.exists(os.path.join(c.runtime_dir, "state.db"))
        finally:
            c.close()

