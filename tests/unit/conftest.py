"""The unit tier starts no process: a test that would (directly or through the code it calls)
fails at once, naming the tier it belongs to."""

from __future__ import annotations

import os
import subprocess

import pytest


def _refuse(*_args, **_kwargs):
    raise AssertionError("a unit test starts no process: this test belongs in tests/integration/")


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    monkeypatch.setattr(subprocess.Popen, "_execute_child", _refuse)
    monkeypatch.setattr(os, "fork", _refuse)
    monkeypatch.setattr(os, "posix_spawn", _refuse)
    monkeypatch.setattr(os, "posix_spawnp", _refuse)
