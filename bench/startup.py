"""Start-up time of the whole tree vs. the irreducible work done by hand, in the same run.

    python -m bench.startup [--runs 7] [--api-kills 5] [--json FILE]

Compute: `compute-ctl` on the Neon path (stand-in --sync-safekeepers, wire-protocol pageserver
peer serving a real PG15 basebackup tar), timed from exec to running (the driver's trace mark,
with /status asked every 100 ms as Neon's endpoint.rs asks it: run_compute), with the phases
it reports in /metrics.json.
Baseline, by hand with stock tools: the same stand-in sync, `psql -c "basebackup ..." | tar -x`
from the same pageserver peer (the stock pipeline a person would type), the same
postgresql.conf, `pg_ctl start -w`, and the same SQL through `psql -f`. Both sides' phases are
printed, so the gap per phase is visible.
The tree's own marks (COMPUTE_TRACE, compute/base/trace.py) are printed as a timeline since exec.
`python -m bench --only startup` runs `added_latency_pairs` (issue 22): interleaved pairs, who
goes first alternating, on the Neon path and on the embedded default (initdb + pg_ctl start -w
+ psql -f by hand): the added latency in ms with the by-hand time, and exec -> first storage
request from the trace, with the import floor under it (FLOOR_LEVELS, Neon pairs).
Then the api: kill -9 of its gunicorn master, and of a worker, at random moments; per kill, ms
to the first 200 on /status and to a 200 once the api is whole again (--api-kills N, 0: skip).
Needs the installed tree (scripts/install.sh) and root (it runs postgres as the postgres user).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time

from tests.peers.pageserver import PageserverPeer
from tests.peers.sync_safekeepers import write_fake_postgres
from tests.support.pgcluster import PGBIN_DIR, run_as_pg, scratch_dir
from tests.support.tree import VENV, Compute, with_neon_storage
from tests.support.waiting import status_answers, wait_for

TENANT, TIMELINE = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9"
TOKEN = "bench-token"
PHASES = ("wait_for_spec_ms", "sync_safekeepers_ms", "basebackup_ms", "start_postgres_ms", "config_ms")

BASELINE_SQL = """\
CREATE ROLE app LOGIN PASSWORD 'md5240aeccb7a1d859a99844d012bfe74cc';
GRANT pg_read_all_data, pg_write_all_data TO app;
CREATE DATABASE appdb OWNER app;
GRANT CREATE ON DATABASE appdb TO app;
\\c appdb
ALTER SCHEMA public OWNER TO app;
"""


def spec_for(c: Compute, ps: PageserverPeer) -> dict:
    return with_neon_storage(c.new_spec(), ps.connstr, TENANT, TIMELINE, "127.0.0.1:5454", TOKEN)


def timeline(trace_file: str, t0: float) -> list[tuple[float, str]]:
    """The tree's marks (compute/base/trace.py) as ms since exec, first of each event only."""
    from compute.base.trace import read
    seen, out = set(), []
    for t, _pid, event in read(trace_file):
        if event not in seen:
            seen.add(event)
            out.append(((t - t0) * 1000, event))
    return out


# The tree's first storage request (compute/base/trace.py marks): the sync started, initdb
# started, or a basebackup's connection asked for. Before those marks existed: the driver's
# prepare_data step, which starts with that request.
STORAGE_MARK = "lifecycle: storage request"
STORAGE_MARK_FALLBACK = "lifecycle: prepare_data"


def first_storage_ms(marks: list[tuple[float, str]]) -> float | None:
    """ms since exec of the first storage request in a run's timeline."""
    for prefix in (STORAGE_MARK, STORAGE_MARK_FALLBACK):
        found = [ms for ms, event in marks if event.startswith(prefix)]
        if found:
            return min(found)
    return None


# /status is asked as Neon's local client asks it (control_plane/src/endpoint.rs, start():
# ATTEMPT_INTERVAL, 100 ms), once it has answered a first time: asked every 2 ms instead, the
# requests themselves cost the start-up ~35 ms (2026-12-07, 7 interleaved pairs: `lifecycle:
# running` at 685 vs 650 ms after exec, medians). Until that first answer it is asked every
# 2 ms (the first-/status figure needs the precision; nothing answers yet, a refused connect
# costs nothing). `running` is timed by the driver's trace mark, the moment the state file
# says so, from which on /status answers it: what a client asking then would see.
FIRST_ANSWER_POLL_S = 0.002
CLIENT_POLL_S = 0.1
RUNNING_MARK = "lifecycle: running"


