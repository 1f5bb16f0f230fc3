"""Whether the installed copy (scripts/install.sh) is the checkout's: the tests that run it must
not silently test stale code after an edit.

install.sh records `source_hash()` of what it installed in the venv (STAMP); the same hash of
the checkout must match. Both sides hash the same files the same way: `sha256sum` of each
installed source file in byte order of its path, then the sha256 of those lines. Keep the two in
step (scripts/install.sh, `source_hash`).
"""

from __future__ import annotations

import hashlib
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The package, its supervisord templates, and what pip and the data files take from the checkout.
SOURCE_DIRS = ("compute", "supervisor")
SOURCE_FILES = ("pyproject.toml", "docs/openapi.yaml")
STAMP = os.path.join("share", "compute-supervisor", "installed-sources.sha256")


def _source_paths(repo: str) -> list[str]:
    paths = [p for p in SOURCE_FILES if os.path.isfile(os.path.join(repo, p))]
    for top in SOURCE_DIRS:
        for root, dirs, files in os.walk(os.path.join(repo, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            paths += [os.path.relpath(os.path.join(root, f), repo) for f in files if not f.endswith(".pyc")]
    return sorted(paths, key=os.fsencode)  # LC_ALL=C sort


def source_hash(repo: str = REPO) -> str:
    lines = []
    for rel in _source_paths(repo):
        with open(os.path.join(repo, rel), "rb") as f:
            lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {rel}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def installed_hash(venv: str) -> str | None:
    try:
        with open(os.path.join(venv, STAMP)) as f:
            return f.read().strip()
    except OSError:
        return None


def stale_reason(venv: str, repo: str = REPO) -> str | None:
    """None when `venv` holds the checkout's sources; else a one-line reason."""
    installed = installed_hash(venv)
    if installed is None:
        return f"{venv} has no record of what was installed in it: run scripts/install.sh"
    if installed != source_hash(repo):
        return f"the copy installed in {venv} is not the checkout's: run scripts/install.sh"
    return None
