"""COMPUTE_TRACE (compute/trace.py): the start-up timeline the benchmark reads. compute-ctl
writes it as root, so a symlink planted at its path by another user must never be followed."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from compute.trace import TRACE_ENV, mark


def test_marks_are_appended(tmp_path, monkeypatch):
    path = tmp_path / "trace"
    path.write_text("")
    monkeypatch.setenv(TRACE_ENV, str(path))
    mark("one")
    mark("two")
    lines = path.read_text().splitlines()
    assert [ln.split(" ", 2)[2] for ln in lines] == ["one", "two"]
    assert all(ln.split()[1] == str(os.getpid()) for ln in lines)


def test_off_without_the_variable_and_never_creates_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(TRACE_ENV, raising=False)
    mark("nothing")  # no error, nothing written anywhere
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "absent"))
    mark("still nothing")
    assert not (tmp_path / "absent").exists()


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
    subprocess.run([sys.executable, "-c", "from compute.trace import mark; mark('through the link')"],
                   env=env, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert victim.read_text() == "root's data\n"
    shutil.rmtree(base)
