"""The link a card gives the clinician to a coverage assertion's form page: short-lived and bound to that assertion.

``{base_url}/dtr/{assertion_id}?t=<expiry>.<mac>``: the MAC is HMAC-SHA256, with a key derived from the service
secret (:func:`cds.smart.service_key`), over the assertion id and the expiry. Expiry is the runtime's clock plus
``form_link_seconds``. A link whose MAC does not match (forged, altered, or made for another assertion) is a bare
401; an authentic link past its expiry is a 403 that says what to do.
"""

from __future__ import annotations

import base64
import hmac
import re
from hashlib import sha256
from urllib.parse import quote

from cds.errors import Forbidden, Unauthorized
from cds.runtime import Runtime
from cds.smart import service_key

PURPOSE = "form-link"
_TOKEN = re.compile(r"([0-9]{1,12})\.([A-Za-z0-9_-]{43})")  # expiry (epoch seconds) . unpadded base64url SHA-256
EXPIRED = "This link has expired: sign the order again or open the form from the EHR"


def form_link(rt: Runtime, assertion_id: str) -> str:
    """The full URL of the form page for ``assertion_id``, valid for ``form_link_seconds``."""
    expires = int(rt.clock().timestamp()) + int(rt.config["form_link_seconds"])
    return f"{rt.base_url}/dtr/{quote(assertion_id, safe='')}?t={expires}.{_mac(rt, assertion_id, expires)}"


def check_form_link(rt: Runtime, assertion_id: str, token: str | None) -> None:
    """Nothing when ``token`` (the ``t`` query parameter) is a current link for ``assertion_id``.

    :raise Unauthorized: no token, a malformed one, or one not made by this service for this assertion.
    :raise Forbidden: a link this service made for this assertion, past its expiry.
    """
    found = _TOKEN.fullmatch(token or "")
    if found is None:
        raise Unauthorized("form link token missing or malformed")
    expires = int(found.group(1))
    if not hmac.compare_digest(found.group(2).encode(), _mac(rt, assertion_id, expires).encode()):
        raise Unauthorized("form link not for this assertion")
    if expires <= rt.clock().timestamp():
        raise Forbidden(EXPIRED)


def _mac(rt: Runtime, assertion_id: str, expires: int) -> str:
    message = f"{assertion_id}\n{expires}".encode()
    digest = hmac.new(service_key(rt, PURPOSE), message, sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
