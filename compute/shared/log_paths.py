"""Where the tree's log files are: `RUNTIME_DIR/logs/`, one file per program (supervisord
writes them: supervisor/*.tmpl). The one definition of postgres' log path, which supervisord's
config is rendered with (compute/tree/supervisord_conf.py) and the driver reads postgres'
sentences from (compute/postgres/pglog.py)."""

from __future__ import annotations

import os

LOGS_NAME = "logs"
POSTGRES_LOG_NAME = "postgres.log"


def logs_dir(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, LOGS_NAME)


def postgres_log_path(runtime_dir: str) -> str:
    """postgres' stderr, as supervisord writes it (redirect_stderr into its stdout log)."""
    return os.path.join(logs_dir(runtime_dir), POSTGRES_LOG_NAME)
