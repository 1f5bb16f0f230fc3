"""Benchmark: compute.storage.basebackup() from the pageserver peer vs `cat tar | tar -x`.

    python -m bench.basebackup [--size-mib 1024] [--repeat 2] [--workdir /tmp]

Builds a tar shaped like a data directory (small catalog files, a WAL segment, 1 GiB relation
segments) padded with random-ish data, serves it with tests.peers.pageserver over loopback and
measures wall time and peak RSS of a child process doing only the basebackup; the baseline is
GNU tar extracting the same bytes from a pipe. Memory must not grow with the archive size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from tests.peers.pageserver import PageserverPeer

MIB = 1 << 20
SEGMENT = 1024 * MIB  # postgres relation segment size
TENANT, TIMELINE = "1" * 32, "2" * 32

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


def client(connstr: str, dest: str) -> None:
    """The measured child: only the basebackup (plus the imports it needs)."""
    from compute.storage import basebackup
    n = basebackup(connstr, TENANT, TIMELINE, "0/0", dest, None)
    print(n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="basebackup throughput and memory benchmark")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2, help="runs per method; the best is shown")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--client", nargs=2, metavar=("CONNSTR", "DEST"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        return client(*args.client)

    work = tempfile.mkdtemp(prefix="bench-bb-", dir=args.workdir)
    try:
        tar_path = os.path.join(work, "basebackup.tar")
        t = time.perf_counter()
        size = build_tar(tar_path, args.size_mib)
        print(f"archive: {size / MIB:.0f} MiB built in {time.perf_counter() - t:.1f}s", flush=True)
        dest = os.path.join(work, "x")
        idle = _measure([sys.executable, "-c", "import compute.storage"])
        ours, base = [], []
        with PageserverPeer(tar_path, chunk_size=64 * 1024) as peer:
            for i in range(args.repeat):
                runs = [("ours", [sys.executable, "-m", "bench.basebackup", "--client", peer.connstr]),
                        ("base", ["sh", "-c", 'cat "$1" | tar -x -C "$2"', "sh", tar_path])]
                for kind, cmd in runs[::1 if i % 2 == 0 else -1]:  # alternate who goes first
                    r = _measure([*cmd, _fresh(dest)])
                    if kind == "ours":
                        assert int(r["out"]) == size, "byte count mismatch"
                    (ours if kind == "ours" else base).append(r)
        mibs = size / MIB
        print(f"\nbasebackup benchmark: {mibs:.0f} MiB archive in {args.workdir}, best of {args.repeat}")
        print(f"{'method':<34}{'wall s':>8}{'MiB/s':>8}{'CPU s':>8}{'peak RSS MiB':>14}  all wall s")
        rows = (("basebackup() via pageserver peer", ours), ("cat | tar -x (baseline)", base),
                ("python + import compute.storage", [idle]))
        best = {}
        for name, runs in rows:
            r = best[name] = min(runs, key=lambda x: x["seconds"])
            rate = f"{mibs / r['seconds']:>8.0f}" if runs is not rows[2][1] else f"{'':>8}"
            print(f"{name:<34}{r['seconds']:>8.2f}{rate}{min(x['cpu'] for x in runs):>8.2f}"
                  f"{max(x['maxrss_kib'] for x in runs) / 1024:>14.1f}  "
                  + " ".join(f"{x['seconds']:.2f}" for x in runs))
        ratio = best[rows[1][0]]["seconds"] / best[rows[0][0]]["seconds"]
        print(f"throughput ratio ours/baseline (wall, ours incl. {idle['seconds']:.2f}s interpreter "
              f"start-up): {ratio:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
