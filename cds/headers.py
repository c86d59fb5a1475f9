"""Security headers on every response, set once for the whole app.

Every response: ``X-Content-Type-Options: nosniff`` and, when the view did not set its own, ``Cache-Control:
no-store`` (hook answers, FHIR resources, reviewer JSON and their errors carry patient data or credentials: no cache
between here and the client may keep them; static assets set their own through ``send_file``).

HTML responses also get ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` and, when the view did not set
its own, :data:`DEFAULT_CSP` (no inline script or style). A header a view set itself is never replaced: the DTR form
page needs ``style-src 'unsafe-inline'`` for LHC-Forms and the reviewer pages have theirs.
"""

from __future__ import annotations

from flask import Flask, Response

DEFAULT_CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)
HTML_HEADERS = (
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", DEFAULT_CSP),
)


def secure(resp: Response) -> Response:
    """Add the headers a response lacks (an ``after_request`` hook: error responses pass through it too)."""
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Cache-Control", "no-store")
    if resp.mimetype == "text/html":
        for name, value in HTML_HEADERS:
            resp.headers.setdefault(name, value)
    return resp


def register(app: Flask) -> None:
    app.after_request(secure)
