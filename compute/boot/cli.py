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

import gc
import sys

# No cyclic garbage collection until the lifecycle driver is forked (bootstrap turns it back
# on): the imports and the validation make few cycles, and the collector's passes over the
# growing heap were ~4 ms of CPU on the path from exec to the first storage request. The early
# driver inherits this and turns it back on once it has imported itself (compute/lifecycle/early.py).
# Only as the program (its console script): a process importing this module (the tests) keeps its own.
def is_the_program(argv: list[str]) -> bool:
    return bool(argv) and argv[0].rsplit("/", 1)[-1] == "compute-ctl"


SUBCOMMANDS = ("plan", "supervisorctl")  # compute-ctl's other uses: not a start (main)

if is_the_program(sys.argv):
    gc.disable()
    if not (len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS):
        # Our title at once, before the flags are even parsed: they may hold a password (-C) or a
        # spec with password hashes (-s), which every user can read in `ps` until the title
        # replaces them (compute/base/proctitle.py). Set again with the runtime dir once known.
        from compute.base import proctitle
        proctitle.set_title("bootstrap", None, comm="compute-ctl")

import argparse
import functools
import ipaddress
import logging
import os
import re
import time

from compute import __version__
from compute.api.handover import handover_path
from compute.api.listener import API_FD_ENV, INTERNAL_FD_ENV, BindError, bind_api_socket
from compute.boot.early_responder import EarlyResponder
from compute.base.logs import setup_bootstrap_logging
from compute.boot.paths import Policy, default_runtime_dir, secure_dir
from compute.base.rlimits import ensure_limits
from compute.model.launch import CONTROL_PLANE_APIS, LaunchSettings, default
from compute.base.stdout_buffer import STDERR, STDOUT, BoundedTextStream

log = logging.getLogger("compute.boot.cli")

DEFAULT_VM_INFORMANT = "/bin/vm-informant"
POSTGRES_EXPORTER_PORT = default("postgres_exporter_port")
EXIT_UNEXPECTED = 1
PGBIN_ENV = "POSTGRES_PATH"  # -b's default, as Neon's compute_ctl reads it


class UsageError(Exception):
    pass


