"""What importing the control socket's client costs the start-up's driver (issue 22)."""

from __future__ import annotations

import subprocess
import sys


def test_the_client_does_not_import_supervisor() -> None:
    """The start-up's driver imports the client just before startProcess("postgres"):
    supervisor's modules (its transport) would cost it ~37 ms of CPU (issue 22)."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom compute.shared import supervisor_rpc\n"
         "supervisor_rpc.import_client()\nsupervisor_rpc.rpc('/nonexistent', timeout=1)\n"
         "print(sorted(m for m in sys.modules if m.split('.')[0] == 'supervisor'))"],
        capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
