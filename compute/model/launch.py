"""The compute's settings: one frozen, typed record, written by the bootstrap (compute-ctl
builds it from its flags) into the state file, and read by every program through `load`.

Its defaults are the flags' defaults (cli.py reads them from here) and the only ones: a
program never supplies its own fallback.

The one rule for "no settings": compute-ctl creates the state file with them, before it starts
any program, so every program reads them with `require`, and a state file without them is a
bug said loudly (SettingsMissing), never a default, a 503 or a wait. (The monitor, which can
also run on its own, waits for the state file to exist; then the same rule.) Stored under the state key `launch` as a JSON
object of the fields below (`to_json` / `from_json`); a stored object with an unknown key or a
value of the wrong type is refused with a one-line SettingsError.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Optional

CONTROL_PLANE_APIS = ("v2", "2023")  # pull mode's protocols (compute/storage/control_plane.py)
STATE_KEY = "launch"  # the state-file key (kept from before the record was typed)


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class LaunchSettings:
    pgdata: str
    connstr: str                          # superuser connection string of the compute's postgres
    superuser: str
    runtime_dir: str
    pgbin: str = "postgres"               # the postgres binary (resolved by compute-ctl)
    pgbin_dir: Optional[str] = None       # its directory (initdb, pg_dump, pg_controldata)
    http_port: int = 3080                 # --external-http-port / --http-port
    internal_http_port: int = 3081        # --internal-http-port
    http_address: str = "0.0.0.0"
    internal_http_address: Optional[str] = None  # the internal API's address; None: not served (compute/api/internal.py)
    compute_id: Optional[str] = None
    control_plane_uri: Optional[str] = None
    control_plane_api: str = "v2"         # pull mode's protocol: "v2" (HEAD) or "2023"
    console_jwt: Optional[str] = None     # pull mode: a fixed token when the environment has none
    jwks_path: Optional[str] = None       # --jwks, or RUNTIME_DIR/jwks.json (-c, v2 pull: compute/shared/jwks_file.py)
    jwt_require_exp: bool = False         # --jwt-require-exp: tokens without `exp` refused (HEAD accepts them)
    grace_seconds: float = 30.0           # a failed start stays on /status this long
    monitor_interval: float = 0.5
    lock_timeout: float = 10.0            # the spec's catalog SQL (seconds; 0: none)
    statement_timeout: float = 300.0
    storage_timeout: float = 60.0         # sync-safekeepers / basebackup stall limit
    attempt_deadline: float = 300.0       # one attempt of any outbound request, in all (>= storage_timeout)
    basebackup_compression: Optional[str] = None  # None or "gzip"
    log_format: str = "text"              # "text" or "json"
    vm_informant: Optional[str] = None
    postgres_exporter: Optional[str] = None
    postgres_exporter_port: int = 9187

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> "LaunchSettings":
        if not isinstance(raw, dict):
            raise SettingsError(f"settings must be a JSON object, not {type(raw).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
        hints = _HINTS if cls is LaunchSettings else typing.get_type_hints(cls)
        for name, value in raw.items():
            if not _fits(value, hints[name]):
                raise SettingsError(f"setting {name}: {value!r} is not of type {_type_name(hints[name])}")
        missing = [n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING]
        if missing:
            raise SettingsError(f"missing setting(s): {', '.join(missing)}")
        return cls(**{n: float(v) if hints[n] is float else v for n, v in raw.items()})


# Resolved once, at import: in the warm image every forked program shares (resolving the string
# annotations in each program copied more of the image into it).
_HINTS = typing.get_type_hints(LaunchSettings)


def default(name: str) -> Any:
    """A field's default: what the flag defaults to, and what an absent key means."""
    return {f.name: f.default for f in dataclasses.fields(LaunchSettings)}[name]


def _fits(value: Any, hint: Any) -> bool:
    args = typing.get_args(hint)
    if args:  # Optional[X]
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:  # JSON has one number type; bool is not a number here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    return " or ".join(_type_name(a) for a in args) if args else getattr(hint, "__name__", str(hint))


def load(store) -> Optional[LaunchSettings]:
    """The settings in a state store, or None when the bootstrap has not written them yet."""
    raw = store.get(STATE_KEY)
    return None if raw is None else LaunchSettings.from_json(raw)


class SettingsMissing(SettingsError):
    pass


def require(store) -> LaunchSettings:
    """The settings, which compute-ctl writes before it starts any program (the rule above)."""
    found = load(store)
    if found is None:
        raise SettingsMissing(f"the state file has no settings (`{STATE_KEY}`): compute-ctl writes them "
                              "before it starts any program")
    return found
