"""`promtool check metrics` on a /metrics page, the one way every test runs it.

Clean means: the page parses (exit 1 otherwise) and promtool's linter has nothing to say, but
for exactly one remark on exactly Neon's two downtime families. compute_ctl at HEAD names them
`compute_pg_current_downtime_ms` and `compute_pg_downtime_ms_total` (its metrics.rs); issue 18
asks for HEAD's names, and promtool's linter (2.42) flags any `_ms` token ("metric names should
not contain abbreviated units"). We keep HEAD's names (a dashboard built on HEAD reads them) and
allow that one remark on those two names only (docs/api.md, "Prometheus metrics").
"""

from __future__ import annotations

import shutil
import subprocess

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
HEAD_NAMES_WITH_MS = ("compute_pg_current_downtime_ms", "compute_pg_downtime_ms_total")
ALLOWED = frozenset(f"{name} metric names should not contain abbreviated units" for name in HEAD_NAMES_WITH_MS)
LINT_PROBLEMS = 3  # promtool's exit code when the page parsed and the linter had remarks


def problems(page: str) -> tuple[int, list[str]]:
    """(promtool's exit code, its remarks that are not the allowed ones)."""
    res = subprocess.run([PROMTOOL, "check", "metrics"], input=page, capture_output=True, text=True, timeout=30)
    remarks = [line.strip() for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    return res.returncode, [r for r in remarks if r not in ALLOWED]


def check_clean(page: str) -> None:
    code, others = problems(page)
    assert code in (0, LINT_PROBLEMS) and others == [], f"promtool check metrics (exit {code}): {others}\n{page}"
