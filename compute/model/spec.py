"""The compute spec (Neon `format_version` 1.0): parsing and validation.

Everything here is pure: `parse_spec` turns decoded JSON into frozen dataclasses or raises
`SpecError` naming the offending field. Validation is strict about anything that later ends up
in SQL or postgresql.conf (names, setting values). Unknown keys are tolerated, as the original
does, but reported (`ComputeSpec.ignored_keys`, logged once where the spec comes in), and one
that looks like a misspelling of a key we read is refused; so is a document nested deeper than
MAX_SPEC_DEPTH (compute/model/spec_shape.py: `SpecShapeError`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from compute.model.conninfo import ConninfoError, parse as conninfo_to_dict

from compute.model.spec_shape import MAX_SPEC_DEPTH, shape_report
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
# Storage fields end up quoted in postgresql.conf and in libpq connection strings: one line each,
# bounded (a spec is at most MAX_SPEC_BYTES, but postgres reads each line of its file whole).
MAX_STORAGE_TEXT = 4096
MAX_POSTGRESQL_CONF = 1 << 20
U32 = (1 << 32) - 1
SHARD_INDEX = re.compile(r"^[0-9a-fA-F]{4}\Z")
PROTOCOLS = ("libpq", "grpc")


class SpecError(ValueError):
    """An invalid spec; `str()` is one line naming the field."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"invalid spec: {field}: {message}")


class SpecShapeError(SpecError):
    """The document's shape is refused before its fields are read: nested too deep, or a key
    that looks like a misspelling. The API answers 400 (a malformed request), not 412."""


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
class Pageserver:
    """One pageserver of a shard (Neon's PageserverShardConnectionInfo)."""
    id: int | None
    libpq_url: str | None
    grpc_url: str | None


@dataclass(frozen=True)
class Shard:
    number: int
    pageservers: tuple[Pageserver, ...]


@dataclass(frozen=True)
class PageserverConnectionInfo:
    """Neon's `pageserver_connection_info`: shard_count 0 is an unsharded tenant (one shard,
    index `0000`); N > 0 shards are numbered 0..N-1, keyed `<NN><CC>` in hex."""
    shard_count: int
    stripe_size: int | None
    shards: tuple[Shard, ...]  # by number, every one of 0..max(count, 1)-1 present
    prefer_protocol: str = "libpq"

    def index(self, number: int) -> str:
        """Neon's ShardIndex text: shard number and count, two hex digits each."""
        return f"{number:02x}{self.shard_count:02x}"

    def shard_url(self, number: int) -> str:
        """The libpq URL of the shard's first pageserver (what Neon's `shard_url` returns)."""
        url = self.shards[number].pageservers[0].libpq_url
        assert url is not None  # validated: every pageserver has one
        return url

    def to_json(self) -> dict[str, Any]:
        return {"shard_count": self.shard_count, "stripe_size": self.stripe_size,
                "prefer_protocol": self.prefer_protocol,
                "shards": {self.index(sh.number): {"pageservers": [
                    {"id": p.id, "libpq_url": p.libpq_url, "grpc_url": p.grpc_url} for p in sh.pageservers]}
                    for sh in self.shards}}


@dataclass(frozen=True)
class StorageFields:
    """The spec's top-level storage fields exactly as given (validated): what HEAD's
    write_postgres_conf renders into postgresql.conf. Where the data comes from is NeonStorage."""
    pageserver_connection_info: PageserverConnectionInfo | None = None
    pageserver_connstring: str | None = None
    shard_stripe_size: int | None = None
    safekeeper_connstrings: tuple[str, ...] = ()
    safekeepers_generation: int | None = None
    tenant_id: str | None = None
    timeline_id: str | None = None
    project_id: str | None = None
    branch_id: str | None = None
    endpoint_id: str | None = None

    KEYS = ("pageserver_connection_info", "pageserver_connstring", "shard_stripe_size",
            "safekeeper_connstrings", "safekeepers_generation", "tenant_id", "timeline_id",
            "project_id", "branch_id", "endpoint_id")


