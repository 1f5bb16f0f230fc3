"""Error bodies and request limits shared by every route.

Every error falcon raises (unknown route 404, wrong method 405, 413, 401...) is answered as
JSON `{"error": "<message>"}`, whatever the client's Accept header says.
"""

from __future__ import annotations

import json

import falcon

MAX_BODY_BYTES = 1024 * 1024  # 1 MiB


def error_body(message: str) -> str:
    return json.dumps({"error": message})


def serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    resp.content_type = falcon.MEDIA_JSON
    resp.text = error_body(exc.description or exc.title or str(exc.status))


class BodyLimit:
    """413 for a request announcing a body over the limit (handlers that read a body also
    bound the read, for chunked requests)."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        length = req.content_length
        if length is not None and length > MAX_BODY_BYTES:
            raise too_large()


_TooLarge = getattr(falcon, "HTTPContentTooLarge", None) or falcon.HTTPPayloadTooLarge  # falcon < 4


def too_large() -> falcon.HTTPError:
    return _TooLarge(description=f"request body larger than {MAX_BODY_BYTES} bytes")


def read_body(req: falcon.Request) -> bytes:
    """The request body, at most MAX_BODY_BYTES (413 beyond). A chunked body has no
    Content-Length: read the server's de-chunking input stream, bounded all the same."""
    stream = req.bounded_stream if req.content_length is not None else req.stream
    try:
        data = stream.read(MAX_BODY_BYTES + 1)
    except Exception as e:  # the server's framing errors: bad chunk size, missing terminator, EOF
        raise falcon.HTTPBadRequest(description=f"malformed request body: {type(e).__name__}") from None
    if len(data) > MAX_BODY_BYTES:
        raise too_large()
    return data


def text(resp: falcon.Response, body: str, status: str | int = falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_TEXT
    resp.text = body


def json_body(resp: falcon.Response, body, status: str | int = falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(body)
