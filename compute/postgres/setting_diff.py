"""What a spec's settings would change in a running postgres, as data (`compute-ctl plan`).

As Patroni compares its configuration with `pg_settings`: each value written to
postgresql.conf is compared with the running value in the setting's own unit (`128MB` with
`shared_buffers` = 16384 of unit `8kB` is no change), booleans and enums by meaning, strings
exactly; a setting postgres does not know is reported as such (postgres would reject it). A
setting of `context` `postmaster` takes effect only at a restart (a compute never restarts in
place: at its next start); the others at the reload a reconfiguration does. A setting that our
postgresql.conf sets today and the spec no longer names goes back to its default (names with a
dot excepted: extensions' settings, and the neon.* lines written from the spec's storage fields).

Pure: `setting_changes` gets pg_settings' rows (SETTINGS_QUERY) and returns what differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from compute.model.spec import GenericOption

# current_setting() is how SHOW prints it (with its unit: `128MB`), for display only.
SETTINGS_QUERY = ("SELECT name, setting, unit, vartype, context, current_setting(name) AS shown, "
                  "boot_val, sourcefile, pending_restart FROM pg_catalog.pg_settings")
RESTART_CONTEXTS = frozenset({"postmaster"})
# Values that can hold a password: never shown.
SECRET_SETTINGS = frozenset({"primary_conninfo"})
REDACTED = "[redacted]"

_MEMORY = {"B": 1, "kB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}
_TIME = {"us": 1, "ms": 1000, "s": 1000 ** 2, "min": 60 * 1000 ** 2, "h": 3600 * 1000 ** 2, "d": 86400 * 1000 ** 2}


@dataclass(frozen=True)
class Running:
    """One row of pg_settings (SETTINGS_QUERY)."""
    name: str
    setting: str | None
    unit: str | None
    vartype: str
    context: str
    shown: str | None
    boot_val: str | None = None
    sourcefile: str | None = None
    pending_restart: bool = False


@dataclass(frozen=True)
class SettingChange:
    name: str
    running: str | None  # as SHOW prints it; None: postgres does not know the setting
    wanted: str | None  # as the spec gives it (removed: the default postgres goes back to)
    needs_restart: bool
    unknown: bool = False
    removed: bool = False  # in postgresql.conf today, no longer in the spec

    def line(self) -> str:
        if self.unknown:
            return f"{self.name}: unknown to this postgres (it would refuse {self.wanted!r})"
        wanted = f"its default {self.wanted!r}" if self.removed else repr(self.wanted)
        how = ("needs a restart (context postmaster): applied at the compute's next start"
               if self.needs_restart else "applied by the reload")
        return f"{self.name}: {self.running!r} -> {wanted}; {how}"


def _unit(unit: str | None) -> tuple[dict[str, int], int] | None:
    """pg_settings' unit (`8kB`, `ms`, `s`...) -> (its unit table, its size in the base unit)."""
    if not unit:
        return None
    digits = "".join(ch for ch in unit if ch.isdigit())
    name = unit[len(digits):]
    for table in (_MEMORY, _TIME):
        if name in table:
            return table, int(digits or 1) * table[name]
    return None


def _number(value: str, unit: str | None) -> float | None:
    """A spec value in the setting's unit, as postgres parses it (`128MB`, `10s`, `16384`)."""
    text = value.strip()
    found = _unit(unit)
    if found is not None:
        table, size = found
        for name in sorted(table, key=len, reverse=True):
            if text.endswith(name) and text[:-len(name)].strip():
                try:
                    return float(text[:-len(name)].strip()) * table[name] / size
                except ValueError:
                    return None
    try:
        return float(int(text, 0)) if text.lower().startswith("0x") else float(text)
    except ValueError:
        return None


def _bool(value: str) -> bool | None:
    """As postgres' parse_bool: on/off, any prefix of true/false/yes/no, 1/0."""
    v = value.strip().lower()
    if not v:
        return None
    if "true".startswith(v) or "yes".startswith(v) or v in ("on", "1"):
        return True
    if "false".startswith(v) or "no".startswith(v) or v in ("of", "off", "0"):
        return False
    return None


def same_value(row: Running, wanted: str) -> bool:
    """Whether postgres would hold `wanted` as it holds row.setting now (False when unsure)."""
    current = row.setting
    if current is None:
        return False
    if row.vartype == "bool":
        a, b = _bool(wanted), _bool(current)
        return a is not None and a == b
    if row.vartype in ("integer", "real"):
        w, c = _number(wanted, row.unit), _number(current, None)
        if w is None or c is None:
            return False
        if row.vartype == "integer":
            return round(w) == round(c)  # postgres rounds to the unit
        return math.isclose(w, c, rel_tol=1e-9, abs_tol=1e-12)
    if row.vartype == "enum":
        return wanted.strip().lower() == current.lower()
    return wanted == current


def setting_changes(wanted: Iterable[GenericOption], running: Iterable[Running],
                    conf_path: str | None = None) -> list[SettingChange]:
    """What writing `wanted` to postgresql.conf (`conf_path`, as the running postgres knows it)
    would change, in name order. A name written with a dot that postgres does not know is a
    placeholder for an extension's setting: not reported."""
    rows: Mapping[str, Running] = {r.name.lower(): r for r in running}
    changes: list[SettingChange] = []
    named = set()
    for opt in wanted:
        name = opt.name.lower()
        named.add(name)
        row = rows.get(name)
        if row is None:
            if "." not in name:
                changes.append(SettingChange(opt.name, None, opt.value, False, unknown=True))
            continue
        if opt.value is None or same_value(row, opt.value):
            continue
        changes.append(SettingChange(row.name, _shown(row), _display(name, opt.value),
                                     row.context in RESTART_CONTEXTS))
    if conf_path is not None:
        for name, row in rows.items():
            # dotted names: extensions' settings, and the neon.* lines written from the spec's
            # storage fields (not its settings): never reported as removed
            if name not in named and "." not in name and row.sourcefile == conf_path and row.setting != row.boot_val:
                changes.append(SettingChange(row.name, _shown(row), _display(name, row.boot_val),
                                             row.context in RESTART_CONTEXTS, removed=True))
    return sorted(changes, key=lambda c: c.name.lower())


def _shown(row: Running) -> str | None:
    return _display(row.name.lower(), row.shown if row.shown is not None else row.setting)


def _display(name: str, value: str | None) -> str | None:
    return REDACTED if name in SECRET_SETTINGS and value else value


def format_changes(changes: list[SettingChange]) -> str:
    """The lines `compute-ctl plan` prints (SQL comments, after the statements)."""
    if not changes:
        return "-- settings: no change\n"
    restart = sum(1 for c in changes if c.needs_restart)
    head = f"-- settings: {len(changes)} change{'s' if len(changes) != 1 else ''}"
    head += f", {restart} needing a restart" if restart else ", all applied by the reload"
    return "\n".join([head] + [f"--   {c.line()}" for c in changes]) + "\n"
