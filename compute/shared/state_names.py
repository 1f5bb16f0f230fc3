"""Where the state file is and the variables that name it (compute/shared/state.py re-exports
all of it): without sqlite3, for compute-ctl's path to the early driver's fork, which creates
the file only after that fork, and for the early driver's path to its storage request, which
does not read it (issue 22)."""

from __future__ import annotations

import os

STATE_FILE = "state.db"
# The state file compute-ctl created, as `st_dev:st_ino`: compute-ctl puts it in the environment
# supervisord and every program inherit. A store opens only that file (never creates one), and
# a file that is gone, replaced or truncated is StateFileLost, never silently a new database.
STATE_ID_ENV = "COMPUTE_STATE_FILE_ID"
# compute-ctl hands the runtime dir (where the state file is) to supervisord and every program
# in this one variable; everything else a program needs is in the state file (`launch`).
RUNTIME_DIR_ENV = "COMPUTE_RUNTIME_DIR"


def state_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, STATE_FILE)


def runtime_dir_from_env(environ=None, *, required: bool = True) -> str | None:
    """The runtime dir compute-ctl gave this program; the one place the variable is read.
    `required`: a RuntimeError naming it when it is not set (else None)."""
    value = (os.environ if environ is None else environ).get(RUNTIME_DIR_ENV) or None
    if value is None and required:
        raise RuntimeError(f"{RUNTIME_DIR_ENV} is not set")
    return value
