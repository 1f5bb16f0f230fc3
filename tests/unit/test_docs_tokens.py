"""docs/operations.md, "A JWKS and tokens for testing": the script as the doc shows it (taken
from the doc, not copied) makes a JWKS and two tokens that our access rules take as the doc says:
the admin token for any compute, the other for compute `compute-1` only."""

from __future__ import annotations

import os
import re

from compute.api import access

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "operations.md")
SECTION = "## A JWKS and tokens for testing"


def doc_script() -> str:
    with open(DOC) as f:
        text = f.read()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section shows one python script"
    return blocks[0]


def run_doc_script(tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(doc_script(), "make_tokens.py", "exec"), namespace)  # noqa: S102 - our own doc
    return namespace


def test_the_documented_script_makes_a_jwks_and_tokens_our_rules_accept(tmp_path, monkeypatch):
    ns = run_doc_script(tmp_path, monkeypatch)
    assert ns["compute_id"] == "compute-1"
    jwks = access.load_jwks(str(tmp_path / "jwks.json"))
    assert len(jwks.keys) == 1
    admin = (tmp_path / "admin.jwt").read_text()
    compute = (tmp_path / "compute.jwt").read_text()
    for name in ("admin.jwt", "compute.jwt"):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0  # tokens are credentials
    peer = "10.1.2.3"  # not loopback: the token is what lets it in
    for route in ("/status", "/configure"):
        assert access.decide(route, peer, f"Bearer {admin}", jwks, "compute-1", require_exp=True).allowed
        assert access.decide(route, peer, f"Bearer {admin}", jwks, "another", require_exp=True).allowed
        assert access.decide(route, peer, f"Bearer {compute}", jwks, "compute-1", require_exp=True).allowed
        refused = access.decide(route, peer, f"Bearer {compute}", jwks, "another")
        assert not refused.allowed and refused.status == 403


def test_tokens_of_the_documented_script_are_refused_when_altered_or_foreign(tmp_path, monkeypatch):
    ns = run_doc_script(tmp_path, monkeypatch)
    jwks = access.load_jwks(str(tmp_path / "jwks.json"))
    admin = (tmp_path / "admin.jwt").read_text()
    head, claims, sig = admin.split(".")
    tampered = ".".join([head, claims, sig[:-4] + ("AAAA" if not sig.endswith("AAAA") else "BBBB")])
    assert access.decide("/configure", "10.1.2.3", f"Bearer {tampered}", jwks, "compute-1").status == 401
    # a second run: a new key, whose tokens the first JWKS does not know
    other = tmp_path / "other"
    other.mkdir()
    run_doc_script(other, monkeypatch)
    foreign = (other / "admin.jwt").read_text()
    assert access.decide("/configure", "10.1.2.3", f"Bearer {foreign}", jwks, "compute-1").status == 401
    # past its exp: refused
    assert not access.decide("/status", "10.1.2.3", f"Bearer {admin}", jwks, "compute-1",
                             now=ns["exp"] + 3600).allowed
