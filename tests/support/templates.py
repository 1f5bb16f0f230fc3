"""Copies of the installed supervisord templates with one program's line changed, for a tree
started with `COMPUTE_TEMPLATE_DIR` pointing at the copy."""

from __future__ import annotations

import os
import shutil

from compute.tree.supervisord_conf import template_dir
from tests.support.pgcluster import scratch_dir


def templates_with(program: str, old: str, new: str) -> str:
    """A directory holding the templates, `old` replaced by `new` once in `[program:<program>]`."""
    d = scratch_dir("cs-tmpl-")
    for name in os.listdir(template_dir()):
        shutil.copy(os.path.join(template_dir(), name), d)
    path = os.path.join(d, "supervisord.conf.tmpl")
    with open(path) as f:
        text = f.read()
    head, sep, rest = text.partition(f"[program:{program}]\n")
    assert sep and old in rest, (program, old)
    with open(path, "w") as f:
        f.write(head + sep + rest.replace(old, new, 1))
    os.chmod(path, 0o644)
    return d
