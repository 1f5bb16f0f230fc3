"""The JWKS hand-off: `<runtime_dir>/jwks.json`, written by compute-ctl (from `-c`'s
`compute_ctl_config.jwks`) or by the lifecycle driver (from the v2 pull answer), read by the API's
auth through the launch setting `jwks_path` (re-read when its mtime changes).

Written atomically (a 0600 temporary file in the same directory, fsync, rename over the old one)
by the compute's unprivileged user (compute-ctl writes it after dropping root): a reader sees
the old set or the new one, never half of one, and the file is never readable by anyone else.
"""

from __future__ import annotations

import json
import os
from typing import Any

JWKS_NAME = "jwks.json"


def jwks_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, JWKS_NAME)


def write_jwks(path: str, jwks: dict[str, Any]) -> None:
    data = json.dumps(jwks, separators=(",", ":")).encode()
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)  # a leftover of a killed writer with our pid
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
