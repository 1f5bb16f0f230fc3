"""The warm image in two stages (compute/tree/warmfork.py): the driver is forked from the first
(its own modules only), everything else waits for the whole image."""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import sys
from compute.tree import warmfork
api_modules = ("falcon", "gunicorn.arbiter", "compute.api.app")
warmfork.warm_early()
assert "compute.lifecycle.driver" in sys.modules
assert "psycopg" not in sys.modules, "the driver imports it as postgres boots (preload_psycopg), not at its start"
assert not any(m in sys.modules for m in api_modules), "the early image is the driver's only"
warmfork.warm_for("lifecycle")
assert not any(m in sys.modules for m in api_modules), "the driver needs no more"
warmfork.warm_for("api")
assert all(m in sys.modules for m in api_modules) and "compute.programs.monitor" in sys.modules
assert "psycopg" in sys.modules  # the whole image: a driver forked from it (the hand-over's) shares it
print("ok")
"""


@pytest.mark.parametrize("first", ["api", "monitor"])
def test_any_other_program_gets_the_whole_image(first):
    script = SCRIPT.replace('warmfork.warm_for("api")', f'warmfork.warm_for("{first}")')
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


AFTER_EARLY_DRIVER = """
import sys
from compute.base import forkinfo
from compute.tree import warmfork
warmfork.defer_driver_modules()  # the first start's driver was forked before the image
assert "compute.lifecycle.driver" not in sys.modules and "falcon" not in sys.modules
warmfork.warm_for("{first}")
assert forkinfo.fully_warm
assert all(m in sys.modules for m in ("compute.lifecycle.driver", "psycopg", "falcon", "gunicorn.arbiter",
                                      "compute.api.app", "compute.programs.monitor"))
print("ok")
"""


@pytest.mark.parametrize("first", ["lifecycle", "api", "monitor"])
def test_after_an_early_driver_the_first_warm_up_is_the_whole_image(first):
    """Whichever comes first once the start-up is over, the hand-over's driver included
    (supervisord respawns it first: priority 1), is forked from the whole image."""
    script = AFTER_EARLY_DRIVER.replace("{first}", first)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


HYGIENE = """
import logging, os, sys
from compute.tree import warmfork
from compute.tree.logrelay import setup_relay_logging
logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))
setup_relay_logging("text")  # compute-ctl's in-process handlers' logger, before the first spawn
quiet = logging.getLogger("some.library")
quiet.disabled = True
warmfork.warm_for("lifecycle")
pid = os.fork()
if pid == 0:
    warmfork._fresh_logging()
    loggers = [logging.getLogger(), logging.getLogger("compute.tree.exitwatch"), quiet]
    ok = all(not lg.handlers and lg.propagate and not lg.disabled for lg in loggers)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "a forked program kept the parent's logging set-up"
assert logging.getLogger("compute.tree.exitwatch").handlers, "the parent's own set-up is untouched"
print("ok")
"""


def test_a_forked_program_starts_without_the_parents_logging():
    """The child resets only the loggers the parent had configured when it warmed (walking all
    of them in the child copied their pages): those, and the root logger, must be fresh."""
    r = subprocess.run([sys.executable, "-c", HYGIENE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


RELEASE = """
import json, psycopg
from compute.tree import warmfork

def rollup():
    # Rss of the process, and the copied (relocated) pages inside the libraries' mappings
    out, library = {"Rss": 0, "Anonymous": 0}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                library = len(fields) > 5 and ".so" in fields[5]
            elif fields[0] == "Rss:":
                out["Rss"] += int(fields[1])
            elif fields[0] == "Anonymous:" and library:
                out["Anonymous"] += int(fields[1])
    return out

before = rollup()
released = warmfork.release_loader_pages()
after = rollup()
# libpq (and OpenSSL) still work: their code is mapped back from the page cache
try:
    psycopg.connect("host=/nonexistent-socket-dir connect_timeout=1")
except psycopg.OperationalError as e:
    error = str(e)
print(json.dumps({"released": released, "rss_before": before["Rss"], "rss_after": after["Rss"],
                  "anon_before": before["Anonymous"], "anon_after": after["Anonymous"], "error": error}))
"""


def test_compute_ctl_unmaps_the_loaders_pages_and_keeps_working():
    r = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["released"] > 0 and out["rss_after"] < out["rss_before"]
    assert out["anon_after"] == out["anon_before"], "no copied (relocated) library page was dropped"
    assert "nonexistent-socket-dir" in out["error"]
