"""gunicorn settings for the API program (loaded with `-c python:compute.api.gunicorn_conf`).

    COMPUTE_RUNTIME_DIR=/run/compute \\
        python -m gunicorn -c python:compute.api.gunicorn_conf "compute.api.app:create_app()"

gthread workers: a /configure blocks one thread of one worker while /status keeps being served
by the others. Workers hold no state of their own (everything lives in the state file), so a
worker that crashes or is recycled loses nothing. Overrides through the environment:
COMPUTE_API_WORKERS, COMPUTE_API_THREADS, COMPUTE_API_CONNECTIONS (per worker), COMPUTE_API_ACCESS_LOG=1,
COMPUTE_API_FAST_PATH=0 (every request to the thread pool: compute/api/fastpath.py).
"""

import gc
import os

import gunicorn.util

from compute.api.listener import inherited_fd, inherited_internal_fd
from compute.base import proctitle
from compute.base.procutil import die_with_parent
from compute.base.trace import mark
from compute.model.launch import LaunchSettings, require as require_settings
from compute.shared.state import StateFileLost, StateStore, park_without_state, runtime_dir_from_env, state_path


def bind_address(host: str, port: int) -> str:
    """host:port as gunicorn's bind wants it ([v6]:port)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _launch() -> LaunchSettings:
    runtime_dir = runtime_dir_from_env()
    store = StateStore(state_path(runtime_dir))
    try:
        return require_settings(store)
    except StateFileLost as e:  # an exit would be a restart, and another, and another
        park_without_state(e, "api")
        raise
    finally:
        store.close()  # do not carry an open SQLite handle into forked workers


_launch_settings = _launch()
_access_log = os.environ.get("COMPUTE_API_ACCESS_LOG", "") not in ("", "0")

# Under compute-ctl: the socket it bound and holds for the life of the tree (compute/api/listener.py),
# so a restart never binds again. Standalone: bind the address ourselves.
_api_fd = inherited_fd()
bind = [f"fd://{_api_fd}"] if _api_fd is not None else [
    bind_address(_launch_settings.http_address, _launch_settings.http_port)]
# The internal port (compute/api/internal.py), after the external one: the worker takes the
# connections compute-ctl's early responder held (external ones) as the first listener's.
_internal_fd = inherited_internal_fd()
if _internal_fd is not None:
    bind.append(f"fd://{_internal_fd}")
elif _api_fd is None and _launch_settings.internal_http_address is not None:
    bind.append(bind_address(_launch_settings.internal_http_address, _launch_settings.internal_http_port))
try:  # gthread that reads request heads in its poller, not in a pool thread (see the module)
    from compute.api.worker import HeadFirstThreadWorker as worker_class
except (ImportError, AttributeError):  # a gunicorn without the hooks it needs
    worker_class = "gthread"
# 1 worker x 16 threads, with the fast path (worker.py: /status & co answered on the poller).
# Every worker costs its private pages; one is enough since the poller accepts every waiting
# connection per turn. One thread carries every /status, so the latency grows with the
# connections in flight; COMPUTE_API_WORKERS=2 doubles the throughput for a compute that must
# serve many more concurrent clients (the figures: docs/performance.md, "Figures behind the code").
workers = int(os.environ.get("COMPUTE_API_WORKERS", "1"))
# 16 threads per worker: threads are what absorbs requests that block: /configure, /terminate,
# /insights and /check_writability on a stuck postgres (10 s statement timeout), bodies sent
# slowly. Request heads do not hold a thread, and /status & co never reach the pool (worker.py),
# so their number no longer costs /status its tail. COMPUTE_API_FAST_PATH=0: everything to the pool.
threads = int(os.environ.get("COMPUTE_API_THREADS", "16"))
keepalive = 5
# Connections each worker holds at once (open, kept alive, or sending a head): a bound, so a
# flood cannot exhaust file descriptors or memory; beyond it, new connections wait in the listen
# backlog until one is closed (silent ones within `keepalive`, heads within 10 s: worker.py).
worker_connections = int(os.environ.get("COMPUTE_API_CONNECTIONS", "256"))
# Import the app once in the master and fork it: at start-up the workers would otherwise each
# spend ~0.2 s of CPU importing it, on the 2 cores the lifecycle driver needs for the start.
# Safe: the state store opens its SQLite connection per process after fork.
preload_app = True
timeout = 30  # the heartbeat of a worker, not a request timeout (a /configure may take minutes)
graceful_timeout = 2  # inside supervisord's stopwaitsecs = 3 for the api program
proc_name = "compute_ctl:api"
accesslog = "-" if _access_log else None
errorlog = "-"
loglevel = "info"
if _access_log:
    # gunicorn's own Logger, for its access-log format: `LEVEL: message` on stderr like every
    # supervised program (the in-process log relay adds the time and the program name).
    from gunicorn.glogging import Logger
    logger_class = Logger
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s: %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "plain"}},
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        },
    }
else:
    # The same lines without gunicorn.glogging's imports, and no access-log fields prepared per
    # request (a few percent of a /status): compute/api/gunicorn_log.py.
    from compute.api.gunicorn_log import StderrLogger
    logger_class = StderrLogger
# gunicorn >= 24 opens a control socket under $HOME by default: shared between instances, and
# nothing here uses it.
control_socket_disable = True


def _title(text: str) -> None:
    """gunicorn titles its master and each worker (`master [proc_name]`, through setproctitle,
    which would also make comm `gunicorn: maste`): ours instead (compute/base/proctitle.py),
    `compute-ctl: api master|worker (runtime dir DIR)`, comm `api`."""
    proctitle.set_title(f"api {text.split(' ', 1)[0]}", runtime_dir_from_env(required=False), comm="api")


gunicorn.util._setproctitle = _title  # looked up at each call (gunicorn.arbiter: util._setproctitle)


def on_starting(server):
    """In the master: if supervisord is killed outright, get SIGTERM (graceful stop) rather than
    survive as an orphan holding the port. Workers already exit when the master goes."""
    die_with_parent()


def when_ready(server):
    mark("api: master listening")


def post_worker_init(worker):
    mark("api: worker ready")


def pre_fork(server, worker):
    """In the master, before each worker is forked: what the master made after its own fork
    (the app, this config, gunicorn's logging) joins the warm image's frozen objects, so the
    workers' full collections never walk (and so copy) those pages (the saving: docs/performance.md, "Figures behind the code")."""
    gc.freeze()


# The status answers are tiny; reject absurd request lines and headers early.
limit_request_line = 8190
limit_request_fields = 100

