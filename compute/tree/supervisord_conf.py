"""Rendering supervisord.conf (and its optional program sections) from the templates."""

from __future__ import annotations

import os
import re
import shlex
import string
import sys


from compute.postgres.localauth import passfile_path
from compute.base.rlimits import MIN_FDS, MIN_PROCS
from compute.shared.log_paths import logs_dir, postgres_log_path
from compute.shared.supervisor_rpc import socket_path
CONF_NAME = "supervisord.conf"


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
        os.path.join(sys.prefix, "share", "compute-supervisor"),  # a venv's data path: no sysconfig
    ]
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, TEMPLATE)):
            return d
    import sysconfig  # ~2-5 ms at compute-ctl's start, before the early fork: only when needed
    candidates.insert(2, os.path.join(sysconfig.get_path("data"), "share", "compute-supervisor"))
    if os.path.isfile(os.path.join(candidates[2], TEMPLATE)):
        return candidates[2]
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


# The most the log files may take in RUNTIME_DIR/logs (supervisord's own, postgres', and one
# per program, each with one rotated copy: supervisor/*.tmpl), beside the state file: a log
# flood can never fill the runtime dir (a tmpfs, as root) until the state file cannot be
# written. Every line also goes to compute-ctl's stdout (the container log): these files are
# for `supervisorctl tail` only.
LOG_BUDGET_BYTES = 30 * 1024 * 1024
_SIZE = {"KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}


def log_bytes(conf: str) -> int:
    """The most a rendered conf's log files can take: maxbytes x (1 + backups), summed (pure)."""
    import configparser
    parser = configparser.RawConfigParser()
    parser.read_string(conf)
    total = 0
    for section in parser.sections():
        for prefix in ("logfile", "stdout_logfile", "stderr_logfile"):
            path = parser.get(section, prefix, fallback=None)
            if not path or path in ("NONE", "/dev/null") or path.startswith("/dev/fd/"):
                continue
            size = parser.get(section, prefix + "_maxbytes", fallback="50MB").strip().upper()
            number, unit = (size[:-2], size[-2:]) if size[-2:] in _SIZE else (size, "")
            backups = int(parser.get(section, prefix + "_backups", fallback="10"))
            total += int(number) * _SIZE.get(unit, 1) * (1 + backups)
    return total


def render_supervisord_conf(*, runtime_dir: str, pgdata: str, pgbin: str, python: str,
                            auth_token: str | None, vm_informant: str | None,
                            informant_connstr: str, postgres_stop_seconds: int = 8,
                            postgres_exporter: str | None = None, postgres_exporter_port: int = 9187,
                            exporter_dsn: str = "",
                            program_env: dict[str, dict[str, str]] | None = None) -> str:
    """`program_env`: extra environment per program (`lifecycle`, `postgres`): the secrets
    only they get (compute/model/environ.py). `auth_token` alone still means postgres' storage token."""
    tdir = template_dir()
    logs = logs_dir(runtime_dir)
    program_env = dict(program_env or {})
    if auth_token and "NEON_AUTH_TOKEN" not in program_env.get("postgres", {}):
        program_env["postgres"] = {**program_env.get("postgres", {}), "NEON_AUTH_TOKEN": auth_token}
    values = {
        "runtime_dir": _conf_value(runtime_dir),
        "conf": _conf_value(os.path.join(runtime_dir, CONF_NAME)),
        "socket": _conf_value(socket_path(runtime_dir)),
        "logs": _conf_value(logs),
        "postgres_log": _conf_value(postgres_log_path(runtime_dir)),  # where the driver reads it
        "pgdata": _command_arg(pgdata),
        "pgbin": _command_arg(pgbin),
        "python": _command_arg(python),
        "postgres_stop_seconds": str(int(postgres_stop_seconds)),
        "postgres_environment": _environment_line(program_env.get("postgres", {})),
        "lifecycle_environment": _environment_line(program_env.get("lifecycle", {})),
        "passfile": _conf_value(passfile_path(runtime_dir)),
        "vm_informant_section": "",
        "postgres_exporter_section": "",
        "minfds": str(MIN_FDS),
        "minprocs": str(MIN_PROCS),
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
