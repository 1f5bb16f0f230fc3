"""The warm image in two stages (compute/warmfork.py): the driver is forked from the first
(its own modules only), everything else waits for the whole image."""

import subprocess
import sys

import pytest

SCRIPT = """
import sys
from compute import warmfork
api_modules = ("falcon", "gunicorn.arbiter", "compute.api.app")
warmfork.warm_early()
assert "compute.lifecycle" in sys.modules and "psycopg" in sys.modules
assert not any(m in sys.modules for m in api_modules), "the early image is the driver's only"
warmfork.warm_for("lifecycle")
assert not any(m in sys.modules for m in api_modules), "the driver needs no more"
warmfork.warm_for("api")
assert all(m in sys.modules for m in api_modules) and "compute.monitor" in sys.modules
print("ok")
"""


@pytest.mark.parametrize("first", ["api", "monitor", "postgres"])
def test_any_other_program_gets_the_whole_image(first):
    script = SCRIPT.replace('warmfork.warm_for("api")', f'warmfork.warm_for("{first}")')
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
