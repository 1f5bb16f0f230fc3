"""The api's gunicorn logger (compute/api/gunicorn_log.py): gunicorn's own lines and the app's
as `LEVEL: message` on stderr without gunicorn.glogging and its imports; gunicorn's Logger
(and its access-log format) only when COMPUTE_API_ACCESS_LOG asks for an access log.

This file: gunicorn alone; in a booted tree: tests/e2e/test_api_logging.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.api_helpers import make_state

# What gunicorn's arbiter does with the settings module: load it, build the logger, log.
MASTER = """
import json, logging, sys
from gunicorn.config import Config
cfg = Config()
import compute.api.gunicorn_conf as conf
for name in ("logger_class", "loglevel", "accesslog"):
    cfg.set(name, getattr(conf, name))
if getattr(conf, "logconfig_dict", None):
    cfg.set("logconfig_dict", conf.logconfig_dict)
log = cfg.logger_class(cfg)
log.info("from gunicorn %s", "info")
log.debug("hidden at level info")
logging.getLogger("compute.api.test").warning("from the app")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("failed")
sys.stderr.flush()
print(json.dumps({"class": type(log).__name__, "access": bool(log.access_log_enabled),
                  "imported": sorted(m for m in ("gunicorn.glogging", "logging.config", "logging.handlers",
                                                 "pickle", "socketserver") if m in sys.modules)}))
"""


@pytest.mark.parametrize("access_log", ["", "1"])
def test_gunicorn_lines_and_what_is_imported(tmp_path, access_log):
    make_state(str(tmp_path))  # the bootstrap's settings, as compute-ctl writes them
    env = {"PATH": "/usr/bin:/bin", "COMPUTE_RUNTIME_DIR": str(tmp_path), "COMPUTE_API_ACCESS_LOG": access_log}
    r = subprocess.run([sys.executable, "-c", MASTER], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    lines = r.stderr.splitlines()
    assert "INFO: from gunicorn info" in lines and "WARNING: from the app" in lines
    assert "ERROR: failed" in lines and any("ValueError: boom" in line for line in lines)
    assert not any("hidden" in line for line in lines)
    if access_log:
        assert out["class"] == "Logger" and out["access"]
    else:
        assert out == {"class": "StderrLogger", "access": False, "imported": []}
