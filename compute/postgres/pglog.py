"""postgres' own sentences, from its log (supervisord writes postgres' stderr to
compute.shared.log_paths.postgres_log_path: RUNTIME_DIR/logs/postgres.log).

A failed start or a rejected reload is explained by postgres only there. The driver notes the
log's size before it acts (`size`), reads what came after (`read_since`), and these pure
functions pick the lines that say why: `failure_summary` for a start (FATAL/PANIC with their
DETAIL/HINT, and the LOG lines that explain a configuration file's errors or a socket that could
not be bound), `reasons` for the settings a reload rejected.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MAX_READ = 256 * 1024      # bytes of the log read after the offset (the tail beyond is dropped)
MAX_SUMMARY = 2000         # characters of a summary (it goes into /status)
MAX_ENTRIES = 12

# "<prefix>SEVERITY:  message" (postgres writes two spaces); the prefix is log_line_prefix, any.
_ENTRY = re.compile(r"(?:^|[\s\]>])(DEBUG[1-5]?|INFO|NOTICE|WARNING|ERROR|LOG|FATAL|PANIC|DETAIL|HINT|"
                    r"CONTEXT|STATEMENT|QUERY|LOCATION):  (.*)$")
FAILURES = ("FATAL", "PANIC")
ATTACHED = ("DETAIL", "HINT")
# LOG/WARNING lines that say why a start failed (the FATAL after them only says that it did).
_EXPLAINS = re.compile(r"configuration (?:parameter|file)|for parameter|parameter \"|syntax error|could not bind|"
                       r"could not create|could not open|could not load|Address already in use|is a lower setting",
                       re.IGNORECASE)
_SUMMARY_LINE = re.compile(r"^configuration file \".*\" contains errors")


@dataclass(frozen=True)
class Entry:
    severity: str
    message: str


def size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def read_since(path: str, offset: int) -> str:
    """The log after `offset` (from the start if the file is shorter: rotated), at most MAX_READ
    bytes (the latest ones)."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            start = offset if offset <= end else 0
            start = max(start, end - MAX_READ)
            f.seek(start)
            return f.read(end - start).decode("utf-8", "replace")
    except OSError:
        return ""


def entries(text: str) -> list[Entry]:
    found = []
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            found.append(Entry(m.group(1), m.group(2).strip()))
    return found


def has_failure(text: str) -> bool:
    return any(e.severity in FAILURES for e in entries(text))


def failure_summary(text: str) -> str | None:
    """postgres' own account of a failed start: its FATAL/PANIC lines with their DETAIL and HINT,
    after the LOG/WARNING lines that explain them; None if the text has no FATAL or PANIC."""
    es = entries(text)
    if not any(e.severity in FAILURES for e in es):
        return None
    kept: list[Entry] = []
    keep_attached = False
    for e in es:
        if e.severity in ATTACHED:
            if keep_attached:
                kept.append(e)
            continue
        keep_attached = e.severity in FAILURES or (e.severity in ("LOG", "WARNING", "ERROR")
                                                    and bool(_EXPLAINS.search(e.message)))
        if keep_attached and not (e.severity in FAILURES and _seen(kept, e)):
            kept.append(e)
    return _join(kept)


def _seen(kept: list[Entry], e: Entry) -> bool:
    return any(k.severity == e.severity and k.message == e.message for k in kept)


def _join(kept: list[Entry]) -> str:
    text = " / ".join(f"{e.severity}: {e.message}" for e in kept[:MAX_ENTRIES])
    if len(kept) > MAX_ENTRIES:
        text += f" / ({len(kept) - MAX_ENTRIES} more lines in the postgres log)"
    return text if len(text) <= MAX_SUMMARY else text[:MAX_SUMMARY] + "..."


def reasons(text: str, names) -> dict[str, str]:
    """For each setting name (matched without regard to case): postgres' sentence about it in
    `text`, with the DETAIL/HINT that follows (the first one found)."""
    wanted = {n.lower(): re.compile(r"\"" + re.escape(n) + r"\"", re.IGNORECASE) for n in names if n}
    found: dict[str, str] = {}
    es = entries(text)
    for i, e in enumerate(es):
        if e.severity in ATTACHED or _SUMMARY_LINE.match(e.message):
            continue
        for key, pattern in wanted.items():
            if key in found or not pattern.search(e.message):
                continue
            extra = []
            for x in es[i + 1:]:
                if x.severity not in ATTACHED:
                    break
                extra.append(x.message)
            sentence = e.message + "".join(f" ({x})" for x in extra)
            found[key] = sentence if len(sentence) <= MAX_SUMMARY else sentence[:MAX_SUMMARY] + "..."
    return found