# Every environment variable compute-ctl reads (itself, or its programs from the environment it
# passes on), as --help lists them (tests/unit/test_cli_help.py checks the list against the code).
# Set by compute-ctl for its programs, not read from the operator: COMPUTE_RUNTIME_DIR,
# COMPUTE_API_FD, COMPUTE_SUPERVISORD_PID, COMPUTE_STATE_FILE_ID, PGPASSFILE. Written out: no
# textwrap before the bind.
EPILOG = (
    "Exactly one spec source: -c, -s, -S, or -i with -p. Sub-commands:\n"
    "  compute-ctl supervisorctl [--runtime-dir DIR] status|restart monitor|tail -f api...\n"
    "      supervisorctl against the compute's supervisord (RUNTIME_DIR/supervisord.conf)\n"
    "  compute-ctl plan -C CONNSTR -S SPEC [--runtime-dir DIR]\n"
    "      the SQL and setting changes a reconfiguration would make, without making them\n"
    "\n"
    "environment variables:\n"
    "  NEON_CONTROL_PLANE_TOKEN, NEON_CONSOLE_JWT\n"
    "      pull mode: the token sent to the control plane (the first that is\n"
    "      set; only the lifecycle driver gets it)\n"
    "  POSTGRES_PATH\n"
    "      -b's default\n"
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
        # argparse makes a formatter at every add_argument (to check nargs); without a width each
        # looks the terminal up, importing shutil (bz2, lzma: ~2 ms of the start, issue 22).
        formatter_class=functools.partial(argparse.RawDescriptionHelpFormatter, width=80),
    )
    p.add_argument("-D", "--pgdata", required=True, help="data directory; emptied at every start")
    p.add_argument("-C", "--connstr", required=True,
                   help="superuser connection string to the local postgres, "
                        "e.g. postgresql://cloud_admin@127.0.0.1:55432/postgres")
    p.add_argument("-b", "--pgbin", default=os.environ.get(PGBIN_ENV) or default("pgbin"),
                   help=f"postgres binary (default: ${PGBIN_ENV}, else postgres from PATH); also runs "
                        "--sync-safekeepers")
    p.add_argument("-c", "--config", metavar="FILE",
                   help='Neon\'s config file: {"spec": SPEC or null, "compute_ctl_config": {"jwks": ..., '
                        '"tls": ...}}; a null spec starts `empty` until POST /configure')
    p.add_argument("-s", "--spec", help="the spec as inline JSON")
    p.add_argument("-S", "--spec-path", help="the spec as a JSON file")
    p.add_argument("-i", "--compute-id", help="this compute's id (tokens' compute_id; pull mode: its id at the control plane)")
    p.add_argument("-p", "--control-plane-uri", metavar="URI",
                   help="pull mode (needs -i): fetch {URI}/compute/api/v2/computes/{ID}/spec with "
                        "`Authorization: Bearer $NEON_CONTROL_PLANE_TOKEN` (or --control-plane-api 2023: "
                        "{URI}/management/api/v2/computes/{ID}/spec, the token sent raw); enables POST /configure")
    p.add_argument("--control-plane-api", choices=CONTROL_PLANE_APIS, default=default("control_plane_api"),
                   help="pull mode's protocol: v2 (Neon's compute_ctl today, default) or 2023 (the 2023 route "
                        "and answer)")
    p.add_argument("--external-http-port", dest="http_port", type=_port, default=default("http_port"),
                   action=_PortFlag, metavar="PORT", help="HTTP API port (default 3080); the same as --http-port")
    p.add_argument("--internal-http-port", type=_port, default=default("internal_http_port"), action=_PortFlag,
                   metavar="PORT", help="Neon's internal API port (default 3081): POST /grants, /extensions, no "
                   "token; served only when this flag or --internal-http-address is given")
    p.add_argument("--http-port", type=int, default=default("http_port"), action=_PortFlag,
                   help="HTTP API port (default 3080); not with --external-http-port or --internal-http-port")
    p.add_argument("--http-address", default=default("http_address"),
                   help="IP address the HTTP API binds to (default 0.0.0.0: all interfaces); "
                        "e.g. 127.0.0.1 or the pod IP")
    p.add_argument("--internal-http-address", default=None, metavar="ADDRESS",
                   help="IP address the internal API binds to (default 127.0.0.1: loopback, and only loopback "
                        "clients are answered); another address opens it to whoever reaches it (a warning at start)")
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
    ignored = p.add_argument_group("accepted for Neon's compute_ctl, ignored (each given one logs one line)")
    ignored.add_argument("-r", "--remote-ext-base-url", type=_remote_ext_base_url, default=IGNORED_UNSET,
                         metavar="URL", help="remote extensions gateway (no query string)")
    ignored.add_argument("--privileged-role-name", type=_privileged_role_name, default=IGNORED_UNSET,
                         metavar="NAME", help="[a-z_]+ (HEAD's default neon_superuser)")
    for flag in ("--cgroup", "--filecache-connstr", "--vm-monitor-addr", "--set-disk-quota-for-fs"):
        ignored.add_argument(flag, default=IGNORED_UNSET, metavar="VALUE")
    for flag in ("--installed-extensions-collection-interval", "--pg-init-timeout"):
        ignored.add_argument(flag, type=_u64, default=IGNORED_UNSET, metavar="SECONDS")
    ignored.add_argument("--lakebase-mode", type=_clap_bool, default=IGNORED_UNSET, metavar="true|false")
    for flag in ("--dev", "--resize-swap-on-bind"):
        ignored.add_argument(flag, action="store_const", const=True, default=IGNORED_UNSET)
    # Help, usage and errors: the terminal's width, looked up only when one is printed.
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # the epilog's list keeps its lines
    return p


IGNORED_UNSET = None
# HEAD's flags for features we do not implement: accepted with HEAD's value syntax, each one
# given logs one line (ignored_flag_lines), none changes anything.
IGNORED_FLAGS = {
    "remote_ext_base_url": ("-r/--remote-ext-base-url", "remote extensions are not supported"),
    "privileged_role_name": ("--privileged-role-name", "the neon_superuser catalog model is not implemented"),
    "cgroup": ("--cgroup", "no cgroup or vm-monitor here (--vm-informant is ours)"),
    "filecache_connstr": ("--filecache-connstr", "no vm-monitor here (--vm-informant is ours)"),
    "vm_monitor_addr": ("--vm-monitor-addr", "no vm-monitor here (--vm-informant is ours)"),
    "resize_swap_on_bind": ("--resize-swap-on-bind", "swap is not managed here"),
    "set_disk_quota_for_fs": ("--set-disk-quota-for-fs", "disk quotas are not managed here"),
    "installed_extensions_collection_interval": ("--installed-extensions-collection-interval",
                                                 "installed extensions are not collected periodically"),
    "dev": ("--dev", "nothing here kills pgbouncer or local_proxy at termination"),
    "pg_init_timeout": ("--pg-init-timeout", "lakebase mode only (see --grace-seconds)"),
    "lakebase_mode": ("--lakebase-mode", "lakebase mode is not supported"),
}


def ignored_flag_lines(args: argparse.Namespace) -> list[str]:
    """One line per ignored flag given (no value: a connstr may carry a password)."""
    return [f"{flag} ignored: {why}" for dest, (flag, why) in IGNORED_FLAGS.items()
            if getattr(args, dest, IGNORED_UNSET) is not IGNORED_UNSET]


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"{value} is not in 1..65535")
    return value


