"""Optional JWT bearer auth for every route that changes state or returns database contents.

When the settings' `jwks_path` names a JWKS file, /configure, /promote, /terminate, /check_writability,
/insights, /dbs_and_roles and /database_schema (resources with `auth_required = True`) need
`Authorization: Bearer <jwt>` signed by one of its keys: Ed25519 (`"kty": "OKP"`, alg EdDSA) or
RSA (alg RS256). The algorithm is taken from the key, never from the token, so an RSA public key
can not be abused as an HMAC secret. A token must carry `exp` (as Neon's compute_ctl requires):
one without could never be revoked. /status, /metrics, /metrics.json, /info, /healthz, /readyz
and /openapi.yaml stay open.

401: missing, malformed, badly signed, expired or exp-less token. 403: a valid token whose
`compute_id` claim is not this compute's `compute_id` setting.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import falcon


def _jwt():
    """PyJWT, imported when a JWKS is first used, never before: with cryptography (a large Rust
    extension: docs/performance.md, "Figures behind the code") it is memory a compute without
    --jwks never needs. With --jwks the warm image imports it before any program is forked
    (compute/tree/warmfork.py), so this costs nothing then. None when not installed (PyJWT[crypto]
    is a dependency; without it only auth is unavailable)."""
    try:
        import jwt
    except ImportError:
        return None
    return jwt


log = logging.getLogger("compute.api.auth")

_ALG_FOR_KTY = {"OKP": "EdDSA", "RSA": "RS256"}


@dataclass(frozen=True)
class _Key:
    kid: str | None
    alg: str
    key: Any


def load_jwks(path: str) -> list[_Key]:
    jwt = _jwt()
    with open(path, "rb") as f:
        doc = json.load(f)
    keys: list[_Key] = []
    for raw in doc.get("keys", []) if isinstance(doc, dict) else []:
        alg = _ALG_FOR_KTY.get(raw.get("kty"))
        if alg is None or raw.get("alg") not in (None, alg):
            log.warning("ignoring JWKS key %r: unsupported kty/alg %r/%r", raw.get("kid"), raw.get("kty"), raw.get("alg"))
            continue
        if raw.get("kty") == "OKP" and raw.get("crv") != "Ed25519":
            log.warning("ignoring JWKS key %r: unsupported curve %r", raw.get("kid"), raw.get("crv"))
            continue
        if raw.get("use") not in (None, "sig"):
            continue
        try:
            keys.append(_Key(raw.get("kid"), alg, jwt.PyJWK.from_dict(raw, algorithm=alg).key))
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
            log.warning("ignoring JWKS key %r: %s", raw.get("kid"), e)
    return keys


class JwtAuth:
    """Falcon middleware; a no-op when no JWKS is configured."""

    def __init__(self, jwks_path: str | None = None, compute_id: str | None = None, *, settings=None):
        """Either fixed values, or `settings`: a callable returning the compute's Settings (or
        None), read at request time (so a late record can never leave auth silently off)."""
        self._jwks_path = jwks_path
        self._compute_id = compute_id
        self._settings = settings
        self._keys: list[_Key] = []
        self._mtime: float | None = None
        self._lock = threading.Lock()

    @property
    def jwks_path(self) -> str | None:
        found = self._settings() if self._settings else None
        return found.jwks_path if found else self._jwks_path

    @property
    def compute_id(self) -> str | None:
        found = self._settings() if self._settings else None
        return found.compute_id if found else self._compute_id

    @property
    def enabled(self) -> bool:
        return bool(self.jwks_path)

    def _current_keys(self) -> list[_Key]:
        """The JWKS, reloaded when the file changes (key rotation without a restart)."""
        try:
            mtime = os.stat(self.jwks_path).st_mtime
        except OSError as e:
            log.error("cannot read JWKS %s: %s", self.jwks_path, e)
            return []
        if mtime != self._mtime:
            with self._lock:
                if mtime != self._mtime:
                    try:
                        self._keys = load_jwks(self.jwks_path)
                    except (OSError, ValueError) as e:
                        log.error("cannot load JWKS %s: %s", self.jwks_path, e)
                        self._keys = []
                    self._mtime = mtime
        return self._keys

    def verify(self, authorization: str | None) -> dict[str, Any]:
        """The token's claims, or raise falcon 401/403."""
        if not authorization:
            raise _unauthorized("missing bearer token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("expected 'Authorization: Bearer <token>'")
        jwt = _jwt()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as e:
            raise _unauthorized(f"malformed token: {e}") from None
        keys = self._current_keys()
        kid = header.get("kid")
        candidates = [k for k in keys if kid is None or k.kid is None or k.kid == kid]
        if not candidates:
            raise _unauthorized("no key of the JWKS matches the token")
        last_error: Exception | None = None
        for key in candidates:
            try:
                claims = jwt.decode(token, key.key, algorithms=[key.alg],
                                    options={"verify_aud": False, "require": ["exp"]})
                break
            except jwt.ExpiredSignatureError as e:
                raise _unauthorized(f"token expired: {e}") from None
            except jwt.MissingRequiredClaimError:
                raise _unauthorized("token has no 'exp' claim: tokens must expire") from None
            except jwt.InvalidTokenError as e:
                last_error = e
        else:
            raise _unauthorized(f"invalid token: {last_error}")
        if self.compute_id is not None and claims.get("compute_id") != self.compute_id:
            raise falcon.HTTPForbidden(description="token is not valid for this compute")
        return claims

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict) -> None:
        if resource is None or not getattr(resource, "auth_required", False):
            return
        if not hasattr(resource, f"on_{req.method.lower()}"):
            return  # let falcon answer 405 rather than 401
        if not self.enabled:
            return
        if _jwt() is None:
            raise falcon.HTTPInternalServerError(description="a JWKS is configured but PyJWT is not installed")
        req.context.claims = self.verify(req.get_header("Authorization"))


def _unauthorized(message: str) -> falcon.HTTPError:
    return falcon.HTTPUnauthorized(description=message, challenges=["Bearer"])
