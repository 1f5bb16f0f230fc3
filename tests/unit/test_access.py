"""Who may call which route (compute/api/access.py, HEAD's authorize middleware plus our loopback
rule): the pure decision, the JWKS file, and the falcon middleware in-process (TestClient).

Real gunicorn with a real non-loopback peer: tests/integration/test_access_net.py; the booted
tree: tests/e2e/test_e2e_access.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from compute.api import access
from compute.api.access import (GUARDED, INVALID_AUDIENCE, INVALID_COMPUTE_ID, INVALID_HEADER, LOOPBACK_ONLY,
                                MISSING_AUDIENCE, MISSING_COMPUTE_ID, NOT_VERIFIED, OPEN, READ, Jwks, JwksFile,
                                answerable_without_credentials, decide, is_loopback, parse_jwks, route_policy)
from compute.model.compute_config import ComputeCtlConfig, ConfigError, parse_compute_ctl_config
from tests.support.api_helpers import (client_for, fake_driver, forged_token, jwks_keys, launch_settings, make_state,
                                       minimal_spec, rt, write_jwks)

__all__ = ["rt"]

NOW = 1_800_000_000.0
ME = "compute-1"
GUARDED_ROUTES = ("/configure", "/promote", "/terminate", "/check_writability", "/insights", "/dbs_and_roles",
                  "/database_schema")
READ_ROUTES = ("/status", "/metrics.json", "/info", "/openapi.yaml")
OPEN_ROUTES = ("/metrics", "/healthz", "/readyz")


@pytest.fixture(scope="module")
def keys():
    return jwks_keys()


@pytest.fixture(scope="module")
def jwks(keys):
    return parse_jwks(keys[2])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def ed_token(keys, claims: dict, **headers) -> str:
    return jwt.encode(claims, keys[0], algorithm="EdDSA", headers=headers or None)


def mine(**extra) -> dict:
    return {"compute_id": ME, **extra}


def admin(**extra) -> dict:
    return {"compute_id": None, "scope": "compute_ctl:admin", "aud": ["compute"], **extra}


def bearer(token: str) -> str:
    return f"Bearer {token}"


def run(route, authorization, jwks, *, peer="127.0.0.1", compute_id=ME, require_exp=False, now=NOW):
    return decide(route, peer, authorization, jwks, compute_id, require_exp=require_exp, now=now)


# -- routes and peers ---------------------------------------------------------------------------

def test_route_policies():
    assert {route_policy(r) for r in OPEN_ROUTES} == {OPEN}
    assert {route_policy(r) for r in READ_ROUTES} == {READ}
    assert {route_policy(r) for r in GUARDED_ROUTES} == {GUARDED}
    for unknown in ("/grants", "/extensions", "/lfc/prewarm", "/status/", "/STATUS", ""):
        assert route_policy(unknown) == GUARDED, unknown  # anything new fails closed


@pytest.mark.parametrize("peer,loopback", [
    ("127.0.0.1", True), ("127.9.8.7", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.5", False), ("192.168.1.2", False), ("0.0.0.0", False), ("::", False), ("::ffff:10.0.0.1", False),
    ("fe80::1%eth0", False), ("localhost", False), ("", False), (None, False), ("127.0.0.1, 10.0.0.1", False),
])
def test_is_loopback(peer, loopback):
    assert is_loopback(peer) is loopback


def test_the_early_responder_answers_only_what_needs_no_credentials():
    assert all(answerable_without_credentials(r, j) for r in OPEN_ROUTES for j in (None, True, False))
    assert all(answerable_without_credentials(r, False) for r in READ_ROUTES)
    assert not any(answerable_without_credentials(r, j) for r in READ_ROUTES for j in (None, True))
    assert not any(answerable_without_credentials(r, j) for r in GUARDED_ROUTES for j in (None, True, False))


# -- without a JWKS: the loopback rule ------------------------------------------------------------

def test_without_jwks_read_and_open_routes_answer_anyone():
    for route in READ_ROUTES + OPEN_ROUTES:
        for peer in ("127.0.0.1", "10.0.0.5", None):
            assert run(route, None, None, peer=peer).allowed, (route, peer)


def test_without_jwks_guarded_routes_answer_loopback_peers_only():
    for route in GUARDED_ROUTES + ("/grants",):
        assert run(route, None, None, peer="127.0.0.1").allowed
        assert run(route, None, None, peer="::1").allowed
        for peer in ("10.0.0.5", "::ffff:10.0.0.1", "fe80::1", None, ""):
            d = run(route, None, None, peer=peer)
            assert (d.allowed, d.status, d.error) == (False, 403, LOOPBACK_ONLY), (route, peer)
            # a token changes nothing: there is nothing to check it against
            d = run(route, bearer("x.y.z"), None, peer=peer)
            assert (d.allowed, d.status) == (False, 403)


# -- with a JWKS: HEAD's rules ---------------------------------------------------------------------

def test_with_jwks_open_routes_need_nothing(jwks):
    for route in OPEN_ROUTES:
        for j in (jwks, Jwks()):
            assert run(route, None, j, peer="10.0.0.5").allowed


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer ", "Bearer    ", "bearer", "Token x.y.z",
                                    "Bearerx.y.z"])
def test_with_jwks_no_bearer_header_is_400_everywhere_even_from_loopback(jwks, header):
    for route in READ_ROUTES + GUARDED_ROUTES:
        d = run(route, header, jwks)
        assert (d.allowed, d.status, d.error) == (False, 400, INVALID_HEADER), (route, header)


def test_scheme_is_case_insensitive(keys, jwks):
    token = ed_token(keys, mine())
    assert run("/status", f"bearer {token}", jwks).allowed
    assert run("/status", f"BEARER {token}", jwks).allowed


def test_valid_tokens_of_this_compute(keys, jwks):
    ed, rs, _ = keys
    tokens = [
        ed_token(keys, mine()),  # neon_local's: no kid, no exp
        ed_token(keys, {"compute_id": ME, "scope": None, "aud": None}),  # neon_local sends the nulls
        ed_token(keys, mine(exp=NOW + 60), kid="ed"),
        jwt.encode(mine(exp=NOW + 60), rs, algorithm="RS256", headers={"kid": "rs"}),
        jwt.encode(mine(), rs, algorithm="RS256"),
        ed_token(keys, mine(nbf=NOW + 3600, iat=NOW + 3600, sub=7)),  # HEAD checks neither nbf nor iat
    ]
    for token in tokens:
        for route in READ_ROUTES + GUARDED_ROUTES:
            d = run(route, bearer(token), jwks, peer="10.0.0.5")
            assert d.allowed, (route, d)
            assert d.claims["compute_id"] == ME


def test_admin_tokens(keys, jwks):
    for claims in (admin(), admin(aud=["other", "compute"]), admin(compute_id="compute-2")):
        assert run("/terminate", bearer(ed_token(keys, claims)), jwks).allowed, claims
        # a compute without an id accepts admin tokens
        assert run("/terminate", bearer(ed_token(keys, claims)), jwks, compute_id=None).allowed
    d = run("/terminate", bearer(ed_token(keys, admin(aud=None))), jwks)
    assert (d.status, d.error) == (401, MISSING_AUDIENCE)
    for aud in ([], ["computes"], ["Compute"], ["pageserver"]):
        d = run("/terminate", bearer(ed_token(keys, admin(aud=aud))), jwks)
        assert (d.status, d.error) == (401, INVALID_AUDIENCE), aud
    d = run("/terminate", bearer(ed_token(keys, admin(aud="compute"))), jwks)  # HEAD: aud must be a list
    assert (d.status, d.error) == (401, NOT_VERIFIED)


def test_tokens_of_another_compute_are_403(keys, jwks):
    for claims, error in ((mine(compute_id="compute-2"), INVALID_COMPUTE_ID), ({}, MISSING_COMPUTE_ID),
                          (mine(compute_id=None), MISSING_COMPUTE_ID), (mine(compute_id=""), INVALID_COMPUTE_ID),
                          (mine(compute_id="COMPUTE-1"), INVALID_COMPUTE_ID),
                          (mine(aud=["compute"]), None)):  # aud without the admin scope: still its compute's
        d = run("/configure", bearer(ed_token(keys, claims)), jwks)
        if error is None:
            assert d.allowed
            continue
        assert (d.allowed, d.status, d.error) == (False, 403, error), claims
    d = run("/configure", bearer(ed_token(keys, mine())), jwks, compute_id=None)
    assert (d.status, d.error) == (403, INVALID_COMPUTE_ID)  # no id of ours: only admin tokens


def test_expiry(keys, jwks):
    def status(claims, **kw):
        d = run("/status", bearer(ed_token(keys, claims)), jwks, **kw)
        return 200 if d.allowed else d.status

    assert status(mine(exp=NOW + 1)) == 200
    assert status(mine(exp=NOW - 30)) == 200  # HEAD's 60 s leeway
    assert status(mine(exp=NOW - 61)) == 401
    assert status(mine(exp=0)) == 401
    assert status(mine(exp="never")) == 401
    assert status(mine(exp=True)) == 401
    assert status(mine()) == 200  # no exp: accepted, as HEAD ...
    assert status(mine(), require_exp=True) == 401  # ... unless --jwt-require-exp
    assert status(mine(exp=None), require_exp=True) == 401
    assert status(mine(exp=NOW + 60), require_exp=True) == 200
    assert status(admin(exp=NOW - 120)) == 401


def test_claims_of_the_wrong_type_are_401(keys, jwks):
    for claims in (mine(compute_id=1), mine(compute_id=[ME]), mine(scope="compute_ctl:root"), mine(scope=1),
                   mine(aud=[1]), mine(aud={"compute": 1})):
        d = run("/status", bearer(ed_token(keys, claims)), jwks)
        assert (d.status, d.error) == (401, NOT_VERIFIED), claims


def test_bad_signatures_and_alg_tricks_are_401(keys, jwks):
    ed, rs, doc = keys
    stranger = ed25519.Ed25519PrivateKey.generate()
    rs_stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pem = rs.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    ed_raw = ed.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    forged = forged_token
    good = ed_token(keys, mine())
    head, payload, sig = good.split(".")
    bad = {
        "stranger": jwt.encode(mine(), stranger, algorithm="EdDSA"),
        "stranger with our kid": jwt.encode(mine(), stranger, algorithm="EdDSA", headers={"kid": "ed"}),
        "rsa stranger": jwt.encode(mine(), rs_stranger, algorithm="RS256", headers={"kid": "rs"}),
        "our key, unknown kid": ed_token(keys, mine(), kid="unknown"),
        "kid confusion: EdDSA token naming the RSA key": ed_token(keys, mine(), kid="rs"),
        "kid confusion: RS256 token naming the Ed25519 key": jwt.encode(mine(), rs, algorithm="RS256",
                                                                      headers={"kid": "ed"}),
        "alg none": forged({"alg": "none", "typ": "JWT"}, mine(), None),
        "alg none, no signature part": forged({"alg": "none"}, mine(), None).rsplit(".", 1)[0] + ".",
        "alg None": forged({"alg": "None"}, mine(), None),
        "HS256 keyed with a random secret": jwt.encode(mine(), "s" * 32, algorithm="HS256"),
        "HS256 keyed with the RSA public key PEM": forged({"alg": "HS256", "kid": "rs"}, mine(), rsa_pem),
        "HS256 keyed with the RSA PEM, no kid": forged({"alg": "HS256"}, mine(), rsa_pem),
        "HS256 keyed with the Ed25519 public key": forged({"alg": "HS256", "kid": "ed"}, mine(), ed_raw),
        "HS256 keyed with the Ed25519 x": forged({"alg": "HS256"}, mine(), doc["keys"][0]["x"].encode()),
        "EdDSA signature under an RS256 header": b64(json.dumps({"alg": "RS256"}).encode()) + "." + payload + "." + sig,
        "tampered payload": f"{head}.{b64(json.dumps(mine(compute_id=ME, scope='compute_ctl:admin', aud=['compute'])).encode())}.{sig}",
        "signature cut": f"{head}.{payload}.",
        "two parts": f"{head}.{payload}",
        "garbage": "not.a.jwt",
        "one word": "abc",
        "a JWE-shaped token": f"{head}.{payload}.{sig}.x.y",
    }
    for name, token in bad.items():
        for route in ("/status", "/configure"):
            d = run(route, bearer(token), jwks)
            assert (d.allowed, d.status, d.error) == (False, 401, NOT_VERIFIED), name


def test_a_jwks_whose_keys_disagree_with_their_kty_verifies_nothing(keys):
    ed, rs, doc = keys
    ed_jwk, rs_jwk = doc["keys"]
    lying = parse_jwks({"keys": [{**ed_jwk, "alg": "RS256"}, {**rs_jwk, "alg": "EdDSA"}, {**rs_jwk, "alg": "HS256"},
                                 {"kty": "oct", "k": b64(b"s" * 32), "alg": "HS256"},
                                 {**ed_jwk, "crv": "X25519"}, {**ed_jwk, "use": "enc"},
                                 {**ed_jwk, "key_ops": ["encrypt"]}]})
    assert lying.keys == ()
    for token in (ed_token(keys, mine()), jwt.encode(mine(), rs, algorithm="RS256"),
                  jwt.encode(mine(), b64(b"s" * 32), algorithm="HS256"), jwt.encode(mine(), "s" * 32, algorithm="HS256")):
        assert run("/status", bearer(token), lying).status == 401


def test_an_empty_jwks_refuses_every_token(keys):
    for route in READ_ROUTES + GUARDED_ROUTES:
        d = run(route, bearer(ed_token(keys, admin())), Jwks())
        assert (d.allowed, d.status, d.error) == (False, 401, NOT_VERIFIED)
        assert run(route, None, Jwks()).status == 400


def test_parse_jwks_takes_neon_locals_key(keys):
    """The JWK neon_local writes (cp/endpoint.rs create_jwks_from_pem)."""
    ed_pub = keys[0].public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    kid = b64(hashlib.sha256(ed_pub).digest())
    doc = {"keys": [{"use": "sig", "key_ops": ["verify"], "alg": "EdDSA", "kid": kid, "kty": "OKP",
                     "crv": "Ed25519", "x": b64(ed_pub)}]}
    parsed = parse_jwks(doc)
    assert [(k.kid, k.alg) for k in parsed.keys] == [(kid, "EdDSA")]
    assert run("/status", bearer(ed_token(keys, mine())), parsed).allowed


def test_load_jwks_skips_unsupported_keys(tmp_path, keys):
    doc = {"keys": [{"kty": "oct", "k": "c2VjcmV0"},
                    {"kty": "OKP", "crv": "X25519", "x": keys[2]["keys"][0]["x"]},
                    {"kty": "RSA", "alg": "RS512", "n": keys[2]["keys"][1]["n"], "e": "AQAB"},
                    {"kty": "OKP", "crv": "Ed25519", "x": "not base64 of 32 bytes"},
                    keys[2]["keys"][0]]}
    loaded = access.load_jwks(write_jwks(str(tmp_path / "j.json"), doc))
    assert [(k.kid, k.alg) for k in loaded.keys] == [("ed", "EdDSA")]


# -- the JWKS file ---------------------------------------------------------------------------------

def test_jwks_file_missing_then_written_then_rotated_then_broken(tmp_path, keys):
    """Pull mode: the file appears once the control plane has answered. Until then nothing
    verifies; a rotation is picked up; a broken file verifies nothing (never falls open)."""
    path = str(tmp_path / "jwks.json")
    f = JwksFile(path)
    assert f.current().keys == ()
    write_jwks(path, {"keys": [keys[2]["keys"][1]]})  # RSA only
    assert [k.kid for k in f.current().keys] == ["rs"]
    write_jwks(path, keys[2])
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert [k.kid for k in f.current().keys] == ["ed", "rs"]
    with open(path, "w") as out:
        out.write('{"keys": [')
    assert f.current().keys == ()
    os.unlink(path)
    assert f.current().keys == ()


def test_compute_ctl_config_shape():
    ok = {"jwks": {"keys": []}, "tls": None}
    assert parse_compute_ctl_config(ok) == ComputeCtlConfig(jwks={"keys": []}, tls=None)
    assert parse_compute_ctl_config({"jwks": {"keys": [{"kty": "OKP"}]}, "unknown": 1}).jwks == {"keys": [{"kty": "OKP"}]}
    assert parse_compute_ctl_config({"jwks": {"keys": []}, "tls": {"key_path": "/k", "cert_path": "/c"}}).tls
    for bad in (None, [], {"tls": None}, {"jwks": {}}, {"jwks": {"keys": [{}]}}, {"jwks": {"keys": [{"kty": 1}]}},
                {"jwks": {"keys": []}, "tls": {"key_path": 1, "cert_path": "/c"}}):
        with pytest.raises(ConfigError):
            parse_compute_ctl_config(bad)


# -- the middleware, in-process ---------------------------------------------------------------------

@pytest.fixture
def jwks_compute(rt, keys):
    path = write_jwks(os.path.join(rt, "jwks.json"), keys[2])
    make_state(rt, status="failed", launch=launch_settings(rt, jwks_path=path, compute_id=ME))
    return client_for(rt)


def test_middleware_answers_heads_errors(jwks_compute, keys):
    c = jwks_compute
    for path in READ_ROUTES:
        r = c.simulate_get(path)
        assert (r.status_code, r.json) == (400, {"error": INVALID_HEADER}), path
    r = c.simulate_post("/check_writability", headers={"Authorization": "Bearer not.a.jwt"})
    assert (r.status_code, r.json) == (401, {"error": NOT_VERIFIED})
    assert r.headers["www-authenticate"] == "Bearer"
    other = ed_token(keys, mine(compute_id="compute-2"))
    r = c.simulate_post("/check_writability", headers={"Authorization": bearer(other)})
    assert (r.status_code, r.json) == (403, {"error": INVALID_COMPUTE_ID})
    r = c.simulate_get("/status", headers={"Authorization": bearer(ed_token(keys, mine()))})
    assert r.status_code == 200 and r.json["status"] == "failed"
    r = c.simulate_post("/check_writability", headers={"Authorization": bearer(ed_token(keys, admin()))})
    assert r.status_code == 412 and r.json["error"].startswith("invalid compute status")  # past the check


def test_middleware_leaves_open_routes_404_and_405_alone(jwks_compute):
    c = jwks_compute
    for path in OPEN_ROUTES:
        assert c.simulate_get(path, remote_addr="10.0.0.5").status_code in (200, 503), path
    assert c.simulate_get("/nope").status_code == 404
    assert c.simulate_get("/configure").status_code == 405  # 405, not 400


def test_middleware_without_jwks_refuses_non_loopback_peers(rt):
    make_state(rt, status="init")
    c = client_for(rt)
    for path in GUARDED_ROUTES:
        method = c.simulate_get if path in ("/insights", "/dbs_and_roles", "/database_schema") else c.simulate_post
        r = method(path, remote_addr="10.0.0.5", headers={"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1",
                                                          "Forwarded": "for=127.0.0.1"})
        assert (r.status_code, r.json) == (403, {"error": LOOPBACK_ONLY}), path
    assert c.simulate_get("/status", remote_addr="10.0.0.5").status_code == 200
    r = c.simulate_post("/check_writability")  # loopback: past the check, to the status answer
    assert r.status_code == 412 and r.json["error"].startswith("invalid compute status")
    assert c.simulate_post("/configure", json={"spec": minimal_spec()}).status_code == 412  # the status


def test_the_peer_is_never_taken_from_what_the_client_sends():
    from compute.api.auth import tcp_peer
    assert tcp_peer({"REMOTE_ADDR": "10.0.0.5", "HTTP_X_FORWARDED_FOR": "127.0.0.1"}) == "10.0.0.5"
    assert tcp_peer({"REMOTE_ADDR": "127.0.0.1", "PROXY_PROTOCOL": "TCP4", "PROXY_ADDR": "127.0.0.1"}) is None
    assert tcp_peer({}) is None


def test_middleware_with_a_missing_jwks_file_refuses_then_accepts_once_written(rt, keys):
    path = os.path.join(rt, "jwks.json")
    make_state(rt, launch=launch_settings(rt, jwks_path=path, compute_id=ME))
    c = client_for(rt)
    token = {"Authorization": bearer(ed_token(keys, mine()))}
    assert c.simulate_get("/status", headers=token).status_code == 401
    assert c.simulate_get("/status").status_code == 400
    assert c.simulate_post("/configure", json={"spec": minimal_spec()}, headers=token).status_code == 401
    assert c.simulate_get("/healthz").status_code == 200
    write_jwks(path, keys[2])
    assert c.simulate_get("/status", headers=token).status_code == 200
    with fake_driver(rt):
        assert c.simulate_post("/configure", json={"spec": minimal_spec()}, headers=token).status_code == 200


def test_middleware_jwt_require_exp(rt, keys):
    path = write_jwks(os.path.join(rt, "jwks.json"), keys[2])
    make_state(rt, launch=launch_settings(rt, jwks_path=path, compute_id=ME, jwt_require_exp=True))
    c = client_for(rt)
    assert c.simulate_get("/status", headers={"Authorization": bearer(ed_token(keys, mine()))}).status_code == 401
    fresh = ed_token(keys, mine(exp=time.time() + 60))
    assert c.simulate_get("/status", headers={"Authorization": bearer(fresh)}).status_code == 200
