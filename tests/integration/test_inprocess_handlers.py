"""The tree's event handlers that run inside supervisord (compute/tree/exitwatch.py,
compute/tree/logrelay.py): their timers, the log relay's line assembly, and the core-dump report's
gdb child that must never block supervisord's loop. The e2e side: tests/e2e/test_e2e_tree.py.

This file: the gdb child; the rest: tests/unit/test_inprocess_handlers.py."""

from __future__ import annotations

import logging
import os
import stat
import time

from compute.tree.exitwatch import CoreDumpReport, Timers


def test_core_dump_report_never_blocks_the_loop(tmp_path, monkeypatch, caplog):
    """gdb runs as a child; start() returns at once, and its output is logged once it ends.
    The stand-in gdb only finishes when the test lets it: a blocking report could not pass."""
    pgdata, bindir, release = tmp_path / "pgdata", tmp_path / "bin", tmp_path / "release"
    pgdata.mkdir()
    bindir.mkdir()
    (pgdata / "core.4242").write_bytes(b"not really a core")
    gdb = bindir / "gdb"
    gdb.write_text(f"#!/bin/sh\nwhile [ ! -e {release} ]; do sleep 0.01; done\n"
                   'echo "#0  fake_frame () for $5 $6"\n')
    gdb.chmod(gdb.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")

    done: list[bool] = []
    timers = Timers()
    report = CoreDumpReport(str(pgdata), "/usr/bin/postgres", timers, lambda: done.append(True))
    with caplog.at_level(logging.INFO, logger="compute.tree.exitwatch"):
        report.start()
        assert done == [] and timers.next_in() is not None  # polled later, not waited for
        timers.run_due()
        assert done == []
        release.touch()
        deadline = time.monotonic() + 30
        while not done and time.monotonic() < deadline:
            time.sleep(timers.next_in() or 0)
            timers.run_due()
    assert done == [True]
    assert f"postgres left a core dump: {pgdata}/core.4242" in caplog.text
    assert f"backtrace: #0  fake_frame () for /usr/bin/postgres {pgdata}/core.4242" in caplog.text
