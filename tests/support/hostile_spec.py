"""Building blocks of the hostile-spec corpus (tests/unit/test_fault_spec.py, and the cases
tests/fault/test_fault_spec.py also gives the real compute-ctl)."""

from __future__ import annotations

import copy
import json
import pytest

from tests.support.tree import base_spec

BASE = base_spec(55432, "/tmp")  # settings[0..4]: port listen_addresses unix_socket_directories fsync shared_buffers
N_SETTINGS = len(BASE["cluster"]["settings"])

# -- product bugs this corpus found, now fixed; their cases stay as regression tests -----------
TRAILING_NEWLINE = ("product bug: compute/model/spec.py validates with re.match and patterns ending in `$`, "
                    "which also matches before a trailing newline (use re.fullmatch or \\Z)")
UNCAUGHT = ("product bug: compute/model/spec.py parse_spec_text catches only ValueError/UnicodeDecodeError "
            "around json.loads, so deeply nested JSON escapes as RecursionError instead of SpecError: "
            "compute-ctl dies with a 26-line traceback (POST /configure catches it itself)")


def text(s: dict) -> bytes:
    return json.dumps(s).encode()


def with_(fn) -> bytes:
    s = copy.deepcopy(BASE)
    fn(s)
    return text(s)


def role(**kw):
    return lambda s: s["cluster"]["roles"][0].update(kw)


def add_setting(name="application_name", value="x", vartype="string"):
    return lambda s: s["cluster"]["settings"].append({"name": name, "value": value, "vartype": vartype})


def top(**kw):
    return lambda s: s.update(kw)


def case(id, data, field, xfail=None):
    """`xfail` names the (fixed) bug a case once exposed; it is documentation, not a mark."""
    return pytest.param(data, field, id=id)


S5 = f"cluster.settings[{N_SETTINGS}]"