def _u64(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) >= 2**64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def _clap_bool(text: str) -> bool:
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return text == "true"


def _privileged_role_name(text: str) -> str:
    if not re.fullmatch(r"[a-z_]+", text):
        raise argparse.ArgumentTypeError("can only contain lowercase letters and underscores")
    return text


def _remote_ext_base_url(text: str) -> str:
    """As HEAD: trailing slashes normalised to one; an absolute URL without a query string."""
    import urllib.parse  # here: only this ignored flag needs it before the fork (issue 22)
    value = text.rstrip("/") + "/"
    parsed = urllib.parse.urlsplit(value)
    if not parsed.scheme or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", parsed.scheme) or any(
            ch.isspace() for ch in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not an absolute URL")
    if parsed.query:
        raise argparse.ArgumentTypeError("parameters detected in remote extensions base URL")
    return value


class _PortFlag(argparse.Action):
    """Stores the port and remembers which port flags were given (HEAD's conflicts)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.port_flags_given = getattr(namespace, "port_flags_given", ()) + (option_string,)


def resolve_ports(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--http-port (ours) is --external-http-port's other name; as HEAD, it conflicts with both
    port flags (exit 2)."""
    given = getattr(args, "port_flags_given", ())
    if "--http-port" in given and ("--external-http-port" in given or "--internal-http-port" in given):
        parser.error("--http-port cannot be used with --external-http-port or --internal-http-port")
    args.internal_http_port_given = "--internal-http-port" in given


def check_conflicts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """HEAD's argument rules, as clap says them (usage error, exit 2)."""
    if args.config is not None and args.control_plane_uri is not None:
        parser.error("argument -c/--config: not allowed with argument -p/--control-plane-uri")
    if args.control_plane_uri is not None and args.compute_id is None:
        parser.error("argument -p/--control-plane-uri: requires -i/--compute-id")


def _check_path(name: str, path: str) -> str:
    if any(ch in path for ch in "\n\r\x00\",%"):
        raise UsageError(f"{name} {path!r}: must not contain newlines, quotes, commas or %")
    return os.path.abspath(path)


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def resolve_pgbin(pgbin: str, path: str | None = None) -> str:
    """-b's binary: a name is looked up on PATH (as execvp would), a path must be executable."""
    path = os.environ.get("PATH", os.defpath) if path is None else path
    example = "give the full path, e.g. -b /usr/lib/postgresql/15/bin/postgres"
    if os.sep not in pgbin:
        found = _which(pgbin, path)
        if not found:
            raise UsageError(f"-b/--pgbin {pgbin!r}: no executable {pgbin!r} on PATH ({path}): "
                             f"{example}, or add its directory to PATH")
        return os.path.abspath(found)
    if not os.path.exists(pgbin):
        raise UsageError(f"-b/--pgbin {pgbin!r}: no such file: {example}")
    if os.path.isdir(pgbin) or not os.access(pgbin, os.X_OK):
        st = os.stat(pgbin)
        raise UsageError(f"-b/--pgbin {pgbin!r}: not an executable file for uid {os.geteuid()} "
                         f"(found: {'a directory, ' if os.path.isdir(pgbin) else ''}owner uid {st.st_uid}, "
                         f"mode {st.st_mode & 0o7777:04o}): {example}")
    return os.path.abspath(pgbin)


def _which(name: str, path: str) -> str | None:
    """shutil.which(name, path=path) on POSIX, without importing shutil (bz2, lzma: ~5 ms on
    compute-ctl's path to its first storage request, issue 22)."""
    if not path:
        return None
    seen = set()
    for d in path.split(os.pathsep):
        if d in seen:
            continue
        seen.add(d)
        candidate = os.path.join(d, name)
        if os.path.exists(candidate) and os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def resolve_pgbin_dir(pgbin: str) -> str:
    """Where initdb lives for the embedded default: next to pgbin, or next to what it links to."""
    for d in (os.path.dirname(pgbin), os.path.dirname(os.path.realpath(pgbin)), "/usr/lib/postgresql/15/bin"):
        if os.access(os.path.join(d, "initdb"), os.X_OK):
            return d
    return os.path.dirname(pgbin)


