"""supervisord eventlistener: relays PROCESS_LOG events, one formatted line each, into the
FIFO that compute-ctl copies to its stdout (listeners cannot reach that stdout directly)."""

from __future__ import annotations

import os

from .listener import events
from .procutil import die_with_parent
from .logs import format_line
from .settings import default, load as load_settings
from .state import StateStore, state_path

FIFO_NAME = "logs.fifo"


def main() -> None:
    die_with_parent()
    runtime_dir = os.environ["COMPUTE_RUNTIME_DIR"]
    found = load_settings(StateStore(state_path(runtime_dir)))
    fmt = found.log_format if found else default("log_format")
    # O_RDWR: opening never blocks, and writes never fail while compute-ctl restarts reading.
    out = os.open(os.path.join(runtime_dir, FIFO_NAME), os.O_RDWR)
    partial: dict[tuple[str, str], bytes] = {}  # a chunk may end mid-line
    for headers, pheaders, body in events():
        if not headers["eventname"].startswith("PROCESS_LOG"):
            continue
        key = (pheaders["processname"], pheaders.get("channel", "stdout"))
        *lines, rest = (partial.pop(key, b"") + body).split(b"\n")
        if rest:
            partial[key] = rest
        text = "".join(format_line(key[0], ln.decode("utf-8", "replace"), fmt) + "\n" for ln in lines if ln)
        if text:
            os.write(out, text.encode("utf-8"))


if __name__ == "__main__":
    main()
