"""The tree's event handlers that run inside supervisord (compute/tree/exitwatch.py,
compute/tree/logrelay.py): their timers, the log relay's line assembly, and the core-dump report's
gdb child that must never block supervisord's loop. The e2e side: tests/e2e/test_e2e_tree.py.

This file: no process; the gdb child: tests/integration/test_inprocess_handlers.py."""

from __future__ import annotations

import json
import logging

from compute.tree.exitwatch import CoreDumpReport, Timers
from compute.tree.logrelay import LogRelay


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_timers_run_in_due_order_and_only_when_due():
    clock, ran = Clock(), []
    timers = Timers(clock)
    assert timers.next_in() is None
    timers.call_later(5, lambda: ran.append("b"))
    timers.call_later(1, lambda: ran.append("a"))
    timers.call_later(5, lambda: ran.append("c"))  # same time: in the order scheduled
    assert timers.next_in() == 1
    timers.run_due()
    assert ran == []
    clock.t += 1
    timers.run_due()
    assert ran == ["a"] and timers.next_in() == 4
    clock.t += 10
    assert timers.next_in() == 0  # overdue: never a negative poll timeout
    timers.run_due()
    assert ran == ["a", "b", "c"] and timers.next_in() is None


def test_a_failing_timer_does_not_stop_the_others(caplog):
    clock, ran = Clock(), []
    timers = Timers(clock)
    timers.call_later(0, lambda: 1 / 0)
    timers.call_later(0, lambda: ran.append("after"))
    with caplog.at_level(logging.ERROR, logger="compute.tree.exitwatch"):
        timers.run_due()
    assert ran == ["after"]
    assert "ZeroDivisionError" in caplog.text


def test_log_relay_assembles_lines_per_program_and_channel():
    out: list[str] = []
    relay = LogRelay("text", out=out.append)
    relay.relay("api", "stdout", b"INFO: one\nINFO: tw")
    relay.relay("monitor", "stdout", b"WARNING: other program\n")
    relay.relay("api", "stderr", b"ERROR: other channel\n")
    relay.relay("api", "stdout", b"o\n\n")  # the rest of `two`; empty lines are dropped
    lines = "".join(out).splitlines()
    assert len(lines) == 4, lines
    assert lines[0].split()[1:] == ["INFO", "api", "one"]
    assert lines[1].split()[1:4] == ["WARNING", "monitor", "other"]
    assert lines[2].split()[1:4] == ["ERROR", "api", "other"]
    assert lines[3].split()[1:] == ["INFO", "api", "two"]


def test_log_relay_json_survives_bytes_that_are_not_utf8():
    out: list[str] = []
    LogRelay("json", out=out.append).relay("postgres", "stdout", b"LOG:  bad \xff byte\n")
    rec = json.loads(out[0])
    assert rec["program"] == "postgres" and rec["level"] == "INFO"
    assert "bad \ufffd byte" in rec["msg"]


def test_core_dump_report_without_cores_goes_straight_on(tmp_path):
    done: list[bool] = []
    CoreDumpReport(str(tmp_path), "postgres", Timers(), lambda: done.append(True)).start()
    assert done == [True]


def test_only_our_python_programs_are_forked():
    from compute.tree.warmfork import forked_module
    py = "/venv/bin/python"
    assert forked_module(py, [py, "-m", "compute.lifecycle.driver"], python=py) == "compute.lifecycle.driver"
    assert forked_module(py, [py, "-m", "gunicorn", "-c", "x"], python=py) == "gunicorn"
    assert forked_module(py, [py, "-m", "compute.tree.exitwatch"], python=py) is None  # not a program
    assert forked_module("/usr/bin/python3", ["/usr/bin/python3", "-m", "compute.programs.monitor"], python=py) is None
    assert forked_module("/usr/bin/setpriv", ["/usr/bin/setpriv", "--", "/pg/postgres"], python=py) is None
    assert forked_module(py, [py, "-c", "compute.programs.monitor"], python=py) is None
