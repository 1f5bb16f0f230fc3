"""API and monitor benchmark: `python -m bench.api`.

Starts a real PostgreSQL 15 and real gunicorn (the supervisord command line) on a fresh state
file, then measures:
  1. GET /status throughput and p50/p99 latency with 64 concurrent keep-alive connections;
  2. GET /status p99 while a POST /configure is in flight (a simulated driver holds
     configuration_pending for a few seconds, then reports running);
  3. the CPU use of a running `python -m compute.programs.monitor` over 30 s (utime+stime from
     /proc/<pid>/stat), with a user session idle in transaction (worst case: it writes every tick).

The load generator is `wrk` when installed (C, little CPU), otherwise a Python one (threads +
http.client keep-alive), which competes for the same cores and under-reports the server.
Goals on a 2-core box: >= 3,000 req/s, p99 <= 20 ms, p99 during /configure <= 50 ms, monitor < 1%.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import psycopg

from compute.shared.state import StateStore, state_path
from tests.support.api_helpers import GUNICORN_ARGV, REPO, launch_settings, make_state, minimal_spec, wait_port
from tests.support.pgcluster import free_port, running_cluster

GOALS = {"rps": 3000, "p99_ms": 20, "p99_configure_ms": 50, "monitor_cpu_pct": 1.0}


# -- load generators ----------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, connections: int, seconds: float, threads: int = 2) -> dict:
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)$", out, re.M)
    return {"tool": "wrk", "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": _ms(lat["50"]), "p90_ms": _ms(lat["90"]), "p99_ms": _ms(lat["99"]),
            "non_2xx": int(errors.group(1)) if errors else 0, "socket_errors": sock.group(1) if sock else None}


def pyload(port: int, path: str, connections: int, seconds: float) -> dict:
    latencies: list[list[float]] = [[] for _ in range(connections)]
    failures = [0]
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine = latencies[i]
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    failures[0] += 1
            except OSError:
                failures[0] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            mine.append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    all_lat = sorted(x for lst in latencies for x in lst)
    pct = lambda p: all_lat[min(len(all_lat) - 1, int(p / 100 * len(all_lat)))] * 1000  # noqa: E731
    return {"tool": "python", "rps": len(all_lat) / elapsed, "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "non_2xx": failures[0], "socket_errors": None}


def load(port: int, path: str, connections: int, seconds: float) -> dict:
    if shutil.which("wrk"):
        return wrk(f"http://127.0.0.1:{port}{path}", connections, seconds)
    return pyload(port, path, connections, seconds)


# -- the pieces ---------------------------------------------------------------------------------------

@contextmanager
def gunicorn(runtime_dir: str, extra_env: dict[str, str]):
    env = dict(os.environ, COMPUTE_RUNTIME_DIR=runtime_dir, PYTHONPATH=REPO, **extra_env)
    port = StateStore(state_path(runtime_dir)).get("launch")["http_port"]
    log = open(os.path.join(runtime_dir, "gunicorn.log"), "ab")
    proc = subprocess.Popen(GUNICORN_ARGV, cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        wait_port(port, proc=proc)
        time.sleep(0.5)  # let every worker boot
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class HoldingDriver(threading.Thread):
    """Leaves configuration_pending alone for `hold` seconds, then reports running."""

    def __init__(self, runtime_dir: str, hold: float):
        super().__init__(daemon=True)
        self.store = StateStore(state_path(runtime_dir))
        self.hold = hold
        self.stop = threading.Event()
        self.pending_seen = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            if self.store.get("status") == "configuration_pending":
                self.pending_seen.set()
                self.stop.wait(self.hold)
                if self.store.transition({"configuration_pending"}, "configuration"):  # as the driver does
                    self.store.transition({"configuration"}, "running")
                return


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _busy_seconds() -> float:
    """CPU time used by the whole machine so far (all cores, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    try:
        total += cpu_seconds(pid)
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for child in f.read().split():
                total += _tree_cpu_seconds(int(child))
    except OSError:
        pass
    return total


def measured(run, server_pid: int) -> dict:
    """Run a load, and tell how much CPU the rest of the machine took meanwhile (other
    people's work on a shared box), in cores."""
    self_t0, kids_t0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, server0, t0 = _busy_seconds(), _tree_cpu_seconds(server_pid), time.monotonic()
    result = run()
    busy1, server1, t1 = _busy_seconds(), _tree_cpu_seconds(server_pid), time.monotonic()
    self_t1, kids_t1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (server1 - server0) + sum(getattr(b, f) - getattr(a, f) for a, b in ((self_t0, self_t1), (kids_t0, kids_t1))
                                     for f in ("ru_utime", "ru_stime"))
    wall = t1 - t0
    result["server_cpu_cores"] = round((server1 - server0) / wall, 2)
    result["other_processes_cpu_cores"] = round(max(0.0, (busy1 - busy0) - ours) / wall, 2)
    return result


def status_bench(port: int, connections: int, seconds: float, server_pid: int) -> dict:
    load(port, "/status", connections, 2)  # warm-up
    return measured(lambda: load(port, "/status", connections, seconds), server_pid)


def configure_bench(runtime_dir: str, port: int, connections: int, seconds: float, server_pid: int) -> dict:
    driver = HoldingDriver(runtime_dir, hold=seconds + 2)
    driver.start()
    result: dict = {}

    def configure() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        t0 = time.monotonic()
        conn.request("POST", "/configure", json.dumps({"spec": minimal_spec()}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        result.update(status=resp.status, body=resp.read().decode(), seconds=time.monotonic() - t0)

    t = threading.Thread(target=configure)
    t.start()
    if not driver.pending_seen.wait(10):
        raise RuntimeError("/configure never reached configuration_pending")
    during = measured(lambda: load(port, "/status", connections, seconds), server_pid)
    still_blocked = t.is_alive()
    t.join(60)
    driver.stop.set()
    during.update(configure_status=result.get("status"), configure_blocked_throughout=still_blocked,
                  configure_seconds=round(result.get("seconds", 0), 2))
    return during


def monitor_bench(runtime_dir: str, cluster, seconds: float) -> dict:
    env = dict(os.environ, COMPUTE_RUNTIME_DIR=runtime_dir, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "compute.programs.monitor"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with psycopg.connect(cluster.conninfo(user="bench_user")) as user:
            user.execute("SELECT 1")  # idle in transaction: the monitor writes last_active every tick
            time.sleep(2)  # start-up (imports) is not steady state
            c0, t0 = cpu_seconds(proc.pid), time.monotonic()
            store = StateStore(state_path(runtime_dir))
            first = store.get("last_active")
            time.sleep(seconds)
            c1, t1 = cpu_seconds(proc.pid), time.monotonic()
            lag = time.time() - store.get("last_active")
            advanced = store.get("last_active") > (first or 0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    return {"cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 3), "cpu_seconds": round(c1 - c0, 3),
            "wall_seconds": round(t1 - t0, 1), "last_active_lag_s": round(lag, 3),
            "last_active_advanced": advanced}


# -- main -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10, help="duration of each load run")
    ap.add_argument("--monitor-seconds", type=float, default=30)
    ap.add_argument("--workers", help="COMPUTE_API_WORKERS for gunicorn (default: gunicorn_conf's)")
    ap.add_argument("--threads", help="COMPUTE_API_THREADS for gunicorn (default: gunicorn_conf's)")
    ap.add_argument("--fast-path", choices=("on", "off"),
                    help="COMPUTE_API_FAST_PATH: answer /status & co on the worker's poller (default: on)")
    ap.add_argument("--switch-interval", help="COMPUTE_API_SWITCH_INTERVAL (seconds) for the API worker")
    ap.add_argument("--skip-monitor", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = ap.parse_args(argv)

    extra_env = {}
    if args.workers:
        extra_env["COMPUTE_API_WORKERS"] = args.workers
    if args.threads:
        extra_env["COMPUTE_API_THREADS"] = args.threads
    if args.fast_path:
        extra_env["COMPUTE_API_FAST_PATH"] = "1" if args.fast_path == "on" else "0"
    if args.switch_interval:
        extra_env["COMPUTE_API_SWITCH_INTERVAL"] = args.switch_interval

    runtime_dir = tempfile.mkdtemp(prefix="cs-bench-", dir="/tmp")
    figures: dict = {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()[0],
                     "load_generator": "wrk" if shutil.which("wrk") else "python"}
    try:
        with running_cluster() as cluster:
            with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
                conn.execute("CREATE ROLE bench_user LOGIN")
            port = free_port()
            launch = launch_settings(runtime_dir, connstr=cluster.url(), http_port=port, monitor_interval=0.5)
            make_state(runtime_dir, status="running", launch=launch, last_active=time.time())
            with gunicorn(runtime_dir, extra_env) as server:
                figures["status"] = status_bench(port, args.connections, args.seconds, server.pid)
                figures["status_during_configure"] = configure_bench(runtime_dir, port, args.connections,
                                                                     args.seconds, server.pid)
            if not args.skip_monitor:
                figures["monitor"] = monitor_bench(runtime_dir, cluster, args.monitor_seconds)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
    figures["loadavg_after"] = os.getloadavg()[0]

    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    s, d = figures["status"], figures["status_during_configure"]
    print(f"load generator: {figures['load_generator']}, {args.connections} connections, {args.seconds:.0f} s runs, "
          f"{figures['cpus']} CPUs, load average {figures['loadavg_before']:.2f} before / "
          f"{figures['loadavg_after']:.2f} after")
    rows = [
        ("GET /status req/s", f"{s['rps']:.0f}", f">= {GOALS['rps']}", s["rps"] >= GOALS["rps"]),
        ("GET /status p50", f"{s['p50_ms']:.2f} ms", "", True),
        ("GET /status p99", f"{s['p99_ms']:.2f} ms", f"<= {GOALS['p99_ms']} ms", s["p99_ms"] <= GOALS["p99_ms"]),
        ("GET /status req/s during /configure", f"{d['rps']:.0f}", "", True),
        ("GET /status p99 during /configure", f"{d['p99_ms']:.2f} ms", f"<= {GOALS['p99_configure_ms']} ms",
         d["p99_ms"] <= GOALS["p99_configure_ms"]),
        ("/configure answer", f"{d['configure_status']} after {d['configure_seconds']} s "
                              f"(blocked throughout: {d['configure_blocked_throughout']})", "200",
         d["configure_status"] == 200),
    ]
    if "monitor" in figures:
        m = figures["monitor"]
        rows.append(("monitor CPU", f"{m['cpu_pct']:.3f} % ({m['cpu_seconds']} s over {m['wall_seconds']} s, "
                                    f"last_active lag {m['last_active_lag_s']} s)",
                     f"< {GOALS['monitor_cpu_pct']} %", m["cpu_pct"] < GOALS["monitor_cpu_pct"]))
    width = max(len(r[0]) for r in rows)
    for name, value, goal, ok in rows:
        print(f"  {name:<{width}}  {value:<40} {goal:<12} {'ok' if ok else 'MISSED'}")
    print(f"  CPU taken by other processes during the /status runs: {s['other_processes_cpu_cores']} and "
          f"{d['other_processes_cpu_cores']} cores (server: {s['server_cpu_cores']} and {d['server_cpu_cores']})")
    errors = s["non_2xx"] + d["non_2xx"]
    if errors:
        print(f"  non-2xx answers under load: {errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
