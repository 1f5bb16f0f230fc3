"""Memory footprint of the tree, and the idle monitor's CPU, on a booted compute.

    python -m bench.footprint [--settle 3] [--monitor-seconds 30] [--json]

Boots the whole tree (tests.support.tree.Compute: compute-ctl -> supervisord -> programs, the
embedded default, real PG15), waits for `running`, lets it settle, then sums the PSS
(/proc/<pid>/smaps_rollup: shared pages divided among the processes sharing them) of every
process under compute-ctl that is not postgres: compute-ctl, supervisord, lifecycle, monitor,
the gunicorn master and workers (exitwatch and logrelay run inside supervisord). Processes are found by walking the
process tree under compute-ctl's pid (/proc/*/stat ppid). Postgres' own PSS is shown apart.
Then it samples the monitor's utime+stime (/proc/<pid>/stat) over --monitor-seconds of the idle
compute. Needs root (the tree runs as the postgres user) and the installed tree.
Goal: <= 64 MiB PSS for the non-postgres processes (issue 10); monitor < 1% CPU.
"""

from __future__ import annotations

import argparse
import json
import time

from tests.support.fault_tree import cpu_seconds, pss_kib, rss_kib, tree
from tests.support.tree import Compute

GOAL_PSS_MIB = 64  # issue 10
GOAL_MONITOR_CPU_PCT = 1.0


def measure(settle: float = 3.0, monitor_seconds: float = 30.0) -> dict:
    c = Compute()
    c.spec = c.new_spec()
    with c:
        t0 = time.monotonic()
        c.wait_status("running", timeout=120)
        boot_s = time.monotonic() - t0
        time.sleep(settle)  # gunicorn workers booted, first monitor ticks done
        procs, postgres_kib, postgres_n = [], 0, 0
        for role, p in tree(c.proc.pid):
            pss = pss_kib(p.pid)
            if pss is None:
                continue
            if role == "postgres":
                postgres_kib += pss
                postgres_n += 1
                continue
            procs.append({"role": role, "pid": p.pid, "pss_kib": pss, "rss_kib": rss_kib(p.pid) or 0})
        out = {
            "boot_to_running_s": round(boot_s, 2),
            "processes": procs,
            "total_pss_mib": round(sum(p["pss_kib"] for p in procs) / 1024, 1),
            "total_rss_mib": round(sum(p["rss_kib"] for p in procs) / 1024, 1),
            "postgres_pss_mib": round(postgres_kib / 1024, 1),
            "postgres_processes": postgres_n,
        }
        monitor = next((p["pid"] for p in procs if p["role"] == "monitor"), None)
        if monitor_seconds > 0 and monitor is not None:
            c0, t = cpu_seconds(monitor), time.monotonic()
            time.sleep(monitor_seconds)
            c1, dt = cpu_seconds(monitor), time.monotonic() - t
            out["monitor_cpu"] = {"pct": round(100 * (c1 - c0) / dt, 3), "cpu_s": round(c1 - c0, 3),
                                  "wall_s": round(dt, 1), "interval_s": 0.5}
    return out


def print_report(r: dict) -> None:
    print(f"footprint of a booted tree (running after {r['boot_to_running_s']} s), PSS from smaps_rollup:")
    print(f"  {'process':<14}{'pid':>8}{'PSS MiB':>10}{'RSS MiB':>10}")
    for p in sorted(r["processes"], key=lambda p: -p["pss_kib"]):
        print(f"  {p['role']:<14}{p['pid']:>8}{p['pss_kib'] / 1024:>10.1f}{p['rss_kib'] / 1024:>10.1f}")
    ok = "ok" if r["total_pss_mib"] <= GOAL_PSS_MIB else "MISSED"
    print(f"  {'total':<14}{len(r['processes']):>8}{r['total_pss_mib']:>10.1f}{r['total_rss_mib']:>10.1f}"
          f"   goal <= {GOAL_PSS_MIB} MiB PSS: {ok}")
    print(f"  (postgres, not counted: {r['postgres_processes']} processes, {r['postgres_pss_mib']} MiB PSS)")
    m = r.get("monitor_cpu")
    if m:
        ok = "ok" if m["pct"] < GOAL_MONITOR_CPU_PCT else "MISSED"
        print(f"monitor CPU, idle compute: {m['pct']:.3f} % ({m['cpu_s']} s over {m['wall_s']} s, "
              f"0.5 s interval)   goal < {GOAL_MONITOR_CPU_PCT} %: {ok}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between running and measuring")
    ap.add_argument("--monitor-seconds", type=float, default=30.0, help="0 to skip the monitor CPU sample")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = measure(args.settle, args.monitor_seconds)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_report(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
