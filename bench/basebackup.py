"""Benchmark: compute.storage.basebackup() vs `psql -c "basebackup ..." | tar -x`, same pageserver peer.

    python -m bench.basebackup [--archives real,1024] [--pairs 5] [--breakdown] [--workdir /tmp]

Archives: `real` is a real PG15 data directory shaped like Neon's basebackup (~38 MiB, ~1,000
files; tests.peers.pageserver.make_basebackup_tar); a number N builds an N MiB archive shaped
like a data directory (small catalog files, a WAL segment, 1 GiB relation segments). Both
methods stream the same archive from tests.peers.pageserver over loopback, as interleaved
pairs (who goes first alternates), each into a fresh directory after `sync`.

- ours: a child process running basebackup() once. `in-process` is the time basebackup() takes
  (what the lifecycle program spends: its interpreter is up long before), `wall` adds the
  interpreter start and imports. Peak RSS is the child's ru_maxrss.
- stock: `psql -X -q CONNSTR -c "basebackup ..." | tar -x -C DEST` (psql writes COPY OUT data to
  stdout); wall time of the pipeline, peak RSS of its largest process.
The ratio is stock time / our time per pair (>1: we are faster); median and range over pairs.

--breakdown shows where our time goes on each archive, in this process: receiving the COPY
stream alone (libpq + psycopg + the peer, data discarded), extracting the archive from memory
alone (TarExtractor, no network), and GNU tar extracting the archive file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Iterator

from tests.peers.pageserver import PageserverPeer, make_basebackup_tar

MIB = 1 << 20
SEGMENT = 1024 * MIB  # postgres relation segment size
TENANT, TIMELINE = "1" * 32, "2" * 32
QUERY = f"basebackup {TENANT} {TIMELINE}"

# Runs argv as its child, then reports wall time, CPU time and the child's peak RSS (KiB on
# Linux): RUSAGE_CHILDREN of this helper covers exactly the measured process tree, not the helper.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
res = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE)
dt = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": res.returncode, "seconds": dt, "out": res.stdout.decode(),
                  "cpu": ru.ru_utime + ru.ru_stime, "maxrss_kib": ru.ru_maxrss}))
"""


class _Repeat:
    """A file-like of `size` bytes cycling one random block (generating 1 GiB of urandom is slow)."""

    def __init__(self, block: bytes, size: int) -> None:
        self.block, self.left, self.pos = block, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), len(self.block) - self.pos)
            out += self.block[self.pos:self.pos + take]
            self.pos = (self.pos + take) % len(self.block)
        self.left -= n
        return bytes(out)


def build_tar(path: str, size_mib: int) -> int:
    block = os.urandom(MIB)
    budget = size_mib * MIB

    def add(tar: tarfile.TarFile, name: str, size: int, mode: int = 0o600) -> None:
        nonlocal budget
        info = tarfile.TarInfo(name)
        if size < 0:
            info.type, info.mode = tarfile.DIRTYPE, 0o700
        else:
            info.size, info.mode = size, mode
            budget -= size
        info.mtime = int(time.time())
        tar.addfile(info, _Repeat(block, size) if size > 0 else None)

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.copybufsize = 4 * MIB
        for d in ("base", "base/1", "base/16384", "global", "pg_wal", "pg_xact", "pg_multixact",
                  "pg_multixact/members", "pg_multixact/offsets", "pg_notify", "pg_subtrans",
                  "pg_tblspc", "pg_twophase", "pg_logical", "pg_replslot", "pg_stat", "pg_snapshots"):
            add(tar, d, -1)
        add(tar, "PG_VERSION", 3)
        add(tar, "pg_hba.conf", 4 * 1024)
        add(tar, "pg_ident.conf", 1600)
        add(tar, "postgresql.auto.conf", 0)
        add(tar, "neon.signal", 15)
        add(tar, "global/pg_control", 8192)
        add(tar, "pg_xact/0000", 8192)
        add(tar, "pg_multixact/offsets/0000", 8192)
        add(tar, "pg_multixact/members/0000", 8192)
        for i in range(300):  # catalog-sized relations
            add(tar, f"base/1/{1200 + i}", 8192 * (1 + i % 16))
        add(tar, "pg_wal/000000010000000000000001", min(16 * MIB, max(budget, 0)))
        relfile, seg = 16385, 0
        while budget > 0:  # one big table, split in 1 GiB segments like postgres does
            size = min(SEGMENT, budget)
            add(tar, f"base/16384/{relfile}" + (f".{seg}" if seg else ""), size)
            seg += 1
    return os.path.getsize(path)


