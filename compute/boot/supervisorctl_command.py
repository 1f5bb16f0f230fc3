"""`compute-ctl supervisorctl [--runtime-dir DIR] [ARGS...]`: supervisor's own supervisorctl,
with the running compute's supervisord.conf, found in its runtime dir (`--runtime-dir`, default
as compute-ctl's), so an operator needs neither the venv's path nor the conf's.

Everything after `--runtime-dir DIR` is supervisorctl's (`status`, `restart monitor`, `tail -f
api`, none: its interactive shell); its exit status is ours (exec)."""

from __future__ import annotations

import os
import sys

from compute.boot.paths import default_runtime_dir
from compute.tree.supervisord_conf import CONF_NAME
USAGE = ("usage: compute-ctl supervisorctl [--runtime-dir DIR] [SUPERVISORCTL ARGS...]\n"
         "  supervisorctl -c DIR/supervisord.conf ARGS; DIR: compute-ctl's --runtime-dir (default as\n"
         "  compute-ctl's: /run/compute-ctl as root, else /tmp/compute-ctl-$USER)")


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--runtime-dir's value or None, supervisorctl's arguments): only a leading --runtime-dir is
    ours. Raises ValueError for a --runtime-dir without a value."""
    if argv and argv[0] == "--runtime-dir":
        if len(argv) < 2 or not argv[1]:
            raise ValueError("--runtime-dir needs a value")
        return argv[1], argv[2:]
    if argv and argv[0].startswith("--runtime-dir="):
        value = argv[0].split("=", 1)[1]
        if not value:
            raise ValueError("--runtime-dir needs a value")
        return value, argv[1:]
    return None, list(argv)


def supervisorctl_argv(python: str, runtime_dir: str, args: list[str]) -> list[str]:
    # -P: nothing from the working directory shadows the installed supervisor
    return [python, "-P", "-m", "supervisor.supervisorctl", "-c", os.path.join(runtime_dir, CONF_NAME), *args]


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    try:
        runtime_dir, args = split_args(argv)
    except ValueError as e:
        print(f"compute-ctl supervisorctl: {e}\n{USAGE}", file=sys.stderr)
        return 2
    runtime_dir = runtime_dir or default_runtime_dir()
    conf = os.path.join(runtime_dir, CONF_NAME)
    if not os.path.exists(conf):
        print(f"compute-ctl supervisorctl: no compute's runtime dir at {runtime_dir} ({conf} does not exist, "
              "or is not yours to see). Give the --runtime-dir compute-ctl was started with (its first log line "
              "says it: `starting compute: ... runtime dir DIR`), as root or the compute's user.", file=sys.stderr)
        return 2
    os.execv(sys.executable, supervisorctl_argv(sys.executable, runtime_dir, args))
    return 1  # not reached
