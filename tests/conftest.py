"""Test tiers, one folder each; the folder is the tier's marker (`pytest -m unit`, ...):

  unit/         pure: no process, no postgres, no gunicorn, no supervisord; seconds in all
  integration/  real postgres, gunicorn or supervisord, or pieces of the tree in-process
  e2e/          boots the whole tree (compute-ctl, installed: scripts/install.sh)
  fault/        fault injection, mostly on a booted tree

Every tier but unit runs programs whose code may come from the installed copy: a run that
selects any of them refuses an installed copy older than the checkout (scripts/test installs
first). Fixtures used by more than one file live here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from tests.peers.pageserver import make_basebackup_tar
from tests.support.installed import stale_reason
from tests.support.pgcluster import PG_USER, SCRATCH_ROOT, scratch_dir
from tests.support.tree import VENV, Compute, booted_compute

TIERS = ("unit", "integration", "e2e", "fault")
TESTS = Path(__file__).parent
# Under `--dist loadfile` (scripts/test) a file's tests stay together on one worker (its module
# fixtures are set up once), except these long files of independent tests, spread over the
# workers test by test: the longest of them would otherwise bound the whole run. The scheduler
# is this file's (pytest_xdist_make_scheduler): xdist's `loadgroup`, used before, silently
# stopped grouping with pytest 9.2 (pytest-xdist issue 1386: it renames the items' node ids,
# which pytest 9.2 no longer allows), so every test was spread and each worker set up the
# module fixtures of its share of every file again.
SPREAD = {"e2e/test_e2e_storage.py", "e2e/test_e2e_tree.py", "fault/test_fault_exit.py",
          "integration/test_basebackup.py"}
# ... and the files are handed out in this order, longest first (xdist's own order, by number of
# tests, put the one-test e2e and fault files, 10-25 s each, last; a worker then ran them alone at
# the end): whole e2e and fault files, their spread tests, integration, unit (many short files
# that fill the workers' last gaps).
HAND_OUT = {"e2e": 0, "fault": 0, "integration": 1, "unit": 2}

# pytest's tmp_path and every tempfile of the tests' process on the scratch root (a RAM disk when
# there is one: tests/support/pgcluster.py); the programs the tests start keep their TMPDIR.
tempfile.tempdir = SCRATCH_ROOT


def tier_of(path: Path) -> str | None:
    try:
        top = path.relative_to(TESTS).parts[0]
    except ValueError:
        return None
    return top if top in TIERS else None


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(Path(item.path))
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in the folder of its tier: "
                                    + ", ".join(f"tests/{t}/" for t in TIERS))
        item.add_marker(tier)
    if hasattr(config, "workerinput"):  # an xdist worker: the controller hands out in this order
        _longest_first(items)


def work_unit(nodeid: str) -> str:
    """What one worker runs whole: the test's file, or the test alone in a SPREAD file."""
    path = nodeid.split("::", 1)[0]
    return nodeid if path.removeprefix("tests/") in SPREAD else path


def _longest_first(items) -> None:
    """Sorts items (stably: a file's tests keep their order) into HAND_OUT's order of units."""
    sizes = Counter(work_unit(item.nodeid) for item in items)

    def key(item):
        unit = work_unit(item.nodeid)
        return HAND_OUT[tier_of(Path(item.path))], unit == item.nodeid, -sizes[unit], unit
    items.sort(key=key)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's (scripts/test --fast runs without it)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the workers' order (_longest_first)
    return ByFile(config, log)


def pytest_sessionstart(session):
    """Before any test (and before xdist starts its workers): unless the run is the unit tier
    alone, the installed copy must be the checkout's."""
    config = session.config
    if hasattr(config, "workerinput"):  # an xdist worker: its controller checked
        return
    unit = TESTS / "unit"
    only_unit = config.option.markexpr == "unit" or all(
        Path(arg.split("::")[0]).resolve().is_relative_to(unit) for arg in config.args)
    if not only_unit and (reason := stale_reason(VENV)):
        pytest.exit(reason, returncode=pytest.ExitCode.USAGE_ERROR)


def _falcon_test_peer_is_loopback() -> None:
    """falcon's TestClient leaves REMOTE_ADDR out of its environ unless told; gunicorn always sets
    it (the TCP peer), and the API refuses a request without one on the routes it keeps for
    loopback peers (compute/api/access.py: fail closed). So in-process requests come from
    127.0.0.1 unless a test passes `remote_addr` (the non-loopback attack tests do)."""
    from falcon.testing import helpers
    if getattr(helpers.create_environ, "loopback_default", False):
        return
    create_environ = helpers.create_environ

    def with_loopback_peer(*args, **kwargs):
        if kwargs.get("remote_addr") is None:
            kwargs["remote_addr"] = "127.0.0.1"
        return create_environ(*args, **kwargs)

    with_loopback_peer.loopback_default = True
    helpers.create_environ = with_loopback_peer


_falcon_test_peer_is_loopback()


# -- shared fixtures ----------------------------------------------------------------------------

@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """An os.pipe() (read end, write end), both ends closed afterwards (the stalls tests)."""
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def scratch() -> Iterator[str]:
    """A fresh directory owned by the postgres user (see scratch_dir), removed afterwards."""
    path = scratch_dir("cs-scratch-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pgdata(scratch: str) -> str:
    """An empty PGDATA (0700, the postgres user's) in `scratch`."""
    path = os.path.join(scratch, "pgdata")
    os.mkdir(path, 0o700)
    PG_USER.chown(path)
    return path


@pytest.fixture
def compute() -> Iterator[Compute]:
    """A booted tree on the embedded default (tests/support/tree.py); a module that needs another
    tree defines its own `compute`."""
    with booted_compute() as c:
        yield c


@pytest.fixture(scope="session")
def bb_tar() -> Iterator[str]:
    """A pageserver-shaped basebackup tar of a fresh PG15 data dir (initdb), built once per
    process; tests serve it or copy it, never change it."""
    base = scratch_dir("cs-bbtar-")
    yield make_basebackup_tar(os.path.join(base, "basebackup.tar"))
    shutil.rmtree(base, ignore_errors=True)
