"""Where each program's private anonymous memory comes from, on a booted idle tree.

    python -m bench.cow [--settle 5]

Every program is forked from compute-ctl's warm image, so each of its anonymous pages (the
[heap] and anonymous mappings) starts shared with compute-ctl. A page that is private now
(mapped by this process alone: /proc/kpagecount of its frame is 1) was copied by a write,
and its bytes tell which kind of write it was:

  =ctl          the same bytes as compute-ctl's page at the same address: written back to
                what it was (CPython's refcount up and down, a collector's scratch field),
                or written identically on both sides
  =other-child  the same bytes as another program's page there, not compute-ctl's: most often
                compute-ctl changed the page after forking both (its supervisord loop,
                logging, allocations), each child keeping its own copy of the old bytes
  unique        changed by this program (its own objects, quickened bytecode) or by
                compute-ctl after this program alone was forked (the lifecycle driver is
                forked at every hand-over)
  ctl-none      compute-ctl has nothing mapped there (this program's own mappings)

Figures are MiB per process. Needs root (/proc/<pid>/pagemap frame numbers,
/proc/kpagecount, /proc/<pid>/mem) and the installed tree. A look, not a benchmark: take
the shared lock (flock -s) like a test.
"""

from __future__ import annotations

import argparse
import collections
import struct
import time

from tests.support.fault_tree import tree
from tests.support.tree import Compute

PAGE = 4096
ANON = ("[heap]", "[anon]")
PRESENT = 1 << 63
PFN_MASK = (1 << 55) - 1


def classify(mine: bytes, ctl: bytes | None, others: list[bytes | None]) -> str:
    """The kind of write that made a private page (see the module docstring)."""
    if ctl is None:
        return "ctl-none"
    if mine == ctl:
        return "=ctl"
    if mine in others:
        return "=other-child"
    return "unique"


def anon_ranges(pid: int) -> list[tuple[int, int, str]]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            name = parts[5] if len(parts) > 5 else "[anon]"
            if name in ANON:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, name))
    return out


def present_frames(pid: int, start: int, end: int) -> dict[int, int]:
    """address -> page frame number, for the pages of [start, end) in memory."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        data = f.read((end - start) // PAGE * 8)
    frames = {}
    for i, (entry,) in enumerate(struct.iter_unpack("<Q", data)):
        if entry & PRESENT:
            frames[start + i * PAGE] = entry & PFN_MASK
    return frames


def page(pid: int, address: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.seek(address)
            return f.read(PAGE)
    except OSError:  # not mapped in that process
        return None


def origins(procs: list[tuple[str, int]]) -> dict[tuple[str, int], collections.Counter]:
    ctl = next(pid for role, pid in procs if role == "compute-ctl")
    result = {}
    with open("/proc/kpagecount", "rb") as counts:
        def mapped_once(frame: int) -> bool:
            counts.seek(frame * 8)
            return struct.unpack("<Q", counts.read(8))[0] == 1

        for role, pid in procs:
            tally: collections.Counter = collections.Counter()
            for start, end, name in anon_ranges(pid):
                for address, frame in present_frames(pid, start, end).items():
                    if not mapped_once(frame):
                        tally["shared"] += 1
                    elif pid == ctl:
                        tally[f"{name} private"] += 1
                    else:
                        others = [page(other, address) for _, other in procs if other not in (pid, ctl)]
                        tally[f"{name} {classify(page(pid, address), page(ctl, address), others)}"] += 1
            result[(role, pid)] = tally
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settle", type=float, default=5.0, help="seconds of idle after the hand-over")
    args = ap.parse_args()
    compute = Compute(env={})
    compute.model.spec = compute.new_spec()
    with compute:
        compute.wait_status("running", timeout=120)
        compute.wait_handed_over()
        time.sleep(args.settle)
        procs = [(role, p.pid) for role, p in tree(compute.proc.pid) if role != "postgres"]
        for (role, pid), tally in origins(procs).items():
            figures = "  ".join(f"{k} {v * PAGE / 2**20:.2f}" for k, v in sorted(tally.items()))
            print(f"{role:12} {pid:>7}  {figures}", flush=True)


if __name__ == "__main__":
    main()
