"""Rendering postgresql.conf and pg_hba.conf from the spec (pure, plus two tiny writers), and
the reload that makes postgres read them."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from compute.postgres.localauth import IDENT_MAP, hba_name, render_ident
from compute.model.spec import BARE_VALUE, ComputeSpec, GenericOption, conf_bare_value_ok

BEGIN_MARK = "# Managed by compute_ctl: begin"
END_MARK = "# Managed by compute_ctl: end"
STORAGE_HEADER = "# Neon storage settings"
HBA_LINE = "host all all 0.0.0.0/0 md5"


def quote_value(opt: GenericOption) -> str:
    """`string` values single-quoted with `'` and `\\` doubled; others bare (validated tokens)."""
    if opt.value is None:
        return ""
    if any(ch in opt.value for ch in "\n\r\x00"):
        # spec.py already rejects these; a second guard because this is the injection point.
        raise ValueError(f"setting {opt.name}: value contains a newline or NUL")
    if opt.vartype == "string":
        return "'" + opt.value.replace("\\", "\\\\").replace("'", "''") + "'"
    if not BARE_VALUE.match(opt.value) or not conf_bare_value_ok(opt.value, opt.vartype):
        raise ValueError(f"setting {opt.name}: {opt.value!r} is not a plain {opt.vartype} value")
    return opt.value


def setting_line(opt: GenericOption) -> str:
    return opt.name if opt.value is None else f"{opt.name} = {quote_value(opt)}"


def conf_value(text: str) -> str:
    """A text value for postgresql.conf as HEAD's escape_conf_value quotes it: `'...'` with
    `'` and `\\` doubled; always quoted. A newline or NUL cannot be written (postgres ends a
    quoted value at a newline): spec.py refuses them, this is the second guard."""
    if any(ch in text for ch in "\n\r\x00"):
        raise ValueError("a postgresql.conf value cannot hold a newline or NUL")
    return "'" + text.replace("'", "''").replace("\\", "\\\\") + "'"


def neon_head_lines(spec: ComputeSpec) -> list[str]:
    """What HEAD's write_postgres_conf (compute_tools/src/config.rs) writes before the managed
    block, in its order and words: `cluster.postgresql_conf` verbatim, then the storage
    settings from the spec's top-level fields as given (the `neon.*` settings of
    `cluster.settings` come later, in the block, and win where both are set)."""
    lines = [] if spec.postgresql_conf is None else [spec.postgresql_conf]
    lines += [STORAGE_HEADER, ""]
    f = spec.fields
    info = f.pageserver_connection_info
    if info is not None:
        if info.stripe_size is not None:  # before the connstring, as HEAD
            lines += ["# from compute spec's pageserver_connection_info.stripe_size field",
                      f"neon.stripe_size={int(info.stripe_size)}"]
        urls = [info.shard_url(n) for n in range(max(info.shard_count, 1))]
        lines += ["# derived from compute spec's pageserver_connection_info field",
                  f"neon.pageserver_connstring={conf_value(','.join(urls))}"]
    else:
        if f.shard_stripe_size is not None:
            lines += ["# from compute spec's shard_stripe_size field", f"neon.stripe_size={int(f.shard_stripe_size)}"]
        if f.pageserver_connstring is not None:
            lines += ["# from compute spec's pageserver_connstring field",
                      f"neon.pageserver_connstring={conf_value(f.pageserver_connstring)}"]
    if f.safekeeper_connstrings:
        generation = "" if f.safekeepers_generation is None else f"g#{int(f.safekeepers_generation)}:"
        lines.append(f"neon.safekeepers={conf_value(generation + ','.join(f.safekeeper_connstrings))}")
    for key in ("tenant_id", "timeline_id", "project_id", "branch_id", "endpoint_id"):
        value = getattr(f, key)
        if value is not None:
            lines.append(f"neon.{key}={conf_value(value)}")
    return lines


def neon_tail_lines(spec: ComputeSpec, subscribers_disabled: bool | None = None) -> list[str]:
    """HEAD writes this after the managed block (config.rs), explicit even when false.
    `subscribers_disabled` None: the spec's `drop_subscriptions_before_start` (the file before
    the start's catalog apply); after it, compute.model.modes.logical_subscribers_disabled."""
    if subscribers_disabled is None:
        subscribers_disabled = spec.drop_subscriptions_before_start
    return [f"neon.disable_logical_replication_subscribers={'true' if subscribers_disabled else 'false'}"]


def writes_neon_lines(spec: ComputeSpec | None) -> bool:
    """HEAD's lines go to every compute that has Neon storage or a `postgresql_conf`; the
    embedded default and plain-PostgreSQL replicas keep just the managed block."""
    return spec is not None and (spec.storage is not None or spec.postgresql_conf is not None
                                 or spec.drop_subscriptions_before_start)


def render_postgresql_conf(settings: tuple[GenericOption, ...] | list[GenericOption],
                           spec: ComputeSpec | None = None, *, subscribers_disabled: bool | None = None) -> str:
    """The whole file: HEAD's lines for `spec` (neon_head_lines), our managed block (the
    spec's settings and what its mode adds: compute.model.modes.conf_settings), HEAD's tail."""
    block = [BEGIN_MARK, *(setting_line(o) for o in settings), END_MARK]
    if not writes_neon_lines(spec):
        return "\n".join(block) + "\n"
    assert spec is not None
    return "\n".join([*neon_head_lines(spec), *block, *neon_tail_lines(spec, subscribers_disabled)]) + "\n"


