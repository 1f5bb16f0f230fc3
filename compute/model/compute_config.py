"""HEAD's `ComputeConfig` (pure): the `-c/--config` file and the v2 pull answer's shape, and
`compute_ctl_config` wherever it comes from (the config file, the pull answer, a /configure body).

    config file:  {"spec": {...} | null, "compute_ctl_config": {"jwks": {"keys": [...]}, "tls": {...} | null}}
    pull answer:  the same, plus "status": "empty" | "attached"

As Neon's `libs/compute_api/src/responses.rs`: `spec` may be missing or null (no spec: the compute
starts `empty` and waits for /configure), `compute_ctl_config` and its `jwks` are required, `tls`
is optional, unknown keys are ignored. The spec is only checked to be an object here: it is
validated by `compute.model.spec.parse_spec` where it comes in.

The JWKS is kept as the decoded document (the API's auth reads it from the file compute-ctl or
the driver writes: compute/shared/jwks_file.py); here it is only checked to be a JWK set of a
sane size, so a hostile file cannot make us write megabytes of keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_JWKS_KEYS = 64
MAX_JWK_FIELD = 16 * 1024  # a 8192-bit RSA modulus is ~1.4 KB in base64url
MAX_JWK_FIELDS = 32        # fields of one JWK, and items of one list field (x5c, key_ops)


class ConfigError(ValueError):
    """An invalid config document; `str()` is one line naming the field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"invalid config: {field}: {message}")


def check_jwks_document(doc: Any, path: str = "jwks") -> list[dict]:
    """The keys of a JWK set document (`{"keys": [JWK, ...]}`, each key an object with a string
    `kty`, as HEAD's JWK type needs), its shape checked; ConfigError otherwise. No crypto:
    which keys are usable is compute/api/access.py's business."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError(path, "expected a JWK set: {\"keys\": [...]}")
    for i, raw in enumerate(doc["keys"]):
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}.keys[{i}]", "expected an object (a JWK)")
        if not isinstance(raw.get("kty"), str):
            raise ConfigError(f"{path}.keys[{i}]", "expected a string \"kty\"")
    return doc["keys"]


@dataclass(frozen=True)
class ComputeCtlConfig:
    jwks: dict[str, Any]                  # {"keys": [JWK, ...]}
    tls: dict[str, str] | None = None     # {"key_path", "cert_path"}: accepted, not used


@dataclass(frozen=True)
class ComputeConfig:
    spec: dict[str, Any] | None           # decoded, not validated yet (model/spec.parse_spec)
    compute_ctl_config: ComputeCtlConfig | None  # None: a 2023 pull answer, which has none


def parse_compute_ctl_config(raw: Any, path: str = "compute_ctl_config") -> ComputeCtlConfig:
    if not isinstance(raw, dict):
        raise ConfigError(path, "expected an object with a \"jwks\" key")
    if "jwks" not in raw:
        raise ConfigError(f"{path}.jwks", "is required (a JWK set: {\"keys\": [...]})")
    jwks = raw["jwks"]
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ConfigError(f"{path}.jwks", "expected a JWK set: {\"keys\": [...]}")
    keys = jwks["keys"]
    if len(keys) > MAX_JWKS_KEYS:
        raise ConfigError(f"{path}.jwks.keys", f"more than {MAX_JWKS_KEYS} keys")
    for i, key in enumerate(keys):
        if not isinstance(key, dict):
            raise ConfigError(f"{path}.jwks.keys[{i}]", "expected an object (a JWK)")
        if len(key) > MAX_JWK_FIELDS:
            raise ConfigError(f"{path}.jwks.keys[{i}]", f"more than {MAX_JWK_FIELDS} fields")
        for name, value in key.items():
            if len(name) > 64:
                raise ConfigError(f"{path}.jwks.keys[{i}]", "has a field name longer than 64 characters")
            # A JWK's fields are strings, numbers, booleans or lists of strings (key_ops, x5c):
            # nothing nested, so nothing deep or large reaches the file we write.
            items = value if isinstance(value, list) else [value]
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}.jwks.keys[{i}].{name}", "a list must hold strings only")
            if isinstance(value, list) and len(value) > MAX_JWK_FIELDS:
                raise ConfigError(f"{path}.jwks.keys[{i}].{name}", f"more than {MAX_JWK_FIELDS} items")
            for v in items:
                if isinstance(v, dict):
                    raise ConfigError(f"{path}.jwks.keys[{i}].{name}", "nested objects are not JWK fields")
                if isinstance(v, str) and len(v) > MAX_JWK_FIELD:
                    raise ConfigError(f"{path}.jwks.keys[{i}].{name}", f"longer than {MAX_JWK_FIELD} characters")
    check_jwks_document(jwks, f"{path}.jwks")  # bounded first (above), then each key's kty
    tls = raw.get("tls")
    if tls is not None:
        if not isinstance(tls, dict) or not all(isinstance(tls.get(k), str) for k in ("key_path", "cert_path")):
            raise ConfigError(f"{path}.tls", "expected null or {\"key_path\": \"...\", \"cert_path\": \"...\"}")
        tls = {"key_path": tls["key_path"], "cert_path": tls["cert_path"]}
    return ComputeCtlConfig(jwks={"keys": keys}, tls=tls)


def parse_compute_config(raw: Any) -> ComputeConfig:
    """The `-c` file's document (decoded JSON); ConfigError when it is not HEAD's shape."""
    if not isinstance(raw, dict):
        raise ConfigError("<document>", "expected an object {\"spec\": ..., \"compute_ctl_config\": ...}")
    spec = raw.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise ConfigError("spec", "expected an object or null")
    if "compute_ctl_config" not in raw:
        raise ConfigError("compute_ctl_config", "is required ({\"jwks\": {\"keys\": [...]}})")
    return ComputeConfig(spec=spec, compute_ctl_config=parse_compute_ctl_config(raw["compute_ctl_config"]))


def parse_pull_answer(raw: Any) -> tuple[ComputeConfig, str]:
    """The v2 control plane's answer (`ControlPlaneConfigResponse`): (config, status). As HEAD,
    `empty` means no spec yet; `attached` needs one (AttachedWithoutSpec, which is not retried);
    any other shape is a ConfigError (HEAD retries an answer that does not deserialise)."""
    if not isinstance(raw, dict):
        raise ConfigError("<answer>", "expected an object {\"status\", \"spec\", \"compute_ctl_config\"}")
    status = raw.get("status")
    if status not in ("empty", "attached"):
        raise ConfigError("status", f"expected \"empty\" or \"attached\", got {str(status)[:40]!r}")
    config = parse_compute_config(raw)
    if status == "empty":
        return ComputeConfig(spec=None, compute_ctl_config=config.compute_ctl_config), status
    if config.spec is None:
        raise AttachedWithoutSpec("compute is attached, but spec is empty")
    return config, status


class AttachedWithoutSpec(ValueError):
    """HEAD's `compute is attached, but spec is empty`: a final answer, not retried."""
