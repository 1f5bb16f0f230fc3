"""A state-file writer for tests/fault/test_fault_state.py, killed with SIGKILL mid-write.

    python -m tests.support.fault_writer STATE_DB NAME FIRST

Loops over StateStore.set / transition / record_metrics / advance_last_active with a counter
starting at FIRST, and after each call returns (the transaction is committed) writes one line
`<key> <n>` to stdout: an acknowledged write. Before each call it writes `> <op>`, so the
last line a killed writer left shows whether the kill landed inside a write. Values grow with the counter, so after any crash
the state file must hold, for each key, the last acknowledged value or a newer one. SIGTERM
ends it cleanly (exit 0) after the current write.
"""

from __future__ import annotations

import os
import signal
import sys

from compute.shared.state import StateStore


def main() -> int:
    path, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = StateStore(path)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    pad = "x" * 3000  # rows spanning pages, so a torn write would show
    while not stop:
        n += 1
        op = n % 4
        key = ("set", "tr", "m", "last_active")[op]
        os.write(1, f"> {key}\n".encode())  # a write starts: a kill from here on is mid-write
        if op == 0:
            store.set(**{f"{name}_set": n, f"{name}_blob": {"n": n, "pad": pad[: n % 3000]}})
            key = f"{name}_set"
        elif op == 1:
            # compare-and-set along allowed moves only; the loser of a race still writes its key
            target, sources = ("running", {"init", "configuration"}) if n % 8 == 1 else ("configuration", {"running"})
            if not store.transition(sources, target, **{f"{name}_tr": n}):
                store.set(**{f"{name}_tr": n})
            key = f"{name}_tr"
        elif op == 2:
            store.record_metrics(**{f"{name}_m": n})
            key = f"metrics.{name}_m"
        else:
            # last_active is shared by every writer: only ever moves forward
            store.advance_last_active(float(n))
            key = "last_active"
        os.write(1, f"{key} {n}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