@dataclass(frozen=True)
class NeonStorage:
    """Where the data comes from when the spec names a pageserver (top-level fields first, then
    the `neon.*` settings, as HEAD's ParsedSpec)."""

    pageserver_connstring: str  # the basebackup source: shard 0's first pageserver
    tenant_id: str
    timeline_id: str
    safekeepers: tuple[str, ...]
    conninfo: PageserverConnectionInfo | None = None  # every shard (None: built from the connstring)

    @property
    def shards(self) -> PageserverConnectionInfo:
        return self.conninfo or _from_connstr(self.pageserver_connstring, None, "pageserver_connstring")

    def tenant_shard_ids(self) -> list[tuple[str, str]]:
        """(tenant shard id, libpq URL) for every pageserver of every shard, as HEAD's LSN
        lease asks them: the plain tenant id when unsharded, else `<tenant>-<NNCC>`."""
        info = self.shards
        out = []
        for sh in info.shards:
            tsid = self.tenant_id if info.shard_count == 0 else f"{self.tenant_id}-{info.index(sh.number)}"
            out.extend((tsid, p.libpq_url) for p in sh.pageservers if p.libpq_url)
        return out


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
    # HEAD's postgresql.conf inputs: `cluster.postgresql_conf` (written first, verbatim), the
    # top-level storage fields as given, `drop_subscriptions_before_start`.
    postgresql_conf: str | None = None
    fields: StorageFields = StorageFields()
    drop_subscriptions_before_start: bool = False
    # Paths of the keys the document had that we do not know (logged once where the spec comes
    # in; never stored: to_document writes only what is typed here).
    ignored_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

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
    except RecursionError:  # json's own limit (about 1000 levels, less on a deep stack)
        raise SpecShapeError("<document>", f"not valid JSON (nested deeper than {MAX_SPEC_DEPTH} levels of "
                             "objects and arrays)") from None
    except ValueError as e:
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
    shape = shape_report(obj)
    if shape.too_deep:
        raise SpecShapeError("<document>", f"nested deeper than {MAX_SPEC_DEPTH} levels of objects and arrays")
    if shape.misspellings:
        m = shape.misspellings[0]
        raise SpecShapeError(m.path, f"unknown key {_short(m.key)} looks like a misspelling of {m.known!r}, "
                             "which is absent: fix its spelling")
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
    postgresql_conf = c.opt("postgresql_conf", str)
    if postgresql_conf is not None:
        check_postgresql_conf(postgresql_conf, "cluster.postgresql_conf")
    spec = ComputeSpec(
        format_version=float(version),
        cluster=cluster,
        delta_operations=deltas,
        operation_uuid=o.opt("operation_uuid", str),
        storage_auth_token=token,
        mode=mode,
        static_lsn=static_lsn,
        skip_pg_catalog_updates=bool(o.opt("skip_pg_catalog_updates", bool)),
        postgresql_conf=postgresql_conf,
        fields=_storage_fields(o),
        drop_subscriptions_before_start=bool(o.opt("drop_subscriptions_before_start", bool)),
        ignored_keys=shape.unknown,
    )
    spec = dataclasses.replace(spec, storage=resolve_storage(spec))
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
    # The top-level storage fields as given (the storage is derived again from them and the
    # settings): what postgresql.conf shows stays what the spec said.
    f = spec.fields
    doc["cluster"]["postgresql_conf"] = spec.postgresql_conf
    doc["drop_subscriptions_before_start"] = spec.drop_subscriptions_before_start
    doc.update({key: getattr(f, key) for key in StorageFields.KEYS})
    doc["safekeeper_connstrings"] = list(f.safekeeper_connstrings)
    if f.pageserver_connection_info is not None:
        doc["pageserver_connection_info"] = f.pageserver_connection_info.to_json()
    return doc


def from_stored(doc: Any) -> ComputeSpec:
    """The typed spec of a document `to_document` wrote (no validation: it was validated before
    it was stored); StoredSpecError, one line, for anything else."""
    try:
        def options(raw: list) -> tuple[GenericOption, ...]:
            return tuple(GenericOption(o["name"], o["value"], o["vartype"]) for o in raw)

        c = doc["cluster"]
        mode = doc["mode"]
        raw_info = doc["pageserver_connection_info"]
        fields = StorageFields(**{**{key: doc[key] for key in StorageFields.KEYS},
                                  "safekeeper_connstrings": tuple(doc["safekeeper_connstrings"]),
                                  "pageserver_connection_info":
                                      None if raw_info is None else _conninfo(raw_info, "stored")})
        spec = ComputeSpec(
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
            mode="Static" if isinstance(mode, dict) else mode,
            static_lsn=mode["Static"] if isinstance(mode, dict) else None,
            skip_pg_catalog_updates=bool(doc["skip_pg_catalog_updates"]),
            postgresql_conf=c["postgresql_conf"],
            fields=fields,
            drop_subscriptions_before_start=bool(doc.get("drop_subscriptions_before_start", False)),
        )
        return dataclasses.replace(spec, storage=resolve_storage(spec))
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
        except ConninfoError:
            # Never echo it: it usually holds the replication password.
            raise SpecError("cluster.settings.primary_conninfo", "is not a valid libpq connection string") from None
    if spec.mode == "Replica" and spec.storage is None:
        if not conninfo:
            raise SpecError("mode", "Replica without a pageserver needs a primary_conninfo setting naming the primary")
        if not params.get("host") and not params.get("hostaddr"):
            raise SpecError("cluster.settings.primary_conninfo", "must name the primary's host")