def _exporter_dsn(connstr: str) -> str:
    from compute.programs.postgres_exporter import exporter_dsn
    return exporter_dsn(connstr)


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
    sources = [x for x in (args.spec, args.spec_path, args.config, args.control_plane_uri) if x is not None]
    if len(sources) != 1:
        raise UsageError("give exactly one spec source: -c FILE, -s JSON, -S FILE, or -i ID with -p URI")
    if args.compute_id is not None and not args.compute_id:
        raise UsageError("-i/--compute-id must not be empty")
    if not (0 < args.http_port < 65536):
        raise UsageError("--http-port must be 1..65535")
    if internal_served(args) and args.internal_http_port == args.http_port:
        raise UsageError("--internal-http-port must differ from the external HTTP port")
    if not (0 < args.postgres_exporter_port < 65536) or (
            args.postgres_exporter and args.postgres_exporter_port == args.http_port):
        raise UsageError("--postgres-exporter-port must be 1..65535 and differ from --http-port")
    if args.postgres_exporter and not os.access(args.postgres_exporter, os.X_OK):
        missing = not os.path.exists(args.postgres_exporter)
        raise UsageError(f"--postgres-exporter {args.postgres_exporter!r}: "
                         + ("no such file: install Debian's prometheus-postgres-exporter (the image: "
                            "build it with --build-arg WITH_POSTGRES_EXPORTER=1), or drop the flag"
                            if missing else "not an executable"))
    if args.monitor_interval <= 0 or args.grace_seconds < 0:
        raise UsageError("--monitor-interval must be > 0 and --grace-seconds >= 0")
    for flag, value in (("--lock-timeout", args.lock_timeout), ("--statement-timeout", args.statement_timeout)):
        if not (0 <= value <= 86400):  # NaN fails too
            raise UsageError(f"{flag} must be 0..86400 seconds")
    args.http_address = http_address(args.http_address)
    if internal_served(args):
        args.internal_http_address = http_address(args.internal_http_address or INTERNAL_DEFAULT_ADDRESS,
                                                  "--internal-http-address")
    if not (1 <= args.storage_timeout <= 86400):  # also refuses nan
        raise UsageError("--storage-timeout must be between 1 and 86400 seconds")
    if not (1 <= args.attempt_deadline <= 86400):
        raise UsageError("--attempt-deadline must be between 1 and 86400 seconds")
    if args.attempt_deadline < args.storage_timeout:  # the silence bound would never act
        raise UsageError("--attempt-deadline must be at least --storage-timeout")
    limit_error = ensure_limits()  # what supervisord needs, checked before the bind (compute/base/rlimits.py)
    if limit_error:
        raise UsageError(limit_error)


def validate(args: argparse.Namespace):
    """What needs psycopg: the connection string and the spec (after validate_flags, and after
    the bind: the early responder answers meanwhile). Nothing is touched yet. Returns (stored
    document, parsed spec, superuser, the config file's compute_ctl_config or None): the
    document is the parsed spec written back (spec.to_document), which every program reads
    typed without parsing it again. A config file's spec may be null: no spec, start `empty`."""
    from compute.model.reach import connstr_mismatch
    from compute.model.spec import SpecError, decode_spec_text, parse_spec, parse_spec_text, read_spec_file, to_document
    superuser = require_superuser(args.connstr)
    doc = spec = ctl_config = None
    if args.config is not None:
        from compute.model.compute_config import parse_compute_config
        config = parse_compute_config(decode_spec_text(read_spec_file(args.config)))
        ctl_config = config.compute_ctl_config
        if config.spec is not None:
            spec = parse_spec(config.spec, superuser=superuser)
    elif args.control_plane_uri is None:  # -s or -S (validate_flags: exactly one spec source)
        text = args.spec if args.spec is not None else read_spec_file(args.spec_path)
        spec = parse_spec_text(text, superuser=superuser)
    if spec is not None:
        mismatch = connstr_mismatch(args.connstr, spec)
        if mismatch:  # before initdb: the compute would start where -C cannot reach it
            raise SpecError("cluster.settings", mismatch)
        doc = to_document(spec)
    return doc, spec, superuser, ctl_config


def choose_jwks(args: argparse.Namespace, runtime_dir: str, ctl_config) -> tuple[str | None, dict | None, str | None]:
    """(jwks_path, the JWKS compute-ctl writes there or None, a line to log or None), pure. An
    explicit --jwks wins; else -c's compute_ctl_config.jwks goes to RUNTIME_DIR/jwks.json; in v2
    pull mode that same path, which the driver fills from the answer."""
    from compute.shared.jwks_file import jwks_path
    from_config = ctl_config.jwks if ctl_config is not None else None
    v2_pull = args.control_plane_uri is not None and args.control_plane_api == "v2"
    if args.jwks:
        note = None
        if from_config is not None:
            note = f"--jwks {args.jwks} given: the config file's compute_ctl_config.jwks is not used"
        elif v2_pull:
            note = f"--jwks {args.jwks} given: the control plane's compute_ctl_config.jwks will not be used"
        return os.path.abspath(args.jwks), None, note
    if from_config is not None:
        return jwks_path(runtime_dir), from_config, None
    if v2_pull:
        return jwks_path(runtime_dir), None, None
    return None, None, None


