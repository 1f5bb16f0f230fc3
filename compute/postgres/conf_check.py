"""What postgres rejected of the configuration files we wrote, decided as data.

After a reload (compute/postgres/conf.py `reload_and_wait`), postgres has either applied a
setting, marked it for a restart, or rejected it, and says which only in its log. Its views say
it too: `pg_file_settings` re-reads the files and gives each line's error (`unrecognized
configuration parameter`, `setting could not be applied`, `syntax error`), and `pg_settings`
says which names exist and which wait for a restart. As Patroni does, every name we wrote is
also checked against `pg_settings` (names with a dot are extensions' placeholders: postgres
accepts any). `rejections` is the verdict (pure); `ask_postgres` reads the two views (thin).

A restart-only setting that changed is reported by `pg_file_settings` as `setting could not be
applied`, the same words as for a bad value; `pg_settings.pending_restart` tells them apart
(true only when the new value was valid). One removed from the file is reported as `parameter
"x" cannot be changed without restarting the server`: valid too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

RESTART_ONLY_ERROR = "setting could not be applied"
UNRECOGNIZED = "unrecognized configuration parameter"
# A restart-only setting removed from the file (a promoted replica's `hot_standby`): a row with
# no file or name, and this sentence. The removal is valid; it takes effect at the next start.
REMOVAL_NEEDS_RESTART = "cannot be changed without restarting the server"

FILE_SETTINGS_QUERY = ("SELECT sourcefile, sourceline, name, error FROM pg_catalog.pg_file_settings"
                       " WHERE error IS NOT NULL ORDER BY seqno")
SETTINGS_QUERY = "SELECT name, pending_restart FROM pg_catalog.pg_settings"


@dataclass(frozen=True)
class FileError:
    """A row of pg_file_settings with an error."""
    sourcefile: str | None
    sourceline: int | None
    name: str | None     # None for a line postgres could not parse
    error: str


@dataclass(frozen=True)
class Rejection:
    name: str | None     # the setting (None: a line of the file, e.g. a syntax error)
    reason: str          # postgres' words (pg_file_settings' error, or the log's sentence)
    line: int | None = None

    def what(self) -> str:
        if self.name:
            return f"setting {self.name!r}"
        return f"line {self.line} of postgresql.conf" if self.line else "postgresql.conf"


def rejections(file_errors: Iterable[FileError], settings: dict[str, bool],
               written: Iterable[str], *, before_reload: bool = False) -> tuple[Rejection, ...]:
    """What postgres rejected. `settings`: pg_settings' names (lower case) -> pending_restart;
    `written`: the names of the settings we wrote. Empty: postgres took everything (applied, or
    valid and waiting for a restart).

    `before_reload`: the file is written but postgres not told yet. Unknown names and syntax
    errors are certain then (and postgres would apply nothing of such a file), but `setting
    could not be applied` is not judged: only after the reload does pending_restart say whether
    it is a bad value or a valid restart-only change."""
    found: list[Rejection] = []
    named: set[str] = set()
    for e in file_errors:
        key = e.name.lower() if e.name else None
        if REMOVAL_NEEDS_RESTART in e.error:
            continue
        if e.error == RESTART_ONLY_ERROR and (before_reload or (key is not None and settings.get(key))):
            continue  # a valid value that takes effect at the next start (or not known yet)
        found.append(Rejection(e.name, e.error, e.sourceline))
        if key is not None:
            named.add(key)
    for name in written:
        key = name.lower()
        if "." not in key and key not in settings and key not in named:
            found.append(Rejection(name, UNRECOGNIZED))
            named.add(key)
    return tuple(found)


def describe(found: tuple[Rejection, ...], reasons: dict[str, str] | None = None) -> str:
    """One line for /configure's error and /status: each rejected setting with postgres' reason
    (`reasons`: the log's sentence for a name, better than the view's generic words)."""
    parts = []
    for r in found:
        reason = (reasons or {}).get((r.name or "").lower()) or r.reason
        parts.append(f"{r.what()}: {reason}")
    return "postgres rejected the new configuration (nothing was changed): " + "; ".join(parts)


def ask_postgres(conn: Any, written: Iterable[str] = ()) -> tuple[list[FileError], dict[str, bool]]:
    """The rows `rejections` decides from (a superuser session). A written name pg_settings
    does not list is asked for by name too: a few real settings are hidden from it (`seed`)."""
    errors = [FileError(f, line, name, err) for f, line, name, err in conn.execute(FILE_SETTINGS_QUERY)]
    settings = {name.lower(): bool(pending) for name, pending in conn.execute(SETTINGS_QUERY)}
    for name in written:
        key = name.lower()
        if "." not in key and key not in settings and \
                conn.execute("SELECT pg_catalog.current_setting(%s, true) IS NOT NULL", (name,)).fetchone()[0]:
            settings[key] = False
    return errors, settings
