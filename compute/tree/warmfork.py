"""Our Python programs are forked from compute-ctl's warm image, not exec'd.

compute-ctl (which is supervisord) imports what lifecycle, monitor and the API need once,
before the first spawn, and freezes those objects out of the garbage collector (`gc.freeze()`:
a collection in a child would otherwise touch, and so copy, every shared page). supervisord
forks as usual; in the child, `execve` (supervisor's `options.execve`, the seam) runs the
program's `python -m MODULE` entry point (what its `__main__` block calls) in-process and leaves with `os._exit` instead of
starting a new interpreter. Restarts fork again from the same warm parent. postgres, gdb,
vm-informant and the exporter (anything that is not `${python} -m` one of FORKED) still exec.
The first start's driver is not forked from here: compute-ctl forks it before supervisord runs
and supervisord adopts it (compute/tree/early_driver.py); it runs through `run_forked` all the
same. The warm image is then imported once that driver's start-up is over, just before the first
program is forked from it (`warm_for`, from compute.tree.supervisord, which holds the api and the
monitor back until then); `warm_early` (the driver's modules first) is for a supervisord
without an early driver (standalone).

Child hygiene, on top of what supervisord already did (own process group, fds 0-2 on the
program's pipes, every other fd closed, user, cwd, umask): the environment supervisord built
for the program; default signal dispositions and no signal wakeup fd; fresh stdio objects (the
parent's buffers are left behind, never flushed into the child's pipes); no logging handlers
(each program sets its own); the process name (comm) set to the program's. The state file's
SQLite handle is closed in the parent before every fork (compute.tree.supervisord), so a child opens
its own. The programs arm their parent-death signal themselves (procutil.die_with_parent).
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import io
import logging
import os
import signal
import sys
import traceback
from typing import Callable

from compute.api.listener import api_fds, keeps_api_socket
from compute.base import forkinfo, proctitle
from compute.base.trace import mark

# `python -m MODULE` -> (the name the child is shown as (comm, 15 bytes at most), what that
# module's `__main__` block calls).
FORKED = {"compute.lifecycle.driver": ("lifecycle", "compute.lifecycle.driver:main"),
          "compute.programs.monitor": ("monitor", "compute.programs.monitor:main"),
          "gunicorn": ("api", "gunicorn.app.wsgiapp:run")}
# What the programs import, in the order the start needs them: the driver first.
# compute.api.gunicorn_log is the api's gunicorn logger: imported after fork, its objects would
# land in (copied) pages of ours (gunicorn's own glogging is not imported at all: see that module).
# psycopg, the reconciler and falcon are named apart from compute.api.app, which imports them:
# warm() looks for a stop between two entries, and the app alone was ~190 ms of them.
WARM_MODULES = ("compute.lifecycle.driver", "compute.programs.monitor", "psycopg", "compute.reconcile", "falcon",
                "compute.api.app", "gunicorn.app.wsgiapp", "gunicorn.arbiter", "gunicorn.workers.gthread",
                "compute.api.worker", "compute.api.gunicorn_log")
# With --jwks only: PyJWT + cryptography (large: see compute/api/auth.py _jwt).
JWT_MODULES = ("jwt", "jwt.algorithms")
TRACE_ENV = "COMPUTE_WARMFORK_TRACE"  # a directory: see _trace_imports_after_fork
RESET_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1,
                 signal.SIGUSR2, signal.SIGALRM)

_kept_streams: list = []  # the parent's stdio objects: referenced, so never flushed or closed


def forked_module(filename: str, argv: list[str], python: str = sys.executable) -> str | None:
    """The module a program's command runs, when it is one we fork instead of exec."""
    if filename != python or len(argv) < 3 or argv[1] != "-m":
        return None
    return argv[2] if argv[2] in FORKED else None


# Forked from the first stage of the warm image, before the rest is imported: the driver, the
# critical path of every start (it runs while compute-ctl warms what the others need).
EARLY_PROGRAMS = {"lifecycle": ("compute.lifecycle.driver",)}


def warm_early() -> None:
    """What the EARLY_PROGRAMS import, frozen like warm() does; the rest comes with warm_for."""
    for modules in EARLY_PROGRAMS.values():
        for name in modules:
            importlib.import_module(name)
    gc.freeze()


_early_stage_skipped = False  # the first start's driver was forked before the image: see below


