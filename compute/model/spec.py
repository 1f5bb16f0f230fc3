"""The compute spec (Neon `format_version` 1.0): parsing and validation.

Everything here is pure: `parse_spec` turns decoded JSON into frozen dataclasses or raises
`SpecError` naming the offending field. Validation is strict about anything that later ends up
in SQL or postgresql.conf (names, setting values) and lenient about unknown keys, as the
original is.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import psycopg
from psycopg.conninfo import conninfo_to_dict

from compute.model import role_options

MAX_SPEC_BYTES = 16 * 1024 * 1024
MAX_NAME_BYTES = 63  # NAMEDATALEN - 1: postgres would silently truncate longer names

HEX32 = re.compile(r"^[0-9a-f]{32}\Z")
LSN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}\Z")
MD5_HASH = re.compile(r"^(md5)?[0-9a-f]{32}\Z")
SCRAM_VERIFIER = re.compile(r"^SCRAM-SHA-256\$([0-9]+):([^$:]+)\$([^$:]+):([^$:]+)\Z")
RESERVED_ROLES = ("public", "none")
TOKEN = re.compile(r"^[A-Za-z0-9._~+/=:-]+\Z")  # JWT-like; it travels in an environment variable
GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*\Z")
OPTION_KEYWORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
# A value written without quotes (vartype other than string) must be one harmless token.
BARE_VALUE = re.compile(r"^[-+.0-9A-Za-z_:]+\Z")
# postgresql.conf: what postgres' own lexer (guc-file.l) reads as ONE bare value, ASCII only and
# without "/" (paths belong in strings): an unquoted string, an integer (decimal or hex, with a
# unit), or a real. Nothing else is ever written bare: no comment marker, quote or space.
_CONF_UNQUOTED = r"[A-Za-z_][A-Za-z0-9_.:-]*"
_CONF_INTEGER = r"[-+]?(?:[0-9]+|0x[0-9A-Fa-f]+)[A-Za-z]*"
_CONF_REAL = r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[Ee][-+]?[0-9]+)?"
_CONF_BOOL = r"(?i:t|tr|tru|true|f|fa|fal|fals|false|y|ye|yes|n|no|on|of|off|1|0)"  # parse_bool()
CONF_BARE_VALUE = {
    "bool": re.compile(rf"^{_CONF_BOOL}\Z"),
    "integer": re.compile(rf"^(?:{_CONF_INTEGER}|{_CONF_REAL})\Z"),
    "real": re.compile(rf"^(?:{_CONF_INTEGER}|{_CONF_REAL})\Z"),
}
CONF_BARE_ANY = re.compile(rf"^(?:{_CONF_UNQUOTED}|{_CONF_INTEGER}|{_CONF_REAL})\Z")  # enum, others
# Settings that make postgres read other files or move its own: a spec may ask for settings,
# not for the server to load a file of its choosing (names are case-insensitive).
FORBIDDEN_SETTINGS = ("include", "include_if_exists", "include_dir", "config_file", "hba_file",
                      "ident_file", "data_directory")

DELTA_ACTIONS = ("delete_db", "rename_db", "delete_role", "rename_role")
NEON_SETTINGS = ("neon.pageserver_connstring", "neon.tenant_id", "neon.timeline_id", "neon.safekeepers")


class SpecError(ValueError):
    """An invalid spec; `str()` is one line naming the field."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"invalid spec: {field}: {message}")


@dataclass(frozen=True)
class GenericOption:
    name: str
    value: str | None
    vartype: str


@dataclass(frozen=True)
class Role:
    name: str
    encrypted_password: str | None  # md5 hash without prefix, or a SCRAM verifier
    options: tuple[GenericOption, ...] = ()


@dataclass(frozen=True)
class Database:
    name: str
    owner: str
    options: tuple[GenericOption, ...] = ()


@dataclass(frozen=True)
class DeltaOp:
    action: str
    name: str
    new_name: str | None = None


