"""Error bodies and request limits shared by every route.

Every error falcon raises (unknown route 404, wrong method 405, 413, 401...) is answered as
JSON `{"error": "<message>"}`, whatever the client's Accept header says.
"""

from __future__ import annotations

import json
import threading

import falcon

MAX_BODY_BYTES = 1024 * 1024  # 1 MiB
# Bodies are read by a pool thread, bounded in time by the worker (compute/api/worker.py); at
# most this many per worker process at once, so that slow senders can never hold every thread:
# the rest of the threads stay free for /status, /healthz and the others. Beyond it: 503.
MAX_CONCURRENT_BODY_READS = 4
_body_reads = threading.BoundedSemaphore(MAX_CONCURRENT_BODY_READS)
JSON_TYPE = "application/json"


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


def has_body(req: falcon.Request) -> bool:
    return bool(req.content_length) or "chunked" in (req.get_header("Transfer-Encoding") or "").lower()


def is_json(content_type: str | None) -> bool:
    """application/json, optionally with charset=utf-8 (RFC 8259: JSON is UTF-8)."""
    if not content_type:
        return False
    media, _, params = content_type.partition(";")
    if media.strip().lower() != JSON_TYPE:
        return False
    for param in filter(None, (p.strip() for p in params.split(";"))):
        name, _, value = param.partition("=")
        if name.strip().lower() != "charset" or value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def unsupported_media_type() -> falcon.HTTPError:
    return falcon.HTTPUnsupportedMediaType(
        description="the request body must be JSON (Content-Type: application/json)")


class JsonOnly:
    """415 for a POST/PUT/PATCH whose Content-Type is not JSON, or that carries a body without
    saying what it is: a browser on another site can post a form or text/plain without a CORS
    preflight, never application/json. Runs after auth (falcon runs process_resource hooks in
    order); resources with `json_body_required = True` need the JSON Content-Type even when the
    body is empty."""

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource, params: dict) -> None:
        if resource is None or req.method not in ("POST", "PUT", "PATCH"):
            return
        if not hasattr(resource, f"on_{req.method.lower()}"):
            return  # falcon answers 405
        ctype = req.get_header("Content-Type")
        if getattr(resource, "json_body_required", False) or ctype is not None or has_body(req):
            if not is_json(ctype):
                raise unsupported_media_type()


def read_body(req: falcon.Request) -> bytes:
    """The request body, at most MAX_BODY_BYTES (413 beyond). A chunked body has no
    Content-Length: read the server's de-chunking input stream, bounded all the same. Call it
    only after the auth and mode checks: nothing is read for a request that will be refused.
    The worker bounds the read in time (408); at most MAX_CONCURRENT_BODY_READS at once (503)."""
    if not _body_reads.acquire(blocking=False):
        raise falcon.HTTPServiceUnavailable(
            description="too many request bodies being received at once; retry", retry_after=1)
    try:
        stream = req.bounded_stream if req.content_length is not None else req.stream
        data = stream.read(MAX_BODY_BYTES + 1)
    except TimeoutError:  # socket.timeout: the worker's deadline for the request
        raise falcon.HTTPError(falcon.HTTP_408, description="the request body was not received in time",
                               headers={"Connection": "close"}) from None
    except Exception as e:  # the server's framing errors: bad chunk size, missing terminator, EOF
        raise falcon.HTTPBadRequest(description=f"malformed request body: {type(e).__name__}") from None
    finally:
        _body_reads.release()
    if len(data) > MAX_BODY_BYTES:
        raise too_large()
    return data


def spec_request(raw: bytes, shape: str) -> dict:
    """A request body that must be a JSON object with a "spec" object (/configure, /promote);
    400 naming the problem otherwise. `shape` is what the error says the body should be."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise falcon.HTTPBadRequest(description=f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise falcon.HTTPBadRequest(description="request body is nested too deeply") from None
    if not isinstance(body, dict) or not isinstance(body.get("spec"), dict):
        raise falcon.HTTPBadRequest(description=f"request body must be a JSON object {shape}")
    return body


def text(resp: falcon.Response, body: str, status: str | int = falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_TEXT
    resp.text = body


def json_body(resp: falcon.Response, body, status: str | int = falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(body)