def defer_driver_modules() -> None:
    """The first start's driver was forked before supervisord (compute/tree/early_driver.py) and
    imports its own modules: compute-ctl imports nothing while that driver and its storage
    request need the CPU (issue 22). Its first warm-up, held back by supervisord until the
    start-up is over (compute/tree/supervisord.py), is then the whole image, the driver's
    modules included, before whichever forked program comes first: the hand-over's driver too."""
    global _early_stage_skipped
    _early_stage_skipped = True


def warm_for(program: str, stopping: Callable[[], bool] = lambda: False) -> bool:
    """Before supervisord forks `program` (a FORKED one: exec'd programs need no warm image):
    the whole warm image unless the early one is enough. False, the image left unfinished,
    when `stopping()` turns true meanwhile (supervisord then stops the tree instead)."""
    global _loader_pages_released
    if not forkinfo.fully_warm and (program not in EARLY_PROGRAMS or _early_stage_skipped):
        mark("supervisord: warming (all)")
        if not warm(stopping=stopping):
            mark("supervisord: warm-up cut short (stopping)")
            return False
        forkinfo.fully_warm = True
        mark("supervisord: warm (all)")
    if program in EARLY_PROGRAMS and forkinfo.fully_warm and not _loader_pages_released:
        # The driver spawned once everything is warm: normally the fresh one after the
        # start-up's hand-over, when the tree is up and idle.
        mark(f"supervisord: {release_loader_pages()} KiB of loader pages unmapped")
        # What the early responder's thread and the start-up freed (its malloc arena, the
        # state file's page cache), with the trim in each forked program below. A page stays
        # resident while any process of the tree still maps it, so both sides must give it back.
        _trim_malloc()
        _loader_pages_released = True
    _note_configured_loggers()
    return True


_loader_pages_released = False
MADV_DONTNEED = 4


def release_loader_pages() -> int:
    """Unmap, in compute-ctl, the read-only mappings of shared libraries that hold only what the
    file holds (no page copied on write: `Anonymous: 0`). The dynamic loader read the symbol and
    relocation tables of libpq's libcrypto, libssl, krb5, ldap... and ran their constructors
    here, and no program forked from us touches those pages again (fork does not copy the page
    tables of file mappings): their PSS in compute-ctl is saved (docs/performance.md, "Figures
    behind the code").
    Pages the programs map stay theirs; a page compute-ctl needs again is mapped back from the
    page cache on its next access (a minor fault). MADV_PAGEOUT would evict only the pages
    nobody maps, but the kernel honours it only for files we could write; /proc/self/pagemap
    is not ours to read once compute-ctl has dropped root. Returns the KiB unmapped."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        with open("/proc/self/smaps") as f:
            smaps = f.read().splitlines()
    except (OSError, AttributeError):
        return 0
    released, region, rss = 0, None, 0
    for line in smaps:
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            path = fields[5] if len(fields) > 5 else ""
            library = path.startswith("/") and (path.endswith(".so") or ".so." in path)
            # a writable mapping may hold copied pages (and may be written meanwhile): never those
            region = fields[0] if library and "w" not in fields[1] else None
        elif region and fields[0] == "Rss:":
            rss = int(fields[1])
        elif region and fields[0] == "Anonymous:":
            if int(fields[1]) == 0 and rss:
                start, end = (int(x, 16) for x in region.split("-"))
                if madvise(start, end - start, MADV_DONTNEED) == 0:
                    released += rss
            region = None
    return released


# The loggers that are not as a fresh interpreter has them (handlers, propagate off, disabled),
# found in the parent before the fork: the child resets only these (see _fresh_logging). Found
# again only when loggers were added: walking them in the parent before every spawn would copy
# their pages there, and leave each program forked earlier the old pages as its own.
_configured_loggers: list = []
_loggers_seen = -1


def _note_configured_loggers() -> None:
    global _loggers_seen
    manager = logging.Logger.manager
    if len(manager.loggerDict) == _loggers_seen:
        return
    _loggers_seen = len(manager.loggerDict)
    _configured_loggers[:] = [lg for lg in manager.loggerDict.values()
                              if isinstance(lg, logging.Logger) and (lg.handlers or not lg.propagate or lg.disabled)]


def warm_modules(jwks: bool) -> tuple[str, ...]:
    """What the warm image imports: PyJWT only for a compute that verifies tokens."""
    return WARM_MODULES + (JWT_MODULES if jwks else ())


def jwks_configured(runtime_dir: str | None) -> bool:
    """Whether the bootstrap's settings name a JWKS (the store is closed again: SQLite is
    opened in each program after fork)."""
    from compute.model.launch import load
    from compute.shared.state import StateStore, state_path
    if not runtime_dir or not os.path.exists(state_path(runtime_dir)):
        return False  # no store (a standalone supervisord): no JWKS known; do not create one
    store = StateStore(state_path(runtime_dir))
    try:
        found = load(store)
    except Exception:  # noqa: BLE001 - the programs report a bad store themselves
        found = None
    finally:
        store.close()
    return bool(found and found.jwks_path)


def warm(jwks: bool | None = None, stopping: Callable[[], bool] = lambda: False) -> bool:
    """Import once what the forked programs need, then keep it out of the collector's way.
    False, and the rest not imported, when `stopping()` is true between two modules: a stop
    signal then waits for one import, not for the whole image (~300 ms of CPU)."""
    if jwks is None:
        from compute.shared.state import runtime_dir_from_env
        jwks = jwks_configured(runtime_dir_from_env(required=False))
    for name in warm_modules(jwks):
        if stopping():
            return False
        try:
            importlib.import_module(name)
        except ImportError:  # an optional piece (a gunicorn without our worker's hooks)
            pass
    gc.collect()
    gc.freeze()
    _trim_malloc()
    return True


def _trim_malloc() -> None:
    """Give back the heap pages the imports freed (temporary objects of the import machinery,
    what gc.collect() just freed): less anonymous memory in the image every program shares."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _set_environ(env: dict[str, str]) -> None:
    """os.environ becomes `env`, changing only what differs: clear() + update() replaced every
    entry, which copied part of the warm image into each forked program."""
    for name in [name for name in os.environ if name not in env]:
        del os.environ[name]
    for name, value in env.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _fresh_stdio() -> None:
    _kept_streams.append((sys.stdin, sys.stdout, sys.stderr))
    # As PYTHONUNBUFFERED would make them: every line reaches supervisord as it is written.
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True, write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True, write_through=True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


