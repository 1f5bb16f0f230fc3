"""compute/'s packages keep their layers: each imports only the ones below it, and the api
never imports what changes postgres or storage (the contracts are pyproject.toml's
[tool.importlinter]; docs/architecture.md, "Packages and layers")."""

import logging
import os

from importlinter import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_import_points_down_the_layers(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(REPO)  # the checkout's compute/, not an installed copy
    # import-linter configures logging (dictConfig), which disables every logger that exists:
    # later tests in this process would lose their records.
    loggers = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    was = {lg: lg.disabled for lg in loggers}
    try:
        code = cli.lint_imports(no_cache=True, no_logo=True)
    finally:
        for lg, disabled in was.items():
            lg.disabled = disabled
    assert code == cli.EXIT_STATUS_SUCCESS, capsys.readouterr().out[-4000:]
