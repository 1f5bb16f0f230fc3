"""`compute-ctl`: the bootstrap, then supervisord itself. Validates everything it can before
touching anything, prepares the runtime dir and the state file, renders supervisord.conf, then
runs supervisord's loop in its own process (one PID, PID 1 in a container) and exits with
postgres' exit code once every program has stopped.

The slow steps (PGDATA, storage, postgres) happen in the supervised `lifecycle` program, so
the HTTP API answers `/status` from the first second. The tree's log lines reach stdout
through supervisord's in-process log relay (compute/tree/logrelay.py).

Before anything heavy is imported (psycopg, supervisor, falcon, gunicorn: see `python -X
importtime`), compute-ctl parses its flags, binds the API socket and starts the early
responder (compute/boot/early_responder.py), which answers /status & co. until the api serves.
So this module imports only the standard library and light modules of ours at its top; the
rest is imported where it is used (bootstrap() and the validators), after the responder runs.
"""

from __future__ import annotations

from compute.base.trace import mark

mark("compute-ctl: python started")

import argparse
import ipaddress
import logging
import os
import sys
import time

from compute import __version__
from compute.api.handover import handover_path
from compute.api.listener import API_FD_ENV, BindError, bind_api_socket
from compute.boot.early_responder import EarlyResponder
from compute.base.logs import setup_bootstrap_logging
from compute.boot.paths import Policy, default_runtime_dir, secure_dir
from compute.base.rlimits import ensure_limits
from compute.model.launch import LaunchSettings, default
from compute.base.stdout_buffer import STDERR, STDOUT, BoundedTextStream

log = logging.getLogger("compute.boot.cli")

DEFAULT_VM_INFORMANT = "/bin/vm-informant"
POSTGRES_EXPORTER_PORT = default("postgres_exporter_port")
EXIT_UNEXPECTED = 1


class UsageError(Exception):
    pass


