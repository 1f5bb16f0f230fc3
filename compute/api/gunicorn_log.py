"""The api's gunicorn logger (gunicorn's `logger_class`): gunicorn's own messages as `LEVEL:
message` on stderr, like every program of the tree (the in-process log relay adds the time and
the program name), and no access log.

Not gunicorn.glogging.Logger: that module imports logging.config, logging.handlers, pickle and
socketserver for what we do not use (dictConfig, syslog, statsd, log files), in the warm image
every compute carries (docs/performance.md, "Figures behind the code"). gunicorn_conf still uses
gunicorn's Logger when COMPUTE_API_ACCESS_LOG asks for an access log.
"""

from __future__ import annotations

import logging

from compute.base.logs import setup_program_logging

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


class StderrLogger:
    """What gunicorn's arbiter and workers call on their logger (gunicorn.glogging.Logger's
    interface), on the stdlib's `gunicorn.error` logger."""

    access_log_enabled = False  # workers skip preparing access-log fields

    def __init__(self, cfg):
        self.error_log = logging.getLogger("gunicorn.error")
        self.setup(cfg)

    def setup(self, cfg) -> None:
        self.cfg = cfg
        setup_program_logging(_LEVELS.get(str(cfg.loglevel).lower(), logging.INFO))

    def critical(self, msg, *args, **kwargs) -> None:
        self.error_log.critical(msg, *args, **kwargs)

    def error(self, msg, *args, **kwargs) -> None:
        self.error_log.error(msg, *args, **kwargs)

    def warning(self, msg, *args, **kwargs) -> None:
        self.error_log.warning(msg, *args, **kwargs)

    def info(self, msg, *args, **kwargs) -> None:
        self.error_log.info(msg, *args, **kwargs)

    def debug(self, msg, *args, **kwargs) -> None:
        self.error_log.debug(msg, *args, **kwargs)

    def exception(self, msg, *args, **kwargs) -> None:
        self.error_log.exception(msg, *args, **kwargs)

    def log(self, lvl, msg, *args, **kwargs) -> None:
        if isinstance(lvl, str):
            lvl = _LEVELS.get(lvl.lower(), logging.INFO)
        self.error_log.log(lvl, msg, *args, **kwargs)

    def access(self, resp, req, environ, request_time) -> None:
        pass

    def reopen_files(self) -> None:
        pass  # stderr only: nothing to reopen (SIGUSR1)

    def close_on_exec(self) -> None:
        pass  # stderr is fd 2, which a worker keeps on purpose
