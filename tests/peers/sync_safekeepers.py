#!/usr/bin/python3
"""Stand-in for Neon's `postgres --sync-safekeepers` (safekeepers cannot run here).

Self-contained, stdlib only: `write_fake_postgres(dir)` copies this file as `<dir>/postgres`, run
by Debian's /usr/bin/python3 so the unprivileged postgres user can execute it. Behaviour:

* `postgres --sync-safekeepers` (argv[1], as in neon's main.c) with PGDATA in env: checks like the
  real binary (refuses root unless FAKE_SK_ALLOW_ROOT=1, needs PGDATA or -D, needs
  postgresql.conf), logs to stderr, prints one LSN (env FAKE_SK_LSN, default 0/16B9188), exits 0.
* env FAKE_SK_RECORD=<file>: appends {argv, pgdata, token_set, token_matches, control_plane_token_set, uid} to a JSON list
  there; token_matches compares NEON_AUTH_TOKEN with FAKE_SK_EXPECT_TOKEN (the token itself is
  never written).
* env FAKE_SK_FAIL=N: the first N invocations fail (exit 1, error on stderr); the count is kept in
  `<record>.count` (or `<PGDATA>/.fake_sk_count` without a record file).
* env FAKE_SK_STALL=N: the first N invocations (counted with FAKE_SK_FAIL's counter, after
  its failures) log one line, then hang silently until killed (safekeepers that accept and go
  quiet).
* env FAKE_SK_TRICKLE=N: the first N invocations (counted after the failures and stalls) log a
  line every 0.5 s and never finish (safekeepers that keep it talking without an end).
* env FAKE_SK_GATE=<path>: once `<path>.armed` exists, an invocation writes `<path>.waiting`
  (its pid), then waits until `<path>` exists before it answers (safekeepers slow to agree: a
  test holds the sync a /terminate runs, and releases it when it wants the answer).
* env FAKE_SK_DELAY_MS=N: waits N ms (idle) before it answers, as the round trips to remote
  safekeepers would (bench/startup.py's "sync 300 ms" series).
* env COMPUTE_TRACE=<file> (bench/startup.py's timeline, compute/base/trace.py's format):
  appends `sync stand-in: started` once this script runs and `sync stand-in: done` as it exits.
* any other invocation: exec the real postgres with the same arguments.
"""

from __future__ import annotations

import json
import os
import sys
import time

REAL_PGBIN_DIR = "/usr/lib/postgresql/15/bin"
REAL_POSTGRES = os.path.join(REAL_PGBIN_DIR, "postgres")
DEFAULT_LSN = "0/16B9188"

_ROOT_MSG = """\"root\" execution of the PostgreSQL server is not permitted.
The server must be started under an unprivileged user ID to prevent
possible system security compromise.  See the documentation for
more information on how to properly start the server.
"""


def _log(level: str, msg: str) -> None:
    sys.stderr.write(f"{level}:  {msg}\n")
    sys.stderr.flush()


def _datadir(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "-D" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("-D") and len(arg) > 2:
            return arg[2:]
    return os.environ.get("PGDATA")


def _record(path: str, entry: dict) -> None:
    try:
        with open(path) as f:
            entries = json.load(f)
    except (FileNotFoundError, ValueError):
        entries = []
    entries.append(entry)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f)
    os.replace(tmp, path)


def _bump_count(path: str) -> int:
    """Returns how many invocations happened before this one."""
    try:
        with open(path) as f:
            n = int(f.read().strip() or 0)
    except FileNotFoundError:
        n = 0
    with open(path, "w") as f:
        f.write(str(n + 1))
    return n