# Every environment variable compute-ctl reads (itself, or its programs from the environment it
# passes on), as --help lists them (tests/unit/test_cli_help.py checks the list against the code).
# Set by compute-ctl for its programs, not read from the operator: COMPUTE_RUNTIME_DIR,
# COMPUTE_API_FD, COMPUTE_SUPERVISORD_PID, PGPASSFILE. Written out: no textwrap before the bind.
EPILOG = (
    "Exactly one spec source: -s, -S, or -i with -p. Operators: supervisorctl -c\n"
    "RUNTIME_DIR/supervisord.conf status. Sub-command: `compute-ctl plan -C CONNSTR\n"
    "-S SPEC` prints the SQL a reconfiguration would run, without running it.\n"
    "\n"
    "environment variables:\n"
    "  NEON_CONTROL_PLANE_TOKEN, NEON_CONSOLE_JWT\n"
    "      pull mode: the Authorization sent to the control plane (the first\n"
    "      that is set)\n"
    "  NEON_AUTH_TOKEN\n"
    "      the storage token when the spec has no storage_auth_token\n"
    "  PATH\n"
    "      finds postgres (-b), initdb, pg_basebackup\n"
    "  USER\n"
    "      the default --runtime-dir when not root\n"
    "  PGHOST, PGSSLMODE, ...\n"
    "      libpq's own variables, for the -C connstr\n"
    "  COMPUTE_API_WORKERS, COMPUTE_API_THREADS, COMPUTE_API_CONNECTIONS\n"
    "      the api's gunicorn workers (1), threads (16), connections (256)\n"
    "  COMPUTE_API_ACCESS_LOG\n"
    "      1: the api logs every request\n"
    "  COMPUTE_API_FAST_PATH, COMPUTE_API_POLLER_SENDS\n"
    "      0: turns that api worker path off\n"
    "  COMPUTE_API_SWITCH_INTERVAL\n"
    "      the api worker's sys.setswitchinterval\n"
    "  COMPUTE_TEMPLATE_DIR\n"
    "      supervisord.conf's templates (default: the installed ones)\n"
    "  COMPUTE_TRACE, COMPUTE_WARMFORK_TRACE\n"
    "      benchmarks: start-up timeline file, imports-after-fork dir"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compute-ctl",
        description="Start a Postgres compute node from a spec, as a supervisord-managed process\n"
                    "tree (Neon compute_ctl compatible). Exits with postgres' exit code.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the epilog's list keeps its lines
    )
    p.add_argument("-D", "--pgdata", required=True, help="data directory; emptied at every start")
    p.add_argument("-C", "--connstr", required=True,
                   help="superuser connection string to the local postgres, "
                        "e.g. postgresql://cloud_admin@127.0.0.1:55432/postgres")
    p.add_argument("-b", "--pgbin", default=default("pgbin"),
                   help="postgres binary (default: postgres from PATH); also runs --sync-safekeepers")
    p.add_argument("-s", "--spec", help="the spec as inline JSON")
    p.add_argument("-S", "--spec-path", help="the spec as a JSON file")
    p.add_argument("-i", "--compute-id", help="pull mode: this compute's id at the control plane")
    p.add_argument("-p", "--control-plane-uri",
                   help="pull mode: fetch {URI}/management/api/v2/computes/{ID}/spec "
                        "(Authorization from env NEON_CONTROL_PLANE_TOKEN or NEON_CONSOLE_JWT); enables POST /configure")
    p.add_argument("--http-port", type=int, default=default("http_port"), help="HTTP API port (default 3080)")
    p.add_argument("--http-address", default=default("http_address"),
                   help="IP address the HTTP API binds to (default 0.0.0.0: all interfaces); "
                        "e.g. 127.0.0.1 or the pod IP")
    p.add_argument("--runtime-dir", default=None,
                   help="rendered supervisord.conf, its control socket, the state file and logs "
                        "(default /run/compute-ctl as root, else /tmp/compute-ctl-$USER); never inside PGDATA")
    p.add_argument("--user", default="postgres",
                   help="when started as root, run everything as this unprivileged user (default postgres)")
    p.add_argument("--vm-informant", default=DEFAULT_VM_INFORMANT,
                   help=f"vm-informant binary, supervised when it exists (default {DEFAULT_VM_INFORMANT})")
    p.add_argument("--postgres-exporter", default=None,
                   help="postgres metrics exporter binary (Debian's prometheus-postgres-exporter), "
                        "supervised when given; connects as the superuser, no password")
    p.add_argument("--postgres-exporter-port", type=int, default=POSTGRES_EXPORTER_PORT,
                   help=f"port of the exporter's /metrics, all interfaces (default {POSTGRES_EXPORTER_PORT})")
    p.add_argument("--grace-seconds", type=float, default=default("grace_seconds"),
                   help="after a failed start, keep serving the error on /status this long, then exit 1 (default 30)")
    p.add_argument("--monitor-interval", type=float, default=default("monitor_interval"),
                   help="activity monitor period in seconds (default 0.5)")
    p.add_argument("--jwks", default=None,
                   help="JWKS file (Ed25519/RS256 keys): every HTTP route but /metrics, /healthz and /readyz "
                        "then needs a bearer JWT (Neon's rules: docs/api.md). Without a JWKS the routes that "
                        "change state or return database contents answer loopback clients only")
    p.add_argument("--jwt-require-exp", action="store_true", default=default("jwt_require_exp"),
                   help="refuse tokens without an `exp` claim (Neon accepts them; exp is checked when present)")
    p.add_argument("--lock-timeout", type=float, default=default("lock_timeout"),
                   help="seconds a statement applying the spec may wait for a lock (default 10; 0: forever)")
    p.add_argument("--statement-timeout", type=float, default=default("statement_timeout"),
                   help="seconds a statement applying the spec may run (default 300; 0: forever)")
    p.add_argument("--log-format", choices=("text", "json"), default=default("log_format"), help="output format (default text)")
    p.add_argument("--storage-timeout", type=float, default=default("storage_timeout"), metavar="SECONDS",
                   help="fail a sync-safekeepers or basebackup attempt after this long without progress "
                        "(connect, auth, or between chunks); attempts are retried (default 60)")
    p.add_argument("--attempt-deadline", type=float, default=default("attempt_deadline"), metavar="SECONDS",
                   help="fail one attempt of any outbound request (the control plane's spec, "
                        "sync-safekeepers, the basebackup, the clone of a primary) after this long in "
                        "all, even with progress; at least --storage-timeout; attempts are retried "
                        "(default 300)")
    p.add_argument("--basebackup-compression", choices=("none", "gzip"), default="none",
                   help="gzip: ask the pageserver for `basebackup ... --gzip` and inflate it as it "
                        "arrives (pageservers since mid-2023; default none)")
    p.add_argument("--version", action="version", version=f"compute-ctl {__version__}")
    return p


