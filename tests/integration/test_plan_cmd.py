"""`compute-ctl plan` on its own (compute/boot/plan_command.py): where it finds the superuser's password,
and that it stands on low-level modules (no import circle with compute/boot/cli.py).

This file: the import check in a fresh interpreter; the rest: tests/unit/test_plan_cmd.py."""

from __future__ import annotations

import subprocess
import sys


def test_plan_cmd_does_not_import_the_cli():
    """The circle cli <-> plan_command is broken: cli imports plan_command (lazily, for `plan`), never back."""
    code = "import sys, compute.boot.plan_command; print('compute.boot.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
