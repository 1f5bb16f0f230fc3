"""Stalls around a booted tree (issue 21, items 4 and 5 and the smaller ones): a reader of
compute-ctl's stdout that stops reading, a monitor that stops ticking, a postgres that accepts
TCP connections and never answers (/readyz), and a file-descriptor limit too low for the tree.

The stopped reader is a pipe the test does not read (what `compute-ctl | cat` is with `cat`
SIGSTOPped, or a blocking container log driver): 64 KiB fill it, after that every write(1)
blocks until someone reads.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import psycopg

from compute.api.bodies import parse_rfc3339

from tests.support.fault_tree import alive, program_child, supervisord_pid
from tests.support.promtool import check_clean
from tests.support.tree import Compute
from tests.support.waiting import wait_for

# Log lines postgres writes in one statement: ~3 MB of output, far more than the pipe (64 KiB)
# and compute-ctl's stdout buffer (logrelay.STDOUT_BUFFER_BYTES, 1 MiB) hold together.
FLOOD_LINES = 8000
FLOOD_SQL = ("DO $$ BEGIN FOR i IN 1..%d LOOP RAISE WARNING 'flood %%: %%', i, repeat('x', 200); "
             "END LOOP; END $$" % FLOOD_LINES)
HANG = 60  # seconds: on a tree that blocks on its stdout, these never come


def metric(page: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", page, re.M)
    return float(m.group(1)) if m else None


def prometheus_page(c: Compute) -> str:
    code, body = c.request("GET", "/metrics", timeout=HANG)
    assert code == 200, body
    return body.decode()


class StalledStdoutCompute(Compute):
    """compute-ctl with its stdout (and stderr) on a pipe that nobody reads until `resume()`;
    from then on a thread copies it to `out_path` (what `output()` shows)."""

    def start(self) -> "StalledStdoutCompute":
        self.out = open(self.out_path, "wb")
        self.reader, writer = os.pipe()
        try:
            self.proc = subprocess.Popen(self.command(), stdout=writer, stderr=writer,
                                         stdin=subprocess.DEVNULL, env={**os.environ, **self.env})
        finally:
            os.close(writer)
        self.copier: threading.Thread | None = None
        return self

    def resume(self) -> None:
        def copy() -> None:
            while data := os.read(self.reader, 65536):
                self.out.write(data)
                self.out.flush()
        self.copier = threading.Thread(target=copy, daemon=True)
        self.copier.start()

    def close(self) -> None:
        if self.copier is None:
            self.resume()  # a tree that blocks on its stdout could not even stop otherwise
        self.stop()
        self.copier.join(10)  # all it has copied before the file closes
        os.close(self.reader)
        super().close()


def flood_postgres_log(c: Compute) -> None:
    """One statement that makes postgres log FLOOD_LINES warnings (each with its CONTEXT line);
    returns once postgres has written them all, i.e. once supervisord drained its stderr."""
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(c.conninfo(), autocommit=True) as conn:
                conn.execute("SET client_min_messages = error")  # the log gets them, not us
                conn.execute(FLOOD_SQL)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(HANG), "postgres could not write its log: the tree stopped draining its stderr"
    assert not errors, errors


def check_compute_serves_with_stdout_stalled(c: StalledStdoutCompute) -> float:
    """The flood, then: sessions, probes and /metrics still work; lines were dropped and counted."""
    c.wait_status("running")
    flood_postgres_log(c)
    with psycopg.connect(c.conninfo(), autocommit=True) as conn:  # a fresh session still works
        assert conn.execute("SELECT 1").fetchone() == (1,)
    code, body = c.request("GET", "/readyz", timeout=HANG)
    assert code == 200, body

    def dropped_count() -> tuple[float, str] | None:
        page = prometheus_page(c)
        found = metric(page, "compute_log_lines_dropped_total")
        return (found, page) if found else None
    dropped, page = wait_for(dropped_count, HANG, "a count of dropped lines on /metrics", 0.1)
    check_clean(page)
    print(f"lines dropped with a stopped stdout reader: {dropped:.0f} of ~{2 * FLOOD_LINES} flooded")
    return dropped


def test_stopped_stdout_reader_drops_lines_and_terminate_works():
    c = StalledStdoutCompute()
    c.spec = c.new_spec()
    with c:
        dropped = check_compute_serves_with_stdout_stalled(c)
        # The reader comes back: the tree says what it lost, and lines flow again.
        c.resume()
        notice = r"WARNING\s+logrelay\s+(\d+) lines? dropped"
        wait_for(lambda: re.search(notice, c.output()), HANG, "the dropped-lines notice once the reader is back")
        noticed = sum(int(n) for n in re.findall(notice, c.output()))
        assert noticed >= 1
        # Every line the notices name was counted (the count is published about once a second).
        counted = wait_for(lambda: (n := metric(prometheus_page(c), "compute_log_lines_dropped_total")) >= noticed
                           and n, HANG, f"/metrics counting the {noticed} lines the notices name", 0.1)
        assert counted >= dropped
        print(f"lines dropped, said on stdout once the reader was back: {noticed}; counted: {counted:.0f}")
        code, body = c.request("POST", "/terminate", timeout=HANG)
        assert code == 200, body
        assert c.wait_exit(HANG) == 0
        assert "compute stopped: exit code 0" in c.output()


def test_stopped_stdout_reader_sigterm_still_stops_the_compute():
    c = StalledStdoutCompute()
    c.spec = c.new_spec()
    with c:
        check_compute_serves_with_stdout_stalled(c)
        postmaster = c.postmaster_pid()
        c.signal(signal.SIGTERM)  # the reader is still stopped
        assert c.wait_exit(HANG) == 0
        assert not alive(postmaster)


# -- a stopped monitor -----------------------------------------------------------------------

MONITOR_INTERVAL = 0.2
APP_PASSWORD = "apppass"  # base_spec's md5 hash of role "app"


def test_stopped_monitor_is_detected_and_restarted():
    """SIGSTOP the monitor during a busy session: the tree sees it stopped ticking, SIGKILLs it,
    supervisord starts a new one, and last_active moves again; /metrics and /status show it."""
    c = Compute(args=["--monitor-interval", str(MONITOR_INTERVAL)])
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        busy = psycopg.connect(c.conninfo("appdb", "app", APP_PASSWORD))
        busy.execute("SELECT 1")  # and left idle in transaction: a busy session, active every tick
        sup = supervisord_pid(c.runtime_dir)
        old = wait_for(lambda: program_child(sup, "monitor"), HANG, "the monitor")
        wait_for(lambda: parse_rfc3339(c.status()["last_active"]) > time.time() - 1, HANG,
                 "the busy session seen by the monitor")
        os.kill(old, signal.SIGSTOP)
        stopped_at, t0 = time.time(), time.monotonic()
        try:
            new = wait_for(lambda: (n := program_child(sup, "monitor")) and n != old and n, HANG,
                           "a new monitor after the stopped one", 0.05)
        finally:
            if alive(old):
                os.kill(old, signal.SIGCONT)
        detected = time.monotonic() - t0
        print(f"stopped monitor (interval {MONITOR_INTERVAL} s) replaced after {detected:.2f} s")
        assert not alive(old)  # killed, not left stopped beside the new one
        wait_for(lambda: parse_rfc3339(c.status()["last_active"]) > stopped_at, HANG,
                 "last_active moving again")
        body = c.status()
        assert parse_rfc3339(body["monitor_last_tick"]) > stopped_at  # the new monitor's
        assert body["monitor_stall_restarts"] >= 1
        assert {"tenant", "timeline", "status", "last_active", "error", "start_time"} <= set(body)
        page = prometheus_page(c)
        check_clean(page)
        assert metric(page, "compute_monitor_stall_restarts_total") >= 1
        assert metric(page, "compute_monitor_seconds_since_tick") is not None
        assert "monitor stopped ticking" in c.output()
        assert new
        busy.close()


# -- /readyz when postgres does not answer -------------------------------------------------------

READYZ_BOUND = 1.0  # docs/api.md: /readyz says not-ready within this
PROBE_TIMEOUT = 2.0  # a probe's timeoutSeconds (docs/deploy.md)
CACHE_SECONDS = 1.0  # compute/api/health.py


def test_readyz_answers_within_the_bound_when_postgres_hangs():
    """A SIGSTOPped postmaster: TCP connections are accepted (the backlog) and never answered."""
    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        code, _ = c.request("GET", "/readyz")
        assert code == 200
        pm = c.postmaster_pid()
        os.kill(pm, signal.SIGSTOP)
        try:
            # Back to back for three cache periods (compute/api/health.py): two checks at least
            # run against the stopped postmaster; each answer must beat the probe's timeout.
            latencies: list[float] = []
            checking_since = None
            while checking_since is None or time.monotonic() - checking_since < 3 * CACHE_SECONDS:
                t0 = time.monotonic()
                code, body = c.request("GET", "/readyz", timeout=PROBE_TIMEOUT)
                latencies.append(time.monotonic() - t0)
                if code == 503:
                    assert b"postgres does not accept connections" in body
                    checking_since = checking_since or t0
                else:
                    assert code == 200 and checking_since is None, body  # the cached answer, then no more
        finally:
            os.kill(pm, signal.SIGCONT)
        latencies = [round(x, 3) for x in sorted(latencies, reverse=True)[:3]]
        print(f"/readyz with postgres stopped, slowest answers: {latencies} s")
        wait_for(lambda: c.request("GET", "/readyz")[0] == 200, HANG, "/readyz ready again")


# -- RLIMIT_NOFILE too low --------------------------------------------------------------------

def test_too_low_nofile_limit_is_a_one_line_error_before_anything_is_touched():
    c = Compute()
    c.spec = c.new_spec()
    try:
        res = subprocess.run(["prlimit", "--nofile=200", "--", *c.command()], capture_output=True,
                             text=True, timeout=HANG)
        assert res.returncode == 1, res
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("compute-ctl: ") and "RLIMIT_NOFILE" in lines[0], res
        assert res.stdout == ""
        assert not os.path.exists(c.runtime_dir) and not os.path.exists(c.pgdata)
    finally:
        c.close()