RELOAD_WAIT = 5.0  # s: how long a reload may take to reach our session before we go on without it
RELOAD_POLL = 0.01


def reload_and_wait(conn: Any, *, timeout: float = RELOAD_WAIT, poll: float = RELOAD_POLL,
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> bool:
    """pg_reload_conf() on `conn` (autocommit), then wait until this session itself has re-read
    the configuration files: its pg_conf_load_time() moves past the one read before the reload
    (the postmaster signals every backend, ours included, asynchronously). Only then do the
    session's pg_settings (pending_restart) describe the new files. False if that did not happen
    within `timeout` seconds."""
    before = conn.execute("SELECT pg_catalog.pg_conf_load_time()").fetchone()[0]
    conn.execute("SELECT pg_catalog.pg_reload_conf()")
    deadline = clock() + timeout
    while not conn.execute("SELECT pg_catalog.pg_conf_load_time() > %s", (before,)).fetchone()[0]:
        if clock() >= deadline:
            return False
        sleep(poll)
    return True


def write_postgresql_conf(pgdata: str, settings, spec: ComputeSpec | None = None, *,
                          subscribers_disabled: bool | None = None) -> None:
    """Rewrite postgresql.conf whole, atomically (a reload must never see half a file)."""
    _atomic_write(os.path.join(pgdata, "postgresql.conf"),
                  render_postgresql_conf(settings, spec, subscribers_disabled=subscribers_disabled))


def write_passfile(pgdata: str, password: str | None) -> None:
    """PGDATA/replication.pgpass for the walreceiver (named by primary_conninfo), written
    atomically at 0600; removed when the spec has no replication password."""
    from compute.model import modes
    path = os.path.join(pgdata, modes.PASSFILE)
    if password is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(modes.passfile_line(password))
    os.replace(tmp, path)


def snapshot_files(paths) -> dict[str, str | None]:
    """The text of each file (None: absent), to put back with `restore_files` (a /configure whose
    settings postgres rejected leaves everything as it was)."""
    texts: dict[str, str | None] = {}
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            texts[path] = None
            continue
        with os.fdopen(fd, encoding="utf-8", errors="surrogateescape") as f:
            texts[path] = f.read()
    return texts


def restore_files(texts: dict[str, str | None]) -> None:
    for path, text in texts.items():
        if text is None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        else:
            _atomic_write(path, text)


def ensure_hba_line(pgdata: str) -> bool:
    """Append `host all all 0.0.0.0/0 md5` to pg_hba.conf when missing. True if appended."""
    path = os.path.join(pgdata, "pg_hba.conf")
    # O_NOFOLLOW: PGDATA came from the network; a symlink here must never be written through.
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "r+", encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
        if any(" ".join(line.split()) == HBA_LINE for line in text.splitlines()):
            return False
        sep = "" if not text or text.endswith("\n") else "\n"
        f.write(f"{sep}{HBA_LINE}\n")
    return True


def render_default_hba(superuser: str, *, clone: bool = False) -> str:
    """pg_hba.conf for the embedded default (see compute/postgres/localauth.py): the superuser without a
    password only as the compute's OS user on the socket (peer + pg_ident map), with its
    generated password over TCP; every other role with its password.

    `clone`: a replica cloned from a plain primary has the primary's catalog, and a standby
    cannot be given a password of ours, so our programs reach the superuser over loopback
    without one (a documented gap: docs/security.md, "Read replicas of a plain primary")."""
    su = hba_name(superuser, "superuser name")
    tcp = (f"host all {su} 127.0.0.1/32 trust\nhost all {su} ::1/128 trust\n" if clone
           else f"host all {su} all scram-sha-256\n")
    return (
        "# Written by compute-ctl for the embedded default (initdb) storage.\n"
        f"local all {su} peer map={IDENT_MAP}\n"
        f"{tcp}"
        "local all all md5\n"
        "host all all 127.0.0.1/32 md5\n"
        "host all all ::1/128 md5\n"
        f"{HBA_LINE}\n"
    )


def write_default_hba(pgdata: str, superuser: str, os_user: str | None = None, *, clone: bool = False) -> None:
    """pg_hba.conf and the pg_ident.conf map it names (`os_user`: the compute's, by default
    whoever runs this, i.e. the driver)."""
    if os_user is None:
        import pwd
        os_user = pwd.getpwuid(os.getuid()).pw_name
    _atomic_write(os.path.join(pgdata, "pg_ident.conf"), render_ident(os_user, superuser))
    _atomic_write(os.path.join(pgdata, "pg_hba.conf"), render_default_hba(superuser, clone=clone))


def _atomic_write(path: str, text: str) -> None:
    """Write a temporary file and rename it over `path`: a symlink at either name is replaced,
    never followed (O_EXCL|O_NOFOLLOW after removing a stale temporary)."""
    tmp = f"{path}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    os.replace(tmp, path)
