"""COMPUTE_TRACE (compute/base/trace.py): the start-up timeline the benchmark reads. compute-ctl
writes it as root, so a symlink planted at its path by another user must never be followed.

This file: another user's symlink; in-process: tests/unit/test_trace.py."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from compute.base.trace import TRACE_ENV
from tests.support.installed import REPO


def test_a_symlink_planted_by_another_user_is_not_followed():
    """`nobody` owns a sticky world-writable dir's entry pointing at root's file: root's mark
    must not write through it."""
    base = tempfile.mkdtemp(prefix="cs-trace-", dir="/tmp")
    os.chmod(base, 0o755)
    shared = os.path.join(base, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    victim = pathlib.Path(base) / "victim"
    victim.write_text("root's data\n")
    link = os.path.join(shared, "trace")
    subprocess.run(["runuser", "-u", "nobody", "--", "ln", "-s", str(victim), str(link)], check=True)
    assert os.path.islink(link)
    env = {**os.environ, TRACE_ENV: str(link)}
    subprocess.run([sys.executable, "-c", "from compute.base.trace import mark; mark('through the link')"],
                   env=env, check=True, cwd=REPO)
    assert victim.read_text() == "root's data\n"
    shutil.rmtree(base)
