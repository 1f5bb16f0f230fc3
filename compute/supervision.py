"""Talking to supervisord: the XML-RPC client over its unix control socket, rendering its
config, and shutting the tree down."""

from __future__ import annotations

import http.client
import os
import re
import shlex
import socket
import string
import sys
import sysconfig
import time
import xmlrpc.client

from supervisor.xmlrpc import SupervisorTransport

from .localauth import passfile_path

SOCKET_NAME = "supervisor.sock"
CONF_NAME = "supervisord.conf"


def socket_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, SOCKET_NAME)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def rpc(runtime_dir: str, timeout: float | None = None) -> xmlrpc.client.ServerProxy:
    """A proxy on supervisord's XML-RPC interface (`.supervisor.getProcessInfo(...)` etc.).
    With `timeout`, each call gives up after that many seconds: a wedged supervisord must not
    wedge an API request thread."""
    path = socket_path(runtime_dir)
    transport = SupervisorTransport(None, None, f"unix://{path}")
    if timeout is not None:
        transport._get_connection = lambda: _UnixConnection(path, timeout)  # noqa: SLF001
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


# -- rendering supervisord.conf -------------------------------------------------------------

TEMPLATE = "supervisord.conf.tmpl"
VM_INFORMANT_TEMPLATE = "vm-informant.section.tmpl"
POSTGRES_EXPORTER_TEMPLATE = "postgres-exporter.section.tmpl"
_SAFE_URL_VALUE = re.compile(r"^[A-Za-z0-9._~+/=:@?&%-]+\Z")


def template_dir() -> str:
    """The repo's supervisor/ folder in a checkout, or its installed copy under share/."""
    candidates = [
        os.environ.get("COMPUTE_TEMPLATE_DIR", ""),
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "supervisor"),
        os.path.join(sysconfig.get_path("data"), "share", "compute-supervisor"),
        os.path.join(sys.prefix, "share", "compute-supervisor"),
    ]
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, TEMPLATE)):
            return d
    raise FileNotFoundError(f"{TEMPLATE} not found (looked in: {', '.join(c for c in candidates if c)})")


def _conf_value(value: str) -> str:
    """A value safe on one supervisord config line: no line breaks, `%` escaped (supervisord
    expands %(name)s)."""
    if any(ch in value for ch in "\n\r\x00"):
        raise ValueError("a value with a line break or NUL cannot be written to supervisord.conf")
    return value.replace("%", "%%")


def _command_arg(value: str) -> str:
    return _conf_value(shlex.quote(value))


_ENV_VALUE = re.compile(r"^[A-Za-z0-9._~+/=: -]+\Z")  # a token, maybe after "Bearer "


def _environment_line(env: dict[str, str]) -> str:
    """`environment=K="v",...` for one program; tokens only (never echoed in an error)."""
    for name, value in env.items():
        if not _ENV_VALUE.match(value):
            raise ValueError(f"{'storage_auth_token' if name == 'NEON_AUTH_TOKEN' else name} has "
                             "characters that cannot be passed in the environment")
    return ("environment=" + ",".join(f'{k}="{_conf_value(v)}"' for k, v in env.items())) if env else ""


def render_supervisord_conf(*, runtime_dir: str, pgdata: str, pgbin: str, python: str,
                            auth_token: str | None, vm_informant: str | None,
                            informant_connstr: str, postgres_stop_seconds: int = 8,
                            postgres_exporter: str | None = None, postgres_exporter_port: int = 9187,
                            exporter_dsn: str = "",
                            program_env: dict[str, dict[str, str]] | None = None) -> str:
    """`program_env`: extra environment per program (`lifecycle`, `postgres`): the secrets
    only they get (compute/environ.py). `auth_token` alone still means postgres' storage token."""
    tdir = template_dir()
    logs = os.path.join(runtime_dir, "logs")
    program_env = dict(program_env or {})
    if auth_token and "NEON_AUTH_TOKEN" not in program_env.get("postgres", {}):
        program_env["postgres"] = {**program_env.get("postgres", {}), "NEON_AUTH_TOKEN": auth_token}
    values = {
        "runtime_dir": _conf_value(runtime_dir),
        "conf": _conf_value(os.path.join(runtime_dir, CONF_NAME)),
        "socket": _conf_value(socket_path(runtime_dir)),
        "logs": _conf_value(logs),
        "pgdata": _command_arg(pgdata),
        "pgbin": _command_arg(pgbin),
        "python": _command_arg(python),
        "postgres_stop_seconds": str(int(postgres_stop_seconds)),
        "postgres_environment": _environment_line(program_env.get("postgres", {})),
        "lifecycle_environment": _environment_line(program_env.get("lifecycle", {})),
        "passfile": _conf_value(passfile_path(runtime_dir)),
        "vm_informant_section": "",
        "postgres_exporter_section": "",
    }
    if vm_informant:
        with open(os.path.join(tdir, VM_INFORMANT_TEMPLATE)) as f:
            values["vm_informant_section"] = string.Template(f.read()).substitute(
                values, vm_informant=_command_arg(vm_informant),
                informant_connstr=_command_arg(informant_connstr))
    if postgres_exporter:
        with open(os.path.join(tdir, POSTGRES_EXPORTER_TEMPLATE)) as f:
            values["postgres_exporter_section"] = string.Template(f.read()).substitute(
                values, postgres_exporter=_command_arg(postgres_exporter),
                postgres_exporter_port=str(int(postgres_exporter_port)),
                exporter_dsn=_env_value(exporter_dsn))
    with open(os.path.join(tdir, TEMPLATE)) as f:
        return string.Template(f.read()).substitute(values)


def _env_value(value: str) -> str:
    """A value for a double-quoted `environment=` entry. supervisord's parser (non-posix shlex)
    ends the value at the next `"` and strips quote characters from both ends, so only a
    value made of URL-safe characters goes through unchanged."""
    if not _SAFE_URL_VALUE.match(value):
        raise ValueError("a value with characters other than URL-safe ones cannot be passed in "
                         "supervisord's environment")
    return _conf_value(value)


# -- shutting the tree down -----------------------------------------------------------------

def shutdown_tree(runtime_dir: str, timeout: float = 20.0) -> None:
    """Ask supervisord to stop everything, and keep it moving.

    supervisord stops one priority group per turn of its main loop, and a turn without I/O
    waits 1 s in poll(); with seven programs that is seconds of idling. Every request on the
    control socket ends the wait early, so we keep asking for its state until it is gone."""
    deadline = time.monotonic() + timeout
    try:
        rpc(runtime_dir).supervisor.shutdown()
    except (OSError, xmlrpc.client.Fault):
        pass  # already shutting down
    while time.monotonic() < deadline:
        try:
            rpc(runtime_dir).supervisor.getState()
        except xmlrpc.client.Fault:
            pass  # SHUTDOWN_STATE: still there
        except OSError:
            return  # socket gone: supervisord has exited
        time.sleep(0.02)