def early_jwks(args: argparse.Namespace) -> bool | None:
    """Whether the compute has a JWKS, as the early responder must take it before -c's file or
    the control plane's answer is read (pure): True with --jwks; None (not known yet: only the
    open routes answer) when -c or -p may still bring one; False otherwise."""
    if args.jwks:
        return True
    if args.config or args.control_plane_uri:
        return None
    return False


def spec_identity(spec) -> dict:
    """The tenant and timeline a validated spec names (None without storage or spec): /status
    shows them from the start, as the original does."""
    return {"tenant": spec.tenant_id if spec else None, "timeline": spec.timeline_id if spec else None}


def http_address(text: str, flag: str = "--http-address") -> str:
    """The --http-address as a normalised IP literal (v4 or v6, no brackets)."""
    try:
        return str(ipaddress.ip_address(text.strip().strip("[]")))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: not an IP address (e.g. 0.0.0.0, 127.0.0.1, ::1)") from None


INTERNAL_DEFAULT_ADDRESS = "127.0.0.1"


def internal_served(args: argparse.Namespace) -> bool:
    """The internal API is served when --internal-http-port or --internal-http-address is given
    (as HEAD's launch always does); a launch without either (the 2023 contract's) has none, so
    computes sharing a machine never contend for HEAD's default 3081."""
    return bool(getattr(args, "internal_http_port_given", False) or getattr(args, "internal_http_address", None))


def internal_exposure_warning(address: str | None) -> str | None:
    """The warning for an internal API (no token, ever) listening beyond loopback, or None."""
    if address is None or ipaddress.ip_address(address).is_loopback:
        return None
    return (f"!!! the internal API (POST /grants, /extensions: no token) listens on {address}, not loopback: "
            "anyone who reaches the port can grant privileges and install extensions. Use "
            "--internal-http-address 127.0.0.1 unless the network is yours alone !!!")


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


def check_jwks(path: str, user) -> None:
    """--jwks as the api will read it (call it as the compute user): readable, JSON, at least one
    key the api can verify tokens with. Otherwise the compute would start and answer every token
    401; refused instead with a sentence (UsageError)."""
    from compute.api.access import load_jwks
    try:
        keys = load_jwks(path)
    except OSError as e:
        try:
            st = os.stat(path)
            seen = f" (found: owner uid {st.st_uid}, group gid {st.st_gid}, mode {st.st_mode & 0o7777:04o})"
        except OSError:
            seen = ""
        raise UsageError(f"--jwks {path}: the compute user {user.name} (uid {user.uid}) cannot read it: "
                         f"{e.strerror}{seen}. Fix: make it readable by that user (e.g. chmod 0644: a "
                         "JWKS holds public keys only), on a path it can reach") from None
    except ValueError as e:
        raise UsageError(f"--jwks {path}: not a JWKS: invalid JSON ({e}). Needed: a JSON object "
                         '{"keys": [...]}, as the token issuer publishes it') from None
    if not keys.keys:
        raise UsageError(f"--jwks {path}: no usable key in it (supported: kty RSA for RS256, kty OKP "
                         "with crv Ed25519 for EdDSA; use absent or \"sig\"): every token would be "
                         "refused. Fix: give the issuer's public keys")


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


def prepare_runtime_files(runtime_dir: str, ours_jwks: str | None = None) -> None:
    """As the compute user: root never creates or chowns anything the user could have planted.
    `ours_jwks`: the JWKS file this start writes itself (-c) or its driver does (v2 pull), i.e.
    RUNTIME_DIR/jwks.json: a previous run's copy (the runtime dir outlives a restart) is removed
    first, so that no token is ever verified with the keys of another start."""
    os.makedirs(os.path.join(runtime_dir, "logs"), mode=0o700, exist_ok=True)
    if ours_jwks is not None:
        try:
            os.unlink(ours_jwks)
        except FileNotFoundError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        gc.enable()  # not a start: nothing to hurry
    if argv and argv[0] == "plan":
        from compute.boot.plan_command import main as plan_main
        return plan_main(argv[1:])
    if argv and argv[0] == "supervisorctl":
        from compute.boot.supervisorctl_command import main as supervisorctl_main
        return supervisorctl_main(argv[1:])
    mark("compute-ctl: imported")
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_ports(parser, args)
    check_conflicts(parser, args)
    setup_bootstrap_logging(args.log_format)
    mark("compute-ctl: flags parsed")
    try:
        validate_flags(args)
        # Bound now, as root (a port < 1024 works) and before anything is touched; held until
        # we exit, served by the api program (compute/api/listener.py).
        api_sock = bind_api_socket(args.http_address, args.http_port)
        try:
            internal_sock = bind_api_socket(args.internal_http_address, args.internal_http_port,
                                            "--internal-http-address/--internal-http-port") \
                if internal_served(args) else None
        except BindError:
            api_sock.close()
            raise
    except (UsageError, BindError) as e:
        print(f"compute-ctl: {e}", file=sys.stderr)
        return 1
    started = time.time()
    # /status & co. answered from here on (the state we know: `init`), while we import,
    # validate and start the tree; the api takes over the rest (compute/boot/early_responder.py).
    # It may answer `init` for a compute that then exits 1 (a bad connection string, spec,
    # path or user: checked next, each a one-line error): never more than that.
    responder = EarlyResponder(api_sock, started=started, jwks=early_jwks(args)).start()
    return reporting_unexpected(lambda: bootstrap(args, api_sock, responder, started, internal_sock),
                                cleanup=responder.stop)  # bounded; on every way out