def run_compute(tar: str | None, jwks: tuple | None = None, sync_delay_ms: int = 0) -> dict[str, float]:
    """One start, exec -> running (RUNNING_MARK; /status asked as a client asks it, above):
    the Neon path with `tar` served by a pageserver peer, or the embedded default (initdb) when
    `tar` is None. `jwks`: (JWKS, token): the compute gets --jwks and every /status carries the
    token, as Neon's control plane polls it (the early responder answers it once compute-ctl
    has checked the JWKS, with the api's decision). `sync_delay_ms`: the stand-in sync waits that long (FAKE_SK_DELAY_MS)."""
    with (PageserverPeer(tar, password=TOKEN) if tar else contextlib.nullcontext()) as ps:
        c = Compute()
        c.pgbin = write_fake_postgres(c.base) if tar else c.pgbin
        c.spec = spec_for(c, ps) if tar else c.new_spec()
        if jwks:
            c.use_jwks(*jwks)
        trace_file = os.path.join(c.base, "trace")
        os.close(os.open(trace_file, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(trace_file, 0o666)  # the tree appends to it as the compute user
        c.env["COMPUTE_TRACE"] = trace_file
        if sync_delay_ms:
            c.env["FAKE_SK_DELAY_MS"] = str(sync_delay_ms)
        t0 = time.monotonic()
        c.start()
        first_status = None
        try:
            while True:
                st = c.status()
                if st and first_status is None:
                    first_status = (time.monotonic() - t0) * 1000  # the API answers
                if st and st["status"] == "running":
                    break
                if st and st["status"] == "failed" or c.proc.poll() is not None:
                    raise RuntimeError(f"compute failed: {st}\n{c.output()[-3000:]}")
                time.sleep(CLIENT_POLL_S if first_status is not None else FIRST_ANSWER_POLL_S)
            seen = (time.monotonic() - t0) * 1000
            marks = timeline(trace_file, t0)
            running = [ms for ms, event in marks if event == RUNNING_MARK]
            # (min: the mark is written just after the state file says running)
            wall = min(running[0], seen) if running else seen
            metrics = json.loads(c.request("GET", "/metrics.json")[1])
            t1 = time.monotonic()
            c.signal()
            c.wait_exit(30)
            stop = (time.monotonic() - t1) * 1000
        finally:
            c.close()
    out = {k: float(metrics.get(k, 0)) for k in PHASES}
    out.update(total_startup_ms=float(metrics["total_startup_ms"]), wall_to_running_ms=wall, stop_ms=stop,
               first_status_ms=first_status or wall)
    out["seen_running_ms"] = seen
    out["timeline"] = marks + [(first_status or wall, "bench: first /status 200"), (seen, "bench: /status running")]
    out["first_storage_ms"] = first_storage_ms(marks)
    return out


def start_and_configure(base: str, pgdata: str, port: int) -> tuple[float, float]:
    """The by-hand tail of both baselines: `pg_ctl start -w`, then the compute's SQL through
    `psql -f`; returns (start s, SQL s)."""
    with open(os.path.join(base, "setup.sql"), "w") as f:
        f.write(BASELINE_SQL)
    t = time.monotonic()
    run_as_pg([f"{PGBIN_DIR}/pg_ctl", "-D", pgdata, "-w", "-l", os.path.join(base, "log"), "start"])
    start = time.monotonic() - t
    t = time.monotonic()
    run_as_pg(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port),
               "-U", "cloud_admin", "-d", "postgres", "-f", os.path.join(base, "setup.sql")])
    return start, time.monotonic() - t