@dataclass(frozen=True)
class Cluster:
    cluster_id: str | None
    name: str | None
    state: str | None
    roles: tuple[Role, ...]
    databases: tuple[Database, ...]
    settings: tuple[GenericOption, ...]


@dataclass(frozen=True)
class NeonStorage:
    """Where the data comes from when the spec names a pageserver."""

    pageserver_connstring: str
    tenant_id: str
    timeline_id: str
    safekeepers: tuple[str, ...]


@dataclass(frozen=True)
class ComputeSpec:
    format_version: float
    cluster: Cluster
    delta_operations: tuple[DeltaOp, ...] = ()
    operation_uuid: str | None = None
    storage_auth_token: str | None = field(default=None, repr=False)
    storage: NeonStorage | None = None
    mode: str = "Primary"  # Primary | Static | Replica
    static_lsn: str | None = None
    # Neon's switch for computes whose roles and databases are known to be in place: no
    # role/database/grant SQL at start or on reconfigure (that step was the p90 of start-up).
    skip_pg_catalog_updates: bool = False
    # Neon's: drop the subscriptions the data came with (a branch's inherited ones), once per
    # timeline, as part of the catalog apply (compute/reconcile/planner.py).
    drop_subscriptions_before_start: bool = False

    def setting(self, name: str) -> str | None:
        for opt in self.cluster.settings:
            if opt.name == name:
                return opt.value
        return None

    @property
    def tenant_id(self) -> str | None:
        return self.storage.tenant_id if self.storage else None

    @property
    def timeline_id(self) -> str | None:
        return self.storage.timeline_id if self.storage else None


# -- entry points -------------------------------------------------------------------------

def parse_spec_text(text: str | bytes, *, superuser: str | None = None) -> ComputeSpec:
    return parse_spec(decode_spec_text(text), superuser=superuser)


