"""COMPUTE_TRACE (compute/base/trace.py): the start-up timeline the benchmark reads. compute-ctl
writes it as root, so a symlink planted at its path by another user must never be followed.

This file: in-process; another user's symlink: tests/integration/test_trace.py."""

import os

from compute.base.trace import TRACE_ENV, mark


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
