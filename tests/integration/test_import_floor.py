"""The import floor `python -m bench` prints under exec -> first storage request (issue 22):
its stdlib level must be modules compute-ctl's path to that request really imports, or the
floor would be an excuse, not a measurement (bench/startup.py FLOOR_LEVELS)."""

from __future__ import annotations

import subprocess
import sys

from bench.startup import FLOOR_OURS, FLOOR_STDLIB


def test_the_floors_stdlib_is_what_our_path_to_the_first_request_imports() -> None:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\nimport {', '.join(FLOOR_OURS)}\nprint(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd="/")
    loaded = set(out.stdout.split())
    assert set(FLOOR_STDLIB) <= loaded, set(FLOOR_STDLIB) - loaded
