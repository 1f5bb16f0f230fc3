"""GET /openapi.yaml: the API's OpenAPI 3 document (docs/openapi.yaml of the source tree)."""

from __future__ import annotations

import os
import sys

import falcon

# The source tree's copy, then the installed one (pyproject data-files: share/compute-supervisor).
CANDIDATES = (
    os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "docs", "openapi.yaml")),
    os.path.join(sys.prefix, "share", "compute-supervisor", "openapi.yaml"),
)


class OpenApiDocument:
    def __init__(self, paths: tuple[str, ...] = CANDIDATES):
        self.paths = paths

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        for path in self.paths:
            try:
                with open(path, "rb") as f:
                    data = f.read()
                break
            except OSError:
                continue
        else:
            raise falcon.HTTPNotFound(description="the OpenAPI document is not installed")
        resp.content_type = "application/yaml"
        resp.data = data