def _fresh_logging() -> None:
    # Only the loggers the parent had configured (noted before the fork): walking all of them
    # here touched, so copied, each one's pages in every forked program.
    for lg in [logging.getLogger(), *_configured_loggers]:
        lg.handlers[:] = []
        lg.propagate = True
        lg.disabled = False
    logging.getLogger().setLevel(logging.WARNING)


def _trace_imports_after_fork(trace_dir: str, name: str) -> None:
    """Debugging the footprint: what this program imports after fork (private memory in every
    process that needs it) is written to TRACE_DIR/NAME-PID.txt a few seconds after the fork."""
    import threading
    at_fork = set(sys.modules)

    def dump() -> None:
        # A new file of ours only: never through a symlink, never over an existing file.
        fd = os.open(os.path.join(trace_dir, f"{name}-{os.getpid()}.txt"),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{m}\n" for m in sorted(set(sys.modules) - at_fork)))

    t = threading.Timer(5.0, dump)
    t.daemon = True
    t.start()
    os.register_at_fork(after_in_child=lambda: _trace_imports_after_fork(trace_dir, name + "-child"))


def run_forked(module: str, argv: list[str], env: dict[str, str], entry: str | None = None) -> None:
    """In supervisord's child: become the program and never return. `entry`: instead of the
    module's own (the early driver's: compute/tree/early_driver.py)."""
    code = 1
    try:
        trace_dir = os.environ.get(TRACE_ENV)  # compute-ctl's own environment, not the program's
        signal.set_wakeup_fd(-1)
        for sig in RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as a fresh interpreter has it
        _set_environ(env)
        _fresh_stdio()
        _fresh_logging()
        name, own_entry = FORKED[module]
        entry = entry or own_entry
        proctitle.set_comm(name)  # the title: the program's entry (compute/base/proctitle.py)
        _trim_malloc()  # the parent's free heap pages, inherited: see warm_for
        mark(f"{name}: forked")
        if trace_dir:
            _trace_imports_after_fork(trace_dir, name)
        sys.argv = [name if module == "gunicorn" else argv[0], *argv[3:]]
        mod, func = entry.split(":")
        result = getattr(importlib.import_module(mod), func)()
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def execve(options, filename: str, argv: list[str], env: dict[str, str]):
    """supervisor's ServerOptions.execve, in the child supervisord just forked."""
    module = forked_module(filename, argv)
    if not keeps_api_socket(module):
        for api_fd in api_fds():
            try:
                os.close(api_fd)  # the API sockets are the api's alone (compute/api/listener.py)
            except OSError:
                pass
    if module is None:
        mark(f"exec: {os.path.basename(argv[argv.index('--') + 1] if '--' in argv[:-1] else filename)}")
        return os.execve(filename, argv, env)
    run_forked(module, argv, env)
