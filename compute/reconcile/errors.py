"""Errors of the reconciliation package (all derive from ReconcileError)."""


class ReconcileError(Exception):
    """Applying a spec failed; `str()` is a one-line message without secrets."""


class PlanError(ReconcileError, ValueError):
    """The spec cannot be applied to this cluster; raised before anything runs."""


class CatalogError(ReconcileError):
    """The catalog could not be read (wrong user, unreachable database, ...)."""


class ApplyError(ReconcileError):
    """A statement failed; nothing of the failing transaction was applied."""

    def __init__(self, message: str, *, dbname: str, statement: str | None = None,
                 sqlstate: str | None = None):
        super().__init__(message)
        self.dbname = dbname
        self.statement = statement  # redacted text of the failing statement, when known
        self.sqlstate = sqlstate