def _check_path(name: str, path: str) -> str:
    if any(ch in path for ch in "\n\r\x00\",%"):
        raise UsageError(f"{name} {path!r}: must not contain newlines, quotes, commas or %")
    return os.path.abspath(path)


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def resolve_pgbin(pgbin: str) -> str:
    import shutil
    found = pgbin if os.sep in pgbin else shutil.which(pgbin)
    if not found or not os.access(found, os.X_OK):
        raise UsageError(f"--pgbin {pgbin!r}: not an executable (give the full path, e.g. "
                         "/usr/lib/postgresql/15/bin/postgres)")
    return os.path.abspath(found)


def resolve_pgbin_dir(pgbin: str) -> str:
    """Where initdb lives for the embedded default: next to pgbin, or next to what it links to."""
    for d in (os.path.dirname(pgbin), os.path.dirname(os.path.realpath(pgbin)), "/usr/lib/postgresql/15/bin"):
        if os.access(os.path.join(d, "initdb"), os.X_OK):
            return d
    return os.path.dirname(pgbin)


def require_superuser(connstr: str) -> str:
    """The superuser -C names (compute/postgres/sessions.py: named_superuser); UsageError otherwise."""
    from compute.postgres.sessions import named_superuser
    try:
        return named_superuser(connstr)
    except ValueError as e:
        raise UsageError(str(e)) from None


def validate_flags(args: argparse.Namespace) -> None:
    """The flags on their own (standard library only): checked before the API socket is bound,
    so a bad flag never binds, answers or touches anything."""
    sources = [x for x in (args.spec, args.spec_path) if x is not None]
    pull = args.compute_id is not None or args.control_plane_uri is not None
    if pull and (args.compute_id is None or args.control_plane_uri is None):
        raise UsageError("-i/--compute-id and -p/--control-plane-uri go together")
    if len(sources) + pull != 1:
        raise UsageError("give exactly one spec source: -s JSON, -S FILE, or -i ID with -p URI")
    if not (0 < args.http_port < 65536):
        raise UsageError("--http-port must be 1..65535")
    if not (0 < args.postgres_exporter_port < 65536) or (
            args.postgres_exporter and args.postgres_exporter_port == args.http_port):
        raise UsageError("--postgres-exporter-port must be 1..65535 and differ from --http-port")
    if args.postgres_exporter and not os.access(args.postgres_exporter, os.X_OK):
        raise UsageError(f"--postgres-exporter {args.postgres_exporter!r}: not an executable")
    if args.monitor_interval <= 0 or args.grace_seconds < 0:
        raise UsageError("--monitor-interval must be > 0 and --grace-seconds >= 0")
    for flag, value in (("--lock-timeout", args.lock_timeout), ("--statement-timeout", args.statement_timeout)):
        if not (0 <= value <= 86400):  # NaN fails too
            raise UsageError(f"{flag} must be 0..86400 seconds")
    args.http_address = http_address(args.http_address)
    if not (1 <= args.storage_timeout <= 86400):  # also refuses nan
        raise UsageError("--storage-timeout must be between 1 and 86400 seconds")
    if not (1 <= args.attempt_deadline <= 86400):
        raise UsageError("--attempt-deadline must be between 1 and 86400 seconds")
    if args.attempt_deadline < args.storage_timeout:  # the silence bound would never act
        raise UsageError("--attempt-deadline must be at least --storage-timeout")
    limit_error = ensure_limits()  # what supervisord needs, checked before the bind (compute/base/rlimits.py)
    if limit_error:
        raise UsageError(limit_error)


