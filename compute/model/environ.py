"""Which secret reaches which program (pure). Everything else in compute-ctl's environment
reaches every program, as before.

- The control-plane token (NEON_CONSOLE_JWT, or NEON_CONTROL_PLANE_TOKEN in later versions) is
  needed only to fetch the spec: the lifecycle driver alone gets it, and not its children.
- The storage token (NEON_AUTH_TOKEN, or the spec's storage_auth_token) is needed by the driver
  (basebackup; it hands it to --sync-safekeepers) and by postgres (the neon extension
  authenticates to the pageserver and safekeepers with it, as the original passes it).
- supervisord itself, the API, the monitor, exitwatch, logrelay and vm-informant get neither.
"""

from __future__ import annotations

from typing import Mapping

CONTROL_PLANE_TOKEN_VARS = ("NEON_CONSOLE_JWT", "NEON_CONTROL_PLANE_TOKEN")
STORAGE_TOKEN_VAR = "NEON_AUTH_TOKEN"
SECRET_VARS = (*CONTROL_PLANE_TOKEN_VARS, STORAGE_TOKEN_VAR)


def without(environ: Mapping[str, str], names) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in names}


def supervisord_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What supervisord (and so, by inheritance, every program) starts with."""
    return without(environ, SECRET_VARS)


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """For a process the driver runs (initdb, --sync-safekeepers): no control-plane token."""
    return without(environ, CONTROL_PLANE_TOKEN_VARS)


def program_secrets(environ: Mapping[str, str], spec_storage_token: str | None) -> dict[str, dict[str, str]]:
    """Per supervised program, the secret variables it gets on top of supervisord's environment."""
    lifecycle = {k: environ[k] for k in SECRET_VARS if environ.get(k)}
    postgres = {}
    storage = spec_storage_token or environ.get(STORAGE_TOKEN_VAR)
    if storage:
        postgres[STORAGE_TOKEN_VAR] = storage
    return {"lifecycle": lifecycle, "postgres": postgres}
