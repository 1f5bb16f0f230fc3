"""An unexpected exception in compute-ctl after sys.stderr became the bounded stream
(compute/base/stdout_buffer.py): its traceback is written out before the exit, not queued
behind the final drain and lost with the writer thread (a silent exit 1, issue 22)."""

import os
import signal
import sys

import pytest

from compute.base.stdout_buffer import BoundedStdout, BoundedTextStream


def _read_all(r: int) -> str:
    os.set_blocking(r, False)
    out = bytearray()
    while True:
        try:
            chunk = os.read(r, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        out.extend(chunk)
    return out.decode()


def test_a_traceback_after_the_switch_is_written_before_the_exit(pipe, monkeypatch):
    from compute.boot.cli import EXIT_UNEXPECTED, reporting_unexpected
    r, w = pipe
    err = BoundedStdout(w)
    monkeypatch.setattr(sys, "stderr", BoundedTextStream(err))  # as become_supervisord does
    cleaned = []

    def bootstrap():
        raise RuntimeError("supervisord's loop broke")

    code = reporting_unexpected(bootstrap, cleanup=lambda: cleaned.append(True), streams=(err,))
    assert code == EXIT_UNEXPECTED == 1
    assert cleaned == [True]
    text = _read_all(r)  # already on the descriptor: the drain waited for the writer thread
    assert "Traceback (most recent call last)" in text
    assert "RuntimeError: supervisord's loop broke" in text
    assert "in bootstrap" in text


def test_exit_codes_and_exits_pass_through(pipe, monkeypatch):
    from compute.boot.cli import reporting_unexpected
    r, w = pipe
    err = BoundedStdout(w)
    monkeypatch.setattr(sys, "stderr", BoundedTextStream(err))
    assert reporting_unexpected(lambda: 0, streams=(err,)) == 0
    assert reporting_unexpected(lambda: 143, streams=(err,)) == 143

    def exits():
        sys.exit(3)

    with pytest.raises(SystemExit):
        reporting_unexpected(exits, streams=(err,))
    assert _read_all(r) == ""  # nothing reported for an ordinary exit


def test_a_traceback_nobody_reads_does_not_hold_the_exit(pipe, monkeypatch):
    """Attack: the reader is gone (EPIPE) or stopped: still exit 1, bounded, no hang."""
    from compute.boot.cli import EXIT_UNEXPECTED, reporting_unexpected
    r, w = pipe
    os.close(r)
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as python sets it: EPIPE, not death
    try:
        err = BoundedStdout(w)
        monkeypatch.setattr(sys, "stderr", BoundedTextStream(err))

        def bootstrap():
            raise OSError("boom")

        assert reporting_unexpected(bootstrap, streams=(err,)) == EXIT_UNEXPECTED
        assert err.dropped >= 1  # counted as dropped, never waited for
    finally:
        signal.signal(signal.SIGPIPE, old)


def test_a_cleanup_that_fails_still_drains(pipe, monkeypatch):
    from compute.boot.cli import reporting_unexpected
    r, w = pipe
    err = BoundedStdout(w)
    monkeypatch.setattr(sys, "stderr", BoundedTextStream(err))
    err.write("last line\n")

    def cleanup():
        raise RuntimeError("responder stuck")

    with pytest.raises(RuntimeError, match="responder stuck"):
        reporting_unexpected(lambda: 0, cleanup=cleanup, streams=(err,))
    assert _read_all(r) == "last line\n"


def test_gc_is_off_only_in_the_compute_ctl_program():
    """compute-ctl turns the cyclic gc off until its early fork (issue 22); a process that merely
    imports the module (these tests) keeps its collector."""
    import gc
    from compute.boot.cli import is_the_program
    assert gc.isenabled()  # imported here: not the program
    assert is_the_program(["/opt/compute-supervisor/venv/bin/compute-ctl", "-D", "/x"])
    assert is_the_program(["compute-ctl"])
    assert not is_the_program(["/usr/bin/pytest"])
    assert not is_the_program(["/x/compute-ctl-wrapper"])
    assert not is_the_program([])
