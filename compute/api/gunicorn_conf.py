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

from gunicorn.glogging import Logger as _GunicornLogger

from compute.api_socket import inherited_fd
from compute.procutil import die_with_parent
from compute.trace import mark
from compute.settings import Settings, default, load as load_settings
from compute.state import StateStore, state_path


def bind_address(host: str, port: int) -> str:
    """host:port as gunicorn's bind wants it ([v6]:port)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _launch() -> Settings | None:
    runtime_dir = os.environ.get("COMPUTE_RUNTIME_DIR")
    if not runtime_dir:
        raise RuntimeError("COMPUTE_RUNTIME_DIR is not set")
    store = StateStore(state_path(runtime_dir))
    try:
        return load_settings(store)
    finally:
        store.close()  # do not carry an open SQLite handle into forked workers


class QuietAccessLogger(_GunicornLogger):
    """gunicorn prepares the access-log fields of every request as soon as a logconfig_dict is
    set, even with no access log: a few percent of the CPU of a /status. Skip that."""

    def access(self, resp, req, environ, request_time):
        if self.cfg.accesslog:
            super().access(resp, req, environ, request_time)


_launch_settings = _launch()
_access_log = os.environ.get("COMPUTE_API_ACCESS_LOG", "") not in ("", "0")

# Under compute-ctl: the socket it bound and holds for the life of the tree (compute/api_socket.py),
# so a restart never binds again. Standalone: bind the address ourselves.
_api_fd = inherited_fd()
bind = [f"fd://{_api_fd}"] if _api_fd is not None else [
    bind_address(_launch_settings.http_address if _launch_settings else default("http_address"),
                 _launch_settings.http_port if _launch_settings else default("http_port"))]
try:  # gthread that reads request heads in its poller, not in a pool thread (see the module)
    from compute.api.worker import HeadFirstThreadWorker as worker_class
except (ImportError, AttributeError):  # a gunicorn without the hooks it needs
    worker_class = "gthread"
# 2 workers x 16 threads, with the fast path (worker.py: /status & co answered on the poller).
# python -m bench.api (wrk, 64 keep-alive connections, 2 shared cores), medians [range] of 3
# interleaved runs, req/s / p50 / p99 idle, p99 during a /configure:
#   2 x 16 fast path: 9,060 [8,069-9,453] / 6.9 / 15.6 [12.1-17.1] ms, 13.4 [11.1-13.5] ms
#   2 x 16 pool only: 7,043 / 7.9 / 36.5 [30.6-42.9] ms (2 x 4 pool only: 32.5 ms)
#   1 x 16 fast path: 5,611 / 11.0 / 52.5 [42.9-54.2] ms, 45.4 [18.1-137.3] ms
#   1 x 16 pool only: 1,303 / 47.7 / 72.8 ms (16 threads convoying on one GIL)
# One worker would save ~13 MiB, but one thread then carries every /status on one core the load
# generator shares: any stall of it delays all 64 connections, and p99 misses 20 ms.
workers = int(os.environ.get("COMPUTE_API_WORKERS", "2"))
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
logger_class = QuietAccessLogger
# `LEVEL: message` on stderr like every supervised program: the in-process log relay adds the time
# and the program name (text or JSON, the log_format setting) on the way to compute-ctl's stdout.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "plain"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["stderr"] if _access_log else [], "propagate": False},
    },
}
# gunicorn >= 24 opens a control socket under $HOME by default: shared between instances, and
# nothing here uses it.
control_socket_disable = True


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
    workers' full collections never walk (and so copy) those pages: -2 MiB PSS for the tree
    after 10 s of API load at 2 workers (python -m bench.footprint --after-load 10)."""
    gc.freeze()


# The status answers are tiny; reject absurd request lines and headers early.
limit_request_line = 8190
limit_request_fields = 100