def decode_spec_text(text: str | bytes) -> Any:
    """The decoded JSON document (not validated yet), or a SpecError."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError("<document>", f"larger than {MAX_SPEC_BYTES} bytes")
    if isinstance(text, (bytes, bytearray)):
        try:  # strictly: json.loads(bytes) would let UTF-8-encoded surrogates through
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise SpecError("<document>", f"not valid UTF-8 ({e})") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise SpecError("<document>", f"not valid JSON ({e})") from None


def read_spec_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError("<file>", f"cannot read {path}: {e.strerror}") from None


def load_spec_file(path: str, *, superuser: str | None = None) -> ComputeSpec:
    return parse_spec_text(read_spec_file(path), superuser=superuser)


def parse_spec(obj: Any, *, superuser: str | None = None) -> ComputeSpec:
    """Validate decoded JSON. `superuser` (the connstr's user) may own databases without
    being listed in `roles`."""
    o = _Obj(obj, "<document>")
    version = o.req("format_version", (int, float))
    if isinstance(version, bool) or version != 1.0:  # no float(): a huge int would overflow
        shown = repr(version) if isinstance(version, float) or abs(version) < 10**12 else "(a huge number)"
        raise SpecError("format_version", f"unsupported version {shown} (expected 1.0)")

    c = _Obj(o.req("cluster", dict), "cluster")
    roles = tuple(_role(r, f"cluster.roles[{i}]") for i, r in enumerate(c.list("roles")))
    databases = tuple(_database(d, f"cluster.databases[{i}]") for i, d in enumerate(c.list("databases")))
    settings = tuple(_setting(s, f"cluster.settings[{i}]") for i, s in enumerate(c.list("settings")))
    _unique((r.name for r in roles), "cluster.roles", "role")
    _unique((d.name for d in databases), "cluster.databases", "database")
    _unique((s.name.lower() for s in settings), "cluster.settings", "setting")  # GUC names ignore case
    known = {r.name for r in roles} | ({superuser} if superuser else set())
    for i, db in enumerate(databases):
        if db.owner not in known:
            raise SpecError(f"cluster.databases[{i}].owner",
                            f"role {db.owner!r} is not defined in cluster.roles")
    cluster = Cluster(
        cluster_id=c.opt("cluster_id", str), name=c.opt("name", str), state=c.opt("state", str),
        roles=roles, databases=databases, settings=settings,
    )
    token = o.opt("storage_auth_token", str)
    if token is not None and not TOKEN.match(token):
        raise SpecError("storage_auth_token", "must be a printable token without spaces or quotes")
    deltas = tuple(_delta(d, f"delta_operations[{i}]") for i, d in enumerate(o.list("delta_operations")))
    mode, static_lsn = _mode(o.raw.get("mode"))
    spec = ComputeSpec(
        format_version=float(version),
        cluster=cluster,
        delta_operations=deltas,
        operation_uuid=o.opt("operation_uuid", str),
        storage_auth_token=token,
        mode=mode,
        static_lsn=static_lsn,
        skip_pg_catalog_updates=bool(o.opt("skip_pg_catalog_updates", bool)),
        drop_subscriptions_before_start=bool(o.opt("drop_subscriptions_before_start", bool)),
    )
    storage = _storage(o, spec)
    spec = dataclasses.replace(spec, storage=storage)
    _check_mode(spec)
    if spec.drop_subscriptions_before_start and spec.timeline_id is None:
        # Neon's compute_ctl fails the apply likewise ("timeline_id must be set"): the drop is
        # recorded per timeline, so that it runs once, not at every start or /configure.
        raise SpecError("drop_subscriptions_before_start", "needs a timeline id (timeline_id or the "
                        "neon.timeline_id setting): the drop is recorded once per timeline")
    return spec


# -- the stored form ----------------------------------------------------------------------
#
# The spec is validated once, where it comes in (compute-ctl's file or inline spec, the pull
# answer, the /configure and /promote bodies). What goes into the state file is the typed spec
# written back as a document (`to_document`: canonical, only what the typed spec holds, storage
# as top-level fields), and every process reads it back with `from_stored`, which builds the
# typed spec without validating it again. `parse_spec(to_document(s)) == s` (tests/unit/test_spec.py).

class StoredSpecError(ValueError):
    """The state file's spec is not one this version wrote (a bug, or a damaged file)."""


def to_document(spec: ComputeSpec) -> dict[str, Any]:
    def option(o: GenericOption) -> dict[str, Any]:
        return {"name": o.name, "value": o.value, "vartype": o.vartype}

    c = spec.cluster
    doc: dict[str, Any] = {
        "format_version": spec.format_version,
        "operation_uuid": spec.operation_uuid,
        "mode": {"Static": spec.static_lsn} if spec.mode == "Static" else spec.mode,
        "skip_pg_catalog_updates": spec.skip_pg_catalog_updates,
        "drop_subscriptions_before_start": spec.drop_subscriptions_before_start,
        "cluster": {
            "cluster_id": c.cluster_id, "name": c.name, "state": c.state,
            "roles": [{"name": r.name, "encrypted_password": r.encrypted_password,
                       "options": [option(o) for o in r.options]} for r in c.roles],
            "databases": [{"name": d.name, "owner": d.owner, "options": [option(o) for o in d.options]}
                          for d in c.databases],
            "settings": [option(o) for o in c.settings],
        },
        "delta_operations": [{"action": d.action, "name": d.name, "new_name": d.new_name}
                             for d in spec.delta_operations],
    }
    if spec.storage_auth_token is not None:
        doc["storage_auth_token"] = spec.storage_auth_token
    if spec.storage is not None:
        doc.update(pageserver_connstring=spec.storage.pageserver_connstring, tenant_id=spec.storage.tenant_id,
                   timeline_id=spec.storage.timeline_id, safekeeper_connstrings=list(spec.storage.safekeepers))
    return doc


def from_stored(doc: Any) -> ComputeSpec:
    """The typed spec of a document `to_document` wrote (no validation: it was validated before
    it was stored); StoredSpecError, one line, for anything else."""
    try:
        def options(raw: list) -> tuple[GenericOption, ...]:
            return tuple(GenericOption(o["name"], o["value"], o["vartype"]) for o in raw)

        c = doc["cluster"]
        mode = doc["mode"]
        storage = None
        if "pageserver_connstring" in doc:
            storage = NeonStorage(doc["pageserver_connstring"], doc["tenant_id"], doc["timeline_id"],
                                  tuple(doc["safekeeper_connstrings"]))
        return ComputeSpec(
            format_version=float(doc["format_version"]),
            cluster=Cluster(cluster_id=c["cluster_id"], name=c["name"], state=c["state"],
                            roles=tuple(Role(r["name"], r["encrypted_password"], options(r["options"]))
                                        for r in c["roles"]),
                            databases=tuple(Database(d["name"], d["owner"], options(d["options"]))
                                            for d in c["databases"]),
                            settings=options(c["settings"])),
            delta_operations=tuple(DeltaOp(d["action"], d["name"], d["new_name"]) for d in doc["delta_operations"]),
            operation_uuid=doc["operation_uuid"],
            storage_auth_token=doc.get("storage_auth_token"),
            storage=storage,
            mode="Static" if isinstance(mode, dict) else mode,
            static_lsn=mode["Static"] if isinstance(mode, dict) else None,
            skip_pg_catalog_updates=bool(doc["skip_pg_catalog_updates"]),
            drop_subscriptions_before_start=bool(doc.get("drop_subscriptions_before_start", False)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoredSpecError(f"the state file's spec cannot be read ({type(e).__name__}: {e}): "
                              "it was not written by this version of compute-ctl") from None


def load_stored(store) -> ComputeSpec | None:
    """The compute's current spec from a state store (None: no spec yet), typed. The one way
    any program reads it."""
    raw = store.get("spec")
    return None if raw is None else from_stored(raw)


# -- pieces -----------------------------------------------------------------------------

class _Obj:
    """A JSON object with the path it came from, for error messages."""

    def __init__(self, raw: Any, path: str):
        if not isinstance(raw, dict):
            raise SpecError(path, f"expected an object, got {_typename(raw)}")
        self.raw, self.path = raw, path

    def _field(self, key: str) -> str:
        return key if self.path == "<document>" else f"{self.path}.{key}"

    def req(self, key: str, types: type | tuple[type, ...]) -> Any:
        if self.raw.get(key) is None:
            raise SpecError(self._field(key), "is required")
        return self._typed(key, types)

    def opt(self, key: str, types: type | tuple[type, ...]) -> Any:
        return None if self.raw.get(key) is None else self._typed(key, types)

    def list(self, key: str) -> list:
        return self.opt(key, list) or []

    def _typed(self, key: str, types: type | tuple[type, ...]) -> Any:
        value = self.raw[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
            expected = " or ".join(t.__name__ for t in _tuple(types))
            raise SpecError(self._field(key), f"expected {expected}, got {_typename(value)}")
        return value


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _typename(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def _name(o: _Obj, key: str) -> str:
    name = o.req(key, str)
    where = o._field(key)
    if not name:
        raise SpecError(where, "must not be empty")
    if "\x00" in name:
        raise SpecError(where, "must not contain a NUL byte")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise SpecError(where, f"longer than {MAX_NAME_BYTES} bytes (postgres would truncate it)")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError(where, "is not valid UTF-8") from None
    return name


def _role(raw: Any, path: str) -> Role:
    o = _Obj(raw, path)
    name = _name(o, "name")
    if name in RESERVED_ROLES or name.startswith("pg_"):
        raise SpecError(f"{path}.name", f"{name!r} is a reserved role name")
    password = o.opt("encrypted_password", str)
    if password is not None and not valid_password_hash(password):
        # Never echo the value: it may be a plain password someone pasted by mistake.
        raise SpecError(f"{path}.encrypted_password",
                        "must be an md5 hash (32 hex digits) or a SCRAM-SHA-256 verifier")
    options = tuple(_role_option(x, f"{path}.options[{i}]") for i, x in enumerate(o.list("options")))
    try:
        role_options.parse_options(options)
    except role_options.RoleOptionError as e:
        raise SpecError(f"{path}.options[{e.index}]", f"role {name!r}: {e}") from None
    return Role(name=name, encrypted_password=password, options=options)


def _role_option(raw: Any, path: str) -> GenericOption:
    """An attribute for CREATE/ALTER ROLE (compute/model/role_options.py: an allow-list; the
    name is stored canonical, e.g. `CONNECTION LIMIT`)."""
    o = _Obj(raw, path)
    name = o.req("name", str)
    vartype = o.opt("vartype", str) or "string"
    value = o.opt("value", str)
    try:
        canonical = role_options.canonical_name(name)
    except role_options.RoleOptionError as e:
        raise SpecError(f"{path}.name", str(e)) from None
    return GenericOption(name=canonical, value=value, vartype=vartype)


def valid_password_hash(value: str) -> bool:
    """Whether postgres stores `value` as given: an md5 hash or a well-formed SCRAM verifier
    (32-byte keys). Anything else it would take for a plain password and hash it, so the spec
    would never match and the "hash" would be the password."""
    if MD5_HASH.match(value):
        return True
    m = SCRAM_VERIFIER.match(value)
    if not m or int(m.group(1)) <= 0:
        return False
    salt, stored, server = (_b64(g) for g in m.group(2, 3, 4))
    return bool(salt) and stored is not None and len(stored) == 32 and server is not None and len(server) == 32


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _database(raw: Any, path: str) -> Database:
    o = _Obj(raw, path)
    options = tuple(_option(x, f"{path}.options[{i}]", OPTION_KEYWORD) for i, x in enumerate(o.list("options")))
    return Database(name=_name(o, "name"), owner=_name(o, "owner"), options=options)


def _option(raw: Any, path: str, name_pattern: re.Pattern) -> GenericOption:
    o = _Obj(raw, path)
    name = o.req("name", str)
    if not name_pattern.match(name):
        raise SpecError(f"{path}.name", f"{_short(name)} is not a valid option name")
    vartype = o.opt("vartype", str) or "string"
    value = o.opt("value", str)
    if value is not None:
        if any(ch in value for ch in "\n\r\x00"):
            raise SpecError(f"{path}.value", "must not contain a newline or NUL byte")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SpecError(f"{path}.value", "is not valid UTF-8") from None
        if vartype != "string" and not BARE_VALUE.match(value):
            raise SpecError(f"{path}.value",
                            f"{_short(value)} is not a plain {_short(vartype)} value (use vartype \"string\" for text)")
    return GenericOption(name=name, value=value, vartype=vartype)


def conf_bare_value_ok(value: str, vartype: str) -> bool:
    """Whether postgres reads `value`, written without quotes, as one value of that vartype."""
    return bool(CONF_BARE_VALUE.get(vartype, CONF_BARE_ANY).match(value))


def _setting(raw: Any, path: str) -> GenericOption:
    opt = _option(raw, path, GUC_NAME)
    if opt.name.lower() in FORBIDDEN_SETTINGS:
        raise SpecError(f"{path}.name", f"{opt.name!r} is not allowed: it makes postgres read other "
                        "files or move its own")
    if opt.value is not None and opt.vartype != "string" and not conf_bare_value_ok(opt.value, opt.vartype):
        raise SpecError(f"{path}.value", f"{_short(opt.value)} is not a plain {_short(opt.vartype)} value "
                        "in postgresql.conf (use vartype \"string\" for text)")
    return opt


def _delta(raw: Any, path: str) -> DeltaOp:
    o = _Obj(raw, path)
    action = o.req("action", str)
    if action not in DELTA_ACTIONS:
        raise SpecError(f"{path}.action", f"unknown action {action!r} (expected one of {', '.join(DELTA_ACTIONS)})")
    name = _name(o, "name")
    new_name = _name(o, "new_name") if action.startswith("rename_") else None
    if action.endswith("_role"):
        for key, value in (("name", name), ("new_name", new_name)):
            if value is not None and (value in RESERVED_ROLES or value.startswith("pg_")):
                raise SpecError(f"{path}.{key}", f"{value!r} is a reserved role name")
    return DeltaOp(action=action, name=name, new_name=new_name)


def _mode(raw: Any) -> tuple[str, str | None]:
    """`"Primary"`, `"Replica"`, `{"Static": "0/16B9188"}` (serde's externally tagged enum)."""
    if raw is None or raw == "Primary":
        return "Primary", None
    if raw == "Replica":
        return "Replica", None
    if isinstance(raw, dict) and set(raw) == {"Static"} and isinstance(raw["Static"], str) and LSN.match(raw["Static"]):
        return "Static", raw["Static"]
    raise SpecError("mode", 'expected "Primary", "Replica" or {"Static": "<lsn>"}')


def _check_mode(spec: ComputeSpec) -> None:
    """Read-only modes need somewhere to read from (compute/model/modes.py decides the rest), and a
    primary_conninfo must parse: its password is moved to a passfile before postgres sees it."""
    if spec.mode == "Static" and spec.storage is None:
        raise SpecError("mode", "Static needs a pageserver (the spec names none)")
    conninfo = next((o.value for o in spec.cluster.settings if o.name.lower() == "primary_conninfo"), None)
    params: dict = {}
    if conninfo:
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.ProgrammingError:
            # Never echo it: it usually holds the replication password.
            raise SpecError("cluster.settings.primary_conninfo", "is not a valid libpq connection string") from None
    if spec.mode == "Replica" and spec.storage is None:
        if not conninfo:
            raise SpecError("mode", "Replica without a pageserver needs a primary_conninfo setting naming the primary")
        if not params.get("host") and not params.get("hostaddr"):
            raise SpecError("cluster.settings.primary_conninfo", "must name the primary's host")


def _storage(o: _Obj, spec: ComputeSpec) -> NeonStorage | None:
    """Top-level fields win over the older `neon.*` settings."""
    connstr = o.opt("pageserver_connstring", str) or spec.setting("neon.pageserver_connstring")
    tenant = o.opt("tenant_id", str) or spec.setting("neon.tenant_id")
    timeline = o.opt("timeline_id", str) or spec.setting("neon.timeline_id")
    if o.raw.get("safekeeper_connstrings") is not None:
        sks = o.opt("safekeeper_connstrings", list)
        for i, sk in enumerate(sks):
            if not isinstance(sk, str) or not sk:
                raise SpecError(f"safekeeper_connstrings[{i}]", "expected a non-empty string")
        safekeepers = tuple(sks)
    else:
        safekeepers = tuple(s.strip() for s in (spec.setting("neon.safekeepers") or "").split(",") if s.strip())

    if not (connstr or tenant or timeline):
        return None  # the embedded default: a local cluster from initdb
    for field_name, value in (("pageserver_connstring", connstr), ("tenant_id", tenant), ("timeline_id", timeline)):
        if not value:
            raise SpecError(field_name, "is required when the spec names a pageserver "
                            "(top-level or neon.* setting)")
    for field_name, value in (("tenant_id", tenant), ("timeline_id", timeline)):
        if not HEX32.match(value):
            raise SpecError(field_name, "must be 32 lowercase hex digits")
    return NeonStorage(connstr, tenant, timeline, safekeepers)


def _unique(names: Iterable[str], path: str, what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise SpecError(path, f"{what} {n!r} is listed twice")
        seen.add(n)
