"""The hostile-spec corpus (tests/unit/test_fault_spec.py) through the real `compute-ctl`: a
representative handful of cases, each rejected with exit 1 and one line, nothing touched,
nothing started.
"""

from __future__ import annotations

import copy
import os
import socket
import threading
import pytest

from compute.model.spec import MAX_SPEC_BYTES
from tests.support.fault_tree import proc_table
from tests.support.hostile_spec import (BASE, S5, TRAILING_NEWLINE, UNCAUGHT, add_setting, case, role, text, top,
                                        with_)
from tests.support.tree import Compute

TENANT, TIMELINE = "3aa8fcc61f6d357410b7de754b1d9001", "de200bd42b49cc1814412c7e592dd6e9"


class Listener:
    """A TCP port that records whether anybody connected (a pageserver that must not be asked)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.sock.close()


E2E = [
    case("setting value newline injection", with_(add_setting(value="1MB\nfsync = off")), f"{S5}.value"),
    case("role name with NUL", with_(role(name="ap\x00p")), "cluster.roles[0].name"),
    case("roles is an object", with_(lambda s: s["cluster"].update(roles={"app": {}})), "cluster.roles"),
    case("non-UTF-8 bytes", text(BASE).replace(b'"test"', b'"te\xffst"', 1), "<document>"),
    case("larger than 16 MiB", text(BASE)[:-1] + b" " * MAX_SPEC_BYTES + b"}", "<document>"),
    case("bad tenant id (Neon path)", b"NEON", "tenant_id"),
    case("deeply nested JSON", b"[" * 100_000 + b"]" * 100_000, "<document>", UNCAUGHT),
    case("token + trailing newline", with_(top(storage_auth_token="s3cr3t-token\n")), "storage_auth_token",
         TRAILING_NEWLINE + "; compute-ctl then prints the token itself ('...' cannot be written to "
         "supervisord.conf) after creating the runtime dir (compute/boot/cli.py main(): prepare_dirs before "
         "render_supervisord_conf)"),
]


@pytest.mark.parametrize("data,field", E2E)
def test_compute_ctl_rejects_hostile_spec_touching_nothing(data, field):
    c = Compute()
    pageserver = Listener()
    try:
        if data == b"NEON":
            s = copy.deepcopy(BASE)
            s.update(pageserver_connstring=f"host=127.0.0.1 port={pageserver.sock.getsockname()[1]}",
                     tenant_id="not-a-tenant", timeline_id=TIMELINE, storage_auth_token="tok")
            data = text(s)
        os.makedirs(c.pgdata)
        marker = os.path.join(c.pgdata, "precious")
        with open(marker, "w") as f:
            f.write("keep me")
        spec_path = os.path.join(c.base, "hostile.json")
        with open(spec_path, "wb") as f:
            f.write(data)
        c.args = ["-S", spec_path]
        c.start()
        code = c.wait_exit(15)
        out = c.output()
        lines = out.strip().splitlines()
        assert code == 1, out[-2000:]
        assert len(lines) == 1, f"{len(lines)} lines: {out[-2000:]}"
        assert lines[0].startswith(f"compute-ctl: invalid spec: {field}: "), lines[0][:300]
        assert "s3cr3t" not in out
        assert sorted(os.listdir(c.pgdata)) == ["precious"] and open(marker).read() == "keep me"
        assert not os.path.exists(c.runtime_dir), os.listdir(c.runtime_dir)
        assert not [p for p in proc_table().values() if c.pgdata in p.cmdline or c.base in p.cmdline]
        assert pageserver.connections == 0
    finally:
        pageserver.close()
        c.close()