def run_baseline_embedded(settings_text: str) -> dict[str, float]:
    """The embedded default by hand with the stock tools: initdb (the compute's flags, a
    password file), the same postgresql.conf, `pg_ctl start -w`, the same SQL through `psql -f`."""
    base = scratch_dir("cs-bench-emb-")
    pgdata = os.path.join(base, "pgdata")
    port = json.loads(settings_text)["port"]
    try:
        with open(os.path.join(base, "postgresql.conf"), "w") as f:
            f.write(json.loads(settings_text)["conf"])
        with open(os.path.join(base, "pw"), "w") as f:
            f.write("bench-password\n")
        t0 = time.monotonic()
        run_as_pg([f"{PGBIN_DIR}/initdb", "-D", pgdata, "-U", "cloud_admin", "--auth=trust", "--no-sync",
                   "-E", "UTF8", "--locale=C.UTF-8", f"--pwfile={os.path.join(base, 'pw')}"])
        initdb = time.monotonic() - t0
        run_as_pg(["sh", "-c", 'cat "$1" >> "$2"', "-", os.path.join(base, "postgresql.conf"),
                   os.path.join(pgdata, "postgresql.conf")])
        start, sql = start_and_configure(base, pgdata, port)
        total = time.monotonic() - t0
        run_as_pg([f"{PGBIN_DIR}/pg_ctl", "-D", pgdata, "-m", "fast", "stop"], check=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {"initdb_ms": initdb * 1000, "start_postgres_ms": start * 1000, "config_ms": sql * 1000,
            "total_startup_ms": total * 1000, "wall_to_running_ms": total * 1000}


def baseline_settings(spec, port: int) -> str:
    """The compute's own postgresql.conf settings for a by-hand run on `port`."""
    from compute.postgres.conf import render_postgresql_conf
    settings = [o if o.name != "port" else type(o)("port", str(port), "integer") for o in spec.cluster.settings
                if o.name != "unix_socket_directories"]
    conf = render_postgresql_conf(settings) + "unix_socket_directories = '/tmp'\n"
    return json.dumps({"port": port, "conf": conf})


# The floor under exec -> first storage request (issue 22's goal: <= 60 ms), in three fresh
# interpreters of the tree's own venv, each timed as the tree's marks are: from just before the
# exec to the moment its imports are done (CLOCK_MONOTONIC, printed by the child), not to its exit:
#   interpreter: nothing imported (the venv's site and .pth files run, as for compute-ctl);
#   stdlib:      the standard library that compute-ctl's checks and its first request need, whatever
#                our code does: argparse (the flags), json (the spec), re (the spec's patterns, and
#                argparse's), dataclasses + typing (the typed spec model, compute/model/), socket
#                (the API socket, bound before anything is touched), ipaddress (--http-address),
#                ctypes (the subreaper's prctl), subprocess (the sync or initdb);
#   ours:        those plus our modules that run before the driver's request (compute-ctl's, the
#                spec model's, the early driver's), imports only: no flag is read, no byte validated.
# tests/integration/test_import_floor.py checks that our modules do import that stdlib.
FLOOR_STDLIB = ("argparse", "json", "re", "dataclasses", "typing", "socket", "ipaddress", "ctypes", "subprocess")
FLOOR_OURS = ("compute.boot.cli", "compute.model.spec", "compute.model.compute_config", "compute.boot.users",
              "compute.tree.supervisord_conf", "compute.tree.early_driver", "compute.lifecycle.early",
              "compute.storage.safekeepers", "compute.storage.initdb")
FLOOR_LEVELS = {"interpreter": (), "stdlib": FLOOR_STDLIB, "ours": FLOOR_STDLIB + FLOOR_OURS}


def import_floor(python: str) -> dict[str, float]:
    """ms from exec to the end of each FLOOR_LEVELS level's imports (above), once each."""
    out = {}
    for level, modules in FLOOR_LEVELS.items():
        code = "".join(f"import {m}\n" for m in modules) + "import time\nprint(time.monotonic())"
        t = time.monotonic()
        done = float(subprocess.run([python, "-c", code], cwd="/", check=True, capture_output=True,
                                    text=True).stdout)
        out[level] = (done - t) * 1000
    return out


def added_latency_pairs(pairs: int, tar: str | None, fake_pg: str | None, jwks: bool = False,
                        sync_delay_ms: int = 0, floor: bool = False) -> dict:
    """Interleaved pairs (compute-ctl, the same work by hand), who goes first alternating, so
    both sides of a pair see the same machine weather. Added latency = exec -> running (run_compute)
    minus the by-hand total, per pair; its median and spread, with the by-hand time itself.
    `jwks`: the compute has a JWKS and /status is asked with a token (run_compute).
    `sync_delay_ms`: both sides' stand-in sync waits that long, idle, as the round trips to
    remote safekeepers would: what the tree's work beside the sync hides in production.
    `floor`: each pair also times the import floor (import_floor) right before its compute run."""
    keys = None
    if jwks:
        from tests.support.api_helpers import jwks_keys, token_for
        ed, _, document = jwks_keys()
        keys = (document, token_for(ed))  # an admin token: these push-mode computes have no compute id
    from compute.model.spec import parse_spec
    probe = Compute()
    spec = parse_spec(probe.new_spec())
    probe.close()
    added, hand, ours, storage, runs, base_runs = [], [], [], [], [], []
    floors: dict[str, list[float]] = {level: [] for level in FLOOR_LEVELS}
    python = os.path.join(VENV, "bin", "python")
    for i in range(pairs):
        port = 20000 + os.getpid() % 10000 + i
        settings = baseline_settings(spec, port)
        if tar:
            by_hand = lambda: run_baseline(tar, settings, fake_pg, sync_delay_ms)
        else:
            by_hand = lambda: run_baseline_embedded(settings)
        if i % 2 == 0:
            f = import_floor(python) if floor else {}
            c = run_compute(tar, keys, sync_delay_ms)
            b = by_hand()
        else:
            b = by_hand()
            f = import_floor(python) if floor else {}
            c = run_compute(tar, keys, sync_delay_ms)
        for level, ms in f.items():
            floors[level].append(ms)
        runs.append(c)
        base_runs.append(b)
        ours.append(c["wall_to_running_ms"])
        hand.append(b["total_startup_ms"])
        added.append(c["wall_to_running_ms"] - b["total_startup_ms"])
        if c.get("first_storage_ms") is not None:
            storage.append(c["first_storage_ms"])

    def summary(xs):
        return {"median": round(statistics.median(xs), 1), "min": round(min(xs), 1), "max": round(max(xs), 1),
                "all": [round(x) for x in xs]} if xs else None
    return {"pairs": pairs, "added_ms": summary(added), "by_hand_ms": summary(hand), "ours_ms": summary(ours),
            "first_storage_ms": summary(storage), "runs": runs, "baseline_runs": base_runs,
            **({"floor_ms": {level: summary(ms) for level, ms in floors.items()}} if floor else {})}


def timeline_summary(runs: list[dict]) -> list[tuple[float, float, float, str]]:
    """Each event's (median, min, max) ms since exec over `runs`, in time order."""
    times: dict[str, list[float]] = {}
    for r in runs:
        for ms, event in r.get("timeline", []):
            times.setdefault(event, []).append(ms)
    return [(round(statistics.median(ts), 1), round(min(ts), 1), round(max(ts), 1), event)
            for event, ts in sorted(times.items(), key=lambda kv: statistics.median(kv[1]))]


def run_baseline(tar: str, settings_text: str, fake_pg: str, sync_delay_ms: int = 0) -> dict[str, float]:
    with PageserverPeer(tar, password=TOKEN) as ps:
        return _run_baseline(ps, settings_text, fake_pg, sync_delay_ms)


def _run_baseline(ps: PageserverPeer, settings_text: str, fake_pg: str, sync_delay_ms: int = 0) -> dict[str, float]:
    base = scratch_dir("cs-bench-base-")
    pgdata = os.path.join(base, "pgdata")
    port = json.loads(settings_text)["port"]
    try:
        t0 = time.monotonic()
        run_as_pg(["mkdir", "-m", "700", pgdata])
        with open(os.path.join(base, "postgresql.conf"), "w") as f:
            f.write(json.loads(settings_text)["conf"])
        run_as_pg(["cp", os.path.join(base, "postgresql.conf"), pgdata])
        t = time.monotonic()
        run_as_pg([fake_pg, "--sync-safekeepers"], env={**os.environ, "PGDATA": pgdata,
                                                        **({"FAKE_SK_DELAY_MS": str(sync_delay_ms)} if sync_delay_ms else {})})
        sync = time.monotonic() - t
        t = time.monotonic()
        # The stock pipeline: psql writes the COPY OUT stream to stdout, tar extracts it.
        run_as_pg(["sh", "-c", 'psql -X -q -d "$PS" -c "basebackup $TENANT $TIMELINE" | tar -xf - -C "$PGDATA"'],
                  env={**os.environ, "PS": ps.connstr, "PGPASSWORD": TOKEN, "PGDATA": pgdata,
                       "TENANT": TENANT, "TIMELINE": TIMELINE})
        extract = time.monotonic() - t
        start, sql = start_and_configure(base, pgdata, port)
        total = time.monotonic() - t0
        run_as_pg([f"{PGBIN_DIR}/pg_ctl", "-D", pgdata, "-m", "fast", "stop"], check=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {"sync_safekeepers_ms": sync * 1000, "basebackup_ms": extract * 1000, "start_postgres_ms": start * 1000,
            "config_ms": sql * 1000, "wait_for_spec_ms": 0.0, "total_startup_ms": total * 1000,
            "wall_to_running_ms": total * 1000, "stop_ms": 0.0}


def main(argv: list[str] | None = None) -> int:
    """The same figures as `python -m bench --only startup` (bench/__main__.py's run_startup and
    table), with the counts given here."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="interleaved pairs per path (default 7)")
    ap.add_argument("--api-kills", type=int, default=5, help="kill -9 of the api's master (and of a worker), each; 0: none")
    ap.add_argument("--json", metavar="FILE", help="also write every raw figure to FILE")
    args = ap.parse_args(argv)
    from bench.__main__ import finish, machine, run_startup
    results: dict = {"machine": machine(), "quick": False}
    t0 = time.monotonic()
    results["startup"] = run_startup(False, runs=args.runs, kills=args.api_kills)
    finish(results, t0, args.json)
    return 0


# -- kill -9 of the api -> /status served again ---------------------------------------------------

def run_api_kills(kills: int = 6) -> dict[str, list[float]]:
    """Boot a tree (embedded default), then kill -9 the api's gunicorn master and one of its
    workers, alternately. Per kill, ms from the kill to: the first 200 on /status to a fresh
    connection made after the kill (`first_200`), and a 200 once the program is whole again
    (a new master with its workers, or the replacement worker: `whole`). Then `kills` x kill -9
    of the monitor and of the lifecycle driver: ms until supervisord has it RUNNING with a new
    pid (`<program>_running_ms`; issue 6's goal: 2 s)."""
    from compute.shared.supervisor_rpc import rpc
    from tests.support.fault_tree import program_child, supervisord_pid, tree
    out: dict[str, list[float]] = {"master_first_200_ms": [], "master_whole_ms": [],
                                   "worker_first_200_ms": [], "worker_whole_ms": [],
                                   "monitor_running_ms": [], "lifecycle_running_ms": []}
    import random
    rng = random.Random(kills)
    c = Compute()
    c.spec = c.new_spec()
    with c:
        c.wait_status("running")
        c.wait_handed_over()  # kill the serving driver, not the one handing over
        sup = supervisord_pid(c.runtime_dir)

        def workers_of(master):
            return {p.pid for _, p in tree(c.proc.pid) if p.ppid == master}

        for i in range(2 * kills):
            what = ("master", "worker")[i % 2]
            master = wait_for(lambda: (m := program_child(sup, "api")) and workers_of(m) and m, 10,
                              "the api and its workers", period=0.002)
            old_workers = workers_of(master)
            wait_for(lambda: status_answers(c.http_port), 10, "/status", period=0.002)
            time.sleep(rng.uniform(0, 0.4))  # sometimes just booted, sometimes idle in their pollers
            victim = master if what == "master" else min(old_workers)
            t0 = time.monotonic()
            os.kill(victim, 9)
            wait_for(lambda: status_answers(c.http_port), 10, "the first 200 after the kill", period=0.002)
            out[f"{what}_first_200_ms"].append((time.monotonic() - t0) * 1000)
            if what == "master":
                whole = lambda: ((m := program_child(sup, "api")) and m != master and workers_of(m)
                                 and status_answers(c.http_port))
            else:
                whole = lambda: len(workers_of(master) - old_workers) >= 1 and status_answers(c.http_port)
            wait_for(whole, 10, f"the api whole again after kill -9 of its {what}", period=0.002)
            out[f"{what}_whole_ms"].append((time.monotonic() - t0) * 1000)
        control = rpc(c.runtime_dir)
        for i in range(2 * kills):
            program = ("monitor", "lifecycle")[i % 2]
            old = wait_for(lambda: control.supervisor.getProcessInfo(program)["statename"] == "RUNNING"
                           and program_child(sup, program), 10, f"{program} running")
            time.sleep(rng.uniform(0, 0.4))
            t0 = time.monotonic()
            os.kill(old, 9)
            wait_for(lambda: (info := control.supervisor.getProcessInfo(program))["statename"] == "RUNNING"
                     and info["pid"] not in (0, old), 10, f"{program} RUNNING again", period=0.002)
            out[f"{program}_running_ms"].append((time.monotonic() - t0) * 1000)
    return out


def print_api_kills(r: dict[str, list[float]]) -> None:
    print("# kill -9 of the api -> /status 200 again; of the monitor / driver -> RUNNING again; ms: median (min-max)")
    for key, xs in r.items():
        print(f"  {key:<22}{statistics.median(xs):8.0f} ({min(xs):.0f}-{max(xs):.0f})")


if __name__ == "__main__":
    raise SystemExit(main())
