"""What every resource needs: the state store, the compute's settings, postgres connections."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg
from compute.api.bodies import STATUS_KEYS, state_health, status_body
from compute.postgres.sessions import session_params, superuser_of
from compute.model.launch import LaunchSettings, require as require_settings
from compute.shared.state import StateStore, runtime_dir_from_env, state_path

HTTP_APPLICATION_NAME = "compute_ctl:http"
# /insights and /check_writability must not hold a request thread forever on a stuck postgres.
STATEMENT_TIMEOUT_MS = 10_000
LOCK_TIMEOUT_MS = 5_000

def debug_status_name(status: str | None) -> str:
    """How the original printed a status in its text messages (Rust `{:?}`): ConfigurationPending."""
    return "".join(part.capitalize() for part in str(status).split("_"))


def head_status_name(status: str | None) -> str:
    """How HEAD prints a status in its errors (ComputeStatus's Display): configuration-pending."""
    return str(status).replace("_", "-")


class ApiContext:
    """Per-process (per gunicorn worker) handle; safe to share between the worker's threads."""

    def __init__(self, runtime_dir: str):
        self.runtime_dir = runtime_dir
        self.state_path = state_path(runtime_dir)
        self.store = StateStore(self.state_path)
        self._settings: LaunchSettings | None = None
        self._conn_params: dict[str, Any] | None = None
        self._lock = threading.Lock()

    @property
    def settings(self) -> LaunchSettings:
        """The bootstrap's settings: written once before any program starts (compute/model/launch.py
        `require`), so read once."""
        found = self._settings
        if found is None:
            found = self._settings = require_settings(self.store)
        return found

    @property
    def connstr(self) -> str:
        return self.settings.connstr

    @property
    def superuser(self) -> str:
        return superuser_of(self.settings.connstr) or self.settings.superuser

    def status_body(self) -> dict[str, Any]:
        """The /status answer: one indexed read of the state file."""
        values = self.store.get_many(STATUS_KEYS)
        now = time.time()
        health = state_health(values, now=now, free_bytes=self.runtime_free_bytes(),
                              monitor_interval=self.settings.monitor_interval)
        return status_body(values, health=health, now=now)

    def runtime_free_bytes(self) -> int | None:
        """Free bytes in the runtime dir (where the state file is); None when unknown."""
        try:
            st = os.statvfs(self.runtime_dir)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def pg_connect(self, timeout: float = 3) -> psycopg.Connection:
        """A fresh superuser connection (autocommit, statement timeout). The superuser's sessions
        never count as user activity, so the API's own queries cannot keep an idle compute awake."""
        params = self._conn_params
        if params is None:
            # search_path and role pinned (compute/postgres/sessions.py), bounded waits
            params = session_params(self.connstr, lock_timeout_ms=LOCK_TIMEOUT_MS,
                                    statement_timeout_ms=STATEMENT_TIMEOUT_MS)
            self._conn_params = params
        return psycopg.connect(**params, autocommit=True, connect_timeout=max(1, round(timeout)),
                               application_name=HTTP_APPLICATION_NAME)


__all__ = ["ApiContext", "debug_status_name", "head_status_name", "runtime_dir_from_env"]
