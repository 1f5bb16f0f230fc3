"""The shape of `compute_ctl_config` (HEAD's libs/compute_api/src/responses.rs ComputeCtlConfig):
`{"jwks": {"keys": [JWK, ...]}, "tls": {"key_path", "cert_path"} | null}`, wherever it comes
from (the config file, the control plane's answer, a /configure body). Pure checks, no crypto:
which keys are usable is compute/api/auth.py's business."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    pass


def check_jwks_document(doc: Any) -> list[dict]:
    """The keys of a JWKS document, its shape checked (ConfigError otherwise)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError('jwks must be a JSON object {"keys": [...]}')
    for i, raw in enumerate(doc["keys"]):
        if not isinstance(raw, dict) or not isinstance(raw.get("kty"), str):
            raise ConfigError(f'jwks key {i}: must be a JSON object with a string "kty"')
    return doc["keys"]


def check_compute_ctl_config(raw: Any) -> dict:
    """A compute_ctl_config object, checked as HEAD deserialises it: `jwks` required, `tls`
    absent, null or {key_path, cert_path} strings; other keys ignored. ConfigError otherwise."""
    if not isinstance(raw, dict):
        raise ConfigError("compute_ctl_config must be a JSON object")
    if "jwks" not in raw:
        raise ConfigError("compute_ctl_config: missing field `jwks`")
    try:
        check_jwks_document(raw["jwks"])
    except ConfigError as e:
        raise ConfigError(f"compute_ctl_config: {e}") from None
    tls = raw.get("tls")
    if tls is not None and not (isinstance(tls, dict) and isinstance(tls.get("key_path"), str)
                                and isinstance(tls.get("cert_path"), str)):
        raise ConfigError('compute_ctl_config: tls must be null or {"key_path": "...", "cert_path": "..."}')
    return raw
