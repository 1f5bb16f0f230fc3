"""Unit tests of the pieces behind issue 21's items 4 and 5 and the limits check: the bounded
stdout (compute/base/stdout_buffer.py), the monitor's stall decision (compute/tree/monitor_watch.py), the
resource limits (compute/base/rlimits.py). The end-to-end tests are tests/fault/test_fault_stalls.py."""

from __future__ import annotations

import os
import re
import resource
import threading
import time


from compute.programs import monitor
from compute.tree import monitor_watch
from compute.base import rlimits
from compute.base.stdout_buffer import BoundedStdout
from tests.support.waiting import wait_for


# -- the bounded stdout ---------------------------------------------------------------------

def ended(out: BoundedStdout, r: int) -> None:
    """The writer thread of `out` gone (it lives as long as its process otherwise): the reader
    closes, one more line fails (EPIPE), the thread returns."""
    try:
        os.close(r)
    except OSError:
        pass
    out.write("the end\n")
    if out._thread is not None:
        out._thread.join(10)
        assert not out._thread.is_alive()


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    try:
        while chunk := os.read(fd, 1 << 16):
            out += chunk
    except BlockingIOError:
        pass
    return out


def test_writes_never_wait_for_a_stopped_reader(pipe):
    r, w = pipe
    out = BoundedStdout(w, limit=100_000)
    line = "x" * 99 + "\n"
    done = threading.Event()

    def writer() -> None:
        for _ in range(10_000):  # 1 MB: the pipe (64 KiB) and the buffer fill, nobody reads
            out.write(line)
        done.set()

    threading.Thread(target=writer, daemon=True).start()
    assert done.wait(30), "a write waited for the reader"
    assert 0 < out.dropped < 10_000
    # The reader is back: what was kept, and notices in place of what was not (one per run of
    # lost lines: the writer may have taken a notice into a write that the stop then held).
    assert out.drain(stall=0.2) is False  # nobody reads yet: it gives up
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 1 << 16), b"")), daemon=True)
    reader.start()
    assert out.drain(stall=5)
    os.close(w)  # EOF for the reader
    reader.join(10)
    text = b"".join(chunks)
    notices = [int(n) for n in re.findall(rb"(\d+) lines? dropped", text)]
    assert notices and sum(notices) == out.dropped
    assert text.count(line.encode()) + out.dropped == 10_000
    out.write("x\n")  # w is closed: the writer thread ends on EBADF
    out._thread.join(10)


def test_notice_comes_where_the_lines_were_lost_and_uses_the_given_shape(pipe):
    r, w = pipe
    out = BoundedStdout(w, limit=12)
    out.notice = lambda n: f"NOTICE {n}\n"
    out._thread = threading.current_thread()  # no writer yet: the queue is what would go out
    assert out.write("0123456\n")
    assert not out.write("too long\n") and not out.write("again\n")
    assert out.write("ab\n")
    out._thread = None
    out.write("")  # nothing: no thread started for it
    out._thread = threading.Thread(target=out._run, name="stdout-writer", daemon=True)
    out._thread.start()
    wait_for(lambda: not out._queue and not out._pending)
    assert read_all(r) == b"0123456\nNOTICE 2\nab\n"
    assert out.dropped == 2
    ended(out, r)


def test_drain_gives_up_on_a_stopped_reader(pipe):
    r, w = pipe
    out = BoundedStdout(w)
    for _ in range(2000):
        out.write("y" * 99 + "\n")  # 200 KB: more than the pipe holds
    t0 = time.monotonic()
    assert not out.drain(stall=0.2, limit=5)
    assert time.monotonic() - t0 < 5
    ended(out, r)


def test_a_reader_gone_for_good_drops_everything_without_blocking(pipe):
    r, w = pipe
    os.close(r)  # EPIPE from now on (Python ignores SIGPIPE)
    out = BoundedStdout(w)
    out.write("lost\n")
    wait_for(lambda: out._closed)
    assert not out.write("also lost\n")
    assert out.dropped == 2
    assert not out.drain()


# -- the monitor's stall decision -----------------------------------------------------------

def test_tick_bound_covers_the_monitors_longest_tick():
    assert monitor_watch.TICK_BOUND >= 2 * monitor.CONNECT_TIMEOUT + monitor.QUERY_TIMEOUT


def test_threshold_and_check_period_follow_the_interval():
    assert monitor_watch.stall_after(0.5) == 11.0
    assert monitor_watch.stall_after(2) == 14.0
    assert monitor_watch.check_period(0.5) == 1.0
    assert monitor_watch.check_period(0.2) == 0.4
    assert monitor_watch.check_period(0.01) == 0.2
    assert monitor_watch.check_period(30) == 1.0