def _storage_fields(o: _Obj) -> StorageFields:
    """The top-level storage fields, each checked where it is (HEAD's types, plus: one line of
    bounded text, since every one of them is written into postgresql.conf)."""
    info = o.raw.get("pageserver_connection_info")
    sks = ()
    if o.raw.get("safekeeper_connstrings") is not None:
        sks = tuple(_safekeeper(sk, f"safekeeper_connstrings[{i}]")
                    for i, sk in enumerate(o.opt("safekeeper_connstrings", list)))
    ids = {}
    for key in ("tenant_id", "timeline_id"):
        value = o.opt(key, str)
        if value is not None and not HEX32.match(value):
            raise SpecError(key, "must be 32 lowercase hex digits")
        ids[key] = value
    connstr = o.opt("pageserver_connstring", str)
    if connstr is not None:
        _storage_text(connstr, "pageserver_connstring")
    return StorageFields(
        pageserver_connection_info=None if info is None else _conninfo(info, "pageserver_connection_info"),
        pageserver_connstring=connstr,
        shard_stripe_size=_uint(o, "shard_stripe_size", U32),
        safekeeper_connstrings=sks,
        safekeepers_generation=_uint(o, "safekeepers_generation", U32),
        project_id=_storage_text(o.opt("project_id", str), "project_id"),
        branch_id=_storage_text(o.opt("branch_id", str), "branch_id"),
        endpoint_id=_storage_text(o.opt("endpoint_id", str), "endpoint_id"),
        **ids,
    )


def _uint(o: _Obj, key: str, limit: int) -> int | None:
    value = o.opt(key, int)
    if value is not None and not 0 <= value <= limit:
        raise SpecError(o._field(key), f"must be an integer from 0 to {limit}")
    return value


def _storage_text(value: str | None, where: str) -> str | None:
    """A value written quoted into postgresql.conf (and, for URLs, handed to libpq): one line,
    no NUL (postgres' own lexer ends a quoted value at a newline), valid UTF-8, bounded."""
    if value is None:
        return None
    _check_text(value, where, banned="\n\r\x00", banned_what="a newline or NUL byte",
                limit=MAX_STORAGE_TEXT, too_long="longer")
    return value