def reporting_unexpected(run, cleanup=None, streams=None) -> int:
    """`run()`'s exit code; an exception it raises has its traceback written to sys.stderr, and
    exit 1 (EXIT_UNEXPECTED). Once the tree runs, sys.stderr is the bounded stream, whose writer
    is a daemon thread: a traceback left to the interpreter would be queued after our drain and
    lost with that thread (a silent exit 1). Then `cleanup()`, then our last lines are drained
    (`streams`, default stdout and stderr) while the reader keeps reading; a stopped one costs
    ~1 s, then they are dropped (compute/base/stdout_buffer.py): the exit never waits for it."""
    try:
        return run()
    except Exception:  # noqa: BLE001 - reported, then the exit code of any unexpected failure
        import traceback
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - nothing left to report it to
            pass
        return EXIT_UNEXPECTED
    finally:
        try:
            if cleanup is not None:
                cleanup()
        finally:
            for stream in streams if streams is not None else (STDOUT, STDERR):
                stream.drain()


def bootstrap(args: argparse.Namespace, api_sock, responder: EarlyResponder, started: float,
              internal_sock=None) -> int:
    """Everything after the bind: validate, prepare, render, drop root, become supervisord."""
    from compute.model.environ import SECRET_VARS, program_secrets, supervisord_environment
    from compute.base.procutil import become_subreaper, scrub_initial_environment
    from compute.model.spec import SpecError
    from compute.shared.state_names import RUNTIME_DIR_ENV, STATE_ID_ENV, state_path
    from compute.tree.supervisord_conf import render_supervisord_conf
    from compute.boot.users import effective_user
    mark("compute-ctl: bootstrap imported")
    try:
        spec_doc, spec, superuser, ctl_config = validate(args)
        mark("compute-ctl: spec validated")
        identity = spec_identity(spec)
        responder.known(**identity)
        pgbin = resolve_pgbin(args.pgbin)
        pgdata = _check_path("--pgdata", args.pgdata)
        runtime_dir = _check_path("--runtime-dir", args.runtime_dir or default_runtime_dir())
        if _inside(runtime_dir, pgdata) or _inside(pgdata, runtime_dir):
            raise UsageError("--runtime-dir and --pgdata must not contain each other (PGDATA is wiped)")
        user = effective_user(args.user)
        check_dirs(runtime_dir, pgdata, user)
        mark("compute-ctl: paths, user validated")
    except (UsageError, SpecError, ValueError) as e:  # ConfigError is a ValueError
        print(f"compute-ctl: {e}", file=sys.stderr)
        return 1
    from compute.base import proctitle  # our title in ps, instead of our flags (a -s spec...)
    proctitle.set_title("bootstrap", runtime_dir, comm="compute-ctl")

    for line in ignored_flag_lines(args):
        log.info("%s", line)
    if internal_sock is not None:
        log.info("internal API (POST /grants, /extensions) on %s port %d", args.internal_http_address,
                 args.internal_http_port)
    if ctl_config is not None and ctl_config.tls is not None:
        log.info("compute_ctl_config.tls ignored: TLS is not supported")
    jwks_path, jwks_to_write, jwks_note = choose_jwks(args, runtime_dir, ctl_config)
    if jwks_note:
        log.info("%s", jwks_note)
    vm_informant = args.vm_informant if args.vm_informant and os.access(args.vm_informant, os.X_OK) else None
    settings = LaunchSettings(
        pgdata=pgdata, connstr=args.connstr, pgbin=pgbin, pgbin_dir=resolve_pgbin_dir(pgbin),
        superuser=superuser, http_port=args.http_port, internal_http_port=args.internal_http_port,
        http_address=args.http_address, internal_http_address=args.internal_http_address if internal_sock else None, runtime_dir=runtime_dir, lock_timeout=args.lock_timeout,
        statement_timeout=args.statement_timeout,
        compute_id=args.compute_id, control_plane_uri=args.control_plane_uri,
        control_plane_api=args.control_plane_api,
        grace_seconds=args.grace_seconds, monitor_interval=args.monitor_interval,
        jwks_path=jwks_path, jwt_require_exp=args.jwt_require_exp, log_format=args.log_format,
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
        prepare_runtime_files(runtime_dir, jwks_path if jwks_path and not args.jwks else None)
        mark("compute-ctl: dirs prepared, root dropped")
        if not os.access(sys.executable, os.X_OK):
            raise UsageError(f"{sys.executable} is not executable by user {user.name}: install "
                             "compute-supervisor where that user can read it (scripts/install.sh)")
        informant_connstr = f"dbname=postgres user={superuser} sslmode=disable"
        # Rendered before the fork: it refuses a token that cannot be passed in a program's
        # environment (an exit 1 before anything starts), and the driver's environment is its.
        conf = render_supervisord_conf(
            runtime_dir=runtime_dir, pgdata=pgdata, pgbin=pgbin, python=sys.executable,
            auth_token=spec.storage_auth_token if spec else None, vm_informant=vm_informant,
            informant_connstr=informant_connstr,
            postgres_exporter=settings.postgres_exporter, postgres_exporter_port=args.postgres_exporter_port,
            exporter_dsn=_exporter_dsn(args.connstr) if args.postgres_exporter else "",
            program_env=program_secrets(os.environ, spec.storage_auth_token if spec else None))
    except (OSError, UsageError, ValueError) as e:
        print(f"compute-ctl: {e}", file=sys.stderr)
        return 1

    mark("compute-ctl: validated, rendered")
    become_subreaper()  # before the first fork: every orphan of the tree is ours to reap
    # From here on we are supervisord (one PID for the life of the compute): its loop runs in
    # this process until every program has stopped. PYTHONSAFEPATH: `python -m` must not
    # import from the working directory (a `compute/` or `gunicorn.py` there would shadow the
    # installed package in every program). No secrets: each goes only to the program that
    # needs it (compute/model/environ.py, the conf's per-program environment). The state
    # file's identity (STATE_ID_ENV) is added once the file exists, after the driver's fork.
    env = {**supervisord_environment(os.environ), RUNTIME_DIR_ENV: runtime_dir, "PYTHONSAFEPATH": "1",
           API_FD_ENV: str(api_sock.fileno()),
           **({INTERNAL_FD_ENV: str(internal_sock.fileno())} if internal_sock is not None else {})}
    # The lifecycle driver now, not after supervisord's warm-up, nor after the state file: it
    # starts the storage request (which needs the validated spec and settings, PGDATA, the
    # runtime dir and no root) while we write the conf and the state file and become
    # supervisord, which adopts it (compute/tree/early_driver.py).
    from compute.base.procutil import SUPERVISORD_PID_ENV
    from compute.shared.supervisor_rpc import socket_path
    from compute.tree import early_driver
    early_driver.hold_stop_signals()
    from compute.base import forkinfo
    forkinfo.bootstrap_objects = (settings, spec)  # what the state file is created with, next
    try:
        early_driver.fork_driver(early_driver.program_environment(
            {**env, SUPERVISORD_PID_ENV: str(os.getpid())}, conf, f"unix://{socket_path(runtime_dir)}"), sys.executable)
    except OSError as e:  # no process or fd to spare now: supervisord forks it, as it would retry
        log.warning("could not fork the lifecycle driver early (%s): supervisord starts it", e)
    try:
        import sqlite3
        try:
            if args.jwks:  # the operator's file (not -c's or the pull answer's), read as the api will
                # After the fork: its keys are built with PyJWT and cryptography (~50-60 ms of
                # imports), while the driver's storage request starts. Before the state file: a
                # refused start leaves none. Still one line and exit 1 before supervisord runs;
                # the driver and its request are stopped first (finally, below).
                check_jwks(settings.jwks_path, user)
                # Token holders' /status & co. answered from here on, held ones too, not only
                # once the api serves (compute/boot/early_responder.py; PyJWT is imported now).
                responder.jwks_known(settings.jwks_path, settings.compute_id, settings.jwt_require_exp)
            state_id = create_state_file(runtime_dir, {
                # last_active starts at the start (as the original): a compute nobody ever connects
                # to must still look idle since then, not "never", to be suspended. `started` and
                # the spec's tenant/timeline are what the early responder has answered so far.
                "launch": settings.to_json(), "status": "init", "error": None, "start_time": started,
                "last_active": started, "spec": spec_doc, "spec_generation": 1 if spec_doc else 0,
                "metrics": {}, **identity,
            })
            env[STATE_ID_ENV] = state_id
            early_driver.state_file_ready({STATE_ID_ENV: state_id})  # the driver may read it now
            mark("compute-ctl: state file ready")
            write_tree_files(runtime_dir, conf, jwks_path, jwks_to_write, responder)
        except (OSError, ValueError, UsageError, sqlite3.Error) as e:  # the driver is stopped (finally, below)
            print(f"compute-ctl: {e}", file=sys.stderr)
            return 1
        if not settings.jwks_path:
            responder.jwks_known(None)  # /status & co. answered to anyone from now on
        responder.state_ready(state_path(runtime_dir))
        mark("compute-ctl: tree files written")
        early_driver.wait_request_started()
        if settings.jwks_path and not args.jwks:  # -c's (written now) or the pull answer's (the driver's)
            # after the request has started: the rule imports PyJWT and cryptography (~60 ms)
            responder.jwks_known(settings.jwks_path, settings.compute_id, settings.jwt_require_exp)
        gc.enable()  # off since our first import (top of this module)
        return become_supervisord(args, api_sock, responder, env, runtime_dir, pgdata, user, settings, spec,
                                  internal_sock)
    finally:
        if early_driver.stop_unadopted():  # supervisord never took it over: a failed bootstrap
            from compute.tree.reaper import stop_descendants
            stop_descendants(pgdata)  # what it left (initdb's bootstrap postgres, reparented to us)


def create_state_file(runtime_dir: str, initial_state: dict) -> str:
    """As the compute user, after the driver's fork (its storage request does not need it, the
    driver proper does: it waits for its identity, which this returns, STATE_ID_ENV)."""
    from compute.shared.state import StateStore, state_path
    store = StateStore.create(state_path(runtime_dir), initial_state)
    store.close()
    return store.identity


def write_tree_files(runtime_dir: str, conf: str, jwks_path: str | None, jwks_to_write: dict | None,
                     responder: EarlyResponder) -> None:
    """As the compute user, after the driver's fork and the state file (none of it is the
    driver's): the JWKS compute-ctl writes (0600, before the api starts), the hand-over socket,
    supervisord.conf (0600: it may carry the storage token)."""
    from compute.tree.supervisord_conf import CONF_NAME
    if jwks_to_write is not None:
        from compute.shared.jwks_file import write_jwks
        write_jwks(jwks_path, jwks_to_write)
    responder.offer_handover(handover_path(runtime_dir))
    old = os.umask(0o077)
    try:
        with open(os.path.join(runtime_dir, CONF_NAME), "w") as f:
            f.write(conf)
    finally:
        os.umask(old)


def become_supervisord(args, api_sock, responder, env, runtime_dir, pgdata, user, settings, spec,
                       internal_sock=None) -> int:
    from compute.base import proctitle
    from compute.shared.state import state_path
    from compute.tree.exit_decision import tree_exit_code
    from compute.tree.reaper import stop_descendants
    from compute.tree.supervisord_conf import CONF_NAME
    from compute.tree.supervisord import STOP_BY_RPC, recorded_exit_code, run as run_supervisord
    log.info("starting compute: PGDATA %s, HTTP %s port %d, runtime dir %s, user %s",
             pgdata, args.http_address, args.http_port, runtime_dir, user.name)
    for warning in (exposure_warning(args.http_address, settings.jwks_path),
                    internal_exposure_warning(settings.internal_http_address),
                    token_warning(settings.jwks_path, settings.compute_id)):
        if warning:
            log.warning("%s", warning)
    if spec is not None and spec.ignored_keys:
        from compute.model.spec_shape import unknown_keys_line
        log.warning("%s", unknown_keys_line(spec.ignored_keys))
    os.environ.clear()
    os.environ.update(env)
    sys.stderr = BoundedTextStream(STDERR)  # nothing of the loop waits for stderr's reader either
    proctitle.set_title("supervisord", runtime_dir, comm="compute-ctl")
    stopped_by = run_supervisord(os.path.join(runtime_dir, CONF_NAME))
    responder.stop()  # if the api never took over: the tree is down, nothing is answered any more
    # Whatever the path (postgres exited, SIGTERM, /terminate, failed start), nothing of the
    # tree outlives us: as the subreaper we see all of it.
    stop_descendants(pgdata)
    api_sock.close()
    if internal_sock is not None:
        internal_sock.close()
    code = tree_exit_code(recorded_exit_code(state_path(runtime_dir)),
                          stopped_by_signal=stopped_by not in (None, STOP_BY_RPC),
                          stopped_by_rpc=stopped_by == STOP_BY_RPC)
    if code is None:
        log.error("supervisord stopped unexpectedly")
        code = EXIT_UNEXPECTED
    log.info("compute stopped: exit code %d", code)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