def test_observe_kills_only_a_running_monitor_whose_tick_stood_still_past_the_threshold():
    seen, kill = monitor_watch.observe(None, 100, 5.0, now=0.0, threshold=10)
    assert not kill
    seen, kill = monitor_watch.observe(seen, 100, 5.0, now=10.0, threshold=10)
    assert not kill  # exactly the threshold: not yet
    moved, kill = monitor_watch.observe(seen, 100, 6.0, now=10.5, threshold=10)
    assert not kill and moved.since == 10.5  # a new tick: the count starts again
    seen, kill = monitor_watch.observe(moved, 100, 6.0, now=20.6, threshold=10)
    assert kill
    again, kill = monitor_watch.observe(seen, 100, 6.0, now=21.0, threshold=10)
    assert not kill  # killed once: not again before a whole threshold
    fresh, kill = monitor_watch.observe(again, 101, 6.0, now=40.0, threshold=10)
    assert not kill and fresh.pid == 101  # a new monitor gets its own threshold
    stopped, kill = monitor_watch.observe(fresh, None, 6.0, now=60.0, threshold=10)
    assert not kill  # not running (starting, exited): nothing to judge


# -- resource limits ------------------------------------------------------------------------

def test_limits_decisions():
    inf = resource.RLIM_INFINITY
    assert rlimits.shortfall("RLIMIT_NOFILE", 4096, 4096, 1024, "open files", "-n") == (None, None)
    assert rlimits.shortfall("RLIMIT_NOFILE", inf, inf, 1024, "open files", "-n") == (None, None)
    assert rlimits.shortfall("RLIMIT_NOFILE", 200, inf, 1024, "open files", "-n") == (1024, None)
    assert rlimits.shortfall("RLIMIT_NOFILE", 200, 2048, 1024, "open files", "-n") == (1024, None)
    soft, error = rlimits.shortfall("RLIMIT_NOFILE", 200, 200, 1024, "open files", "-n")
    assert soft is None
    assert error == ("RLIMIT_NOFILE is 200 (hard limit 200): compute-ctl needs at least 1024 open files "
                     "(raise it: ulimit -n 1024, prlimit, or the container's ulimits)")


def test_the_conf_asks_supervisord_for_what_compute_ctl_checked(tmp_path):
    from compute.tree.supervisord_conf import render_supervisord_conf
    conf = render_supervisord_conf(runtime_dir=str(tmp_path), pgdata="/pgdata", pgbin="/usr/bin/postgres",
                                   python="/usr/bin/python3", auth_token=None, vm_informant=None,
                                   informant_connstr="")
    assert f"minfds={rlimits.MIN_FDS}\n" in conf and f"minprocs={rlimits.MIN_PROCS}\n" in conf


# -- /metrics and /status -------------------------------------------------------------------

def test_stderr_as_a_bounded_text_stream(pipe):
    import traceback
    from compute.base.stdout_buffer import BoundedTextStream
    r, w = pipe
    stream = BoundedTextStream(BoundedStdout(w, limit=1000))
    try:
        raise ValueError("boom")
    except ValueError:
        for _ in range(200):  # ~40 KB of tracebacks, nobody reading: never blocks
            traceback.print_exc(file=stream)
    assert stream.out.dropped > 0 and stream.fileno() == w
    os.set_blocking(r, False)
    seen = bytearray()

    def read_some() -> bytes:  # the writer thread writes the buffer out as the reader takes it
        try:
            seen.extend(os.read(r, 1 << 16))
        except BlockingIOError:
            pass
        return bytes(seen)
    wait_for(lambda: b"ValueError: boom" in read_some(), what="the first traceback, whole")
    ended(stream.out, r)


def test_monitor_sigterm_before_its_handlers_is_not_lost(tmp_path, monkeypatch):
    """supervisord dying (SIGTERM by the parent-death signal) between the monitor finding its
    settings and installing its own handlers: the monitor returns instead of running on as an
    orphan."""
    import signal
    from types import SimpleNamespace
    ran = []

    def found_then_sigterm(store, path, stop):
        os.kill(os.getpid(), signal.SIGTERM)  # caught by main's early handler
        return SimpleNamespace(connstr="postgresql://cloud_admin@127.0.0.1:1/postgres", monitor_interval=0.5,
                               pgdata=str(tmp_path))

    monkeypatch.setenv("COMPUTE_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(monitor, "die_with_parent", lambda *a, **k: True)
    monkeypatch.setattr(monitor, "setup_program_logging", lambda *a, **k: None)
    monkeypatch.setattr(monitor, "_wait_for_launch", found_then_sigterm)
    monkeypatch.setattr(monitor.ActivityMonitor, "run", lambda self: ran.append(self))
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert monitor.main() == 0
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert ran == []