def validate(args: argparse.Namespace) -> tuple[dict | None, str]:
    """What needs psycopg: the connection string and the spec (after validate_flags, and after
    the bind: the early responder answers meanwhile). Nothing is touched yet. Returns (stored
    document, parsed spec, superuser): the document is the parsed spec written back
    (spec.to_document), which every program reads typed without parsing it again."""
    from compute.model.spec import parse_spec_text, read_spec_file, to_document
    superuser = require_superuser(args.connstr)
    doc = spec = None
    if args.compute_id is None:  # not pull mode (validate_flags: exactly one spec source)
        text = args.spec if args.spec is not None else read_spec_file(args.spec_path)
        spec = parse_spec_text(text, superuser=superuser)
        doc = to_document(spec)
    return doc, spec, superuser


def spec_identity(spec) -> dict:
    """The tenant and timeline a validated spec names (None without storage or spec): /status
    shows them from the start, as the original does."""
    return {"tenant": spec.tenant_id if spec else None, "timeline": spec.timeline_id if spec else None}


def http_address(text: str) -> str:
    """The --http-address as a normalised IP literal (v4 or v6, no brackets)."""
    try:
        return str(ipaddress.ip_address(text.strip().strip("[]")))
    except ValueError:
        raise UsageError(f"--http-address {text!r}: not an IP address (e.g. 0.0.0.0, 127.0.0.1, ::1)") from None


def exposure_warning(address: str, jwks: str | None) -> str | None:
    """The warning for an API that listens beyond loopback without a JWKS (any mode), or None."""
    if jwks or ipaddress.ip_address(address).is_loopback:
        return None
    return (f"!!! the HTTP API listens on {address} (not loopback) without a JWKS: /configure, /promote, "
            "/terminate and the routes that return database contents answer only clients on this machine "
            "(403 for the others), and /status, /metrics.json, /info are open to anyone who reaches the port. "
            "Give --jwks (or compute_ctl_config.jwks) to drive this compute from the network with tokens, or "
            "--http-address 127.0.0.1 !!!")


def token_warning(jwks: str | None, compute_id: str | None) -> str | None:
    """A JWKS without a compute id: only admin tokens can ever be accepted (the others must name
    this compute's id: compute/api/access.py)."""
    if not jwks or compute_id:
        return None
    return ("a JWKS without -i/--compute-id: only admin tokens (scope compute_ctl:admin, aud [\"compute\"]) "
            "are accepted; tokens naming a compute_id get 403")


def check_dirs(runtime_dir: str, pgdata: str, user) -> None:
    """Refuse (PathError) a PGDATA or runtime dir we must not take over; changes nothing."""
    from compute.postgres.conf import BEGIN_MARK
    policy = Policy.for_process(user.uid)
    secure_dir(runtime_dir, policy, what="--runtime-dir", uid=user.uid, gid=user.gid, dry_run=True)
    secure_dir(pgdata, policy, what="--pgdata", uid=user.uid, gid=user.gid,
               pgdata_marker=BEGIN_MARK, dry_run=True)


def prepare_dirs(runtime_dir: str, pgdata: str, user) -> None:
    """The two directories, 0700 and the user's, reached without following anyone's symlink
    (compute/boot/paths.py). PGDATA is emptied by the driver (as the user), not here. Everything
    inside the runtime dir is made after dropping root (prepare_runtime_files)."""
    from compute.postgres.conf import BEGIN_MARK
    policy = Policy.for_process(user.uid)
    secure_dir(runtime_dir, policy, what="--runtime-dir", uid=user.uid, gid=user.gid)
    secure_dir(pgdata, policy, what="--pgdata", uid=user.uid, gid=user.gid, pgdata_marker=BEGIN_MARK)