def make_archive(spec: str, workdir: str) -> str:
    """`real` or a size in MiB -> path of the archive."""
    path = os.path.join(workdir, f"archive-{spec}.tar")
    if spec == "real":
        make_basebackup_tar(path)
    else:
        build_tar(path, int(spec))
    return path


def _measure(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, *argv], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out)
    if result["rc"] != 0:
        raise SystemExit(f"{argv[:3]} failed with exit code {result['rc']}")
    return result


def _fresh(dirpath: str) -> str:
    shutil.rmtree(dirpath, ignore_errors=True)
    os.mkdir(dirpath, 0o700)
    os.sync()  # don't let the previous run's dirty pages throttle this one
    return dirpath


def client(connstr: str, dest: str, compression: str | None = None) -> None:
    """The measured child: only the basebackup (plus the imports it needs)."""
    import resource

    from compute.storage.basebackup import basebackup
    t = time.perf_counter()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    n = basebackup(connstr, TENANT, TIMELINE, "0/0", dest, None, compression=compression)
    ru2 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru2.ru_utime - ru.ru_utime + ru2.ru_stime - ru.ru_stime
    print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t, "cpu": cpu}))


def compare(archive: str, pairs: int, workdir: str) -> dict:
    """Interleaved pairs: ours (child process) vs psql | tar -x, same peer, same archive."""
    size = os.path.getsize(archive)
    with tarfile.open(archive) as tar:
        members = sum(1 for _ in tar)
    dest = os.path.join(workdir, "x")
    ours: list[dict] = []
    stock: list[dict] = []
    with PageserverPeer(archive, chunk_size=64 * 1024) as peer:
        cmds = {"ours": [sys.executable, "-m", "bench.basebackup", "--client", peer.connstr],
                "stock": ["sh", "-c", 'psql -X -q "$1" -c "$2" | tar -x -C "$3"', "sh", peer.connstr, QUERY]}
        for i in range(pairs):
            for kind in (("ours", "stock") if i % 2 == 0 else ("stock", "ours")):
                r = _measure([*cmds[kind], _fresh(dest)])
                if kind == "ours":
                    inner = json.loads(r["out"])
                    if inner["bytes"] != size:
                        raise RuntimeError("basebackup byte count mismatch")
                    ours.append({"wall": r["seconds"], "inproc": inner["seconds"], "rss": r["maxrss_kib"],
                                 "cpu": inner["cpu"]})
                else:
                    stock.append({"wall": r["seconds"], "rss": r["maxrss_kib"], "cpu": r["cpu"]})
    shutil.rmtree(dest, ignore_errors=True)
    idle = _measure([sys.executable, "-c", "import compute.storage.basebackup"])
    ratio = [s["wall"] / o["inproc"] for o, s in zip(ours, stock)]
    ratio_wall = [s["wall"] / o["wall"] for o, s in zip(ours, stock)]

    def med(xs):
        return round(statistics.median(xs), 3)
    return {
        "archive_mib": round(size / MIB), "members": members, "pairs": pairs,
        "ours_s": med(o["inproc"] for o in ours), "ours_wall_s": med(o["wall"] for o in ours),
        "stock_s": med(s["wall"] for s in stock),
        "ratio": round(statistics.median(ratio), 2), "ratio_range": [round(min(ratio), 2), round(max(ratio), 2)],
        "ratio_wall": round(statistics.median(ratio_wall), 2),
        "ratio_wall_range": [round(min(ratio_wall), 2), round(max(ratio_wall), 2)],
        "ours_cpu_s": med(o["cpu"] for o in ours), "stock_cpu_s": med(s["cpu"] for s in stock),
        "ours_all_s": [round(o["inproc"], 3) for o in ours], "stock_all_s": [round(s["wall"], 3) for s in stock],
        "ours_peak_rss_mib": round(max(o["rss"] for o in ours) / 1024, 1),
        "stock_peak_rss_mib": round(max(s["rss"] for s in stock) / 1024, 1),
        "interpreter_rss_mib": round(idle["maxrss_kib"] / 1024, 1), "interpreter_start_s": round(idle["seconds"], 3),
    }


