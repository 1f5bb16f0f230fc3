"""The internal port's request bodies (pure): HEAD's `SetRoleGrantsRequest` and
`ExtensionInstallRequest` (libs/compute_api/src/requests.rs), checked as HEAD deserialises
them, plus what postgres would silently turn into another name.

    POST /grants      {"database", "schema", "privileges": ["USAGE", ...], "role"}
    POST /extensions  {"extension", "database", "version"}

Every field is required (unknown keys are ignored, as serde does). A privilege is one of HEAD's
`Privilege` variants, upper-case. A refusal is a RequestShapeError, answered 422 as HEAD's JSON
extractor answers a body of the wrong shape; its text starts as axum's, lower-cased.

Ours on top of HEAD (all 422, nothing sent to postgres): a name that is empty, holds a NUL (no
postgres name can), or is longer than NAMEDATALEN - 1 = 63 bytes (postgres truncates such an
identifier, so a GRANT would reach whichever role the truncated name is); the role `public`,
which postgres reads as PUBLIC (every role) even quoted; a version over 1024 characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# HEAD's Privilege enum, in its order (libs/compute_api/src/privilege.rs).
PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "USAGE",
              "CREATE", "CONNECT", "TEMPORARY", "EXECUTE")
MAX_NAME_BYTES = 63  # NAMEDATALEN - 1: a longer identifier is truncated by postgres
MAX_VERSION = 1024
PREFIX = "failed to deserialize the json body into the target type"


class RequestShapeError(ValueError):
    """A body that is not HEAD's shape (or a name we refuse): one line, answered 422."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{PREFIX}: {field}: {message}")


@dataclass(frozen=True)
class GrantsRequest:
    database: str
    schema: str
    privileges: tuple[str, ...]
    role: str

    def answer(self) -> dict[str, Any]:
        """HEAD's SetRoleGrantsResponse, echoing the request (its field order)."""
        return {"database": self.database, "schema": self.schema, "privileges": list(self.privileges),
                "role": self.role}


@dataclass(frozen=True)
class ExtensionRequest:
    extension: str
    database: str
    version: str


def _object(raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise RequestShapeError("<body>", "expected a JSON object")
    return raw


def _string(raw: dict, field: str) -> str:
    if field not in raw:
        raise RequestShapeError(field, f"missing field `{field}`")
    value = raw[field]
    if not isinstance(value, str):
        raise RequestShapeError(field, "expected a string")
    return value


def _name(raw: dict, field: str) -> str:
    value = _string(raw, field)
    if not value:
        raise RequestShapeError(field, "must not be empty")
    if "\x00" in value:
        raise RequestShapeError(field, "must not contain NUL")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        raise RequestShapeError(field, "must be valid UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise RequestShapeError(field, f"longer than {MAX_NAME_BYTES} bytes (postgres would truncate it)")
    return value


def parse_grants(raw: Any) -> GrantsRequest:
    body = _object(raw)
    database, schema = _name(body, "database"), _name(body, "schema")
    if "privileges" not in body:
        raise RequestShapeError("privileges", "missing field `privileges`")
    privileges = body["privileges"]
    if not isinstance(privileges, list):
        raise RequestShapeError("privileges", "expected a list")
    for i, p in enumerate(privileges):
        if p not in PRIVILEGES or not isinstance(p, str):
            shown = str(p)[:40] if isinstance(p, str) else type(p).__name__
            raise RequestShapeError(f"privileges[{i}]", f"unknown variant `{shown}`, expected one of "
                                    + ", ".join(f"`{x}`" for x in PRIVILEGES))
    role = _name(body, "role")
    if role.lower() == "public":
        raise RequestShapeError("role", "`public` means every role (PUBLIC) in a GRANT: refused")
    return GrantsRequest(database, schema, tuple(privileges), role)


def parse_extension(raw: Any) -> ExtensionRequest:
    body = _object(raw)
    extension, database = _name(body, "extension"), _name(body, "database")
    version = _string(body, "version")
    if not version or "\x00" in version or len(version) > MAX_VERSION:
        raise RequestShapeError("version", f"must be 1..{MAX_VERSION} characters without NUL")
    try:
        version.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestShapeError("version", "must be valid UTF-8") from None
    return ExtensionRequest(extension, database, version)


def grants_to_add(requested: tuple[str, ...], held: set[str]) -> list[str]:
    """HEAD's rule: the privileges the role does not hold yet on the schema, in the request's
    order, each once; [] means no statement at all (a read replica answers without a write)."""
    out: list[str] = []
    for p in requested:
        if p not in held and p not in out:
            out.append(p)
    return out


def extension_action(installed: str | None, wanted: str) -> str | None:
    """HEAD's rule: None (that version is there), "update" (another one is) or "create"."""
    if installed is None:
        return "create"
    return None if installed == wanted else "update"
