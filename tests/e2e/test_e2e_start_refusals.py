"""Sentences instead of errno (issue 20, item 4): a start that cannot work is refused with one line
naming what was found and how to fix it, exit 1, before supervisord runs: an unreadable or
invalid --jwks (read as the compute user, as the api reads it), a -b not on PATH."""

from __future__ import annotations

import json
import os

import pytest

from tests.support.pgcluster import PG_USER
from tests.support.tree import Compute


def refused(c: Compute, *mentions: str) -> str:
    code = c.wait_exit(30)
    out = c.output().strip()
    assert code == 1, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("compute-ctl: ")]
    assert len(lines) == 1, out[-3000:]
    for m in mentions:
        assert m in lines[0], (m, out)
    assert "Errno" not in out and "Traceback" not in out, out
    assert not os.path.exists(os.path.join(c.runtime_dir, "supervisord.pid"))
    return lines[0]


JWKS_CASES = {
    # root's 0600 file: root could read it, the api (the compute user) cannot
    "unreadable": (json.dumps({"keys": []}), 0o600, 0, ["cannot read it", "mode 0600", "chmod 0644"]),
    "invalid JSON": ("{not json", 0o644, None, ["not a JWKS: invalid JSON"]),
    "no usable key": (json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}), 0o644, None,
                      ["no usable key", "every token would be refused"]),
}


@pytest.mark.parametrize("case", sorted(JWKS_CASES))
def test_a_jwks_the_api_could_not_use_refuses_the_start(case):
    text, mode, owner, mentions = JWKS_CASES[case]
    c = Compute()
    c.spec = c.new_spec()
    path = os.path.join(c.base, "jwks.json")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    if owner is None:
        PG_USER.chown(path)
    c.args += ["--jwks", path]
    try:
        c.start()
        refused(c, f"--jwks {path}", *mentions)
    finally:
        c.close()


def test_pgbin_not_on_path_says_so():
    c = Compute()
    c.spec = c.new_spec()
    c.pgbin = "postgres-not-installed"
    c.env = {"PATH": "/usr/bin:/bin"}
    try:
        c.start()
        refused(c, "no executable 'postgres-not-installed' on PATH (/usr/bin:/bin)", "give the full path")
    finally:
        c.close()
