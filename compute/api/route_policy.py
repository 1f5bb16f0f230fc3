"""Which routes need a token (compute/api/access.py's module docstring has the rules): the
route table alone, standard library only and no dataclass, so that compute-ctl's early
responder (compute/boot/early_responder.py) has it before the spec is parsed, without
importing the JWKS and token code it never uses (issue 22: ~1.5 ms before the first storage
request). compute/api/access.py re-exports all of it."""

from __future__ import annotations

OPEN, READ, GUARDED = "open", "read", "guarded"
OPEN_ROUTES = frozenset({"/metrics", "/healthz", "/readyz"})
READ_ROUTES = frozenset({"/status", "/metrics.json", "/info", "/openapi.yaml"})


def route_policy(route: str) -> str:
    """OPEN, READ or GUARDED (access.py's docstring); unknown routes are GUARDED: fail closed."""
    if route in OPEN_ROUTES:
        return OPEN
    if route in READ_ROUTES:
        return READ
    return GUARDED


def answerable_without_credentials(route: str, jwks_configured: bool | None) -> bool:
    """Whether anyone may get `route` with no token, whatever the peer: what compute-ctl's early
    responder may answer itself (`jwks_configured` None: not known yet, so only OPEN)."""
    policy = route_policy(route)
    return policy == OPEN or (policy == READ and jwks_configured is False)