@contextlib.contextmanager
def _peer_process(archive: str) -> Iterator[str]:
    """The pageserver peer as a separate process (as in compare(), where it is the parent)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tests.peers.pageserver", "--port", str(port),
                             "--tar", archive], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        yield f"postgresql://no_user@127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def breakdown(archive: str, workdir: str, runs: int = 5) -> dict:
    """Where our time goes, each part alone, in this process, the peer in another (medians of `runs`)."""
    import psycopg

    from compute.storage.basebackup import _copy_out, basebackup
    from compute.storage.tarextract import TarExtractor
    dest = os.path.join(workdir, "x")
    parts: dict[str, list[float]] = {"receive only": [], "extract from memory": [], "basebackup()": [],
                                     "tar -xf FILE": []}
    with open(archive, "rb") as f:
        data = f.read() if os.path.getsize(archive) <= 256 * MIB else None
    with _peer_process(archive) as connstr:  # not a thread of ours: it would take our GIL
        for _ in range(runs):
            t = time.perf_counter()
            with psycopg.connect(connstr, autocommit=True) as conn:
                _copy_out(conn.pgconn, QUERY, lambda _chunk: None, 60, None)
            parts["receive only"].append(time.perf_counter() - t)
            if data is not None:
                _fresh(dest)
                t = time.perf_counter()
                with TarExtractor(dest) as tx:
                    mv = memoryview(data)
                    for i in range(0, len(mv), 64 * 1024):
                        tx.feed(mv[i:i + 64 * 1024])
                    tx.finish()
                parts["extract from memory"].append(time.perf_counter() - t)
            _fresh(dest)
            t = time.perf_counter()
            basebackup(connstr, TENANT, TIMELINE, "0/0", dest, None)
            parts["basebackup()"].append(time.perf_counter() - t)
            _fresh(dest)
            t = time.perf_counter()
            subprocess.run(["tar", "-xf", archive, "-C", dest], check=True)
            parts["tar -xf FILE"].append(time.perf_counter() - t)
    shutil.rmtree(dest, ignore_errors=True)
    return {k: round(statistics.median(v), 3) for k, v in parts.items() if v}


def print_result(name: str, r: dict) -> None:
    print(f"\n{name}: {r['archive_mib']} MiB, {r['members']} members, {r['pairs']} interleaved pairs")
    print(f"  ours in-process  median {r['ours_s']:.3f} s   all {r['ours_all_s']}")
    print(f"  ours wall        median {r['ours_wall_s']:.3f} s   (+ interpreter start {r['interpreter_start_s']:.3f} s)")
    print(f"  psql | tar -x    median {r['stock_s']:.3f} s   all {r['stock_all_s']}")
    print(f"  ratio stock/ours in-process {r['ratio']:.2f}x (range {r['ratio_range'][0]}-{r['ratio_range'][1]}), "
          f"wall {r['ratio_wall']:.2f}x (range {r['ratio_wall_range'][0]}-{r['ratio_wall_range'][1]})")
    print(f"  CPU (user+sys) median: ours {r['ours_cpu_s']:.3f} s, psql + tar {r['stock_cpu_s']:.3f} s")
    print(f"  peak RSS: ours {r['ours_peak_rss_mib']} MiB (an interpreter importing compute.storage: "
          f"{r['interpreter_rss_mib']} MiB), psql|tar {r['stock_peak_rss_mib']} MiB")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="basebackup vs psql | tar -x: throughput and memory")
    ap.add_argument("--archives", default="real,1024", help="comma-separated: real and/or sizes in MiB")
    ap.add_argument("--pairs", type=int, default=5, help="interleaved pairs per archive")
    ap.add_argument("--breakdown", action="store_true", help="also show where our time goes")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--client", nargs=2, metavar=("CONNSTR", "DEST"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        return client(*args.client)
    work = tempfile.mkdtemp(prefix="bench-bb-", dir=args.workdir)
    results = {}
    try:
        for spec in args.archives.split(","):
            archive = make_archive(spec, work)
            r = results[spec] = compare(archive, args.pairs, work) if args.pairs > 0 else {}
            if r:
                print_result(spec, r)
            if args.breakdown:
                r["breakdown"] = breakdown(archive, work)
                print("  where the time goes (medians of 5, one process; the peer in another): " +
                      ", ".join(f"{k} {v:.3f} s" for k, v in r["breakdown"].items()))
            os.unlink(archive)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
