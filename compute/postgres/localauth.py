"""How the superuser is reached on the embedded default (initdb) storage.

Passwordless superuser access belongs to the compute's OS user alone:
- over the unix socket, `peer` authentication maps only that OS user to the superuser (the
  kernel says who is connecting, whatever directory the spec puts the socket in);
- over TCP (the `-C` connstr, e.g. postgresql://cloud_admin@127.0.0.1:55432/postgres, as the
  original), the superuser needs a password: a random one made at every initdb, kept in a 0600
  passfile in the 0700 runtime dir, and found by our own programs through PGPASSFILE (set in
  supervisord.conf). No program's argv or environment holds the password itself.
Every other role needs its password, socket or TCP.
"""

from __future__ import annotations

import os

PASSFILE_NAME = "superuser.pgpass"
IDENT_MAP = "compute"
_UNSAFE_IN_HBA = '"\n\r\x00 \t,#'


def passfile_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, PASSFILE_NAME)


def new_password() -> str:
    """secrets.token_urlsafe(32), without importing `secrets` (hmac, OpenSSL's hashlib: ~10 ms
    on the early driver's way to initdb, issue 22): 256 bits from os.urandom; [A-Za-z0-9_-],
    nothing to escape anywhere."""
    import base64
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def render_passfile(superuser: str, password: str) -> str:
    """A libpq password file: this password for the superuser on any host, port and database."""
    return f"*:*:*:{_pgpass_field(superuser)}:{_pgpass_field(password)}\n"


def hba_name(name: str, what: str) -> str:
    if not name or any(ch in name for ch in _UNSAFE_IN_HBA):
        raise ValueError(f"{what} {name!r} cannot be written to pg_hba.conf")
    return f'"{name}"'


def render_ident(os_user: str, superuser: str) -> str:
    """pg_ident.conf: the compute's OS user, and only it, may be the superuser over `peer`."""
    return ("# Written by compute-ctl: only the compute's OS user is the superuser over the socket.\n"
            f"{IDENT_MAP} {hba_name(os_user, 'OS user')} {hba_name(superuser, 'superuser')}\n")


def write_secret(path: str, text: str) -> None:
    """Write a 0600 file atomically (never readable by anyone else, not even for a moment)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