def _check_text(value: str, where: str, *, banned: str, banned_what: str, limit: int, too_long: str) -> None:
    """Text written into postgresql.conf: none of the `banned` characters, valid UTF-8, at most
    `limit` bytes encoded (`too_long`: the message's comparative)."""
    if any(ch in value for ch in banned):
        raise SpecError(where, f"must not contain {banned_what}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise SpecError(where, "is not valid UTF-8") from None
    if size > limit:
        raise SpecError(where, f"{too_long} than {limit} bytes")


def _url(value: Any, where: str) -> str:
    """A pageserver's libpq URL or key=value connection string (never echoed: it may hold a
    password). No comma: neon.pageserver_connstring is the shards' URLs joined by commas."""
    if not isinstance(value, str) or not value:
        raise SpecError(where, f"expected a non-empty string, got {_typename(value)}")
    _storage_text(value, where)
    if "," in value:
        raise SpecError(where, "must not contain a comma (the shards' URLs are joined by commas)")
    try:
        conninfo_to_dict(value)
    except ConninfoError:
        raise SpecError(where, "is not a valid libpq connection string") from None
    return value


def _safekeeper(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(where, "expected a non-empty string")
    _storage_text(value, where)
    if "," in value:
        raise SpecError(where, "must not contain a comma (neon.safekeepers is the list joined by commas)")
    return value


def _conninfo(raw: Any, path: str) -> PageserverConnectionInfo:
    """`pageserver_connection_info` as HEAD's type, and what HEAD would only find out later
    (writing postgresql.conf, or at the basebackup): a shard missing from the map, one with no
    pageserver, N shards without a stripe size. This compute speaks libpq to pageservers, so
    each needs a `libpq_url` (`prefer_protocol: "grpc"` is accepted: HEAD's rule lets a
    compute use the protocol it has)."""
    o = _Obj(raw, path)
    count = _uint(o, "shard_count", 255)
    if count is None:
        raise SpecError(f"{path}.shard_count", "is required")
    stripe = _uint(o, "stripe_size", U32)
    if count > 0 and stripe is None:
        raise SpecError(f"{path}.stripe_size", f"{count} shards but no stripe_size")
    protocol = o.opt("prefer_protocol", str) or "libpq"
    if protocol not in PROTOCOLS:
        raise SpecError(f"{path}.prefer_protocol", f"expected one of {', '.join(PROTOCOLS)}")
    raw_shards = o.req("shards", dict)
    shards: dict[int, Shard] = {}
    for key, value in raw_shards.items():
        where = f"{path}.shards.{key if SHARD_INDEX.match(key) else _short(key, 20)}"
        if not SHARD_INDEX.match(key):
            raise SpecError(where, "a shard index is 4 hex digits: shard number, shard count")
        number, of = int(key[:2], 16), int(key[2:], 16)
        if of != count or number >= max(count, 1):
            raise SpecError(where, f"not a shard of a tenant with shard_count {count}")
        if number in shards:
            raise SpecError(where, "listed twice")
        so = _Obj(value, where)
        servers = so.req("pageservers", list)
        if not servers:
            raise SpecError(f"{where}.pageservers", "must have at least one pageserver")
        pageservers = []
        for i, ps in enumerate(servers):
            po = _Obj(ps, f"{where}.pageservers[{i}]")
            grpc = po.opt("grpc_url", str)
            _storage_text(grpc, po._field("grpc_url"))
            libpq = po.opt("libpq_url", str)
            if libpq is None:
                raise SpecError(po._field("libpq_url"), "is required: this compute reaches pageservers over libpq")
            pageservers.append(Pageserver(id=_uint(po, "id", (1 << 64) - 1),
                                          libpq_url=_url(libpq, po._field("libpq_url")), grpc_url=grpc))
        shards[number] = Shard(number, tuple(pageservers))
    for number in range(max(count, 1)):
        if number not in shards:
            raise SpecError(f"{path}.shards", f"shard {number:02x}{count:02x} missing from "
                            "pageserver_connection_info shard map")
    return PageserverConnectionInfo(count, stripe, tuple(shards[n] for n in sorted(shards)), protocol)


def _from_connstr(connstr: str, stripe_size: int | None, where: str) -> PageserverConnectionInfo:
    """HEAD's PageserverConnectionInfo::from_connstr: a comma list, one URL per shard; one URL
    is an unsharded tenant; N > 1 need a stripe size."""
    urls = connstr.split(",")
    for i, url in enumerate(urls):
        _url(url, where if len(urls) == 1 else f"{where} (URL {i + 1})")
    if len(urls) == 1:
        return PageserverConnectionInfo(0, None, (Shard(0, (Pageserver(None, urls[0], None),)),))
    if stripe_size is None:
        raise SpecError(where, f"{len(urls)} shards but no stripe_size")
    if len(urls) > 255:
        raise SpecError(where, f"{len(urls)} shards: at most 255")
    return PageserverConnectionInfo(len(urls), stripe_size,
                                    tuple(Shard(i, (Pageserver(None, u, None),)) for i, u in enumerate(urls)))


def resolve_storage(spec: ComputeSpec) -> NeonStorage | None:
    """Where the data comes from, in HEAD's order (ParsedSpec): `pageserver_connection_info`,
    else `pageserver_connstring` + `shard_stripe_size`, else the settings
    `neon.pageserver_connstring` + `neon.stripe_size`; ids and safekeepers from the top-level
    fields, else the `neon.*` settings. None: the spec names no storage (the embedded default:
    a local cluster from initdb; HEAD has no such mode)."""
    f = spec.fields
    info = f.pageserver_connection_info
    if info is None and f.pageserver_connstring:
        info = _from_connstr(f.pageserver_connstring, f.shard_stripe_size, "pageserver_connstring")
    if info is None and spec.setting("neon.pageserver_connstring"):
        stripe_text = spec.setting("neon.stripe_size")
        stripe = None
        if stripe_text is not None:
            if not re.fullmatch(r"[0-9]{1,10}", stripe_text) or int(stripe_text) > U32:  # ASCII digits only
                raise SpecError("cluster.settings.neon.stripe_size", "must be an integer from 0 to 4294967295")
            stripe = int(stripe_text)
        info = _from_connstr(spec.setting("neon.pageserver_connstring") or "", stripe,
                             "cluster.settings.neon.pageserver_connstring")
    tenant = f.tenant_id or spec.setting("neon.tenant_id")
    timeline = f.timeline_id or spec.setting("neon.timeline_id")
    if f.safekeeper_connstrings:
        safekeepers = f.safekeeper_connstrings
    else:
        safekeepers = tuple(s.strip() for s in (spec.setting("neon.safekeepers") or "").split(",") if s.strip())

    if not (info or tenant or timeline):
        return None  # the embedded default: a local cluster from initdb
    if info is None:
        raise SpecError("pageserver_connstring", "is required when the spec names a pageserver "
                        "(pageserver_connection_info, pageserver_connstring or the neon.* setting)")
    for field_name, value in (("tenant_id", tenant), ("timeline_id", timeline)):
        if not value:
            raise SpecError(field_name, "is required when the spec names a pageserver "
                            "(top-level or neon.* setting)")
        if not HEX32.match(value):
            raise SpecError(field_name, "must be 32 lowercase hex digits")
    if spec.mode == "Primary":  # HEAD's ParsedSpec::validate (only a primary uses the safekeepers)
        seen: set[str] = set()
        for sk in sorted(safekeepers):
            if sk in seen:
                raise SpecError("safekeeper_connstrings", f"duplicate entry in safekeeper_connstrings: {sk}!")
            seen.add(sk)
    assert tenant is not None and timeline is not None
    return NeonStorage(info.shard_url(0), tenant, timeline, safekeepers, info)


# postgresql.conf as postgres' own lexer reads it (src/backend/utils/misc/guc-file.l): one
# setting a line, `name [=] value [# comment]`.
_CONF_LETTER = r"A-Za-z_\x80-\U0010ffff"
_CONF_ID = rf"[{_CONF_LETTER}][{_CONF_LETTER}0-9$]*"
_CONF_LINE_PATTERN = (
    rf"^[ \t\f]*(?:(?P<name>{_CONF_ID}(?:\.{_CONF_ID})?)(?:[ \t\f]*=[ \t\f]*|[ \t\f]+)"
    rf"(?P<value>'(?:[^'\\\n]|\\.|'')*'|[{_CONF_LETTER}0-9.+\-:/]+)[ \t\f]*)?(?:#.*)?\Z")


@functools.cache
def _conf_line():
    """Compiled on first use: its character classes up to U+10FFFF take 15-60 ms to compile,
    on compute-ctl's path to the first storage request (issue 22) for every spec."""
    return re.compile(_CONF_LINE_PATTERN)


def check_postgresql_conf(text: str, where: str) -> None:
    """`cluster.postgresql_conf` is written verbatim: every line must be one postgres reads as
    a setting, a comment or nothing, and none may name a setting that makes postgres read
    other files or move its own (as for cluster.settings)."""
    _check_text(text, where, banned="\x00", banned_what="a NUL byte", limit=MAX_POSTGRESQL_CONF, too_long="larger")
    for n, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        m = _conf_line().match(line)
        if m is None:
            raise SpecError(where, f"line {n} is not a postgresql.conf setting or comment: {_short(line)}")
        name = m.group("name")
        if name is not None and name.lower() in FORBIDDEN_SETTINGS:
            raise SpecError(where, f"line {n}: {name!r} is not allowed: it makes postgres read other "
                            "files or move its own")


def postgresql_conf_settings(text: str | None) -> list[tuple[str, str]]:
    """(name, value) of each setting line of a `cluster.postgresql_conf` (checked already:
    check_postgresql_conf), in file order, values unquoted as postgres reads them."""
    out: list[tuple[str, str]] = []
    if not text:  # no lines: the regex is not compiled for nothing (compute-ctl's path, issue 22)
        return out
    for line in text.replace("\r\n", "\n").split("\n"):
        m = _conf_line().match(line)
        if m is None or m.group("name") is None:
            continue
        value = m.group("value")
        if value.startswith("'"):
            value = re.sub(r"''|\\(.)", lambda q: "'" if q.group(0) == "''" else q.group(1), value[1:-1])
        out.append((m.group("name"), value))
    return out


def _unique(names: Iterable[str], path: str, what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise SpecError(path, f"{what} {n!r} is listed twice")
        seen.add(n)
