"""Where an api worker's poller spends its time under load: `python -m bench.api_probe`.

Runs real gunicorn (the tree's config) with ProbeWorker, a HeadFirstThreadWorker that records,
for every turn of its loop: the time in select() (waiting, plus taking the GIL back), the time
spent dispatching the ready events (wall and this thread's CPU), how many events were ready,
and the thread's run-queue delay (/proc/thread-self/schedstat: time runnable but not running,
i.e. preempted by another process). Loads it with wrk (64 keep-alive connections, GET /status),
optionally while a POST /configure is held in flight, and prints distributions:

  - events per turn: how many sockets are served one after another before the next select();
  - dispatch wall vs CPU per turn: wall above CPU is time off-CPU inside the turn (waiting for
    the GIL held by a pool thread, or preempted);
  - run-queue delay per turn: the preempted part;
  - the turns longer than --stall-ms, with their breakdown;
  - server_delay_ms: per request, from the kernel's receive timestamp of its bytes
    (SO_TIMESTAMPNS) to its answer being sent: the server's share of wrk's latency;
  - threads_*: CPU and run-queue seconds of every thread of wrk, ksoftirqd and python during
    each load (who took the CPU, who waited for it).
--env NAME=VALUE passes settings to gunicorn (PROBE_YIELD_EVERY=N: sched_yield() every N
events, an experiment); PROBE_WRK_SCRIPT=FILE.lua runs wrk with that script.

Not a goal figure (the probe costs a few us per turn); it explains bench.api's figures.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import shutil
import socket
import struct
import statistics
import sys
import tempfile
import threading
import time

from compute.api.worker import HeadFirstThreadWorker

_OUT = "COMPUTE_API_PROBE_OUT"


def _schedstat(fd: int) -> tuple[int, int]:
    on_cpu, waiting, _slices = os.pread(fd, 128, 0).split()
    return int(on_cpu), int(waiting)


_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


class ProbeWorker(HeadFirstThreadWorker):
    """Also: the server-side delay of every inline request (pool requests are not counted), from the moment its bytes reached
    the socket (the kernel's receive timestamp, SO_TIMESTAMPNS) to the moment its answer was
    sent: what the load generator's latency is, minus the network and the generator itself."""

    def _read_head(self, conn):
        if getattr(conn, "probe_arrival", None) is None:
            try:
                if not getattr(conn, "probe_stamping", False):
                    conn.sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
                    conn.probe_stamping = True
                _, anc, _, _ = conn.sock.recvmsg(1, 64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                for level, kind, data in anc:
                    if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", data[:16])
                        conn.probe_arrival = sec + nsec / 1e9
            except OSError:
                pass
        return HeadFirstThreadWorker._read_head(conn)

    def _send_inline(self, conn, data, keepalive):
        arrival = getattr(conn, "probe_arrival", None)
        if arrival is not None:
            self._probe["delay"].append(time.time() - arrival)
            conn.probe_arrival = None
        return super()._send_inline(conn, data, keepalive)

    def handle_request(self, req, conn):
        conn.probe_arrival = None  # a pool request (a /configure held for seconds): not counted
        return super().handle_request(req, conn)

    def run(self):
        self._probe = {k: array.array("d") for k in
                       ("t", "select", "dispatch", "cpu", "events", "rq", "oncpu", "delay")}
        self._yield_every = int(os.environ.get("PROBE_YIELD_EVERY", "0"))
        self._probe_fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        try:
            super().run()
        finally:
            path = os.environ.get(_OUT)
            if path:
                with open(f"{path}.{os.getpid()}", "w") as f:
                    json.dump({k: list(v) for k, v in self._probe.items()}, f)

    def wait_for_and_dispatch_events(self, timeout):
        p, fd = self._probe, self._probe_fd
        t0 = time.perf_counter()
        events = self.poller.select(timeout)
        t1 = time.perf_counter()
        c1 = time.thread_time()
        on1, rq1 = _schedstat(fd)
        every = self._yield_every
        for i, (key, _) in enumerate(events, 1):
            key.data(key.fileobj)
            if every and i % every == 0:
                os.sched_yield()
        t2 = time.perf_counter()
        c2 = time.thread_time()
        on2, rq2 = _schedstat(fd)
        p["t"].append(t0)
        p["select"].append(t1 - t0)
        p["dispatch"].append(t2 - t1)
        p["cpu"].append(c2 - c1)
        p["events"].append(len(events))
        p["rq"].append((rq2 - rq1) / 1e9)
        p["oncpu"].append((on2 - on1) / 1e9)


class Sampler(threading.Thread):
    """Every `period` s: on-CPU and run-queue time of every thread of the processes whose
    name is in `names` (wrk, ksoftirqd/N, the gunicorn processes): who took the CPU, and who
    waited for it, during the load."""

    def __init__(self, names=("wrk", "ksoftirqd/0", "ksoftirqd/1", "python"), period=0.1):
        super().__init__(daemon=True)
        self.names, self.period = names, period
        self.stop = threading.Event()
        self.last: dict = {}
        self.totals: dict = {}   # name -> [cpu s, runqueue s, worst runqueue s per period]

    def sample(self):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/comm") as f:
                        comm = f.read().strip()
                    if not any(comm.startswith(n) for n in self.names):
                        continue
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        on, rq, _ = (int(x) for x in f.read().split())
                    prev = self.last.get(tid)
                    self.last[tid] = (on, rq)
                    if prev is None:
                        continue
                    key = "wrk" if comm == "wrk" else comm if comm.startswith("ksoftirq") else f"python[{pid}]"
                    t = self.totals.setdefault(key, [0.0, 0.0, 0.0])
                    t[0] += (on - prev[0]) / 1e9
                    t[1] += (rq - prev[1]) / 1e9
                    t[2] = max(t[2], (rq - prev[1]) / 1e9)
            except OSError:
                continue

    def run(self):
        while not self.stop.wait(self.period):
            self.sample()


def _pct(values, q):
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def summarize(data: dict, stall_ms: float) -> dict:
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    n = len(data["t"])
    busy = [d for d, e in zip(data["dispatch"], data["events"]) if e]
    out = {"turns": n,
           "events_per_turn": {q: _pct(data["events"], q) for q in (50, 90, 99, 100)},
           "events_mean": statistics.fmean(data["events"]) if n else 0,
           "dispatch_ms": {q: round(_pct(ms(busy), q), 3) for q in (50, 90, 99, 100)},
           "select_ms": {q: round(_pct(ms(data["select"]), q), 3) for q in (50, 90, 99, 100)},
           "per_event_cpu_us": round(1e6 * sum(data["cpu"]) / max(1, sum(data["events"])), 1),
           "off_cpu_in_dispatch_ms_total": round(1000 * sum(max(0, d - c) for d, c in zip(data["dispatch"], data["cpu"])), 1),
           "runqueue_ms_total": round(1000 * sum(data["rq"]), 1),
           "server_delay_ms": {q: round(_pct(ms(data["delay"]), q), 2) for q in (50, 90, 99, 99.9, 100)},
           "server_delay_n": len(data["delay"])}
    stalls = []
    for i in range(n):
        total = data["select"][i] + data["dispatch"][i]
        if data["events"][i] and data["dispatch"][i] * 1000 > stall_ms:
            stalls.append({"at_s": round(data["t"][i] - data["t"][0], 3), "events": int(data["events"][i]),
                           "dispatch_ms": round(1000 * data["dispatch"][i], 2),
                           "cpu_ms": round(1000 * data["cpu"][i], 2), "runqueue_ms": round(1000 * data["rq"][i], 2),
                           "select_before_ms": round(1000 * data["select"][i], 2), "turn_ms": round(1000 * total, 2)})
    out["stalls"] = stalls[:40]
    out["stall_count"] = len(stalls)
    return out


def main(argv=None) -> int:
    from bench.api import HoldingDriver, gunicorn
    import bench.api as bapi
    from tests.support.api_helpers import launch_settings, make_state, minimal_spec
    from tests.support.pgcluster import free_port
    import http.client

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1")
    ap.add_argument("--threads", default=None)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--configure", action="store_true", help="then the same load while a POST /configure is held in flight")
    ap.add_argument("--stall-ms", type=float, default=15)
    ap.add_argument("--wrk-threads", type=int, default=2)
    ap.add_argument("--wrk-cpus", help="run wrk under taskset -c CPUS (e.g. 1)")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for gunicorn")
    args = ap.parse_args(argv)

    runtime_dir = tempfile.mkdtemp(prefix="cs-probe-", dir="/tmp")
    try:
        port = free_port()
        make_state(runtime_dir, status="running", launch=launch_settings(runtime_dir, http_port=port),
                   last_active=time.time())
        env = {"COMPUTE_API_WORKERS": args.workers, _OUT: os.path.join(runtime_dir, "probe")}
        if args.threads:
            env["COMPUTE_API_THREADS"] = args.threads
        env.update(dict(kv.split("=", 1) for kv in args.env))
        def load(port, path, connections, seconds):
            url = f"http://127.0.0.1:{port}{path}"
            if not args.wrk_cpus and not os.environ.get("PROBE_WRK_SCRIPT"):
                return bapi.wrk(url, connections, seconds, threads=args.wrk_threads)
            real_run = bapi.subprocess.run
            pin = ["taskset", "-c", args.wrk_cpus] if args.wrk_cpus else []
            script = ["-s", os.environ["PROBE_WRK_SCRIPT"]] if os.environ.get("PROBE_WRK_SCRIPT") else []
            bapi.subprocess.run = lambda cmd, **kw: real_run([*pin, *cmd[:-1], *script, cmd[-1]], **kw)
            try:
                return bapi.wrk(url, connections, seconds, threads=args.wrk_threads)
            finally:
                bapi.subprocess.run = real_run
        argv0 = list(bapi.GUNICORN_ARGV)
        bapi.GUNICORN_ARGV = argv0[:-1] + ["-k", "bench.api_probe.ProbeWorker", argv0[-1]]
        try:
            with gunicorn(runtime_dir, env):
                load(port, "/status", args.connections, 2)  # warm-up
                sampler = Sampler()
                sampler.sample()
                sampler.start()
                result = {"load": load(port, "/status", args.connections, args.seconds)}
                result["threads_status"] = {k: [round(x, 3) for x in v] for k, v in sampler.totals.items()}
                sampler.totals = {}
                if args.configure:
                    driver = HoldingDriver(runtime_dir, hold=args.seconds + 2)
                    driver.start()

                    def configure():
                        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                        c.request("POST", "/configure", json.dumps({"spec": minimal_spec()}),
                                  {"Content-Type": "application/json"})
                        r = c.getresponse()
                        result["configure"] = r.status
                        r.read()
                    t = threading.Thread(target=configure)
                    t.start()
                    driver.pending_seen.wait(10)
                    result["load_during_configure"] = load(port, "/status", args.connections, args.seconds)
                    result["threads_configure"] = {k: [round(x, 3) for x in v] for k, v in sampler.totals.items()}
                    t.join(60)
                    driver.stop.set()
        finally:
            bapi.GUNICORN_ARGV = argv0
        for name in sorted(os.listdir(runtime_dir)):
            if name.startswith("probe."):
                with open(os.path.join(runtime_dir, name)) as f:
                    data = json.load(f)
                result[name] = summarize(data, args.stall_ms)
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
