"""The embedded default: `initdb` for a compute whose spec names no pageserver.
"""

from __future__ import annotations

import logging
import os
import subprocess


from compute.model.environ import child_environment
from compute.storage.attempts import StorageError, _truncate

log = logging.getLogger("compute.storage")


# ---------------------------------------------------------------- embedded default

def initdb_default(pgbin_dir: str, pgdata: str, superuser: str, pwfile: str | None = None) -> None:
    """The embedded default when the spec names no pageserver: a fresh local cluster.
    `pwfile`: a file whose first line becomes the superuser's password (a path on argv, never
    the password)."""
    argv = [os.path.join(pgbin_dir, "initdb"), "-D", pgdata, "-U", superuser, "--auth=trust",
            "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"]
    if pwfile:
        argv.append(f"--pwfile={pwfile}")
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             errors="replace", env=child_environment(os.environ))
    except OSError as e:
        raise StorageError(f"cannot run initdb: {e}") from None
    for line in res.stderr.splitlines():
        log.info("initdb: %s", line)
    if res.returncode != 0:
        raise StorageError(f"initdb failed with exit code {res.returncode}: "
                           f"{_truncate((res.stdout + res.stderr).strip())}")
