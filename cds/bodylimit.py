"""The body limit (``max_request_bytes``) for requests that do not say how long they are.

Flask refuses a declared ``Content-Length`` over ``MAX_CONTENT_LENGTH`` with a 413 before reading anything. A chunked
request has no length: gunicorn marks its end (``wsgi.input_terminated``) and werkzeug limits the stream, but
``request.get_data()`` then returns the first ``MAX_CONTENT_LENGTH`` bytes *without an error*, so an oversized body
would be parsed cut short (a 400 about its JSON, or worse, a shorter document that happens to parse).
:class:`BoundedBody` reads such a body itself, up to one byte past the limit, before the app sees the request: a body
within the limit is handed on with its length set, a longer one is announced as too long, so the app answers its
usual 413 without reading it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

WsgiApp = Any  # a WSGI callable: (environ, start_response) -> iterable of bytes


class BoundedBody:
    def __init__(self, app: WsgiApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if not environ.get("CONTENT_LENGTH") and environ.get("wsgi.input_terminated"):
            stream = environ["wsgi.input"]
            body = bytearray()
            while len(body) <= self.limit:
                chunk = stream.read(min(65_536, self.limit + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
            if len(body) > self.limit:  # the app refuses it on the declared length, as for any other
                environ["wsgi.input"], environ["CONTENT_LENGTH"] = io.BytesIO(), str(len(body))
            else:
                environ["wsgi.input"], environ["CONTENT_LENGTH"] = io.BytesIO(bytes(body)), str(len(body))
            # the body is now an ordinary one of known length (werkzeug ignores CONTENT_LENGTH while the request
            # still says it is chunked)
            environ.pop("wsgi.input_terminated")
            environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, start_response)  # type: ignore[no-any-return]
