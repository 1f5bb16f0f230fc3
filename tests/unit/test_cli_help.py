"""`compute-ctl --help` names every environment variable compute-ctl and its programs read from
the operator's environment (the ones compute-ctl sets for its programs aside)."""

from __future__ import annotations

import os
import re

from compute.boot.cli import build_parser
from tests.support.api_helpers import REPO

# Set by compute-ctl (or supervisord) for the programs: never the operator's to give.
SET_FOR_THE_PROGRAMS = {"COMPUTE_RUNTIME_DIR", "COMPUTE_API_FD", "COMPUTE_API_INTERNAL_FD", "COMPUTE_SUPERVISORD_PID", "COMPUTE_CTL_PID", "COMPUTE_STATE_FILE_ID",
                        "PGPASSFILE", "HOME", "LOGNAME"}
# Read by libpq (named in the help as "libpq's own variables"), or only to pass on untouched.
LIBPQ = re.compile(r"^PG[A-Z]+\Z")


def names_read_by_the_code() -> set[str]:
    found = set()
    pattern = re.compile(r"""(?:environ(?:\.get)?\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']"""
                         r"""|^[A-Z_]*ENV(?:_NAMES)? = .*""", re.M)
    constant = re.compile(r"""["']([A-Z][A-Z0-9_]{2,})["']""")
    for root, _dirs, files in os.walk(os.path.join(REPO, "compute")):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(root, name)).read()
                for m in pattern.finditer(text):
                    found |= {m.group(1)} if m.group(1) else set(constant.findall(m.group(0)))
    return found


def test_help_names_every_environment_variable_read():
    text = build_parser().format_help()
    listed = text.split("environment variables:\n", 1)[1]
    named = {n for line in listed.splitlines() if line.startswith("  ") and not line.startswith("   ")
             for n in re.findall(r"[A-Z][A-Z0-9_]{2,}", line)}
    read = names_read_by_the_code()
    assert {"NEON_CONSOLE_JWT", "NEON_CONTROL_PLANE_TOKEN", "NEON_AUTH_TOKEN", "COMPUTE_API_WORKERS",
            "COMPUTE_TRACE"} <= read  # the scan finds what it should
    missing = {n for n in read - named - SET_FOR_THE_PROGRAMS if not LIBPQ.match(n)}
    assert missing == set(), f"--help does not name {sorted(missing)}"