def sync_main(argv: list[str]) -> int:
    if os.geteuid() == 0 and os.environ.get("FAKE_SK_ALLOW_ROOT") != "1":
        sys.stderr.write(_ROOT_MSG)
        return 1
    pgdata = _datadir(argv[2:])
    record = os.environ.get("FAKE_SK_RECORD")
    if record:
        expected = os.environ.get("FAKE_SK_EXPECT_TOKEN")
        token = os.environ.get("NEON_AUTH_TOKEN")
        _record(record, {"argv": argv, "pgdata": os.environ.get("PGDATA"),
                         "token_set": token is not None,
                         "token_matches": None if expected is None else token == expected,
                         "control_plane_token_set": any(os.environ.get(k) for k in (
                             "NEON_CONSOLE_JWT", "NEON_CONTROL_PLANE_TOKEN")),
                         "uid": os.geteuid()})
    if pgdata is None:
        sys.stderr.write("postgres does not know where to find the server configuration file.\n"
                         "You must specify the --config-file or -D invocation option or set the "
                         "PGDATA environment variable.\n")
        return 2
    conf = os.path.join(pgdata, "postgresql.conf")
    if not os.access(conf, os.R_OK):
        sys.stderr.write(f'postgres: could not access the server configuration file "{conf}": '
                         "No such file or directory\n")
        return 2
    fail = int(os.environ.get("FAKE_SK_FAIL", "0") or 0)
    stall = int(os.environ.get("FAKE_SK_STALL", "0") or 0)
    trickle = int(os.environ.get("FAKE_SK_TRICKLE", "0") or 0)
    if fail or stall or trickle:
        count_file = f"{record}.count" if record else os.path.join(pgdata, ".fake_sk_count")
        n = _bump_count(count_file)
        if n < fail:
            _log("LOG", "connecting to safekeepers")
            _log("FATAL", f"failed to sync safekeepers: no quorum (simulated failure {n + 1}/{fail})")
            return 1
        if n < fail + stall:
            _log("LOG", "[WP] connecting to safekeepers (they will not answer)")
            while True:
                time.sleep(3600)
        if n < fail + stall + trickle:
            for i in range(1 << 30):
                _log("LOG", f"[WP] still talking to safekeepers ({i})")
                time.sleep(0.5)
    gate = os.environ.get("FAKE_SK_GATE")
    if gate and os.path.exists(f"{gate}.armed"):
        with open(f"{gate}.waiting.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(f"{gate}.waiting.tmp", f"{gate}.waiting")
        _log("LOG", "[WP] waiting for the safekeepers to agree (gated)")
        while not os.path.exists(gate):
            time.sleep(0.02)
    _log("LOG", "[WP] connecting to safekeepers from neon.safekeepers")
    delay_ms = int(os.environ.get("FAKE_SK_DELAY_MS", "0") or 0)
    if delay_ms > 0:
        time.sleep(delay_ms / 1000)
    _log("LOG", "[WP] proposer connected to quorum (3) safekeepers, propTerm=2")
    lsn = os.environ.get("FAKE_SK_LSN", DEFAULT_LSN)
    _log("LOG", f"[WP] sync-safekeepers: commit LSN reached {lsn}")
    sys.stdout.write(f"{lsn}\n")
    sys.stdout.flush()
    return 0


def _trace(event: str) -> None:
    path = os.environ.get("COMPUTE_TRACE")
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    except OSError:  # as compute/base/trace.py: a timeline it cannot write is no failure
        return
    try:
        os.write(fd, f"{time.monotonic():.6f} {os.getpid()} {event}\n".encode())
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) > 1 and argv[1] == "--sync-safekeepers":
        _trace("sync stand-in: started")
        try:
            return sync_main(argv)
        finally:
            _trace("sync stand-in: done")
    # argv[0] must be the real path: postgres finds its share/lib dirs relative to it.
    os.execv(REAL_POSTGRES, [REAL_POSTGRES, *argv[1:]])
    return 127  # not reached


def write_fake_postgres(dir: str) -> str:
    """Install this stand-in as `<dir>/postgres` (+ symlinks to the other real binaries, so
    `dirname(-b)` still works as a bin dir for initdb & co). Returns the path. `dir` must be
    searchable by the user that will run it (scratch_dir() is)."""
    path = os.path.join(dir, "postgres")
    with open(__file__) as src:
        body = src.read()
    if not body.startswith("#!/usr/bin/python3\n"):
        raise RuntimeError("the stand-in must keep its /usr/bin/python3 shebang")
    with open(path, "w") as f:
        f.write(body)
    os.chmod(path, 0o755)
    link_real_binaries(dir, but=("postgres", "postmaster"))
    return path


def link_real_binaries(dir: str, but: tuple[str, ...]) -> None:
    """Link PostgreSQL's real binaries into `dir`, except `but` (a stand-in's names), so that
    `dirname(-b)` is still a whole bin dir (initdb & co)."""
    for name in os.listdir(REAL_PGBIN_DIR):
        link = os.path.join(dir, name)
        if name not in but and not os.path.lexists(link):
            os.symlink(os.path.join(REAL_PGBIN_DIR, name), link)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
