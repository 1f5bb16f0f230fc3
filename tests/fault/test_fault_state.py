"""Fault injection on the shared state file: writers killed with SIGKILL in the middle of
StateStore writes while another writer keeps going. Afterwards the SQLite file must be intact
and no acknowledged (committed) write may be lost.

Runs as whoever runs the tests, on a temporary directory (no tree is booted); it is marked e2e
because it spawns processes and takes ~20 s.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

from compute.shared.state import StateStore
from tests.support.installed import REPO

KILLS = 50


class Writer:
    """One `tests.support.fault_writer` process and a thread collecting its acknowledgements."""

    def __init__(self, path: str, name: str, first: int, acks: dict, lock: threading.Lock):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.fault_writer", path, name, str(first)],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.acks, self.lock = acks, lock
        self.first_ack = threading.Event()
        self.count = 0
        self.last_line = ""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode().strip()
            self.last_line = line
            if line.startswith(">"):
                continue
            key, n = line.split()
            with self.lock:
                self.acks[key] = max(self.acks.get(key, 0), int(n))
            self.count += 1
            self.first_ack.set()

    def finish(self) -> tuple[int, bytes]:
        rc = self.proc.wait(20)
        self.thread.join(10)
        return rc, self.proc.stderr.read()


def value_of(snapshot: dict, key: str):
    if key.startswith("metrics."):
        return (snapshot.get("metrics") or {}).get(key.split(".", 1)[1])
    return snapshot.get(key)


def test_sigkill_mid_write_keeps_the_file_intact_and_loses_no_acknowledged_write(tmp_path):
    path = str(tmp_path / "state.db")
    StateStore.create(path, {"status": "init", "metrics": {}, "last_active": 0.0})
    acks: dict[str, int] = {}
    lock = threading.Lock()
    rng = random.Random(6)

    survivor = Writer(path, "b", 0, acks, lock)
    assert survivor.first_ack.wait(10), survivor.proc.stderr.read()
    mid_write, killed_acks, checks = 0, 0, 0
    t0 = time.monotonic()
    for i in range(KILLS):
        victim = Writer(path, "a", (i + 1) * 10_000_000, acks, lock)
        assert victim.first_ack.wait(10), f"writer {i} never wrote"
        time.sleep(rng.uniform(0.0, 0.08))
        victim.proc.send_signal(signal.SIGKILL)
        rc, err = victim.finish()
        assert rc == -signal.SIGKILL, (rc, err)
        mid_write += victim.last_line.startswith(">")
        killed_acks += victim.count
        if i % 10 == 9:  # the file is consistent while the survivor keeps writing, too
            assert StateStore(path).integrity_ok()
            checks += 1
    survivor.proc.send_signal(signal.SIGTERM)
    rc, err = survivor.finish()
    assert rc == 0, f"the surviving writer failed: {err.decode()[-2000:]}"
    elapsed = time.monotonic() - t0

    store = StateStore(path)
    assert store.integrity_ok()
    snap = store.snapshot()
    lost = {k: (n, value_of(snap, k)) for k, n in acks.items()
            if value_of(snap, k) is None or value_of(snap, k) < n}
    assert lost == {}, f"acknowledged writes lost (key: acknowledged, found): {lost}"
    assert snap["status"] in ("running", "configuration")
    # No lock was left behind by a killed writer: a new write goes through at once.
    t = time.monotonic()
    store.set(after="ok")
    assert time.monotonic() - t < 1 and store.get("after") == "ok"
    print(f"\n{KILLS} writers killed with SIGKILL ({mid_write} of them inside a write, between the "
          f"start of a StateStore call and its acknowledgement) in {elapsed:.1f} s; "
          f"{killed_acks} acknowledged writes by killed writers, {survivor.count} by the survivor; "
          f"{checks + 1} integrity checks ok; {len(acks)} keys checked, none lost")
    assert mid_write >= KILLS // 5, "too few kills landed inside a write for this test to mean much"
