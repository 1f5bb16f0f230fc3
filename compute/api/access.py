"""Who may call which route of the HTTP API: Neon compute_ctl's `authorize` middleware at HEAD
(compute_tools/src/http/middleware/authorize.rs, http/server.rs), plus our rule for a compute
without a JWKS.

Routes, by policy (route_policy):
  OPEN     /metrics, /healthz, /readyz: never a token (scrapers and probes carry none).
  READ     /status, /metrics.json, /info, /openapi.yaml: a token when the compute has a JWKS;
           open to anyone without one.
  GUARDED  everything else (/configure, /promote, /terminate, /check_writability, /insights,
           /dbs_and_roles, /database_schema, and any route added later): a token when the
           compute has a JWKS; without one, loopback peers only (403 for the others).

"The compute has a JWKS" means its settings name a JWKS file (`jwks_path`: `--jwks`, or the
file compute-ctl writes from `compute_ctl_config.jwks`). A named file that does not exist (yet),
cannot be read or holds no usable key verifies nothing: every route that needs a token is
refused, never opened. The file is re-read when it changes (mtime, size, inode).

A token (HEAD's rules and bodies, `{"error": ...}`):
  400 `invalid authorization token`: no `Authorization: Bearer <token>` header;
  401 `failed to verify authorization token`: no key of the JWKS verifies it (bad signature,
      algorithm, expired `exp` (60 s leeway, as HEAD's library), a claim of the wrong type, an
      unknown `scope`); `exp` is not required unless `--jwt-require-exp`;
  `scope: "compute_ctl:admin"`: `aud` must be a list containing `compute`, else 401
      `missing audience in authorization token claims` / `invalid audience in authorization token claims`;
  other tokens: `compute_id` must be ours, else 403 `missing compute_id in authorization token
      claims` / `invalid compute ID in authorization token claims` (a compute without a
      compute id accepts admin tokens only).
The algorithm comes from the key (OKP/Ed25519: EdDSA; RSA: RS256), never from the token, so a
public key can never be used as an HMAC secret and `none` is never accepted; a `kid` in the
token selects among keys that carry one.

`decide()` is the whole decision, pure (the JWKS, the time and the peer are arguments); the
falcon middleware (compute/api/auth.py) only gathers its inputs and turns a refusal into the
answer. No falcon here; the route table itself is compute/api/route_policy.py (the early responder's).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

# The route table (the early responder imports it alone): re-exported from here.
from compute.api.route_policy import (GUARDED, OPEN, OPEN_ROUTES, READ, READ_ROUTES,  # noqa: F401
                                      answerable_without_credentials, route_policy)


def _jwt():
    """PyJWT, imported when a JWKS is first used, never before: with cryptography (a large Rust
    extension: docs/performance.md, "Figures behind the code") it is memory a compute without
    a JWKS never needs. With one the warm image imports it before any program is forked
    (compute/tree/warmfork.py), so this costs nothing then. None when not installed (PyJWT[crypto]
    is a dependency; without it no token can be verified, and none is accepted)."""
    try:
        import jwt
    except ImportError:
        return None
    return jwt


def preload_verifier() -> None:
    """Import now what verifying a token imports on first use (PyJWT, cryptography, the JWKS
    document's checks): for compute-ctl's early responder, whose thread must not import while
    the main thread may fork."""
    from compute.model.compute_config import check_jwks_document  # noqa: F401 - parse_jwks' import
    _jwt()


log = logging.getLogger("compute.api.access")


COMPUTE_AUDIENCE = "compute"  # HEAD's libs/compute_api/src/requests.rs
ADMIN_SCOPE = "compute_ctl:admin"
EXP_LEEWAY = 60  # seconds: HEAD's jsonwebtoken default

INVALID_HEADER = "invalid authorization token"
NOT_VERIFIED = "failed to verify authorization token"
MISSING_AUDIENCE = "missing audience in authorization token claims"
INVALID_AUDIENCE = "invalid audience in authorization token claims"
MISSING_COMPUTE_ID = "missing compute_id in authorization token claims"
INVALID_COMPUTE_ID = "invalid compute ID in authorization token claims"
LOOPBACK_ONLY = ("this route answers only clients on this machine (loopback) when the compute has no JWKS "
                 "(--jwks or compute_ctl_config.jwks)")

_ALG_FOR_KTY = {"OKP": "EdDSA", "RSA": "RS256"}


def is_loopback(peer: str | None) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback; anything else (unknown included) is not."""
    if not peer:
        return False
    try:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


# -- keys --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    kid: str | None
    alg: str
    key: Any  # a cryptography public key


@dataclass(frozen=True)
class Jwks:
    """The verifying keys of a compute's JWKS; empty when its file is missing or unusable."""
    keys: tuple[Key, ...] = ()


def parse_jwks(doc: Any) -> Jwks:
    """The usable verifying keys of a JWKS document: Ed25519 (EdDSA) and RSA (RS256) signature
    keys; others are skipped with a warning (HEAD skips keys it cannot use too)."""
    from compute.model.compute_config import check_jwks_document  # not in the early responder's imports
    jwt = _jwt()
    keys: list[Key] = []
    for raw in check_jwks_document(doc):
        kid = raw.get("kid") if isinstance(raw.get("kid"), str) else None
        alg = _ALG_FOR_KTY.get(raw.get("kty"))
        if alg is None or raw.get("alg") not in (None, alg):
            log.warning("ignoring JWKS key %r: unsupported kty/alg %r/%r", kid, raw.get("kty"), raw.get("alg"))
            continue
        if raw.get("kty") == "OKP" and raw.get("crv") != "Ed25519":
            log.warning("ignoring JWKS key %r: unsupported curve %r", kid, raw.get("crv"))
            continue
        ops = raw.get("key_ops")
        if raw.get("use") not in (None, "sig") or (ops is not None and (not isinstance(ops, list) or "verify" not in ops)):
            log.warning("ignoring JWKS key %r: not a signature verification key", kid)
            continue
        if jwt is None:
            continue
        try:
            keys.append(Key(kid, alg, jwt.PyJWK.from_dict(raw, algorithm=alg).key))
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
            log.warning("ignoring JWKS key %r: %s", kid, e)
    return Jwks(tuple(keys))


def load_jwks(path: str) -> Jwks:
    """The JWKS in a file (OSError, ValueError (ConfigError too) when it cannot be read or parsed)."""
    with open(path, "rb") as f:
        doc = json.load(f)
    return parse_jwks(doc)


class JwksFile:
    """A JWKS file, re-read when it changes (key rotation without a restart). Missing or
    unusable: no keys (every token refused), said once per change, not per request."""

    def __init__(self, path: str):
        self.path = path
        self._jwks = Jwks()
        self._seen: tuple | None = None
        self._lock = threading.Lock()

    def current(self) -> Jwks:
        try:
            st = os.stat(self.path)
            seen: tuple = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as e:
            seen = ("missing", e.errno)
        if seen == self._seen:
            return self._jwks
        with self._lock:
            if seen != self._seen:
                self._jwks = self._read(seen)
                self._seen = seen
        return self._jwks

    def _read(self, seen: tuple) -> Jwks:
        if seen[0] == "missing":
            log.warning("JWKS %s cannot be read (%s): every route that needs a token is refused until it can",
                        self.path, os.strerror(seen[1]) if seen[1] else "missing")
            return Jwks()
        try:
            jwks = load_jwks(self.path)
        except (OSError, ValueError) as e:
            log.error("cannot load JWKS %s: %s: every route that needs a token is refused", self.path, e)
            return Jwks()
        if not jwks.keys:
            log.error("JWKS %s has no usable key: every route that needs a token is refused", self.path)
        else:
            log.info("JWKS %s loaded: %d key(s)", self.path, len(jwks.keys))
        return jwks


# -- the decision ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int = 200  # the answer's status when refused: 400, 401 or 403
    error: str = ""  # the answer's {"error"}
    reason: str = ""  # for the log only (never the token)
    claims: dict | None = None


ALLOW = Decision(True)


def _refuse(status: int, error: str, reason: str = "") -> Decision:
    return Decision(False, status, error, reason or error)


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, sep, token = authorization.partition(" ")
    token = token.strip()
    if not sep or scheme.lower() != "bearer" or not token:
        return None
    return token


def decide(route: str, peer: str | None, authorization: str | None, jwks: Jwks | None,
           compute_id: str | None, *, require_exp: bool = False, now: float | None = None) -> Decision:
    """May this request reach `route`? `jwks` None: the compute has none (loopback rule);
    a Jwks (possibly empty): a token is needed. Pure but for PyJWT's signature check."""
    policy = route_policy(route)
    if policy == OPEN:
        return ALLOW
    if jwks is None:
        if policy == GUARDED and not is_loopback(peer):
            return _refuse(403, LOOPBACK_ONLY, f"{route} from non-loopback peer {peer} without a JWKS")
        return ALLOW
    token = bearer_token(authorization)
    if token is None:
        return _refuse(400, INVALID_HEADER, "no 'Authorization: Bearer <token>' header")
    claims, why = verify(token, jwks, require_exp=require_exp, now=time.time() if now is None else now)
    if claims is None:
        return _refuse(401, NOT_VERIFIED, why)
    if claims.get("scope") == ADMIN_SCOPE:
        aud = claims.get("aud")
        if aud is None:
            return _refuse(401, MISSING_AUDIENCE)
        if COMPUTE_AUDIENCE not in aud:
            return _refuse(401, INVALID_AUDIENCE)
    else:
        claimed = claims.get("compute_id")
        if claimed is None:
            return _refuse(403, MISSING_COMPUTE_ID)
        if compute_id is None or claimed != compute_id:
            return _refuse(403, INVALID_COMPUTE_ID, f"a token of compute {claimed!r}")
    return Decision(True, claims=claims)


def verify(token: str, jwks: Jwks, *, require_exp: bool, now: float) -> tuple[dict | None, str]:
    """(claims, "") when a key of `jwks` verifies `token` and its claims are well-formed, else
    (None, why). The time claims are checked here, against `now`: `exp` when present (or
    required), with HEAD's leeway; `nbf`/`iat`/`aud`/`iss` are not (HEAD checks none of them)."""
    jwt = _jwt()
    if jwt is None:
        return None, "PyJWT is not installed"
    if not jwks.keys:
        return None, "the JWKS has no usable key (missing, unreadable or empty)"
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as e:
        return None, f"malformed token: {e}"
    kid = header.get("kid")
    candidates = [k for k in jwks.keys if not isinstance(kid, str) or k.kid is None or k.kid == kid]
    options = {"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False,
               "verify_iss": False, "verify_sub": False, "verify_jti": False, "require": []}
    claims, why = None, "no key of the JWKS matches the token's kid"
    for key in candidates:
        try:
            claims = jwt.decode(token, key.key, algorithms=[key.alg], options=options)
            break
        except jwt.InvalidTokenError as e:
            why = f"{type(e).__name__}: {e}"
    if claims is None:
        return None, why
    problem = claims_problem(claims, require_exp=require_exp, now=now)
    return (None, problem) if problem else (claims, "")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def claims_problem(claims: Any, *, require_exp: bool, now: float) -> str:
    """Why verified claims are still refused (401), or "": HEAD's ComputeClaims types
    (`compute_id`: string or null; `scope`: "compute_ctl:admin" or null; `aud`: list of strings
    or null) and the expiry."""
    if not isinstance(claims, dict):
        return "claims are not a JSON object"
    if claims.get("compute_id") is not None and not isinstance(claims["compute_id"], str):
        return "compute_id is not a string"
    if claims.get("scope") not in (None, ADMIN_SCOPE):
        return f"unknown scope {claims['scope']!r}"
    aud = claims.get("aud")
    if aud is not None and not (isinstance(aud, list) and all(isinstance(a, str) for a in aud)):
        return "aud is not a list of strings"
    if "exp" in claims and claims["exp"] is not None:
        if not _number(claims["exp"]):
            return "exp is not a number"
        if claims["exp"] < now - EXP_LEEWAY:
            return "token expired"
    elif require_exp:
        return "token has no exp (--jwt-require-exp)"
    return ""
