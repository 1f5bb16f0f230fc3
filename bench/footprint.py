"""Memory footprint of the tree, and the idle monitor's CPU, on a booted compute.

    python -m bench.footprint [--settle 3] [--monitor-seconds 30] [--after-load 10]
                              [--api-workers N] [--runs N] [--json]

Boots the whole tree (tests.support.tree.Compute: compute-ctl -> supervisord -> programs, the
embedded default, real PG15), waits for `running`, lets it settle, then sums the PSS
(/proc/<pid>/smaps_rollup: shared pages divided among the processes sharing them) of every
process under compute-ctl that is not postgres: compute-ctl, supervisord, lifecycle, monitor,
the gunicorn master and workers (exitwatch and logrelay run inside supervisord). Processes are found by walking the
process tree under compute-ctl's pid (/proc/*/stat ppid). Postgres' own PSS is shown apart.
Per process it also shows the private part (Private_Clean + Private_Dirty: pages no other
process maps, i.e. what that process alone costs) and its thread count.
Then it samples the monitor's utime+stime (/proc/<pid>/stat) over --monitor-seconds of the idle
compute. With --after-load S it then loads the API (GET /status, 64 keep-alive connections, S
seconds, wrk if installed) and measures the same tree again after --settle seconds of idle: the
figure of a compute in production, whose API threads (16 per worker), their SQLite connections
and malloc arenas exist by then. --api-workers sets COMPUTE_API_WORKERS for the tree; --runs
boots that many trees in a row and reports medians and ranges.
Needs root (the tree runs as the postgres user) and the installed tree.
Goal: <= 64 MiB PSS for the non-postgres processes (issue 10); monitor < 1% CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from tests.support.fault_tree import cpu_seconds, pss_kib, rss_kib, tree
from tests.support.tree import Compute

GOAL_PSS_MIB = 64  # issue 10
GOAL_MONITOR_CPU_PCT = 1.0
LOAD_CONNECTIONS = 64


def private_kib(pid: int) -> int | None:
    """Private_Clean + Private_Dirty from /proc/<pid>/smaps_rollup (kB), None if gone."""
    total, seen = 0, False
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
                    seen = True
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return total if seen else None


def threads(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Threads:")), 0)
    except (FileNotFoundError, ProcessLookupError):
        return 0


def snapshot(compute_pid: int) -> dict:
    """PSS, private and threads of every process of the tree (postgres summed apart)."""
    procs, postgres_kib, postgres_n = [], 0, 0
    for role, p in tree(compute_pid):
        pss = pss_kib(p.pid)
        if pss is None:
            continue
        if role == "postgres":
            postgres_kib += pss
            postgres_n += 1
            continue
        procs.append({"role": role, "pid": p.pid, "pss_kib": pss, "private_kib": private_kib(p.pid) or 0,
                      "rss_kib": rss_kib(p.pid) or 0, "threads": threads(p.pid)})
    return {
        "processes": procs,
        "total_pss_mib": round(sum(p["pss_kib"] for p in procs) / 1024, 1),
        "total_private_mib": round(sum(p["private_kib"] for p in procs) / 1024, 1),
        "total_rss_mib": round(sum(p["rss_kib"] for p in procs) / 1024, 1),
        "postgres_pss_mib": round(postgres_kib / 1024, 1),
        "postgres_processes": postgres_n,
    }


def load_api(port: int, seconds: float) -> dict:
    from bench.api import load  # wrk when installed, else a Python load generator
    return load(port, "/status", LOAD_CONNECTIONS, seconds)


def measure(settle: float = 3.0, monitor_seconds: float = 30.0, after_load: float = 0.0,
            api_workers: int | None = None) -> dict:
    env = {"COMPUTE_API_WORKERS": str(api_workers)} if api_workers else {}
    c = Compute(env=env)
    c.spec = c.new_spec()
    with c:
        t0 = time.monotonic()
        c.wait_status("running", timeout=120)
        boot_s = time.monotonic() - t0
        time.sleep(settle)  # gunicorn workers booted, first monitor ticks done
        out = {"boot_to_running_s": round(boot_s, 2), "api_workers": api_workers, **snapshot(c.proc.pid)}
        monitor = next((p["pid"] for p in out["processes"] if p["role"] == "monitor"), None)
        if monitor_seconds > 0 and monitor is not None:
            c0, t = cpu_seconds(monitor), time.monotonic()
            time.sleep(monitor_seconds)
            c1, dt = cpu_seconds(monitor), time.monotonic() - t
            out["monitor_cpu"] = {"pct": round(100 * (c1 - c0) / dt, 3), "cpu_s": round(c1 - c0, 3),
                                  "wall_s": round(dt, 1), "interval_s": 0.5}
        if after_load > 0:
            result = load_api(c.http_port, after_load)
            time.sleep(settle)  # idle again: what stays is what a loaded compute keeps
            out["after_load"] = {"load_seconds": after_load, "connections": LOAD_CONNECTIONS,
                                 "rps": result.get("rps"), **snapshot(c.proc.pid)}
    return out


def _table(s: dict, indent: str = "  ") -> None:
    print(f"{indent}{'process':<14}{'pid':>8}{'thr':>5}{'PSS MiB':>10}{'Private':>10}{'RSS MiB':>10}")
    for p in sorted(s["processes"], key=lambda p: -p["pss_kib"]):
        print(f"{indent}{p['role']:<14}{p['pid']:>8}{p.get('threads', 0):>5}{p['pss_kib'] / 1024:>10.1f}"
              f"{p.get('private_kib', 0) / 1024:>10.1f}{p['rss_kib'] / 1024:>10.1f}")
    ok = "ok" if s["total_pss_mib"] <= GOAL_PSS_MIB else "MISSED"
    print(f"{indent}{'total':<14}{len(s['processes']):>8}{'':>5}{s['total_pss_mib']:>10.1f}"
          f"{s.get('total_private_mib', 0):>10.1f}{s['total_rss_mib']:>10.1f}   goal <= {GOAL_PSS_MIB} MiB PSS: {ok}")


def print_report(r: dict) -> None:
    workers = f", {r['api_workers']} api workers" if r.get("api_workers") else ""
    print(f"footprint of a booted tree (running after {r['boot_to_running_s']} s{workers}), "
          "PSS and private from smaps_rollup:")
    _table(r)
    print(f"  (postgres, not counted: {r['postgres_processes']} processes, {r['postgres_pss_mib']} MiB PSS)")
    m = r.get("monitor_cpu")
    if m:
        ok = "ok" if m["pct"] < GOAL_MONITOR_CPU_PCT else "MISSED"
        print(f"monitor CPU, idle compute: {m['pct']:.3f} % ({m['cpu_s']} s over {m['wall_s']} s, "
              f"0.5 s interval)   goal < {GOAL_MONITOR_CPU_PCT} %: {ok}")
    a = r.get("after_load")
    if a:
        rps = f", {a['rps']:.0f} req/s" if a.get("rps") else ""
        print(f"after {a['load_seconds']:g} s of GET /status at {a['connections']} connections{rps}, then idle:")
        _table(a)


def summary(runs: list[dict]) -> dict:
    """Median and range of the totals over several runs."""
    def stat(values: list[float]) -> dict:
        return {"median": round(statistics.median(values), 1), "min": min(values), "max": max(values)}
    out = {"runs": len(runs), "idle_pss_mib": stat([r["total_pss_mib"] for r in runs]),
           "idle_private_mib": stat([r["total_private_mib"] for r in runs])}
    loaded = [r["after_load"] for r in runs if "after_load" in r]
    if loaded:
        out["after_load_pss_mib"] = stat([a["total_pss_mib"] for a in loaded])
        out["after_load_private_mib"] = stat([a["total_private_mib"] for a in loaded])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between running (or the load) and measuring")
    ap.add_argument("--monitor-seconds", type=float, default=30.0, help="0 to skip the monitor CPU sample")
    ap.add_argument("--after-load", type=float, default=0.0, metavar="SECONDS",
                    help="then load the API that long and measure again (0: idle from boot only)")
    ap.add_argument("--api-workers", type=int, default=None, help="COMPUTE_API_WORKERS (default: gunicorn_conf's)")
    ap.add_argument("--runs", type=int, default=1, help="trees booted and measured in a row")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    runs = [measure(args.settle, args.monitor_seconds, args.after_load, args.api_workers) for _ in range(args.runs)]
    if args.json:
        print(json.dumps(runs[0] if args.runs == 1 else {"runs": runs, "summary": summary(runs)}, indent=2))
        return 0
    for r in runs:
        print_report(r)
    if args.runs > 1:
        s = summary(runs)
        line = (f"over {s['runs']} runs: idle PSS median {s['idle_pss_mib']['median']} MiB "
                f"[{s['idle_pss_mib']['min']}-{s['idle_pss_mib']['max']}], private {s['idle_private_mib']['median']}")
        if "after_load_pss_mib" in s:
            a = s["after_load_pss_mib"]
            line += f"; after load PSS median {a['median']} MiB [{a['min']}-{a['max']}]"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
