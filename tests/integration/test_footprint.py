"""What the warm image holds (compute/tree/warmfork.py): PyJWT + cryptography (~8 MiB of private
pages in compute-ctl alone) only for a compute started with --jwks, and auth still verifying
tokens when it is.

This file: a fresh interpreter; the rest: tests/unit/ and tests/e2e/test_footprint.py."""

from __future__ import annotations

import subprocess
import sys


def test_the_api_imports_no_pyjwt_until_a_jwks_is_used():
    code = ("import sys, compute.api.app, compute.lifecycle.driver, compute.programs.monitor, compute.tree.supervisord\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jwt', 'cryptography')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