def prepare_runtime_files(runtime_dir: str) -> None:
    """As the compute user: root never creates or chowns anything the user could have planted."""
    os.makedirs(os.path.join(runtime_dir, "logs"), mode=0o700, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "plan":
        from compute.boot.plan_command import main as plan_main
        return plan_main(argv[1:])
    mark("compute-ctl: imported")
    args = build_parser().parse_args(argv)
    setup_bootstrap_logging(args.log_format)
    try:
        validate_flags(args)
        # Bound now, as root (a port < 1024 works) and before anything is touched; held until
        # we exit, served by the api program (compute/api/listener.py).
        api_sock = bind_api_socket(args.http_address, args.http_port)
    except (UsageError, BindError) as e:
        print(f"compute-ctl: {e}", file=sys.stderr)
        return 1
    started = time.time()
    # /status & co. answered from here on (the state we know: `init`), while we import,
    # validate and start the tree; the api takes over the rest (compute/boot/early_responder.py).
    # It may answer `init` for a compute that then exits 1 (a bad connection string, spec,
    # path or user: checked next, each a one-line error): never more than that.
    responder = EarlyResponder(api_sock, started=started, jwks=bool(args.jwks)).start()
    try:
        return bootstrap(args, api_sock, responder, started)
    finally:
        responder.stop()  # bounded; on every way out
        # Our last lines, while stdout's reader keeps reading; a stopped one costs ~1 s, then
        # they are dropped (compute/base/stdout_buffer.py): the exit never waits for it.
        STDOUT.drain()
        STDERR.drain()


def bootstrap(args: argparse.Namespace, api_sock, responder: EarlyResponder, started: float) -> int:
    """Everything after the bind: validate, prepare, render, drop root, become supervisord."""
    from compute.model.environ import SECRET_VARS, program_secrets, supervisord_environment
    from compute.tree.exit_decision import tree_exit_code
    from compute.programs.postgres_exporter import exporter_dsn
    from compute.base.procutil import become_subreaper, scrub_initial_environment
    from compute.tree.reaper import stop_descendants
    from compute.model.spec import SpecError
    from compute.shared.state import RUNTIME_DIR_ENV, StateStore, state_path
    from compute.tree.supervisord_conf import CONF_NAME, render_supervisord_conf
    from compute.tree.supervisord import STOP_BY_RPC, run as run_supervisord
    from compute.boot.users import effective_user
    try:
        spec_doc, spec, superuser = validate(args)
        identity = spec_identity(spec)
        responder.known(**identity)
        pgbin = resolve_pgbin(args.pgbin)
        pgdata = _check_path("--pgdata", args.pgdata)
        runtime_dir = _check_path("--runtime-dir", args.runtime_dir or default_runtime_dir())
        if _inside(runtime_dir, pgdata) or _inside(pgdata, runtime_dir):
            raise UsageError("--runtime-dir and --pgdata must not contain each other (PGDATA is wiped)")
        user = effective_user(args.user)
        check_dirs(runtime_dir, pgdata, user)
    except (UsageError, SpecError, ValueError) as e:
        print(f"compute-ctl: {e}", file=sys.stderr)
        return 1

    vm_informant = args.vm_informant if args.vm_informant and os.access(args.vm_informant, os.X_OK) else None
    settings = LaunchSettings(
        pgdata=pgdata, connstr=args.connstr, pgbin=pgbin, pgbin_dir=resolve_pgbin_dir(pgbin),
        superuser=superuser, http_port=args.http_port, http_address=args.http_address,
        runtime_dir=runtime_dir, lock_timeout=args.lock_timeout,
        statement_timeout=args.statement_timeout,
        compute_id=args.compute_id, control_plane_uri=args.control_plane_uri,
        grace_seconds=args.grace_seconds, monitor_interval=args.monitor_interval,
        jwks_path=os.path.abspath(args.jwks) if args.jwks else None, jwt_require_exp=args.jwt_require_exp,
        log_format=args.log_format,
        vm_informant=vm_informant,
        postgres_exporter=os.path.abspath(args.postgres_exporter) if args.postgres_exporter else None,
        postgres_exporter_port=args.postgres_exporter_port, storage_timeout=args.storage_timeout,
        attempt_deadline=args.attempt_deadline,
        basebackup_compression=None if args.basebackup_compression == "none" else args.basebackup_compression,
    )
    try:
        prepare_dirs(runtime_dir, pgdata, user)
        # Our programs are forked from us (compute/tree/warmfork.py) and would show our initial
        # environment in /proc/PID/environ: the secrets go from it (lifecycle gets them from
        # the conf's per-program environment). Before demote: then /proc/self is no longer ours.
        scrub_initial_environment(SECRET_VARS)
        user.demote()  # from here on nothing runs as root
        prepare_runtime_files(runtime_dir)
        responder.offer_handover(handover_path(runtime_dir))  # as the user: 0600, ours
        if not os.access(sys.executable, os.X_OK):
            raise UsageError(f"{sys.executable} is not executable by user {user.name}: install "
                             "compute-supervisor where that user can read it (scripts/install.sh)")
        informant_connstr = f"dbname=postgres user={superuser} sslmode=disable"
        conf = render_supervisord_conf(
            runtime_dir=runtime_dir, pgdata=pgdata, pgbin=pgbin, python=sys.executable,
            auth_token=spec.storage_auth_token if spec else None, vm_informant=vm_informant,
            informant_connstr=informant_connstr,
            postgres_exporter=settings.postgres_exporter, postgres_exporter_port=args.postgres_exporter_port,
            exporter_dsn=exporter_dsn(args.connstr) if args.postgres_exporter else "",
            program_env=program_secrets(os.environ, spec.storage_auth_token if spec else None))
        old = os.umask(0o077)  # the conf may carry the storage token
        try:
            with open(os.path.join(runtime_dir, CONF_NAME), "w") as f:
                f.write(conf)
        finally:
            os.umask(old)
        StateStore.create(state_path(runtime_dir), {
            # last_active starts at the start (as the original): a compute nobody ever connects
            # to must still look idle since then, not "never", to be suspended. `started` and
            # the spec's tenant/timeline are what the early responder has answered so far.
            "launch": settings.to_json(), "status": "init", "error": None, "start_time": started, "last_active": started,
            "spec": spec_doc, "spec_generation": 1 if spec_doc else 0, "metrics": {}, **identity,
        })
        responder.jwks_known(bool(settings.jwks_path))
        responder.state_ready(state_path(runtime_dir))
    except (OSError, UsageError, ValueError) as e:
        print(f"compute-ctl: {e}", file=sys.stderr)
        return 1

    mark("compute-ctl: validated, rendered")
    become_subreaper()
    log.info("starting compute: PGDATA %s, HTTP %s port %d, runtime dir %s, user %s",
             pgdata, args.http_address, args.http_port, runtime_dir, user.name)
    for warning in (exposure_warning(args.http_address, settings.jwks_path),
                    token_warning(settings.jwks_path, settings.compute_id)):
        if warning:
            log.warning("%s", warning)
    # From here on we are supervisord (one PID for the life of the compute): its loop runs in
    # this process until every program has stopped. PYTHONSAFEPATH: `python -m` must not
    # import from the working directory (a `compute/` or `gunicorn.py` there would shadow the
    # installed package in every program). No secrets: each goes only to the program that
    # needs it (compute/model/environ.py, the conf's per-program environment).
    env = {**supervisord_environment(os.environ), RUNTIME_DIR_ENV: runtime_dir, "PYTHONSAFEPATH": "1",
           API_FD_ENV: str(api_sock.fileno())}
    os.environ.clear()
    os.environ.update(env)
    sys.stderr = BoundedTextStream(STDERR)  # nothing of the loop waits for stderr's reader either
    stopped_by = run_supervisord(os.path.join(runtime_dir, CONF_NAME))
    responder.stop()  # if the api never took over: the tree is down, nothing is answered any more
    # Whatever the path (postgres exited, SIGTERM, /terminate, failed start), nothing of the
    # tree outlives us: as the subreaper we see all of it.
    stop_descendants(pgdata)
    api_sock.close()
    code = tree_exit_code(StateStore(state_path(runtime_dir)).get("exit_code"),
                          stopped_by_signal=stopped_by not in (None, STOP_BY_RPC),
                          stopped_by_rpc=stopped_by == STOP_BY_RPC)
    if code is None:
        log.error("supervisord stopped unexpectedly")
        code = EXIT_UNEXPECTED
    log.info("compute stopped: exit code %d", code)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
