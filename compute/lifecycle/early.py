"""The first thing a starting driver does: the start's storage request, before the driver
imports the rest of itself (issue 22).

The driver (compute/lifecycle/driver.py) imports the basebackup, the state, the steps: ~15 ms
of CPU (psycopg, ~110-140 ms more, only as postgres boots: driver.preload_psycopg), none of
which `postgres --sync-safekeepers` or `initdb` needs. So the
lifecycle program's entry point is here: it plans from what compute-ctl validated before
forking it (forkinfo.bootstrap_objects: the state file, created by compute-ctl after the fork,
holds just that); when the plan's first storage request is a subprocess
(steps.early_request, pure), it empties PGDATA and starts it (its postgresql.conf first, for
the sync), then imports the driver, which finishes that request as its first attempt
(Driver.prepare_data): the imports run while the request does, and so does compute-ctl's
creation of the state file, waited for before the driver proper reads it. It is the same process, the
lifecycle driver: the one program that changes postgres or storage. A driver killed here
leaves nothing: the subprocess gets SIGKILL with it (its parent-death signal), and the next
driver plans from the state file, which this part never writes.

A driver with nothing to start early (a hand-over's, a restarted one, pull mode, a basebackup
or clone first) goes to the driver's main at once, having read nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from compute.base import forkinfo
from compute.lifecycle.steps import DriverView, EarlyRequest, early_request

LAST_REMOVED = ("PG_VERSION", "postgresql.conf")  # compute.boot.paths recognises PGDATA by these


@dataclass
class EarlyStart:
    """A storage request this driver started before loading the rest of itself."""
    request: EarlyRequest
    started: Any            # safekeepers.Started, or initdb's Popen
    t0: float               # time.monotonic() just before the request
    password: str | None = None  # initdb: the superuser's new password (never on disk but in pwfile)
    pwfile: str | None = None    # initdb: the 0600 file initdb reads it from

    @property
    def process(self) -> Any:
        """The request's Popen (safekeepers.Started wraps the sync's; initdb's is `started`)."""
        return getattr(self.started, "proc", self.started)

    def running(self) -> bool:
        """Whether the request's process still runs (reaped, not waited for, when it is over)."""
        return self.process.poll() is None


def empty_directory(path: str) -> None:
    """Remove everything inside `path` and make it 0700. The directory itself stays: its parent
    may belong to root (a volume mount), where we could not recreate it."""
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name in LAST_REMOVED)
    # What tells compute-ctl this is our data directory goes last: a driver killed half-way
    # leaves a PGDATA that the next start still recognises (and empties) instead of refusing.
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            import shutil  # not for a fresh PGDATA: it costs the early request ~5 ms
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    os.chmod(path, 0o700)


def start_early(runtime_dir: str) -> EarlyStart | None:
    """The plan's first storage request, started; None when there is none to start early."""
    from compute.model import modes
    # What compute-ctl validated just before it forked us, as it still had it: not parsed
    # again. The state file it creates after our fork holds just these (status `init`, no
    # /terminate, postgres never started, spec generation 1 or none): nothing else writes it
    # before we do (the api is not up; the early responder only reads), so the plan needs no
    # read of it and the request does not wait for the file (forkinfo.wait_for_state_file).
    settings, spec = forkinfo.bootstrap_objects
    view = DriverView(status="init", startup_done=False, postgres_state="STOPPED")
    plan = modes.plan_start(spec) if spec is not None else None
    request = early_request(view, plan.source if plan else None, bool(plan and plan.sync_safekeepers))
    if request is None:
        return None
    empty_directory(settings.pgdata)
    t0 = time.monotonic()
    if request is EarlyRequest.SYNC_SAFEKEEPERS:
        from compute.postgres import conf as pgconf
        from compute.storage import safekeepers
        # Written before the sync: --sync-safekeepers reads its settings from it.
        pgconf.write_passfile(settings.pgdata, modes.replication_password(spec))
        pgconf.write_postgresql_conf(settings.pgdata, modes.conf_settings(spec, settings.pgdata), spec)
        token = spec.storage_auth_token or os.environ.get("NEON_AUTH_TOKEN") or None
        started = safekeepers.start_sync(settings.pgbin, settings.pgdata, token, deadline=settings.attempt_deadline)
        return EarlyStart(request, started, t0)
    from compute.postgres import localauth
    from compute.storage import initdb
    password = localauth.new_password()
    pwfile = os.path.join(runtime_dir, "initdb.pw")
    localauth.write_secret(pwfile, password + "\n")
    try:
        proc = initdb.start_initdb(settings.pgbin_dir, settings.pgdata, settings.superuser, pwfile=pwfile)
    except BaseException:
        os.unlink(pwfile)
        raise
    return EarlyStart(request, proc, t0, password=password, pwfile=pwfile)


def _tell_compute_ctl() -> None:
    """compute-ctl waits (briefly) for the request to be on its way before its own imports."""
    fd, forkinfo.early_ready_fd = forkinfo.early_ready_fd, None
    if fd is None:
        return
    try:
        os.write(fd, b".")
    except OSError:
        pass
    finally:
        os.close(fd)


def main() -> None:
    """The lifecycle program (`python -m compute.lifecycle.driver` runs the same, forked from
    compute-ctl's warm image: compute/tree/warmfork.py)."""
    from compute.base.procutil import die_with_parent
    die_with_parent()
    early = None
    if forkinfo.forked_early:  # the first start's driver, forked before supervisord runs
        from compute.shared.state_names import runtime_dir_from_env  # not sqlite3's import: not yet
        try:
            early = start_early(runtime_dir_from_env())
        except Exception:  # noqa: BLE001 - the driver proper does it again, and reports what fails
            early = None
        finally:
            _tell_compute_ctl()
    from compute.lifecycle import driver
    import gc
    gc.enable()  # compute-ctl turned it off for its start (compute/boot/cli.py), this fork inherited that
    forkinfo.wait_for_state_file()  # compute-ctl creates it after our fork; the driver proper reads it
    driver.main(early=early, parent_checked=True)
